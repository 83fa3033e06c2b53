"""Partition the training set over clients with flwr-datasets partitioners.

IID, or Dirichlet over the column ``data.partition-by`` (the label by default). A ``hub:``
dataset is partitioned by flwr-datasets' ``FederatedDataset`` itself
(:func:`guardedtuning.data.sources.hub_dataset`); every other source's training rows are
handed to the same partitioners.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

from guardedtuning.config import DataConfig
from guardedtuning.data.sources import hub_call, hub_dataset, load_task
from guardedtuning.errors import DataError


def make_partitioner(cfg: DataConfig, num_partitions: int, seed: int) -> Any:
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    if cfg.partition == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    task = load_task(cfg, seed)
    column = cfg.partition_by
    if column not in task.train.column_names:
        raise DataError(f"data.partition-by is {column!r} but the rows of {cfg.name!r} have no such column "
                        f"(columns: {', '.join(task.train.column_names)}); pass --set data.partition-by=<column>")
    if len(set(task.train[column])) < 2:
        raise DataError(f"data.partition-by is {column!r} but every training row of {cfg.name!r} has the same "
                        "value there, so Dirichlet has nothing to skew; pass another column or data.partition=iid")
    min_size = max(1, min(10, len(task.train) // (4 * num_partitions)))
    return DirichletPartitioner(
        num_partitions=num_partitions, partition_by=column, alpha=cfg.alpha,
        min_partition_size=min_size, self_balancing=True, shuffle=True, seed=seed,
    )


def check_enough_rows(cfg: DataConfig, num_clients: int, seed: int) -> None:
    n = len(load_task(cfg, seed).train)
    if num_clients > n:
        raise DataError(
            f"federation.num-clients is {num_clients} but dataset {cfg.name!r} has only "
            f"{n} training rows; lower --set federation.num-clients or raise data.train-size"
        )


@functools.lru_cache(maxsize=8)
def _partitioner(cfg: DataConfig, num_partitions: int, seed: int) -> Any:
    check_enough_rows(cfg, num_partitions, seed)
    part = make_partitioner(cfg, num_partitions, seed)
    if cfg.name.startswith("hub:"):  # FederatedDataset loads, splits and partitions
        fds, _ = hub_dataset(cfg, seed, part)
        return _Federated(cfg, fds)
    part.dataset = load_task(cfg, seed).train
    return part


class _Federated:
    """A FederatedDataset behind the partitioner's ``load_partition``."""

    def __init__(self, cfg: DataConfig, fds: Any) -> None:
        self.cfg, self.fds = cfg, fds

    def load_partition(self, partition_id: int) -> Any:
        hub_call(self.cfg, lambda: self.fds.load_split("test"))  # loads and prepares once; a load failure names the fix
        return self.fds.load_partition(partition_id, "train")  # a Dirichlet failure is load_partition's to report


def load_partition(cfg: DataConfig, partition_id: int, num_partitions: int, seed: int) -> Any:
    """Client ``partition_id``'s rows (a ``datasets.Dataset``)."""
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition-id {partition_id} outside 0..{num_partitions - 1}; check the node config")
    try:
        with warnings.catch_warnings():  # flwr-datasets warns on every Dirichlet retry; we report the failure
            warnings.filterwarnings("ignore", message="The specified min_partition_size", category=UserWarning)
            return _partitioner(cfg, num_partitions, seed).load_partition(partition_id)
    except ValueError as exc:  # Dirichlet sampling can fail for tiny data / many clients
        raise DataError(
            f"cannot split {cfg.name!r} into {num_partitions} {cfg.partition} partitions "
            f"({exc}); raise data.alpha, use data.partition=iid or fewer clients"
        ) from exc
