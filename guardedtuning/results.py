"""The results record (``results.json``), the progress events, checkpoints and the plot.

``<out>/events.jsonl`` gets one JSON line per event (``start``, ``step``, ``round``,
``done``, ``error``) as it happens, so ``guardedtuning run`` can draw progress while the
ServerApp runs in another process. ``<out>/results.json`` follows the contract in
DESIGN.md: ``null`` where a figure does not apply, never a made-up number.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from guardedtuning import recipes
from guardedtuning.config import RunConfig
from guardedtuning.recipes import Recipe
from guardedtuning.resources import gpu_peak_mb, peak_rss_mb

SCHEMA = "guardedtuning.results/v1"


def config_digest(cfg: RunConfig) -> str:
    """Hash of everything that changes what a run computes (not where it writes)."""
    flat = {k: v for k, v in cfg.flat().items() if not k.startswith(("output.", "comm.", "sim."))}
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class CostLedger:
    """Bytes and seconds, summed as they are measured."""

    bytes_up: int = 0
    bytes_down: int = 0
    dense_bytes: int = 0
    client_rounds: int = 0  # (client, round) pairs that took part
    client_compute_s: float = 0.0
    client_peak_mem_mb: float = 0.0
    client_gpu_peak_mem_mb: float = 0.0
    client_state_bytes: float = -1.0  # largest context.state a client reported (-1: none reported)
    server_s: float = 0.0
    step_overhead_s: list[float] = field(default_factory=list)
    step_wall_s: list[float] = field(default_factory=list)
    rejected: int = 0

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CostLedger:
        return cls(**data)


class Recorder:
    """Writes events, history, checkpoints and the final record of one run."""

    def __init__(self, cfg: RunConfig, out_dir: str | Path, *, model: str, dataset: str,
                 recipe: Recipe | None = None) -> None:
        self.cfg = cfg
        self.recipe = recipe or recipes.get(cfg.recipe)
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.model = model
        self.dataset = dataset
        self.history: list[dict[str, Any]] = []
        self.ledger = CostLedger()
        self.t0 = time.perf_counter()
        self.wall_before = 0.0  # wall seconds of earlier attempts (resumed runs)
        self.majority_rate: float | None = None  # utility of always answering the top class
        self.dispatch: str | None = None  # how the simulation engine dispatched messages
        self.privacy_reports: dict[str, Any] = {}  # merged privacy descriptions from the clients
        self.extra: dict[str, Any] = {}  # recipe-specific blocks of the record (e.g. ``offsite``)
        self.utility_extra: dict[str, Any] = {}  # recipe-specific utility figures (e.g. offsite's plug-in gap)

    # -- events ---------------------------------------------------------------------
    def event(self, kind: str, **data: Any) -> None:
        line = json.dumps({"event": kind, "time": time.time(), **data})
        with (self.out / "events.jsonl").open("a") as fh:
            fh.write(line + "\n")

    @property
    def wall_s(self) -> float:
        return self.wall_before + time.perf_counter() - self.t0

    # -- history --------------------------------------------------------------------
    def add_round(self, round_: int, *, utility: float | None, train_loss: float | None,
                  epsilon: float | None, bytes_up: int, bytes_down: int, extra: dict[str, Any]) -> None:
        row = {"round": round_, "utility": utility, "train_loss": train_loss, "epsilon": epsilon,
               "bytes_up": bytes_up, "bytes_down": bytes_down, "wall_s": round(self.wall_s, 3), **extra}
        self.history.append(row)
        self.event("round", **row)

    # -- checkpoints ----------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def save_checkpoint(self, round_: int, state: dict[str, Any]) -> None:
        payload = {"round": round_, "digest": config_digest(self.cfg), "history": self.history,
                   "ledger": self.ledger.to_json(), "wall_s": self.wall_s, "state": state}
        tmp = self.checkpoint_path.with_suffix(".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, self.checkpoint_path)

    def load_checkpoint(self) -> tuple[int, dict[str, Any]] | None:
        """``(last finished round, state)`` if resuming applies, else None."""
        if not (self.cfg.output.resume and self.checkpoint_path.is_file()):
            return None
        payload = torch.load(self.checkpoint_path, weights_only=False)
        if payload.get("digest") != config_digest(self.cfg):
            from guardedtuning.errors import ConfigError

            raise ConfigError(
                f"{self.checkpoint_path} was written by a run with another config; pass "
                "--out to a new folder or --set output.resume=false to start over"
            )
        self.history = payload["history"]
        self.ledger = CostLedger.from_json(payload["ledger"])
        self.wall_before = float(payload["wall_s"])
        self.event("resume", round=payload["round"])
        return int(payload["round"]), payload["state"]

    # -- the record -----------------------------------------------------------------
    def finish(self, *, metric: str, utility: float | None, privacy: dict[str, Any] | None = None,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
        led = self.ledger
        per = max(1, led.client_rounds)
        cost = {
            "bytes_up_per_client_round": led.bytes_up / per if led.client_rounds else None,
            "bytes_down_per_client_round": led.bytes_down / per if led.client_rounds else None,
            "dense_bytes_per_client_round": led.dense_bytes / per if led.client_rounds else None,
            "client_peak_mem_mb": led.client_peak_mem_mb or None,
            "client_gpu_peak_mem_mb": led.client_gpu_peak_mem_mb or None,
            "client_state_bytes_max": int(led.client_state_bytes) if led.client_state_bytes >= 0 else None,
            "server_peak_mem_mb": round(peak_rss_mb(), 1),
            "server_gpu_peak_mem_mb": gpu_peak_mb(),
            "client_train_s": led.client_compute_s / per if led.client_rounds else None,
            "server_s": round(led.server_s, 3),
            "wall_s": round(self.wall_s, 3),
            "step_overhead_s_median": statistics.median(led.step_overhead_s) if led.step_overhead_s else None,
            "step_wall_s_median": statistics.median(led.step_wall_s) if led.step_wall_s else None,
            "rejected_replies": led.rejected,
            "dispatch": self.dispatch,
            **self.client_cost(),
        }
        fed = self.cfg.federation
        record = {
            "schema": SCHEMA,
            "recipe": self.cfg.recipe,
            "config": self.cfg.flat(),
            "model": self.model,
            "dataset": self.dataset,
            "num_clients": fed.num_clients if self.recipe.federated else None,
            "clients_per_round": fed.clients_per_round if self.recipe.federated else None,
            "rounds": fed.rounds,
            "history": self.history,
            "utility": {"metric": metric, "value": utility, "majority_rate": self.majority_rate, **self.utility_extra},
            "privacy": privacy or self.privacy_record(),
            "cost": cost,
            **self.extra,
            **(extra or {}),
        }
        (self.out / "results.json").write_text(json.dumps(record, indent=2))
        self.plot(metric)
        self.event("done", utility=utility, metric=metric)
        return record

    def client_cost(self) -> dict[str, Any]:
        """What a recipe costs a client and exposes of the model, comparable across recipes.

        ``model_ip_exposure``: the fraction of the provider's weights a client holds
        (:mod:`guardedtuning.models.exposure`); ``client_s_per_step``: a client's compute for
        a round's training messages (not the secure-aggregation stages) per local step;
        ``bytes_per_round``: everything that crossed the network in a round, up and down, all
        clients together.
        """
        led, rounds = self.ledger, len(self.history)
        steps = led.client_rounds * self.cfg.train.local_steps
        return {
            "model_ip_exposure": self.recipe.exposure(self.cfg),
            "client_s_per_step": led.client_compute_s / steps if steps else None,
            "bytes_per_round": (led.bytes_up + led.bytes_down) / rounds if rounds and led.client_rounds else None,
        }

    def privacy_record(self) -> dict[str, Any]:
        """The record's privacy block, from the config and what clients reported.

        ``epsilon`` is the DP-SGD epsilon of the worst client (None without DP-SGD), or the
        per-token epsilon of a calibrated token mechanism (Gaussian, Laplace, clipped d_chi)
        when no DP-SGD runs; ``eta`` is the d_chi parameter (None for other mechanisms).
        """
        p, dp, rep = self.cfg.privacy, self.cfg.dp, self.privacy_reports
        epsilons = [r["epsilon"] for r in self.history if r.get("epsilon") is not None]
        epsilon = max(epsilons) if epsilons else (rep.get("epsilon") if p.mechanism != "none" else None)
        delta = dp.delta if dp.enabled else (p.delta if p.mechanism == "gaussian" else None)
        return {
            "epsilon": epsilon, "delta": delta,
            "eta": p.eta if p.mechanism in ("dchi", "privtune") else None,
            "mechanism": {"name": p.mechanism,
                          **{k: v for k, v in rep.items() if not k.startswith("dp_") and k != "mechanism"},
                          "scope": "per released token vector, per release; " + self.recipe.release_scope}
            if p.mechanism != "none" else {"name": "none"},
            "dp": ({"enabled": True, "scope": self.recipe.dp_scope,
                    "target_epsilon": dp.target_epsilon, "delta": dp.delta,
                    "max_grad_norm": dp.max_grad_norm, "accountant": dp.accountant,
                    **{k[3:]: v for k, v in rep.items() if k.startswith("dp_")}} if dp.enabled else {"enabled": False}),
            "attacks": {},
        }

    def plot(self, metric: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        rows = [r for r in self.history if r.get("utility") is not None]
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot([r["round"] for r in rows], [r["utility"] for r in rows], marker="o")
        if self.majority_rate is not None:
            ax.axhline(self.majority_rate, linestyle="--", color="grey", label="majority class")
            ax.legend()
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.set_ylabel(metric)
        ax.set_title(f"{self.cfg.recipe} · {self.model} · {self.dataset}")
        fig.tight_layout()
        fig.savefig(self.out / "utility.png", dpi=120)
        plt.close(fig)
