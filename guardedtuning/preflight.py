"""Checks that run before Flower starts, so bad input fails in a second, in one line.

They resolve the model's config (not its weights), check the split layer against its
depth, load the dataset and check its fields and size against the number of clients.
The same checks run again where the work happens; this only makes failing cheap.
"""

from __future__ import annotations

from guardedtuning import compat, recipes
from guardedtuning.config import RunConfig
from guardedtuning.data.partition import check_enough_rows, load_partition
from guardedtuning.data.sources import data_record, load_task
from guardedtuning.errors import ConfigError, ModelLoadError
from guardedtuning.models.exposure import module_names
from guardedtuning.models.loading import load_model_config, model_kind, torch_dtype
from guardedtuning.models.lora import check_lora_targets
from guardedtuning.models.split import check_split_layer


def preflight(cfg: RunConfig) -> dict[str, object]:
    """Raise a GuardedTuningError on bad input; return a few facts for the banner."""
    compat.gate()  # a bad GUARDEDTUNING_FLOWER_COMPAT value fails here
    mcfg = load_model_config(cfg.model.name)
    kind = model_kind(mcfg, cfg.model.name)
    depth = cfg.model.num_layers or int(mcfg.num_hidden_layers)
    if cfg.model.num_layers > int(mcfg.num_hidden_layers):
        raise ModelLoadError(
            f"`model.num-layers` is {cfg.model.num_layers} but {cfg.model.name!r} has only "
            f"{mcfg.num_hidden_layers} blocks; pass 0 or a number <= {mcfg.num_hidden_layers}"
        )
    check_split_layer(cfg.split.layer, depth, cfg.model.name)
    recipe = recipes.get(cfg.recipe)
    recipe.validate(cfg)
    recipe.preflight(cfg, kind, depth)
    check_lora_targets(cfg.lora, module_names(cfg.model), kind)
    positions = getattr(mcfg, "max_position_embeddings", None)
    if positions is not None and cfg.model.max_length + cfg.eval.max_new_tokens > int(positions):
        raise ModelLoadError(
            f"`model.max-length` is {cfg.model.max_length} but {cfg.model.name!r} has "
            f"{positions} positions (generation adds eval.max-new-tokens={cfg.eval.max_new_tokens}); "
            f"pass --set model.max-length=N with N <= {int(positions) - cfg.eval.max_new_tokens}"
        )
    from guardedtuning.server_app.common import server_device

    server = server_device(cfg)  # a GPU this machine does not have fails here, not in the ServerApp
    torch_dtype(cfg.model.dtype, server)  # model.dtype=float16 on a CPU server fails here
    if recipe.federated and not cfg.sim.num_gpus > 0:  # clients compute on the CPU (clients.common.client_device)
        torch_dtype(cfg.model.dtype, "cpu")
    task = load_task(cfg.data, cfg.seed)
    data_record(cfg.data, model=cfg.model.name, max_length=cfg.model.max_length, seed=cfg.seed)  # bad rows fail here
    if recipe.federated:
        check_enough_rows(cfg.data, cfg.federation.num_clients, cfg.seed)
        load_partition(cfg.data, 0, cfg.federation.num_clients, cfg.seed)  # builds (and checks) all of them
        from guardedtuning.server_app.common import make_strategy

        make_strategy(cfg, "train")  # aggregation settings that could never aggregate fail here
    if cfg.dp.enabled:  # the noise multiplier for a typical client: impossible budgets fail here
        from guardedtuning.privacy.dpsgd import DPPlan

        per_client = max(1, len(task.train) // cfg.federation.num_clients)
        try:
            DPPlan.from_config(cfg.dp, num_examples=per_client, batch_size=cfg.train.batch_size,
                               rounds=cfg.federation.rounds, local_steps=cfg.train.local_steps)
        except ValueError as exc:
            raise ConfigError(f"dp.target-epsilon {cfg.dp.target_epsilon} cannot be met for "
                              f"{cfg.federation.rounds} rounds x {cfg.train.local_steps} steps ({exc}); raise "
                              "dp.target-epsilon or plan fewer steps") from exc
    if cfg.privacy.mechanism == "privtune":
        warm_privtune_cache(cfg)
    return {"kind": kind, "layers": depth, "train_rows": len(task.train), "test_rows": len(task.test),
            "labels": task.label_names, "majority_rate": task.majority_rate()}


def warm_privtune_cache(cfg: RunConfig) -> None:
    """Build PrivTune's model-wide tables (k-NN graph, centroids, mean shifts) on disk once.

    They depend on the model only; every client process then finds them in the cache
    instead of building them at the same time (about 20 s for MiniLM on a CPU).
    """
    import torch

    from guardedtuning.privacy.privtune import privtune_base, privtune_from_config

    embeddings, scale = privtune_base(cfg.model, cfg.split.layer, cfg.seed)
    one = torch.zeros((1, 1), dtype=torch.long)
    privtune_from_config(cfg.privacy, embeddings=embeddings, input_ids=one, attention_mask=torch.ones_like(one),
                         labels=torch.zeros(1, dtype=torch.long), num_classes=1, scale=scale)
