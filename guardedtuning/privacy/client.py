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

No Flower here: the state that must survive between messages (the message sequence, the
Poisson rows of the last released step, the accountant) goes out as a plain dict
(:meth:`~ClientPrivacy.to_state`) and comes back in through
:meth:`~ClientPrivacy.for_client`; the ClientApp keeps it in ``context.state``.

Which randomness a guarantee rests on (token noise, DP noise, Poisson sampling): by
default (``privacy.noise-seed = -1``) every draw takes a generator seeded from fresh OS
entropy (:func:`~.randomness.fresh_generator`); nothing the server sends (round, step)
enters a seed, so a replayed message cannot make the client draw the same noise twice.
The one draw that must be repeated, a step's Poisson rows (the backward of split recomputes
the batch it released), is kept in the state. :meth:`~ClientPrivacy.admit` refuses a
message that is not the next one the client expects (a replayed or skipped round or
step), so each step's release happens once. ``privacy.noise-seed >= 0`` derives every draw
from that seed, (pid, step) instead: reproducible for tests and benchmarks, and void as a
guarantee (the server knows or can replay the streams).
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
from guardedtuning.errors import DataError, MessageError
from guardedtuning.models.loading import kind_of, load_tokenizer
from guardedtuning.privacy.dchi import clip_tokens
from guardedtuning.privacy.decorrelation import decorrelation_loss
from guardedtuning.privacy.dpsgd import (
    DPAccountant,
    DPPlan,
    DPStep,
    budget_spent,
    capped_epsilon,
    poisson_batch_indices,
)
from guardedtuning.privacy.local_dpsgd import LossBatch, dp_local_train
from guardedtuning.privacy.mechanisms import NoMechanism, TokenMechanism, mechanism_from_config
from guardedtuning.privacy.privtune import privtune_base, privtune_from_config
from guardedtuning.privacy.quantize import quantize_activations
from guardedtuning.privacy.randomness import (
    STREAM_DP_NOISE,
    STREAM_TOKEN_NOISE,
    derive_seed,
    fresh_generator,
    fresh_seed,
    make_generator,
)
from guardedtuning.training import backward_from_server, forward_activations, plain_steps

SEQUENCE_KEY = "privacy.sequence"
ROWS_KEY = "privacy.rows"
ACCOUNTANT_KEY = "dp.accountant"
STATE_KEYS = (SEQUENCE_KEY, ROWS_KEY, ACCOUNTANT_KEY)

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


@functools.lru_cache(maxsize=4)
def public_examples(data: DataConfig, seed: int, model: str, max_length: int) -> list[Example]:
    """The task's public labelled rows, tokenised as a client tokenises.

    The rows PrivTune's token importance comes from under ``privacy.importance-source=public``:
    up to ``data.test-size`` rows of the shuffled corpus after the training rows, so no client
    holds them and the evaluation never reads them (the held-out split, used before, made the
    evaluated utility optimistic: the noise was shaped on the very rows it was scored on).
    Every client and the attacks (``attacks/harness.py``) derive the same rows from the config,
    so the eta table they give is one public table. Cached per process (key: the data config,
    seed, model and length), so the clients of one process tokenise them once.

    Raises
    ------
    DataError
        When the corpus has no rows beyond the training and held-out ones.
    """
    task = load_task(data, seed)
    if task.public is None:
        raise DataError(
            f"privacy.importance-source=public needs labelled rows no client holds, but dataset {data.name!r} has "
            f"none left after data.train-size={data.train_size} and data.test-size={data.test_size}; lower "
            "data.train-size, or set privacy.importance-source=client (the releases then reveal which tokens "
            "the client's own rows make discriminative)")
    return tokenize_rows(task.public, load_tokenizer(model), kind_of(model), max_length=max_length,
                         label_names=task.label_names, instruction=task.instruction)


