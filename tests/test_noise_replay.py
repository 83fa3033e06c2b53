"""Issue 12, finding 2: a server that replays a step must not get the same noise twice.

The attack: a malicious server sends step 0 of round 1 with adapter A, then the same round
and step again with adapter B, and subtracts the two releases. Were the noise a function of
(private seed, partition, step) with the step taken from the server's message, the two
draws would be equal and the difference would be the difference of the clean activations
(the noise cancels). After the fix the client refuses the replay, and two releases of the
same input (the one replay the protocol must allow: a restarted run re-sending a round)
differ by noise of the mechanism's scale.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict

from guardedtuning.clients.split_client import handle_split_step
from guardedtuning.compat import TaskIdentity
from guardedtuning.config import build_config
from guardedtuning.errors import MessageError
from guardedtuning.models.lora import trainable_state
from guardedtuning.models.parts import client_bottom
from guardedtuning.privacy.client import ClientPrivacy
from guardedtuning.privacy.mechanisms import NoMechanism
from guardedtuning.privacy.randomness import STREAM_DP_NOISE
from guardedtuning.wire import split as wire
from guardedtuning.wire.records import tensors_to_record

ETA = 200.0


@pytest.fixture(autouse=True)
def _task_identity():
    TaskIdentity.task_id = TaskIdentity.run_id = TaskIdentity.node_id = 1  # as tests.local_grid does


def _flat(tiny_flat, **extra):
    return {**tiny_flat, "privacy.mechanism": "dchi", "privacy.eta": ETA, **extra}


def _context(flat, node=1000):
    return Context(run_id=1, node_id=node, node_config={"partition-id": 0, "num-partitions": 3},
                   state=RecordDict(), run_config=dict(flat))


def _adapter(flat, scale):
    """The global bottom LoRA the server sends; ``scale`` != 0 makes LoRA B non-zero (another adapter)."""
    cfg = build_config(flat)
    bottom = client_bottom(cfg.model, cfg.split.layer, cfg.lora, "cpu", cfg.seed)
    gen = torch.Generator().manual_seed(5)
    return {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in trainable_state(bottom).items()}


def _step0(flat, adapter, *, round_=1, resumed_after=0, steps=None):
    steps = build_config(flat).train.local_steps if steps is None else steps
    msg = wire.step_message(1000, round_, 0, steps, None, resumed_after)
    msg.content["arrays"] = tensors_to_record(adapter)
    msg.metadata.__dict__["_message_id"] = f"m{round_}-{resumed_after}-{id(adapter)}"
    return msg


def _released(msg: Message, context: Context) -> tuple[torch.Tensor, torch.Tensor]:
    """The released activations (B, T, D) and mask of a step-0 reply."""
    acts = handle_split_step(msg, context).content["acts"]
    h, mask = torch.from_numpy(acts["h"].numpy()), torch.from_numpy(acts["mask"].numpy()).bool()
    if h.dim() == 2:  # split.trim-padding (the default): the real tokens' rows; rebuild (B, T, D), zeros at padding
        dense = torch.zeros((*mask.shape, h.shape[-1]), dtype=h.dtype)
        dense[mask] = h
        h = dense
    return h, mask


def _clean(tiny_flat, adapter):
    """What the client's bottom computes on the same batch, without a mechanism."""
    flat = {**tiny_flat, "privacy.mechanism": "none"}
    return _released(_step0(flat, adapter), _context(flat))[0]


