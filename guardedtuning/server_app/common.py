"""What every server-side driver shares: device, evaluation, round bookkeeping."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from guardedtuning.config import RunConfig
from guardedtuning.data.sources import TaskData, load_task
from guardedtuning.errors import ClientsFailed, ConfigError, MessageError
from guardedtuning.evaluation import evaluate
from guardedtuning.models.loading import load_tokenizer
from guardedtuning.models.parts import SplitModel
from guardedtuning.results import Recorder
from guardedtuning.strategies.fedavg import AdapterFedAvg
from guardedtuning.strategies.secure import SecureAggregation
from guardedtuning.wire.exchange import Exchange
from guardedtuning.wire.records import dense_nbytes, metric_value

log = logging.getLogger("guardedtuning")
SETTLE_S = 10.0  # seconds the number of connected clients must stay put before a run starts with fewer


def make_strategy(cfg: RunConfig, message_type: str) -> Strategy:
    """The aggregation seam: weighted FedAvg, or the same under the secure-aggregation wrapper.

    Secure aggregation composes as in Flower (a strategy wrapper plus a client mod): the
    ClientApp must install :data:`~guardedtuning.strategies.secagg.mod.secagg_mod`.
    """
    a = cfg.aggregation
    n = cfg.federation.clients_per_round
    fedavg = AdapterFedAvg(clients_per_round=n, seed=cfg.seed, message_type=message_type, max_weight=a.max_weight)
    if not a.secure:
        return fedavg
    from guardedtuning.strategies.secure import check_settings

    # degree, threshold and quorum the clients would refuse (or no round could meet) fail here, by key
    check_settings(n=n, degree=a.degree, threshold=a.threshold, security_bits=a.security_bits, collusion=a.collusion)
    try:
        return SecureAggregation(
            fedavg, num_sampled_clients=n, seed=cfg.seed, density=a.density, bits=a.bits, clip=a.clip,
            support=a.support, explore=a.explore, scope=a.scope, dense_rest=a.dense_rest, degree=a.degree, threshold=a.threshold,
            max_weight=a.max_weight,
            norm_clip=a.norm_clip, packing=a.packing, downlink_bits=a.downlink_bits, timeout=cfg.comm.timeout,
            poll=cfg.comm.poll_interval, security_bits=a.security_bits, collusion=a.collusion,
        )
    except ValueError as exc:  # e.g. the field would need more than 64 bits
        raise ConfigError(f"aggregation.* settings do not fit together: {exc}; lower aggregation.bits, "
                          "aggregation.max-weight or federation.clients-per-round") from exc


NUMERIC_PRIVACY = ("eta_min", "eta_max", "dp_epsilon", "dp_noise_multiplier", "dp_steps")


def _malformed_privacy(rec: Any) -> str | None:
    """Why a reply's ``privacy`` record cannot be merged (None when it can): a ConfigRecord of text and
    numbers, the numeric keys (:data:`NUMERIC_PRIVACY`) finite numbers."""
    if not isinstance(rec, ConfigRecord):
        return f"a {type(rec).__name__}, expected a ConfigRecord"
    for key, value in rec.items():
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if key in NUMERIC_PRIVACY and not (number and math.isfinite(value)):
            return f"{key!r} is {value!r:.40}, expected a finite number"
        if not (number or isinstance(value, str)):
            return f"{key!r} is {value!r:.40}, expected text or a number"
    return None


def server_device(cfg: RunConfig) -> torch.device:
    """Where the server's top runs: ``sim.server-device``, or the first GPU Ray does not use."""
    dev = cfg.sim.server_device
    if dev == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        given = cfg.sim.ray_num_gpus  # Ray hands clients the first `given` GPUs
        return torch.device(f"cuda:{given}" if 0 <= given < torch.cuda.device_count() else "cuda:0")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"`sim.server-device` is {dev!r} but this machine has no CUDA GPU; use auto or cpu")
    if dev.startswith("cuda:") and int(dev[5:]) >= torch.cuda.device_count():
        raise ConfigError(f"`sim.server-device` is {dev!r} but this machine has {torch.cuda.device_count()} "
                          "GPU(s); use auto or a smaller index")
    return torch.device(dev)


