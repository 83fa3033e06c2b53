"""The ``split`` recipe (GuardedTuning Online): split learning over the Message API.

A round, for the sampled clients C and local steps S (S + 1 round trips):

- message 0 (``train.split``, step 0) carries the global bottom LoRA; each client
  answers with the cut activations of its batch 0;
- message s (1 <= s <= S) carries the gradient for the activations of step s - 1; the
  client back-propagates it, steps its optimizer, and answers with the activations of
  step s, or, at s = S, with its bottom-LoRA update;
- between messages the server runs the top once on all clients' activations
  (:func:`guardedtuning.training.top_step`), updating the top and head;
- the updates are aggregated by the strategy and added to the global bottom LoRA; the
  assembled model is evaluated on the held-out split.

A client whose reply is an error, late or malformed is dropped for the rest of the
round (logged and counted); the round goes on with the others.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from guardedtuning.errors import ClientsFailed, MessageError
from guardedtuning.models.lora import load_trainable, trainable_state
from guardedtuning.models.parts import SplitModel, split_model
from guardedtuning.models.split import IGNORE
from guardedtuning.privacy.quantize import QuantizedActivations, dequantize_activations
from guardedtuning.server_app.common import ServerRun, log, make_strategy
from guardedtuning.training import ClientActs, make_optimizer, top_step
from guardedtuning.wire.exchange import Exchange, exchange
from guardedtuning.wire.records import get_record, record_to_tensors, tensors_to_record

MESSAGE_TYPE = "train.split"


def unpack_acts(msg: Message, *, hidden: int, max_batch: int, num_labels: int, kind: str) -> ClientActs:
    """A client's released activations, checked before they touch the top.

    ``num_labels`` is the number of classes (encoders) or the vocabulary size (decoders).
    """
    source = f"reply of node {msg.metadata.src_node_id}"
    record = get_record(msg.content, "acts", ArrayRecord, source=source, sender="ClientApp")
    acts = record_to_tensors(record, source=source)
    if "codes" in acts:  # quantized uplink (privacy.quantize-bits)
        acts["h"] = dequantize(record, source=source)
    for key in ("h", "mask", "labels"):
        if key not in acts:
            raise MessageError(f"{source}: activations record lacks {key!r}")
    h, mask, labels = acts["h"], acts["mask"], acts["labels"]
    if not h.is_floating_point() or h.dim() != 3 or h.shape[2] != hidden:
        raise MessageError(f"{source}: activations have shape {tuple(h.shape)} / dtype {h.dtype}, "
                           f"expected float (B, T, {hidden})")
    b, t = h.shape[0], h.shape[1]
    if not 0 <= b <= max_batch:  # 0: an empty Poisson batch under DP-SGD
        raise MessageError(f"{source}: batch of {b} rows, expected 0..{max_batch}")
    if b == 0:
        return ClientActs(h, mask.reshape(0, t), labels.reshape(0) if kind == "encoder" else labels.reshape(0, t))
    if tuple(mask.shape) != (b, t) or not bool(((mask == 0) | (mask == 1)).all()):
        raise MessageError(f"{source}: attention mask has shape {tuple(mask.shape)}, expected ({b}, {t}) of 0/1")
    if kind == "encoder":
        if tuple(labels.shape) != (b,) or labels.is_floating_point() or not bool(
                ((labels >= 0) & (labels < num_labels)).all()):
            raise MessageError(f"{source}: labels must be {b} class ids in 0..{num_labels - 1}")
    elif tuple(labels.shape) != (b, t) or labels.is_floating_point() or not bool(
            ((labels == IGNORE) | ((labels >= 0) & (labels < num_labels))).all()):
        raise MessageError(f"{source}: labels must be ({b}, {t}) token ids in 0..{num_labels - 1} or {IGNORE}")
    return ClientActs(h, mask, labels)


def dequantize(record: ArrayRecord, *, source: str) -> torch.Tensor:
    """Quantized activations (codes, scales, meta) back to float, checked before use.

    Codes must be uint8 (B, T, D) or packed (B, T, ceil(D/2)), scales finite float32
    (B, T); the decoded activations must be finite, since one client's inf would reach
    every client through the shared top.
    """
    try:
        arrays = {k: record[k].numpy() for k in ("codes", "scales", "meta")}
        codes, scales, meta = arrays["codes"], arrays["scales"], arrays["meta"]
        if codes.dtype != np.uint8 or codes.ndim != 3 or meta.shape != (2,) or meta.dtype.kind not in "iu":
            raise ValueError(f"codes {codes.dtype} {codes.shape}, meta {meta.dtype} {meta.shape}")
        if scales.dtype != np.float32 or scales.shape != codes.shape[:2] or not np.isfinite(scales).all():
            raise ValueError(f"scales {scales.dtype} {scales.shape} (finite float32 (B, T) expected)")
        bits, dim = int(meta[0]), int(meta[1])
        if codes.shape[2] != (dim if bits == 8 else (dim + 1) // 2):
            raise ValueError(f"{codes.shape[2]} code columns for {bits}-bit values of dimension {dim}")
        h = dequantize_activations(QuantizedActivations.from_arrays(arrays))
    except (KeyError, ValueError, IndexError, TypeError) as exc:
        raise MessageError(f"{source}: quantized activations cannot be decoded ({exc})") from exc
    if not torch.isfinite(h).all():
        raise MessageError(f"{source}: quantized activations decode to non-finite values")
    return h


def _step_message(node: int, round_: int, step: int, steps: int, grad: torch.Tensor | None,
                  resumed_after: int = 0) -> Message:
    content = RecordDict({"config": ConfigRecord({"server-round": round_, "step": step, "steps": steps,
                                                  "resumed-after": resumed_after})})
    if grad is not None:
        content["grad"] = tensors_to_record({"h": grad})
    return Message(content=content, message_type=MESSAGE_TYPE, dst_node_id=node)


def top_step_nonempty(top: torch.nn.Module, opt: torch.optim.Optimizer | None, acts: dict[int, ClientActs],
                      device: torch.device) -> tuple[dict[int, torch.Tensor], list[float]]:
    """:func:`top_step` over the clients that sent rows; an empty batch gets an empty gradient."""
    full = {n: a for n, a in acts.items() if a.h.shape[0] > 0}
    grads: dict[int, torch.Tensor] = {n: torch.zeros_like(a.h) for n, a in acts.items() if n not in full}
    losses: list[float] = []
    if full:
        g, losses = top_step(top, opt, list(full.values()), device)
        grads.update(zip(full, g, strict=True))
    return grads, losses


def run_split(grid: Grid, run: ServerRun) -> dict[str, float]:
    cfg, rec, task = run.cfg, run.rec, run.task
    model = split_model(cfg.model, cfg.split.layer, cfg.lora, task.num_labels, str(run.device), cfg.seed,
                        lora_top=cfg.lora.top)
    top_opt = make_optimizer(model.top, lr=cfg.train.server_lr, weight_decay=cfg.train.weight_decay)
    global_bottom = trainable_state(model.bottom)
    strategy = make_strategy(cfg, MESSAGE_TYPE)
    first = 1
    resumed = rec.load_checkpoint()
    # After a restart the clients' accountants are gone with their state; the config tells
    # them the run resumed after round ``resumed_after`` and each charges itself as if it had
    # taken part in every one of those rounds (an upper bound; see split_client.privacy_of).
    resumed_after = 0
    if resumed is not None:
        done, state = resumed
        global_bottom = state["global_bottom"]
        load_trainable(model.top, state["top"], source="checkpoint")
        if top_opt is not None:
            top_opt.load_state_dict(state["top_opt"])
        first, resumed_after = done + 1, done
        log.info("resuming after round %d from %s", done, rec.checkpoint_path)
    run.wait_for_nodes(grid)
    metrics: dict[str, float] = {}
    for round_ in range(first, cfg.federation.rounds + 1):
        run.seed_round(round_)
        up0, down0 = rec.ledger.bytes_up, rec.ledger.bytes_down
        losses, final = _train_round(grid, run, model, top_opt, strategy, global_bottom, round_, resumed_after)
        epsilon = run.note_privacy(final.ok()) if final is not None else None
        avg = run.aggregate(strategy, round_, final) if final is not None else None
        if avg is not None:
            delta = record_to_tensors(avg, source="aggregate")
            global_bottom = {k: global_bottom[k] + delta[k] for k in global_bottom}
        else:
            log.warning("round %d: no valid update; the global bottom adapter is unchanged", round_)
        load_trainable(model.bottom, global_bottom, source="global adapter")
        metrics = run.evaluate(model)
        rec.add_round(round_, utility=metrics["utility"], train_loss=statistics.fmean(losses) if losses else None,
                      epsilon=epsilon, bytes_up=rec.ledger.bytes_up - up0, bytes_down=rec.ledger.bytes_down - down0,
                      extra={k: v for k, v in metrics.items() if k != "utility"})
        rec.save_checkpoint(round_, {"global_bottom": global_bottom, "top": trainable_state(model.top),
                                     "top_opt": top_opt.state_dict() if top_opt is not None else None})
    return metrics


def _train_round(grid: Grid, run: ServerRun, model: SplitModel, top_opt: torch.optim.Optimizer | None,
                 strategy: Strategy, global_bottom: dict[str, torch.Tensor], round_: int,
                 resumed_after: int = 0) -> tuple[list[float], Exchange | None]:
    """The S + 1 exchanges of one round; returns the step losses and the final exchange.

    The final exchange (the clients' updates) is None when every client dropped out
    before the last step.
    """
    cfg, rec, task = run.cfg, run.rec, run.task
    steps = cfg.train.local_steps
    hidden = int(model.bottom.word_embeddings().shape[1])
    num_labels = task.num_labels if model.kind == "encoder" else int(model.top.head.weight.shape[0])
    # Poisson batches (DP-SGD) vary around batch-size; allow a generous bound
    max_batch = cfg.train.batch_size if not cfg.dp.enabled else 4 * cfg.train.batch_size + 64
    budget_out: list[int] = []
    config = ConfigRecord({"step": 0, "steps": steps, "resumed-after": resumed_after})
    messages = list(strategy.configure_train(round_, tensors_to_record(global_bottom), config, grid))
    if not messages:  # the strategy refused the round (logged): the global model stays as it is
        rec.event("refused", round=round_, reason="the strategy configured no round (see the log)")
        return [], None
    rec.event("round_start", round=round_, clients=[m.metadata.dst_node_id for m in messages], steps=steps)
    rec.ledger.client_rounds += len(messages)
    ex = exchange(grid, messages, timeout=cfg.comm.timeout, poll=cfg.comm.poll_interval)
    losses: list[float] = []
    for step in range(1, steps + 1):
        rec.ledger.step_overhead_s.append(run.account(ex))
        rec.ledger.step_wall_s.append(ex.wall_s)
        failures = ex.failures()
        for node, reason in failures.items():
            run.drop(node, reason, round_)
        acts: dict[int, ClientActs] = {}
        for node, msg in ex.ok().items():
            try:
                if "budget-spent" in msg.content.get("metrics", {}):
                    eps = msg.content["metrics"].get("epsilon", float("nan"))
                    budget_out.append(node)
                    run.drop(node, f"privacy budget spent (epsilon {eps:.3f} of dp.target-epsilon "
                                   f"{cfg.dp.target_epsilon}); it stops contributing", round_)
                    continue
                acts[node] = unpack_acts(msg, hidden=hidden, max_batch=max_batch,
                                         num_labels=num_labels, kind=model.kind)
            except MessageError as exc:
                failures[node] = str(exc)
                run.drop(node, str(exc), round_)
        if not acts:
            if step == 1 and budget_out and not failures:
                raise ClientsFailed(f"round {round_}: every sampled client has spent its privacy budget "
                                    f"(dp.target-epsilon {cfg.dp.target_epsilon}); plan fewer rounds or raise it")
            if step == 1 and failures:  # nobody could even start: stop with the reason
                raise ClientsFailed(f"round {round_}: no client could take part; "
                                    f"first reason: {next(iter(failures.values()))}")
            return losses, None
        t0 = time.perf_counter()
        grads, client_losses = top_step_nonempty(model.top, top_opt, acts, run.device)
        rec.ledger.server_s += time.perf_counter() - t0
        if client_losses:
            losses.append(statistics.fmean(client_losses))
        rec.event("step", round=round_, step=step, steps=steps, loss=losses[-1] if losses else None, clients=len(acts),
                  exchange_s=ex.wall_s, overhead_s=rec.ledger.step_overhead_s[-1])
        ex = exchange(grid, [_step_message(n, round_, step, steps, grads[n], resumed_after) for n in acts],
                      timeout=cfg.comm.timeout, poll=cfg.comm.poll_interval)
    run.account(ex)
    return losses, ex
