"""What every client handler needs: the config, the device, the data, the privacy, the replies.

Every handler of the ClientApp has the same shape: unpack the message (the design's
module under :mod:`guardedtuning.wire`), build the client's :class:`ClientSetup` and
:class:`~guardedtuning.privacy.client.ClientPrivacy` (:func:`client_privacy`), call the
design's plain function (tensors in, tensors out, no Flower), and pack the reply
(:func:`update_reply`, :func:`reply`). State that outlives a message lives in
``context.state``: the privacy state (:func:`save_privacy`) and a design's round state
(:func:`round_state`, :func:`keep_round_state`).
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from guardedtuning.config import RunConfig, build_config
from guardedtuning.data.batches import Batch, Example, batch_indices, collate
from guardedtuning.errors import MessageError
from guardedtuning.models.loading import load_tokenizer
from guardedtuning.privacy.client import STATE_KEYS, ClientPrivacy, client_mechanism, partition_examples
from guardedtuning.resources import gpu_peak_mb, peak_rss_mb
from guardedtuning.wire.records import float32_tensors, get_record, tensors_to_record


@functools.lru_cache(maxsize=4)
def _config(items: tuple[tuple[str, Any], ...]) -> RunConfig:
    return build_config(dict(items))


def run_config(context: Context) -> RunConfig:
    """The run's validated config (built once per process per run config)."""
    return _config(tuple(sorted(context.run_config.items())))


def client_device(cfg: RunConfig) -> torch.device:
    """The GPU Ray assigned to this actor when the client asked for one, else the CPU."""
    if cfg.sim.num_gpus > 0 and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def partition_of(context: Context, cfg: RunConfig) -> tuple[int, int]:
    """(partition id, number of partitions) from the node config."""
    nc = context.node_config
    if "partition-id" in nc and "num-partitions" in nc:
        return int(nc["partition-id"]), int(nc["num-partitions"])
    raise KeyError(
        "node config lacks partition-id/num-partitions; start each SuperNode with "
        "--node-config 'partition-id=I num-partitions=N'"
    )


@dataclass(frozen=True)
class ClientSetup:
    """What a client's handler knows before it reads the message: config, partition, device, rows."""

    cfg: RunConfig
    pid: int
    num_partitions: int
    device: torch.device
    examples: list[Example]
    pad_id: int

    def batch(self, priv: ClientPrivacy, step: int, *, again: bool = False) -> Batch:
        """The batch of global step ``step``, sampled as ``priv`` samples (Poisson under DP-SGD).

        ``again``: the batch released at ``step`` once more (the backward's recomputation).
        """
        return priv.batch(self.examples, step=step, batch_size=self.cfg.train.batch_size,
                          public_seed=self.cfg.seed, pad_id=self.pad_id, again=again)

    def fixed_batch(self, step: int) -> Batch:
        """The fixed-size batch of global step ``step`` (a pure function of the config and the step)."""
        idx = batch_indices(len(self.examples), self.cfg.train.batch_size, step, seed=self.cfg.seed,
                            client=self.pid)
        return collate([self.examples[i] for i in idx], self.pad_id)

    @functools.cached_property
    def all_rows(self) -> Batch:
        """Every row of the client in one padded batch, (N, T)."""
        return collate(list(self.examples), self.pad_id)

    def round_examples(self, steps: int | None = None) -> float:
        """The examples a round's update weighs: ``steps x min(batch size, rows)`` (``train.local-steps``)."""
        steps = self.cfg.train.local_steps if steps is None else steps
        return float(steps * min(self.cfg.train.batch_size, len(self.examples)))


def client_setup(context: Context) -> ClientSetup:
    """This client's :class:`ClientSetup` (config, partition and rows are cached per process)."""
    cfg = run_config(context)
    pid, n = partition_of(context, cfg)
    return ClientSetup(cfg, pid, n, client_device(cfg), client_examples(context, cfg),
                       load_tokenizer(cfg.model.name).pad_token_id)


def client_examples(context: Context, cfg: RunConfig) -> list[Example]:
    pid, n = partition_of(context, cfg)
    return partition_examples(cfg.data, cfg.seed, pid, n, cfg.model.name, cfg.model.max_length)


