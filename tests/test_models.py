from __future__ import annotations

import pytest
import torch

from guardedtuning.config import LoraConfig, ModelConfig
from guardedtuning.data.batches import encode
from guardedtuning.errors import ConfigError, ModelLoadError
from guardedtuning.models.loading import load_backbone, resolve_model_source
from guardedtuning.models.lora import add_lora, load_trainable, num_trainable, trainable_state
from guardedtuning.models.parts import split_model
from guardedtuning.models.split import build_split

TEXTS = ["what a lovely day, truly great", "bad", "meh, it was fine I guess"]


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama", "minilm-l6"])
@pytest.mark.parametrize("layer", [1, 2, 3])
def test_bottom_then_top_equals_the_unsplit_model(name, layer):
    bb = load_backbone(name)
    enc = bb.tokenizer(TEXTS, padding=True, return_tensors="pt")
    valid = enc["attention_mask"].bool()
    with torch.no_grad():
        out = bb.body(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        reference = out.last_hidden_state
        bottom, top = build_split(bb, layer, num_labels=3)
        h = bottom(enc["input_ids"], enc["attention_mask"])
        assert h.shape == (*enc["input_ids"].shape, bb.hidden_size)
        split = top.hidden(h, enc["attention_mask"])
    torch.testing.assert_close(split[valid], reference[valid], rtol=1e-5, atol=1e-5)


def test_decoder_head_matches_causal_lm_logits():
    bb = load_backbone("tiny-llama")
    enc = bb.tokenizer(TEXTS, padding=True, return_tensors="pt")
    bottom, top = build_split(bb, 2, num_labels=3)
    with torch.no_grad():
        ref = bb.lm_head(bb.body(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state)
        logits = top.logits(bottom(enc["input_ids"], enc["attention_mask"]), enc["attention_mask"])
    valid = enc["attention_mask"].bool()
    torch.testing.assert_close(logits[valid], ref[valid], rtol=1e-4, atol=1e-4)


def test_left_padded_prompts_match_the_unsplit_model():
    """Generation left-pads; positions then skip the padding, as the model itself does."""
    from guardedtuning.data.batches import encode_prompts
    from guardedtuning.models.split import position_ids_from_mask

    bb = load_backbone("tiny-llama")
    batch = encode_prompts(bb.tokenizer, TEXTS, max_length=40, instruction="Classify.")
    assert (batch.attention_mask[:, -1] == 1).all() and (batch.attention_mask[:, 0] == 0).any()
    bottom, top = build_split(bb, 2, num_labels=3)
    with torch.no_grad():
        ref = bb.lm_head(bb.body(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                 position_ids=position_ids_from_mask(batch.attention_mask)).last_hidden_state)
        out = top.logits(bottom(batch.input_ids, batch.attention_mask), batch.attention_mask)
    valid = batch.attention_mask.bool()
    torch.testing.assert_close(out[valid], ref[valid], rtol=1e-4, atol=1e-4)


def test_long_texts_keep_the_prompt_template_whole():
    from guardedtuning.data.batches import encode_prompts, tokenize

    tok = load_backbone("tiny-llama").tokenizer
    long = "word " * 300
    rows = tokenize(tok, "decoder", [long, "short"], [0, 2], max_length=40,
                    label_names=("negative", "neutral", "positive"), instruction="Classify.")
    assert len(rows[0].ids) <= 40
    train_text = tok.decode(rows[0].ids)
    assert train_text.startswith("# # # instruction") and "# # # response : negative" in train_text
    prompt = tok.decode(encode_prompts(tok, [long], max_length=40, instruction="Classify.").input_ids[0])
    assert prompt.endswith("# # # response :") and "instruction" in prompt


def test_decoder_loss_covers_response_tokens_only():
    bb = load_backbone("tiny-llama")
    batch = encode(bb.tokenizer, "decoder", TEXTS, [0, 1, 2], max_length=48,
                   label_names=("negative", "neutral", "positive"), instruction="Classify.")
    # prompt positions are ignored, answer tokens are kept
    assert (batch.labels[batch.attention_mask == 0] == -100).all()
    n_answer = (batch.labels != -100).sum(1)
    assert (n_answer >= 2).all() and (n_answer < batch.attention_mask.sum(1)).all()
    bottom, top = build_split(bb, 2, num_labels=3)
    loss = top.per_example_loss(bottom(batch.input_ids, batch.attention_mask), batch.attention_mask, batch.labels)
    assert loss.shape == (3,) and torch.isfinite(loss).all()
    # changing a prompt token's label target cannot matter: corrupt a prompt *label* (already -100)
    manual = []
    with torch.no_grad():
        logits = top.logits(bottom(batch.input_ids, batch.attention_mask), batch.attention_mask)
        for i in range(3):
            keep = batch.labels[i, 1:] != -100
            nll = torch.nn.functional.cross_entropy(logits[i, :-1][keep], batch.labels[i, 1:][keep])
            manual.append(nll)
    torch.testing.assert_close(loss.detach(), torch.stack(manual), rtol=1e-5, atol=1e-5)


def test_lora_is_injected_only_where_asked_and_alone_trainable():
    bb = load_backbone("tiny-bert")
    bottom, _ = build_split(bb, 2, num_labels=3)
    add_lora(bottom, LoraConfig(rank=4), "encoder")
    names = [n for n, p in bottom.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    # 2 blocks x (query, value) x (A: r x d, B: d x r)
    assert num_trainable(bottom) == 2 * 2 * (4 * 64 + 64 * 4)


def test_lora_targets_that_do_not_exist_are_named():
    bottom, _ = build_split(load_backbone("tiny-bert"), 2, num_labels=3)
    with pytest.raises(ConfigError, match="`lora.targets` names q_proj"):
        add_lora(bottom, LoraConfig(targets="q_proj"), "encoder")


def test_trainable_state_round_trip_and_mismatch():
    model = split_model(ModelConfig(name="tiny-bert"), 2, LoraConfig(rank=2), 3, "cpu", 0)
    state = trainable_state(model)
    assert any(k.startswith("top.head") for k in state)
    changed = {k: v + 1.0 for k, v in state.items()}
    load_trainable(model, changed, source="test")
    assert all(torch.equal(trainable_state(model)[k], changed[k]) for k in state)
    bad = dict(changed)
    bad.pop(next(iter(bad)))
    with pytest.raises(Exception, match="missing"):
        load_trainable(model, bad, source="test")


@pytest.mark.parametrize("layer", [0, 4, 9])
def test_split_layer_out_of_range(layer):
    with pytest.raises(ModelLoadError, match="with 1 <= K <= 3"):
        build_split(load_backbone("tiny-bert"), layer, num_labels=3)


def test_missing_model_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="is not a folder"):
        resolve_model_source(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="has no config.json"):
        resolve_model_source(str(tmp_path / "empty"))


def test_local_folder_loads_like_the_embedded_model(tmp_path):
    bb = load_backbone("tiny-bert")
    bb.body.save_pretrained(tmp_path / "m")
    bb.tokenizer.save_pretrained(tmp_path / "m")
    again = load_backbone(str(tmp_path / "m"))
    assert again.kind == "encoder" and again.num_layers == 4
    for (n1, p1), (n2, p2) in zip(bb.body.state_dict().items(), again.body.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)


def test_num_layers_truncates_real_models():
    bb = load_backbone("minilm-l6", num_layers=2)
    assert bb.num_layers == 2


def test_random_prefix_builds_the_architecture_without_weights(tmp_path):
    """`random:<folder>` needs only config.json and the tokenizer (timing runs on machines without weights)."""
    from guardedtuning.errors import ModelLoadError
    from guardedtuning.models.loading import _tiny_config, load_backbone, load_tokenizer

    _tiny_config("tiny-bert").save_pretrained(tmp_path)
    load_tokenizer("tiny-bert").save_pretrained(tmp_path)
    assert not any(tmp_path.glob("*.safetensors"))
    a = load_backbone(f"random:{tmp_path}", seed=3)
    b = load_backbone(f"random:{tmp_path}", seed=3)
    c = load_backbone(f"random:{tmp_path}", seed=4)
    assert a.kind == "encoder" and a.num_layers == 4
    wa, wb, wc = (m.body.embeddings.word_embeddings.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    with pytest.raises(ModelLoadError, match="random:"):
        load_backbone("random:", seed=0)