@dataclass
class ServerRun:
    """A run's config, recorder, task and device, handed to each recipe's driver."""

    cfg: RunConfig
    rec: Recorder
    task: TaskData
    device: torch.device
    per_round: int = 0  # clients a round samples, once they are connected (0: not yet known)

    @classmethod
    def create(cls, cfg: RunConfig, rec: Recorder) -> ServerRun:
        return cls(cfg, rec, load_task(cfg.data, cfg.seed), server_device(cfg))

    def note_privacy(self, replies: dict[int, Message]) -> float | None:
        """Merge what clients report of their privacy (mechanism, DP accountant); the round's epsilon.

        The round's epsilon is the largest of the reporting clients' DP-SGD epsilons (each
        client has its own accountant); None when no client runs DP-SGD.
        """
        merged = self.rec.privacy_reports
        epsilons = []
        for node, msg in replies.items():
            rec = msg.content.get("privacy")
            if rec is None:
                continue
            bad = _malformed_privacy(rec)
            if bad:  # a client's claim only; a malformed one must not stop the run or reach results.json
                log.warning("node %s: its privacy report is ignored: %s", node, bad)
                continue
            for key, value in rec.items():
                if key in ("eta_min",):
                    merged[key] = min(value, merged.get(key, value))
                elif key in ("eta_max", "dp_epsilon", "dp_noise_multiplier", "dp_steps"):
                    merged[key] = max(value, merged.get(key, value))
                else:
                    merged.setdefault(key, value)
            if "dp_epsilon" in rec:
                epsilons.append(float(rec["dp_epsilon"]))
        return max(epsilons) if epsilons else None

    def seed_round(self, round_: int) -> None:
        """Seed this round's random draws (dropout), so a resumed run repeats them exactly."""
        torch.manual_seed(self.cfg.seed * 1_000_003 + round_)

    def evaluate(self, model: SplitModel) -> dict[str, float]:
        t0 = time.perf_counter()
        out = evaluate(model, load_tokenizer(self.cfg.model.name), self.task,
                       max_length=self.cfg.model.max_length, batch_size=self.cfg.eval.batch_size,
                       max_new_tokens=self.cfg.eval.max_new_tokens, device=self.device)
        self.rec.ledger.server_s += time.perf_counter() - t0
        return out

    def account(self, ex: Exchange) -> float:
        """Add an exchange's bytes and client compute to the ledger; return its overhead.

        The overhead is the part of the exchange's wall time during which no client
        handler ran (see :meth:`Exchange.overhead_s`).
        """
        led = self.rec.ledger
        led.bytes_down += sum(ex.bytes_down.values())
        led.bytes_up += sum(ex.bytes_up.values())
        intervals = []
        for node, msg in ex.ok().items():
            rec = msg.content.get("metrics")
            if rec is None:
                continue
            try:
                source = f"reply of node {node}"
                led.client_compute_s += metric_value(rec, "compute_s", source=source)
                led.client_peak_mem_mb = max(led.client_peak_mem_mb, metric_value(rec, "peak_mem_mb", source=source))
                if "state_bytes" in rec:
                    led.client_state_bytes = max(led.client_state_bytes, metric_value(rec, "state_bytes", source=source))
                if "gpu_peak_mem_mb" in rec:
                    led.client_gpu_peak_mem_mb = max(led.client_gpu_peak_mem_mb,
                                                     metric_value(rec, "gpu_peak_mem_mb", source=source))
                intervals.append((metric_value(rec, "t_start", source=source), metric_value(rec, "t_end", source=source)))
            except MessageError:
                continue  # a malformed reply is rejected where its payload is checked
        return ex.overhead_s(intervals)

    def count_update_bytes(self, replies: dict[int, Message]) -> None:
        for msg in replies.values():
            upd = msg.content.get("update")
            if upd is not None:
                self.rec.ledger.dense_bytes += dense_nbytes(upd)

    def drop(self, node: int | None, reason: str, round_: int) -> None:
        """Count, log and report one client leaving the round (or one rejected reply)."""
        self.rec.ledger.rejected += 1
        log.warning("round %d: node %s dropped from the round: %s", round_, node, reason)
        self.rec.event("dropped", round=round_, node=node, reason=reason)

    def aggregate(self, strategy: Strategy, round_: int, ex: Exchange, *, since: int = 0) -> ArrayRecord | None:
        """The strategy's aggregate of a round's final replies (the new global arrays); failures are dropped first.

        ``since``: how many of the strategy's ``rejections`` were there before the round was
        configured (its key stages may reject clients too).
        """
        for node, reason in ex.failures().items():
            self.drop(node, reason, round_)
        ok = ex.ok()
        self.count_update_bytes(ok)
        new, metrics = strategy.aggregate_train(round_, ok.values())
        self._settle(strategy, round_, since, metrics)
        return new

    def unaggregated(self, strategy: Strategy, round_: int, *, since: int = 0) -> None:
        """Account for a round that produced nothing to aggregate (refused, or every client left).

        The secure stages that did run still cost bytes and may have rejected clients; a
        round in which no sampled client could even advertise its keys stops the run with
        the first reason, as a training exchange nobody answered does.
        """
        drain = getattr(strategy, "drain", None)
        metrics = drain(round_) if drain is not None else None
        reasons = self._settle(strategy, round_, since, metrics)
        if metrics is not None and metrics.get("sampled", 0) and not metrics.get("advertised", 0):
            first = reasons[0] if reasons else "no reply to the key stage"
            raise ClientsFailed(f"round {round_}: no client could take part; first reason: {first}")

    def _settle(self, strategy: Strategy, round_: int, since: int, metrics: Any) -> list[str]:
        """Drop the strategy's new rejections and add the secure stages' cost; the rejections."""
        reasons = list(getattr(strategy, "rejections", [])[since:])
        for reason in reasons:
            self.drop(None, reason, round_)
        if metrics is not None and "secagg-bytes-up" in metrics:  # the secure stages' own messages
            led = self.rec.ledger
            led.bytes_up += int(metrics["secagg-bytes-up"])
            led.bytes_down += int(metrics["secagg-bytes-down"])
            led.dense_bytes += int(metrics.get("dense-bytes", 0))
            led.server_s += float(metrics.get("server-s", 0.0))
            if metrics.get("refused"):
                self.rec.event("refused", round=round_, reason="secure aggregation refused the round")
        return reasons

    def wait_for_nodes(self, grid: Grid) -> int:
        """Wait until a round's worth of clients is connected; return how many a round samples.

        When fewer than ``federation.clients-per-round`` connect (e.g. Flower's default local
        federation of 2 SuperNodes), the run goes on with all of them once their number has
        not changed for ``SETTLE_S`` seconds (at least 2 under secure aggregation), with a
        logged warning; with fewer still after ``comm.timeout`` it stops with the reason.
        """
        cfg = self.cfg
        need, least = cfg.federation.clients_per_round, (2 if cfg.aggregation.secure else 1)
        t0 = time.monotonic()
        deadline, settle = t0 + cfg.comm.timeout, min(SETTLE_S, cfg.comm.timeout)
        last, since = -1, t0
        while (n := len(list(grid.get_node_ids()))) < need:
            now = time.monotonic()
            if n != last:
                last, since = n, now
            elif n >= least and now - since >= settle:
                log.warning("only %d clients are connected (their number has not changed for %.0f s) but "
                            "federation.clients-per-round is %d: each round samples all %d; start more SuperNodes "
                            "or lower federation.clients-per-round", n, settle, need, n)
                self.rec.event("warning", message=f"{n} clients connected, federation.clients-per-round is "
                                                  f"{need}: each round samples {n}")
                break
            if now > deadline:
                raise ClientsFailed(f"only {n} clients connected within comm.timeout={cfg.comm.timeout:g}s, "
                                    f"but a round needs at least {least} (federation.clients-per-round is {need}); "
                                    "start more SuperNodes or lower federation.clients-per-round")
            time.sleep(0.2)
        if n != cfg.federation.num_clients:
            log.warning("federation.num-clients is %d but %d clients are connected; the federation's "
                        "num-supernodes decides how the data is partitioned", cfg.federation.num_clients, n)
            self.rec.event("warning", message=f"{n} clients connected, federation.num-clients is "
                                              f"{cfg.federation.num_clients}")
        return min(n, need)
