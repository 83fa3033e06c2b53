"""The run against its computation: `guardedtuning run`'s engine and the same run in one process, side by side.

The in-process run (:mod:`guardedtuning.inprocess`) executes the same ServerApp and ClientApps — the
same bottoms and top, token noise, DP-SGD, secure sums and evaluation, the same record
(``tests/test_inprocess.py``) — with no SuperLink, Ray or sockets, clients one after another. The
real run is ``guardedtuning run``'s path (a SuperLink of its own, Flower's simulation engine). Both
run ``--repeats`` times alternately (order swapped each repeat, to share the machine's noise); the
medians are compared. Last line: ``overhead_ratio=<real wall / in-process wall>``.

    python simulations/bench_overhead.py                     # the default main job
    python simulations/bench_overhead.py --set federation.rounds=3 --set train.local-steps=10
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from guardedtuning.config import parse_set  # noqa: E402
from guardedtuning.inprocess import run_in_process  # noqa: E402
from guardedtuning.launcher import run_to_completion  # noqa: E402
from guardedtuning.recipes import DEFAULT, config_for  # noqa: E402


def step_figures(out: Path) -> str:
    """Medians over the run's split steps (``events.jsonl``): overhead (no party computing) and exchange wall."""
    events = [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines()]
    steps = [e for e in events if e.get("event") == "step" and "overhead_s" in e]
    if not steps:
        return "no step events"
    return (f"{len(steps)} steps: overhead median {statistics.median(e['overhead_s'] for e in steps) * 1000:.1f} ms, "
            f"exchange median {statistics.median(e['exchange_s'] for e in steps) * 1000:.1f} ms")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=DEFAULT)
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default=None, help="folder for the runs (default: a temporary one)")
    args = ap.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="bench_overhead_"))
    sets = parse_set(args.sets)
    walls: dict[str, list[float]] = {"flower": [], "inprocess": []}
    rounds: dict[str, list[float]] = {"flower": [], "inprocess": []}
    utility: dict[str, list[float]] = {"flower": [], "inprocess": []}
    runners = {"flower": run_to_completion, "inprocess": run_in_process}
    for rep in range(args.repeats):
        order = ("flower", "inprocess") if rep % 2 == 0 else ("inprocess", "flower")
        for name in order:
            cfg = config_for(args.recipe, {**sets, "output.dir": str(root / f"{name}{rep}")})
            t0 = time.perf_counter()
            record = runners[name](cfg)
            walls[name].append(time.perf_counter() - t0)
            rounds[name].append(float(record["cost"]["wall_s"]))
            utility[name].append(float(record["utility"]["value"]))
            print(f"repeat {rep} {name}: wall {walls[name][-1]:.1f} s (rounds {rounds[name][-1]:.1f} s), "
                  f"{record['utility']['metric']} {utility[name][-1]:.4f}; {step_figures(root / f'{name}{rep}')}",
                  flush=True)
    med = {k: statistics.median(v) for k, v in walls.items()}
    med_rounds = {k: statistics.median(v) for k, v in rounds.items()}
    print(f"recipe {args.recipe}, {args.repeats} repeat(s), sets {sets or 'none'}")
    print(f"median wall: flower {med['flower']:.1f} s, in-process {med['inprocess']:.1f} s; "
          f"rounds only: flower {med_rounds['flower']:.1f} s, in-process {med_rounds['inprocess']:.1f} s")
    print(f"overhead_ratio={med['flower'] / med['inprocess']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
