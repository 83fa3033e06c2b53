"""The ``fedlora`` recipe: plain federated LoRA with local training (the FL baseline).

Each round the sampled clients receive the global adapters (LoRA on every block, and
the classification head), train locally for ``train.local-steps`` steps, and return
their updates; the strategy averages them. One round trip per round.
"""

from __future__ import annotations

import statistics

from flwr.app import ConfigRecord, MessageType
from flwr.serverapp import Grid

from guardedtuning.errors import ClientsFailed, MessageError
from guardedtuning.models.lora import load_trainable, trainable_state
from guardedtuning.models.parts import split_model
from guardedtuning.server_app.common import ServerRun, log, make_strategy
from guardedtuning.wire.exchange import exchange
from guardedtuning.wire.records import metric_value, record_to_tensors, tensors_to_record


def run_fedlora(grid: Grid, run: ServerRun) -> dict[str, float]:
    cfg, rec, task = run.cfg, run.rec, run.task
    model = split_model(cfg.model, cfg.split.layer, cfg.lora, task.num_labels, str(run.device), cfg.seed)
    global_state = trainable_state(model)
    strategy = make_strategy(cfg, MessageType.TRAIN)
    first = 1
    resumed = rec.load_checkpoint()
    if resumed is not None:
        done, state = resumed
        global_state, first = state["global"], done + 1
        log.info("resuming after round %d from %s", done, rec.checkpoint_path)
    run.wait_for_nodes(grid)
    metrics: dict[str, float] = {}
    for round_ in range(first, cfg.federation.rounds + 1):
        run.seed_round(round_)
        up0, down0 = rec.ledger.bytes_up, rec.ledger.bytes_down
        messages = list(strategy.configure_train(round_, tensors_to_record(global_state),
                                                 ConfigRecord({"local-steps": cfg.train.local_steps}), grid))
        if not messages:  # the strategy refused the round (logged): the global model stays as it is
            rec.event("refused", round=round_, reason="the strategy configured no round (see the log)")
        rec.event("round_start", round=round_, clients=[m.metadata.dst_node_id for m in messages], steps=1)
        rec.ledger.client_rounds += len(messages)
        ex = exchange(grid, messages, timeout=cfg.comm.timeout, poll=cfg.comm.poll_interval)
        run.account(ex)
        if messages and not ex.ok() and ex.failures():
            raise ClientsFailed(f"round {round_}: no client could take part; "
                                f"first reason: {next(iter(ex.failures().values()))}")
        losses = []
        for node, msg in ex.ok().items():
            try:
                losses.append(metric_value(msg.content["metrics"], "train_loss", source=f"reply of node {node}"))
            except (KeyError, MessageError):
                pass  # the strategy rejects the reply with its reason
        avg = run.aggregate(strategy, round_, ex) if messages else None
        if avg is not None:
            delta = record_to_tensors(avg, source="aggregate")
            global_state = {k: global_state[k] + delta[k] for k in global_state}
        else:
            log.warning("round %d: no valid update; the global model is unchanged", round_)
        load_trainable(model, global_state, source="global adapter")
        metrics = run.evaluate(model)
        loss = statistics.fmean(losses) if losses else None
        rec.event("step", round=round_, step=1, steps=1, loss=loss)
        rec.add_round(round_, utility=metrics["utility"], train_loss=loss, epsilon=None,
                      bytes_up=rec.ledger.bytes_up - up0, bytes_down=rec.ledger.bytes_down - down0,
                      extra={k: v for k, v in metrics.items() if k != "utility"})
        rec.save_checkpoint(round_, {"global": global_state})
    return metrics
