"""The round engine: the one server loop every federated design plugs into.

:func:`run_rounds` does what every design needs, once: resume from the checkpoint, wait
for the clients, then each round sample (the strategy's ``configure_train``), let the
design run its exchanges (:meth:`Design.train`), merge the clients' privacy reports,
aggregate (the strategy's ``aggregate_train``, which returns the new global arrays),
evaluate, record and checkpoint. A design supplies only what differs: its global state,
the config of its round's first message, its exchanges and its evaluation.

:class:`Round` is what a design's exchanges go through: the push/pull loop with its
accounting (bytes, overhead, step wall), and :meth:`Round.screen`, the one place where
failed, late and budget-spent clients leave a round and where a round that nobody could
take part in stops the run with the reason.

The privacy ledger (:class:`~guardedtuning.results.PrivacyLedger`, issue 12 finding 4):
:meth:`Round.exchange` charges each node the DP-SGD steps a message asks of it
(:meth:`Design.dp_steps`) and writes the ledger to disk *before* pushing, so a crash at
any point (also between aggregation and checkpoint) leaves the charge of what was sent;
a resumed run reloads it. Each round's first message tells a node the steps the ledger
holds for it (:func:`~guardedtuning.wire.ledger.with_ledger_steps`), and the record's
epsilon of each node is max(its own accountant, the ledger's).
"""

from __future__ import annotations

import statistics
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Any

import torch
from flwr.app import ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from guardedtuning.errors import BudgetSpent, ClientsFailed, MessageError
from guardedtuning.server_app.common import ServerRun, log, make_strategy
from guardedtuning.server_app.stopping import replan_advice, stop_for_budget
from guardedtuning.wire.exchange import Exchange, exchange
from guardedtuning.wire.ledger import with_ledger_steps
from guardedtuning.wire.records import metric_value, record_to_tensors, tensors_to_record


@dataclass
class Round:
    """One round in progress: its number, the run, and the exchanges it makes."""

    grid: Grid
    run: ServerRun
    strategy: Strategy
    number: int
    resumed_after: int
    last_overhead: float | None = None  # seconds of the last exchange during which no client computed
    design: Design | None = None  # whose messages ask for DP-SGD steps (:meth:`Design.dp_steps`)

    def exchange(self, messages: list[Message], *, step: bool = True) -> Exchange:
        """Push ``messages``, pull the replies; count bytes and compute (``step``: a training step's timing too).

        Under DP-SGD the privacy ledger charges each node the steps its message asks for, and
        is written to disk before anything is pushed.
        """
        cfg, led = self.run.cfg, self.run.rec.ledger
        asked = self._charge(messages)
        ex = exchange(self.grid, messages, timeout=cfg.comm.timeout, poll=cfg.comm.poll_interval)
        for node in ex.ok():
            if asked.get(node):
                self.run.rec.privacy_ledger.replied(node, asked[node])
        overhead = self.last_overhead = self.run.account(ex)
        if step:
            led.step_overhead_s.append(overhead)
            led.step_wall_s.append(ex.wall_s)
        return ex

    def _charge(self, messages: list[Message]) -> dict[int, int]:
        """Charge the ledger the DP-SGD steps of ``messages`` (saved at once); the steps asked of each node."""
        if self.design is None or not self.run.cfg.dp.enabled:
            return {}
        ledger = self.run.rec.privacy_ledger
        asked = {int(m.metadata.dst_node_id): self.design.dp_steps(m) for m in messages}
        for node, steps in asked.items():
            ledger.request(node, self.number, steps)
        self.run.rec.save_privacy_ledger()
        return asked

    def drop(self, node: int | None, reason: str) -> None:
        self.run.drop(node, reason, self.number)

    def screen(self, ex: Exchange, *, final: bool) -> tuple[dict[int, Message], dict[int, str], list[int]]:
        """The replies a design may use, the failures and the budget-spent clients of an exchange.

        A client whose privacy budget is spent leaves the round (logged, removed from
        ``ex`` so the strategy never sees it). Failures (error replies, timeouts) are
        dropped here, except in the round's ``final`` exchange, whose failures the
        aggregation drops.
        """
        failures = ex.failures()
        if not final:
            for node, reason in failures.items():
                self.drop(node, reason)
        ok: dict[int, Message] = {}
        spent: list[int] = []
        for node, msg in ex.ok().items():
            metrics = msg.content.get("metrics")
            if metrics is not None and "budget-spent" in metrics:
                spent.append(node)
                eps = metrics.get("epsilon", float("nan"))  # what the client claims: any type may come
                eps = f"{eps:.3f}" if isinstance(eps, (int, float)) and not isinstance(eps, bool) else repr(eps)[:40]
                self.drop(node, f"privacy budget spent (epsilon {eps} of dp.target-epsilon "
                                f"{self.run.cfg.dp.target_epsilon}); it stops contributing")
                ex.replies.pop(node)
                continue
            ok[node] = msg
        return ok, failures, spent

    def give_up_if_nobody(self, usable: int, failures: dict[int, str], spent: list[int]) -> None:
        """Stop the run, with the reason, when no sampled client could take part in the round."""
        if usable:
            return
        if spent and not failures:
            raise BudgetSpent(f"round {self.number}: every sampled client has spent its privacy budget "
                              f"(dp.target-epsilon {self.run.cfg.dp.target_epsilon}); {replan_advice(self.run.rec)}")
        if failures:
            also = (f"; {len(spent)} more had spent their privacy budget (dp.target-epsilon "
                    f"{self.run.cfg.dp.target_epsilon})" if spent else "")
            raise ClientsFailed(f"round {self.number}: no client could take part; "
                                f"first reason: {next(iter(failures.values()))}{also}")

    def step_event(self, step: int, steps: int, losses: list[float], ex: Exchange, clients: int) -> None:
        self.run.rec.event("step", round=self.number, step=step, steps=steps,
                           loss=statistics.fmean(losses) if losses else None, clients=clients,
                           exchange_s=ex.wall_s, overhead_s=self.last_overhead)


