"""Adapters out on the real decoder: SmolLM2-135M's split model against its PEFT folder and merged model.

Builds the split model (cut after ``--layer`` blocks, LoRA on q/v of every block, no release
projection), fills its adapters with random values (a trained adapter, as far as equality
goes), writes ``<tmp>/adapter`` three times (the per-checkpoint cost), loads it with
``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(<SmolLM2 folder>), ...)``,
exports the merged model and loads that with ``AutoModelForCausalLM``; prints the largest
logit difference of each from the split model (and of the base model without the adapter).

    nice -n 19 python simulations/export_smollm2.py
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from guardedtuning.config import build_config
    from guardedtuning.models import export
    from guardedtuning.models.loading import resolve_model_source
    from guardedtuning.models.parts import split_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layer", type=int, default=4)
    ap.add_argument("--no-merged", action="store_true", help="only time the adapter writes")
    args = ap.parse_args()
    cfg = build_config({"model.name": "smollm2-135m", "split.layer": args.layer, "split.release-dim": 0})
    t0 = time.perf_counter()
    model = split_model(cfg.model, cfg.split, cfg.lora, 2, "cpu", cfg.seed)
    print(f"split model built in {time.perf_counter() - t0:.2f} s")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    out = Path(tempfile.mkdtemp(prefix="export-smollm2-"))
    wall, cpu = [], []
    for _ in range(3):
        t0, c0 = time.perf_counter(), time.process_time()
        export.write_adapter(model, model_cfg=cfg.model, lora=cfg.lora, seed=cfg.seed, dest=out / "adapter")
        wall.append(round(time.perf_counter() - t0, 3))
        cpu.append(round(time.process_time() - c0, 3))
    size = os.path.getsize(out / "adapter" / "adapter_model.safetensors")
    print(f"write_adapter: wall {wall} s, cpu {cpu} s, adapter_model.safetensors {size} bytes")
    if args.no_merged:
        return
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(resolve_model_source("smollm2-135m"),
                                                                          dtype=torch.float32), str(out / "adapter"))
    peft.eval()
    ids = torch.randint(100, 20000, (2, 16), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = model.logits(ids, mask)
        got = peft(input_ids=ids, attention_mask=mask).logits
        with peft.disable_adapter():
            plain = peft(input_ids=ids, attention_mask=mask).logits
    print(f"max |peft - split| {float((got - ref).abs().max()):.3g}, max |base - split| "
          f"{float((plain - ref).abs().max()):.3g}, max |split| {float(ref.abs().max()):.3g}")
    t0 = time.perf_counter()
    export.export_merged(out, out / "merged")
    print(f"export_merged: {time.perf_counter() - t0:.2f} s")
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged")).eval()
    with torch.no_grad():
        diff = float((merged(input_ids=ids, attention_mask=mask).logits - ref).abs().max())
    print(f"max |merged - split| {diff:.3g}; files in {out}")


if __name__ == "__main__":
    main()
