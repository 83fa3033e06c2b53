"""``guardedtuning trilemma``: privacy, utility and cost of many design points, side by side.

A sweep is a list of points, each a recipe plus run-config overrides (on top of a
:class:`Schedule` and shared overrides such as a smaller model). Each point runs ``seeds``
times (``seed`` = s, s+1, ..., each its own run folder ``<out>/<point>/seed<k>``; s is the
shared ``seed``, 0 by default) by the path ``guardedtuning run`` takes (Flower's simulation
engine, or in process for ``central-ft``); the first seed's run is attacked
(:mod:`guardedtuning.privacy.attacks.harness`, every attack in its ``ATTACKS``). After every
point the table (CSV and Markdown) and the plots are rewritten, so an interrupted sweep
keeps what it finished; a rerun skips each (point, seed) whose ``results.json`` is on disk
with the same config, and re-attacks only where the attack options changed.

Columns: utility as the mean over seeds with its spread (min and max over the seeds, and
the standard deviation), its drop from the noise-free ``split`` point in percentage points
and its fraction of ``central-ft``'s (both from the same sweep, so on the same schedule),
bytes per client-round (up + down) and as a fraction of the dense reference (the
noise-free ``split`` point: fp32 activations and dense fp32 updates), ε, and each attack's
success rate, with ``eia_max``, the largest token top-1 rate over the token-reconstruction
attacks that ran.

A reduced schedule (``fast``) is only evidence where it ranks points as the main job's
schedule (``full``) does: :func:`check_ranking` runs :data:`CHECK_POINTS` under both and
:func:`compare_rankings` says whether the utility and ``eia_max`` rankings agree.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guardedtuning import recipes
from guardedtuning.errors import ConfigError, GuardedTuningError
from guardedtuning.privacy.attacks.harness import ATTACKS, AttackOptions
from guardedtuning.recipes import config_for

ATTACK_COLUMNS: tuple[str, ...] = tuple(ATTACKS)  # the harness's list: every attack is a column
TOKEN_METRIC = "token top-1"  # the metric of the token-reconstruction attacks eia_max is taken over
PRIVTUNE_REF = (0.10, 3.33)  # PrivTune (RoBERTa, SST): attack success 10 % at a 3.33-point drop from noise-free
GUARDEDTUNING_REF = (0.50, 0.90)  # GuardedTuning: reconstruction < 50 % at >= 90 % of full fine-tuning


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
            raise ConfigError(f"--point {text!r}: {item!r} is not key=value; e.g. privtune:privacy.eta=30")
        k, v = item.split("=", 1)
        sets[k.strip()] = v.strip()
    return Point(recipe.strip(), sets)


DENSE_REFERENCE = Point("split")  # noise-free split: the utility yardstick, and fp32 activations/updates for bytes
DEFAULT_POINT = Point(recipes.DEFAULT)  # what `guardedtuning run` runs: marked in the table and the plot
VERY_NOISY = Point("split", {"privacy.mechanism": "dchi", "privacy.eta": 1.0})
CHECK_POINTS = (DENSE_REFERENCE, DEFAULT_POINT, VERY_NOISY)  # the reduced schedule must rank these as the full one

# The low-dimensional release the default moves to: the levers are swept one at a time around it.
LOW_DIM = {"split.layer": 4, "split.release-dim": 4, "privacy.mechanism": "dchi", "privacy.eta": 2.0,
           "privacy.clip": 1.0}


@dataclass(frozen=True)
class Schedule:
    """A training and attack budget: run-config overrides under every point, and the attack options."""

    name: str
    sets: dict[str, Any]
    attacks: AttackOptions
    about: str


SCHEDULES = {
    "full": Schedule("full", {}, AttackOptions(),
                     "the main job's schedule (the run-config defaults) and the harness's default attack options"),
    "fast": Schedule(
        "fast", {"federation.rounds": 3, "train.local-steps": 10},
        dataclasses.replace(AttackOptions(), aux_rows=128, aia_rows=200, opt_candidates=8),
        "3 rounds of 10 local steps (full: 5 of 20), the same data and clients; the harness's default attacks "
        "with 128 auxiliary rows, 200 AIA rows and 8 optimisation candidates"),
}


def schedule(name: str) -> Schedule:
    """The schedule called ``name`` (``fast`` or ``full``)."""
    if name not in SCHEDULES:
        raise ConfigError(f"--schedule {name!r} is not a schedule; pick one of {', '.join(SCHEDULES)}")
    return SCHEDULES[name]


def is_baseline(recipe: str) -> bool:
    """A yardstick without client-side privacy (no DP-SGD to plan): its utility is a reference line."""
    return not recipes.get(recipe).accepts_dp


def _digest(flat: dict[str, Any]) -> str:
    from guardedtuning.results import config_digest

    return config_digest(recipes.build_config(flat))


def default_points() -> list[Point]:
    """The yardsticks, then the levers around the low-dimensional release, one at a time.

    Yardsticks: ``central-ft``, noise-free ``split``, ``fedlora``. Design points (16): the
    low-dimensional release :data:`LOW_DIM` in ``guarded`` (``Point("guarded")`` itself when
    it is the default), η 1/4/8, clip 2, release dimension 2/8, cut layer 2, DP-SGD target
    ε 32, NoPeek weight 1, learning rates 2e-3 (the other recipes' rate; the default's is 5e-3:
    noise-aware training), and PrivTune η 3/10 at
    ρ 1 and η 10 at ρ 3 (full-width release, no DP-SGD); then ``gradfree`` and ``offsite`` at
    their defaults (16 design points, 19 in all). The current default is always among them.
    The fast schedule maps them in about an hour on the 2-core CPU (``--point`` runs others).
    """
    pts = [Point("central-ft"), DENSE_REFERENCE, Point("fedlora")]
    same = _digest({**recipes.get(DEFAULT_POINT.recipe).overrides, **LOW_DIM, "recipe": DEFAULT_POINT.recipe}) \
        == _digest({**recipes.get(DEFAULT_POINT.recipe).overrides, "recipe": DEFAULT_POINT.recipe})
    pts.append(DEFAULT_POINT if same else Point("guarded", dict(LOW_DIM)))

    def lever(sets: dict[str, Any]) -> Point:
        return Point("guarded", {**LOW_DIM, **sets})

    pts += [lever({"privacy.eta": e}) for e in (1.0, 4.0, 8.0)]
    pts += [lever({"privacy.clip": 2.0})]
    pts += [lever({"split.release-dim": k}) for k in (2, 8)]
    pts += [lever({"split.layer": 2})]
    pts += [lever({"dp.target-epsilon": 32.0})]
    pts += [lever({"privacy.nopeek-weight": 1.0}), lever({"train.lr": 2e-3, "train.server-lr": 2e-3})]
    pts += [Point("privtune", {"privacy.eta": e, "privacy.rho": 1.0}) for e in (3.0, 10.0)]
    pts.append(Point("privtune", {"privacy.eta": 10.0, "privacy.rho": 3.0}))
    pts += [Point("gradfree"), Point("offsite")]  # the other designs at their defaults: attacked too
    if DEFAULT_POINT not in pts:
        pts.append(DEFAULT_POINT)
    return pts


def point_config(point: Point, base: dict[str, Any], seed: int, run_dir: Path) -> Any:
    """The run config of ``point`` at ``seed``: recipe, then ``base``, then the point's own overrides."""
    sets = {**base, **point.sets, "seed": seed, "output.dir": str(run_dir)}
    if is_baseline(point.recipe):  # the privacy knobs do not apply
        sets = {k: v for k, v in sets.items() if not k.startswith(("privacy.", "dp.", "aggregation."))}
    return config_for(point.recipe, sets)


