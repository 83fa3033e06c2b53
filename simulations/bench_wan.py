"""Split learning over a WAN: step and round time against RTT and bandwidth, per recipe.

One federation for the whole benchmark: a SuperLink and ``--clients`` warm SuperNodes,
each in a network namespace of its own, TLS and SuperNode authentication on, joined by
veth pairs and the delaying relay of ``tests/netns.py`` (no ``netem`` on these machines).
For each rate (``tbf`` on both ends of every SuperNode's link) every recipe runs once,
with one round per added RTT: round 1 warms up (process starts, model loads) at the first
RTT, then round ``k + 1`` runs at ``--rtts[k]`` (the relay holds every chunk RTT/2 each
way; the bench sets it when round ``k``'s record appears in ``events.jsonl``, so the first
message of a round may still see the previous RTT). tiny-bert, every client in every
round, ``--steps`` local steps, the cut after block 2 for every recipe, the recipes'
defaults otherwise (``split``: full width, the compressed cut of issue 13, plain FedAvg;
``guarded``: the clipped 4-dim release, d_chi noise, DP-SGD, secure aggregation;
``gradfree``, ``fedlora``: theirs).

Per (recipe, rate, RTT) it prints:

- ``step``: median wall time of one split step of that round (the server's push to every
  client and the last reply back, ``exchange_s``); gradfree and fedlora have no steps;
- ``round``: that round, from its first message to its record (every exchange, secure
  aggregation's stages, aggregation, evaluation).

``--paths new,old`` runs every (recipe, rate) on two federations side by side, one after
the other: ``new`` with the warm SuperNode's defaults (a message's objects moved up to
``compat.OBJECT_CONCURRENCY`` at once; the ClientApp after the confirmation since issue 17's
review made ``--early-wake`` opt-in), ``old`` with ``--object-concurrency 2 --early-wake off``
(Flower's 2 objects at once: the SuperNode before issue 17's WAN work); ``objects`` has only
the first of the two changes (``--early-wake off``, now the same as ``new``), ``early-wake``
both (``--early-wake on``: what ``new`` was in bench3-bench7). Paths other than ``new`` are
refused where the SuperNodes run stock (their options would be dropped).
Each path has its own namespaces and federation; the same link shapes.

Rows go to ``<out>/bench_wan.json``; the table to stdout. Needs root (namespaces); run
under ``nice`` on a shared machine, and read the load average it prints with the table.

    python simulations/bench_wan.py [--recipes split,guarded] [--rtts 0,10,50,100] [--rates 1gbit,100mbit]
        [--extra gradfree,fedlora --extra-rtts 0,100] [--clients 2] [--steps 3] [--paths new,old] [--app DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import threading
import time
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from guardedtuning.clients.warm_node import stock_reason  # noqa: E402
from guardedtuning.launcher import toml_value, write_run_config  # noqa: E402
from guardedtuning.recipes import config_for  # noqa: E402
from tests.netns import NetnsFederation, Wan, unavailable  # noqa: E402


def flat_config(recipe: str, clients: int, steps: int, rounds: int, out: Path) -> dict:
    """The run's settings before the recipe's own (``config_for`` applies those)."""
    # tiny-bert has 4 blocks: every recipe cuts after 2 (the guarded default's 4 is for MiniLM's 6)
    return {"recipe": recipe, "model.name": "tiny-bert", "split.layer": 2, "model.max-length": 64,
            "data.train-size": 400, "data.test-size": 50,
            "federation.num-clients": clients, "federation.clients-per-round": clients,
            "federation.rounds": rounds, "train.local-steps": steps, "train.batch-size": 16,
            "privacy.noise-seed": 7, "output.dir": str(out)}


def read_events(out: Path) -> list[dict]:
    path = out / "events.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def measure(events: list[dict], rnd: int) -> dict:
    """Step median and wall time of round ``rnd``."""
    this = [e for e in events if e.get("round") == rnd]
    steps = [e["exchange_s"] for e in this if e["event"] == "step"]
    start = next(e["time"] for e in this if e["event"] == "round_start")
    end = next(e for e in this if e["event"] == "round")
    return {"step_s": statistics.median(steps) if steps else None, "steps": len(steps),
            "round_s": end["time"] - start, "bytes_round": end["bytes_up"] + end["bytes_down"]}


def follow_rounds(wan: Wan, out: Path, rtts: list[int], proc, stop: threading.Event) -> None:
    """Round ``k + 1`` runs at ``rtts[k - 1]`` (round 1, the warm-up, at ``rtts[0]``): set as round ``k`` ends."""
    wan.shape_all(rtt=rtts[0] / 1000)
    done = 0
    while not stop.is_set() and proc.poll() is None and done < len(rtts):
        finished = {e["round"] for e in read_events(out) if e["event"] == "round"}
        while done + 1 in finished and done < len(rtts):
            done += 1
            wan.shape_all(rtt=rtts[done - 1] / 1000)
        time.sleep(0.05)


PATHS = {"new": (), "old": ("--object-concurrency", "2", "--early-wake", "off"),
         "objects": ("--early-wake", "off"), "early-wake": ("--early-wake", "on")}
"""The warm SuperNode's options per path (``--paths``): today's defaults (the concurrent object transfers;
since issue 17's review the ClientApp after the confirmation, so ``objects`` equals ``new``); the transfers as
before; only the concurrent object transfers; both changes (the opt-in ``--early-wake on``, the ``new`` of
bench3-bench7)."""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipes", default="split,guarded")
    p.add_argument("--rtts", default="0,10,50,100", help="added RTTs, ms")
    p.add_argument("--rates", default="1gbit,100mbit", help="tbf rates each way (tc syntax)")
    p.add_argument("--extra", default="gradfree,fedlora", help="recipes run at --extra-rtts only (empty: none)")
    p.add_argument("--extra-rtts", default="0,100")
    p.add_argument("--extra-rate", default="100mbit")
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="run-config override for every run, in TOML (repeatable, e.g. --set 'split.grad-bits=8')")
    p.add_argument("--paths", default="new", help="comma-separated subset of: new (the SuperNode's defaults), "
                   f"old ({' '.join(PATHS['old'])}), objects ({' '.join(PATHS['objects'])}: only the concurrent "
                   f"object transfers), early-wake ({' '.join(PATHS['early-wake'])}: both changes); each its "
                   "own federation, runs interleaved; other than new only with warm SuperNodes")
    p.add_argument("--out", type=Path, default=Path("runs/bench-wan"))
    p.add_argument("--app", type=Path, default=Path(__file__).resolve().parents[1],
                   help="the Flower app folder `flwr run` builds the FAB from (default: this repository; e.g. "
                        "`git archive HEAD | tar -x -C DIR` for a committed snapshot)")
    args = p.parse_args()
    reason = unavailable()
    if reason is not None:
        print(f"bench_wan needs network namespaces: {reason}", file=sys.stderr)
        return 2
    paths = [x.strip() for x in args.paths.split(",") if x.strip()]
    if not paths or any(x not in PATHS for x in paths):
        print(f"--paths {args.paths!r}: pass a comma-separated subset of {', '.join(PATHS)}", file=sys.stderr)
        return 2
    odd = [x for x in paths if x != "new"]
    if odd:
        reason = stock_reason()
        if reason is not None:
            print(f"--paths {args.paths!r}: the SuperNodes would run Flower's stock flower-supernode ({reason}), "
                  f"which drops the options of {', '.join(odd)}: every path would equal new; pass --paths new",
                  file=sys.stderr)
            return 2
    out = args.out.resolve()
    rtts = [int(x) for x in args.rtts.split(",")]
    plan = [(rate, recipe, rtts) for rate in args.rates.split(",") for recipe in args.recipes.split(",")]
    if args.extra:
        plan += [(args.extra_rate, recipe, [int(x) for x in args.extra_rtts.split(",")])
                 for recipe in args.extra.split(",")]
    keys = {x.split("=", 1)[0] for x in args.sets}
    with (args.app / "pyproject.toml").open("rb") as fh:
        app_keys = set(tomllib.load(fh)["tool"]["flwr"]["app"]["config"])
    rows = []
    with contextlib.ExitStack() as stack:
        feds = {}
        for path in paths:
            wan = stack.enter_context(Wan(args.clients, prefix=f"gtns{os.getpid()}-{path}"))
            try:  # refused where the SuperNodes are stock: their options would be dropped, path == new
                fed = NetnsFederation(out / ("federation" if path == "new" else f"federation-{path}"), wan,
                                      node_args=PATHS[path])
            except ValueError as exc:
                print(f"--paths {path}: {exc}; pass --paths new", file=sys.stderr)
                return 2
            stack.callback(fed.stop)
            fed.start()
            feds[path] = fed
        for n, (rate, recipe, run_rtts) in enumerate(plan):
            for path, fed in feds.items():
                wan = fed.wan
                wan.set_rate(rate)
                tag = "" if path == "new" else f"-{path}"
                run_out = out / f"{n:02d}-{recipe}-{rate}{tag}"
                flat = flat_config(recipe, args.clients, args.steps, len(run_rtts) + 1, run_out)
                run_out.mkdir(parents=True, exist_ok=True)
                # the recipe's own settings resolved here (the ServerApp takes the run config as it is),
                # limited to the keys the app folder's pyproject declares (an older snapshot may lack new ones)
                resolved = tomllib.loads(write_run_config(config_for(recipe, flat), run_out / "resolved.toml")
                                         .read_text())
                overrides = [f"{k}={toml_value(v)}" for k, v in resolved.items() if k in app_keys and k not in keys]
                load0, t0 = os.getloadavg()[0], time.monotonic()
                proc = fed.submit(args.app.resolve(), " ".join(overrides + args.sets),
                                  log_name=f"flwr-run-{n:02d}{tag}.log")
                stop = threading.Event()
                follower = threading.Thread(target=follow_rounds, args=(wan, run_out, run_rtts, proc, stop),
                                            daemon=True)
                follower.start()
                try:
                    rc = proc.wait(timeout=3600)
                finally:
                    stop.set()
                    follower.join(5)
                if rc != 0 or not (run_out / "results.json").exists():
                    print(f"{recipe} {rate} {path}: flwr exit code {rc}; see {fed.root / 'logs'}", flush=True)
                    continue
                events = read_events(run_out)
                for k, rtt in enumerate(run_rtts):
                    row = {"recipe": recipe, "rate": rate, "path": path, "rtt_ms": rtt, "round": k + 2,
                           **measure(events, k + 2), "load": [load0, os.getloadavg()[0]],
                           "run_s": time.monotonic() - t0}
                    rows.append(row)
                    step = f"{row['step_s'] * 1000:.0f} ms" if row["step_s"] is not None else "-"
                    print(f"{recipe:9s} {rate:8s} {path:3s} RTT {rtt:3d} ms (round {k + 2}): step {step}, "
                          f"round {row['round_s']:.1f} s (load {load0:.1f}-{os.getloadavg()[0]:.1f})", flush=True)
                (out / "bench_wan.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                                 "rows": rows}, indent=1))
    print(f"\ntiny-bert, {args.clients} clients, {args.steps} local steps, batch 16, max-length 64; one round "
          f"per RTT after a warm-up round; TLS + SuperNode authentication; {os.cpu_count()} CPUs")
    print("| recipe | rate | path | added RTT | split step (median) | whole round | steps | bytes/round | load |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        step = f"{r['step_s'] * 1000:.0f} ms" if r["step_s"] is not None else "-"
        print(f"| {r['recipe']} | {r['rate']} | {r['path']} | {r['rtt_ms']} ms | {step} | {r['round_s']:.1f} s | "
              f"{r['steps']} | "
              f"{r['bytes_round'] / 1e3:.0f} kB | {r['load'][0]:.1f}-{r['load'][1]:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
