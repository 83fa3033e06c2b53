"""The ``guardedtuning`` command.

    guardedtuning run [--recipe NAME] [--set key=value ...] [--out DIR] [--verbose]
    guardedtuning bench clients [--recipe NAME] [--points 10:10,1000:100] [--set ...]
    guardedtuning recipes              # the designs, one line each
    guardedtuning keys                 # every run-config key, its default and meaning
    guardedtuning fetch smollm2-135m   # convert the embedded decoder once
    guardedtuning export --merged RUN_DIR DEST   # the run's adapters merged into its base model

Bad input ends in one line naming the input, the value and the fix, exit code 2, and
no traceback. A run that fails after it started says where its logs are (exit code 1).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from guardedtuning import recipes
from guardedtuning.config import RunConfig, config_help, default_flat_config, parse_set
from guardedtuning.errors import GuardedTuningError
from guardedtuning.recipes import DEFAULT as DEFAULT_RECIPE

console = Console(stderr=False)
err = Console(stderr=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="guardedtuning", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a recipe on Flower's simulation engine")
    run.add_argument("--recipe", default=DEFAULT_RECIPE, help=f"recipe name ({', '.join(recipes.names())}); default {DEFAULT_RECIPE}")
    run.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                     help="override a run-config key (repeatable); `guardedtuning keys` lists them")
    run.add_argument("--out", default=None, help="output folder (default runs/<recipe>)")
    run.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    bench = sub.add_parser("bench", help="benchmarks; `bench clients` sweeps client counts")
    bench.add_argument("what", choices=["clients"], help="clients: wall time, overhead, memory and bytes "
                       "against total and per-round clients")
    bench.add_argument("--recipe", default=DEFAULT_RECIPE, help=f"recipe to sweep; default {DEFAULT_RECIPE}")
    bench.add_argument("--points", default=None, help="comma-separated TOTAL:PER_ROUND client counts; default "
                       "10:10,100:10,1000:10,1000:100")
    bench.add_argument("--rounds", type=int, default=3, help="rounds per point (default 3; round 1 is left out "
                       "of the per-round time)")
    bench.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                       help="override a run-config key for every point (default: a tiny model on CPU)")
    bench.add_argument("--out", default="runs/bench-clients", help="output folder (default runs/bench-clients)")
    deploy = sub.add_parser("deploy", help="Flower's deployment engine (docs/deployment.md)")
    deploy.add_argument("what", choices=["certs", "keys", "supernode", "local"],
                        help="certs: a CA and a SuperLink certificate; keys: SuperNode key pairs; supernode: "
                             "flower-supernode with prompt polling and a warm ClientApp; local: a SuperLink and "
                             "N SuperNodes here, running a recipe (`guardedtuning deploy WHAT --help`)")
    deploy.add_argument("args", nargs=argparse.REMAINDER)
    tri = sub.add_parser("trilemma", help="sweep recipes and knobs, attack each run, tabulate and plot")
    tri.add_argument("--point", dest="points", action="append", default=[], metavar="RECIPE[:KEY=VALUE,...]",
                     help="a design point (repeatable); default: the built-in sweep (guardedtuning/trilemma.py)")
    tri.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                     help="override a run-config key for every point (e.g. federation.rounds=3)")
    tri.add_argument("--out", default="runs/trilemma", help="output folder (default runs/trilemma); reruns resume")
    tri.add_argument("--seeds", type=int, default=1, metavar="N",
                     help="runs per point (seed 0..N-1, attacks on seed 0); utility is their mean with min-max")
    tri.add_argument("--schedule", choices=["full", "fast"], default="full",
                     help="full: the main job's rounds/steps and attack options; fast: a reduced schedule for "
                          "affordable sweeps (evidence only where --check-ranking agrees)")
    tri.add_argument("--check-ranking", action="store_true",
                     help="run 3 check points (noise-free split, the default, a very noisy split) under both "
                          "schedules and report whether fast ranks utility and eia_max as full does (exit 1 if not)")
    tri.add_argument("--runner", choices=["inprocess", "flower"], default="inprocess",
                     help="inprocess: the ServerApp and ClientApps in this process (guardedtuning/inprocess.py, the "
                          "same record as Flower's engine: tests/test_inprocess.py); flower: `guardedtuning run`'s "
                          "simulation engine for every point")
    sub.add_parser("keys", help="list run-config keys with defaults")
    sub.add_parser("recipes", help="list the recipes (designs) with what each does")
    fetch = sub.add_parser("fetch", help="prepare an embedded model (smollm2-135m) once")
    fetch.add_argument("model", choices=["smollm2-135m", "minilm-l6"])
    export = sub.add_parser("export", help="a run's adapters out: --merged writes the base model with them merged")
    export.add_argument("--merged", action="store_true", required=True,
                        help="merge <run dir>/adapter (PEFT) into the base model and save_pretrained it with the "
                             "tokenizer (the PEFT folder itself is <run dir>/adapter already)")
    export.add_argument("run_dir", help="a run's output folder (holds adapter/, written at every checkpoint)")
    export.add_argument("dest", help="new folder for the merged model (AutoModel / AutoModelForCausalLM loads it)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "keys":
            return _keys()
        if args.command == "recipes":
            return _recipes()
        if args.command == "fetch":
            return _fetch(args.model)
        if args.command == "export":
            return _export(args.run_dir, args.dest)
        if args.command == "trilemma":
            from guardedtuning.trilemma import main_cli

            return main_cli(args, console)
        if args.command == "bench":
            return _bench(args)
        if args.command == "deploy":
            from guardedtuning.deploy import main as deploy_main

            return deploy_main([args.what, *args.args])
        return _run(args)
    except GuardedTuningError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]; rerun the same command to resume from the last finished round")
        return 130


def _keys() -> int:
    from rich.table import Column

    # the key never wraps (it is what a user copies); a long default or meaning folds instead
    table = Table(Column("key", no_wrap=True), Column("default", overflow="fold", max_width=24), "meaning")
    helps = config_help()
    for key, value in default_flat_config().items():
        table.add_row(key, json.dumps(value), helps.get(key, ""))
    console.print(table)
    return 0


def _recipes() -> int:
    table = Table("recipe", "what it does", "releases activations", "DP-SGD")
    for r in recipes.all_recipes().values():
        default = " (default)" if r.name == DEFAULT_RECIPE else ""
        table.add_row(r.name + default, r.summary, "yes" if r.releases_activations else "no",
                      "yes" if r.accepts_dp else "no")
    console.print(table)
    return 0


def _export(run_dir: str, dest: str) -> int:
    from guardedtuning.models.export import export_merged

    info = export_merged(Path(run_dir), Path(dest))
    head = " and its classifier head" if info.get("head") else ""
    console.print(f"{dest}: {info['base']['name']} with the adapters of round {info.get('round')} merged{head}")
    return 0


def _fetch(model: str) -> int:
    from guardedtuning.models.loading import resolve_model_source

    console.print(f"{model}: {resolve_model_source(model)}")
    return 0


def _run(args: argparse.Namespace) -> int:
    sets = parse_set(args.sets)
    out = Path(args.out or sets.get("output.dir") or f"runs/{args.recipe}").resolve()
    sets["output.dir"] = str(out)
    cfg = recipes.config_for(args.recipe, sets)
    from guardedtuning.preflight import preflight

    facts = preflight(cfg)
    out.mkdir(parents=True, exist_ok=True)
    _banner(cfg, facts)
    events = out / "events.jsonl"
    offset = events.stat().st_size if events.exists() else 0
    if not recipes.get(cfg.recipe).federated:
        return _run_in_process(cfg, events, offset)
    return _run_flower(cfg, out, events, offset, verbose=args.verbose)


def _bench(args: argparse.Namespace) -> int:
    from guardedtuning.bench import DEFAULT_POINTS, Sweep, markdown, parse_points
    from guardedtuning.preflight import preflight

    if not recipes.get(args.recipe).federated:
        raise GuardedTuningError(f"`bench clients` sweeps federated recipes; {args.recipe} has no clients")
    if args.rounds < 1:
        raise GuardedTuningError(f"--rounds must be >= 1 but is {args.rounds}")
    sweep = Sweep(args.recipe, parse_points(args.points or DEFAULT_POINTS), args.rounds, parse_set(args.sets),
                  Path(args.out).resolve())
    configs = sweep.configs()  # every point's config is checked before the first one runs
    for cfg in configs:
        preflight(cfg)

    def runner(cfg: RunConfig) -> int:
        out = Path(cfg.output.dir)
        out.mkdir(parents=True, exist_ok=True)
        return _run_flower(cfg, out, out / "events.jsonl", 0, verbose=False)

    rows = sweep.run(runner, say=lambda m: console.print(f"[bold]bench clients[/] {m}", highlight=False))
    console.print(markdown(rows), highlight=False, soft_wrap=True)
    console.print(f"table: {sweep.out / 'bench-clients.csv'} (.md)  plot: {sweep.out / 'bench-clients.png'}",
                  highlight=False, soft_wrap=True)
    return 0


def _banner(cfg: RunConfig, facts: dict[str, Any]) -> None:
    fed, recipe = cfg.federation, recipes.get(cfg.recipe)
    who = f"{fed.num_clients} clients, {fed.clients_per_round} per round" if recipe.federated else "1 process"
    shape = recipe.shape(cfg)
    console.print(
        f"[bold]guardedtuning[/] {cfg.recipe}: {cfg.model.name} ({facts['kind']}, {facts['layers']} blocks"
        f"{shape}) on {cfg.data.name} ({facts['train_rows']} train / {facts['test_rows']} test rows, "
        f"majority class {facts['majority_rate']:.3f}); {who}, {fed.rounds} rounds -> {cfg.output.dir}",
        highlight=False, soft_wrap=True,
    )


class EventTail:
    """Reads new lines of ``events.jsonl`` and draws them as progress."""

    def __init__(self, path: Path, offset: int, cfg: RunConfig) -> None:
        self.path, self.offset, self.cfg = path, offset, cfg
        self.error: dict[str, Any] | None = None
        self.done = False
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=console)
        self.task = self.progress.add_task("starting", total=None, info="")

    def poll(self) -> None:
        if not self.path.exists():
            return
        with self.path.open() as fh:
            fh.seek(self.offset)
            chunk = fh.read()
        if not chunk.endswith("\n"):
            chunk = chunk[: chunk.rfind("\n") + 1]
        self.offset += len(chunk.encode())
        for line in chunk.splitlines():
            self.handle(json.loads(line))

    def handle(self, ev: dict[str, Any]) -> None:
        kind = ev["event"]
        rounds = self.cfg.federation.rounds
        if kind == "round_start":
            self.progress.update(self.task, description=f"round {ev['round']}/{rounds}", total=ev["steps"],
                                 completed=0, info=f"{len(ev['clients']) or 'pooled'} clients")
        elif kind == "step":
            loss = ev.get("loss")
            self.progress.update(self.task, completed=ev["step"],
                                 info=f"loss {loss:.4f}" if loss is not None else "")
        elif kind == "round":
            metric = "utility"
            eps = ev.get("epsilon")
            dp = (f"  ε {eps:.2f} vs server" + (f", {ev['epsilon_model']:.2f} model" if ev.get("epsilon_model")
                                                 is not None else "")) if eps is not None else ""
            self.progress.console.print(
                f"round {ev['round']}: {metric} {ev['utility']:.4f}  train loss "
                f"{(ev['train_loss'] or float('nan')):.4f}  up {ev['bytes_up'] / 1e6:.2f} MB  "
                f"down {ev['bytes_down'] / 1e6:.2f} MB  {ev['wall_s']:.1f} s{dp}", highlight=False, soft_wrap=True)
        elif kind == "dropped":
            self.progress.console.print(f"[yellow]round {ev['round']}: dropped node {ev['node']}: {escape(ev['reason'])}[/]",
                                        highlight=False, soft_wrap=True)
        elif kind == "resume":
            self.progress.console.print(f"resuming after round {ev['round']} from the checkpoint")
        elif kind == "error":
            self.error = ev
        elif kind == "done":
            self.done = True


def _summary(out: Path) -> None:
    record = json.loads((out / "results.json").read_text())
    u, c = record["utility"], record["cost"]
    table = Table(title=f"{record['recipe']} on {record['model']} / {record['dataset']}")
    for col in ("utility", "majority class", "bytes up / client-round", "step overhead (median)", "wall"):
        table.add_column(col)
    overhead = c.get("step_overhead_s_median")
    value = f"{u['value']:.4f}" if u["value"] is not None else "-"
    table.add_row(f"{u['metric']} {value}", f"{u['majority_rate']:.4f}",
                  f"{c['bytes_up_per_client_round'] / 1e6:.3f} MB" if c["bytes_up_per_client_round"] else "-",
                  f"{overhead * 1000:.1f} ms" if overhead is not None else "-", f"{c['wall_s']:.1f} s")
    console.print(table)
    dp = record.get("privacy", {}).get("dp", {})
    if dp.get("enabled") and dp.get("epsilon") is not None:
        model = f"; ε of the released model {dp['epsilon_model']:.2f}" if dp.get("epsilon_model") is not None else ""
        console.print(f"DP-SGD: ε {dp['epsilon']:.2f} against the server (target {dp['target_epsilon']:g}, "
                      f"δ {dp['delta']:g}){model}; what each covers: privacy.dp.scope in results.json",
                      highlight=False, soft_wrap=True)
    stopped = record.get("stopped")
    if stopped:
        rounds = record.get("config", {}).get("federation.rounds", "?")
        console.print(f"stopped after round {stopped.get('after_round')} of {rounds}: {stopped.get('reason')} "
                      "(the model is that round's; stopped.message in results.json says why and what to do)",
                      highlight=False, soft_wrap=True)
    console.print(f"results: {out / 'results.json'}  plot: {out / 'utility.png'}", highlight=False, soft_wrap=True)


def _run_in_process(cfg: RunConfig, events: Path, offset: int) -> int:
    from guardedtuning.server_app.server_app import execute

    failure: list[BaseException] = []

    def target() -> None:
        try:
            execute(cfg, None)
        except BaseException as exc:  # noqa: BLE001 - reported below
            failure.append(exc)

    tail = EventTail(events, offset, cfg)
    worker = threading.Thread(target=target, daemon=True)
    with tail.progress:
        worker.start()
        while worker.is_alive():
            tail.poll()
            time.sleep(0.2)
        tail.poll()
    if failure:
        raise failure[0]
    _summary(Path(cfg.output.dir))
    return 0


def _exit_on_signal(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def _run_flower(cfg: RunConfig, out: Path, events: Path, offset: int, *, verbose: bool) -> int:
    from guardedtuning.launcher import FlowerRun

    run = FlowerRun(cfg, out, verbose=verbose)
    tail = EventTail(events, offset, cfg)
    # a closed terminal or `kill` must still stop the SuperLink and Ray (see `finally`)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit_on_signal)
    try:
        with tail.progress:
            run.start()
            while run.poll() is None and not tail.done and tail.error is None:
                tail.poll()
                time.sleep(0.2)
            tail.poll()
            # `flwr run --stream` may linger after the ServerApp finished: wait briefly
            deadline = time.monotonic() + 30
            while run.poll() is None and time.monotonic() < deadline and (tail.done or tail.error):
                time.sleep(0.2)
    finally:
        run.stop()
    if tail.error is not None:
        message = tail.error.get("message", "unknown error")
        if tail.error.get("input", False):
            raise GuardedTuningError(message)
        err.print(f"[bold red]run failed:[/] {escape(message)}\nlogs: {out / 'flower.log'}", highlight=False,
                  soft_wrap=True)
        return 1
    if not tail.done:
        err.print(f"[bold red]run failed:[/] Flower exited (code {run.poll()}) before the run finished; "
                  f"logs: {out / 'flower.log'}, {out / 'superlink.log'}", highlight=False)
        return 1
    _summary(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
