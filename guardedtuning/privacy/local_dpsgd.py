"""DP-SGD when the client computes the whole loss itself (``gradfree``, ``offsite``).

:class:`~guardedtuning.privacy.dpsgd.DPStep` starts the backward from a gradient the
server returned; here the loss is local, so the same step (budget check, per-example
gradients, clip to C, sum, Gaussian noise N(0, (sigma C)^2), divide by the expected batch
size, optimizer step, accountant) runs on a module that returns each example's loss:

- :class:`PerExampleLoss` wraps a model with ``per_example_loss(*inputs) -> (B,)``;
- :class:`LocalDPStep` backpropagates the batch's *mean* loss, ``losses.backward(1/B)``.
  With Opacus's ``loss_reduction="mean"`` the per-sample gradients are multiplied by B,
  so ``p.grad_sample[i]`` is the gradient of example i's own loss, the convention
  :class:`DPStep` documents and the accountant assumes.

Batches are Poisson-sampled from the client's private seed
(:func:`~guardedtuning.privacy.dpsgd.poisson_batch_indices`). The guarantee covers what
is derived from the trained parameters (the update the client uploads), per client, for
adding or removing one of its examples.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from guardedtuning.privacy.dpsgd import DPAccountant, DPPlan, DPStep


class PerExampleLoss(nn.Module):
    """``model.per_example_loss(*inputs)`` as a module's forward, so Opacus can wrap it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model.per_example_loss(*inputs)  # type: ignore[operator]


@dataclass
class LossBatch:
    """The batch-first inputs of one step (e.g. ids, mask, labels); ``len`` is the batch size."""

    inputs: tuple[torch.Tensor, ...]

    def __len__(self) -> int:
        return int(self.inputs[0].shape[0])


class LocalDPStep(DPStep):
    """DP-SGD on a :class:`PerExampleLoss`; call ``step(opt, LossBatch(...), None, ...)``.

    ``last_loss`` holds the mean loss of the last non-empty batch (for progress).
    """

    last_loss: float | None = None

    def per_sample_gradients(
        self, batch: LossBatch, grad_h: torch.Tensor | None = None, *, device: torch.device | str = "cpu",
        extra_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Per-example gradients (B, *p.shape) of every trainable tensor, in ``self.params`` order."""
        if grad_h is not None or extra_loss is not None or transform is not None:
            raise ValueError("LocalDPStep computes the loss locally: pass grad_h=None, no extra_loss or transform")
        self._hooked_modules_train()
        for p in self.params:
            p.grad = None
            setattr(p, "grad_sample", None)  # noqa: B010 - Opacus's attribute
        losses = self.gsm(*(t.to(device) for t in batch.inputs))  # (B,)
        self.last_loss = float(losses.detach().mean())
        with warnings.catch_warnings():
            # hooks on layers whose inputs need no gradient (frozen blocks below the adapters)
            warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
            losses.backward(torch.full_like(losses, 1.0 / len(losses)))  # the batch mean
        out = []
        for p in self.params:
            gs = getattr(p, "grad_sample", None)
            out.append(gs if gs is not None else torch.zeros((len(batch), *p.shape), device=p.device, dtype=p.dtype))
            setattr(p, "grad_sample", None)  # noqa: B010
            p.grad = None
        return out


def dp_local_train(model: nn.Module, opt: torch.optim.Optimizer, batches: Iterable[LossBatch],
                   generators: Iterable[torch.Generator], *, plan: DPPlan, accountant: DPAccountant,
                   device: torch.device | str = "cpu") -> list[float]:
    """DP-SGD steps of ``model`` (with ``per_example_loss``) over ``batches``, one noise generator per step.

    Returns the mean loss of each non-empty batch; every step (empty batches too) is
    recorded in ``accountant``. Raises :class:`~guardedtuning.privacy.dpsgd.PrivacyBudgetSpent`
    before a step that would exceed the plan's target.
    """
    dp = LocalDPStep(PerExampleLoss(model), plan)
    losses: list[float] = []
    try:
        for batch, gen in zip(batches, generators, strict=False):
            dp.last_loss = None
            dp.step(opt, batch, None, generator=gen, accountant=accountant, device=device)
            if dp.last_loss is not None:
                losses.append(dp.last_loss)
    finally:
        dp.close()
    return losses
