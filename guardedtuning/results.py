"""The results record (``results.json``), the progress events, checkpoints and the plot.

``<out>/events.jsonl`` gets one JSON line per event (``start``, ``step``, ``round``,
``done``, ``error``) as it happens, so ``guardedtuning run`` can draw progress while the
ServerApp runs in another process. ``<out>/results.json`` follows the contract in
DESIGN.md: ``null`` where a figure does not apply, never a made-up number.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from guardedtuning import recipes
from guardedtuning.config import RunConfig
from guardedtuning.models.checkpoint import (
    CHECKPOINT_FILE,
    CHECKPOINT_FORMAT,
    LEGACY_CHECKPOINT,
    encode_tree,
    read_checkpoint,
    read_legacy,
)
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


LEDGER_FILE = "privacy-ledger.json"
_DP_FIGURES = {  # key: (type, smallest, largest) a client's report may carry
    "dp_noise_multiplier": (float, 0.0, float("inf")), "dp_sample_rate": (float, 0.0, 1.0),
    "dp_delta": (float, 0.0, 1.0), "dp_epsilon": (float, 0.0, float("inf")),
    "dp_epsilon_model": (float, 0.0, float("inf")), "dp_steps": (int, 0, 2**62),
    "dp_max_participations": (int, 0, 2**62), "dp_participations": (int, 0, 2**62),
    "dp_membership_visible": (int, 0, 1), "dp_rows_at_cap": (int, 0, 2**62),
}
_DP_REQUIRED = ("dp_noise_multiplier", "dp_sample_rate", "dp_delta", "dp_epsilon", "dp_steps")


def _malformed_dp_report(report: dict[str, Any]) -> str | None:
    """Why a client's DP report cannot be used (None if it can): a missing, non-numeric or out-of-range figure."""
    for key in _DP_REQUIRED:
        if key not in report:
            return f"{key} is missing"
    for key, (kind, low, high) in _DP_FIGURES.items():
        if key not in report:
            continue
        value = report[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{key} is {type(value).__name__}, expected a number"
        if kind is int and value != int(value):
            return f"{key} is {value!r}, expected an integer"
        if not low <= value <= high:  # NaN fails too
            return f"{key} is {value!r}, expected a number in [{low}, {high}]"
    return None


@dataclass
class NodeLedger:
    """What the server requested of one node under DP-SGD, and what the node last reported."""

    rounds: list[int] = field(default_factory=list)  # rounds it was sent a training message in
    requested_steps: int = 0  # DP-SGD steps the server's messages asked of it
    replied_steps: int = 0  # of those, the ones whose message got a reply
    report: dict[str, Any] = field(default_factory=dict)  # its last privacy report (``dp_*`` figures)


@dataclass
class PrivacyLedger:
    """The server's own record of each node's DP-SGD participation (issue 12, finding 4).

    The clients' accountants live in their state, which a client can lose; the server
    counts, per node, the rounds and DP-SGD steps it requested (a step is charged when the
    message asking for it is sent, before any reply: a lost reply may hide a step taken).
    :meth:`epsilons` is what the record reports for a node: the larger of the node's own
    figures and those the ledger implies (its reported plan applied to the steps the ledger
    counted). The ledger is written to ``privacy-ledger.json`` before every exchange that
    requests DP-SGD steps, so a crash anywhere, also between aggregation and checkpoint,
    leaves the charge of what was sent; a resumed server reloads it and tells each node its
    ledger steps in the round's first message (the client takes the larger count).
    """

    nodes: dict[int, NodeLedger] = field(default_factory=dict)

    def node(self, node: int) -> NodeLedger:
        return self.nodes.setdefault(int(node), NodeLedger())

    def steps(self, node: int) -> int:
        """The DP-SGD steps requested of ``node`` so far (0 for a node it never asked)."""
        entry = self.nodes.get(int(node))
        return entry.requested_steps if entry is not None else 0

    def request(self, node: int, round_: int, steps: int) -> None:
        entry = self.node(node)
        if not entry.rounds or entry.rounds[-1] != round_:
            entry.rounds.append(int(round_))
        entry.requested_steps += int(steps)

    def replied(self, node: int, steps: int) -> None:
        self.node(node).replied_steps += int(steps)

    def note(self, node: int, report: dict[str, Any]) -> str | None:
        """Keep a node's privacy report (its DP plan and accountant's figures); the reason if it is ignored.

        A report without a DP plan is not kept; a malformed one (a DP figure that is not a
        finite number in range) is ignored, and the node keeps its last good report: the
        steps the ledger counted stay charged either way.
        """
        if "dp_noise_multiplier" not in report:
            return None
        bad = _malformed_dp_report(report)
        if bad is None:
            self.node(node).report = {k: v for k, v in report.items() if k.startswith("dp_")}
        return bad

    def epsilons(self, node: int) -> tuple[float, float] | None:
        """(epsilon against the server, epsilon of the released model) the record reports for ``node``.

        Each is max(the node's own figure, the ledger's): the steps the ledger counted beyond
        those the node reported are charged with the node's reported plan, to every row up to
        the cap where the server sees membership (the server cannot tell which rows they
        used), else as Poisson steps. None for a node that never reported a DP plan.
        """
        from guardedtuning.privacy.dpsgd import amplified_epsilon, capped_epsilon, gaussian_epsilon

        entry = self.nodes.get(int(node))
        if entry is None or not entry.report:
            return None
        r = entry.report
        sigma, q, delta = float(r["dp_noise_multiplier"]), float(r["dp_sample_rate"]), float(r["dp_delta"])
        own_steps = int(r.get("dp_steps", 0))
        steps = max(own_steps, entry.requested_steps)
        missing = steps - own_steps
        own = float(r.get("dp_epsilon", 0.0)), float(r.get("dp_epsilon_model", r.get("dp_epsilon", 0.0)))
        if missing == 0:  # the node counted every step the ledger holds: its own accountant's figures
            return own
        model = max(own[1], amplified_epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta))
        if int(r.get("dp_membership_visible", 0)):
            cap = int(r.get("dp_max_participations", 0))
            # as the client's own figure: the cap bounds the model too, whichever rows were drawn
            model = max(own[1], min(model, capped_epsilon(noise_multiplier=sigma, delta=delta, steps=steps, cap=cap)))
            k = int(r.get("dp_participations", 0)) + missing
            ledger = gaussian_epsilon(noise_multiplier=sigma, participations=min(k, cap) if cap else k, delta=delta)
        else:
            ledger = amplified_epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta)
        return max(own[0], ledger), model

    def worst(self) -> tuple[float | None, float | None]:
        """The largest (epsilon against the server, epsilon of the model) over the nodes (None: no report)."""
        figures = [e for e in (self.epsilons(n) for n in self.nodes) if e is not None]
        if not figures:
            return None, None
        return max(e for e, _ in figures), max(m for _, m in figures)

    def to_json(self) -> dict[str, Any]:
        return {str(n): dict(e.__dict__) for n, e in self.nodes.items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PrivacyLedger:
        return cls({int(n): NodeLedger(**e) for n, e in data.items()})


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
        self.privacy_ledger = PrivacyLedger()
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
                  epsilon: float | None, bytes_up: int, bytes_down: int, extra: dict[str, Any],
                  epsilon_model: float | None = None) -> None:
        """One round's row: ``epsilon`` is DP-SGD's against the server so far, ``epsilon_model`` the model's."""
        row = {"round": round_, "utility": utility, "train_loss": train_loss, "epsilon": epsilon,
               "epsilon_model": epsilon_model,
               "bytes_up": bytes_up, "bytes_down": bytes_down, "wall_s": round(self.wall_s, 3), **extra}
        self.history.append(row)
        self.event("round", **row)

    # -- checkpoints ----------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out / CHECKPOINT_FILE

    @property
    def ledger_path(self) -> Path:
        return self.out / LEDGER_FILE

    def save_privacy_ledger(self) -> None:
        """Write the privacy ledger now (atomically), with the config's digest."""
        payload = {"digest": config_digest(self.cfg), "nodes": self.privacy_ledger.to_json()}
        tmp = self.ledger_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload))
        os.replace(tmp, self.ledger_path)

    def load_privacy_ledger(self) -> None:
        """Reload the ledger of an earlier attempt of this run (``output.resume``), else start a new one.

        Also without a checkpoint: an attempt that crashed in round 1 still charged what it sent.

        Raises
        ------
        ConfigError
            The ledger holds charges of another config (its digest differs): resuming with
            a new plan on the same ``output.dir`` would start an empty ledger, and the
            earlier attempt's releases of the same clients' data would go uncounted.
        """
        self.privacy_ledger = PrivacyLedger()
        if not self.ledger_path.is_file():
            return
        if not self.cfg.output.resume:
            self._keep_earlier_ledger()
            return
        payload = json.loads(self.ledger_path.read_text())
        digest, ours = payload.get("digest"), config_digest(self.cfg)
        if digest == ours:
            self.privacy_ledger = PrivacyLedger.from_json(payload["nodes"])
        elif payload.get("nodes"):
            from guardedtuning.errors import ConfigError

            earlier = PrivacyLedger.from_json(payload["nodes"])
            worst = earlier.worst()[0]
            raise ConfigError(
                f"output.resume: {self.ledger_path} holds the DP-SGD charges of another config (digest {digest}; "
                f"this config's digest is {ours}): a changed plan cannot resume it (its ledger would start "
                f"empty and the earlier releases would go uncounted; worst node's epsilon so far: "
                f"{'unknown' if worst is None else f'{worst:.3f}'}). Run the new plan with a new output.dir "
                "(--out); the epsilons of runs on the same clients' data add up")

    def _keep_earlier_ledger(self) -> None:
        """A run that does not resume (``output.resume=false``) on a folder with a charged ledger
        keeps that ledger as ``privacy-ledger.earlier-<time>.json``: its charges are spent on the same
        clients' data and add up with the new run's, so they are not overwritten."""
        try:
            charged = bool(json.loads(self.ledger_path.read_text()).get("nodes"))
        except (OSError, ValueError, AttributeError):
            charged = True  # unreadable: keep it too, it may be the only record
        if charged:
            kept = self.ledger_path.with_name(f"privacy-ledger.earlier-{time.strftime('%Y%m%dT%H%M%S')}"
                                              f"-{os.getpid()}.json")
            os.replace(self.ledger_path, kept)
            logging.getLogger("guardedtuning").warning(
                "output.resume=false: the earlier run's privacy ledger in %s is kept as %s (its epsilons add up "
                "with this run's on the same clients' data)", self.out, kept.name)

    def save_adapter(self, model: torch.nn.Module) -> None:
        """Write the global adapters as a PEFT folder ``<out>/adapter`` (:mod:`guardedtuning.models.export`).

        A run whose state has no PEFT form writes none; the reason goes into the record's
        ``adapter`` block (and the log, once).
        """
        from guardedtuning.models.export import ADAPTER_DIR, NotExportable, write_adapter

        info = {"recipe": self.cfg.recipe, "round": self.history[-1]["round"] if self.history else 0,
                "config_digest": config_digest(self.cfg)}
        try:
            self.extra["adapter"] = write_adapter(model, model_cfg=self.cfg.model, lora=self.cfg.lora,
                                                  seed=self.cfg.seed, dest=self.out / ADAPTER_DIR, info=info)
        except NotExportable as exc:
            self.no_adapter(str(exc))

    def no_adapter(self, reason: str) -> None:
        """Record that this run writes no adapter folder, and why (logged once)."""
        from guardedtuning.models.export import not_written

        if (self.extra.get("adapter") or {}).get("not_held") != reason:
            logging.getLogger("guardedtuning").warning("no adapter folder is written: %s", reason)
        self.extra["adapter"] = not_written(reason)

    def save_checkpoint(self, round_: int, state: dict[str, Any]) -> None:
        """Write ``checkpoint.json`` (everything but tensors) and the tensors it names (safetensors).

        The tensors go to ``checkpoint-r<round>.safetensors`` first, then the JSON replaces the
        previous one atomically, then older tensor files go: a crash at any point leaves a JSON
        whose tensor file exists.
        """
        from safetensors.torch import save_file

        self.save_privacy_ledger()
        tensors: dict[str, torch.Tensor] = {}
        tree = encode_tree(state, tensors, "state")
        name = f"checkpoint-r{round_:05d}.safetensors"
        tmp = self.out / (name + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": CHECKPOINT_FORMAT, "round": str(round_)})
        os.replace(tmp, self.out / name)
        payload = {"format": CHECKPOINT_FORMAT, "round": round_, "digest": config_digest(self.cfg),
                   "tensors": name, "history": self.history, "ledger": self.ledger.to_json(),
                   "privacy_ledger": self.privacy_ledger.to_json(), "wall_s": self.wall_s,
                   "adapter": self.extra.get("adapter"), "state": tree}
        tmp_json = self.checkpoint_path.with_suffix(".tmp")
        tmp_json.write_text(json.dumps(payload))
        os.replace(tmp_json, self.checkpoint_path)
        for old in self.out.glob("checkpoint-r*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)
        (self.out / LEGACY_CHECKPOINT).unlink(missing_ok=True)  # a v1 checkpoint this run resumed from

    def load_checkpoint(self) -> tuple[int, dict[str, Any]] | None:
        """``(last finished round, state)`` if resuming applies, else None.

        Reads ``checkpoint.json`` and its tensor file; a ``checkpoint.pt`` of an earlier
        version (a pickle) resumes too when it holds only tensors, numbers, text and
        containers (``torch.load(weights_only=True)``), else it is refused with the fix.
        """
        if not self.cfg.output.resume:
            return None
        if self.checkpoint_path.is_file():
            payload = read_checkpoint(self.out)
        elif (self.out / LEGACY_CHECKPOINT).is_file():
            payload = read_legacy(self.out / LEGACY_CHECKPOINT)
        else:
            return None
        if payload.get("digest") != config_digest(self.cfg):
            from guardedtuning.errors import ConfigError

            raise ConfigError(
                f"{self.checkpoint_path} was written by a run with another config; pass "
                "--out to a new folder or --set output.resume=false to start over"
            )
        self.history = payload["history"]
        self.ledger = CostLedger.from_json(payload["ledger"])
        self.wall_before = float(payload["wall_s"])
        if payload.get("adapter") is not None:
            self.extra["adapter"] = payload["adapter"]
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
            **self.data_block(),
            **self.extra,
            **(extra or {}),
        }
        (self.out / "results.json").write_text(json.dumps(record, indent=2))
        self.plot(metric)
        self.event("done", utility=utility, metric=metric)
        return record

    def data_block(self) -> dict[str, Any]:
        """``{"data": ...}`` for instruction rows (template, bad rows skipped; data.sources.data_record), else {}."""
        from guardedtuning.data.sources import data_record

        c = self.cfg
        data = data_record(c.data, model=c.model.name, max_length=c.model.max_length, seed=c.seed)
        return {"data": data} if data else {}

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
        dp_eps, dp_model = self.privacy_ledger.worst()
        if dp_eps is None and epsilons:
            dp_eps = max(epsilons)
        if dp_model is None:
            models = [r["epsilon_model"] for r in self.history if r.get("epsilon_model") is not None]
            dp_model = max(models) if models else None
        epsilon = dp_eps if dp_eps is not None else (rep.get("epsilon") if p.mechanism != "none" else None)
        delta = dp.delta if dp.enabled else (p.delta if p.mechanism == "gaussian" else None)
        return {
            "epsilon": epsilon, "delta": delta,
            "eta": p.eta if p.mechanism in ("dchi", "privtune") else None,
            "mechanism": {"name": p.mechanism,
                          **{k: v for k, v in rep.items() if not k.startswith("dp_") and k != "mechanism"},
                          "scope": "per released token vector, per release; " + self.recipe.release_scope}
            if p.mechanism != "none" else {"name": "none"},
            "dp": self.dp_record(dp_eps, dp_model) if dp.enabled else {"enabled": False},
            "attacks": {},
        }

    def dp_record(self, epsilon: float | None, epsilon_model: float | None) -> dict[str, Any]:
        """The record's ``privacy.dp`` block: both epsilons with their scopes, the plan, each node's figures.

        ``epsilon`` is against the server; ``epsilon_model`` against third parties who see
        the released model. Both are the worst node's max(own accountant, server's ledger).
        """
        dp, rep = self.cfg.dp, self.privacy_reports
        visible = bool(rep.get("dp_membership_visible", 0))
        per_node = {}
        for node, entry in sorted(self.privacy_ledger.nodes.items()):
            figures = self.privacy_ledger.epsilons(node)
            per_node[str(node)] = {
                "epsilon": figures[0] if figures else None, "epsilon_model": figures[1] if figures else None,
                "rounds": entry.rounds, "requested_steps": entry.requested_steps,
                "reported_steps": entry.report.get("dp_steps"), "participations": entry.report.get("dp_participations"),
                "own_epsilon": entry.report.get("dp_epsilon"),
            }
        covers = self.recipe.dp_scope or "the client's updates (add/remove one of its examples)"
        if visible:
            against = ("epsilon is against the server: it sees which rows each DP-SGD step used, so no "
                       "amplification by sampling; each participation is a Gaussian mechanism of sensitivity "
                       "dp.max-grad-norm, composed over the worst example's actual participations (at most "
                       f"dp.max-participations = {rep.get('dp_max_participations')}), per client; the larger of "
                       "the client's accountant and the server's ledger")
        else:
            against = ("epsilon holds against the server too: only an update leaves the client, so which rows a "
                       "step used stays hidden and amplification by Poisson sampling holds, per client; the larger "
                       "of the client's accountant and the server's ledger")
        scope = f"{covers}; {against}"
        model_scope = ("of the released model (the aggregated adapters) against third parties who see only it, per "
                       "client, add/remove one of its examples, with amplification by Poisson sampling over the "
                       "steps taken" + ("; at most min(dp.max-participations, steps) full Gaussian mechanisms "
                                        "(the cap bounds every row, whichever rows were drawn)" if visible else ""))
        return {"enabled": True, "epsilon": epsilon, "scope": scope, "epsilon_model": epsilon_model,
                "epsilon_model_scope": model_scope,
                "target_epsilon": dp.target_epsilon, "delta": dp.delta, "max_grad_norm": dp.max_grad_norm,
                "accountant": dp.accountant,
                **{k[3:]: v for k, v in rep.items() if k.startswith("dp_") and k not in ("dp_epsilon", "dp_epsilon_model")},
                **self._worst_reported(("dp_steps", "dp_participations", "dp_rows_at_cap")),
                "per_node": per_node}

    def _worst_reported(self, keys: tuple[str, ...]) -> dict[str, Any]:
        """The largest of each ``dp_*`` figure over the nodes' last reports (``dp_`` dropped), where any reported it."""
        out: dict[str, Any] = {}
        for key in keys:
            values = [e.report[key] for e in self.privacy_ledger.nodes.values() if key in e.report]
            if values:
                out[key[3:]] = max(values)
        return out

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