def train_losses(replies: dict[int, Message]) -> list[float]:
    """The ``train_loss`` metric of each reply that has one (the strategy rejects malformed replies)."""
    out = []
    for node, msg in replies.items():
        try:
            out.append(metric_value(msg.content["metrics"], "train_loss", source=f"reply of node {node}"))
        except (KeyError, MessageError):
            pass
    return out


@dataclass
class Outcome:
    """What a design's exchanges of one round produced."""

    losses: list[float]
    final: Exchange | None  # the replies carrying the updates; None when nobody reached the last step


class Design(ABC):
    """A federated design's server side, as :func:`run_rounds` drives it.

    Subclasses set :attr:`message_type` (the first message's type, which the strategy
    builds), :attr:`steps` (the round trips of a round, for the progress line) and
    :attr:`what` (the global state's name, for the log).
    """

    message_type: str
    what: str = "global adapters"

    def __init__(self, run: ServerRun) -> None:
        self.run = run

    @property
    def steps(self) -> int:
        return 1

    @abstractmethod
    def global_state(self) -> dict[str, torch.Tensor]:
        """The tensors the strategy sends and aggregates."""

    @abstractmethod
    def set_global(self, state: dict[str, torch.Tensor]) -> None:
        """Install a global state (also into the model that is evaluated): the aggregate, or a checkpoint's."""

    def round_config(self, rnd: Round) -> dict[str, Any]:
        """The ``config`` record of the round's first message (beside what the strategy adds)."""
        return {"resumed-after": rnd.resumed_after}

    def outgoing(self, rnd: Round, messages: list[Message]) -> list[Message]:
        """The strategy's first messages, as they are sent (a design may add to them)."""
        return messages

    def dp_steps(self, msg: Message) -> int:
        """The DP-SGD steps ``msg`` asks its node to take (the privacy ledger charges them when it is sent).

        Default: ``train.local-steps`` for a round's first message (a design whose client
        trains locally on it: its config has no ``step`` or ``stage``), 0 for any other;
        split learning and gradfree override it.
        """
        conf = msg.content.get("config")
        first = conf is not None and "server-round" in conf and "step" not in conf and "stage" not in conf
        return self.run.cfg.train.local_steps if first and self.run.cfg.dp.enabled else 0

    @abstractmethod
    def train(self, rnd: Round, messages: list[Message]) -> Outcome:
        """The round's exchanges, from the first messages to the replies carrying the updates."""

    def evaluate(self, rnd: Round) -> tuple[dict[str, float], dict[str, Any]]:
        """(metrics with ``utility``, the extra fields of the round's record)."""
        metrics = self.run.evaluate(self.evaluated_model())
        return metrics, {k: v for k, v in metrics.items() if k != "utility"}

    def evaluated_model(self) -> torch.nn.Module:
        raise NotImplementedError(f"{type(self).__name__} evaluates no model; override evaluate()")

    @abstractmethod
    def checkpoint(self) -> dict[str, Any]:
        """What a resumed run needs (tensors and optimizer state)."""

    @abstractmethod
    def restore(self, state: dict[str, Any]) -> None:
        """Load :meth:`checkpoint`'s output (the global state through :meth:`set_global`)."""

    def finish(self) -> None:
        """After the last round (e.g. a design's own block of the record); nothing by default."""
        return None