def base_seed(base: dict[str, Any]) -> int:
    """The first seed of a sweep: the shared ``seed`` override, 0 without one."""
    try:
        return int(str(base.get("seed", 0)))
    except ValueError:
        raise ConfigError(f"--set seed={base['seed']!r} is not an integer; e.g. --set seed=0") from None


def _token_attack_values(attacks: dict[str, Any]) -> list[float]:
    return [float(v["asr"]) for a, v in attacks.items()
            if a in ATTACK_COLUMNS and isinstance(v, dict) and v.get("metric") == TOKEN_METRIC and _num(v.get("asr"))]


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v))


def row_of(point: Point, records: Sequence[dict[str, Any]], attacks: dict[str, Any],
           default: bool | None = None) -> dict[str, Any]:
    """One table row: utility over the seeds' ``records``, cost and ε of the first, its ``attacks``.

    ``default`` marks the row that computes what ``guardedtuning run`` runs (see :func:`computes_default`);
    ``None`` compares the point with :data:`DEFAULT_POINT` by name.
    """
    first = records[0]
    c = first["cost"]
    up, down = c.get("bytes_up_per_client_round"), c.get("bytes_down_per_client_round")
    us = [float(r["utility"]["value"]) for r in records if _num(r["utility"].get("value"))]
    mean = sum(us) / len(us) if us else None
    row: dict[str, Any] = {
        "point": point.name, "recipe": point.recipe, "knobs": json.dumps(point.sets, sort_keys=True),
        "default": point == DEFAULT_POINT if default is None else default, "seeds": len(records),
        "utility": mean, "utility_min": min(us) if us else None, "utility_max": max(us) if us else None,
        "utility_std": math.sqrt(sum((u - mean) ** 2 for u in us) / (len(us) - 1)) if len(us) > 1 else None,
        "utility_seeds": json.dumps([round(u, 4) for u in us]),
        "majority_rate": first["utility"].get("majority_rate"),
        "epsilon": first["privacy"].get("epsilon"),
        "bytes_per_client_round": (up or 0) + (down or 0) if up is not None else None,
        "wall_s": sum(float(r["cost"].get("wall_s") or 0) for r in records) / len(records),
        "attack_s": attacks.get("seconds"),
    }
    for a in ATTACK_COLUMNS:
        v = attacks.get(a)
        row[a] = v["asr"] if isinstance(v, dict) else None
    tokens = _token_attack_values(attacks)
    row["eia_max"] = max(tokens) if tokens else None
    nn = attacks.get("eia_nn")
    row["eia_nn_top5"] = nn.get("top5") if isinstance(nn, dict) else None
    row["eia_nn_rouge_l"] = nn.get("rouge_l") if isinstance(nn, dict) else None
    aia = attacks.get("aia")
    row["aia_majority"] = aia.get("majority_rate") if isinstance(aia, dict) else None
    row["skipped"] = attacks.get("skipped")
    return row