def importance_rows(cfg: RunConfig, examples: Sequence[Example]) -> Sequence[Example]:
    """The labelled rows PrivTune's token importance comes from: public rows or the client's ``examples``.

    ``privacy.importance-source=public`` (the default): :func:`public_examples`, the same for
    every client; ``client``: the client's own ``examples``, which its releases then reveal
    (see :data:`~guardedtuning.privacy.mechanisms.IMPORTANCE`).
    """
    if cfg.privacy.importance_source == "public":
        return public_examples(cfg.data, cfg.seed, cfg.model.name, cfg.model.max_length)
    return examples


def token_mechanism(cfg: RunConfig, examples: Sequence[Example]) -> TokenMechanism:
    """The token mechanism of a client whose rows are ``examples``.

    PrivTune's importance comes from :func:`importance_rows` (public rows by default, the
    client's ``examples`` with ``privacy.importance-source=client``) and its mean shift from
    the model's embeddings; every other mechanism depends on ``privacy.*`` only.
    """
    p: PrivacyConfig = cfg.privacy
    if p.mechanism != "privtune":
        return mechanism_from_config(p)
    tok = load_tokenizer(cfg.model.name)
    batch = collate(list(importance_rows(cfg, examples)), tok.pad_token_id)
    embeddings, scale = privtune_base(cfg.model, cfg.split.layer, cfg.seed)
    mech, _ = privtune_from_config(
        p, embeddings=embeddings, input_ids=batch.input_ids, attention_mask=batch.attention_mask,
        labels=batch.class_ids, num_classes=load_task(cfg.data, cfg.seed).num_labels,
        scale=scale, ignore_ids=tuple(tok.all_special_ids),
    )
    return mech


@functools.lru_cache(maxsize=64)
def dp_plan(dp: DPConfig, num_examples: int, batch_size: int, rounds: int, local_steps: int,
            membership_visible: bool = True) -> DPPlan:
    """The DP-SGD plan of a client with ``num_examples`` rows (cached: the noise search takes ~0.1 s).

    ``membership_visible``: the server sees which rows each step used (split learning); see
    :meth:`~guardedtuning.privacy.dpsgd.DPPlan.from_config`.
    """
    return DPPlan.from_config(dp, num_examples=num_examples, batch_size=batch_size, rounds=rounds,
                              local_steps=local_steps, membership_visible=membership_visible)


def _empty_batch() -> Batch:
    empty = torch.zeros((0, 1), dtype=torch.long)
    return Batch(empty, empty, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))


