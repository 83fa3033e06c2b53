"""Per-step round-trip overhead of split learning through Flower's simulation engine.

A split step is one message to each sampled client and one reply. Its overhead is the
part of the step's wall time during which no client handler was computing: pushing,
the engine's dispatch to a Ray actor, (de)serialisation, pulling the reply (see
``Exchange.overhead_s``). Server compute (the top) happens between exchanges and is
not part of it.

Runs, side by side in one invocation, the ``split`` recipe three ways: Flower's defaults
(the ServerApp pulls every 100 ms, as ``Grid.send_and_receive`` does on the in-memory
grid; the engine dispatches every 100 ms), our own push/pull loop (2 ms) alone, and our
loop with the faster engine dispatcher (``sim.dispatch-interval``, the default); it
prints the medians of round 2 (round 1 carries Ray's start and the model loads).

    python simulations/bench_step_overhead.py [--model tiny-bert] [--steps 30] [--clients 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from guardedtuning.launcher import run_to_completion
from guardedtuning.recipes import config_for


def run_once(model: str, steps: int, clients: int, poll: float, dispatch: float, out: Path) -> dict:
    cfg = config_for("split", {  # plain split (its recipe's cut): the step's transport, no guarded knobs
        "privacy.mechanism": "none", "dp.enabled": False, "aggregation.secure": False,
        "model.name": model, "model.max-length": 64, "data.train-size": 400, "data.test-size": 50,
        "federation.num-clients": max(2, clients), "federation.clients-per-round": clients,
        "federation.rounds": 2, "train.local-steps": steps, "train.batch-size": 16,
        "comm.poll-interval": poll, "sim.dispatch-interval": dispatch, "output.dir": str(out),
    })
    record = run_to_completion(cfg, timeout=1800)
    events = [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines()]
    return {"record": record, "events": events}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-bert")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--clients", type=int, default=1, help="clients per round")
    p.add_argument("--only-default", action="store_true", help="run the default variant only (ours)")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        variants = (
            ("Flower defaults: pull 100 ms, dispatch 100 ms", 0.1, 0.0),
            ("own pull loop 2 ms, dispatch 100 ms", 0.002, 0.0),
            ("own pull loop 2 ms, dispatch 2 ms (default)", 0.002, 0.002),
        )
        for label, poll, dispatch in variants[-1:] if args.only_default else variants:
            res = run_once(args.model, args.steps, args.clients, poll, dispatch, Path(tmp) / f"p{poll}-{dispatch}")
            print(f"{label}: engine dispatch {res['record']['cost']['dispatch']}", flush=True)
            # round 2 only: round 1 carries Ray's start and the model loads
            steps = [e for e in res["events"] if e["event"] == "step" and e["round"] == 2]
            rows.append((label, statistics.median(e["overhead_s"] for e in steps),
                         statistics.median(e["exchange_s"] for e in steps)))
    print(f"\nsplit step overhead through Flower's simulation engine: model {args.model}, "
          f"{args.clients} client(s) per round, {args.steps} steps per round, batch 16")
    print(f"{'variant':48s} {'overhead/step (median)':>24s} {'exchange/step (median)':>24s}")
    for label, overhead, wall in rows:
        print(f"{label:48s} {overhead * 1000:21.1f} ms {wall * 1000:21.1f} ms")
    if len(rows) > 1:
        print(f"overhead ratio, Flower defaults / ours: {rows[0][1] / rows[-1][1]:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
