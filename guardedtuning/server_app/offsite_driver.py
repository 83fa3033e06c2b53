"""The ``offsite`` recipe (GuardedTuning Offline, offsite tuning with an emulator).

Before round 1 the server builds, from its full model (L blocks):

- the emulator: the first and last ``a`` blocks, and ``L'`` of the ``L - 2a`` middle blocks
  kept by uniform layer drop, optionally distilled against the full middle on public
  synthetic text (:mod:`guardedtuning.models.emulator` documents the loss);
- its package: the frozen weights a client needs, with a digest.

A round (one round trip, plus the secure-aggregation stages): the strategy sends the
sampled clients the global adapters (``train.offsite``); a client that never had the
emulator also gets the package, once. Clients train locally (DP-SGD under ``dp.enabled``)
and reply with adapter updates; the strategy aggregates them. The server then plugs the
aggregate into its full model and evaluates three models on the held-out split:

- plug-in: the full model with the aggregated adapters (the round's ``utility``);
- emulator: the emulator with the same adapters (what a client could get without the
  provider: offsite tuning protects the model only if this stays clearly below plug-in);
- full fine-tuning (``offsite.reference``): the same adapters trained on the *full* model
  in the server process, the way the clients train them (the same number of clients per
  round drawn with the same seeded sampling over partitions, their batches, local steps,
  optimizer and DP-SGD setting, plain FedAvg): the ceiling of the plug-in. The server
  holds every partition only because this is a simulation; it is a yardstick, not part
  of the protocol, and it costs server time (``offsite.reference_s``).
"""

from __future__ import annotations

import random
import time
from typing import Any

import torch
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from guardedtuning.config import RunConfig
from guardedtuning.data.batches import Example, batch_indices, collate, tokenize_rows
from guardedtuning.data.partition import load_partition
from guardedtuning.data.sources import load_task
from guardedtuning.data.synthetic import synthetic_rows
from guardedtuning.models.emulator import (
    SandwichModel,
    add_adapters,
    distill_emulator,
    emulator_sandwich,
    frozen_package,
    full_sandwich,
    middle_mse,
    num_package_values,
    package_digest,
    uniform_keep,
)
from guardedtuning.models.loading import kind_of, load_tokenizer
from guardedtuning.models.lora import load_trainable, trainable_state
from guardedtuning.privacy.dpsgd import DPAccountant, DPPlan, poisson_batch_indices
from guardedtuning.privacy.local_dpsgd import LossBatch, dp_local_train
from guardedtuning.privacy.randomness import STREAM_DP_NOISE, make_generator
from guardedtuning.server_app.common import ServerRun
from guardedtuning.server_app.engine import Design, Outcome, Round, run_rounds, train_losses
from guardedtuning.training import local_train, make_optimizer
from guardedtuning.wire.offsite import EMULATOR_KEY, MESSAGE_TYPE, with_package
from guardedtuning.wire.records import message_nbytes, tensors_to_record

DISTILL_SEED = 104_729  # public distillation text: synthetic rows from another seed than any task's


