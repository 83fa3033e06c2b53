"""The default main job's rounds, two source trees side by side, each run on cores of its own.

Issue 15's goal is the default main job (``guardedtuning run`` on the embedded defaults) in at
most 4 minutes of rounds on a 2-core CPU, against an earlier main measured in the same sitting.
On a shared machine the load moves every figure, so this runs the job of every ``--tree`` at the
same time, each ``--repeats`` times, every run pinned (``taskset``) to a core set of its own
(``--cores-per-run`` consecutive cores) and given a Ray runtime of that many CPUs
(``sim.ray-num-cpus``), so each run sees the 2-core machine's schedule (2 client actors) while
none waits for another's cores. Per run it prints the rounds' wall time (the record's last
``history[].wall_s``: from the ServerApp's record opening, before the model and data load, to
the last round's end; the launcher's start, Ray's and the attacks after the rounds are not in
it), the utility, the step overhead median (``events.jsonl``); then per tree the medians over
the runs that finished every planned round, and the ratio of the first tree's rounds to each
other's. A run past ``--timeout`` is killed with its process group and left out (the medians say
over how many runs).

    python simulations/bench_main_job.py --tree . --tree /tmp/base --repeats 2 --out runs/main-job
    python simulations/bench_main_job.py --tree . --tree /tmp/base --set federation.rounds=2

A tree is a checkout of this project (``git worktree add /tmp/base <commit>``, or ``git archive``
unpacked); its ``guardedtuning`` package is imported from it, the rest from this environment.
Needs ``len(trees) * repeats * cores-per-run`` cores (on the development machine: one run at a
time, ``--repeats 1 --tree .``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path


def step_overhead_ms(out: Path) -> float | None:
    path = out / "events.jsonl"
    if not path.is_file():
        return None
    steps = [e for e in map(json.loads, path.read_text().splitlines()) if e.get("event") == "step" and "overhead_s" in e]
    return round(statistics.median(e["overhead_s"] for e in steps) * 1000, 1) if steps else None


def figures(out: Path) -> dict:
    path = out / "results.json"
    if not path.is_file():
        return {"failed": True}
    try:
        rec = json.loads(path.read_text())
        hist = rec["history"]
    except (ValueError, KeyError) as exc:
        return {"failed": True, "why": f"{path} unreadable: {exc}"}
    return {"rounds": len(hist), "planned": rec.get("rounds"), "rounds_s": hist[-1].get("wall_s") if hist else None,
            "utility": rec["utility"]["value"], "step_overhead_ms": step_overhead_ms(out),
            "stopped": (rec.get("stopped") or {}).get("reason")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", action="append", required=True, help="a checkout of this project (repeatable)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--cores-per-run", type=int, default=2)
    ap.add_argument("--first-core", type=int, default=0)
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    ap.add_argument("--out", default="runs/main-job")
    args = ap.parse_args()
    trees = [Path(t).resolve() for t in args.tree]
    for t in trees:
        if not (t / "guardedtuning" / "cli.py").is_file():
            print(f"--tree {t}: no guardedtuning/cli.py there; pass a checkout of this project", file=sys.stderr)
            return 2
    runs = [(ti, r) for r in range(args.repeats) for ti in range(len(trees))]
    need = args.first_core + len(runs) * args.cores_per_run
    have = len(os.sched_getaffinity(0))
    if need > have:
        print(f"{len(runs)} runs x {args.cores_per_run} cores from core {args.first_core} need {need} cores, "
              f"this process may use {have}: lower --repeats, --cores-per-run or the trees", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    procs = []
    t0 = time.perf_counter()
    for i, (ti, rep) in enumerate(runs):
        first = args.first_core + i * args.cores_per_run
        cores = ",".join(str(c) for c in range(first, first + args.cores_per_run))
        folder = out / f"tree{ti}-run{rep}"
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(trees[ti]), os.environ.get("PYTHONPATH")) if p),
                   FLWR_HOME=str(folder / ".flwr-home"))
        cmd = ["taskset", "-c", cores, sys.executable, "-m", "guardedtuning.cli", "run", "--out", str(folder / "run"),
               "--set", f"sim.ray-num-cpus={args.cores_per_run}", *sum((["--set", s] for s in args.sets), [])]
        log = (folder / "run.log").open("w")
        print(f"tree{ti} ({trees[ti]}) run {rep} on cores {cores}", flush=True)
        procs.append((ti, rep, folder, subprocess.Popen(cmd, cwd=trees[ti], env=env, stdout=log,
                                                        stderr=subprocess.STDOUT, start_new_session=True),
                      log))
    rows = []
    for ti, rep, folder, proc, log in procs:
        try:
            rc = proc.wait(timeout=max(1.0, args.timeout - (time.perf_counter() - t0)))
        except subprocess.TimeoutExpired:  # the run's SuperLink, ServerApp and Ray go with it
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
        log.close()
        row = {"tree": ti, "path": str(trees[ti]), "run": rep, "rc": rc, **figures(folder / "run")}
        rows.append(row)
        print(json.dumps(row), flush=True)
    (out / "bench_main_job.json").write_text(json.dumps(rows, indent=1))
    med = {}
    for ti, t in enumerate(trees):
        ok = [r for r in rows if r["tree"] == ti and r["rc"] == 0 and r.get("rounds_s") is not None
              and r.get("rounds") == r.get("planned") and not r.get("stopped")]
        if ok:
            med[ti] = statistics.median(r["rounds_s"] for r in ok)
            utils = ", ".join(f"{r['utility']:.3f}" for r in ok)
            overheads = ", ".join(str(r["step_overhead_ms"]) for r in ok)
            print(f"tree{ti} {t}: rounds median {med[ti]:.1f} s over {len(ok)} runs "
                  f"(utility {utils}; step overhead {overheads} ms)")
        else:
            print(f"tree{ti} {t}: no finished run; see {out}/tree{ti}-run*/run.log")
    for ti in med:
        if ti and 0 in med:
            print(f"ratio rounds tree0/tree{ti}={med[0] / med[ti]:.3f}")
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
