"""LoRA (peft) on a split part, and the trainable-state helpers every recipe shares.

Only trainable tensors ever cross the network or go into ``context.state``; they are
named by ``named_parameters()`` of the part they belong to, so the names on the client
and on the server agree by construction.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from guardedtuning.config import LoraConfig
from guardedtuning.errors import ConfigError, MessageError

AUTO_TARGETS = {"encoder": ("query", "value"), "decoder": ("q_proj", "v_proj")}


def lora_targets(cfg: LoraConfig, kind: str) -> tuple[str, ...]:
    return AUTO_TARGETS[kind] if cfg.target_list == ("auto",) else cfg.target_list


def check_lora_targets(cfg: LoraConfig, names: set[str], kind: str) -> tuple[str, ...]:
    """The LoRA target modules; a target that is not among ``names`` (a model's module names) is a ConfigError."""
    targets = lora_targets(cfg, kind)
    missing = [t for t in targets if t not in names]
    if missing:
        known = sorted(n for n in names if "proj" in n or n in ("query", "key", "value", "dense"))
        raise ConfigError(
            f"`lora.targets` names {', '.join(missing)}, which this model does not have; "
            f"use `auto` or modules such as {', '.join(known[:6])}"
        )
    return targets


def add_lora(module: nn.Module, cfg: LoraConfig, kind: str) -> nn.Module:
    """Inject LoRA adapters into ``module`` in place and freeze everything else.

    Put ``module`` on its device *before* calling this (Opacus and peft otherwise
    disagree about which tensors are the parameters). peft gives the adapters the base
    layer's dtype; lower-precision ones are cast back to float32 (peft's own
    ``cast_adapter_dtype``), so LoRA, its gradients (per-sample ones under DP-SGD too) and
    its optimizer state are float32 whatever ``model.dtype`` is.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model
    from peft.tuners.tuners_utils import cast_adapter_dtype

    targets = check_lora_targets(cfg, {name.rsplit(".", 1)[-1] for name, _ in module.named_modules()}, kind)
    peft_cfg = PeftLoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(targets)
    )
    for p in module.parameters():
        p.requires_grad_(False)
    inject_adapter_in_model(peft_cfg, module)
    cast_adapter_dtype(module, "default")  # bfloat16/float16 adapters -> float32; float32 ones untouched
    for name, p in module.named_parameters():
        p.requires_grad_("lora_" in name)
    return module


SCOPES = ("all", "lora-b")
"""``aggregation.scope``: every adapter tensor trains, or LoRA's A matrices are frozen (``lora-b``)."""


def is_lora_a(name: str) -> bool:
    """Whether a parameter name is one of LoRA's A matrices (peft's ``.lora_A.`` naming)."""
    return ".lora_A." in f".{name}."


def apply_scope(module: nn.Module, scope: str) -> None:
    """Make the LoRA A matrices of ``module`` trainable (``scope="all"``) or frozen (``"lora-b"``).

    Under ``lora-b`` the aggregated update never holds A (``aggregation.scope``), so A must
    not move on a client either: frozen here (``requires_grad=False``), it is left out of the
    optimizer, of DP-SGD's per-sample gradients and noise, and of :func:`trainable_state`, so
    the client's update has no A and keeps no residual for it; :func:`load_trainable` still
    copies the global A the server sends into it. Call it before an optimizer or Opacus
    wraps ``module`` (after :func:`add_lora`, on the module's device: opacus issue 820),
    and on every use of a cached module: a cached model may serve runs of either scope.

    Raises
    ------
    ValueError
        ``scope`` is not ``all`` or ``lora-b``.
    """
    if scope not in SCOPES:
        raise ValueError(f"`scope` is {scope!r}; expected `all` or `lora-b` (aggregation.scope)")
    for name, p in module.named_parameters():
        if is_lora_a(name):
            p.requires_grad_(scope == "all")


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Detached CPU copies of the trainable parameters, by name."""
    return {n: p.detach().to("cpu", copy=True) for n, p in module.named_parameters() if p.requires_grad}


def load_trainable(module: nn.Module, state: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Copy ``state`` into the trainable parameters; names and shapes must match exactly.

    LoRA A matrices frozen by :func:`apply_scope` are loaded too when ``state`` holds them
    (the global adapter does), so a client's frozen A is the server's, bit for bit.
    """
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    frozen = {n: p for n, p in module.named_parameters() if not p.requires_grad and is_lora_a(n) and n in state}
    missing = sorted(set(params) - set(state))
    params.update(frozen)
    extra = sorted(set(state) - set(params))
    if missing or extra:
        raise MessageError(
            f"{source}: adapter tensors do not match this model (missing {missing[:3]}, "
            f"unexpected {extra[:3]}); client and server must use the same model, "
            "split.layer and lora.* settings"
        )
    with torch.no_grad():
        for name, p in params.items():
            value = state[name]
            if tuple(value.shape) != tuple(p.shape):
                raise MessageError(
                    f"{source}: tensor {name} has shape {tuple(value.shape)}, expected "
                    f"{tuple(p.shape)}; client and server must use the same lora.rank"
                )
            p.copy_(value.to(p.device, p.dtype))


def num_trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