def client_privacy(context: Context, setup: ClientSetup, *, round_: int = 1, resumed_after: int = 0,
                   step: int = 0, steps: int | None = None, source: str = "message", ledger_steps: int = 0,
                   membership_visible: bool = True) -> ClientPrivacy:
    """This client's privacy, restored from ``context.state``, the message admitted, the new state saved at once.

    ``resumed_after`` > 0: the run restarted after that round; ``ledger_steps``: the DP-SGD
    steps the server's ledger holds for this node (the round's first message,
    :func:`~guardedtuning.wire.ledger.ledger_steps_of`); ``membership_visible``: whether the
    server sees which rows a step used (split learning; False for a design that releases
    only an update). See :meth:`~guardedtuning.privacy.client.ClientPrivacy.for_client`.
    The message (step ``step`` of ``round_``, asking for ``steps`` local steps where the
    design sends that) must be the next one this client expects
    (:meth:`~guardedtuning.privacy.client.ClientPrivacy.admit`, ``MessageError`` if not).
    """
    priv = ClientPrivacy.for_client(
        setup.cfg, pid=setup.pid, num_examples=len(setup.examples),
        mechanism=client_mechanism(setup.cfg, setup.pid, setup.num_partitions), state=privacy_state(context.state),
        round_=round_, resumed_after=resumed_after, membership_visible=membership_visible, ledger_steps=ledger_steps)
    priv.admit(round_=round_, step=step, resumed_after=resumed_after, source=source, steps=steps,
               planned_steps=setup.cfg.train.local_steps)
    save_privacy(context, priv)
    return priv


def privacy_state(state: RecordDict) -> dict[str, dict[str, Any]]:
    """The privacy part of ``context.state`` as the plain dict ``ClientPrivacy`` reads."""
    out: dict[str, dict[str, Any]] = {}
    for key in STATE_KEYS:
        if key in state:
            record = state[key]
            out[key] = ({k: v.numpy() for k, v in record.items()} if isinstance(record, ArrayRecord)
                        else dict(record.items()))
    return out


def save_privacy(context: Context, priv: ClientPrivacy) -> None:
    """Keep what ``priv`` must remember (message sequence, kept rows, accountant) in ``context.state``."""
    for key, values in priv.to_state().items():
        if any(isinstance(v, np.ndarray) for v in values.values()):
            context.state[key] = ArrayRecord({k: Array(np.asarray(v)) for k, v in values.items()})
        else:
            context.state[key] = ConfigRecord(dict(values))


def round_state(state: RecordDict, keys: Sequence[str]) -> dict[str, dict[str, np.ndarray]]:
    """A design's round state (``keys``, ArrayRecords in ``context.state``) as numpy dicts."""
    return {key: {k: v.numpy() for k, v in state[key].items()} for key in keys if key in state}


def keep_round_state(state: RecordDict, new: Mapping[str, Mapping[str, np.ndarray]], keys: Sequence[str]) -> None:
    """Store ``new`` in ``context.state``; a key of ``keys`` that ``new`` lacks is dropped."""
    for key in keys:
        if key in new:
            state[key] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in new[key].items()})
        elif key in state:
            del state[key]


def round_start_adapter(msg: Message, context: Context, *, source: str) -> dict[str, torch.Tensor]:
    """The global adapter carried by a round's first message (``arrays``, float tensors).

    Secure aggregation is not seen here: its client mod
    (:data:`guardedtuning.strategies.secagg.mod.secagg_mod`) hands the handler a plain
    fp32 ``arrays`` record (decoded if the strategy quantized it).
    """
    record = get_record(msg.content, "arrays", ArrayRecord, source=source, sender="ServerApp")
    return float32_tensors(record, source=source, what="adapter tensor")


def update_content(update: dict[str, torch.Tensor], *, num_examples: float,
                   context: Context) -> tuple[RecordDict, dict[str, float]]:
    """The final reply's records for an adapter update, and the metrics to add to them.

    The update goes as ``update`` with ``num-examples`` for the weighting. In a secure
    round the client mod seals this reply on its way out (the masked update replaces
    ``update``, and ``num-examples`` leaves the metrics); the handler does not know.
    """
    return RecordDict({"update": tensors_to_record(update)}), {"num-examples": num_examples}