class FullReference:
    """The same adapters trained on the full model as the clients train them on the emulator."""

    def __init__(self, cfg: RunConfig, num_labels: int, device: torch.device, init: dict[str, torch.Tensor]) -> None:
        self.cfg, self.device = cfg, device
        self.model = full_sandwich(cfg.model, cfg.offsite, num_labels, cfg.seed).to(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 1)
            add_adapters(self.model, cfg.lora, cfg.offsite.adapter)
        self.state = {k: v.clone() for k, v in init.items()}
        self.tok = load_tokenizer(cfg.model.name)
        self.seconds = 0.0
        self._examples: dict[int, list[Example]] = {}

    def examples(self, pid: int) -> list[Example]:
        """Partition ``pid``, tokenised as its client tokenises it (once)."""
        if pid not in self._examples:
            cfg = self.cfg
            task = load_task(cfg.data, cfg.seed)
            self._examples[pid] = tokenize_rows(
                load_partition(cfg.data, pid, cfg.federation.num_clients, cfg.seed), self.tok,
                kind_of(cfg.model.name), max_length=cfg.model.max_length, label_names=task.label_names,
                instruction=task.instruction)
        return self._examples[pid]

    def train_round(self, round_: int, clients: int) -> None:
        """``clients`` sampled partitions train from the reference's global adapters; plain FedAvg of their updates."""
        t0 = time.perf_counter()
        cfg, steps = self.cfg, self.cfg.train.local_steps
        fed = cfg.federation
        pids = sorted(random.Random(cfg.seed * 100_003 + round_).sample(range(fed.num_clients),
                                                                        min(clients, fed.num_clients)))
        updates = []
        for pid in pids:
            examples = self.examples(pid)
            load_trainable(self.model, self.state, source="reference adapters")
            opt = make_optimizer(self.model, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
            assert opt is not None
            gsteps = [(round_ - 1) * steps + s for s in range(steps)]
            pad = self.tok.pad_token_id
            if cfg.dp.enabled:
                plan = DPPlan.from_config(cfg.dp, num_examples=len(examples), batch_size=cfg.train.batch_size,
                                          rounds=fed.rounds, local_steps=steps, membership_visible=False)
                rows = (poisson_batch_indices(len(examples), sample_rate=plan.sample_rate, step=g, seed=cfg.seed,
                                              client=pid) for g in gsteps)
                batches = (_loss_batch([examples[i] for i in r], pad) for r in rows)
                dp_local_train(self.model, opt, batches,
                               (make_generator(cfg.seed, STREAM_DP_NOISE, pid, g, device=self.device)
                                for g in gsteps),
                               plan=plan, accountant=DPAccountant(kind=cfg.dp.accountant), device=self.device)
            else:
                batches = (collate([examples[i] for i in batch_indices(len(examples), cfg.train.batch_size, g,
                                                                       seed=cfg.seed, client=pid)], pad)
                           for g in gsteps)
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(cfg.seed * 1_000_003 + pid * 1_009 + round_)
                    local_train(self.model, opt, batches, self.device)
            now = trainable_state(self.model)
            updates.append({k: now[k] - self.state[k] for k in now})
        self.state = {k: self.state[k] + sum(u[k] for u in updates) / len(updates) for k in self.state}
        load_trainable(self.model, self.state, source="reference adapters")
        self.seconds += time.perf_counter() - t0


def _loss_batch(examples: list[Example], pad: int) -> LossBatch:
    """A DP step's inputs; an empty Poisson batch still takes its (noise-only) step."""
    if not examples:
        empty = torch.zeros((0, 1), dtype=torch.long)
        return LossBatch((empty, empty, torch.zeros(0, dtype=torch.long)))
    b = collate(examples, pad)
    return LossBatch((b.input_ids, b.attention_mask, b.labels))


def build_models(run: ServerRun) -> tuple[SandwichModel, SandwichModel, dict[str, torch.Tensor], dict[str, Any]]:
    """The full model and the emulator, both with adapters, the emulator's package, and what the record says."""
    cfg, task = run.cfg, run.task
    off = cfg.offsite
    full = full_sandwich(cfg.model, off, task.num_labels, cfg.seed).to(run.device)
    emu = emulator_sandwich(cfg.model, off, task.num_labels, cfg.seed).to(run.device)
    middle = full.num_middle
    info: dict[str, Any] = {
        "adapter": off.adapter, "adapter_layers": off.adapter_layers, "model_layers": middle + 2 * off.adapter_layers,
        "middle_layers": middle, "emulator_layers": emu.num_middle, "kept_middle_blocks": uniform_keep(
            middle, off.emulator_layers),
    }
    tok = load_tokenizer(cfg.model.name)
    texts = [str(r["text"]) for r in synthetic_rows(off.distill_rows, seed=cfg.seed + DISTILL_SEED)]
    probe = tok(texts[: min(64, len(texts))], truncation=True, max_length=cfg.model.max_length, padding=True,
                return_tensors="pt")
    ids, mask = probe["input_ids"].to(run.device), probe["attention_mask"].to(run.device)
    info["middle_mse_layer_drop"] = middle_mse(full, emu, ids, mask)
    if off.distill_steps:
        t0 = time.perf_counter()
        losses = distill_emulator(full, emu, texts, model_name=cfg.model.name, max_length=cfg.model.max_length,
                                  steps=off.distill_steps, lr=off.distill_lr, batch_size=cfg.train.batch_size,
                                  seed=cfg.seed, device=run.device)
        info["distill"] = {
            "steps": off.distill_steps, "lr": off.distill_lr, "rows": off.distill_rows, **losses,
            "seconds": round(time.perf_counter() - t0, 3),
            "data": f"public: synthetic rows (seed {cfg.seed + DISTILL_SEED}), never client data",
            "loss": "MSE over real tokens between the emulator's and the full middle's outputs on the same input "
                    "(embeddings and first blocks), per hidden unit",
        }
        info["middle_mse_distilled"] = middle_mse(full, emu, ids, mask)
    else:
        info["distill"] = None
    package = frozen_package(emu)  # before the adapters: the names a client's skeleton has
    with torch.random.fork_rng(devices=[]):  # the same LoRA initialisation on both
        torch.manual_seed(cfg.seed + 1)
        add_adapters(full, cfg.lora, off.adapter)
        torch.manual_seed(cfg.seed + 1)
        add_adapters(emu, cfg.lora, off.adapter)
    return full, emu, package, info


class OffsiteDesign(Design):
    """Offsite tuning's server side: the emulator goes out once, the adapters are aggregated and plugged in."""

    message_type = MESSAGE_TYPE

    def __init__(self, run: ServerRun) -> None:
        super().__init__(run)
        self.full, self.emu, self.info = _prepare(run)
        self.package = self.info.pop("_package")
        self.state = trainable_state(self.full)
        self.reference = (FullReference(run.cfg, run.task.num_labels, run.device, self.state)
                          if run.cfg.offsite.reference else None)
        self.have: set[int] = set()  # nodes that received the emulator (a restarted server sends it again)

    def global_state(self) -> dict[str, torch.Tensor]:
        return self.state

    def set_global(self, state: dict[str, torch.Tensor]) -> None:
        self.state = state

    def round_config(self, rnd: Round) -> dict[str, Any]:
        return {"digest": self.info["digest"], "resumed-after": rnd.resumed_after,
                "local-steps": self.run.cfg.train.local_steps}

    def outgoing(self, rnd: Round, messages: list[Message]) -> list[Message]:
        out = [m if m.metadata.dst_node_id in self.have else with_package(m, self.package) for m in messages]
        self.info["emulator_sends"] += sum(1 for m in out if EMULATOR_KEY in m.content)
        return out

    def train(self, rnd: Round, messages: list[Message]) -> Outcome:
        ex = rnd.exchange(messages)
        self.have |= {n for n in ex.replies if n not in ex.failures()}
        ok, failures, spent = rnd.screen(ex, final=True)
        rnd.give_up_if_nobody(len(ok), failures, spent)
        losses = train_losses(ok)
        rnd.step_event(1, 1, losses, ex, len(ok))
        return Outcome(losses, ex)

    def evaluate(self, rnd: Round) -> tuple[dict[str, float], dict[str, Any]]:
        return _evaluate(self.run, self.full, self.emu, self.reference, self.state, rnd.number)

    def checkpoint(self) -> dict[str, Any]:
        """The global adapters and the yardstick's; the plug-in (full model + adapters) goes out as ``<out>/adapter``."""
        load_trainable(self.full, self.state, source="global adapters")
        self.run.rec.save_adapter(self.full)
        return {"global": self.state, "reference": self.reference.state if self.reference is not None else None}

    def restore(self, state: dict[str, Any]) -> None:
        self.set_global(state["global"])
        if self.reference is not None and state.get("reference") is not None:
            self.reference.state = state["reference"]

    def finish(self) -> None:
        _report(self.run, self.info, self.reference)


def run_offsite(grid: Grid, run: ServerRun) -> dict[str, float]:
    return run_rounds(grid, run, OffsiteDesign(run))


def _prepare(run: ServerRun) -> tuple[SandwichModel, SandwichModel, dict[str, Any]]:
    t0 = time.perf_counter()
    full, emu, package, info = build_models(run)
    record = tensors_to_record(package)
    info["digest"] = package_digest(package)
    info["emulator_values"] = num_package_values(package)
    info["emulator_bytes"] = message_nbytes(Message(RecordDict({EMULATOR_KEY: record}), dst_node_id=0,
                                                    message_type=MESSAGE_TYPE))
    info["emulator_sends"] = 0
    info["_package"] = record
    info["build_s"] = round(time.perf_counter() - t0, 3)
    run.rec.ledger.server_s += time.perf_counter() - t0
    return full, emu, info


DECODER_FIGURES = ("rouge_l", "exact_match")  # a decoder's figures beside its utility, also for the emulator


def _evaluate(run: ServerRun, full: SandwichModel, emu: SandwichModel, reference: FullReference | None,
              state: dict[str, torch.Tensor], round_: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Plug-in (the round's utility), emulator and full fine-tuning utility."""
    load_trainable(full, state, source="global adapters")  # identical keys: the plug-in
    plug = run.evaluate(full)
    load_trainable(emu, state, source="global adapters")
    emulated = run.evaluate(emu)
    extra: dict[str, Any] = {k: v for k, v in plug.items() if k != "utility"}
    extra["emulator_utility"] = emulated["utility"]
    extra.update({f"emulator_{k}": v for k, v in emulated.items() if k in DECODER_FIGURES})
    extra["full_ft_utility"] = None
    if reference is not None:
        reference.train_round(round_, run.per_round or run.cfg.federation.clients_per_round)
        ft = run.evaluate(reference.model)
        extra["full_ft_utility"] = ft["utility"]
        extra.update({f"full_ft_{k}": v for k, v in ft.items() if k in DECODER_FIGURES})
    return plug, extra


def _report(run: ServerRun, info: dict[str, Any], reference: FullReference | None) -> None:
    """The record's ``offsite`` block and the three utilities (with the gaps) in ``utility``."""
    rec = run.rec
    last = rec.history[-1] if rec.history else {}
    plug, emulated, ft = last.get("utility"), last.get("emulator_utility"), last.get("full_ft_utility")
    rec.utility_extra = {
        "plug_in": plug, "emulator": emulated, "full_ft": ft,
        "plug_in_gap": ft - plug if ft is not None and plug is not None else None,
        "emulator_gap": plug - emulated if plug is not None and emulated is not None else None,
    }
    rec.extra["offsite"] = {
        **info,
        "reference_s": round(reference.seconds, 3) if reference is not None else None,
        "reference": ("the same adapters trained on the full model in the server process, as the clients train "
                      "them (same clients per round, batches, steps, optimizer, DP-SGD setting), plain FedAvg")
        if reference is not None else None,
    }
