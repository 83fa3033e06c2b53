"""Incremental greedy decoding through the split (one key/value cache shared by bottom and top).

The cached path must give the tokens the uncached one gives (every step re-running the whole
sequence), and, on a split without a release projection, the tokens the unsplit Hugging Face
model's ``generate`` gives; it runs each position through the blocks once and the LM head at
one position per row and step.
"""

from __future__ import annotations

import pytest
import torch

from guardedtuning.config import LoraConfig, ModelConfig, SplitConfig
from guardedtuning.data.batches import left_padded
from guardedtuning.evaluation import greedy_token_ids
from guardedtuning.models.loading import load_backbone
from guardedtuning.models.parts import SplitModel, split_model
from guardedtuning.models.split import build_split

PROMPTS = [[101, 7592, 2088, 2003], [101, 2054], [101, 1996, 3007, 1997, 2605, 2003, 3000], [101, 2129, 2024]]
PAD = 0


def _batch(prompts: list[list[int]] = PROMPTS):
    return left_padded(prompts, PAD)  # rows of different lengths: left padding matters


def _eos_mid_way(model, n: int = 8) -> int:
    """A token the first row emits at its third step (not at the first): an eos that stops some rows early."""
    free = greedy_token_ids(model, _batch(), eos=-1, pad=PAD, max_new_tokens=n, use_cache=False)
    return int(free[0, 2])


@pytest.mark.parametrize("release_dim", [0, 4])
@pytest.mark.parametrize("layer", [1, 2])
def test_cached_greedy_tokens_equal_the_uncached_path(layer, release_dim):
    model = split_model(ModelConfig(name="tiny-llama"), SplitConfig(layer=layer, release_dim=release_dim),
                        LoraConfig(rank=4), 1, "cpu", 0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter: LoRA B away from its zero start
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05, generator=g)
    for eos in (-1, _eos_mid_way(model)):
        slow = greedy_token_ids(model, _batch(), eos=eos, pad=PAD, max_new_tokens=8, use_cache=False)
        fast = greedy_token_ids(model, _batch(), eos=eos, pad=PAD, max_new_tokens=8, use_cache=True)
        assert fast.tolist() == slow.tolist(), eos
    done_rows = (slow == eos).any(1)
    assert bool(done_rows.any()) and not bool(done_rows.all())  # the eos case really stops some rows early


def _unsplit(bb):
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM(bb.config)
    hf.model, hf.lm_head = bb.body, bb.lm_head  # the very modules the split holds
    return hf.eval()


def test_cached_greedy_on_the_split_equals_the_unsplit_model_generate():
    bb = load_backbone("tiny-llama", seed=0)
    bottom, top = build_split(bb, 2, num_labels=1)
    model = SplitModel(bottom, top).eval()
    eos = _eos_mid_way(model)
    batch = _batch()
    got = greedy_token_ids(model, batch, eos=eos, pad=PAD, max_new_tokens=8)
    with torch.no_grad():
        ref = _unsplit(bb).generate(batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=8,
                                    do_sample=False, eos_token_id=eos, pad_token_id=PAD)
    assert got.tolist() == ref[:, batch.input_ids.shape[1]:].tolist()


def test_cached_decoding_runs_each_position_once_and_the_head_at_the_last_only():
    model = split_model(ModelConfig(name="tiny-llama"), 2, LoraConfig(rank=4), 1, "cpu", 0)
    seen = {"top": 0, "head": 0}

    def count(key):
        return lambda m, args: seen.__setitem__(key, seen[key] + args[0].shape[:-1].numel())

    hooks = [model.top.blocks.layers[0].register_forward_pre_hook(count("top")),
             model.top.head.register_forward_pre_hook(count("head"))]
    try:
        out = {}
        for use_cache in (False, True):
            seen.update(top=0, head=0)
            ids = greedy_token_ids(model, _batch(), eos=-1, pad=PAD, max_new_tokens=6, use_cache=use_cache)
            out[use_cache] = (dict(seen), ids)
    finally:
        for h in hooks:
            h.remove()
    b, t0 = _batch().input_ids.shape
    steps = out[True][1].shape[1]
    assert steps == 6
    # cached: the prompt once, then one new position per row and step; the head once per row and step
    assert out[True][0] == {"top": b * (t0 + steps - 1), "head": b * steps}
    # uncached: the whole sequence every step, head at every position
    full = sum(b * (t0 + s) for s in range(steps))
    assert out[False][0] == {"top": full, "head": full}
    assert out[True][1].tolist() == out[False][1].tolist()


def test_an_encoder_has_no_cache():
    model = split_model(ModelConfig(name="tiny-bert"), 2, LoraConfig(rank=4), 2, "cpu", 0)
    with pytest.raises(ValueError, match="encoder"):
        model.new_cache()
