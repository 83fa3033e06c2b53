"""The end of a run whose clients' DP-SGD budgets ran out after some rounds (issue 17)."""

from __future__ import annotations

from guardedtuning.errors import BudgetSpent
from guardedtuning.results import Recorder
from guardedtuning.server_app.common import log


def replan_advice(rec: Recorder) -> str:
    """What to do when the plan leaves no room: a new plan, on a new output.dir, whose epsilon adds up.

    A changed plan changes the config's digest, and a resumed run on the same ``output.dir``
    with another digest is refused (:meth:`Recorder.load_privacy_ledger`): the earlier
    releases of the same clients' data must stay counted.
    """
    cfg = rec.cfg
    planned = cfg.federation.rounds * cfg.train.local_steps
    worst = rec.privacy_ledger.worst()[0] if cfg.dp.enabled else None
    so_far = "unknown" if worst is None else f"{worst:.3f}"
    return (f"worst node's epsilon so far: {so_far} of dp.target-epsilon {cfg.dp.target_epsilon}. A plan with room "
            f"for a re-run round sets dp.max-participations = federation.rounds x train.local-steps "
            f"(= {planned}); a new plan needs a new output.dir (--out), and the epsilons of runs on the same "
            "clients' data add up")


def stop_for_budget(rec: Recorder, exc: BudgetSpent) -> dict:
    """End a run whose clients' DP-SGD budgets ran out after some rounds: the record says so; its last metrics.

    A resumed run gets here: the ledger keeps the charge of the steps the interrupted attempt
    sent (their releases happened), the re-run round is charged again, and a plan calibrated
    to exactly ``federation.rounds x train.local-steps`` steps has no room for them. The run
    does not train past the budget and does not fail either: it stops after the last round
    that fit, with a ``budget_spent`` event and ``stopped`` in ``results.json``; the model is
    the last checkpoint's.

    Parameters
    ----------
    rec : Recorder
        The run's record, with at least one round in its history.
    exc : BudgetSpent
        Why the round could not run.

    Returns
    -------
    dict
        The last round's metrics (``utility``).
    """
    done = rec.history[-1]["round"]
    reason = (f"{exc}. The run stops after round {done} of {rec.cfg.federation.rounds} with the model of round "
              f"{done}; the interrupted attempt's steps stay charged (what a client released cannot be taken back)")
    if "dp.max-participations" not in str(exc):  # a driver's own BudgetSpent, without the engine's advice
        reason += f"; {replan_advice(rec)}"
    log.warning("%s", reason)
    rec.event("budget_spent", round=done + 1, rounds_done=done, message=reason)
    rec.extra["stopped"] = {"after_round": done, "reason": "privacy budget spent", "message": reason}
    return {"utility": rec.history[-1]["utility"]}
