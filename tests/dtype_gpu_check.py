"""``model.dtype`` on a CUDA device: bf16/fp16 split loss and gradients against fp32, and DP per-sample gradients.

Not a pytest file (it needs a GPU): ``PYTHONPATH=.:<opacus and the MiniLM tokenizer> python3 tests/dtype_gpu_check.py``.
Run once on an H200 whose image had transformers 5.17, so tiny-llama failed there for another reason (the
split's ``create_causal_mask(cache=...)`` needs transformers >= 5.24, the project's pin).
"""

from __future__ import annotations

import traceback

import torch

from guardedtuning.config import LoraConfig, ModelConfig, SplitConfig
from guardedtuning.models.loading import load_backbone
from guardedtuning.models.lora import add_lora, load_trainable, trainable_state
from guardedtuning.models.parts import split_model
from guardedtuning.models.split import build_split
from guardedtuning.privacy.dpsgd import DPStep
from tests.test_dtype import _batch, _random_lora_b, _rel
from tests.test_privacy_dpsgd import plan, server_grad

SPLIT = SplitConfig(layer=2, release_dim=4)
DEV = "cuda"


def per_sample(name: str, dtype: str, b) -> float:
    """Largest relative L2 error of Opacus's per-sample gradients against a per-example loop (same batch)."""
    bb = load_backbone(name)
    bot, top = build_split(bb, 2, num_labels=3, dtype=getattr(torch, dtype))
    bot.to(DEV)
    top.to(DEV)
    add_lora(bot, LoraConfig(rank=4), bb.kind)
    _random_lora_b(bot, 1)
    for p in top.parameters():
        p.requires_grad_(False)
    bot.eval()
    top.eval()
    params = [p for p in bot.parameters() if p.requires_grad]
    losses = top.per_example_loss(bot(b.input_ids, b.attention_mask), b.attention_mask, b.labels)
    rows = [torch.autograd.grad(losses[i], params, retain_graph=True) for i in range(len(b))]
    batched = [torch.stack([r[j] for r in rows]) for j in range(len(params))]
    step = DPStep(bot, plan(expected_batch_size=float(len(b))))
    try:
        grads = step.per_sample_gradients(b, server_grad(bot, top, b), device=DEV)
    finally:
        step.close()
    assert {g.dtype for g in grads} == {torch.float32}
    return max(_rel(g, w) for g, w in zip(grads, batched, strict=True))


def main() -> None:
    print("torch", torch.__version__, torch.cuda.get_device_name(0))
    for name in ("tiny-bert", "tiny-llama"):
        ref: tuple[float, dict[str, torch.Tensor]] | None = None
        state = None
        for dtype in ("float32", "bfloat16", "float16"):
            try:
                m = split_model(ModelConfig(name=name, dtype=dtype), SPLIT, LoraConfig(rank=2), 3, DEV, 0)
                if state is None:
                    _random_lora_b(m, 3)
                    state = trainable_state(m)
                else:
                    load_trainable(m, state, source="gpu check")
                b = _batch(name).to(DEV)
                loss = m.per_example_loss(b.input_ids, b.attention_mask, b.labels).mean()
                loss.backward()
                g = {n: p.grad.detach().float().cpu() for n, p in m.named_parameters() if p.requires_grad}
                if ref is None:
                    ref = (float(loss.detach()), g)
                err = max(float((g[n] - ref[1][n]).norm() / ref[1][n].norm()) for n in g)
                line = (f"{name} {dtype}: loss rel {abs(float(loss.detach()) - ref[0]) / ref[0]:.2e}, "
                        f"max grad rel L2 {err:.3e}")
                if dtype != "float32":
                    line += f", DP per-sample vs loop {per_sample(name, dtype, b):.3e}"
                print(line)
            except Exception:  # noqa: BLE001 - report each case and go on
                print(f"{name} {dtype}: FAILED")
                traceback.print_exc(limit=3)


if __name__ == "__main__":
    main()
