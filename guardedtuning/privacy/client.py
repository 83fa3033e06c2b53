"""One client's privacy, composed: its private randomness, token mechanism, DP-SGD plan and accountant.

A :class:`ClientPrivacy` is what every design's client calls where a guarantee is at
stake, instead of branching on whether DP-SGD is on:

- :meth:`~ClientPrivacy.rows` / :meth:`~ClientPrivacy.batch`: Poisson-sampled rows from the
  private seed under DP-SGD (``dp.enabled``); fixed-size shuffled batches (public seed) without;
- :meth:`~ClientPrivacy.release` / :meth:`~ClientPrivacy.release_batch`: the token mechanism
  (noise from the private seed), then ``privacy.quantize-bits``;
- :meth:`~ClientPrivacy.backward` (split) and :meth:`~ClientPrivacy.train` (gradfree,
  offsite): one DP-SGD step per batch (clipped, noised, accounted), or plain steps;
- :meth:`~ClientPrivacy.budget_spent`, :meth:`~ClientPrivacy.charge`,
  :meth:`~ClientPrivacy.epsilon`: the budget (never spent without DP-SGD);
- :meth:`~ClientPrivacy.metrics`, :meth:`~ClientPrivacy.spent_metrics`,
  :meth:`~ClientPrivacy.report`: what a reply says about it.

No Flower here: the state that must survive between messages (the private seed, the
accountant) goes out as a plain dict (:meth:`~ClientPrivacy.to_state`) and comes back in
through :meth:`~ClientPrivacy.for_client`; the ClientApp keeps it in ``context.state``.

Which randomness a guarantee rests on (token noise, DP noise, Poisson sampling): all of
it derives from the client's private seed, drawn once from the OS (``privacy.noise-seed
= -1``) and never from the run's public ``seed`` (:mod:`.randomness`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from guardedtuning.config import DataConfig, DPConfig, PrivacyConfig, RunConfig
from guardedtuning.data.batches import Batch, Example, batch_indices, collate, tokenize_rows
from guardedtuning.data.partition import load_partition
from guardedtuning.data.sources import load_task
from guardedtuning.models.loading import kind_of, load_tokenizer
from guardedtuning.privacy.dchi import clip_tokens
from guardedtuning.privacy.decorrelation import decorrelation_loss
from guardedtuning.privacy.dpsgd import DPAccountant, DPPlan, DPStep, budget_spent, poisson_batch_indices
from guardedtuning.privacy.local_dpsgd import LossBatch, dp_local_train
from guardedtuning.privacy.mechanisms import NoMechanism, TokenMechanism, mechanism_from_config
from guardedtuning.privacy.privtune import privtune_base, privtune_from_config
from guardedtuning.privacy.quantize import quantize_activations
from guardedtuning.privacy.randomness import (
    STREAM_DP_NOISE,
    STREAM_TOKEN_NOISE,
    derive_seed,
    make_generator,
    private_seed,
)
from guardedtuning.training import backward_from_server, forward_activations, plain_steps

SEED_KEY = "privacy.seed"
ACCOUNTANT_KEY = "dp.accountant"

Released = dict[str, "np.ndarray | torch.Tensor"]


@functools.lru_cache(maxsize=128)
def partition_examples(data: DataConfig, seed: int, pid: int, n: int, model: str, max_length: int) -> list[Example]:
    """Client ``pid``'s rows (of ``n`` partitions), tokenised once per process (bounded: recent clients).

    The private data that PrivTune's tables and the attacks' victim come from, and that the
    client trains on.
    """
    task = load_task(data, seed)
    return tokenize_rows(load_partition(data, pid, n, seed), load_tokenizer(model), kind_of(model),
                         max_length=max_length, label_names=task.label_names, instruction=task.instruction)


@functools.lru_cache(maxsize=64)
def client_mechanism(cfg: RunConfig, pid: int, n: int) -> TokenMechanism:
    """The token mechanism of client ``pid`` of ``n`` (:func:`token_mechanism` on its partition), built once."""
    examples = partition_examples(cfg.data, cfg.seed, pid, n, cfg.model.name, cfg.model.max_length)
    return token_mechanism(cfg, examples)


def token_mechanism(cfg: RunConfig, examples: Sequence[Example]) -> TokenMechanism:
    """The token mechanism of a client whose rows are ``examples``.

    PrivTune's tables (importance, mean shift) come from the client's own rows; every
    other mechanism depends on ``privacy.*`` only.
    """
    p: PrivacyConfig = cfg.privacy
    if p.mechanism != "privtune":
        return mechanism_from_config(p)
    tok = load_tokenizer(cfg.model.name)
    batch = collate(list(examples), tok.pad_token_id)
    embeddings, scale = privtune_base(cfg.model, cfg.split.layer, cfg.seed)
    mech, _ = privtune_from_config(
        p, embeddings=embeddings, input_ids=batch.input_ids, attention_mask=batch.attention_mask,
        labels=batch.class_ids, num_classes=load_task(cfg.data, cfg.seed).num_labels,
        scale=scale, ignore_ids=tuple(tok.all_special_ids),
    )
    return mech


@functools.lru_cache(maxsize=64)
def dp_plan(dp: DPConfig, num_examples: int, batch_size: int, rounds: int, local_steps: int) -> DPPlan:
    """The DP-SGD plan of a client with ``num_examples`` rows (cached: the noise search takes ~0.1 s)."""
    return DPPlan.from_config(dp, num_examples=num_examples, batch_size=batch_size, rounds=rounds,
                              local_steps=local_steps)


def _empty_batch() -> Batch:
    empty = torch.zeros((0, 1), dtype=torch.long)
    return Batch(empty, empty, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))


@dataclass
class ClientPrivacy:
    """One client's privacy setup; see the module docstring for what each method does.

    Parameters
    ----------
    seed
        The client's private seed (every noise and sampling stream derives from it).
    mechanism
        The token mechanism applied to every released token vector.
    knobs
        The release and backward knobs (``privacy.clip``, ``privacy.quantize-bits``,
        ``privacy.nopeek-*``); the mechanism itself is ``mechanism``.
    plan, accountant
        DP-SGD's plan and this client's accountant, both or neither.
    pid
        The client's partition id (a stream label, so clients' draws are independent).
    keep_seed
        Whether the seed was drawn privately and must persist (:meth:`to_state`).
    """

    seed: int
    mechanism: TokenMechanism = field(default_factory=NoMechanism)
    knobs: PrivacyConfig = field(default_factory=lambda: PrivacyConfig(mechanism="none"))
    plan: DPPlan | None = None
    accountant: DPAccountant | None = None
    pid: int = 0
    keep_seed: bool = False

    def __post_init__(self) -> None:
        if (self.plan is None) != (self.accountant is None):
            raise ValueError("ClientPrivacy needs both `plan` and `accountant` (DP-SGD on) or neither (off), "
                             f"got plan={self.plan!r} and accountant={self.accountant!r}")

    # ------------------------------------------------------------------ building and persistence

    @classmethod
    def for_client(cls, cfg: RunConfig, *, pid: int, num_examples: int, mechanism: TokenMechanism,
                   state: Mapping[str, Mapping[str, Any]], round_: int = 1, resumed_after: int = 0) -> ClientPrivacy:
        """Client ``pid``'s privacy, restored from ``state`` (what :meth:`to_state` gave before).

        ``resumed_after`` > 0 says the run restarted after that round. The accountant lives
        in the client's state, which a restarted run does not have: a client without one
        charges itself, before anything else, the steps of every round it could have taken
        part in before the restart (``min(resumed_after, round - 1) x local steps`` at its
        planned noise and rate). That is an upper bound on what it spent, on the schedule
        the noise was planned for, so the target still holds.
        """
        plan = accountant = None
        if cfg.dp.enabled:
            plan = dp_plan(cfg.dp, num_examples, cfg.train.batch_size, cfg.federation.rounds, cfg.train.local_steps)
            accountant = DPAccountant(kind=cfg.dp.accountant)
        needs_seed = cfg.privacy.mechanism != "none" or plan is not None
        keep = False
        if not needs_seed:
            seed = 0
        elif cfg.privacy.noise_seed >= 0:  # reproducible, and known to whoever knows the config
            seed = derive_seed(cfg.privacy.noise_seed, pid)
        else:
            keep = True
            seed = int(state[SEED_KEY]["seed"]) if SEED_KEY in state else private_seed()
        priv = cls(seed=seed, mechanism=mechanism, knobs=cfg.privacy, plan=plan, accountant=accountant, pid=pid,
                   keep_seed=keep)
        if accountant is not None:
            if ACCOUNTANT_KEY in state:
                accountant.load_state_dict({k: np.asarray(v) for k, v in state[ACCOUNTANT_KEY].items()})
            elif resumed_after > 0:
                priv.charge(steps=min(resumed_after, round_ - 1) * cfg.train.local_steps)
        return priv

    def to_state(self) -> dict[str, dict[str, Any]]:
        """What must survive until the client's next message: ``{key: {name: int | ndarray}}``.

        The private seed (if drawn from the OS) and the accountant (once it counted a step).
        """
        out: dict[str, dict[str, Any]] = {}
        if self.keep_seed:
            out[SEED_KEY] = {"seed": int(self.seed)}
        if self.accountant is not None and self.accountant.steps > 0:
            out[ACCOUNTANT_KEY] = self.accountant.state_dict()
        return out

    # ------------------------------------------------------------------ DP-SGD budget

    @property
    def dp(self) -> bool:
        """Whether this client trains under DP-SGD."""
        return self.plan is not None

    def charge(self, *, steps: int) -> None:
        """Count ``steps`` steps at the plan's noise and rate without taking them (no-op without DP-SGD)."""
        if self.plan is not None and self.accountant is not None and steps > 0:
            self.accountant.record(noise_multiplier=self.plan.noise_multiplier, sample_rate=self.plan.sample_rate,
                                   steps=steps)

    def budget_spent(self, *, steps: int) -> bool:
        """True if ``steps`` more DP-SGD steps would take epsilon past ``dp.target-epsilon`` (never without DP)."""
        if self.plan is None or self.accountant is None:
            return False
        return budget_spent(self.accountant, self.plan, steps=steps)

    def epsilon(self) -> float | None:
        """Epsilon spent so far at the plan's delta; None without DP-SGD."""
        if self.plan is None or self.accountant is None:
            return None
        return self.accountant.epsilon(delta=self.plan.delta)

    def metrics(self) -> dict[str, float]:
        """``{"epsilon": ...}`` for a reply's metrics under DP-SGD, else nothing."""
        eps = self.epsilon()
        return {} if eps is None else {"epsilon": eps}

    def spent_metrics(self) -> dict[str, float]:
        """The metrics of a reply that says the budget is spent (``budget-spent``, ``epsilon``)."""
        return {"budget-spent": 1.0, **self.metrics()}

    def report(self) -> dict[str, Any]:
        """The mechanism's figures (``None`` left out) and, under DP-SGD, its plan and epsilon so far."""
        out = {k: v for k, v in self.mechanism.describe().items() if v is not None}
        if self.plan is not None and self.accountant is not None:
            out.update(dp_noise_multiplier=self.plan.noise_multiplier, dp_sample_rate=self.plan.sample_rate,
                       dp_epsilon=self.accountant.epsilon(delta=self.plan.delta), dp_delta=self.plan.delta,
                       dp_steps=self.accountant.steps)
        return out

    # ------------------------------------------------------------------ sampling

    def rows(self, n: int, *, step: int, batch_size: int, public_seed: int) -> np.ndarray:
        """Rows of global step ``step`` out of ``n``: Poisson-sampled under DP-SGD, else fixed-size batches."""
        if self.plan is not None:
            return poisson_batch_indices(n, sample_rate=self.plan.sample_rate, step=step, seed=self.seed,
                                         client=self.pid)
        return batch_indices(n, batch_size, step, seed=public_seed, client=self.pid)

    def batch(self, examples: Sequence[Example], *, step: int, batch_size: int, public_seed: int,
              pad_id: int) -> Batch:
        """The batch of global step ``step`` (:meth:`rows`); an empty Batch for an empty Poisson draw."""
        idx = self.rows(len(examples), step=step, batch_size=batch_size, public_seed=public_seed)
        return collate([examples[i] for i in idx], pad_id) if len(idx) else _empty_batch()

    # ------------------------------------------------------------------ release

    def release(self, h: torch.Tensor, mask: torch.Tensor, *, input_ids: torch.Tensor, step: int) -> Released:
        """What leaves the client for activations ``h`` (B, T, D): perturbed, maybe quantized, and the mask.

        The noise stream is ``(seed, token noise, pid, step)``. Keys: ``mask`` (uint8) and
        ``h``, or ``codes``/``scales``/``meta`` under ``privacy.quantize-bits``.
        """
        gen = make_generator(self.seed, STREAM_TOKEN_NOISE, self.pid, step)
        h = self.mechanism.perturb(h, mask, generator=gen, input_ids=input_ids)
        out: Released = {"mask": mask.to(torch.uint8)}
        if self.knobs.quantize_bits:
            out.update(quantize_activations(h, bits=self.knobs.quantize_bits).arrays())
        else:
            out["h"] = h
        return out

    def release_batch(self, bottom: nn.Module, batch: Batch, device: torch.device, *, step: int) -> Released:
        """The release of one batch through ``bottom`` (:meth:`release`), with the batch's labels.

        An empty batch (a Poisson draw of no rows) releases (0, 1, D) zeros.
        """
        if len(batch) == 0:
            hidden = int(bottom.word_embeddings().shape[1])  # type: ignore[operator]
            return {"h": torch.zeros((0, 1, hidden)), "mask": batch.attention_mask.to(torch.uint8),
                    "labels": batch.labels}
        h = forward_activations(bottom, batch, device)  # (B, T, D)
        released = self.release(h, batch.attention_mask, input_ids=batch.input_ids, step=step)
        return {"mask": released.pop("mask"), "labels": batch.labels, **released}

    # ------------------------------------------------------------------ training

    def transform(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """What the release applies to activations before the noise (the clip), for the backward.

        The released value is clip(h) + noise: the server's gradient is for clip(h), so the
        recomputation applies the same clip (exact), not a straight-through estimate.
        """
        clip = self.knobs.clip if self.knobs.mechanism != "none" and self.knobs.clip > 0 else 0.0
        if not clip:
            return None
        return functools.partial(clip_tokens, clip=clip)

    def local_loss(self, bottom: nn.Module, batch: Batch,
                   device: torch.device) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The NoPeek term ``weight x dcor(embeddings, h)`` added to the server's objective, or None."""
        weight = self.knobs.nopeek_weight
        if weight <= 0:
            return None
        level = self.knobs.nopeek_level

        def extra(h: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                x = bottom.embed(batch.input_ids.to(device))  # type: ignore[operator]
            return weight * decorrelation_loss(x, h, batch.attention_mask.to(device), level=level)

        return extra

    def backward(self, bottom: nn.Module, opt: torch.optim.Optimizer, batch: Batch, grad_h: torch.Tensor,
                 device: torch.device, *, step: int) -> None:
        """Recompute ``bottom`` on ``batch`` and apply the server's gradient: plain, or one DP-SGD step."""
        extra, transform = self.local_loss(bottom, batch, device), self.transform()
        if self.plan is None or self.accountant is None:
            backward_from_server(bottom, opt, batch, grad_h, device, transform=transform, extra_loss=extra)
            return
        dp = DPStep(bottom, self.plan)
        try:
            dp.step(opt, batch, grad_h, generator=make_generator(self.seed, STREAM_DP_NOISE, self.pid, step,
                                                                 device=device),
                    accountant=self.accountant, device=device, extra_loss=extra, transform=transform)
        finally:
            dp.close()

    def train(self, model: nn.Module, opt: torch.optim.Optimizer, batches: Iterable[LossBatch], *,
              steps: Sequence[int], device: torch.device, train_mode: bool = False,
              dropout_seed: int | None = None) -> list[float]:
        """Local steps of ``model`` (with ``per_example_loss``) on ``batches``, one per global step in ``steps``.

        Under DP-SGD: clipped, noised and accounted (noise stream ``(seed, DP noise, pid,
        step)``). Without: plain steps on the batch mean, in train mode if ``train_mode``,
        with torch's global generator seeded to ``dropout_seed`` (restored afterwards) if given.
        Returns each non-empty step's mean loss.
        """
        if self.plan is not None and self.accountant is not None:
            gens = (make_generator(self.seed, STREAM_DP_NOISE, self.pid, g, device=device) for g in steps)
            return dp_local_train(model, opt, batches, gens, plan=self.plan, accountant=self.accountant,
                                  device=device)
        with torch.random.fork_rng(devices=[]) if dropout_seed is not None else contextlib.nullcontext():
            if dropout_seed is not None:
                torch.manual_seed(dropout_seed)
            return plain_steps(model, opt, batches, device, train_mode=train_mode)
