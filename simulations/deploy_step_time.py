"""Per-step time of split learning on Flower's deployment engine, against the simulation engine.

Runs the same split recipe (tiny model, every client in every round) several ways, one
after the other, in one invocation:

- ``simulation``: Flower's simulation engine (``guardedtuning run``'s path);
- ``deployment, warm SuperNodes``: a SuperLink and one SuperNode per client as processes
  on this machine (``guardedtuning.deploy.LocalFederation``), TLS and SuperNode
  authentication on, SuperNodes started as ``guardedtuning deploy supernode``;
- ``deployment, Flower's SuperNodes``: the same with Flower's stock ``flower-supernode``
  (it sleeps 3 s after an empty poll and starts a process per message), unless
  ``--skip-stock``.

A step's wall time is the exchange of one split step (push to every sampled client, pull
every reply); its overhead is the part of it during which no client handler computed
(``Exchange.overhead_s``). It prints the medians over round 2 (round 1 carries the
processes' start and the model loads), and with ``--repeats R`` the median and range over
R interleaved runs, with the load average, since the figures depend on what else the
machine runs; the rows are saved to ``<out>/deploy_step_time.json``.

    python simulations/deploy_step_time.py [--model tiny-bert] [--clients 2] [--steps 8] [--repeats 3] [--skip-stock]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from guardedtuning.deploy import LocalFederation
from guardedtuning.launcher import app_dir, run_to_completion, write_run_config
from guardedtuning.recipes import config_for


def flat_config(model: str, clients: int, steps: int, out: Path, poll: float) -> dict:
    return {"recipe": "split", "privacy.mechanism": "none", "dp.enabled": False, "aggregation.secure": False,
            "model.name": model, "model.max-length": 64, "data.train-size": 400, "data.test-size": 50,
            "federation.num-clients": clients, "federation.clients-per-round": clients, "federation.rounds": 2,
            "train.local-steps": steps, "train.batch-size": 16, "comm.poll-interval": poll, "output.dir": str(out)}


def round2_medians(out: Path) -> tuple[float, float, int]:
    events = [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines()]
    steps = [e for e in events if e["event"] == "step" and e["round"] == 2]
    if not steps:
        raise RuntimeError(f"no round-2 steps in {out / 'events.jsonl'}")
    return statistics.median(e["exchange_s"] for e in steps), statistics.median(e["overhead_s"] for e in steps), len(steps)


def run_simulation(flat: dict) -> None:
    run_to_completion(config_for(flat["recipe"], flat), timeout=3600)


def run_deployment(flat: dict, root: Path, *, warm: bool, tls: bool) -> None:
    cfg = config_for(flat["recipe"], flat)  # the recipe's overrides (its cut), then ours
    out = Path(cfg.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    with LocalFederation(root, cfg.federation.num_clients, tls=tls, auth=tls, warm=warm) as fed:
        fed.start()
        rc = fed.run(app_dir(out), str(write_run_config(cfg, out / "run-config.toml")), timeout=3600)
    if rc != 0 or not (out / "results.json").exists():
        raise RuntimeError(f"deployment run failed (flwr exit code {rc}); see {root / 'logs'}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-bert")
    p.add_argument("--clients", type=int, default=2, help="SuperNodes = clients per round")
    p.add_argument("--steps", type=int, default=8, help="local steps per round")
    p.add_argument("--poll", type=float, default=0.002, help="comm.poll-interval of the ServerApp")
    p.add_argument("--insecure", action="store_true", help="deployments without TLS and SuperNode authentication")
    p.add_argument("--skip-stock", action="store_true", help="leave out Flower's stock SuperNode (13 to 41 s a step on 2 cores)")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs of the simulation and the warm deployment, interleaved (the stock one runs once)")
    p.add_argument("--out", type=Path, default=Path("runs/deploy-step-time"))
    args = p.parse_args()
    out = args.out.resolve()
    tls = not args.insecure
    variants = [("simulation", lambda f, d: run_simulation(f)),
                (f"deployment, warm SuperNodes{'' if tls else ' (insecure)'}",
                 lambda f, d: run_deployment(f, d / "federation", warm=True, tls=tls))]
    if not args.skip_stock:
        variants.append((f"deployment, Flower's SuperNodes{'' if tls else ' (insecure)'}",
                         lambda f, d: run_deployment(f, d / "federation", warm=False, tls=tls)))
    runs: dict[str, list[dict]] = {label: [] for label, _ in variants}
    for rep in range(args.repeats):  # interleaved, so that each variant sees the machine's ups and downs
        for i, (label, run) in enumerate(variants):
            if rep > 0 and label.startswith("deployment, Flower's"):
                continue  # one run of the stock SuperNodes is enough to see seconds per step
            d = out / f"r{rep}-v{i}"
            flat = flat_config(args.model, args.clients, args.steps, d / "run", args.poll)
            load0, t0 = os.getloadavg()[0], time.monotonic()
            run(flat, d)
            wall, overhead, n = round2_medians(d / "run")
            runs[label].append({"step_wall_s": wall, "step_overhead_s": overhead, "steps": n,
                                "run_s": time.monotonic() - t0, "load_before": load0,
                                "load_after": os.getloadavg()[0]})
            print(f"{label} (run {rep + 1}): step {wall * 1000:.0f} ms, overhead {overhead * 1000:.0f} ms "
                  f"(round 2, {n} steps), load {load0:.1f}-{os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    for label, rs in runs.items():
        walls, overheads = [r["step_wall_s"] for r in rs], [r["step_overhead_s"] for r in rs]
        loads = [r["load_before"] for r in rs] + [r["load_after"] for r in rs]
        rows.append({"variant": label, "runs": rs, "step_wall_s": statistics.median(walls),
                     "step_wall_s_range": [min(walls), max(walls)], "step_overhead_s": statistics.median(overheads),
                     "load_range": [min(loads), max(loads)]})
    (out / "deploy_step_time.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                           "rows": rows}, indent=1))
    print(f"\nsplit step on {args.model}: {args.clients} clients per round, {args.steps} steps per round, batch 16; "
          f"medians of round 2, then the median over runs; {os.cpu_count()} CPUs")
    print(f"{'variant':40s} {'runs':>4s} {'step (median)':>14s} {'range':>16s} {'overhead (median)':>18s} {'load avg':>11s}")
    for r in rows:
        lo, hi = r["step_wall_s_range"]
        print(f"{r['variant']:40s} {len(r['runs']):4d} {r['step_wall_s'] * 1000:11.0f} ms "
              f"{lo * 1000:6.0f}-{hi * 1000:<6.0f} ms {r['step_overhead_s'] * 1000:15.0f} ms "
              f"{r['load_range'][0]:5.1f}-{r['load_range'][1]:<5.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
