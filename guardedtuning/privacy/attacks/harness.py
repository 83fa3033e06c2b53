"""Attack one finished run: rebuild what its clients released and what the server saw, then attack it.

The victim is client 0 (partition 0 of the run). Its released activations come from the
client's own code path (:meth:`ClientPrivacy.release_batch
<guardedtuning.privacy.client.ClientPrivacy.release_batch>` with the client's mechanism,
:func:`~guardedtuning.privacy.client.client_mechanism`), on the bottom with the run's
final global adapter. The attacker's auxiliary data is public text: the
run's held-out split (never a client's rows), and for attribute inference the synthetic
set drawn with another seed. Everything random is seeded, so an attack repeats exactly.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from guardedtuning.config import RunConfig
from guardedtuning.data.batches import Batch, collate, tokenize
from guardedtuning.data.synthetic import synthetic_rows
from guardedtuning.privacy.attacks.aia import attribute_report, pooled
from guardedtuning.privacy.attacks.common import Releaser, aux_batches, aux_vocabulary, released_tensor, special_ids
from guardedtuning.privacy.attacks.eia_learned import LearnedInversion
from guardedtuning.privacy.attacks.eia_nn import NearestNeighbourEIA
from guardedtuning.privacy.attacks.eia_opt import OptimizationEIA
from guardedtuning.privacy.attacks.metrics import content_tokens, rouge_n, token_report, token_set_f1
from guardedtuning.privacy.attacks.update_inversion import SpanAttack
from guardedtuning.privacy.client import ClientPrivacy, client_mechanism, partition_examples

ATTACKS = ("eia_nn", "eia_mlp", "eia_transformer", "eia_opt", "aia", "update", "update_secure")


@dataclasses.dataclass(frozen=True)
class AttackOptions:
    victim_rows: int = 32
    aux_rows: int = 256
    aia_rows: int = 300
    learned_epochs: int = 3
    noise_levels: tuple[float, ...] = (0.5, 1.0, 2.0)  # noise-aware: multiples of the run's eta
    opt_steps: int = 40
    opt_candidates: int = 16
    update_rows: int = 1
    attacks: tuple[str, ...] = ATTACKS


def client_privacy(cfg: RunConfig, pid: int, n: int, seed: int, *, privacy: Any = None,
                   examples: list[Any] | None = None) -> ClientPrivacy:
    """A client's :class:`ClientPrivacy` (mechanism only, no DP-SGD), built by the client's own code.

    Without ``privacy`` and ``examples``: client ``pid``'s own mechanism. With them: the
    mechanism of ``privacy`` (PrivTune's tables from the attacker's auxiliary ``examples``).
    """
    from guardedtuning.models.loading import load_tokenizer
    from guardedtuning.privacy.mechanisms import mechanism_from_config
    from guardedtuning.privacy.privtune import privtune_base, privtune_from_config

    p = privacy if privacy is not None else cfg.privacy
    if examples is None and privacy is None:
        mech = client_mechanism(cfg, pid, n)
    elif p.mechanism != "privtune":
        mech = mechanism_from_config(p)
    else:  # the attacker's own PrivTune tables, from its auxiliary rows
        tok = load_tokenizer(cfg.model.name)
        assert examples is not None
        batch = collate(examples, tok.pad_token_id)
        embeddings, scale = privtune_base(cfg.model, cfg.split.layer, cfg.seed)
        mech, _ = privtune_from_config(p, embeddings=embeddings, input_ids=batch.input_ids,
                                       attention_mask=batch.attention_mask, labels=batch.class_ids,
                                       num_classes=max(2, int(batch.class_ids.max()) + 1), scale=scale,
                                       ignore_ids=tuple(tok.all_special_ids))
    return ClientPrivacy(seed=seed, mechanism=mech, knobs=p, pid=pid)


def make_releaser(bottom: Any, priv: ClientPrivacy, *, first_step: int = 0) -> Releaser:
    """The client's release as ``batch -> (B, T, D)`` (a fresh noise draw each call)."""
    step = [first_step]

    def rel(batch: Batch) -> torch.Tensor:
        step[0] += 1
        return released_tensor(priv.release_batch(bottom, batch, torch.device("cpu"), step=step[0]))

    return rel


