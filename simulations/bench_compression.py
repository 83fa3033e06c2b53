"""Bytes against utility of the wire and update settings, for split, guarded and fedlora, in one table.

Each variant is one in-process run (:func:`guardedtuning.inprocess.run_in_process`: the real
ServerApp and ClientApps, the secure-aggregation stages included, over an in-process grid; it
computes what the Flower run computes) on the same schedule, seed, clients and data. The table
has, per variant: the wire setting, the bytes up and down per client-round (every serialised
message of the round: activations, gradients, updates and all secure-aggregation stages), the
bytes of the adapter update alone (the round's final replies plus the secure stages' messages,
up), that as a fraction of the dense fp32 update (also without the final replies' other records:
split learning's privacy report and metrics, which go whatever the codec), the whole round's fraction of the dense fp32
``split`` round, the utility, and the utility as a fraction of its recipe's uncompressed run
(plain FedAvg of dense fp32 updates, fp32 cut).

Each run's record goes to ``<out>/<variant>/results.json``; a variant whose record is there,
written by the same config, is read back instead of run again (``--fresh`` reruns it).

    python simulations/bench_compression.py [--out /work/runs/compression] [--only NAME ...]
        [--rounds 3] [--local-steps 10] [--seeds 0 1 2] [--fresh] [--list]

``--seeds``: each variant runs once per seed (``seed=<s>``, records in ``<out>/<variant>/seed<s>/``)
and the table gives the mean over the seeds with the min-max; "of uncompressed" is then the mean
utility against the reference variant's mean at the same seeds, with the min-max of the per-seed
ratios. Without it: one run at the config's seed, in ``<out>/<variant>/``, as before.

The default schedule is the sweep's fast one (``federation.rounds=3``, ``train.local-steps=10``;
10 clients, 5 a round, MiniLM, the sentiment task).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

# fedlora-b2-125's settings (stop 23/24's fedlora point), the base of stop 25's one-lever variants
FEDLORA_B2_125: dict[str, Any] = {"aggregation.secure": True, "aggregation.density": 0.125, "aggregation.bits": 2, "aggregation.max-weight": 1,
      "aggregation.support": "topk", "aggregation.scope": "lora-b", "aggregation.clip": 0.02}

# (name, recipe, reference variant (uncompressed, same recipe), wire setting in words, run-config sets)
VARIANTS: list[tuple[str, str, str, str, dict[str, Any]]] = [
    ("split-fp32", "split", "split-fp32", "fp32 cut with padding, dense fp32 FedAvg", {"split.trim-padding": False}),
    ("guarded-plain", "guarded", "guarded-plain", "fp32 cut, dense fp32 FedAvg (no secure agg.)",
     {"aggregation.secure": False, "split.trim-padding": False}),
    ("guarded-default", "guarded", "guarded-plain", "default: fp32 cut, secure 100 % 8 bit, max-weight 1024", {}),
    ("guarded-b2", "guarded", "guarded-plain", "secure top-k 8 % (B, projection; A frozen), 2 bit, weight 1",
     {"aggregation.support": "topk", "aggregation.scope": "lora-b", "aggregation.density": 0.08,
      "aggregation.bits": 2, "aggregation.max-weight": 1}),
    ("guarded-b2-4", "guarded", "guarded-plain", "secure top-k 4 % (B, projection; A frozen), 2 bit, weight 1",
     {"aggregation.support": "topk", "aggregation.scope": "lora-b", "aggregation.density": 0.04,
      "aggregation.bits": 2, "aggregation.max-weight": 1}),
    ("guarded-b2-3", "guarded", "guarded-plain", "secure top-k 3 % (B, projection; A frozen), 2 bit, weight 1",
     {"aggregation.support": "topk", "aggregation.scope": "lora-b", "aggregation.density": 0.03,
      "aggregation.bits": 2, "aggregation.max-weight": 1}),
    ("guarded-p2", "guarded", "guarded-plain",
     "secure: the projection every round + top-k of B to 3.1 %, 2 bit, weight 1 (A frozen)",
     {"aggregation.support": "topk", "aggregation.scope": "lora-b", "aggregation.dense-rest": True,
      "aggregation.density": 0.031, "aggregation.bits": 2, "aggregation.max-weight": 1}),
    ("fedlora-plain", "fedlora", "fedlora-plain", "dense fp32 FedAvg", {}),
    ("fedlora-rand5", "fedlora", "fedlora-plain", "secure rand-k 5 %, 8 bit, weight 1 (issue 13's start)",
     {"aggregation.secure": True, "aggregation.density": 0.05, "aggregation.bits": 8, "aggregation.max-weight": 1}),
    ("fedlora-topk5", "fedlora", "fedlora-plain", "secure top-k 5 % (explore 0.5), 8 bit, weight 1",
     {"aggregation.secure": True, "aggregation.density": 0.05, "aggregation.bits": 8, "aggregation.max-weight": 1,
      "aggregation.support": "topk"}),
    ("fedlora-rand13-2b", "fedlora", "fedlora-plain", "secure rand-k 13.5 %, 2 bit, weight 1",
     {"aggregation.secure": True, "aggregation.density": 0.135, "aggregation.bits": 2, "aggregation.max-weight": 1}),
    ("fedlora-b2", "fedlora", "fedlora-plain", "secure top-k 13.5 % (B, head; A frozen), 2 bit clip 0.02, weight 1",
     {"aggregation.secure": True, "aggregation.density": 0.135, "aggregation.bits": 2, "aggregation.max-weight": 1,
      "aggregation.support": "topk", "aggregation.scope": "lora-b", "aggregation.clip": 0.02}),
    ("fedlora-b2-125", "fedlora", "fedlora-plain", "secure top-k 12.5 % (B, head; A frozen), 2 bit clip 0.02, weight 1",
     {"aggregation.secure": True, "aggregation.density": 0.125, "aggregation.bits": 2, "aggregation.max-weight": 1,
      "aggregation.support": "topk", "aggregation.scope": "lora-b", "aggregation.clip": 0.02}),
    # issue 13 item 2, stop 25: one lever at a time against fedlora-b2-125, then guarded under 3 %
    ("fedlora-h2", "fedlora", "fedlora-plain", "fedlora-b2-125 + the head every round (dense-rest)",
     {**FEDLORA_B2_125, "aggregation.dense-rest": True}),
    ("fedlora-c01", "fedlora", "fedlora-plain", "fedlora-b2-125 with the 2-bit clip 0.01",
     {**FEDLORA_B2_125, "aggregation.clip": 0.01}),
    ("fedlora-c04", "fedlora", "fedlora-plain", "fedlora-b2-125 with the 2-bit clip 0.04",
     {**FEDLORA_B2_125, "aggregation.clip": 0.04}),
    ("fedlora-e0", "fedlora", "fedlora-plain", "fedlora-b2-125 with explore 0 (top-k only from round 2)",
     {**FEDLORA_B2_125, "aggregation.explore": 0.0}),
    ("fedlora-b4-7", "fedlora", "fedlora-plain", "secure top-k 7 % (B, head; A frozen), 4 bit clip 0.02, weight 1",
     {**FEDLORA_B2_125, "aggregation.density": 0.07, "aggregation.bits": 4}),
    ("fedlora-b3-10", "fedlora", "fedlora-plain", "secure top-k 10 % (B, head; A frozen), 3 bit clip 0.02, weight 1",
     {**FEDLORA_B2_125, "aggregation.density": 0.10, "aggregation.bits": 3}),
    ("fedlora-bonly", "fedlora", "fedlora-plain", "diagnostic: secure, all of B and the head (A frozen), 8 bit, weight 1",
     {**FEDLORA_B2_125, "aggregation.density": 1.0, "aggregation.bits": 8, "aggregation.clip": 0.05}),
    ("fedlora-h2-e0", "fedlora", "fedlora-plain", "fedlora-h2 with explore 0 (a fixed random support of B)",
     {**FEDLORA_B2_125, "aggregation.dense-rest": True, "aggregation.explore": 0.0}),
    ("fedlora-h2-e1", "fedlora", "fedlora-plain", "fedlora-h2 with explore 1 (a fresh random support of B each round)",
     {**FEDLORA_B2_125, "aggregation.dense-rest": True, "aggregation.explore": 1.0}),
    ("fedlora-h2-c04", "fedlora", "fedlora-plain", "fedlora-h2 with the 2-bit clip 0.04",
     {**FEDLORA_B2_125, "aggregation.dense-rest": True, "aggregation.clip": 0.04}),
    ("fedlora-h4-7", "fedlora", "fedlora-plain", "fedlora-h2 at 4 bit, top-k 7 %",
     {**FEDLORA_B2_125, "aggregation.dense-rest": True, "aggregation.density": 0.07, "aggregation.bits": 4}),
    ("fedlora-h3-10", "fedlora", "fedlora-plain", "fedlora-h2 at 3 bit, top-k 10 %",
     {**FEDLORA_B2_125, "aggregation.dense-rest": True, "aggregation.density": 0.10, "aggregation.bits": 3}),
    ("guarded-p2-lo", "guarded", "guarded-plain",
     "secure: the projection every round + top-k of B to 3.04 %, 2 bit, weight 1 (A frozen)",
     {"aggregation.support": "topk", "aggregation.scope": "lora-b", "aggregation.dense-rest": True,
      "aggregation.density": 0.0304, "aggregation.bits": 2, "aggregation.max-weight": 1}),
]


class UpdateTally:
    """Bytes of the adapter update alone: the final replies of each round plus the secure stages' messages.

    Installed around :meth:`ServerRun.aggregate` and :meth:`ServerRun._settle` for one run (the
    same numbers the ledger adds, kept apart from the activations and gradients of split learning).
    """

    def __init__(self) -> None:
        self.up = self.down = 0
        self.other = 0  # bytes of the final replies' other records (split learning's privacy report, metrics)

    def install(self) -> None:
        from guardedtuning.server_app.common import ServerRun

        aggregate, settle, tally = ServerRun.aggregate, ServerRun._settle, self

        def counted_aggregate(run, strategy, round_, ex, *, since=0):  # type: ignore[no-untyped-def]
            ok = ex.ok()
            tally.up += sum(ex.bytes_up[n] for n in ok if n in ex.bytes_up)
            tally.other += sum(other_records_nbytes(m) for m in ok.values())
            return aggregate(run, strategy, round_, ex, since=since)

        def counted_settle(run, strategy, round_, since, metrics):  # type: ignore[no-untyped-def]
            if metrics is not None and "secagg-bytes-up" in metrics:
                tally.up += int(metrics["secagg-bytes-up"])
                tally.down += int(metrics["secagg-bytes-down"])
            return settle(run, strategy, round_, since, metrics)

        ServerRun.aggregate, ServerRun._settle = counted_aggregate, counted_settle
        self._restore = (aggregate, settle)

    def uninstall(self) -> None:
        from guardedtuning.server_app.common import ServerRun

        ServerRun.aggregate, ServerRun._settle = self._restore


UPDATE_RECORDS = ("update", "arrays", "secagg-stage", "secagg-masked")


def other_records_nbytes(message: Any) -> int:
    """Serialised bytes of a final reply's records that are not the update (the update, or its sealed form)."""
    from guardedtuning.compat import get_all_nested_objects

    return sum(len(obj.deflate()) for key, rec in message.content.items() if key not in UPDATE_RECORDS
               for obj in get_all_nested_objects(rec).values())