def failed_row(point: Point, default: bool | None = None) -> dict[str, Any]:
    """The row of a point whose first run failed: no figures, the reason goes in ``skipped``."""
    row: dict[str, Any] = {"point": point.name, "recipe": point.recipe, "knobs": json.dumps(point.sets, sort_keys=True),
                           "default": point == DEFAULT_POINT if default is None else default, "seeds": 0,
                           "utility_seeds": "[]"}
    for key in ("utility", "utility_min", "utility_max", "utility_std", "majority_rate", "epsilon",
                "bytes_per_client_round", "wall_s", "attack_s", "eia_max", "eia_nn_top5", "eia_nn_rouge_l",
                "aia_majority", *ATTACK_COLUMNS):
        row[key] = None
    return row


def references(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """The sweep's own yardsticks: noise-free ``split`` and ``central-ft`` utility (means over seeds)."""
    split = next((r["utility"] for r in rows if r["point"] == DENSE_REFERENCE.name), None)
    central = next((r["utility"] for r in rows if not recipes.get(r["recipe"]).federated), None)
    return {"split": split, "central": central}


def add_fractions(rows: list[dict[str, Any]]) -> None:
    """Utility / central-ft's and its drop from noise-free split (points); bytes / the dense reference."""
    ref = references(rows)
    ref_b = next((r["bytes_per_client_round"] for r in rows if r["point"] == DENSE_REFERENCE.name), None)
    for r in rows:
        u = r["utility"]
        r["utility_frac_central"] = u / ref["central"] if ref["central"] and u is not None else None
        r["drop_vs_split_pts"] = 100 * (ref["split"] - u) if ref["split"] is not None and u is not None else None
        b = r["bytes_per_client_round"]
        r["bytes_frac_dense"] = b / ref_b if ref_b and b is not None else None


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.3f}" if abs(v) < 1000 else f"{v:.3g}"
    return str(v)


COLUMNS = ("point", "seeds", "utility", "utility_min", "utility_max", "utility_std", "drop_vs_split_pts",
           "utility_frac_central", "bytes_per_client_round", "bytes_frac_dense", "epsilon", "eia_max",
           *ATTACK_COLUMNS, "eia_nn_top5", "eia_nn_rouge_l", "aia_majority", "wall_s", "attack_s")
MD_COLUMNS = ("point", "seeds", "utility (mean, min-max)", "drop vs split (pt)", "/ central-ft", "bytes / client-round",
              "/ dense", "epsilon", "eia_max", *ATTACK_COLUMNS, "AIA majority", "run s", "attack s")