@dataclass
class ClientPrivacy:
    """One client's privacy setup; see the module docstring for what each method does.

    Parameters
    ----------
    seed
        A fixed seed every noise and sampling stream derives from (``privacy.noise-seed >= 0``:
        reproducible, no guarantee); unused when ``fresh``.
    mechanism
        The token mechanism applied to every released token vector.
    knobs
        The release and backward knobs (``privacy.clip``, ``privacy.quantize-bits``,
        ``privacy.nopeek-*``); the mechanism itself is ``mechanism``.
    plan, accountant
        DP-SGD's plan and this client's accountant, both or neither.
    pid
        The client's partition id (a stream label, so clients' draws are independent).
    fresh
        Whether every draw takes fresh OS entropy (the default of :meth:`for_client`).
    sequence
        ``(round, step, resumed-after)`` of the last message :meth:`admit` accepted.
    ordered
        Whether :meth:`admit` enforces the sequence: on whenever there is noise to protect (a
        token mechanism or DP-SGD); without, a replay would only show what the server sees anyway.
    kept_rows
        The Poisson rows drawn for one global step, ``{step: rows}`` (fresh draws under
        DP-SGD), kept so that the backward recomputes the batch that was released.
    num_examples
        The client's rows (the accountant counts each row's participations where the plan's
        membership is visible, and a row at the plan's cap leaves later batches).
    stochastic_rounding
        ``split.stochastic-rounding``: quantize the release (``privacy.quantize-bits``) with
        unbiased stochastic rounding, its uniforms drawn after the noise from the noise's generator.
    """

    seed: int
    mechanism: TokenMechanism = field(default_factory=NoMechanism)
    knobs: PrivacyConfig = field(default_factory=lambda: PrivacyConfig(mechanism="none"))
    plan: DPPlan | None = None
    accountant: DPAccountant | None = None
    pid: int = 0
    fresh: bool = False
    sequence: tuple[int, int, int] = (0, -1, 0)
    ordered: bool = True
    kept_rows: dict[int, np.ndarray] = field(default_factory=dict)
    num_examples: int = 0
    stochastic_rounding: bool = False

    def __post_init__(self) -> None:
        if (self.plan is None) != (self.accountant is None):
            raise ValueError("ClientPrivacy needs both `plan` and `accountant` (DP-SGD on) or neither (off), "
                             f"got plan={self.plan!r} and accountant={self.accountant!r}")

    # ------------------------------------------------------------------ building and persistence

    @classmethod
    def for_client(cls, cfg: RunConfig, *, pid: int, num_examples: int, mechanism: TokenMechanism,
                   state: Mapping[str, Mapping[str, Any]], round_: int = 1, resumed_after: int = 0,
                   membership_visible: bool = True, ledger_steps: int = 0) -> ClientPrivacy:
        """Client ``pid``'s privacy, restored from ``state`` (what :meth:`to_state` gave before).

        Parameters
        ----------
        membership_visible
            Whether the server sees which rows each DP-SGD step used (split learning: it
            receives exactly the sampled rows). Then the plan bounds each row's
            participations and epsilon is the worst row's against the server, without
            amplification (:class:`~guardedtuning.privacy.dpsgd.DPPlan`); ``False`` for a
            design whose client releases only an update (``gradfree``, ``offsite``).
        resumed_after
            > 0: the run restarted after that round. The accountant lives in the client's
            state, which a restarted run does not have: a client without one charges itself,
            before anything else, the steps of every round it could have taken part in before
            the restart (``min(resumed_after, round - 1) x local steps``).
        ledger_steps
            The DP-SGD steps the server's ledger has requested of this client so far (the
            round's first message carries them). The client takes the larger of its own count
            and the ledger's: the server can only make its accounting stricter. Steps it
            does not know the rows of are charged to every row (:meth:`charge`), up to the cap.
        """
        plan = accountant = None
        if cfg.dp.enabled:
            plan = dp_plan(cfg.dp, num_examples, cfg.train.batch_size, cfg.federation.rounds, cfg.train.local_steps,
                           membership_visible)
            accountant = DPAccountant(kind=cfg.dp.accountant)
        needs_noise = cfg.privacy.mechanism != "none" or plan is not None
        fixed = cfg.privacy.noise_seed >= 0  # reproducible, known to whoever knows the config: no guarantee
        seed = derive_seed(cfg.privacy.noise_seed, pid) if needs_noise and fixed else 0
        sequence = (0, -1, 0)
        if SEQUENCE_KEY in state:
            seq = state[SEQUENCE_KEY]
            sequence = (int(seq["round"]), int(seq["step"]), int(seq["resumed"]))
        kept: dict[int, np.ndarray] = {}
        if ROWS_KEY in state:
            kept = {int(np.asarray(state[ROWS_KEY]["step"]).reshape(-1)[0]):
                    np.asarray(state[ROWS_KEY]["rows"], dtype=np.int64).reshape(-1)}
        priv = cls(seed=seed, mechanism=mechanism, knobs=cfg.privacy, plan=plan, accountant=accountant, pid=pid,
                   fresh=needs_noise and not fixed, sequence=sequence, ordered=needs_noise, kept_rows=kept,
                   num_examples=num_examples, stochastic_rounding=cfg.split.stochastic_rounding)
        if accountant is not None:
            owed = max(0, int(ledger_steps))
            if ACCOUNTANT_KEY in state:
                accountant.load_state_dict({k: np.asarray(v) for k, v in state[ACCOUNTANT_KEY].items()})
                if plan.membership_visible and accountant.participations is None and num_examples > 0:
                    # steps without their rows (a state that kept no counts): every row in each, up to the cap
                    accountant.charge_unseen(accountant.steps, n=num_examples, cap=plan.max_participations)
            elif resumed_after > 0:
                owed = max(owed, min(resumed_after, round_ - 1) * cfg.train.local_steps)
            priv.charge(steps=owed - accountant.steps)
        return priv

    def to_state(self) -> dict[str, dict[str, Any]]:
        """What must survive until the client's next message: ``{key: {name: int | ndarray}}``.

        The sequence of accepted messages (once :meth:`admit` accepted one), the Poisson rows
        of the last fresh draw, and the accountant (once it counted a step). No seed: the
        default draws none that outlives a draw.
        """
        out: dict[str, dict[str, Any]] = {}
        if self.sequence != (0, -1, 0):
            out[SEQUENCE_KEY] = dict(zip(("round", "step", "resumed"), self.sequence, strict=True))
        for step, rows in self.kept_rows.items():
            out[ROWS_KEY] = {"step": np.asarray([step], dtype=np.int64), "rows": np.asarray(rows, dtype=np.int64)}
        if self.accountant is not None and self.accountant.steps > 0:
            out[ACCOUNTANT_KEY] = self.accountant.state_dict()
        return out

    # ------------------------------------------------------------------ message sequence

    def admit(self, *, round_: int, step: int, resumed_after: int, source: str, steps: int | None = None,
              planned_steps: int | None = None) -> None:
        """Accept a message for step ``step`` of round ``round_`` only if it is the next one expected.

        Parameters
        ----------
        round_, step
            The round and the step (or stage: 0 release, 1 train) the message asks for.
        resumed_after
            The message's ``resumed-after``: a restarted server re-sends the round after it.
        source
            The message, for the error.
        steps, planned_steps
            The message's ``steps`` and the plan's ``train.local-steps``; they must agree.

        Raises
        ------
        MessageError
            If ``steps`` is not the planned number, or the message is not the next one: step
            0 must open a round later than the last one this client took part in (or the round
            right after a new, larger ``resumed-after``: a restarted run), step s > 0 must
            follow step s - 1 of the same round. A replayed or skipped step would let the
            server ask for two releases of one step (e.g. under two adapters). The
            sequence is enforced only when ``ordered`` (there is noise to protect).
        """
        if steps is not None and planned_steps is not None and steps != planned_steps:
            raise MessageError(f"{source}: `steps` is {steps} but this client plans train.local-steps = "
                               f"{planned_steps}; a server asking for other step counts is refused")
        if not self.ordered:
            return
        last_round, last_step, resumed = self.sequence
        if step == 0:
            restart = resumed_after > resumed and round_ == resumed_after + 1
            if round_ < 1 or round_ <= resumed_after or not (round_ > last_round or restart):
                raise MessageError(
                    f"{source}: step 0 of round {round_} (resumed-after {resumed_after}) is not the next round: "
                    f"expected a round > {last_round}, or round {resumed_after + 1} only after a new restart "
                    f"(resumed-after > {resumed}); a replayed or stale round is refused")
        elif round_ != last_round or step != last_step + 1:
            raise MessageError(f"{source}: step {step} of round {round_} is not the next step: expected step "
                               f"{last_step + 1} of round {last_round} (or step 0 of a later round)")
        self.sequence = (round_, step, max(resumed, resumed_after))

    # ------------------------------------------------------------------ DP-SGD budget

    @property
    def dp(self) -> bool:
        """Whether this client trains under DP-SGD."""
        return self.plan is not None

    def charge(self, *, steps: int) -> None:
        """Count ``steps`` steps at the plan's noise and rate without taking them (no-op without DP-SGD).

        Where membership is visible the rows of those steps are unknown, so each row is
        counted as having taken part in each of them, up to the plan's cap.
        """
        if self.plan is None or self.accountant is None or steps <= 0:
            return
        self.accountant.record(noise_multiplier=self.plan.noise_multiplier, sample_rate=self.plan.sample_rate,
                               steps=steps)
        if self.plan.membership_visible and self.num_examples > 0:
            self.accountant.charge_unseen(steps, n=self.num_examples, cap=self.plan.max_participations)

    def budget_spent(self, *, steps: int) -> bool:
        """True if ``steps`` more DP-SGD steps would take epsilon past ``dp.target-epsilon`` (never without DP).

        Where membership is visible, also when every row has reached the plan's cap (no row
        could take part in another step).
        """
        if self.plan is None or self.accountant is None:
            return False
        if budget_spent(self.accountant, self.plan, steps=steps):
            return True
        return self._capped() is not None and bool(self._capped().all())

    def _capped(self) -> np.ndarray | None:
        """Which rows reached the plan's cap (None where nothing is capped)."""
        plan, acc = self.plan, self.accountant
        if plan is None or acc is None or not plan.membership_visible or plan.max_participations <= 0:
            return None
        if self.num_examples <= 0:
            return None
        return acc.rows(self.num_examples) >= plan.max_participations

    def epsilon(self) -> float | None:
        """Epsilon against the server so far at the plan's delta; None without DP-SGD.

        Where membership is visible: the worst row's participations as full Gaussian
        mechanisms (no amplification); otherwise the amplified epsilon of the steps.
        """
        if self.plan is None or self.accountant is None:
            return None
        if self.plan.membership_visible:
            return self.accountant.server_epsilon(noise_multiplier=self.plan.noise_multiplier, delta=self.plan.delta)
        return self.accountant.epsilon(delta=self.plan.delta)

    def epsilon_model(self) -> float | None:
        """Epsilon of the released model against third parties; None without DP-SGD.

        The amplified epsilon of the steps taken, and where membership is visible at most
        ``min(cap, steps)`` full Gaussian mechanisms: the cap bounds every row's participations
        whatever the sampling drew, while the amplified figure, blind to the cap, keeps growing.
        (Not the worst row's *realised* count: a third party does not see which rows were
        drawn, so the bound must hold over every draw.)
        """
        if self.plan is None or self.accountant is None:
            return None
        amplified = self.accountant.epsilon(delta=self.plan.delta)
        if self.plan.membership_visible:
            return min(amplified, capped_epsilon(noise_multiplier=self.plan.noise_multiplier, delta=self.plan.delta,
                                                 steps=self.accountant.steps, cap=self.plan.max_participations))
        return amplified

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
            capped = self._capped()
            out.update(dp_noise_multiplier=self.plan.noise_multiplier, dp_sample_rate=self.plan.sample_rate,
                       dp_epsilon=self.epsilon(), dp_epsilon_model=self.epsilon_model(), dp_delta=self.plan.delta,
                       dp_steps=self.accountant.steps, dp_max_participations=self.plan.max_participations,
                       dp_participations=self.accountant.max_participations,
                       dp_membership_visible=int(self.plan.membership_visible),
                       dp_rows_at_cap=int(capped.sum()) if capped is not None else 0)
        return out

    # ------------------------------------------------------------------ sampling

    def rows(self, n: int, *, step: int, batch_size: int, public_seed: int, again: bool = False) -> np.ndarray:
        """Rows of global step ``step`` out of ``n``: Poisson-sampled under DP-SGD, else fixed-size batches.

        Under DP-SGD with fresh entropy the rows are a fresh draw, kept (:attr:`kept_rows`,
        the last step only) so that ``again=True`` returns the rows drawn for ``step`` (the
        backward's recomputation); ``again`` for a step not kept raises ``MessageError``.
        """
        if self.plan is None:
            return batch_indices(n, batch_size, step, seed=public_seed, client=self.pid)
        if again and step in self.kept_rows:
            return self.kept_rows[step]
        if self.fresh and again:
            raise MessageError(f"the rows of step {step} were not drawn (kept: {sorted(self.kept_rows)}); "
                               "a backward must follow the release of its step")
        seed = fresh_seed() if self.fresh else self.seed
        rows = poisson_batch_indices(n, sample_rate=self.plan.sample_rate, step=step, seed=seed, client=self.pid)
        capped = self._capped() if n == self.num_examples else None
        if capped is not None:  # a row that reached dp.max-participations takes part in no later step
            rows = rows[~capped[rows]]
        self.kept_rows = {step: rows}
        return rows

    def batch(self, examples: Sequence[Example], *, step: int, batch_size: int, public_seed: int,
              pad_id: int, again: bool = False) -> Batch:
        """The batch of global step ``step`` (:meth:`rows`); an empty Batch for an empty Poisson draw."""
        idx = self.rows(len(examples), step=step, batch_size=batch_size, public_seed=public_seed, again=again)
        return collate([examples[i] for i in idx], pad_id) if len(idx) else _empty_batch()

    # ------------------------------------------------------------------ release

    def release(self, h: torch.Tensor, mask: torch.Tensor, *, input_ids: torch.Tensor, step: int) -> Released:
        """What leaves the client for activations ``h`` (B, T, D): perturbed, maybe quantized, and the mask.

        The noise is a fresh draw (:meth:`generator`). Keys: ``mask`` (uint8) and ``h``, or
        ``codes``/``scales``/``meta`` under ``privacy.quantize-bits``.
        """
        gen = self.generator(STREAM_TOKEN_NOISE, step)
        h = self.mechanism.perturb(h, mask, generator=gen, input_ids=input_ids)
        out: Released = {"mask": mask.to(torch.uint8)}
        if self.knobs.quantize_bits:  # after the noise: post-processing; stochastic rounding continues gen's stream
            rounding = gen if self.stochastic_rounding else None
            out.update(quantize_activations(h, bits=self.knobs.quantize_bits, generator=rounding).arrays())
        else:
            out["h"] = h
        return out

    def generator(self, stream: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
        """The generator of one draw: fresh OS entropy (``fresh``), else the stream ``(seed, stream, pid, step)``."""
        if self.fresh:
            return fresh_generator(device)
        return make_generator(self.seed, stream, self.pid, step, device=device)

    def release_batch(self, bottom: nn.Module, batch: Batch, device: torch.device, *, step: int) -> Released:
        """The release of one batch through ``bottom`` (:meth:`release`), with the batch's labels.

        An empty batch (a Poisson draw of no rows) releases (0, 1, D) zeros, D the released
        width (``split.release-dim`` when the bottom has a projection, else its hidden size).
        """
        if len(batch) == 0:
            hidden = int(getattr(bottom, "release_dim", 0) or bottom.word_embeddings().shape[1])  # type: ignore[operator]
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
            dp.step(opt, batch, grad_h, generator=self.generator(STREAM_DP_NOISE, step, device),
                    accountant=self.accountant, device=device, extra_loss=extra, transform=transform)
        finally:
            dp.close()
        if self.plan.membership_visible and self.num_examples > 0:  # the server saw these rows in this step
            if step in self.kept_rows:
                self.accountant.participate(self.kept_rows[step], n=self.num_examples)
            else:  # rows unknown (not drawn through rows()): every row may have been in the step
                self.accountant.charge_unseen(1, n=self.num_examples, cap=self.plan.max_participations)

    def train(self, model: nn.Module, opt: torch.optim.Optimizer, batches: Iterable[LossBatch], *,
              steps: Sequence[int], device: torch.device, train_mode: bool = False,
              dropout_seed: int | None = None) -> list[float]:
        """Local steps of ``model`` (with ``per_example_loss``) on ``batches``, one per global step in ``steps``.

        Under DP-SGD: clipped, noised (a fresh draw per step, :meth:`generator`) and
        accounted. Without: plain steps on the batch mean, in train mode if ``train_mode``,
        with torch's global generator seeded to ``dropout_seed`` (restored afterwards) if given.
        Returns each non-empty step's mean loss.
        """
        if self.plan is not None and self.accountant is not None:
            gens = (self.generator(STREAM_DP_NOISE, g, device) for g in steps)
            return dp_local_train(model, opt, batches, gens, plan=self.plan, accountant=self.accountant,
                                  device=device)
        with torch.random.fork_rng(devices=[]) if dropout_seed is not None else contextlib.nullcontext():
            if dropout_seed is not None:
                torch.manual_seed(dropout_seed)
            return plain_steps(model, opt, batches, device, train_mode=train_mode)
