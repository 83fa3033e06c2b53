"""Bytes of the split cut by wire setting, for ``split`` and ``guarded``, in process (no Ray, no SuperLink).

Each recipe runs four ways on the same schedule (tiny BERT, 3 clients, 2 rounds of 6 steps,
batch 8, max length 32: ``tests/conftest.py``'s ``TINY``; ``guarded`` cut after 2 of its 4
blocks): fp32 with padding sent (``split.trim-padding=false``), fp32 trimmed (the default),
8 bits both ways (``privacy.quantize-bits=8 split.grad-bits=8``) and 4 bits both ways with
stochastic rounding. It prints one markdown table: bytes up and down per client-round (the
serialised messages, everything a round sends), their sum against ``split``'s fp32 with
padding, the rounds' train losses and the held-out utility.

    python simulations/bench_cut_wire.py [--model tiny-bert] [--recipes split,guarded]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from guardedtuning.inprocess import run_in_process  # noqa: E402
from guardedtuning.recipes import config_for  # noqa: E402
from tests.conftest import TINY  # noqa: E402

WIRES = {
    "fp32, padding sent": {"split.trim-padding": False},
    "fp32, trimmed": {},
    "8 bit both ways": {"privacy.quantize-bits": 8, "split.grad-bits": 8},
    "4 bit both ways, stochastic": {"privacy.quantize-bits": 4, "split.grad-bits": 4, "split.stochastic-rounding": True},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-bert")
    ap.add_argument("--recipes", default="split,guarded")
    args = ap.parse_args()
    schedule = {k: v for k, v in TINY.items() if k.startswith(("model.", "data.", "federation.", "train."))}
    schedule["model.name"] = args.model
    recipes = {"split": {k: v for k, v in TINY.items() if k not in schedule and k != "recipe"},
               "guarded": {"split.layer": 2, "privacy.noise-seed": 1}}
    ref = None
    print("| recipe | wire | bytes up / client-round | bytes down / client-round | of split fp32 dense | "
          "train losses | utility |")
    print("|---|---|---|---|---|---|---|")
    for name in args.recipes.split(","):
        for wire, sets in WIRES.items():
            with tempfile.TemporaryDirectory() as out:
                record = run_in_process(config_for(name, {**schedule, **recipes[name], **sets, "output.dir": out}))
            cost = record["cost"]
            up, down = cost["bytes_up_per_client_round"], cost["bytes_down_per_client_round"]
            ref = ref or up + down
            losses = ", ".join(f"{h['train_loss']:.4f}" for h in record["history"])
            print(f"| {name} | {wire} | {up:,.0f} | {down:,.0f} | {100 * (up + down) / ref:.1f} % | {losses} | "
                  f"{record['utility']['value']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
