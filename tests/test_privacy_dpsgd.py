"""DP-SGD across the cut on a tiny split model (tiny-bert, bottom of 2 blocks, LoRA r=4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant

from guardedtuning.config import LoraConfig
from guardedtuning.config.privacy import DPConfig
from guardedtuning.data.batches import Batch, encode
from guardedtuning.errors import MessageError
from guardedtuning.models.loading import load_backbone
from guardedtuning.models.lora import add_lora, trainable_state
from guardedtuning.models.split import build_split
from guardedtuning.privacy.decorrelation import decorrelation_loss
from guardedtuning.privacy.dpsgd import (
    DPAccountant,
    DPPlan,
    DPStep,
    PrivacyBudgetSpent,
    amplified_epsilon,
    auto_max_participations,
    budget_spent,
    gaussian_epsilon,
    poisson_batch_indices,
    sample_rate_for,
)
from guardedtuning.training import backward_from_server

TEXTS = ["what a lovely day, truly great", "bad", "meh, it was fine I guess", "awful, just awful film",
         "I would watch it again"]
LABELS = [2, 0, 1, 0, 2]


def tiny_parts(scope: str = "all"):
    """A tiny-bert split with LoRA (B non-zero), the top frozen, both in eval mode, and a 5-row batch;
    ``scope`` as :func:`guardedtuning.models.lora.apply_scope` (``lora-b``: A frozen)."""
    from guardedtuning.models.lora import apply_scope

    bb = load_backbone("tiny-bert")
    bottom, top = build_split(bb, 2, num_labels=3)
    torch.manual_seed(0)
    add_lora(bottom, LoraConfig(rank=4), "encoder")
    with torch.no_grad():  # LoRA B starts at 0, which would make every A gradient 0
        for name, p in bottom.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    apply_scope(bottom, scope)
    for p in top.parameters():
        p.requires_grad_(False)
    bottom.eval()
    top.eval()
    batch = encode(bb.tokenizer, "encoder", TEXTS, LABELS, max_length=24,
                   label_names=("negative", "neutral", "positive"), instruction="")
    return bottom, top, batch


@pytest.fixture(scope="module")
def parts():
    return tiny_parts()


def server_grad(bottom, top, batch: Batch) -> torch.Tensor:
    """What ``training.top_step`` returns to one client: the gradient of its mean loss."""
    with torch.no_grad():
        h = bottom(batch.input_ids, batch.attention_mask)
    h.requires_grad_(True)
    top.per_example_loss(h, batch.attention_mask, batch.labels).mean().backward()
    return h.grad


def brute_force(bottom, top, batch: Batch, extra=None) -> list[torch.Tensor]:
    """Each example alone (its own padded row): gradient of its own loss."""
    params = [p for p in bottom.parameters() if p.requires_grad]
    rows = []
    for i in range(len(batch)):
        ids, mask = batch.input_ids[i : i + 1], batch.attention_mask[i : i + 1]
        h = bottom(ids, mask)
        loss = top.per_example_loss(h, mask, batch.labels[i : i + 1]).sum()
        if extra is not None:
            loss = loss + extra(ids, mask, h)
        rows.append(torch.autograd.grad(loss, params))
    return [torch.stack([r[j] for r in rows]) for j in range(len(params))]


def plan(**kw) -> DPPlan:
    base = dict(noise_multiplier=0.0, sample_rate=0.5, max_grad_norm=1e6, expected_batch_size=5.0,
                planned_steps=100, target_epsilon=float("inf"), delta=1e-5)  # sigma = 0: no budget
    return DPPlan(**{**base, **kw})


@pytest.fixture
def dp_step(parts):
    bottom = parts[0]
    steps: list[DPStep] = []

    def make(p: DPPlan, **kw) -> DPStep:
        steps.append(DPStep(bottom, p, **kw))
        return steps[-1]

    yield make
    for s in steps:
        s.close()


def test_per_sample_gradients_match_a_per_example_loop(parts, dp_step):
    bottom, top, batch = parts
    want = brute_force(bottom, top, batch)  # before Opacus hooks the bottom
    grads = dp_step(plan()).per_sample_gradients(batch, server_grad(bottom, top, batch))
    assert len(grads) == 8  # 2 blocks x (query, value) x (A, B)
    for g, w in zip(grads, want, strict=True):
        assert g.shape == (5, *w.shape[1:])
        assert w.abs().sum() > 0
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_mean_reduction_undoes_the_servers_batch_mean(parts, dp_step):
    """With a per-client mean loss on the server, Opacus's "mean" rescales by B; "sum" does not."""
    bottom, top, batch = parts
    grad_h = server_grad(bottom, top, batch)
    want = brute_force(bottom, top, batch)
    as_sum = dp_step(plan(), loss_reduction="sum").per_sample_gradients(batch, grad_h)
    for g, w in zip(as_sum, want, strict=True):
        torch.testing.assert_close(g * len(batch), w, rtol=1e-4, atol=1e-6)