def _md_row(r: dict[str, Any]) -> list[str]:
    spread = f" ({_fmt(r['utility_min'])}-{_fmt(r['utility_max'])})" if (r["seeds"] or 0) > 1 else ""
    name = f"**{r['point']} (default)**" if r.get("default") else r["point"]
    return [name, str(r["seeds"]), _fmt(r["utility"]) + spread, _fmt(r.get("drop_vs_split_pts")),
            _fmt(r.get("utility_frac_central")), _fmt(r["bytes_per_client_round"]), _fmt(r.get("bytes_frac_dense")),
            _fmt(r["epsilon"]), _fmt(r["eia_max"]), *(_fmt(r[a]) for a in ATTACK_COLUMNS), _fmt(r["aia_majority"]),
            _fmt(r["wall_s"]), _fmt(r["attack_s"])]


def reference_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The reference points as text, relative to this sweep's own noise-free split and central-ft."""
    ref = references(rows)
    out = []
    s, c = ref["split"], ref["central"]
    out.append(f"- noise-free `split` (this sweep): utility {_fmt(s)}; `central-ft` (this sweep): {_fmt(c)}")
    x, drop = PRIVTUNE_REF
    if s is not None:
        out.append(f"- PrivTune reference (RoBERTa/SST, drawn relative to this sweep's split): attack success "
                   f"{x:.0%} at utility {s - drop / 100:.3f} (split - {drop} pt)")
    gx, gf = GUARDEDTUNING_REF
    if c is not None:
        out.append(f"- GuardedTuning reference (drawn relative to this sweep's central-ft): reconstruction < {gx:.0%} "
                   f"at utility >= {gf * c:.3f} ({gf:.0%} of central-ft)")
    if s is not None:
        meet = [r["point"] for r in rows if r["eia_max"] is not None and r["eia_max"] <= 0.10
                and r["utility"] is not None and r["utility"] >= s - 0.03
                and r["aia"] is not None and r["aia_majority"] is not None and r["aia"] <= r["aia_majority"] + 0.05]
        out.append("- issue 16's bound (every token attack that ran <= 10 % top-1, AIA measured and <= majority + 5 pt, "
                   f"utility >= split - 3 pt = {s - 0.03:.3f}), met by: {', '.join(meet) if meet else 'no point'}")
    return out


