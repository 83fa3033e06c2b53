"""The server's privacy ledger (issue 12, finding 4): max(client's accountant, ledger), persisted, no Flower run."""

from __future__ import annotations

import pytest

from guardedtuning.config import build_config
from guardedtuning.errors import ConfigError
from guardedtuning.privacy.dpsgd import amplified_epsilon, gaussian_epsilon
from guardedtuning.results import LEDGER_FILE, PrivacyLedger, Recorder

SIGMA, Q, DELTA = 1.2, 0.1, 1e-5


def _report(steps, participations, *, visible=True, cap=6):
    eps = (gaussian_epsilon(noise_multiplier=SIGMA, participations=participations, delta=DELTA) if visible
           else amplified_epsilon(noise_multiplier=SIGMA, sample_rate=Q, steps=steps, delta=DELTA))
    return {"dp_noise_multiplier": SIGMA, "dp_sample_rate": Q, "dp_delta": DELTA, "dp_steps": steps,
            "dp_epsilon": eps, "dp_epsilon_model": amplified_epsilon(noise_multiplier=SIGMA, sample_rate=Q,
                                                                     steps=steps, delta=DELTA),
            "dp_participations": participations, "dp_max_participations": cap if visible else 0,
            "dp_membership_visible": int(visible)}


def test_a_node_that_counted_every_step_keeps_its_own_figures():
    led = PrivacyLedger()
    assert led.epsilons(7) is None and led.worst() == (None, None)
    led.request(7, 1, 4)
    led.note(7, _report(4, 2))
    assert led.epsilons(7) == (_report(4, 2)["dp_epsilon"], _report(4, 2)["dp_epsilon_model"])


def test_steps_the_node_did_not_report_are_charged_to_every_row_up_to_the_cap():
    led = PrivacyLedger()
    led.request(7, 1, 4)
    led.request(7, 2, 4)  # e.g. a round whose final reply never came, or a client that lost its state
    led.note(7, _report(4, 2))
    eps, model = led.epsilons(7)
    assert eps == pytest.approx(gaussian_epsilon(noise_multiplier=SIGMA, participations=6, delta=DELTA))  # 2 + 4
    assert model == pytest.approx(amplified_epsilon(noise_multiplier=SIGMA, sample_rate=Q, steps=8, delta=DELTA))
    led.request(7, 3, 4)  # 2 + 8 participations, but the cap holds (the client enforced it)
    assert led.epsilons(7)[0] == pytest.approx(gaussian_epsilon(noise_multiplier=SIGMA, participations=6,
                                                                delta=DELTA))
    led.note(8, _report(3, 0, visible=False))
    led.request(8, 1, 5)
    assert led.epsilons(8)[0] == pytest.approx(amplified_epsilon(noise_multiplier=SIGMA, sample_rate=Q, steps=5,
                                                                 delta=DELTA))
    assert led.worst()[0] == max(led.epsilons(7)[0], led.epsilons(8)[0])


def test_the_ledger_is_saved_with_the_configs_digest_and_reloaded_only_on_resume(tmp_path):
    cfg = build_config({"model.name": "tiny-bert", "output.dir": str(tmp_path)})
    rec = Recorder(cfg, tmp_path, model="m", dataset="d")
    rec.privacy_ledger.request(3, 1, 20)
    rec.privacy_ledger.note(3, _report(20, 5))
    rec.save_privacy_ledger()
    assert (tmp_path / LEDGER_FILE).is_file()
    again = Recorder(cfg, tmp_path, model="m", dataset="d")
    again.load_privacy_ledger()
    assert again.privacy_ledger.steps(3) == 20 and again.privacy_ledger.epsilons(3) == rec.privacy_ledger.epsilons(3)
    other = build_config({"model.name": "tiny-bert", "output.dir": str(tmp_path), "dp.target-epsilon": 2.0})
    fresh = Recorder(other, tmp_path, model="m", dataset="d")
    with pytest.raises(ConfigError, match="new output.dir"):  # another config: refused, not a fresh ledger
        fresh.load_privacy_ledger()
    no_resume = Recorder(build_config({"model.name": "tiny-bert", "output.dir": str(tmp_path),
                                       "output.resume": False}), tmp_path, model="m", dataset="d")
    no_resume.load_privacy_ledger()
    assert no_resume.privacy_ledger.steps(3) == 0


def test_the_ledger_steps_ride_on_a_copy_of_the_first_message_and_are_checked():
    from flwr.app import ConfigRecord, Message, RecordDict

    from guardedtuning.compat import TaskIdentity
    from guardedtuning.errors import MessageError
    from guardedtuning.wire.ledger import ledger_steps_of, with_ledger_steps

    TaskIdentity.task_id = TaskIdentity.run_id = TaskIdentity.node_id = 1  # as tests.local_grid does
    shared = RecordDict({"config": ConfigRecord({"server-round": 1})})  # a strategy may share one content
    msg = Message(shared, dst_node_id=5, message_type="train")
    marked = with_ledger_steps(msg, 7)
    assert ledger_steps_of(marked, source="m") == 7 and ledger_steps_of(msg, source="m") == 0
    assert "dp-ledger-steps" not in shared["config"] and marked.metadata.dst_node_id == 5
    for bad in (-1, 2**40):
        with pytest.raises(MessageError, match="dp-ledger-steps"):
            ledger_steps_of(with_ledger_steps(msg, bad), source="m")


@pytest.mark.parametrize("bad", [{"dp_noise_multiplier": [1.0]}, {"dp_epsilon": float("nan")},
                                 {"dp_sample_rate": 2.0}, {"dp_steps": "3"}, {"dp_participations": 1.5}])
def test_a_malformed_dp_report_is_ignored_and_the_charge_stands(bad):
    led = PrivacyLedger()
    led.request(7, 1, 4)
    assert led.note(7, _report(4, 2)) is None
    good = led.epsilons(7)
    led.request(7, 2, 4)
    assert led.note(7, {**_report(8, 3), **bad})  # the reason
    assert led.nodes[7].report == _report(4, 2)  # the last good report
    assert led.epsilons(7)[0] > good[0]  # and the 4 steps it did not report are charged