def run_variant(name: str, recipe: str, sets: dict[str, Any], *, out: Path, schedule: dict[str, Any],
                fresh: bool, run: bool = True, reference: Path | None = None) -> dict[str, Any] | None:
    """One variant's summary: read back from ``<out>/<name>/summary.json`` when its config matches, else run.

    ``run=False``: only read back (None when there is no matching record). ``reference``: a
    ``results.json`` of an earlier run of the same config (e.g. the sweep's), read instead of running.
    """
    from guardedtuning.inprocess import run_in_process
    from guardedtuning.recipes import config_for

    folder = out / name
    cfg = config_for(recipe, {**schedule, **sets, "output.dir": str(folder), "output.resume": False})
    done = folder / "summary.json"
    if done.is_file() and not fresh:
        summary = json.loads(done.read_text())
        if same_config(summary.get("config") or {}, cfg.flat()):
            return summary
    if not run:
        return None
    if reference is not None:
        return from_record(name, recipe, cfg.flat(), json.loads(reference.read_text()), source=reference)
    tally = UpdateTally()
    tally.install()
    t0 = time.perf_counter()
    try:
        rec = run_in_process(cfg)
    finally:
        tally.uninstall()
    c = rec["cost"]
    clients = sum(len(ev["clients"]) for ev in _events(folder) if ev.get("event") == "round_start")
    summary = {
        "name": name, "recipe": recipe, "config": cfg.flat(), "utility": rec["utility"]["value"],
        "history": [h["utility"] for h in rec["history"]],
        "up": c["bytes_up_per_client_round"], "down": c["bytes_down_per_client_round"],
        "update_up": tally.up / max(1, clients), "secagg_down": tally.down / max(1, clients),
        "update_own_up": (tally.up - tally.other) / max(1, clients),
        "dense_update": c["dense_bytes_per_client_round"], "wall_s": time.perf_counter() - t0,
    }
    done.write_text(json.dumps(summary, indent=2))
    return summary