def write_table(rows: list[dict[str, Any]], out: Path, *, about: str = "") -> None:
    """``trilemma.csv`` (every column) and ``trilemma.md`` (the table and the reference lines)."""
    add_fractions(rows)
    with (out / "trilemma.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=[*COLUMNS, "default", "utility_seeds", "recipe", "knobs", "majority_rate",
                                           "skipped"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    lines = [f"Utility: mean over the seeds, (min-max) over them where there are several. {about}".strip(),
             "eia_max: the largest token top-1 rate over the token-reconstruction attacks that ran. "
             "Attacks on the first seed's run.", "",
             "| " + " | ".join(MD_COLUMNS) + " |", "|" + "---|" * len(MD_COLUMNS)]
    lines += ["| " + " | ".join(_md_row(r)) + " |" for r in rows]
    lines += ["", "Reference lines:", *reference_lines(rows)]
    marked = [r["point"] for r in rows if r.get("default")]
    if len(marked) != 1:
        lines += ["", f"Default: {len(marked)} points compute what `guardedtuning run` runs under this schedule"
                  + (f" ({', '.join(marked)}: the same config spelled twice)" if marked else
                     " (the --set overrides move every point off it; add a point that sets them back to mark it)")]
    (out / "trilemma.md").write_text("\n".join(lines) + "\n")


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points (attack success, utility) not beaten by another with lower success and higher utility."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def plot(rows: list[dict[str, Any]], out: Path) -> None:
    """``utility_vs_asr.png`` (a panel for ``eia_max``, then one per attack) and ``utility_vs_bytes.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = references(rows)
    panels = [a for a in ("eia_max", *ATTACK_COLUMNS) if any(r.get(a) is not None for r in rows)]
    if panels:
        ncol = min(4, len(panels))
        nrow = math.ceil(len(panels) / ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(3.6 * ncol, 3.2 * nrow + 0.9), squeeze=False)
        for ax in axes.flat[len(panels):]:
            ax.set_visible(False)
        for ax, a in zip(axes.flat, panels, strict=False):
            _panel(ax, a, rows, ref)
        handles: dict[str, Any] = {}
        for ax in axes.flat[:len(panels)]:
            for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
                handles.setdefault(label, h)
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=2, fontsize=6, frameon=False)
        fig.tight_layout(rect=(0, 0.9 / (3.2 * nrow + 0.9), 1, 1))
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
    ax.set_ylabel("utility (mean over seeds)")
    fig.tight_layout()
    fig.savefig(out / "utility_vs_bytes.png", dpi=130)
    plt.close(fig)


def _panel(ax: Any, a: str, rows: list[dict[str, Any]], ref: dict[str, float | None]) -> None:
    """Utility (mean, min-max bar) against attack ``a``; front, yardsticks, references, the default."""
    pts = [r for r in rows if r.get(a) is not None and r["utility"] is not None]
    ys = [r["utility"] for r in pts]
    lo = [r["utility"] - (r["utility_min"] if r["utility_min"] is not None else r["utility"]) for r in pts]
    hi = [(r["utility_max"] if r["utility_max"] is not None else r["utility"]) - r["utility"] for r in pts]
    ax.errorbar([r[a] for r in pts], ys, yerr=[lo, hi], fmt="o", ms=3, lw=0.8, capsize=2,
                label="design point (mean over seeds, bar = min-max)")
    for r in pts:
        ax.annotate(r["point"], (r[a], r["utility"]), fontsize=4)
    front = pareto([(r[a], r["utility"]) for r in pts])
    ax.plot([p[0] for p in front], [p[1] for p in front], color="tab:red", lw=1, label="Pareto front")
    for r in pts:
        if r.get("default"):
            ax.scatter([r[a]], [r["utility"]], s=90, facecolors="none", edgecolors="black", lw=1.2,
                       label=f"default: {r['point']}")
    if ref["split"] is not None:
        ax.axhline(ref["split"], ls="--", lw=0.8, color="tab:blue", label="noise-free split (this sweep)")
    if ref["central"] is not None:
        ax.axhline(ref["central"], ls="--", lw=0.8, color="grey", label="central-ft (this sweep)")
    token = a == "eia_max" or a.startswith("eia_")
    if token and ref["split"] is not None:
        x, drop = PRIVTUNE_REF
        ax.scatter([x], [ref["split"] - drop / 100], marker="*", s=80, color="tab:green", zorder=5,
                   label=f"PrivTune ref: {x:.0%} at split - {drop} pt (RoBERTa/SST; vs this sweep's split)")
    if (token or a.startswith("update")) and ref["central"] is not None:
        gx, gf = GUARDEDTUNING_REF
        ax.plot([0, gx, gx], [gf * ref["central"]] * 2 + [max(ys + [ref["central"]]) + 0.02], color="tab:purple",
                ls=":", lw=1, label=f"GuardedTuning ref: < {gx:.0%} at >= {gf:.0%} of central-ft (this sweep's)")
    if a == "aia":
        maj = [r["aia_majority"] for r in rows if r.get("aia_majority") is not None]
        if maj:
            ax.axvline(max(maj) + 0.05, ls=":", lw=1, color="tab:orange", label="AIA bound: majority rate + 5 pt")
    metric = "token top-1" if token else "token-set F1" if a.startswith("update") else "accuracy"
    ax.set_xlabel(f"{'max token attack' if a == 'eia_max' else a} success ({metric})", fontsize=7)
    ax.set_ylabel("utility", fontsize=7)
    ax.tick_params(labelsize=6)


Runner = Callable[[Any], dict[str, Any]]


def default_runner(cfg: Any) -> dict[str, Any]:
    """The path ``guardedtuning run`` takes: in process for central-ft, Flower's simulation engine otherwise."""
    if not recipes.get(cfg.recipe).federated:
        from guardedtuning.server_app.server_app import execute

        return execute(cfg, None)
    from guardedtuning.launcher import run_to_completion

    return run_to_completion(cfg)


def in_process_runner(cfg: Any) -> dict[str, Any]:
    """The sweep's fast path: the ServerApp and the ClientApps in this process (:mod:`guardedtuning.inprocess`)."""
    from guardedtuning.inprocess import run_in_process

    return run_in_process(cfg)


RUNNERS: dict[str, Runner] = {"inprocess": in_process_runner, "flower": default_runner}
"""``--runner``: in this process (the same record as Flower's engine, tests/test_inprocess.py), or Flower's engine."""

_NOT_COMPUTE = ("output.", "comm.", "sim.")


def _compute_diff(ours: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    """The keys of two flat configs that change what a run computes (not output, comm or sim keys)."""
    return [k for k in sorted(set(ours) | set(theirs)) if not k.startswith(_NOT_COMPUTE) and ours.get(k) != theirs.get(k)]


def computes_default(point: Point, base: dict[str, Any], default_base: dict[str, Any], seed: int) -> bool:
    """Whether ``point`` under ``base`` computes what the default recipe computes under ``default_base``.

    ``default_base`` is the schedule's overrides alone: a sweep run with ``--set train.lr=...`` under
    every point moves every point, and the default is the point that undoes it (if any), not the
    point spelled ``guarded``.
    """
    here = Path("/nonexistent-trilemma-dir")
    ours = json.loads(json.dumps(point_config(point, base, seed, here).flat()))
    theirs = json.loads(json.dumps(point_config(DEFAULT_POINT, default_base, seed, here).flat()))
    return not _compute_diff(ours, theirs)


def _finished(run_dir: Path, cfg: Any) -> dict[str, Any] | None:
    """The finished record in ``run_dir`` if its config is ``cfg``'s; ``None`` if none; refused if another.

    A record that stopped before its last round (``stopped``: its DP budget ran out) is refused too.
    """
    path = run_dir / "results.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    ours = json.loads(json.dumps(cfg.flat()))
    try:
        theirs = json.loads(json.dumps(recipes.build_config(record.get("config", {})).flat()))
    except GuardedTuningError as exc:
        raise ConfigError(f"{path}: its config does not build with this version ({exc}); delete {run_dir} to rerun "
                          "it, or pass another --out") from None
    diff = _compute_diff(ours, theirs)
    if diff:
        shown = ", ".join(f"{k}={theirs.get(k)!r} (this sweep: {ours.get(k)!r})" for k in diff[:6])
        raise ConfigError(f"{path} was run with another config: {shown}; pass another --out, or delete {run_dir} "
                          "to rerun it")
    stopped = record.get("stopped")
    if stopped:  # fewer rounds than the point's plan: averaged with finished points, it would skew the sweep
        raise ConfigError(f"{path} stopped after round {stopped.get('after_round')} of {cfg.federation.rounds} "
                          f"({stopped.get('reason')}): a sweep point needs every round. Pass another --out and "
                          "rerun the sweep with a plan its DP budget fits (its message in results.json says how); "
                          f"the epsilons of runs on the same clients' data add up")
    return record


def _options_json(opts: AttackOptions) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(opts)))


