"""GPU runs of a recipe: time per round, GPU memory and utilization against clients per round.

For each model, one ``guardedtuning bench clients`` sweep (see :mod:`guardedtuning.bench`)
on this machine's GPUs, clients packed ``--clients-per-gpu`` to a GPU through Ray's
fractional ``num_gpus``. With ``--server-gpu own`` Ray gets all GPUs but the last and the
server's top runs alone on the last one; ``shared`` gives Ray every GPU and puts the top on
GPU 0 with clients.

    python simulations/gpu_runs.py --model minilm=minilm-l6 --model smollm2=smollm2-135m \\
        --points 20:5,20:10,20:20 --rounds 3 --out runs/gpu

On a machine without the weights, ``random:<folder>`` builds the model's architecture
from its config.json and tokenizer with random weights: the timings hold, the utility
means nothing (and is reported as such). Prints one Markdown table per model and a
combined ``gpu-runs.md`` / ``gpu-runs.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path


def gpus() -> list[str]:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line for line in out.splitlines() if line.startswith("GPU ")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", required=True, metavar="LABEL=NAME",
                    help="model to run (repeatable), e.g. minilm=minilm-l6 or smollm2=random:/path/folder")
    ap.add_argument("--recipe", default="guarded")
    ap.add_argument("--points", default="20:5,20:10,20:20", help="TOTAL:PER_ROUND client counts")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients-per-gpu", type=int, default=4, help="clients sharing one GPU (num_gpus = 1/this)")
    ap.add_argument("--cpus-per-client", type=int, default=2)
    ap.add_argument("--server-gpu", choices=["own", "shared"], default="shared",
                    help="own: the server's top gets the last GPU to itself (needs >= 2 GPUs)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default="runs/gpu")
    args = ap.parse_args()

    devices = gpus()
    n_gpu = len(devices)
    if n_gpu == 0:
        print("no GPU found (nvidia-smi -L); this script measures GPU runs", file=sys.stderr)
        return 2
    if args.server_gpu == "own" and n_gpu < 2:
        print("--server-gpu own needs at least 2 GPUs; use shared", file=sys.stderr)
        return 2
    ray_gpus = n_gpu - 1 if args.server_gpu == "own" else n_gpu
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    common = [
        f"sim.num-gpus={1 / args.clients_per_gpu:.6g}", f"sim.num-cpus={args.cpus_per_client}",
        f"sim.ray-num-gpus={ray_gpus}", "sim.server-device=auto",
        "model.max-length=64", "train.local-steps=10", "train.batch-size=16", "data.test-size=200",
        *args.sets,
    ]
    summary = {"machine": {"gpus": devices, "python": platform.python_version(), "host_cpus": os.cpu_count()},
               "recipe": args.recipe, "server_gpu": args.server_gpu, "ray_gpus": ray_gpus,
               "clients_per_gpu": args.clients_per_gpu, "models": {}}
    md = [f"# {args.recipe} on {n_gpu} GPU(s) ({devices[0].split('(')[0].strip() if devices else '?'}), "
          f"{args.clients_per_gpu} clients per GPU, server top on "
          f"{'its own GPU' if args.server_gpu == 'own' else 'GPU 0, shared'}\n"]
    for spec in args.model:
        label, _, name = spec.partition("=")
        if not name:
            print(f"--model {spec!r}: expected LABEL=NAME", file=sys.stderr)
            return 2
        folder = out / label
        cmd = [sys.executable, "-m", "guardedtuning.cli", "bench", "clients", "--recipe", args.recipe,
               "--points", args.points, "--rounds", str(args.rounds), "--out", str(folder),
               "--set", f"model.name={name}", *sum((["--set", s] for s in common), [])]
        print("$", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd).returncode
        if rc != 0:
            print(f"{label}: bench failed (exit {rc}); see {folder}", file=sys.stderr)
            summary["models"][label] = {"name": name, "failed": rc}
            continue
        rows = [json.loads((p / "bench-point.json").read_text()) for p in sorted(folder.glob("n*-k*"))
                if (p / "bench-point.json").is_file()]
        rows.sort(key=lambda r: (r["total"], r["per_round"]))
        summary["models"][label] = {"name": name, "rows": rows, "sweep_s": round(time.perf_counter() - t0, 1)}
        md.append(f"\n## {label} ({name})\n")
        md.append("| clients/round | s/round | step wall ms | step overhead ms | GPU peak MiB (nvidia-smi) | "
                  "server GPU peak MiB (torch) | client GPU peak MiB (torch) | GPU util % (mean) | MB/round | "
                  "utility |")
        md.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            util = "-" if name.startswith("random:") else f"{r['utility']:.3f}"
            md.append(f"| {r['per_round']} | {r['round_s']:.2f} | {r['step_wall_ms']} | {r['step_overhead_ms']} | "
                      f"{r.get('gpu_peak_mb') or '-'} | {_r(r.get('server_gpu_peak_mb'))} | "
                      f"{_r(r.get('client_gpu_peak_mb'))} | {_r(r.get('gpu_util'))} | "
                      f"{r['bytes_per_round'] / 1e6:.2f} | {util} |")
        if len(rows) >= 2 and rows[0]["round_s"] and rows[-1]["round_s"]:
            k0, k1 = rows[0]["per_round"], rows[-1]["per_round"]
            ratio = rows[-1]["round_s"] / rows[0]["round_s"]
            md.append(f"\n{k1 / k0:.0f}x the clients per round -> {ratio:.2f}x the time per round "
                      f"(scaling exponent {math.log(ratio) / math.log(k1 / k0):.2f}).")
    (out / "gpu-runs.json").write_text(json.dumps(summary, indent=2))
    (out / "gpu-runs.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


def _r(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


if __name__ == "__main__":
    sys.exit(main())
