"""ClientPrivacy: fresh randomness, the message sequence, the release path, DP-SGD sampling and budget, persistence (no Flower)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import RecordDict

from guardedtuning.clients.common import privacy_state, save_privacy
from guardedtuning.config import build_config
from guardedtuning.data.batches import batch_indices
from guardedtuning.errors import MessageError
from guardedtuning.privacy.client import ACCOUNTANT_KEY, ROWS_KEY, SEQUENCE_KEY, ClientPrivacy
from guardedtuning.privacy.dpsgd import DPAccountant, poisson_batch_indices
from guardedtuning.privacy.mechanisms import DChiMechanism, NoMechanism
from guardedtuning.privacy.randomness import STREAM_TOKEN_NOISE, derive_seed, make_generator


def _cfg(**flat):
    return build_config({"model.name": "tiny-bert", "privacy.mechanism": "dchi", "dp.enabled": False, **flat})


def _open(cfg, state=None, **kw):
    return ClientPrivacy.for_client(cfg, pid=kw.pop("pid", 3), num_examples=kw.pop("n", 40),
                                    mechanism=kw.pop("mechanism", NoMechanism()), state=state or {}, **kw)


def test_by_default_every_draw_is_fresh_and_no_seed_is_kept():
    cfg = _cfg()
    first = _open(cfg, mechanism=DChiMechanism(eta=5.0))
    assert first.fresh and first.to_state() == {}
    h, mask, ids = torch.zeros(1, 4, 8), torch.ones(1, 4, dtype=torch.long), torch.arange(4).reshape(1, 4)
    one = first.release(h, mask, input_ids=ids, step=0)["h"]
    assert not torch.equal(one, first.release(h, mask, input_ids=ids, step=0)["h"])  # same step, new noise


def test_the_sequence_admits_only_the_next_message_and_persists():
    priv = _open(_cfg())
    priv.admit(round_=1, step=0, resumed_after=0, source="m")
    priv.admit(round_=1, step=1, resumed_after=0, source="m")
    again = _open(_cfg(), priv.to_state())
    assert again.to_state()[SEQUENCE_KEY] == {"round": 1, "step": 1, "resumed": 0}
    for round_, step in ((1, 1), (1, 0), (1, 3), (2, 1), (0, 0)):
        with pytest.raises(MessageError, match="not the next"):
            again.admit(round_=round_, step=step, resumed_after=0, source="m")
    again.admit(round_=3, step=0, resumed_after=0, source="m")  # a client not sampled in round 2
    with pytest.raises(MessageError, match="`steps` is 4 but"):
        again.admit(round_=4, step=0, resumed_after=0, source="m", steps=4, planned_steps=6)
    again.admit(round_=2, step=0, resumed_after=1, source="m")  # restarted after round 1: round 2 re-sent
    with pytest.raises(MessageError, match="not the next round"):
        again.admit(round_=2, step=0, resumed_after=1, source="m")


def test_a_fixed_noise_seed_is_derived_per_client_and_not_stored():
    priv = _open(_cfg(**{"privacy.noise-seed": 11}), pid=2)
    assert priv.seed == derive_seed(11, 2) and priv.to_state() == {}


def test_no_mechanism_and_no_dp_need_no_seed():
    priv = _open(_cfg(**{"privacy.mechanism": "none"}))
    assert priv.seed == 0 and priv.to_state() == {} and not priv.dp
    priv.admit(round_=1, step=0, resumed_after=0, source="m")  # no noise to protect: no sequence kept
    priv.admit(round_=1, step=0, resumed_after=0, source="m")
    assert priv.to_state() == {} and not priv.ordered
    assert priv.budget_spent(steps=10**6) is False and priv.epsilon() is None and priv.metrics() == {}


def test_plan_and_accountant_come_together():
    priv = _open(_cfg(**{"dp.enabled": True}))
    with pytest.raises(ValueError, match="both `plan` and `accountant`"):
        ClientPrivacy(seed=1, plan=priv.plan)


def test_release_is_the_mechanism_on_the_private_stream_then_quantized():
    h, mask = torch.randn(2, 5, 8), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    ids = torch.arange(10).reshape(2, 5)
    mech = DChiMechanism(eta=5.0)
    priv = ClientPrivacy(seed=99, mechanism=mech, knobs=_cfg().privacy, pid=4)
    out = priv.release(h, mask, input_ids=ids, step=7)
    expected = mech.perturb(h, mask, generator=make_generator(99, STREAM_TOKEN_NOISE, 4, 7), input_ids=ids)
    torch.testing.assert_close(out["h"], expected)
    assert out["mask"].dtype == torch.uint8 and set(out) == {"h", "mask"}
    other = priv.release(h, mask, input_ids=ids, step=8)["h"]
    assert not torch.allclose(other, expected)  # each step its own draw
    quantized = ClientPrivacy(seed=99, mechanism=mech, knobs=_cfg(**{"privacy.quantize-bits": 8}).privacy,
                              pid=4).release(h, mask, input_ids=ids, step=7)
    assert set(quantized) == {"codes", "scales", "meta", "mask"} and quantized["codes"].dtype == np.uint8


def test_rows_are_poisson_only_under_dp_fresh_by_default_and_seeded_on_opt_in():
    plain = _open(_cfg())
    np.testing.assert_array_equal(plain.rows(40, step=5, batch_size=8, public_seed=0),
                                  batch_indices(40, 8, 5, seed=0, client=3))
    dp = _open(_cfg(**{"dp.enabled": True}))
    rows = dp.rows(40, step=5, batch_size=8, public_seed=0)
    np.testing.assert_array_equal(dp.to_state()[ROWS_KEY]["rows"], rows)  # kept for the backward
    fixed = _open(_cfg(**{"dp.enabled": True, "privacy.noise-seed": 11}))
    np.testing.assert_array_equal(fixed.rows(40, step=5, batch_size=8, public_seed=0),
                                  poisson_batch_indices(40, sample_rate=fixed.plan.sample_rate, step=5,
                                                        seed=fixed.seed, client=3))


def test_a_resumed_client_without_its_accountant_charges_the_rounds_before_the_restart():
    cfg = _cfg(**{"dp.enabled": True, "federation.rounds": 4})
    fresh = _open(cfg, round_=3, resumed_after=2)
    assert fresh.accountant.steps == 2 * cfg.train.local_steps
    assert fresh.to_state()[ACCOUNTANT_KEY]["history"].shape == (1, 3)
    assert _open(cfg, round_=2, resumed_after=5).accountant.steps == cfg.train.local_steps  # min(resumed, round - 1)
    # a client that kept its accountant is not charged again
    kept = _open(cfg, fresh.to_state(), round_=3, resumed_after=2)
    assert kept.accountant.steps == 2 * cfg.train.local_steps


def test_budget_and_report_under_dp():
    cfg = _cfg(**{"dp.enabled": True, "dp.target-epsilon": 2.0})
    priv = _open(cfg)
    assert not priv.budget_spent(steps=1) and priv.epsilon() == 0.0
    priv.charge(steps=100_000)  # rows unknown: every row counted in every step, up to the cap
    assert priv.budget_spent(steps=1)  # no row may take part in another step
    spent = priv.spent_metrics()
    # against the server the cap holds the target; the model's amplified epsilon of 1e5 steps does not, and the
    # model (computed from what the server sees) takes the smaller figure
    assert spent["budget-spent"] == 1.0 and 1.9 < spent["epsilon"] <= 2.0
    assert priv.accountant.epsilon(delta=cfg.dp.delta) > 2.0 and priv.epsilon_model() == spent["epsilon"]
    report = priv.report()
    assert report["dp_steps"] == 100_000 and report["dp_delta"] == cfg.dp.delta and report["mechanism"] == "none"
    assert report["dp_participations"] == report["dp_max_participations"] == priv.plan.max_participations
    assert report["dp_rows_at_cap"] == 40 and report["dp_membership_visible"] == 1
    hidden = _open(cfg, membership_visible=False)  # only an update leaves: the amplified figure, as before
    hidden.charge(steps=100_000)
    assert hidden.budget_spent(steps=1) and hidden.epsilon() > 2.0 and hidden.report()["dp_max_participations"] == 0


def test_a_row_at_the_cap_leaves_later_poisson_batches():
    cfg = _cfg(**{"dp.enabled": True, "dp.max-participations": 2, "train.batch-size": 20})
    priv = _open(cfg, n=40)
    assert priv.plan.max_participations == 2 and priv.plan.sample_rate == 0.5
    capped = np.arange(0, 40, 2)
    priv.accountant.participate(capped, n=40)
    priv.accountant.participate(capped, n=40)
    for step in range(30):
        rows = priv.rows(40, step=step, batch_size=20, public_seed=0)
        assert not set(rows.tolist()) & set(capped.tolist()) and len(rows) > 0
    assert priv.report()["dp_rows_at_cap"] == 20 and not priv.budget_spent(steps=1)
    priv.accountant.participate(np.arange(1, 40, 2), n=40)
    priv.accountant.participate(np.arange(1, 40, 2), n=40)
    assert priv.budget_spent(steps=1) and len(priv.rows(40, step=99, batch_size=20, public_seed=0)) == 0


def test_the_servers_ledger_can_only_make_the_accounting_stricter():
    """Finding 4: a client that lost its state, or kept a stale one, takes the server's larger step count."""
    cfg = _cfg(**{"dp.enabled": True, "dp.max-participations": 5})
    lost = _open(cfg, round_=3, ledger_steps=8)  # fresh state, the server says 8 steps were asked of it
    assert lost.accountant.steps == 8 and lost.report()["dp_participations"] == 5  # every row, up to the cap
    assert lost.epsilon() == pytest.approx(lost.accountant.server_epsilon(
        noise_multiplier=lost.plan.noise_multiplier, delta=cfg.dp.delta))
    own = _open(cfg)
    own.accountant.participate(np.array([1, 2]), n=40)
    own.accountant.record(noise_multiplier=own.plan.noise_multiplier, sample_rate=own.plan.sample_rate, steps=3)
    state = own.to_state()
    looser = _open(cfg, state, round_=2, ledger_steps=1)  # the server claims fewer steps: ignored
    assert looser.accountant.steps == 3 and looser.report()["dp_participations"] == 1
    stricter = _open(cfg, state, round_=2, ledger_steps=5)  # two steps the client did not count: every row +2
    assert stricter.accountant.steps == 5
    np.testing.assert_array_equal(stricter.accountant.participations[:4], [2, 3, 3, 2])


