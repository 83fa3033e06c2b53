"""The ``gradfree`` recipe (GuardedTuning Gradfree): no gradient crosses the cut.

A round, for the sampled clients (two round trips, plus the secure-aggregation stages):

- message 1 (``train.gradfree``, stage ``release``, built by the strategy) carries the
  global output adapter and head; each client answers with the perturbed activations of
  all of its rows and their attention mask, never labels;
- the server runs its frozen middle and top (blocks ``split.layer``..L, and the final
  norm of a decoder) on them, in ``eval.batch-size`` chunks, without autograd;
- message 2 (stage ``train``) carries those output hidden states; each client trains its
  output adapter and head on them with its own labels and answers with the update;
- the strategy aggregates the updates; the server evaluates the assembled model
  (bottom, middle and top, aggregated adapter and head) on the held-out split.

Nothing is trained on the server, and nothing it sends is a gradient. A reply that is an
error, late or malformed (shape, dtype, NaN, or anything besides the activations and the
mask, labels included) drops that client for the rest of the round.
"""

from __future__ import annotations

import statistics
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from guardedtuning.clients.gradfree_client import MESSAGE_TYPE, RELEASE, TRAIN
from guardedtuning.errors import ClientsFailed, ConfigError, MessageError
from guardedtuning.models.lora import load_trainable, trainable_state
from guardedtuning.models.output_adapter import GradfreeModel, build_gradfree_head
from guardedtuning.models.parts import split_model
from guardedtuning.models.split import Top
from guardedtuning.server_app.common import ServerRun, log, make_strategy
from guardedtuning.server_app.split_driver import dequantize
from guardedtuning.wire.exchange import Exchange, exchange
from guardedtuning.wire.records import get_record, metric_value, record_to_tensors, tensors_to_record

RELEASED = {"h", "mask"}
RELEASED_QUANTIZED = {"codes", "scales", "meta", "mask"}