def test_a_replayed_step_is_refused_and_cannot_cancel_the_noise(tiny_flat):
    flat = _flat(tiny_flat)
    a, b = _adapter(flat, 0.0), _adapter(flat, 0.5)
    victim = _context(flat)
    h_a, mask = _released(_step0(flat, a), victim)
    clean_diff = (_clean(tiny_flat, a) - _clean(tiny_flat, b))[mask]
    assert float(clean_diff.norm(dim=-1).mean()) > 1e-2  # the two adapters compute different activations
    # the attack: round 1 step 0 again, with adapter B, and the difference of the two releases
    try:
        h_b, _ = _released(_step0(flat, b), victim)
    except MessageError as exc:
        assert "not the next round" in str(exc)
    else:
        recovered = float(((h_a - h_b)[mask] - clean_diff).norm(dim=-1).max())
        pytest.fail(f"the replay was answered: release A - release B is the clean difference within {recovered:.2e}")
    # what the attack would have recovered, had the client answered: two releases of the same step from one
    # client state (a fresh client opened at the same point) hold independent noise, so their difference is
    # the clean difference plus noise of the mechanism's scale, not the clean difference
    h_b, _ = _released(_step0(flat, b), _context(flat))
    residual = ((h_a - h_b)[mask] - clean_diff).norm(dim=-1)
    d = h_a.shape[-1]
    expected = np.sqrt(2 * d * (d + 1)) / ETA  # RMS norm of the difference of two d_chi draws (Gamma(d, eta))
    assert 0.5 * expected < float(residual.mean()) < 1.5 * expected, (float(residual.mean()), expected)


def test_two_releases_of_the_same_input_differ_by_the_mechanisms_noise(tiny_flat):
    flat = _flat(tiny_flat)
    a = _adapter(flat, 0.0)
    victim = _context(flat)
    h1, mask = _released(_step0(flat, a, round_=1), victim)
    # the one re-run the protocol allows: a server restarted after round 1 re-sends round 2, once
    h2, _ = _released(_step0(flat, a, round_=2), victim)
    h3, _ = _released(_step0(flat, a, round_=2, resumed_after=1), victim)
    with pytest.raises(MessageError, match="not the next round"):
        _released(_step0(flat, a, round_=2, resumed_after=1), victim)  # the same restart again: refused
    d = h1.shape[-1]
    expected = np.sqrt(2 * d * (d + 1)) / ETA
    diff = (h2 - h3)[mask].norm(dim=-1)  # the same input and adapter: only the noise differs
    assert 0.5 * expected < float(diff.mean()) < 1.5 * expected, (float(diff.mean()), expected)
    assert not torch.equal(h1, h2)


def test_steps_must_follow_each_other_and_match_the_plan(tiny_flat):
    flat = _flat(tiny_flat)
    a, victim = _adapter(flat, 0.0), _context(flat)
    with pytest.raises(MessageError, match="train.local-steps"):
        _released(_step0(flat, a, steps=1), victim)
    h, _ = _released(_step0(flat, a), victim)
    skip = wire.step_message(1000, 1, 2, build_config(flat).train.local_steps, torch.zeros_like(h), 0)
    skip.metadata.__dict__["_message_id"] = "skip"
    with pytest.raises(MessageError, match="expected step 1 of round 1"):
        handle_split_step(skip, victim)
    stale = _step0(flat, a, round_=1)
    with pytest.raises(MessageError, match="not the next round"):
        handle_split_step(stale, victim)


def test_dp_noise_and_poisson_rows_are_fresh_draws_kept_only_for_the_backward(tiny_flat):
    cfg = build_config(_flat(tiny_flat, **{"dp.enabled": True}))
    open_ = lambda state: ClientPrivacy.for_client(cfg, pid=0, num_examples=80, mechanism=NoMechanism(),  # noqa: E731
                                                   state=state)
    first, second = open_({}), open_({})
    assert first.fresh and first.to_state() == {}  # no seed is kept: there is none
    g1 = first.generator(STREAM_DP_NOISE, 3)
    g2 = second.generator(STREAM_DP_NOISE, 3)  # same step, same client: another draw
    assert not torch.equal(torch.randn(64, generator=g1), torch.randn(64, generator=g2))
    rows = [open_({}).rows(80, step=3, batch_size=8, public_seed=0) for _ in range(4)]
    assert len({tuple(r) for r in rows}) > 1  # the rows of a step are not a function of the step
    released = first.rows(80, step=3, batch_size=8, public_seed=0)
    back = open_(first.to_state())  # the next message: the backward recomputes the batch it released
    np.testing.assert_array_equal(back.rows(80, step=3, batch_size=8, public_seed=0, again=True), released)
    with pytest.raises(MessageError, match="rows of step 4 were not drawn"):
        back.rows(80, step=4, batch_size=8, public_seed=0, again=True)
