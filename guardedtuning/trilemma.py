"""``guardedtuning trilemma``: privacy, utility and cost of many design points, side by side.

A sweep is a list of points, each a recipe plus run-config overrides (on top of shared
overrides such as a smaller model). For each point: run it (the same path as
``guardedtuning run``: Flower's simulation engine, or in process for ``central-ft``),
attack it (:mod:`guardedtuning.privacy.attacks.harness`), and append a row. After every
point the table (CSV and Markdown) and the plots are rewritten, so an interrupted sweep
keeps what it finished; a rerun skips points whose run and attacks are both on disk.

Columns: utility, utility as a fraction of ``central-ft``'s, bytes per client-round
(up + down) and as a fraction of the dense reference (the noise-free ``split`` point:
fp32 activations and dense fp32 updates), and each attack's success rate.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guardedtuning import recipes
from guardedtuning.recipes import config_for

ATTACK_COLUMNS = ("eia_nn", "eia_mlp", "eia_transformer", "eia_opt", "aia", "update", "update_secure")


@dataclass(frozen=True)
class Point:
    """One design point: a recipe and its overrides."""

    recipe: str
    sets: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        knobs = "_".join(f"{k.split('.')[-1]}={v}" for k, v in sorted(self.sets.items()))
        return re.sub(r"[^A-Za-z0-9_.=-]", "", f"{self.recipe}{'_' + knobs if knobs else ''}")


def parse_point(text: str) -> Point:
    """``recipe`` or ``recipe:key=value,key=value`` (e.g. ``privtune:privacy.eta=30``)."""
    recipe, _, rest = text.partition(":")
    sets = {}
    for item in filter(None, rest.split(",")):
        if "=" not in item:
            from guardedtuning.errors import ConfigError

            raise ConfigError(f"--point {text!r}: {item!r} is not key=value; e.g. privtune:privacy.eta=30")
        k, v = item.split("=", 1)
        sets[k.strip()] = v.strip()
    return Point(recipe.strip(), sets)


DENSE_REFERENCE = Point("split")  # fp32 activations and dense fp32 updates: the bytes yardstick


def is_baseline(recipe: str) -> bool:
    """A yardstick without client-side privacy (no DP-SGD to plan): its utility is a reference line."""
    return not recipes.get(recipe).accepts_dp


def default_points() -> list[Point]:
    """The yardsticks, PrivTune and plain d_chi over eta, and the guarded knobs."""
    pts = [Point("central-ft"), Point("fedlora"), DENSE_REFERENCE]
    for eta in (3, 10, 30, 100):
        pts.append(Point("privtune", {"privacy.eta": eta}))
        pts.append(Point("split", {"privacy.mechanism": "dchi", "privacy.eta": eta}))
    pts.append(Point("privtune", {"privacy.eta": 10, "privacy.rho": 3.0}))
    pts.append(Point("guarded"))
    pts += [Point("guarded", {"dp.target-epsilon": e}) for e in (2.0, 32.0)]
    pts += [Point("guarded", {"aggregation.density": d}) for d in (0.01, 0.2)]
    pts += [Point("guarded", {"aggregation.bits": 4})]
    return pts


def row_of(point: Point, record: dict[str, Any], attacks: dict[str, Any]) -> dict[str, Any]:
    c = record["cost"]
    up, down = c.get("bytes_up_per_client_round"), c.get("bytes_down_per_client_round")
    row: dict[str, Any] = {
        "point": point.name, "recipe": point.recipe, "knobs": json.dumps(point.sets, sort_keys=True),
        "utility": record["utility"]["value"], "majority_rate": record["utility"].get("majority_rate"),
        "epsilon": record["privacy"].get("epsilon"),
        "bytes_per_client_round": (up or 0) + (down or 0) if up is not None else None,
        "wall_s": c.get("wall_s"),
    }
    for a in ATTACK_COLUMNS:
        v = attacks.get(a)
        row[a] = v["asr"] if isinstance(v, dict) else None
    nn = attacks.get("eia_nn")
    row["eia_nn_top5"] = nn.get("top5") if isinstance(nn, dict) else None
    row["eia_nn_rouge_l"] = nn.get("rouge_l") if isinstance(nn, dict) else None
    aia = attacks.get("aia")
    row["aia_majority"] = aia.get("majority_rate") if isinstance(aia, dict) else None
    return row


def add_fractions(rows: list[dict[str, Any]]) -> None:
    """Utility / central-ft's; bytes / the dense reference (noise-free split)."""
    ref_u = next((r["utility"] for r in rows if not recipes.get(r["recipe"]).federated), None)
    ref_b = next((r["bytes_per_client_round"] for r in rows if r["point"] == DENSE_REFERENCE.name), None)
    for r in rows:
        r["utility_frac_central"] = r["utility"] / ref_u if ref_u and r["utility"] is not None else None
        b = r["bytes_per_client_round"]
        r["bytes_frac_dense"] = b / ref_b if ref_b and b is not None else None


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.3g}"
    return str(v)


COLUMNS = ("point", "utility", "utility_frac_central", "bytes_per_client_round", "bytes_frac_dense", "epsilon",
           *ATTACK_COLUMNS, "eia_nn_top5", "eia_nn_rouge_l", "aia_majority", "wall_s")