def sweep(points: Sequence[Point], base: dict[str, Any], out: Path, *, runner: Runner = default_runner,
          attack_options: AttackOptions | None = None, seeds: int = 1, about: str = "",
          on_event: Callable[[str, Point, dict[str, Any]], None] | None = None,
          default_base: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Run every point at ``seeds`` seeds, attack its first seed's run, tabulate and plot.

    Parameters
    ----------
    points
        The design points, in table order.
    base
        Run-config overrides under every point (a schedule's, then ``--set`` values).
    out
        The sweep's folder: ``<out>/<point>/seed<k>`` per run, the table and plots at the top.
    runner
        ``cfg -> results record``; :func:`default_runner` is ``guardedtuning run``'s path.
    attack_options
        The harness's options (default: its defaults).
    seeds
        Runs per point (``seed`` = the base seed + 0..seeds-1).
    about
        A line for ``trilemma.md`` (the schedule).
    on_event
        ``(kind, point, data)`` with kind ``run``/``skip`` (data: ``seed``), ``attack``, ``log``, ``done``.
    default_base
        The overrides under which the default recipe is "the default" (the schedule's, without the
        user's ``--set`` values); the row computing that config is marked default. ``None``: ``base``.

    Returns
    -------
    list of dict
        One row per point (the table's columns).
    """

    if seeds < 1:
        raise ConfigError(f"--seeds {seeds} is below 1; pass --seeds 3 for a mean with its spread")
    out.mkdir(parents=True, exist_ok=True)
    opts = attack_options or AttackOptions()
    s0 = base_seed(base)
    rows: list[dict[str, Any]] = []
    notify = on_event or (lambda *_a: None)
    for point in points:
        records: list[dict[str, Any]] = []
        attacks: dict[str, Any] = {}
        failed = ""
        for seed in range(s0, s0 + seeds):
            run_dir = out / point.name / f"seed{seed}"
            cfg = point_config(point, base, seed, run_dir)
            record = _finished(run_dir, cfg)
            if record is None:
                notify("run", point, {"seed": seed})
                try:
                    record = runner(cfg)
                except GuardedTuningError as exc:  # one point's failing run is recorded; the sweep goes on
                    notify("log", point, {"message": f"the run failed: {exc}"})
                    failed = f"seed {seed}: the run failed: {exc}"
                    break
            else:
                notify("skip", point, {"seed": seed})
            if seed == s0:
                attacks_path = run_dir / "attacks.json"
                attacks = json.loads(attacks_path.read_text()) if attacks_path.is_file() else {}
                if attacks.get("options") != _options_json(opts):
                    notify("attack", point, {"utility": record["utility"]["value"]})
                    attacks = _attack(point, cfg, run_dir, opts, notify)
                    if not attacks.get("failed"):  # a failed attack is retried by the next run of the sweep
                        attacks["options"] = _options_json(opts)
                    attacks_path.write_text(json.dumps(attacks, indent=2))
                    record["privacy"]["attacks"] = {k: v for k, v in attacks.items()
                                                    if k in ATTACK_COLUMNS and isinstance(v, dict)}
                    (run_dir / "results.json").write_text(json.dumps(record, indent=2))
            records.append(record)
        is_default = computes_default(point, base, base if default_base is None else default_base, s0)
        row = row_of(point, records, attacks, is_default) if records else failed_row(point, is_default)
        if failed:  # the seeds before the failure still count; the reason is in the row
            row["skipped"] = "; ".join(x for x in (row.get("skipped"), failed) if x)
        rows.append(row)
        write_table(rows, out, about=about)
        plot(rows, out)
        notify("done", point, rows[-1])
    return rows


def _attack(point: Point, cfg: Any, run_dir: Path, opts: AttackOptions,
            notify: Callable[[str, Point, dict[str, Any]], None]) -> dict[str, Any]:
    """The harness's attacks on one run; a recipe with no attack surface, or an attack that fails, is recorded
    as skipped with the reason (the sweep goes on; a failed one is marked ``failed`` and retried next time)."""
    from guardedtuning.privacy.attacks.harness import attack_run

    none = {a: None for a in opts.attacks}
    surface = recipes.get(point.recipe).attack_surface
    if not surface:
        return {**none, "skipped": f"{point.recipe} declares nothing the attacks can target (its recipe's "
                                   "attack_surface is empty)", "seconds": 0.0}
    try:
        return attack_run(cfg, run_dir, opts, log=lambda m: notify("log", point, {"message": m}), surface=surface)
    except Exception as exc:  # noqa: BLE001 - one point's failing attack must not end the sweep; it is recorded
        why = str(exc) if isinstance(exc, GuardedTuningError) else f"{type(exc).__name__}: {exc}"
        notify("log", point, {"message": f"attacks failed: {why}"})
        return {**none, "skipped": f"the attacks failed: {why}", "failed": True, "seconds": 0.0}


def compare_rankings(fast: list[dict[str, Any]], full: list[dict[str, Any]], *, tie: float = 0.0) -> dict[str, Any]:
    """Whether two schedules' rows rank the same points the same way, by utility and by ``eia_max``.

    A pair of points is discordant when one schedule orders it strictly one way and the other
    strictly the other way (differences within ``tie`` count as ties, which agree with
    either order). Points without a value in either schedule are left out of that ranking.

    Returns
    -------
    dict
        ``{"utility": {...}, "eia_max": {...}, "agree": bool}``; each ranking has ``fast`` and
        ``full`` (point names, highest first), ``values`` and ``discordant`` (pairs) and ``agree``.
    """
    by_fast, by_full = {r["point"]: r for r in fast}, {r["point"]: r for r in full}
    out: dict[str, Any] = {}
    for key in ("utility", "eia_max"):
        names = [n for n in by_fast if n in by_full and by_fast[n].get(key) is not None
                 and by_full[n].get(key) is not None]
        f = {n: float(by_fast[n][key]) for n in names}
        g = {n: float(by_full[n][key]) for n in names}
        bad = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]
               if abs(f[a] - f[b]) > tie and abs(g[a] - g[b]) > tie and (f[a] - f[b]) * (g[a] - g[b]) < 0]
        out[key] = {"fast": sorted(names, key=lambda n: -f[n]), "full": sorted(names, key=lambda n: -g[n]),
                    "values": {n: {"fast": f[n], "full": g[n]} for n in names}, "discordant": bad,
                    "agree": not bad and len(names) >= 2}
    out["agree"] = out["utility"]["agree"] and out["eia_max"]["agree"]
    return out


def check_ranking(out: Path, base: dict[str, Any], *, seeds: int = 1, runner: Runner = default_runner,
                  points: Sequence[Point] = CHECK_POINTS, schedules: dict[str, Schedule] | None = None,
                  on_event: Callable[[str, Point, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run ``points`` under the ``fast`` and ``full`` schedules (``<out>/fast``, ``<out>/full``), compare rankings.

    Writes ``ranking_check.json`` and ``ranking_check.md`` in ``out``; returns
    :func:`compare_rankings`'s result with the seeds and points. ``schedules`` replaces
    :data:`SCHEDULES` (keys ``fast`` and ``full``).
    """
    rows = {}
    for name in ("fast", "full"):
        s = (schedules or SCHEDULES)[name]
        rows[name] = sweep(points, {**s.sets, **base}, out / name, runner=runner, attack_options=s.attacks,
                           seeds=seeds, about=f"Schedule {name}: {s.about}.", on_event=on_event)
    result = {"seeds": seeds, "points": [p.name for p in points], **compare_rankings(rows["fast"], rows["full"])}
    out.mkdir(parents=True, exist_ok=True)
    (out / "ranking_check.json").write_text(json.dumps(result, indent=2))
    lines = [f"# Does `fast` rank the check points as `full` does? {'yes' if result['agree'] else 'NO'}", "",
             f"{seeds} seed(s) per point; utility = mean over seeds; eia_max = the largest token top-1 rate.", ""]
    for key in ("utility", "eia_max"):
        r = result[key]
        lines += [f"## {key}: {'agree' if r['agree'] else 'disagree'}", "", "| point | fast | full |", "|---|---|---|"]
        lines += [f"| {n} | {v['fast']:.4f} | {v['full']:.4f} |" for n, v in r["values"].items()]
        lines += ["", f"fast: {' > '.join(r['fast'])}; full: {' > '.join(r['full'])}"
                  + (f"; discordant pairs: {r['discordant']}" if r["discordant"] else ""), ""]
    (out / "ranking_check.md").write_text("\n".join(lines))
    return result


def main_cli(args: Any, console: Any) -> int:
    """``guardedtuning trilemma``: progress with Rich, a summary line per point."""
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from guardedtuning.config import parse_set

    sched = schedule(args.schedule)
    if args.seeds < 1:
        raise ConfigError(f"--seeds {args.seeds} is below 1; pass --seeds 3 for a mean with its spread")
    points = [parse_point(p) for p in args.points] or (list(CHECK_POINTS) if args.check_ranking else default_points())
    base = parse_set(args.sets)
    out = Path(args.out).resolve()
    names = SCHEDULES if args.check_ranking else {sched.name: sched}
    for s in names.values():  # every point's config must build before anything runs
        for p in points:
            point_config(p, {**s.sets, **base}, base_seed(base), out / p.name)
    total = len(points) * (len(names))
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("{task.fields[info]}"), console=console)
    task = progress.add_task("trilemma", total=total, info="")

    def on_event(kind: str, point: Point, data: dict[str, Any]) -> None:
        if kind == "done":
            progress.advance(task)
            attacks = "  ".join(f"{a} {data[a]:.3f}" for a in ("eia_max", *ATTACK_COLUMNS) if data.get(a) is not None)
            u = data["utility"]
            spread = f" ({data['utility_min']:.4f}-{data['utility_max']:.4f}, {data['seeds']} seeds)" \
                if data["seeds"] > 1 and u is not None else ""
            progress.console.print(f"{escape(point.name)}: utility {u:.4f}{spread}  {attacks}" if u is not None
                                   else f"{escape(point.name)}: no utility ({escape(str(data.get('skipped')))})", highlight=False,
                                   soft_wrap=True)
        elif kind == "log":
            progress.update(task, info=escape(f"{point.name}: {data['message']}"))
        else:
            what = {"skip": "finished, reused", "run": "run"}.get(kind, kind)
            seed = f" seed {data['seed']}" if "seed" in data else ""
            progress.update(task, info=escape(f"{point.name}{seed}: {what}"))

    runner_name = getattr(args, "runner", "inprocess")
    runner = RUNNERS[runner_name]
    with progress:
        if args.check_ranking:
            result = check_ranking(out, base, seeds=args.seeds, runner=runner, points=points, on_event=on_event)
        else:
            sweep(points, {**sched.sets, **base}, out, runner=runner, attack_options=sched.attacks, seeds=args.seeds,
                  about=f"Schedule {sched.name}: {sched.about}. Runner: {runner_name}.", on_event=on_event,
                  default_base=sched.sets)
    if args.check_ranking:
        console.print(f"fast ranks the check points as full: utility {result['utility']['agree']}, eia_max "
                      f"{result['eia_max']['agree']}; {out / 'ranking_check.md'}", highlight=False, soft_wrap=True)
        return 0 if result["agree"] else 1
    console.print(f"table: {out / 'trilemma.md'}  csv: {out / 'trilemma.csv'}  plots: "
                  f"{out / 'utility_vs_asr.png'}, {out / 'utility_vs_bytes.png'}", highlight=False, soft_wrap=True)
    return 0
