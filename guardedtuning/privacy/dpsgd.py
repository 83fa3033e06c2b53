"""DP-SGD across the cut: Opacus per-sample gradients of the client's bottom LoRA, clipping,
Gaussian noise, Poisson sampling and a per-client accountant that persists as numpy.

What the guarantee covers. (epsilon, delta)-DP, per client, with respect to adding or
removing one of that client's examples, for everything derived from the bottom's
*parameters* (the LoRA updates the client uploads and the server aggregates). It does
*not* cover what else crosses the cut each step: the released activations (protected,
if at all, by the token mechanism of :mod:`.mechanisms`) and the labels the server uses
for its loss. Both would have to be counted separately.

One step (:meth:`DPStep.step`), replacing ``training.backward_from_server``:

1. recompute the bottom on the step's batch through an Opacus ``GradSampleModule`` and
   start the backward from the server's activation gradient, ``h.backward(grad_h)``;
2. per-sample gradients: the server's loss for a client is that client's *mean* loss
   (``training.top_step``), so ``grad_h[i] = (1/B) dL_i/dh_i``. With
   ``loss_reduction="mean"`` Opacus multiplies the backprops by the batch size B, so
   ``p.grad_sample[i]`` is exactly the gradient of example i's own loss (tested against
   a per-example loop). If a server summed the losses instead, use ``"sum"``;
3. clip each example's gradient (all trainable tensors together) to norm C, sum, add
   N(0, (sigma C)^2) per coordinate, divide by the *expected* batch size q n (Opacus's
   convention for Poisson sampling), and take the optimizer step;
4. record the step in the accountant.

Sampling: each example joins a step's batch independently with probability
q = batch_size / n (:func:`poisson_batch_indices`, a pure function of its seed, client and
step). The client draws it with a fresh OS seed per step and keeps the rows in its state,
so the forward of step s and its recomputation in step s + 1 agree
(:meth:`~guardedtuning.privacy.client.ClientPrivacy.rows`). Batches vary in size and can be
empty (then the update is noise only). The sampling seed, like the noise generator, must
be unknown to the server and never repeat at its request (:mod:`.randomness`).

Two epsilons. Amplification by sampling assumes the adversary does not know which rows
a step used. That holds for third parties who see only the released model, and for a
server that receives only a client's (or the aggregate's) update (``gradfree``,
``offsite``). It does not hold against the server of split learning: each step it
receives exactly the sampled rows' activations and labels, so it knows every batch's
membership. Against it, each participation of an example is a full Gaussian mechanism
(sensitivity C, noise sigma C), composed over the example's actual participations:
:func:`gaussian_epsilon` (Opacus's RDP at sample rate 1), worst example.

Budget (:meth:`DPPlan.from_config`). Where the server sees membership
(``membership_visible``), ``dp.target-epsilon`` is met by the worst example at a cap on
participations (``dp.max-participations``, 0 = :func:`auto_max_participations`): the
client drops a row that reached the cap from later Poisson batches, so the epsilon
against the server is bounded in advance, and the noise multiplier is the smallest
whose ``cap`` Gaussian mechanisms stay below the target. Elsewhere the noise is planned
for ``rounds x local steps`` Poisson steps at rate q, assuming the client is sampled in
every round (an upper bound). The accountant counts the steps actually taken (for the
amplified epsilon of the released model) and each row's participations (for the one
against the server); a step that would take epsilon past the target raises
:class:`PrivacyBudgetSpent`, which the client reports instead of contributing.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from guardedtuning.config.privacy import ACCOUNTANTS, DPConfig, check_delta, check_epsilon
from guardedtuning.data.batches import Batch
from guardedtuning.errors import GuardedTuningError, MessageError
from guardedtuning.privacy.randomness import STREAM_DP_SAMPLING


class PrivacyBudgetSpent(GuardedTuningError):
    """This client's epsilon would exceed ``dp.target-epsilon``; it must stop contributing."""


def sample_rate_for(*, batch_size: int, num_examples: int) -> float:
    """Poisson sampling rate q = batch_size / n, capped at 1 (no amplification then)."""
    if num_examples < 1 or batch_size < 1:
        raise ValueError(f"need batch_size >= 1 and num_examples >= 1, got {batch_size} and {num_examples}")
    return min(1.0, batch_size / num_examples)