def test_token_level_decorrelation_keeps_per_example_gradients_exact(parts, dp_step):
    bottom, top, batch = parts
    weight = 0.3

    def extra_batch(h):
        return weight * decorrelation_loss(bottom.embed(batch.input_ids), h, batch.attention_mask)

    def extra_one(ids, mask, h):
        return weight * decorrelation_loss(bottom.embed(ids), h, mask)

    want = brute_force(bottom, top, batch, extra=extra_one)
    grads = dp_step(plan()).per_sample_gradients(batch, server_grad(bottom, top, batch), extra_loss=extra_batch)
    for g, w in zip(grads, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Optimal order is the smallest alpha")  # sigma = 0: epsilon is infinite
def test_without_noise_or_clipping_a_dp_step_is_the_plain_step(parts, dp_step):
    bottom, top, batch = parts
    start = trainable_state(bottom)
    grad_h = server_grad(bottom, top, batch)
    params = [p for p in bottom.parameters() if p.requires_grad]
    backward_from_server(bottom, torch.optim.SGD(params, lr=0.1), batch, grad_h, torch.device("cpu"))
    plain = trainable_state(bottom)
    with torch.no_grad():
        for n, p in bottom.named_parameters():
            if p.requires_grad:
                p.copy_(start[n])
    dp_step(plan(expected_batch_size=float(len(batch)))).step(
        torch.optim.SGD(params, lr=0.1), batch, grad_h, generator=torch.Generator().manual_seed(0),
        accountant=DPAccountant())
    for n, v in trainable_state(bottom).items():
        torch.testing.assert_close(v, plain[n], rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        for n, p in bottom.named_parameters():
            if p.requires_grad:
                p.copy_(start[n])


def test_a_dp_step_clips_adds_noise_changes_lora_and_accounts(parts, dp_step):
    bottom, top, batch = parts
    start = trainable_state(bottom)
    params = [p for p in bottom.parameters() if p.requires_grad]
    acc = DPAccountant()
    p = plan(noise_multiplier=1.0, max_grad_norm=1e-3, target_epsilon=50.0)
    stats = dp_step(p).step(torch.optim.SGD(params, lr=0.5), batch, server_grad(bottom, top, batch),
                            generator=torch.Generator().manual_seed(1), accountant=acc)
    after = trainable_state(bottom)
    assert all(not torch.equal(after[n], start[n]) for n in start)  # A and B both move
    assert stats.batch_size == 5 and stats.clipped_fraction == 1.0 and stats.mean_grad_norm > 1e-3
    assert acc.steps == 1 and stats.epsilon == pytest.approx(acc.epsilon(delta=1e-5)) and stats.epsilon > 0
    with torch.no_grad():
        for n, q in bottom.named_parameters():
            if q.requires_grad:
                q.copy_(start[n])


@pytest.mark.parametrize("secure_mode", [False, True])
def test_the_noise_has_the_planned_scale(parts, dp_step, secure_mode):
    """Empty Poisson batch: the update is exactly N(0, (sigma C)^2) / expected batch size (also in secure_mode)."""
    bottom = parts[0]
    params = [p for p in bottom.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    empty = Batch(*(torch.zeros((0, 4), dtype=torch.long) for _ in range(2)), torch.zeros(0, dtype=torch.long),
                  torch.zeros(0, dtype=torch.long))
    step = dp_step(plan(noise_multiplier=2.0, max_grad_norm=0.5, expected_batch_size=4.0))
    step.secure_mode = secure_mode
    step.step(
        torch.optim.SGD(params, lr=1.0), empty, torch.zeros(0, 4, 64),
        generator=torch.Generator().manual_seed(2), accountant=DPAccountant())
    moved = torch.cat([(s - p.detach()).flatten() for p, s in zip(params, start, strict=True)])
    assert moved.std().item() == pytest.approx(2.0 * 0.5 / 4.0, rel=0.05)
    with torch.no_grad():
        for p, s in zip(params, start, strict=True):
            p.copy_(s)


def test_a_wrong_gradient_shape_is_named(parts, dp_step):
    bottom, _, batch = parts
    with pytest.raises(MessageError, match="activation gradient has shape"):
        dp_step(plan()).per_sample_gradients(batch, torch.zeros(1, 2, 3))


# --- accounting --------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "opacus_cls"), [("rdp", RDPAccountant), ("prv", PRVAccountant)])
def test_epsilon_matches_opacus_for_the_same_schedule_and_survives_a_round_trip(kind, opacus_cls):
    ref = opacus_cls()
    ours = DPAccountant(kind=kind)
    schedule = [(1.1, 0.02, 30), (1.1, 0.02, 30), (0.9, 0.05, 20)]  # two rounds, then a new rate
    for sigma, q, steps in schedule:
        for _ in range(steps):
            ref.step(noise_multiplier=sigma, sample_rate=q)
        state = ours.state_dict()  # persisted in context.state between rounds
        assert set(state) == {"history", "kind"} and all(isinstance(v, np.ndarray) for v in state.values())
        ours = DPAccountant(kind=kind)
        ours.load_state_dict({k: v.copy() for k, v in state.items()})
        ours.record(noise_multiplier=sigma, sample_rate=q, steps=steps)
    assert ours.steps == 80
    assert ours.epsilon(delta=1e-5) == pytest.approx(ref.get_epsilon(delta=1e-5), rel=1e-9)


def test_a_state_of_another_accountant_kind_is_refused():
    state = DPAccountant(kind="rdp").state_dict()
    with pytest.raises(MessageError, match="dp.accountant"):
        DPAccountant(kind="prv").load_state_dict(state)


def test_plan_meets_the_target_after_the_planned_steps():
    """Where the server cannot see batch membership: the amplified epsilon of the planned steps."""
    cfg = DPConfig(enabled=True, target_epsilon=3.0, delta=1e-5)
    p = DPPlan.from_config(cfg, num_examples=400, batch_size=16, rounds=3, local_steps=20, membership_visible=False)
    assert p.max_participations == 0 and not p.membership_visible
    assert p.sample_rate == pytest.approx(0.04) and p.planned_steps == 60 and p.expected_batch_size == 16
    acc = DPAccountant()
    acc.record(noise_multiplier=p.noise_multiplier, sample_rate=p.sample_rate, steps=p.planned_steps)
    assert 2.9 < acc.epsilon(delta=1e-5) <= 3.0
    assert p.describe()["noise_multiplier"] == p.noise_multiplier


def test_a_client_whose_budget_is_spent_is_detected_and_stops(parts, dp_step):
    bottom, top, batch = parts
    p = DPPlan.from_config(DPConfig(target_epsilon=1.0), num_examples=100, batch_size=10, rounds=1, local_steps=5,
                           membership_visible=False)
    acc = DPAccountant()
    acc.record(noise_multiplier=p.noise_multiplier, sample_rate=p.sample_rate, steps=5)
    assert not budget_spent(acc, p, steps=0)
    acc.record(noise_multiplier=p.noise_multiplier, sample_rate=p.sample_rate, steps=5)
    assert budget_spent(acc, p)
    start = trainable_state(bottom)
    params = [q for q in bottom.parameters() if q.requires_grad]
    with pytest.raises(PrivacyBudgetSpent, match="dp.target-epsilon=1.0"):
        dp_step(p).step(torch.optim.SGD(params, lr=1.0), batch, server_grad(bottom, top, batch),
                        generator=torch.Generator().manual_seed(0), accountant=acc)
    assert acc.steps == 10
    assert all(torch.equal(v, start[n]) for n, v in trainable_state(bottom).items())


def test_poisson_batches_are_a_pure_function_of_seed_client_and_step():
    a = poisson_batch_indices(1000, sample_rate=0.05, step=3, seed=9, client=1)
    assert np.array_equal(a, poisson_batch_indices(1000, sample_rate=0.05, step=3, seed=9, client=1))
    assert not np.array_equal(a, poisson_batch_indices(1000, sample_rate=0.05, step=4, seed=9, client=1))
    assert not np.array_equal(a, poisson_batch_indices(1000, sample_rate=0.05, step=3, seed=9, client=2))
    sizes = [len(poisson_batch_indices(1000, sample_rate=0.05, step=s, seed=0, client=0)) for s in range(200)]
    assert np.mean(sizes) == pytest.approx(50, rel=0.05) and np.std(sizes) > 3  # Binomial(1000, 0.05)
    assert sample_rate_for(batch_size=64, num_examples=10) == 1.0


def test_per_sample_gradients_on_a_decoder_bottom():
    """tiny-llama: causal masks, rotary positions and response-only loss, same identity."""
    bb = load_backbone("tiny-llama")
    bottom, top = build_split(bb, 2, num_labels=3)
    torch.manual_seed(1)
    add_lora(bottom, LoraConfig(rank=4), "decoder")
    with torch.no_grad():
        for name, p in bottom.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    for p in top.parameters():
        p.requires_grad_(False)
    bottom.eval()
    batch = encode(bb.tokenizer, "decoder", TEXTS[:3], LABELS[:3], max_length=48,
                   label_names=("negative", "neutral", "positive"), instruction="Classify.")
    want = brute_force(bottom, top, batch)
    step = DPStep(bottom, plan())
    try:
        grads = step.per_sample_gradients(batch, server_grad(bottom, top, batch))
    finally:
        step.close()
    for g, w in zip(grads, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_opacus_dp_optimizer_gives_the_hand_computed_step(parts, dp_step):
    """Clip to C, sum, N(0, (sigma C)^2) from the step's generator, / expected batch size: bit for bit."""
    bottom, top, batch = parts
    start = trainable_state(bottom)
    params = [p for p in bottom.parameters() if p.requires_grad]
    grad_h = server_grad(bottom, top, batch)
    p = plan(noise_multiplier=0.7, max_grad_norm=0.05, target_epsilon=float("inf"), expected_batch_size=4.0)
    step = dp_step(p)
    grads = step.per_sample_gradients(batch, grad_h)
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads], dim=1).norm(dim=1)
    factor = (p.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    gen = torch.Generator().manual_seed(5)
    expected = [s - 0.1 * (torch.einsum("i,i...->...", factor, g)
                           + torch.normal(0.0, 0.7 * 0.05, size=tuple(s.shape), generator=gen)) / 4.0
                for s, g in zip(params, grads, strict=True)]
    expected = [e.detach().clone() for e in expected]
    step.step(torch.optim.SGD(params, lr=0.1), batch, grad_h, generator=torch.Generator().manual_seed(5),
              accountant=DPAccountant())
    for q, e in zip(params, expected, strict=True):
        torch.testing.assert_close(q.detach(), e, rtol=0, atol=1e-7)
        assert getattr(q, "grad_sample", None) is None and getattr(q, "summed_grad", None) is None
    step.secure_mode = True  # as DPStep(bottom, plan, secure_mode=True)
    step.step(torch.optim.SGD(params, lr=0.1), batch, grad_h, generator=torch.Generator().manual_seed(5),
                accountant=DPAccountant())  # Opacus's floating-point-safe noise: runs, and moves LoRA again
    assert all(not torch.equal(q.detach(), e) for q, e in zip(params, expected, strict=True))
    with torch.no_grad():
        for n, q in bottom.named_parameters():
            if q.requires_grad:
                q.copy_(start[n])


# --- the epsilon against a server that sees which rows each step used (issue 12, finding 1) ---------------


def test_gaussian_epsilon_is_opacus_rdp_at_sample_rate_one():
    ref = RDPAccountant()
    for _ in range(7):
        ref.step(noise_multiplier=1.3, sample_rate=1.0)
    assert gaussian_epsilon(noise_multiplier=1.3, participations=7, delta=1e-5) == pytest.approx(
        ref.get_epsilon(delta=1e-5), rel=1e-12)
    assert gaussian_epsilon(noise_multiplier=1.3, participations=0, delta=1e-5) == 0.0
    # the amplified figure of the same example is far smaller: what a server that knows membership gives away
    assert amplified_epsilon(noise_multiplier=1.3, sample_rate=0.04, steps=100, delta=1e-5) < \
        gaussian_epsilon(noise_multiplier=1.3, participations=4, delta=1e-5) / 2


def test_the_visible_plan_meets_the_target_at_the_cap_without_amplification():
    cfg = DPConfig(enabled=True, target_epsilon=8.0, delta=1e-5)
    p = DPPlan.from_config(cfg, num_examples=400, batch_size=16, rounds=5, local_steps=20)
    assert p.membership_visible and p.max_participations >= 1
    at_cap = gaussian_epsilon(noise_multiplier=p.noise_multiplier, participations=p.max_participations, delta=1e-5)
    assert 7.9 < at_cap <= 8.0
    assert gaussian_epsilon(noise_multiplier=p.noise_multiplier, participations=p.max_participations + 1,
                            delta=1e-5) > 8.0  # the cap is what holds the target
    fixed = DPPlan.from_config(DPConfig(target_epsilon=8.0, max_participations=10), num_examples=400,
                               batch_size=16, rounds=5, local_steps=20)
    assert fixed.max_participations == 10 and fixed.noise_multiplier > p.noise_multiplier
    assert DPPlan.from_config(DPConfig(max_participations=1000), num_examples=400, batch_size=16, rounds=1,
                              local_steps=3).max_participations == 3  # never more than the planned steps


def test_auto_cap_maximises_expected_uses_per_unit_noise():
    from scipy.stats import binom

    from guardedtuning.privacy.dpsgd import noise_multiplier_for

    cap = auto_max_participations(target_epsilon=8.0, delta=1e-5, sample_rate=0.04, steps=100)

    def score(c):
        used = sum(binom.sf(j - 1, 100, 0.04) for j in range(1, c + 1))
        return used / noise_multiplier_for(target_epsilon=8.0, delta=1e-5, sample_rate=1.0, steps=c)

    assert all(score(cap) >= score(c) for c in range(1, 15))


def test_the_worst_rows_participations_give_the_server_epsilon_and_persist():
    acc = DPAccountant()
    acc.participate(np.array([0, 3]), n=5)
    acc.participate(np.array([3]), n=5)
    assert acc.max_participations == 2
    assert acc.server_epsilon(noise_multiplier=1.1, delta=1e-5) == gaussian_epsilon(
        noise_multiplier=1.1, participations=2, delta=1e-5)
    acc.record(noise_multiplier=1.1, sample_rate=0.4, steps=2)
    back = DPAccountant()
    back.load_state_dict(acc.state_dict())
    np.testing.assert_array_equal(back.participations, [1, 0, 0, 2, 0])
    back.charge_unseen(3, n=5, cap=4)  # three steps whose rows are unknown: every row, up to the cap
    np.testing.assert_array_equal(back.participations, [4, 3, 3, 4, 3])
    with pytest.raises(MessageError, match="counts 5 rows but this client has 6"):
        back.participate(np.array([0]), n=6)


@pytest.mark.parametrize("target", [8.0, 32.0])
def test_a_visible_membership_plan_takes_every_planned_step_at_a_large_target(target):
    """Regression: at ``dp.target-epsilon=32`` on the fast schedule the amplified epsilon (blind to the
    participation cap) passed the target in round 3 and every client stopped at 31.99 against the server.
    With membership visible the cap bounds both figures, so every planned step runs and ends within the target."""
    p = DPPlan.from_config(DPConfig(target_epsilon=target), num_examples=400, batch_size=16, rounds=3,
                           local_steps=10)
    acc, rng = DPAccountant(), np.random.default_rng(0)
    for _ in range(p.planned_steps):
        assert not budget_spent(acc, p, steps=1)
        counts = acc.rows(400)
        rows = np.flatnonzero((rng.random(400) < p.sample_rate) & (counts < p.max_participations))
        acc.record(noise_multiplier=p.noise_multiplier, sample_rate=p.sample_rate)
        acc.participate(rows, n=400)
    eps = acc.server_epsilon(noise_multiplier=p.noise_multiplier, delta=p.delta)
    assert 0 < eps <= target and acc.max_participations <= p.max_participations


def test_charging_unseen_steps_never_lowers_a_rows_count():
    """Review finding: counts above the cap (from another plan) were lowered to it by min(count + steps, cap)."""
    acc = DPAccountant()
    acc.rows(3)[:] = [3, 0, 0]
    acc.charge_unseen(1, n=3, cap=1)
    assert acc.rows(3).tolist() == [3, 1, 1]


def test_the_models_capped_epsilon_holds_over_every_draw_not_the_realised_worst_row():
    """A third party does not see which rows were drawn: min(cap, steps) mechanisms, not the worst row's count."""
    from guardedtuning.privacy.dpsgd import capped_epsilon

    eps = capped_epsilon(noise_multiplier=1.0, delta=1e-5, steps=10, cap=4)
    assert eps == gaussian_epsilon(noise_multiplier=1.0, participations=4, delta=1e-5)
    assert capped_epsilon(noise_multiplier=1.0, delta=1e-5, steps=2, cap=4) == gaussian_epsilon(
        noise_multiplier=1.0, participations=2, delta=1e-5)
    assert eps > gaussian_epsilon(noise_multiplier=1.0, participations=1, delta=1e-5)
