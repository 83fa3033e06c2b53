"""What every client handler needs: the config, the device, the partition, the data."""

from __future__ import annotations

import functools
import time
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from guardedtuning.clients.secagg_handlers import (
    begin_round,
    forget_round,
    in_secure_round,
    is_secure_round,
    seal_update,
    unpack_global,
)
from guardedtuning.config import DataConfig, RunConfig, build_config
from guardedtuning.data.batches import Batch, Example, batch_indices, collate, tokenize_rows
from guardedtuning.data.partition import load_partition
from guardedtuning.data.sources import load_task
from guardedtuning.errors import MessageError
from guardedtuning.models.loading import kind_of, load_tokenizer
from guardedtuning.results import gpu_peak_mb, peak_rss_mb
from guardedtuning.wire.records import config_value, get_record, record_to_tensors, tensors_to_record


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


@functools.lru_cache(maxsize=128)
def examples_of(data: DataConfig, seed: int, pid: int, n: int, model: str, max_length: int) -> list[Example]:
    """Client ``pid``'s partition, tokenised once per process (bounded: clients of recent rounds)."""
    task = load_task(data, seed)
    return tokenize_rows(load_partition(data, pid, n, seed), load_tokenizer(model), kind_of(model),
                         max_length=max_length, label_names=task.label_names, instruction=task.instruction)


def client_examples(context: Context, cfg: RunConfig) -> list[Example]:
    pid, n = partition_of(context, cfg)
    return examples_of(cfg.data, cfg.seed, pid, n, cfg.model.name, cfg.model.max_length)


def client_batch(context: Context, cfg: RunConfig, global_step: int) -> Batch:
    """The batch of this client's ``global_step`` (a pure function of config and step)."""
    examples = client_examples(context, cfg)
    idx = batch_indices(len(examples), cfg.train.batch_size, global_step, seed=cfg.seed,
                        client=partition_of(context, cfg)[0])
    return collate([examples[i] for i in idx], load_tokenizer(cfg.model.name).pad_token_id)


def round_start_adapter(msg: Message, context: Context, *, source: str) -> dict[str, torch.Tensor]:
    """The global adapter carried by a round's first message.

    A secure round (the strategy sent its public parameters) is remembered in the client's
    state, and its adapter may arrive quantized; a plain round forgets any unfinished one.
    """
    if is_secure_round(msg.content):
        begin_round(msg.content, context.state, node_id=context.node_id)
        arrays = unpack_global(msg.content, source=source)
        return {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in arrays.items()}
    forget_round(context.state)
    record = get_record(msg.content, "arrays", ArrayRecord, source=source, sender="ServerApp")
    return record_to_tensors(record, source=source, float_only=True)


def update_content(update: dict[str, torch.Tensor], *, num_examples: float,
                   context: Context) -> tuple[RecordDict, dict[str, float]]:
    """The final reply's records for an adapter update, and the metrics to add to them.

    In a secure round the update is compressed and kept in the client's state (it leaves
    only masked, in the strategy's later stages) and even the example count stays out of
    the clear; otherwise the update goes as is, with ``num-examples`` for the weighting.
    """
    if in_secure_round(context.state):
        sealed = seal_update({k: v.numpy() for k, v in update.items()}, num_examples=num_examples,
                             state=context.state, node_id=context.node_id)
        return sealed, {}
    return RecordDict({"update": tensors_to_record(update)}), {"num-examples": num_examples}


def resumed_after_of(conf: ConfigRecord, source: str) -> int:
    """The round a restarted run resumed after (``resumed-after``; 0 for a fresh run)."""
    if "resumed-after" not in conf:
        return 0
    value = config_value(conf, "resumed-after", int, source=source)
    if value < 0:
        raise MessageError(f"{source}: `resumed-after` must be >= 0 but is {value}")
    return value


def state_nbytes(state: RecordDict) -> int:
    """Bytes a client keeps in ``context.state`` (arrays, plus the configs' values as text)."""
    total = 0
    for record in state.values():
        if isinstance(record, ArrayRecord):
            total += sum(len(record[k].data) for k in record.keys())
        else:
            total += sum(len(str(k)) + len(str(v)) for k, v in record.items())
    return total


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