def poisson_batch_indices(n: int, *, sample_rate: float, step: int, seed: int, client: int) -> np.ndarray:
    """Rows of global step ``step``: each of ``n`` rows kept independently with prob ``sample_rate``.

    A pure function of (seed, client, step); ``seed`` must be fresh OS entropy
    (:func:`~guardedtuning.privacy.randomness.fresh_seed`) except for a reproducible test.
    """
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1] but is {sample_rate}")
    rng = np.random.default_rng([int(seed), int(client), int(step), STREAM_DP_SAMPLING])
    return np.flatnonzero(rng.random(n) < sample_rate).astype(np.int64)


def noise_multiplier_for(*, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                         accountant: str = "rdp") -> float:
    """Smallest noise multiplier (within Opacus's 0.01 epsilon tolerance) whose epsilon after
    ``steps`` Poisson-sampled steps at ``sample_rate`` stays below ``target_epsilon``.

    At ``sample_rate=1`` this is ``steps`` full Gaussian mechanisms (no amplification).
    """
    from opacus.accountants.utils import get_noise_multiplier

    check_epsilon(target_epsilon, "dp.target-epsilon")
    check_delta(delta, "dp.delta")
    with warnings.catch_warnings():
        # the bisection visits extreme noise levels whose optimal RDP order is at the
        # edge of Opacus's grid; that only loosens the bound of candidates it rejects
        warnings.filterwarnings("ignore", message="Optimal order is the", category=UserWarning)
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=steps, accountant=accountant))


def gaussian_epsilon(*, noise_multiplier: float, participations: int, delta: float) -> float:
    """Epsilon of ``participations`` Gaussian mechanisms of sensitivity C and noise ``noise_multiplier`` x C.

    What one example's participations in DP-SGD steps cost against an adversary who knows
    which steps it took part in (no amplification by sampling): Opacus's RDP of the
    sampled Gaussian at sample rate 1, composed ``participations`` times, converted at
    ``delta``. 0 for no participation; ``inf`` without noise.
    """
    if participations <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return float("inf")
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import get_privacy_spent

    rdp = _rdp_per_step(float(noise_multiplier), 1.0) * int(participations)
    eps, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


def capped_epsilon(*, noise_multiplier: float, delta: float, steps: int, cap: int) -> float:
    """Epsilon of any row after ``steps`` steps when no row takes part in more than ``cap`` (0: no cap):
    ``min(cap, steps)`` full Gaussian mechanisms, whichever rows the sampling drew."""
    return gaussian_epsilon(noise_multiplier=noise_multiplier, participations=min(cap, steps) if cap else steps,
                            delta=delta)


