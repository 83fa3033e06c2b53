"""The ``central-ft`` recipe: single-process full fine-tuning, the utility ceiling.

No Flower and no network: one process trains every weight on the pooled training set.
To be comparable with the federated recipes it sees as many examples: each "round" is
``clients-per-round x local-steps`` steps of ``batch-size`` rows, and the model is
evaluated after each round.
"""

from __future__ import annotations

import statistics
import time

from guardedtuning.data.batches import batch_indices, collate, tokenize_rows
from guardedtuning.models.loading import load_tokenizer
from guardedtuning.models.parts import split_model
from guardedtuning.server_app.common import ServerRun
from guardedtuning.training import local_train, make_optimizer

POOLED = 1_000_000_007  # batch-order stream of the pooled data (clients use 0..N-1)


def run_central(run: ServerRun) -> dict[str, float]:
    cfg, rec, task = run.cfg, run.rec, run.task
    model = split_model(cfg.model, cfg.split.layer, cfg.lora, task.num_labels, str(run.device), cfg.seed, full=True)
    opt = make_optimizer(model, lr=cfg.central.lr, weight_decay=cfg.train.weight_decay)
    tok = load_tokenizer(cfg.model.name)
    per_round = cfg.federation.clients_per_round * cfg.train.local_steps
    examples = tokenize_rows(task.train, tok, model.kind, max_length=cfg.model.max_length,
                             label_names=task.label_names, instruction=task.instruction)
    metrics: dict[str, float] = {}
    for round_ in range(1, cfg.federation.rounds + 1):
        run.seed_round(round_)
        rec.event("round_start", round=round_, clients=[], steps=per_round)
        t0 = time.perf_counter()
        batches = (
            collate([examples[i] for i in batch_indices(len(examples), cfg.train.batch_size,
                                                        (round_ - 1) * per_round + s, seed=cfg.seed, client=POOLED)],
                    tok.pad_token_id)
            for s in range(per_round)
        )
        model.train()
        losses = local_train(model, opt, batches, run.device)
        model.eval()
        rec.ledger.server_s += time.perf_counter() - t0
        metrics = run.evaluate(model)
        rec.event("step", round=round_, step=per_round, steps=per_round, loss=losses[-1])
        rec.add_round(round_, utility=metrics["utility"], train_loss=statistics.fmean(losses), epsilon=None,
                      bytes_up=0, bytes_down=0, extra={k: v for k, v in metrics.items() if k != "utility"})
    return metrics