def test_state_round_trips_through_context_state():
    cfg = _cfg(**{"dp.enabled": True})
    priv = _open(cfg)
    priv.charge(steps=3)
    priv.admit(round_=2, step=0, resumed_after=1, source="m")
    rows = priv.rows(40, step=6, batch_size=8, public_seed=0)
    state = RecordDict()

    class Ctx:  # the one attribute save_privacy reads
        pass

    ctx = Ctx()
    ctx.state = state
    save_privacy(ctx, priv)  # type: ignore[arg-type]
    back = privacy_state(state)
    acc = DPAccountant()
    acc.load_state_dict(back[ACCOUNTANT_KEY])
    assert acc.steps == 3
    again = _open(cfg, back)
    assert again.accountant.steps == 3 and again.sequence == (2, 0, 1)
    np.testing.assert_array_equal(again.rows(40, step=6, batch_size=8, public_seed=0, again=True), rows)


def test_backward_without_dp_is_the_plain_backward_through_the_clip():
    """The clip the release applied is in the backward only when a mechanism is on (the released value)."""
    assert ClientPrivacy(seed=0, knobs=_cfg(**{"privacy.clip": 2.0}).privacy).transform() is not None
    assert ClientPrivacy(seed=0, knobs=_cfg(**{"privacy.clip": 2.0, "privacy.mechanism": "none"}).privacy
                         ).transform() is None
    assert ClientPrivacy(seed=0, knobs=_cfg().privacy).local_loss(None, None, torch.device("cpu")) is None


def test_client_privacy_needs_no_flower():
    import subprocess
    import sys

    code = ("import sys, guardedtuning.privacy.client, guardedtuning.privacy.attacks.harness; "
            "print(sorted({m.split('.')[0] for m in sys.modules if m.startswith(('flwr', 'ray'))}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