def _victim_rows(cfg: RunConfig, pid: int, n: int) -> list[Any]:
    """Client ``pid``'s rows, as it tokenises them."""
    return list(partition_examples(cfg.data, cfg.seed, pid, n, cfg.model.name, cfg.model.max_length))


def _examples(cfg: RunConfig, texts: list[str], labels: list[int]) -> list[Any]:
    from guardedtuning.data.sources import load_task
    from guardedtuning.models.loading import kind_of, load_tokenizer

    task = load_task(cfg.data, cfg.seed)
    return tokenize(load_tokenizer(cfg.model.name), kind_of(cfg.model.name), texts, labels,
                    max_length=cfg.model.max_length, label_names=task.label_names, instruction=task.instruction)


def attack_run(cfg: RunConfig, run_dir: Path, opts: AttackOptions = AttackOptions(),
               log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every attack in ``opts.attacks`` that applies to the run's recipe; ``None`` where one does not."""
    from guardedtuning.data.sources import load_task
    from guardedtuning.models.loading import load_tokenizer
    from guardedtuning.models.lora import load_trainable
    from guardedtuning.models.parts import split_model

    out: dict[str, Any] = {a: None for a in opts.attacks}
    ckpt = run_dir / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=False)["state"] if ckpt.is_file() else {}
    if not isinstance(state, dict) or "global_bottom" not in state or "top" not in state:
        # no trained bottom and top to rebuild (only split learning keeps them): nothing released at a
        # cut the attacks can replay; fedlora's updates cover the whole model (not attacked here)
        return out
    say = log or (lambda _m: None)
    t_all = time.perf_counter()
    task = load_task(cfg.data, cfg.seed)
    tok = load_tokenizer(cfg.model.name)
    special = special_ids(tok)
    model = split_model(cfg.model, cfg.split.layer, cfg.lora, task.num_labels, "cpu", cfg.seed, lora_top=cfg.lora.top)
    load_trainable(model.bottom, state["global_bottom"], source="checkpoint")
    load_trainable(model.top, state["top"], source="checkpoint")
    bottom = model.bottom.eval()
    n = cfg.federation.num_clients
    victim = _victim_rows(cfg, 0, n)[:opts.victim_rows]
    vbatch = collate(victim, tok.pad_token_id)
    priv = client_privacy(cfg, 0, n, seed=12345)
    rel = make_releaser(bottom, priv)
    h = rel(vbatch)
    aux_rows = task.test.select(range(min(opts.aux_rows, len(task.test))))
    aux = _examples(cfg, list(aux_rows["text"]), list(aux_rows["label"]))
    abatches = aux_batches(aux, tok.pad_token_id, 16)

    def report(name: str, cands: torch.Tensor, t0: float) -> None:
        out[name] = {**token_report(cands, vbatch.input_ids, vbatch.attention_mask, special),
                     "metric": "token top-1", "chance": 1.0 / bottom.word_embeddings().shape[0],
                     "seconds": round(time.perf_counter() - t0, 1)}
        say(f"{name}: top-1 {out[name]['asr']:.3f}")

    nn_best = None
    if "eia_nn" in opts.attacks or "eia_opt" in opts.attacks:
        t0 = time.perf_counter()
        scores = {}
        cands_by = {}
        for table in ("embedding", "bottom"):
            a = NearestNeighbourEIA.from_bottom(bottom, table=table, context=(tok.cls_token_id, tok.sep_token_id)
                                                if tok.cls_token_id is not None else None)
            cands_by[table] = a.candidates(h, k=max(5, opts.opt_candidates))
            scores[table] = token_report(cands_by[table], vbatch.input_ids, vbatch.attention_mask, special)["asr"]
        best = max(scores, key=lambda k: scores[k])
        nn_best = cands_by[best]
        if "eia_nn" in opts.attacks:
            report("eia_nn", nn_best, t0)
            out["eia_nn"].update(table=best, by_table=scores)
    if "eia_opt" in opts.attacks and nn_best is not None:
        t0 = time.perf_counter()
        report("eia_opt", OptimizationEIA(bottom, steps=opts.opt_steps).invert(h, vbatch.attention_mask, nn_best), t0)
    learned = [a for a in ("eia_mlp", "eia_transformer") if a in opts.attacks]
    if learned:
        levels = [dataclasses.replace(cfg.privacy, eta=cfg.privacy.eta * m) for m in opts.noise_levels] \
            if cfg.privacy.mechanism in ("dchi", "privtune") else [cfg.privacy]
        releasers = [make_releaser(bottom, client_privacy(cfg, 1, n, seed=999 + i, privacy=p, examples=aux),
                                   first_step=10_000 * i) for i, p in enumerate(levels)]
        vocab = aux_vocabulary(abatches, special, limit=8000)
        for name in learned:
            t0 = time.perf_counter()
            inv = LearnedInversion(vocab, int(h.shape[-1]), special, arch=name.removeprefix("eia_"))
            inv.fit(abatches, releasers, epochs=opts.learned_epochs, log=say)
            report(name, inv.candidates(h, vbatch.attention_mask), t0)
    if "aia" in opts.attacks:
        t0 = time.perf_counter()
        out["aia"] = _aia(cfg, bottom, rel, n, opts)
        out["aia"]["seconds"] = round(time.perf_counter() - t0, 1)
        say(f"aia: {out['aia']['asr']:.3f} (majority {out['aia']['majority_rate']:.3f})")
    for name in ("update", "update_secure"):
        if name in opts.attacks:
            t0 = time.perf_counter()
            out[name] = _update_attack(cfg, model, victim, tok, special, secure=name == "update_secure",
                                       n=n, opts=opts, vocab=aux_vocabulary(abatches, special))
            out[name]["seconds"] = round(time.perf_counter() - t0, 1)
            say(f"{name}: token-set F1 {out[name]['asr']:.3f}")
    out["seconds"] = round(time.perf_counter() - t_all, 1)
    return out