def run_rounds(grid: Grid, run: ServerRun, design: Design) -> dict[str, float]:
    """Run ``design`` for ``federation.rounds`` rounds (resuming after the checkpoint's); the last metrics."""
    cfg, rec = run.cfg, run.rec
    first, resumed_after = 1, 0
    rec.load_privacy_ledger()  # what earlier attempts of this run asked of each node (output.resume)
    resumed = rec.load_checkpoint()
    # After a restart the clients' accountants may be gone with their state; the config tells
    # them the run resumed after round ``resumed_after`` and each charges itself as if it had
    # taken part in every one of those rounds (an upper bound).
    if resumed is not None:
        done, state = resumed
        design.restore(state)
        first, resumed_after = done + 1, done
        log.info("resuming after round %d from %s", done, rec.checkpoint_path)
    per_round = run.per_round = run.wait_for_nodes(grid)
    fed = cfg.federation
    if per_round < fed.clients_per_round:  # fewer clients connected: plan the aggregation for those
        cfg = replace(cfg, federation=replace(fed, clients_per_round=per_round))
    strategy = make_strategy(cfg, design.message_type)
    metrics: dict[str, float] = {}
    try:
        metrics = _rounds(grid, run, design, cfg, strategy, first, resumed_after)
    except BudgetSpent as exc:  # after some rounds: the run stops there, with its record (none: an error)
        if not rec.history:
            raise
        metrics = stop_for_budget(rec, exc)
    design.finish()
    return metrics


def _rounds(grid: Grid, run: ServerRun, design: Design, cfg: Any, strategy: Any, first: int,
            resumed_after: int) -> dict[str, float]:
    """Rounds ``first`` .. ``federation.rounds`` of :func:`run_rounds`; the last metrics."""
    rec, metrics = run.rec, {}
    for number in range(first, cfg.federation.rounds + 1):
        run.seed_round(number)
        up0, down0 = rec.ledger.bytes_up, rec.ledger.bytes_down
        rnd = Round(grid, run, strategy, number, resumed_after, design=design)
        config = ConfigRecord(design.round_config(rnd))
        since = len(getattr(strategy, "rejections", []))
        messages = list(strategy.configure_train(number, tensors_to_record(design.global_state()), config, grid))
        outcome = Outcome([], None)
        if not messages:  # the strategy refused the round (logged): the global state stays as it is
            rec.event("refused", round=number, reason="the strategy configured no round (see the log)")
        else:
            messages = design.outgoing(rnd, messages)
            if cfg.dp.enabled:  # each node learns the steps the ledger holds for it (it keeps the larger count)
                ledger = rec.privacy_ledger
                messages = [with_ledger_steps(m, ledger.steps(m.metadata.dst_node_id)) for m in messages]
            rec.event("round_start", round=number, clients=[m.metadata.dst_node_id for m in messages],
                      steps=design.steps)
            rec.ledger.client_rounds += len(messages)
            outcome = design.train(rnd, messages)
        final = outcome.final
        if final is not None:
            run.note_privacy(final.ok())
            for node, msg in final.ok().items():
                report = msg.content.get("privacy")
                bad = rec.privacy_ledger.note(node, dict(report.items())) if report is not None else None
                if bad:  # the ledger's charge stands; the node's claim is not used
                    log.warning("round %d: node %s: its DP report is ignored by the privacy ledger: %s",
                                number, node, bad)
        epsilon, epsilon_model = rec.privacy_ledger.worst() if cfg.dp.enabled else (None, None)
        new = None
        if final is not None:
            new = run.aggregate(strategy, number, final, since=since)
        else:
            run.unaggregated(strategy, number, since=since)
        if new is not None:
            design.set_global(record_to_tensors(new, source="aggregate"))
        else:
            log.warning("round %d: no valid update; the %s are unchanged", number, design.what)
        metrics, extra = design.evaluate(rnd)
        rec.add_round(number, utility=metrics["utility"],
                      train_loss=statistics.fmean(outcome.losses) if outcome.losses else None, epsilon=epsilon,
                      epsilon_model=epsilon_model,
                      bytes_up=rec.ledger.bytes_up - up0, bytes_down=rec.ledger.bytes_down - down0, extra=extra)
        rec.save_checkpoint(number, design.checkpoint())
    return metrics
