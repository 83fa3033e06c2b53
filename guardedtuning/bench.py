"""``guardedtuning bench clients``: how a recipe's cost grows with the number of clients.

Each point ``TOTAL:PER_ROUND`` is one real run on Flower's simulation engine (the same
path as ``guardedtuning run``) with ``federation.num-clients = TOTAL`` and
``federation.clients-per-round = PER_ROUND``. From its ``results.json`` and
``events.jsonl`` the sweep reads:

- ``round_s``: median wall seconds per round (round 1, which includes start-up, is left
  out when there are later rounds);
- ``step_overhead_ms`` / ``step_wall_ms``: median per-step overhead (the exchange's wall
  time during which no client handler ran) and wall time of a split step;
- ``server_peak_mb``: peak RSS of the ServerApp process (the driver);
- ``client_peak_mb``: the largest peak RSS any client process (Ray actor) reported;
- ``client_state_kb``: the largest ``context.state`` a client held when it sent its
  update (what the simulation keeps per client between its messages and rounds);
- ``bytes_per_round``: bytes up + down per round, all clients together;
- on GPU machines, ``gpu_peak_mb`` (largest memory.used of any GPU) and ``gpu_util``
  (mean utilization over the run's GPUs and samples), sampled with ``nvidia-smi``.

The table goes to ``<out>/bench-clients.csv`` and ``.md``, the plot to
``<out>/bench-clients.png``. Finished points are kept and skipped when the sweep is run
again with the same out folder (delete a point's folder to redo it).
"""

from __future__ import annotations

import csv
import json
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guardedtuning.config import RunConfig
from guardedtuning.errors import ConfigError
from guardedtuning.recipes import config_for

DEFAULT_POINTS = "10:10,100:10,1000:10,1000:100"
# What the sweep sets unless --set says otherwise: a tiny model and short rounds, so the
# 1,000-client point runs on a 2-core CPU; on a GPU pass --set model.name=minilm-l6 etc.
CPU_DEFAULTS: dict[str, Any] = {
    "model.name": "tiny-bert", "model.max-length": 32, "train.local-steps": 3, "train.batch-size": 8,
    "data.test-size": 100,
}
ROWS_PER_CLIENT = 16  # data.train-size is raised to TOTAL x this when smaller
COLUMNS = ("total", "per_round", "rounds", "round_s", "step_overhead_ms", "step_wall_ms", "server_peak_mb",
           "client_peak_mb", "client_state_kb", "bytes_per_round", "gpu_peak_mb", "gpu_util", "utility", "wall_s")


def parse_points(text: str) -> list[tuple[int, int]]:
    """``"10:10,1000:100"`` -> ``[(10, 10), (1000, 100)]``, checked."""
    points = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            total, per = (int(x) for x in part.split(":"))
        except ValueError:
            raise ConfigError(f"--points entry {part!r} is not TOTAL:PER_ROUND (e.g. 1000:100)") from None
        if not 1 <= per <= total:
            raise ConfigError(f"--points entry {part!r}: need 1 <= PER_ROUND <= TOTAL")
        points.append((total, per))
    if not points:
        raise ConfigError("--points is empty; pass e.g. --points 10:10,100:10,1000:100")
    return points


def point_config(recipe: str, total: int, per: int, *, rounds: int, sets: Mapping[str, Any], out: Path) -> RunConfig:
    """The run config of one point: recipe, CPU defaults, the user's --set, then the point."""
    flat: dict[str, Any] = {**CPU_DEFAULTS, **sets}
    base = config_for(recipe, flat)
    if "data.train-size" not in sets and 0 < base.data.train_size < total * ROWS_PER_CLIENT:
        flat["data.train-size"] = total * ROWS_PER_CLIENT
    flat.update({"federation.num-clients": total, "federation.clients-per-round": per, "federation.rounds": rounds,
                 "output.dir": str(out / f"n{total}-k{per}"), "output.resume": False})
    return config_for(recipe, flat)