def unpack_release(msg: Message, *, hidden: int, max_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A client's released activations (N, T, D) and mask (N, T), checked; anything else in them is refused."""
    source = f"reply of node {msg.metadata.src_node_id}"
    record = get_record(msg.content, "acts", ArrayRecord, source=source, sender="ClientApp")
    names = set(record.keys())
    if names not in (RELEASED, RELEASED_QUANTIZED):
        raise MessageError(f"{source}: a gradfree release holds {sorted(names)}, expected exactly "
                           f"{sorted(RELEASED)} or {sorted(RELEASED_QUANTIZED)} (labels never leave the client)")
    acts = record_to_tensors(record, source=source)
    h = dequantize(record, source=source) if "codes" in names else acts["h"]
    mask = acts["mask"]
    if not h.is_floating_point() or h.dim() != 3 or h.shape[2] != hidden or not 1 <= h.shape[0] <= max_rows:
        raise MessageError(f"{source}: activations have shape {tuple(h.shape)} / dtype {h.dtype}, expected float "
                           f"(N, T, {hidden}) with 1 <= N <= {max_rows}")
    if tuple(mask.shape) != tuple(h.shape[:2]) or not bool(((mask == 0) | (mask == 1)).all()):
        raise MessageError(f"{source}: attention mask has shape {tuple(mask.shape)}, expected {tuple(h.shape[:2])} "
                           "of 0/1")
    return h.float(), mask.long()


@torch.no_grad()
def middle_outputs(top: Top, h: torch.Tensor, mask: torch.Tensor, device: torch.device, chunk: int) -> torch.Tensor:
    """The frozen middle and top's output hidden states for every released row, (N, T, D) on the CPU."""
    top.eval()
    out = [top.hidden(h[s:s + chunk].to(device), mask[s:s + chunk].to(device)).cpu()
           for s in range(0, h.shape[0], chunk)]
    return torch.cat(out)


def _message(node: int, round_: int, z: torch.Tensor, resumed_after: int) -> Message:
    config = ConfigRecord({"server-round": round_, "stage": TRAIN, "resumed-after": resumed_after})
    return Message(RecordDict({"config": config, "out": tensors_to_record({"z": z})}), message_type=MESSAGE_TYPE,
                   dst_node_id=node)


def run_gradfree(grid: Grid, run: ServerRun) -> dict[str, float]:
    cfg, rec, task = run.cfg, run.rec, run.task
    model = split_model(cfg.model, cfg.split.layer, cfg.lora, task.num_labels, str(run.device), cfg.seed,
                        lora_bottom=False, lora_top=False)
    for p in model.parameters():  # nothing of the provider's model trains
        p.requires_grad_(False)
    hidden = int(model.bottom.word_embeddings().shape[1])
    lm_head = model.top.head if model.kind == "decoder" else None
    head = build_gradfree_head(model.kind, hidden, task.num_labels, cfg.gradfree.adapter_dim, seed=cfg.seed,
                               lm_head=lm_head).to(run.device)
    if not trainable_state(head):
        raise ConfigError(f"`gradfree.adapter-dim` is 0 but {cfg.model.name!r} is a decoder, whose head is the "
                          "frozen LM head: nothing would train; pass --set gradfree.adapter-dim=64")
    assembled = GradfreeModel(model.bottom, model.top, head)
    global_head = trainable_state(head)
    strategy = make_strategy(cfg, MESSAGE_TYPE)
    first, resumed_after = 1, 0
    resumed = rec.load_checkpoint()
    if resumed is not None:
        done, state = resumed
        global_head, first, resumed_after = state["global_head"], done + 1, done
        log.info("resuming after round %d from %s", done, rec.checkpoint_path)
    run.wait_for_nodes(grid)
    metrics: dict[str, float] = {}
    for round_ in range(first, cfg.federation.rounds + 1):
        run.seed_round(round_)
        up0, down0 = rec.ledger.bytes_up, rec.ledger.bytes_down
        losses, final = _train_round(grid, run, model.top, global_head, hidden, round_, strategy, resumed_after)
        epsilon = run.note_privacy(final.ok()) if final is not None else None
        avg = run.aggregate(strategy, round_, final) if final is not None else None
        if avg is not None:
            delta = record_to_tensors(avg, source="aggregate")
            global_head = {k: global_head[k] + delta[k] for k in global_head}
        else:
            log.warning("round %d: no valid update; the global adapter and head are unchanged", round_)
        load_trainable(head, global_head, source="global adapter")
        metrics = run.evaluate(assembled)
        rec.add_round(round_, utility=metrics["utility"], train_loss=statistics.fmean(losses) if losses else None,
                      epsilon=epsilon, bytes_up=rec.ledger.bytes_up - up0, bytes_down=rec.ledger.bytes_down - down0,
                      extra={k: v for k, v in metrics.items() if k != "utility"})
        rec.save_checkpoint(round_, {"global_head": global_head})
    return metrics


def _train_round(grid: Grid, run: ServerRun, top: Top, global_head: dict[str, torch.Tensor], hidden: int,
                 round_: int, strategy, resumed_after: int) -> tuple[list[float], Exchange | None]:  # type: ignore[no-untyped-def]
    """Release, middle pass, local training; returns the clients' losses and the final exchange."""
    cfg, rec = run.cfg, run.rec
    config = ConfigRecord({"stage": RELEASE, "resumed-after": resumed_after})
    messages = list(strategy.configure_train(round_, tensors_to_record(global_head), config, grid))
    if not messages:  # the strategy refused the round (logged): the global model stays as it is
        rec.event("refused", round=round_, reason="the strategy configured no round (see the log)")
        return [], None
    rec.event("round_start", round=round_, clients=[m.metadata.dst_node_id for m in messages], steps=2)
    rec.ledger.client_rounds += len(messages)
    ex = exchange(grid, messages, timeout=cfg.comm.timeout, poll=cfg.comm.poll_interval)
    rec.ledger.step_overhead_s.append(run.account(ex))
    rec.ledger.step_wall_s.append(ex.wall_s)
    failures = ex.failures()
    for node, reason in failures.items():
        run.drop(node, reason, round_)
    released: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    budget_out = []
    for node, msg in ex.ok().items():
        try:
            if "budget-spent" in msg.content.get("metrics", {}):
                budget_out.append(node)
                eps = msg.content["metrics"].get("epsilon", float("nan"))
                run.drop(node, f"privacy budget spent (epsilon {eps:.3f} of dp.target-epsilon "
                               f"{cfg.dp.target_epsilon}); it stops contributing", round_)
                continue
            released[node] = unpack_release(msg, hidden=hidden, max_rows=len(run.task.train))
        except MessageError as exc:
            failures[node] = str(exc)
            run.drop(node, str(exc), round_)
    if not released:
        if budget_out and not failures:
            raise ClientsFailed(f"round {round_}: every sampled client has spent its privacy budget "
                                f"(dp.target-epsilon {cfg.dp.target_epsilon}); plan fewer rounds or raise it")
        if failures:
            raise ClientsFailed(f"round {round_}: no client could take part; "
                                f"first reason: {next(iter(failures.values()))}")
        return [], None
    rec.event("step", round=round_, step=1, steps=2, loss=None, clients=len(released), exchange_s=ex.wall_s,
              overhead_s=rec.ledger.step_overhead_s[-1])
    t0 = time.perf_counter()
    outs = {n: middle_outputs(top, h, mask, run.device, cfg.eval.batch_size) for n, (h, mask) in released.items()}
    rec.ledger.server_s += time.perf_counter() - t0
    ex = exchange(grid, [_message(n, round_, z, resumed_after) for n, z in outs.items()],
                  timeout=cfg.comm.timeout, poll=cfg.comm.poll_interval)
    rec.ledger.step_overhead_s.append(run.account(ex))
    rec.ledger.step_wall_s.append(ex.wall_s)
    losses = []
    for node, msg in ex.ok().items():
        try:
            losses.append(metric_value(msg.content["metrics"], "train_loss", source=f"reply of node {node}"))
        except (KeyError, MessageError):
            pass  # the strategy rejects a malformed reply with its reason
    rec.event("step", round=round_, step=2, steps=2, loss=statistics.fmean(losses) if losses else None,
              clients=len(ex.ok()), exchange_s=ex.wall_s, overhead_s=rec.ledger.step_overhead_s[-1])
    return losses, ex

