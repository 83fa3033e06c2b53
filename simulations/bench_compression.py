"""Bytes and utility of secure sparse aggregation against plain FedAvg, side by side.

Runs a federated recipe (``fedlora`` by default: every byte it uploads is the adapter
update) twice on Flower's simulation engine with the same seed, clients and data: once
with plain FedAvg of dense fp32 updates, once with ``aggregation.secure`` (sparse,
quantized, masked), and prints utility per round and bytes uploaded per client and round
(serialised messages, all secure-aggregation stages included) against the dense fp32
size of the update.

    python simulations/bench_compression.py [--recipe fedlora] [--model minilm-l6] [--rounds 3]
        [--density 0.05] [--bits 8] [--max-weight 1024]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from guardedtuning.launcher import run_to_completion
from guardedtuning.recipes import build_config, get


def run_once(flat: dict, out: Path) -> dict:
    return run_to_completion(build_config({**flat, "output.dir": str(out)}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="fedlora")
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--density", type=float, default=0.05)
    p.add_argument("--bits", type=int, default=8)
    p.add_argument("--max-weight", type=int, default=1024)
    args = p.parse_args()
    base = {**get(args.recipe).overrides, "recipe": args.recipe, "aggregation.secure": False, "model.name": args.model, "federation.rounds": args.rounds,
            "federation.num-clients": 10, "federation.clients-per-round": 5, "train.local-steps": 20}
    secure = {**base, "aggregation.secure": True, "aggregation.density": args.density,
              "aggregation.bits": args.bits, "aggregation.max-weight": args.max_weight}
    with tempfile.TemporaryDirectory() as tmp:
        plain_rec = run_once(base, Path(tmp) / "plain")
        secure_rec = run_once(secure, Path(tmp) / "secure")
    print(f"\n{args.recipe} on {args.model}, 10 clients, 5 per round, {args.rounds} rounds, 20 local steps")
    print(f"{'round':>5} {'FedAvg dense fp32':>20} {'secure sparse':>20}")
    for a, b in zip(plain_rec["history"], secure_rec["history"], strict=True):
        print(f"{a['round']:>5} {a['utility']:>20.4f} {b['utility']:>20.4f}")
    for name, rec in (("FedAvg dense fp32", plain_rec), (f"secure, density {args.density}, {args.bits} bits", secure_rec)):
        c = rec["cost"]
        up, dense = c["bytes_up_per_client_round"], c["dense_bytes_per_client_round"]
        print(f"{name:38s} up {up:>12,.0f} B/client-round  dense fp32 update {dense:>10,.0f} B  "
              f"-> {100 * (1 - up / dense):5.1f}% less than dense; down {c['bytes_down_per_client_round']:,.0f} B")
    ratio = secure_rec["cost"]["bytes_up_per_client_round"] / plain_rec["cost"]["bytes_up_per_client_round"]
    print(f"secure upload / FedAvg upload: {ratio:.4f} ({100 * (1 - ratio):.1f}% less); final utility "
          f"{secure_rec['utility']['value']:.4f} vs {plain_rec['utility']['value']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