class GpuSampler:
    """Samples ``nvidia-smi`` every ``interval`` seconds in a thread (no-op without GPUs)."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.exe = shutil.which("nvidia-smi")
        self.samples: list[list[tuple[float, float]]] = []  # per sample: (util %, memory MiB) per GPU
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _query(self) -> list[tuple[float, float]]:
        assert self.exe is not None
        out = subprocess.run([self.exe, "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        return [tuple(float(x) for x in line.split(",")) for line in out.strip().splitlines()]  # type: ignore[misc]

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(self._query())
            except (subprocess.SubprocessError, ValueError, OSError):
                pass
            self._stop.wait(self.interval)

    def __enter__(self) -> GpuSampler:
        if self.exe is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)

    def summary(self) -> dict[str, float | None]:
        if not self.samples:
            return {"gpu_peak_mb": None, "gpu_util": None, "gpu_util_per_gpu": None}
        n = max(len(s) for s in self.samples)
        per_gpu = [statistics.fmean(s[i][0] for s in self.samples if len(s) > i) for i in range(n)]
        return {"gpu_peak_mb": max(m for s in self.samples for _, m in s),
                "gpu_util": statistics.fmean(per_gpu), "gpu_util_per_gpu": [round(u, 1) for u in per_gpu]}


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 2)


def summarize(out: Path, gpu: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The figures of one finished run folder (see the module docstring)."""
    record = json.loads((out / "results.json").read_text())
    stopped = record.get("stopped")
    if stopped:  # fewer rounds than planned: its round time and utility are not the point's
        raise RuntimeError(f"{out / 'results.json'} stopped after round {stopped.get('after_round')} of "
                           f"{record.get('rounds')} ({stopped.get('reason')}): a benchmark point needs every round; "
                           "rerun the sweep with --out <another folder> and a plan its DP budget fits, e.g. --set "
                           "dp.max-participations=<rounds x local steps> (stopped.message says which)")
    cost, hist = record["cost"], record["history"]
    walls = [r["wall_s"] for r in hist]
    per_round = [b - a for a, b in zip([0.0, *walls], walls, strict=False)]
    steady = per_round[1:] if len(per_round) > 1 else per_round
    row = {
        "total": record["num_clients"], "per_round": record["clients_per_round"], "rounds": len(hist),
        "round_s": round(statistics.median(steady), 3) if steady else None,
        "step_overhead_ms": _ms(cost.get("step_overhead_s_median")),
        "step_wall_ms": _ms(cost.get("step_wall_s_median")),
        "server_peak_mb": cost.get("server_peak_mem_mb"),
        "client_peak_mb": cost.get("client_peak_mem_mb"),
        "client_state_kb": None if cost.get("client_state_bytes_max") is None
        else round(cost["client_state_bytes_max"] / 1024, 1),
        "bytes_per_round": round(statistics.fmean(r["bytes_up"] + r["bytes_down"] for r in hist)) if hist else None,
        "utility": record["utility"]["value"], "wall_s": cost.get("wall_s"),
        "server_gpu_peak_mb": cost.get("server_gpu_peak_mem_mb"),
        "client_gpu_peak_mb": cost.get("client_gpu_peak_mem_mb"),
        "gpu_peak_mb": None, "gpu_util": None,
    }
    if gpu:
        row.update(gpu)
    return row


@dataclass
class Sweep:
    recipe: str
    points: list[tuple[int, int]]
    rounds: int
    sets: Mapping[str, Any]
    out: Path

    def configs(self) -> list[RunConfig]:
        return [point_config(self.recipe, t, k, rounds=self.rounds, sets=self.sets, out=self.out)
                for t, k in self.points]

    def run(self, runner: Callable[[RunConfig], int], *, say: Callable[[str], None] = print) -> list[dict[str, Any]]:
        """Run every point not finished yet (``runner(cfg)`` returns an exit code)."""
        self.out.mkdir(parents=True, exist_ok=True)
        rows = []
        for cfg in self.configs():
            folder = Path(cfg.output.dir)
            done = folder / "bench-point.json"
            fed = cfg.federation
            if done.is_file():
                say(f"{fed.num_clients} clients, {fed.clients_per_round} per round: kept from {done}")
                rows.append(json.loads(done.read_text()))
                continue
            if folder.exists():
                shutil.rmtree(folder)  # an interrupted point starts over
            say(f"{fed.num_clients} clients, {fed.clients_per_round} per round, {fed.rounds} rounds ({cfg.model.name})")
            t0 = time.perf_counter()
            with GpuSampler() as gpu:
                rc = runner(cfg)
            if rc != 0 or not (folder / "results.json").is_file():
                raise RuntimeError(f"the run of point {fed.num_clients}:{fed.clients_per_round} failed (exit {rc}); "
                                   f"logs in {folder}")
            row = summarize(folder, gpu.summary())
            row["sweep_s"] = round(time.perf_counter() - t0, 1)
            done.write_text(json.dumps(row))
            rows.append(row)
        self.write(rows)
        return rows

    def write(self, rows: list[dict[str, Any]]) -> None:
        keys = list(COLUMNS) + sorted({k for r in rows for k in r} - set(COLUMNS))
        with (self.out / "bench-clients.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        (self.out / "bench-clients.md").write_text(markdown(rows))
        plot(rows, self.out / "bench-clients.png", title=f"{self.recipe}: cost against clients")


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def markdown(rows: list[dict[str, Any]]) -> str:
    cols = [c for c in COLUMNS if any(r.get(c) is not None for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    labels = [f"{r['total']}:{r['per_round']}" for r in rows]
    x = range(len(rows))
    axes[0].bar(x, [r["round_s"] or 0 for r in rows])
    axes[0].set_ylabel("wall s / round")
    axes[1].bar(x, [r["step_overhead_ms"] or 0 for r in rows])
    axes[1].set_ylabel("step overhead, ms (median)")
    width = 0.4
    axes[2].bar([i - width / 2 for i in x], [r["server_peak_mb"] or 0 for r in rows], width, label="server (driver)")
    axes[2].bar([i + width / 2 for i in x], [r["client_peak_mb"] or 0 for r in rows], width, label="client actor")
    axes[2].set_ylabel("peak RSS, MB")
    axes[2].legend(fontsize=7)
    for ax in axes:
        ax.set_xticks(list(x), labels, fontsize=7)
        ax.set_xlabel("total : per round")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