def write_table(rows: list[dict[str, Any]], out: Path) -> None:
    add_fractions(rows)
    with (out / "trilemma.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=[*COLUMNS, "recipe", "knobs", "majority_rate"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    (out / "trilemma.md").write_text("\n".join(lines) + "\n")


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points (attack success, utility) not beaten by another with lower success and higher utility."""
    front = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def plot(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = [a for a in ATTACK_COLUMNS if any(r.get(a) is not None for r in rows)]
    if attacks:
        fig, axes = plt.subplots(1, len(attacks), figsize=(3.6 * len(attacks), 3.4), squeeze=False)
        for ax, a in zip(axes[0], attacks, strict=True):
            pts = [(r[a], r["utility"], r["point"]) for r in rows if r.get(a) is not None and r["utility"] is not None]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=14)
            for x, y, name in pts:
                ax.annotate(name, (x, y), fontsize=5)
            front = pareto([(x, y) for x, y, _ in pts])
            ax.plot([p[0] for p in front], [p[1] for p in front], color="tab:red", label="Pareto front")
            for r in rows:
                if is_baseline(r["recipe"]) and r["utility"] is not None:
                    ax.axhline(r["utility"], linestyle="--", linewidth=0.8, color="grey")
            ax.set_xlabel(f"{a} success")
            ax.set_ylabel("utility")
            ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / "utility_vs_asr.png", dpi=130)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.4))
    pts = [r for r in rows if r["bytes_per_client_round"] and r["utility"] is not None]
    ax.scatter([r["bytes_per_client_round"] for r in pts], [r["utility"] for r in pts], s=14)
    for r in pts:
        ax.annotate(r["point"], (r["bytes_per_client_round"], r["utility"]), fontsize=5)
    for r in rows:
        if is_baseline(r["recipe"]) and r["utility"] is not None:
            ax.axhline(r["utility"], linestyle="--", linewidth=0.8, color="grey")
            ax.annotate(r["recipe"], (ax.get_xlim()[0], r["utility"]), fontsize=6)
    if pts:
        ax.set_xscale("log")
    ax.set_xlabel("bytes per client-round (up + down)")
    ax.set_ylabel("utility")
    fig.tight_layout()
    fig.savefig(out / "utility_vs_bytes.png", dpi=130)
    plt.close(fig)


Runner = Callable[[Any], dict[str, Any]]


def default_runner(cfg: Any) -> dict[str, Any]:
    """The path ``guardedtuning run`` takes: in process for central-ft, Flower's simulation engine otherwise."""
    if not recipes.get(cfg.recipe).federated:
        from guardedtuning.server_app.server_app import execute

        return execute(cfg, None)
    from guardedtuning.launcher import run_to_completion

    return run_to_completion(cfg)


def sweep(points: list[Point], base: dict[str, Any], out: Path, *, runner: Runner = default_runner,
          attack_options: Any = None, on_event: Callable[[str, Point, dict[str, Any]], None] | None = None,
          ) -> list[dict[str, Any]]:
    """Run, attack and tabulate every point; finished points (results + attacks on disk) are reused."""
    from guardedtuning.privacy.attacks.harness import AttackOptions, attack_run

    out.mkdir(parents=True, exist_ok=True)
    opts = attack_options or AttackOptions()
    rows: list[dict[str, Any]] = []
    notify = on_event or (lambda *_a: None)
    for point in points:
        run_dir = out / point.name
        sets = {**base, **point.sets, "output.dir": str(run_dir)}
        if is_baseline(point.recipe):  # the privacy knobs do not apply
            sets = {k: v for k, v in sets.items() if not k.startswith(("privacy.", "dp.", "aggregation."))}
        cfg = config_for(point.recipe, sets)
        results, attacks_path = run_dir / "results.json", run_dir / "attacks.json"
        if results.is_file() and attacks_path.is_file():
            record, attacks = json.loads(results.read_text()), json.loads(attacks_path.read_text())
            notify("skip", point, {})
        else:
            if results.is_file():
                record = json.loads(results.read_text())
            else:
                notify("run", point, {})
                record = runner(cfg)
            notify("attack", point, {"utility": record["utility"]["value"]})
            attacks = attack_run(cfg, run_dir, opts, log=lambda m, p=point: notify("log", p, {"message": m}))
            attacks_path.write_text(json.dumps(attacks, indent=2))
            record["privacy"]["attacks"] = {k: v for k, v in attacks.items() if isinstance(v, dict)}
            results.write_text(json.dumps(record, indent=2))
        rows.append(row_of(point, record, attacks))
        write_table(rows, out)
        plot(rows, out)
        notify("done", point, rows[-1])
    return rows


def main_cli(args: Any, console: Any) -> int:
    """``guardedtuning trilemma``: progress with Rich, a summary table at the end."""
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from guardedtuning.config import parse_set

    points = [parse_point(p) for p in args.points] or default_points()
    base = parse_set(args.sets)
    out = Path(args.out).resolve()
    for p in points:  # every point's config must build before anything runs
        config_for(p.recipe, {**base, **p.sets})
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("{task.fields[info]}"), console=console)
    task = progress.add_task("trilemma", total=len(points), info="")

    def on_event(kind: str, point: Point, data: dict[str, Any]) -> None:
        if kind == "done":
            progress.advance(task)
            attacks = "  ".join(f"{a} {data[a]:.3f}" for a in ATTACK_COLUMNS if data.get(a) is not None)
            u = data["utility"]
            progress.console.print(f"{escape(point.name)}: utility {u:.4f}  {attacks}" if u is not None
                                   else f"{escape(point.name)}: no utility", highlight=False, soft_wrap=True)
        elif kind == "log":
            progress.update(task, info=escape(f"{point.name}: {data['message']}"))
        else:
            progress.update(task, info=escape(f"{point.name}: {'finished, reused' if kind == 'skip' else kind}"))

    with progress:
        sweep(points, base, out, on_event=on_event)
    console.print(f"table: {out / 'trilemma.md'}  csv: {out / 'trilemma.csv'}  plots: "
                  f"{out / 'utility_vs_asr.png'}, {out / 'utility_vs_bytes.png'}", highlight=False, soft_wrap=True)
    return 0