def amplified_epsilon(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon of ``steps`` Poisson-sampled Gaussian steps at ``sample_rate`` (RDP, with amplification)."""
    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return float("inf")
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import get_privacy_spent

    rdp = _rdp_per_step(float(noise_multiplier), float(sample_rate)) * int(steps)
    eps, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


@functools.lru_cache(maxsize=64)
def auto_max_participations(*, target_epsilon: float, delta: float, sample_rate: float, steps: int) -> int:
    """The participation cap ``dp.max-participations = 0`` picks: the most expected row uses per unit of noise.

    A row's participations over ``steps`` Poisson steps at ``sample_rate`` are X ~ Binomial(steps, q);
    with a cap c it is used E[min(X, c)] times, and the noise multiplier that keeps c
    Gaussian mechanisms below the target is sigma(c). The cap maximises E[min(X, c)] / sigma(c)
    (the signal summed over the run against the noise of one step); candidates run up to the
    0.9999 quantile of X.
    """
    from scipy.stats import binom

    if steps < 1:
        raise ValueError(f"steps must be >= 1 but is {steps}")
    top = max(1, min(steps, int(binom.ppf(0.9999, steps, sample_rate))))
    best, best_score, used = 1, -1.0, 0.0
    for c in range(1, top + 1):
        used += float(binom.sf(c - 1, steps, sample_rate))  # E[min(X, c)] = sum_{j <= c} P(X >= j)
        score = used / noise_multiplier_for(target_epsilon=target_epsilon, delta=delta, sample_rate=1.0, steps=c)
        if score > best_score:
            best, best_score = c, score
    return best


@dataclass(frozen=True)
class DPPlan:
    """The DP-SGD parameters of one client, fixed for the whole run.

    ``membership_visible``: the server sees which rows each step used (split learning), so
    the target holds against it for the worst example at ``max_participations``
    participations without amplification; otherwise (``max_participations = 0``, no cap)
    for ``planned_steps`` Poisson steps with amplification.
    """

    noise_multiplier: float
    sample_rate: float
    max_grad_norm: float
    expected_batch_size: float
    planned_steps: int
    target_epsilon: float
    delta: float
    accountant: str = "rdp"
    secure_mode: bool = False  # Opacus's floating-point-safe noise (DPOptimizer's secure_mode)
    max_participations: int = 0  # the cap on one row's DP-SGD steps (0: none)
    membership_visible: bool = False

    @classmethod
    def from_config(cls, cfg: DPConfig, *, num_examples: int, batch_size: int, rounds: int,
                    local_steps: int, membership_visible: bool = True) -> DPPlan:
        """The plan of ``rounds * local_steps`` steps at q = batch_size / num_examples.

        ``membership_visible`` (the default, the strict one): noise for ``dp.target-epsilon``
        against a server that sees each step's rows, at the cap ``dp.max-participations``
        (0: :func:`auto_max_participations`, at most the planned steps). Otherwise noise for
        the amplified epsilon of the planned steps.
        """
        q = sample_rate_for(batch_size=batch_size, num_examples=num_examples)
        steps = rounds * local_steps
        cap = 0
        if membership_visible:
            check_epsilon(cfg.target_epsilon, "dp.target-epsilon")
            check_delta(cfg.delta, "dp.delta")
            cap = cfg.max_participations or auto_max_participations(
                target_epsilon=cfg.target_epsilon, delta=cfg.delta, sample_rate=q, steps=steps)
            cap = min(cap, steps)
            sigma = noise_multiplier_for(target_epsilon=cfg.target_epsilon, delta=cfg.delta, sample_rate=1.0,
                                         steps=cap, accountant="rdp")
        else:
            sigma = noise_multiplier_for(target_epsilon=cfg.target_epsilon, delta=cfg.delta, sample_rate=q,
                                         steps=steps, accountant=cfg.accountant)
        return cls(noise_multiplier=sigma, sample_rate=q, max_grad_norm=cfg.max_grad_norm,
                   expected_batch_size=q * num_examples, planned_steps=steps,
                   target_epsilon=cfg.target_epsilon, delta=cfg.delta, accountant=cfg.accountant,
                   secure_mode=cfg.secure_mode, max_participations=cap, membership_visible=membership_visible)

    def describe(self) -> dict[str, Any]:
        return asdict(self)


@functools.lru_cache(maxsize=64)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """RDP of one Poisson-subsampled Gaussian step at Opacus's default orders."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    return np.asarray(compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                  orders=RDPAccountant.DEFAULT_ALPHAS), dtype=np.float64)


class DPAccountant:
    """A per-client privacy accountant (Opacus RDP or PRV) whose state is plain numpy.

    Two records: the steps taken (``history``: the amplified epsilon of the released model,
    :meth:`epsilon`) and, where the server sees which rows a step used, each row's
    participations (``participations``: :meth:`server_epsilon` of the worst row).

    ``state_dict()`` gives ``{"history": float64 (k, 3) [noise multiplier, sample rate,
    steps], "kind": int64 (1,)}`` and, once a row was counted, ``"participations": int64
    (n,)``; it fits an ``ArrayRecord`` in ``context.state``.
    """

    def __init__(self, *, kind: str = "rdp") -> None:
        if kind not in ACCOUNTANTS:
            raise ValueError(f"kind must be one of {ACCOUNTANTS} but is {kind!r}")
        from opacus.accountants import create_accountant

        self.kind = kind
        self._acc = create_accountant(mechanism=kind)
        self.participations: np.ndarray | None = None  # (n,) int64: DP-SGD steps each row took part in

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return list(self._acc.history)

    @property
    def steps(self) -> int:
        return int(sum(s for _, _, s in self._acc.history))

    def record(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Count ``steps`` steps (merged into the last entry when the parameters repeat)."""
        hist = self._acc.history
        if hist and hist[-1][0] == noise_multiplier and hist[-1][1] == sample_rate:
            sigma, q, n = hist.pop()
            hist.append((sigma, q, n + steps))
        else:
            hist.append((float(noise_multiplier), float(sample_rate), int(steps)))

    # -- participations (what the server of split learning can count) ---------------------

    def rows(self, n: int) -> np.ndarray:
        """Each of the client's ``n`` rows' participations so far (allocated on first use)."""
        if self.participations is None:
            self.participations = np.zeros(n, dtype=np.int64)
        if len(self.participations) != n:
            raise MessageError(f"the DP accountant counts {len(self.participations)} rows but this client has {n}; "
                               "the client's data changed mid-run (restart the run with a new output.dir)")
        return self.participations

    def participate(self, rows: np.ndarray, *, n: int) -> None:
        """Count one participation of each of ``rows`` (the rows of one DP-SGD step) out of ``n``."""
        counts = self.rows(n)
        counts[np.asarray(rows, dtype=np.int64)] += 1

    def charge_unseen(self, steps: int, *, n: int, cap: int) -> None:
        """``steps`` steps whose rows this accountant does not know: each row may have been in each, up to ``cap``.

        The cap holds for them too (the client that took them enforced it), so every row's
        count becomes ``min(cap, count + steps)``, never less than it was.
        """
        counts = self.rows(n)
        np.maximum(counts, np.minimum(counts + int(steps), int(cap)), out=counts)

    @property
    def max_participations(self) -> int:
        """The participations of the worst row (0 before any)."""
        p = self.participations
        return int(p.max()) if p is not None and len(p) else 0

    def server_epsilon(self, *, noise_multiplier: float, delta: float, extra: int = 0, cap: int = 0) -> float:
        """Epsilon of the worst row against a server that knows which steps it was in (:func:`gaussian_epsilon`).

        ``extra``: that many more participations of the worst row (at most ``cap`` in all, if ``cap``).
        """
        k = self.max_participations + extra
        return gaussian_epsilon(noise_multiplier=noise_multiplier, participations=min(k, cap) if cap else k,
                                delta=delta)

    # -- the released model (amplification by sampling) -----------------------------------

    def epsilon(self, *, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (0 before any step), with amplification by sampling.

        RDP: the same numbers as Opacus's ``RDPAccountant.get_epsilon`` (RDP composes
        additively, so the per-step RDP curve of each (sigma, q) is computed once and
        scaled by the step count: ~0.1 ms instead of ~100 ms per call). PRV: Opacus's
        ``PRVAccountant`` as is (~0.2 s per call).
        """
        if not self._acc.history:
            return 0.0
        if self.kind != "rdp":
            return float(self._acc.get_epsilon(delta=delta))
        from opacus.accountants import RDPAccountant
        from opacus.accountants.analysis.rdp import get_privacy_spent

        rdp = sum(_rdp_per_step(sigma, q) * n for sigma, q, n in self._acc.history)
        eps, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
        return float(eps)

    def epsilon_after(self, *, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
        """Epsilon if ``steps`` more steps were taken (the state is left unchanged)."""
        saved = list(self._acc.history)
        try:
            self.record(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
            return self.epsilon(delta=delta)
        finally:
            self._acc.history = saved

    def state_dict(self) -> dict[str, np.ndarray]:
        hist = np.array(self._acc.history, dtype=np.float64).reshape(-1, 3)
        out = {"history": hist, "kind": np.array([ACCOUNTANTS.index(self.kind)], dtype=np.int64)}
        if self.participations is not None:
            out["participations"] = self.participations.copy()
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        kind = ACCOUNTANTS[int(np.asarray(state["kind"]).ravel()[0])]
        if kind != self.kind:
            raise MessageError(f"stored DP accountant is {kind!r} but this client uses {self.kind!r} "
                               "(dp.accountant changed mid-run)")
        hist = np.asarray(state["history"], dtype=np.float64).reshape(-1, 3)
        self._acc.history = [(float(s), float(q), int(n)) for s, q, n in hist]
        if "participations" in state:
            self.participations = np.asarray(state["participations"], dtype=np.int64).reshape(-1).copy()


def budget_spent(accountant: DPAccountant, plan: DPPlan, *, steps: int = 1) -> bool:
    """True if ``steps`` more steps would take this client's epsilon past its target.

    Where membership is visible: the worst row's epsilon against the server after ``steps``
    more participations (at most the cap). That figure also bounds the released model (the
    model is computed from what the server sees), so the amplified epsilon of the steps is
    not checked there: it ignores the cap and exceeds the target long before any row does
    at a large target (``dp.target-epsilon=32`` stopped runs at 31.99 against the server).
    Otherwise: the amplified epsilon of the steps.
    """
    if plan.membership_visible:
        return accountant.server_epsilon(noise_multiplier=plan.noise_multiplier, delta=plan.delta, extra=steps,
                                         cap=plan.max_participations) > plan.target_epsilon
    eps = accountant.epsilon_after(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate,
                                   steps=steps, delta=plan.delta)
    return eps > plan.target_epsilon


@dataclass
class DPStepStats:
    batch_size: int
    mean_grad_norm: float  # before clipping
    clipped_fraction: float
    epsilon: float


class DPStep:
    """DP-SGD on a split bottom whose backward starts from the server's activation gradient.

    Create it once per bottom module (it installs Opacus hooks on the LoRA layers) and
    call :meth:`step` where the plain client would call ``backward_from_server``.
    :meth:`close` removes the hooks.

    Per-example gradients come from Opacus's ``GradSampleModule``; clipping, noise and the
    division by the expected batch size from Opacus's ``DPOptimizer`` wrapped around the
    client's optimizer for the step. ``secure_mode``: Opacus's noise that resists floating-
    point attacks on the Gaussian sampler (four draws per coordinate, about 4x the noise
    cost); the generator is still torch's (see :mod:`.randomness`).
    """

    def __init__(self, bottom: nn.Module, plan: DPPlan, *, loss_reduction: str = "mean",
                 secure_mode: bool | None = None) -> None:
        from opacus import GradSampleModule

        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum' but is {loss_reduction!r}")
        self.plan = plan
        self.secure_mode = plan.secure_mode if secure_mode is None else secure_mode
        self.bottom = bottom
        self.params = [p for p in bottom.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the bottom has no trainable parameters; add LoRA before DP-SGD")
        self.gsm = GradSampleModule(bottom, batch_first=True, loss_reduction=loss_reduction, strict=True)

    def _hooked_modules_train(self) -> None:
        # Opacus records activations only in training mode; the bottom runs in eval mode
        # (no dropout, so a recomputed forward equals the released one). Only the layers
        # that own trainable tensors (LoRA A/B Linear) are switched, which changes nothing
        # in their output.
        for m in self.bottom.modules():
            if any(p.requires_grad for p in m.parameters(recurse=False)):
                m.train()

    def per_sample_gradients(
        self, batch: Batch, grad_h: torch.Tensor, *, device: torch.device | str = "cpu",
        extra_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Per-example gradients (B, *p.shape) of every trainable tensor, in ``self.params`` order.

        ``extra_loss(h)`` (a batch mean, e.g. the decorrelation term) is added to the
        server's objective before the backward.
        """
        from guardedtuning.training import split_backward

        b = batch.to(device)
        self._hooked_modules_train()
        for p in self.params:
            p.grad = None
            setattr(p, "grad_sample", None)  # noqa: B010 - Opacus's attribute
        h = self.gsm(b.input_ids, b.attention_mask)  # (B, T, D)
        if transform is not None:  # what the release applied to h before the noise (e.g. clipping)
            h = transform(h)
        if tuple(grad_h.shape) != tuple(h.shape):
            raise MessageError(
                f"activation gradient has shape {tuple(grad_h.shape)} but this client's activations "
                f"have shape {tuple(h.shape)}; the server must return one gradient per released activation"
            )
        with warnings.catch_warnings():
            # Opacus's backward hooks fire on layers whose inputs need no gradient (frozen
            # embeddings below the first LoRA layer); torch warns about exactly that case.
            warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
            split_backward(h, grad_h.to(h.device, h.dtype), extra_loss=extra_loss(h) if extra_loss else None)
        out = []
        for p in self.params:
            gs = getattr(p, "grad_sample", None)  # (B, *p.shape) from Opacus; None if p got no gradient
            out.append(gs if gs is not None else torch.zeros((len(b), *p.shape), device=p.device, dtype=p.dtype))
            setattr(p, "grad_sample", None)  # noqa: B010
            p.grad = None
        return out

    def step(
        self,
        opt: torch.optim.Optimizer,
        batch: Batch,
        grad_h: torch.Tensor,
        *,
        generator: torch.Generator,
        accountant: DPAccountant,
        device: torch.device | str = "cpu",
        extra_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> DPStepStats:
        """One DP-SGD step: per-sample grads, clip, sum, noise, / expected batch size, step, account.

        Raises :class:`PrivacyBudgetSpent` (before touching anything) if this step would
        take epsilon past the plan's target. ``generator`` draws the noise: keep it private.
        """
        plan = self.plan
        eps_next = accountant.epsilon_after(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate,
                                            steps=1, delta=plan.delta)
        if budget_spent(accountant, plan, steps=1):
            raise PrivacyBudgetSpent(
                f"DP budget spent: epsilon {accountant.epsilon(delta=plan.delta):.3f} after {accountant.steps} "
                f"steps; one more step would exceed dp.target-epsilon={plan.target_epsilon}; this client "
                "stops contributing (raise dp.target-epsilon or plan fewer rounds)"
            )
        c = plan.max_grad_norm
        if len(batch) > 0:
            grads = self.per_sample_gradients(batch, grad_h, device=device, extra_loss=extra_loss,
                                              transform=transform)
            norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads], dim=1).norm(dim=1)  # (B,)
            mean_norm, clipped = float(norms.mean()), float((norms > c).float().mean())
        else:  # an empty Poisson batch still takes a (pure-noise) step, as the accountant assumes
            grads = [torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype) for p in self.params]
            mean_norm, clipped = 0.0, 0.0
        self._private_step(opt, grads, generator)
        accountant.record(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate)
        return DPStepStats(batch_size=len(batch), mean_grad_norm=mean_norm, clipped_fraction=clipped,
                           epsilon=eps_next)

    def _private_step(self, opt: torch.optim.Optimizer, grads: list[torch.Tensor],
                      generator: torch.Generator) -> None:
        """Opacus's ``DPOptimizer`` on ``opt``: clip each example's gradient (all tensors together) to C,
        sum, add N(0, (sigma C)^2) drawn from ``generator``, divide by the expected batch size, step.
        """
        from opacus.optimizers import DPOptimizer

        device = self.params[0].device
        if generator.device.type != device.type:
            raise ValueError(f"the DP noise generator is on {generator.device} but the parameters are on {device}; "
                             "make it on the parameters' device (randomness.make_generator(..., device=...))")
        opt.zero_grad(set_to_none=True)
        for p, g in zip(self.params, grads, strict=True):
            p.grad_sample = g  # Opacus's attribute: (B, *p.shape)
        dp_opt = DPOptimizer(opt, noise_multiplier=self.plan.noise_multiplier, max_grad_norm=self.plan.max_grad_norm,
                             expected_batch_size=self.plan.expected_batch_size,  # type: ignore[arg-type]
                             # "mean": divide by the expected batch size (the GSM's reduction is separate)
                             loss_reduction="mean", generator=generator, secure_mode=self.secure_mode)
        try:
            dp_opt.step()
        finally:
            for p in self.params:  # what DPOptimizer leaves on the parameters (p.grad stays, as after any step)
                p.grad_sample = None
                p.summed_grad = None

    def close(self) -> None:
        """Remove the Opacus hooks; the bottom is a plain module again."""
        from guardedtuning.compat import close_grad_sample_module

        close_grad_sample_module(self.gsm)
