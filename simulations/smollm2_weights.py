"""Fingerprint the SmolLM2 weights a machine loads, to find where two machines differ.

``--out FILE`` writes, for the model that :func:`guardedtuning.models.smollm.smollm2_dir`
gives on this machine (converted from the GGUF once, then cached):

- the library versions that touch the conversion and the probe (python, torch, numpy,
  transformers, gguf, tokenizers, safetensors);
- the sha256 of the GGUF file, of every file in the converted folder, and of each tensor
  of ``model.safetensors`` (dtype, shape, bytes), with its float64 sum and sum of squares
  (so a differing tensor's size of difference can be read off without moving the weights);
- the sha256 of each tensor de-quantized directly by ``gguf`` (``GGUFReader`` +
  ``gguf.dequantize``, numpy only), before transformers reorders anything;
- the probe prompt's token ids (:data:`smollm2_instruct.PROMPT`), and the probe's last-position
  logits (first 64, sum, argmax) through the Hugging Face model with ``sdpa`` and ``eager``
  attention in float32, and in float64, plus every layer's hidden-state norm at that position.

``--compare A B`` prints what differs between two such files.

    python simulations/smollm2_weights.py --out /work/runs/s24_smollm2/weights-here.json
    python simulations/smollm2_weights.py --compare weights-here.json weights-device.json
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import platform
import sys
from pathlib import Path
from typing import Any

PROMPT = "The capital of France is"


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _tensor_entry(arr: Any) -> dict[str, Any]:
    import numpy as np

    a = np.ascontiguousarray(arr)
    f = a.astype(np.float64)
    return {"sha256": hashlib.sha256(a.tobytes()).hexdigest(), "dtype": str(a.dtype), "shape": list(a.shape),
            "sum": float(f.sum()), "sumsq": float((f * f).sum())}


def _probe(folder: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    ids = tok(PROMPT)["input_ids"]
    out: dict[str, Any] = {"token_ids": ids, "tokens": tok.convert_ids_to_tokens(ids)}
    x = torch.tensor([ids])
    for name, attn, dtype in (("fp32_sdpa", "sdpa", torch.float32), ("fp32_eager", "eager", torch.float32),
                              ("fp64_eager", "eager", torch.float64)):
        model = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation=attn, dtype=dtype).eval()
        with torch.no_grad():
            res = model(x, output_hidden_states=True)
        z = res.logits[0, -1].double()
        out[name] = {"logits64": [float(v) for v in z[:64]], "sum": float(z.sum()), "argmax": int(z.argmax()),
                     "hidden_norms": [float(h[0, -1].double().norm()) for h in res.hidden_states]}
    return out


def _split_probe(x: Any) -> dict[str, Any]:
    """The probe through the split model (as ``smollm2_instruct.logits_probe`` builds it), with and without LoRA."""
    import torch

    from guardedtuning.config import LoraConfig, ModelConfig
    from guardedtuning.models.parts import split_model

    out: dict[str, Any] = {"peft": _version("peft")}
    for name, lora in (("lora", True), ("no_lora", False)):
        model = split_model(ModelConfig(name="smollm2-135m"), 2, LoraConfig(), 1, "cpu", 0,
                            lora_bottom=lora, lora_top=lora).eval()
        b_max = max((float(p.detach().abs().max()) for n, p in model.named_parameters() if "lora_B" in n), default=0.0)
        with torch.no_grad():
            h = model.bottom(x, torch.ones_like(x))
            z = model.logits(x, torch.ones_like(x))[0, -1].double()
        out[name] = {"logits64": [float(v) for v in z[:64]], "sum": float(z.sum()), "argmax": int(z.argmax()),
                     "lora_b_max": b_max, "cut_norm": float(h[0, -1].double().norm()),
                     "attn": str(getattr(model.bottom.blocks.config, "_attn_implementation", "-"))}
    return out


def fingerprint() -> dict[str, Any]:
    import numpy as np
    from gguf import GGUFReader, dequantize
    from safetensors import safe_open

    from guardedtuning.models.smollm import _find_gguf, cache_root, smollm2_dir

    folder = smollm2_dir()
    gguf_path = _find_gguf(cache_root() / "downloads")
    info: dict[str, Any] = {
        "versions": {"python": platform.python_version(), "machine": platform.machine(),
                     **{p: _version(p) for p in ("torch", "numpy", "transformers", "gguf", "tokenizers",
                                                 "safetensors")}},
        "gguf_sha256": _file_sha(gguf_path),
        "files": {p.name: _file_sha(p) for p in sorted(folder.iterdir()) if p.is_file()},
    }
    with safe_open(str(folder / "model.safetensors"), framework="np") as st:
        info["tensors"] = {k: _tensor_entry(st.get_tensor(k)) for k in sorted(st.keys())}
    reader = GGUFReader(str(gguf_path))
    info["gguf_tensors"] = {t.name: {**_tensor_entry(dequantize(t.data, t.tensor_type)),
                                     "type": t.tensor_type.name} for t in reader.tensors}
    info["probe"] = _probe(folder)
    import torch

    info["split_probe"] = _split_probe(torch.tensor([info["probe"]["token_ids"]]))
    info["numpy_config"] = {"float64_dot": float(np.arange(10.0) @ np.arange(10.0))}
    return info


def compare(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Lines naming every version, file, tensor and probe value that differs between ``a`` and ``b``."""
    lines = [f"versions: {a['versions']} vs {b['versions']}", f"gguf sha256 equal: {a['gguf_sha256'] == b['gguf_sha256']}"]
    for key in sorted(set(a["files"]) | set(b["files"])):
        if a["files"].get(key) != b["files"].get(key):
            lines.append(f"file differs: {key}")
    for group in ("gguf_tensors", "tensors"):
        names = sorted(set(a[group]) | set(b[group]))
        diff = [n for n in names if a[group].get(n, {}).get("sha256") != b[group].get(n, {}).get("sha256")]
        lines.append(f"{group}: {len(diff)} of {len(names)} differ")
        for n in diff:
            x, y = a[group].get(n, {}), b[group].get(n, {})
            lines.append(f"  {n}: {x.get('dtype')}{x.get('shape')} vs {y.get('dtype')}{y.get('shape')}; "
                         f"sum {x.get('sum')} vs {y.get('sum')}; sumsq {x.get('sumsq')} vs {y.get('sumsq')}")
    pa, pb = a["probe"], b["probe"]
    lines.append(f"probe token ids equal: {pa['token_ids'] == pb['token_ids']} ({pa['token_ids']} vs {pb['token_ids']})")
    for name in ("fp32_sdpa", "fp32_eager", "fp64_eager"):
        d = max(abs(x - y) for x, y in zip(pa[name]["logits64"], pb[name]["logits64"], strict=True))
        hn = max(abs(x - y) for x, y in zip(pa[name]["hidden_norms"], pb[name]["hidden_norms"], strict=True))
        lines.append(f"probe {name}: max |logit diff| {d:.3g}, argmax {pa[name]['argmax']} vs {pb[name]['argmax']}, "
                     f"max |hidden-norm diff| {hn:.3g}")
    sa, sb = a.get("split_probe"), b.get("split_probe")
    if sa and sb:
        lines.append(f"peft {sa['peft']} vs {sb['peft']}")
        for name in ("lora", "no_lora"):
            x, y = sa[name], sb[name]
            d = max(abs(u - v) for u, v in zip(x["logits64"], y["logits64"], strict=True))
            lines.append(f"split probe {name}: max |logit diff| {d:.3g}, argmax {x['argmax']} vs {y['argmax']}, "
                         f"max |lora_B| {x['lora_b_max']:.3g} vs {y['lora_b_max']:.3g}, cut-vector norm "
                         f"{x['cut_norm']:.6g} vs {y['cut_norm']:.6g}, attention {x['attn']} vs {y['attn']}")
    for m in (a, b):
        sp = m.get("split_probe")
        if sp:
            d = max(abs(u - v) for u, v in zip(sp["lora"]["logits64"], m["probe"]["fp32_sdpa"]["logits64"],
                                                strict=True))
            lines.append(f"{m['versions']['torch']}: split (LoRA) vs unsplit Hugging Face probe, same machine: "
                         f"max |logit diff| {d:.3g}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="write this machine's fingerprint here (JSON)")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two fingerprint files")
    args = ap.parse_args()
    if not args.out and not args.compare:
        ap.error("pass --out FILE or --compare A B")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(fingerprint(), indent=1))
    if args.compare:
        a, b = (json.loads(Path(p).read_text()) for p in args.compare)
        print("\n".join(compare(a, b)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