def same_config(saved: dict[str, Any], now: dict[str, Any]) -> bool:
    """Whether a record's config is ``now``'s: equal on every key, where a key the record predates
    (added to the config since) holds its default in ``now`` (so it behaves as the record's code did)."""
    from guardedtuning.config import build_config

    if set(saved) - set(now):
        return False
    defaults = build_config({}).flat()
    return all(saved[k] == v if k in saved else (k in defaults and defaults[k] == v) for k, v in now.items())


def from_record(name: str, recipe: str, flat: dict[str, Any], rec: dict[str, Any], *, source: Path) -> dict[str, Any]:
    """A summary from another run's ``results.json``; its config must match ``flat`` on every key both have.

    The update's own bytes are known only when every upload is the update (no activations:
    ``fedlora``) and no secure stage ran; else they are left out (None).
    """
    differ = {k: (rec["config"][k], v) for k, v in flat.items()
              if k in rec["config"] and not k.startswith("output.") and rec["config"][k] != v}
    if differ:
        raise SystemExit(f"--reference {name}={source}: its config differs from the variant's: {differ}")
    c = rec["cost"]
    split_like = rec["config"].get("split.layer") is not None and recipe != "fedlora"
    plain = not rec["config"].get("aggregation.secure")
    return {"name": name, "recipe": recipe, "config": flat, "utility": rec["utility"]["value"],
            "history": [h["utility"] for h in rec["history"]], "up": c["bytes_up_per_client_round"],
            "down": c["bytes_down_per_client_round"],
            "update_up": c["bytes_up_per_client_round"] if plain and not split_like else None,
            "secagg_down": 0.0 if plain else None, "dense_update": c["dense_bytes_per_client_round"],
            "wall_s": c["wall_s"], "source": str(source)}