def state_nbytes(state: RecordDict) -> int:
    """Bytes a client keeps in ``context.state`` (arrays, plus the configs' values as text)."""
    total = 0
    for record in state.values():
        if isinstance(record, ArrayRecord):
            total += sum(len(record[k].data) for k in record.keys())
        else:
            total += sum(len(str(k)) + len(str(v)) for k, v in record.items())
    return total


@dataclass(frozen=True)
class Clock:
    """When a handler started: its compute time and wall-clock interval go into its reply's metrics."""

    t0: float = field(default_factory=time.perf_counter)
    started: float = field(default_factory=time.time)

    def metrics(self, *, state: RecordDict | None = None, **extra: float) -> MetricRecord:
        """:func:`metrics_record` since this clock started."""
        return metrics_record(self.t0, self.started, state=state, **extra)


def metrics_record(t0: float, started: float, *, state: RecordDict | None = None, **extra: float) -> MetricRecord:
    """Compute time and wall-clock interval of a handler (for the overhead figure), and more.

    ``state``: the client's ``context.state``, whose size is reported as ``state_bytes``.
    """
    if state is not None:
        extra["state_bytes"] = float(state_nbytes(state))
    gpu = gpu_peak_mb()
    return MetricRecord({"compute_s": time.perf_counter() - t0, "t_start": started, "t_end": time.time(),
                         "peak_mem_mb": peak_rss_mb(), **({"gpu_peak_mem_mb": gpu} if gpu is not None else {}),
                         **extra})


def reply(msg: Message, **records: ArrayRecord | ConfigRecord | MetricRecord) -> Message:
    """The reply to ``msg`` carrying ``records`` by name (e.g. ``acts=...``, ``metrics=...``), all finite."""
    content = RecordDict(records)
    refuse_non_finite(content, msg)
    return Message(content, reply_to=msg)


def refuse_non_finite(content: RecordDict, msg: Message) -> None:
    """Raise ``MessageError`` rather than send an array with NaN or inf (checked on the packed reply).

    A server's message can drive a client's model there (an adapter or gradient that is
    finite but overflows in the forward or the step); the client then refuses the message
    instead of releasing values the server would have to reject.
    """
    for key, record in content.items():
        if not isinstance(record, ArrayRecord):
            continue
        for name in record.keys():
            arr = record[name].numpy()
            if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
                raise MessageError(
                    f"{msg.metadata.message_type} message to node {msg.metadata.dst_node_id}: this client's {key} "
                    f"{name!r} came out non-finite (the message's adapter, gradient or hidden states overflow this "
                    "client's model); nothing is sent: the server must send float32 values of a sane scale")


@contextlib.contextmanager
def keeping_privacy(context: Context, priv: ClientPrivacy) -> Iterator[None]:
    """Save ``priv``'s state when the block ends, also when it raises (a DP step taken stays charged)."""
    try:
        yield
    finally:
        save_privacy(context, priv)


def loss_metrics(losses: Sequence[float]) -> dict[str, float]:
    """``train_loss`` (the mean of the steps' losses) for a reply, or nothing when no step had rows."""
    return {"train_loss": statistics.fmean(losses)} if losses else {}


def update_reply(msg: Message, context: Context, update: dict[str, torch.Tensor], *, num_examples: float,
                 clock: Clock, priv: ClientPrivacy | None = None, **metrics: float) -> Message:
    """The final reply of a round: the update (:func:`update_content`), metrics, and the privacy report.

    ``metrics`` (e.g. ``train_loss``) join the reply's metrics; with ``priv``, so do its
    epsilon (under DP-SGD) and, as the ``privacy`` record, its report.
    """
    content, extra = update_content(update, num_examples=num_examples, context=context)
    extra.update(metrics)
    if priv is not None:
        extra.update(priv.metrics())
        content["privacy"] = ConfigRecord({k: v for k, v in priv.report().items()
                                           if isinstance(v, (int, float, str))})
    content["metrics"] = clock.metrics(state=context.state, **extra)
    refuse_non_finite(content, msg)
    return Message(content, reply_to=msg)