def _aia(cfg: RunConfig, bottom: Any, rel: Releaser, n: int, opts: AttackOptions) -> dict[str, Any]:
    """Condition of the writer, from pooled releases of synthetic patient messages."""
    from guardedtuning.models.loading import load_tokenizer

    tok = load_tokenizer(cfg.model.name)
    aux_rows = synthetic_rows(opts.aia_rows, seed=99)
    vic_rows = synthetic_rows(opts.aia_rows // 2, seed=5)

    def feats(rows: list[dict[str, Any]], r: Releaser) -> torch.Tensor:
        ex = _examples(cfg, [str(x["text"]) for x in rows], [0] * len(rows))
        parts = []
        for b in aux_batches(ex, tok.pad_token_id, 32):
            parts.append(pooled(r(b), b.attention_mask))
        return torch.cat(parts)

    aux_priv = client_privacy(cfg, 1, n, seed=777, privacy=cfg.privacy,
                              examples=_examples(cfg, [str(x["text"]) for x in aux_rows], [0] * len(aux_rows)))
    attacker = make_releaser(bottom, aux_priv, first_step=50_000)
    train_x, test_x = feats(aux_rows, attacker), feats(vic_rows, rel)
    rep = attribute_report(train_x, [str(x["condition"]) for x in aux_rows], test_x,
                           [str(x["condition"]) for x in vic_rows])
    return {**rep, "metric": "accuracy (condition, synthetic set)", "chance": rep["majority_rate"]}


def _update_attack(cfg: RunConfig, model: Any, victim: list[Any], tok: Any, special: tuple[int, ...], *,
                   secure: bool, n: int, opts: AttackOptions, vocab: torch.Tensor) -> dict[str, Any]:
    """One local step of the victim (plain or DP-SGD, as the run trains), seen alone or in a secure sum."""
    import numpy as np

    from guardedtuning.codecs import compress_update, rand_k_support
    from guardedtuning.privacy.dpsgd import DPAccountant, DPPlan, DPStep
    from guardedtuning.training import backward_from_server

    bottom = model.bottom
    params = [p for p in bottom.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    clients = [victim[:opts.update_rows]]
    if secure:  # the other clients of the round: sum of their updates on the public support
        for pid in range(1, min(n, cfg.federation.clients_per_round)):
            clients.append(_victim_rows(cfg, pid, n)[:opts.update_rows])
    updates = []
    for rows in clients:
        b = collate(rows, tok.pad_token_id)
        h = bottom(b.input_ids, b.attention_mask).detach().requires_grad_(True)
        loss = model.top.per_example_loss(h, b.attention_mask, b.labels).mean()
        (grad_h,) = torch.autograd.grad(loss, [h])  # what the server sends back: it knows this
        opt = torch.optim.SGD(params, lr=1.0)
        if cfg.dp.enabled:
            plan = DPPlan.from_config(cfg.dp, num_examples=max(len(victim), cfg.train.batch_size),
                                      batch_size=cfg.train.batch_size, rounds=cfg.federation.rounds,
                                      local_steps=cfg.train.local_steps)
            dp = DPStep(bottom, plan)
            try:
                dp.step(opt, b, grad_h, generator=torch.Generator().manual_seed(4242), accountant=DPAccountant())
            finally:
                dp.close()
        else:
            backward_from_server(bottom, opt, b, grad_h, torch.device("cpu"))
        updates.append(torch.cat([(p.detach() - s).reshape(-1) for p, s in zip(params, start, strict=True)]))
        with torch.no_grad():
            for p, s in zip(params, start, strict=True):
                p.copy_(s)
    vb = collate(clients[0], tok.pad_token_id)
    support = None
    if secure and cfg.aggregation.secure:
        a = cfg.aggregation
        sup = rand_k_support(size=updates[0].numel(), density=a.density, seed=b"trilemma-round")
        total = np.zeros(updates[0].numel())
        for u in updates:
            total += compress_update(update=u.numpy(), residual=None, support=sup, bits=a.bits, clip=a.clip,
                                     norm_clip=a.norm_clip, rng=np.random.default_rng(7)).sent
        observed = torch.from_numpy(total).float()
        support = torch.from_numpy(sup).long()
        observed = observed[support]
    else:
        observed = torch.stack(updates).sum(0) if secure else updates[0]
    cands = SpanAttack(bottom, vocab).candidates(observed, [vb.attention_mask], support=support, k=1)[0][..., 0]
    f1s, r1s, r2s = [], [], []
    for pred, ref, mask in zip(cands.tolist(), vb.input_ids.tolist(), vb.attention_mask.tolist(), strict=True):
        p = content_tokens(pred, mask, special)
        keep = [bool(m) and t not in set(special) for t, m in zip(ref, mask, strict=True)]
        r = [t for t, k in zip(ref, keep, strict=True) if k]
        p = [t for t, k in zip(pred, keep, strict=True) if k]
        f1s.append(token_set_f1(p, r))
        r1s.append(rouge_n(p, r, 1))
        r2s.append(rouge_n(p, r, 2))
    return {"asr": sum(f1s) / len(f1s), "rouge_1": sum(r1s) / len(r1s), "rouge_2": sum(r2s) / len(r2s),
            "metric": "token-set F1", "clients_in_sum": len(clients) if secure else 1,
            "secure_aggregation": bool(secure and cfg.aggregation.secure)}