def _events(folder: Path) -> list[dict[str, Any]]:
    path = folder / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def merge_seeds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from a variant's runs at several seeds: means, with the utilities of each seed kept."""
    keys = ("up", "down", "update_up", "update_own_up", "secagg_down", "dense_update", "wall_s")
    out = {k: (None if any(r.get(k) is None for r in runs) else sum(r[k] for r in runs) / len(runs)) for k in keys}
    util = [r["utility"] for r in runs]
    return {**out, "name": runs[0]["name"], "recipe": runs[0]["recipe"], "utility": sum(util) / len(util),
            "utilities": util, "seeds": [r["config"]["seed"] for r in runs]}


def _spread(values: list[float], fmt: str) -> str:
    return "" if len(values) < 2 else f" ({format(min(values), fmt)}-{format(max(values), fmt)})"


def table(rows: list[dict[str, Any]], words: dict[str, str], refs: dict[str, str]) -> str:
    by = {r["name"]: r for r in rows}
    dense_split = by.get("split-fp32")
    head = ("| recipe | variant | wire setting | up B/client-round | down B/client-round | update up B "
            "| update / dense fp32 update | update's own records / dense | round / dense fp32 split | utility "
            "| of uncompressed |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        ref = by.get(refs[r["name"]])
        total = None  # the whole round against dense fp32 split's: for the split-learning recipes
        if dense_split and r["recipe"] != "fedlora":
            total = (r["up"] + r["down"]) / (dense_split["up"] + dense_split["down"])
        kept = None if ref is None else r["utility"] / ref["utility"]
        utils = r.get("utilities", [r["utility"]])
        ratios = [] if ref is None or ref.get("seeds", [0]) != r.get("seeds", [0]) else [
            u / v for u, v in zip(utils, ref.get("utilities", [ref["utility"]]), strict=True)]
        lines.append(
            f"| {r['recipe']} | {r['name']} | {words[r['name']]} | {r['up']:,.0f} | {r['down']:,.0f} "
            f"| {_num(r['update_up'])} | {_pct(r['update_up'], r['dense_update'])} "
            f"| {_pct(r.get('update_own_up'), r['dense_update'])} "
            f"| {'-' if total is None else f'{100 * total:.1f} %'} | {r['utility']:.3f}{_spread(utils, '.3f')} "
            f"| {'-' if kept is None else f'{100 * kept:.1f} %'}"
            f"{_spread([100 * x for x in ratios], '.1f')} |")
    return "\n".join(lines)


def adapter_shapes(recipe: str, flat: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Name -> shape of what ``recipe``'s clients send as their update (built from the model, no training)."""
    from guardedtuning.data.sources import load_task
    from guardedtuning.models.lora import trainable_state
    from guardedtuning.models.parts import client_full_model, split_model
    from guardedtuning.recipes import build_config

    cfg = build_config(flat)
    labels = load_task(cfg.data, cfg.seed).num_labels
    if recipe == "fedlora":
        model = client_full_model(cfg.model, cfg.split.layer, cfg.lora, labels, "cpu", cfg.seed)
        state = trainable_state(model)
    else:
        state = trainable_state(split_model(cfg.model, cfg.split, cfg.lora, labels, "cpu", cfg.seed,
                                            lora_top=cfg.lora.top).bottom)
    return {k: tuple(v.shape) for k, v in state.items()}


def update_round_bytes(shapes: dict[str, tuple[int, ...]], flat: dict[str, Any], *, rounds: int = 2,
                       scale: float = 0.005) -> dict[str, float]:
    """Bytes per client-round of the adapter update alone, measured on the wire of a real secure round.

    ``rounds`` rounds of ``flat``'s aggregation settings (the strategy ``make_strategy`` builds,
    under ``secagg_mod``) over the in-process grid with a ClientApp that replies a random update
    of ``scale`` (no model): up = the sealed final replies plus the stage replies, down = the
    training messages (the global adapter and the mask request) plus the stage requests. Without
    ``aggregation.secure``: plain FedAvg of the dense fp32 update. The last round is reported
    (a top-k support is scored from round 2 on).
    """
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from guardedtuning.inprocess import InProcessGrid
    from guardedtuning.recipes import build_config
    from guardedtuning.server_app.common import make_strategy
    from guardedtuning.strategies.secagg.mod import secagg_mod
    from guardedtuning.wire.exchange import exchange

    cfg = build_config(flat)
    app = ClientApp(mods=[secagg_mod])

    @app.train()
    def train(msg: Message, context) -> Message:  # type: ignore[no-untyped-def]
        rng = np.random.default_rng([context.node_id % 2**32, int(msg.content["config"]["server-round"])])
        update = {k: rng.normal(0, scale, s).astype(np.float32) for k, s in shapes.items()}
        return Message(RecordDict({"update": ArrayRecord({k: Array(v) for k, v in update.items()}),
                                   "metrics": MetricRecord({"num-examples": cfg.train.batch_size
                                                            * cfg.train.local_steps})}), reply_to=msg)

    grid = InProcessGrid(app, cfg.federation.num_clients, cfg.flat(), seed=cfg.seed)
    strategy = make_strategy(cfg, "train")
    glob = ArrayRecord({k: Array(np.zeros(s, np.float32)) for k, s in shapes.items()})
    out: dict[str, float] = {}
    for r in range(1, rounds + 1):
        msgs = list(strategy.configure_train(r, glob, ConfigRecord({"server-round": r}), grid))
        ex = exchange(grid, msgs, timeout=600, poll=0.002)
        _, metrics = strategy.aggregate_train(r, ex.replies.values())
        n = len(msgs)
        up, down = sum(ex.bytes_up.values()), sum(ex.bytes_down.values())
        if metrics is not None and "secagg-bytes-up" in metrics:
            up, down = up + metrics["secagg-bytes-up"], down + metrics["secagg-bytes-down"]
        out = {"update_up": up / n, "update_down": down / n, "dense_update": 4.0 * sum(
            int(np.prod(s)) for s in shapes.values()), "clients": n}
    return out


def bytes_table(out: Path, schedule: dict[str, Any], only: list[str] | None = None) -> str:
    """The update codec's bytes per client-round for every variant (or those in ``only``), on the real adapters' shapes."""
    from guardedtuning.recipes import get

    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    lines = ["| recipe | variant | update setting | update up B | update down B | up / dense fp32 update |",
             "|" + "---|" * 6]
    for name, recipe, _, words, sets in VARIANTS:
        if only is not None and name not in only:
            continue
        flat = {**get(recipe).overrides, "recipe": recipe, **schedule, **sets}
        if recipe not in shapes:
            cache = out / f"shapes-{recipe}.json"
            if cache.is_file():
                shapes[recipe] = {k: tuple(v) for k, v in json.loads(cache.read_text()).items()}
            else:
                shapes[recipe] = adapter_shapes(recipe, flat)
                cache.write_text(json.dumps(shapes[recipe]))
        b = update_round_bytes(shapes[recipe], flat)
        lines.append(f"| {recipe} | {name} | {words} | {b['update_up']:,.0f} | {b['update_down']:,.0f} "
                     f"| {100 * b['update_up'] / b['dense_update']:.2f} % |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def _pct(x: float | None, of: float | None) -> str:
    return "-" if x is None or not of else f"{100 * x / of:.2f} %"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("/work/runs/compression"))
    p.add_argument("--only", nargs="*", default=None, help="variant names to run (default: all)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="run each variant at these seeds (seed=<s>, <out>/<variant>/seed<s>/) and give mean and "
                        "min-max; default: one run at the config's seed, in <out>/<variant>/")
    p.add_argument("--fresh", action="store_true", help="rerun variants whose record exists")
    p.add_argument("--list", action="store_true", help="list the variants and exit")
    p.add_argument("--reference", nargs="*", default=[], metavar="NAME=RESULTS_JSON",
                   help="read a variant from an earlier run's results.json of the same config instead of running it "
                        "(with --seeds: NAME/seed<s>=RESULTS_JSON for each seed)")
    p.add_argument("--bytes-only", action="store_true",
                   help="measure only the update codec's bytes per client-round (secure rounds of a random update on "
                        "each recipe's real adapter shapes; seconds, no training) and print that table")
    args = p.parse_args()
    refs = dict(r.split("=", 1) for r in args.reference)
    names = [v[0] for v in VARIANTS]
    if args.list:
        for name, recipe, _, words, sets in VARIANTS:
            print(f"{name:20s} {recipe:8s} {words}  {sets}")
        return 0
    unknown = sorted(set(args.only or ()) - set(names))
    if unknown:
        p.error(f"--only {unknown}: no such variant; --list shows {names}")
    schedule = {"federation.rounds": args.rounds, "train.local-steps": args.local_steps}
    if args.bytes_only:
        args.out.mkdir(parents=True, exist_ok=True)
        print("\n" + bytes_table(args.out, schedule, args.only))
        return 0
    rows = []
    for name, recipe, _, _, sets in VARIANTS:
        chosen = args.only is None or name in args.only
        if args.seeds is None:
            row = run_variant(name, recipe, sets, out=args.out, schedule=schedule, fresh=args.fresh and chosen,
                              run=chosen or name in refs, reference=Path(refs[name]) if name in refs else None)
        else:
            runs = [run_variant(f"{name}/seed{seed}", recipe, {**sets, "seed": seed}, out=args.out,
                                schedule=schedule, fresh=args.fresh and chosen, run=chosen or f"{name}/seed{seed}" in refs,
                                reference=Path(refs[f"{name}/seed{seed}"]) if f"{name}/seed{seed}" in refs else None)
                    for seed in args.seeds]
            for r in runs:
                if r is not None:
                    print(json.dumps({k: v for k, v in r.items() if k != "config"}), flush=True)
            row = merge_seeds(runs) if all(r is not None for r in runs) else None  # type: ignore[arg-type]
            if row is not None:
                row["name"] = name
        if row is not None:
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "config"}), flush=True)
    seeds = "seed from the config" if args.seeds is None else f"seeds {' '.join(map(str, args.seeds))} (mean, min-max)"
    print(f"\nin-process runs, {args.rounds} rounds of {args.local_steps} local steps, 10 clients, 5 a round, "
          f"MiniLM, sentiment, {seeds}; bytes are serialised messages per client-round")
    print(table(rows, {v[0]: v[3] for v in VARIANTS}, {v[0]: v[2] for v in VARIANTS}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
