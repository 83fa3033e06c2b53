"""Attack one finished run: rebuild what its clients released and what the server saw, then attack it.

The victim is client 0 (partition 0 of the run). Its released activations come from the
client's own code path (:meth:`ClientPrivacy.release_batch
<guardedtuning.privacy.client.ClientPrivacy.release_batch>` with the client's mechanism,
:func:`~guardedtuning.privacy.client.client_mechanism`), on the bottom with the run's
final global adapter (``gradfree``: the frozen base bottom, as its clients release). Its
updates come from a replay of its round with its own training code and DP-SGD plan
(:mod:`.round_replay`). The attacker's auxiliary data is public text: the run's held-out
split (never a client's rows), and for attribute inference the synthetic set drawn with
another seed; the attacker's copy of the mechanism (PrivTune's tables) is built from that
text with the client's public settings. Everything random is seeded, so an attack repeats
exactly.

Attacks (:data:`ATTACKS`) and their result keys (each a dict with ``asr``, ``metric``,
``chance``, ``seconds``):

- ``eia_nn``: nearest neighbour, best of the embedding and bottom tables (``table``, ``by_table``);
- ``eia_nn_adaptive``: nearest neighbour against the bottom table moved by the mechanism's
  public clip and mean shift, then in-context rescoring (:mod:`.eia_adaptive`);
- ``eia_ridge``: a closed-form ridge map to the token one-hot, fit on public text released
  through the exact mechanism at the run's eta (:mod:`.eia_ridge`);
- ``eia_mlp``, ``eia_transformer``: learned inversions trained through the exact mechanism
  at the run's eta and the ``noise_levels`` around it (``trained_on_eta``);
- ``eia_opt``: relaxed-token optimisation through the bottom;
- ``aia``: attribute inference from pooled releases (``majority_rate`` beside it);
- ``update``, ``update_secure``: the span attack on the victim's round update, alone or in
  the round's secure sum (token-set F1; ``dp_noise_multiplier`` of the replayed plan).

Every top-1 figure is also reported as ``top5`` and ``rouge_l``; ``skipped`` says why an
attack does not apply to the run's design.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import torch

from guardedtuning.config import RunConfig
from guardedtuning.data.batches import Batch, collate, tokenize
from guardedtuning.data.synthetic import synthetic_rows
from guardedtuning.privacy.attacks import ADAPTER_UPDATES, RELEASED_ACTIVATIONS
from guardedtuning.privacy.attacks.aia import attribute_report, pooled
from guardedtuning.privacy.attacks.common import Releaser, aux_batches, aux_vocabulary, released_tensor, special_ids
from guardedtuning.privacy.attacks.eia_adaptive import AdaptiveNN
from guardedtuning.privacy.attacks.eia_learned import LearnedInversion
from guardedtuning.privacy.attacks.eia_nn import NearestNeighbourEIA
from guardedtuning.privacy.attacks.eia_opt import OptimizationEIA
from guardedtuning.privacy.attacks.eia_ridge import RidgeInversion
from guardedtuning.privacy.attacks.metrics import rouge_n, token_report, token_set_f1
from guardedtuning.privacy.attacks.update_inversion import SpanAttack
from guardedtuning.privacy.client import ClientPrivacy, client_mechanism, partition_examples, token_mechanism

RELEASE_ATTACKS = ("eia_nn", "eia_nn_adaptive", "eia_ridge", "eia_mlp", "eia_transformer", "eia_opt", "aia")
UPDATE_ATTACKS = ("update", "update_secure")
ATTACKS = RELEASE_ATTACKS + UPDATE_ATTACKS


@dataclasses.dataclass(frozen=True)
class AttackOptions:
    """How much each attack may do; the defaults are cut for a sweep's many points.

    Measured on MiniLM (guarded default, 2-core CPU under load, CPU seconds) at victim_rows
    32, adaptive_k 8, opt_steps 40, ridge_passes 2, learned_epochs 3: NN 30 (with the setup),
    adaptive 99, optimisation 56, ridge 24, MLP about 120; the defaults halve each of these.

    ``noise_levels`` are the learned attacks' training noise levels, as multiples of the
    run's eta; the run's own eta (1.0) is always among them. ``adaptive_k`` candidates per
    position go to the adaptive attack's context stage (``adaptive_sweeps`` passes);
    ``ridge_passes`` fresh releases of the auxiliary text fit the ridge map. ``update_secure``
    sums the victim's round with ``secure_clients - 1`` other clients' (each a full replay,
    the dominant cost): fewer than the round's clients make the attacker's task easier, so
    its success bounds the full sum's from above.
    """

    victim_rows: int = 16
    aux_rows: int = 256
    aia_rows: int = 300
    learned_epochs: int = 2
    noise_levels: tuple[float, ...] = (0.5, 1.0, 2.0)  # noise-aware: multiples of the run's eta
    opt_steps: int = 20
    opt_candidates: int = 16
    adaptive_k: int = 4
    adaptive_sweeps: int = 1
    ridge_passes: int = 1
    secure_clients: int = 2  # clients in update_secure's sum (victim included), at most the round's
    attacks: tuple[str, ...] = ATTACKS


def client_privacy(cfg: RunConfig, pid: int, n: int, seed: int, *, privacy: Any = None,
                   examples: list[Any] | None = None) -> ClientPrivacy:
    """A client's :class:`ClientPrivacy` (mechanism only, no DP-SGD), built by the client's own code.

    Without ``privacy`` and ``examples``: client ``pid``'s own mechanism. With them: the
    mechanism of ``privacy`` as a client whose rows are the attacker's auxiliary ``examples``
    builds it (:func:`~guardedtuning.privacy.client.token_mechanism`). For PrivTune under
    ``privacy.importance-source=public`` (the default) that is exactly the victim's table:
    importance comes from the task's public rows, which the attacker has too; under ``client``
    the attacker's table stands in for the victim's from its auxiliary rows.
    """
    p = privacy if privacy is not None else cfg.privacy
    if examples is None and privacy is None:
        mech = client_mechanism(cfg, pid, n)
    else:
        mech = token_mechanism(dataclasses.replace(cfg, privacy=p), examples or [])
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
               log: Callable[[str], None] | None = None, *, surface: Collection[str]) -> dict[str, Any]:
    """Every attack in ``opts.attacks`` that applies to the run; ``None`` where one does not.

    ``surface``: what the run's recipe declares the attacks can target (its
    ``attack_surface``: :data:`RELEASED_ACTIVATIONS`, :data:`ADAPTER_UPDATES`); an attack on
    anything else is skipped with the reason. Within it, what the run exposes is read from
    its checkpoint: a trained bottom and top (the split
    recipes: releases and bottom-LoRA updates), a global output head (``gradfree``: the
    releases of the frozen bottom; its head update is trained on hidden states the server
    computed, so no token attack applies to it), or global sandwich adapters (``offsite``:
    adapter updates only, nothing released). ``skipped`` says why an attack did not run.
    """
    from guardedtuning.data.sources import load_task
    from guardedtuning.models.checkpoint import read_state
    from guardedtuning.models.loading import load_tokenizer
    from guardedtuning.models.lora import load_trainable
    from guardedtuning.models.parts import split_model

    out: dict[str, Any] = {a: None for a in opts.attacks}
    off = [a for a in opts.attacks if (a in RELEASE_ATTACKS and RELEASED_ACTIVATIONS not in surface)
           or (a in UPDATE_ATTACKS and ADAPTER_UPDATES not in surface)]
    if off:  # e.g. fedlora (nothing declared), whose checkpoint's "global" would otherwise read as offsite's
        opts = dataclasses.replace(opts, attacks=tuple(a for a in opts.attacks if a not in off))
    # checkpoint.json + safetensors (or a v1 checkpoint.pt); {} without one, or when nothing is left to attack
    state = read_state(run_dir) if opts.attacks else {}
    say = log or (lambda _m: None)
    t_all = time.perf_counter()
    task = load_task(cfg.data, cfg.seed)
    tok = load_tokenizer(cfg.model.name)
    special = special_ids(tok)
    n = cfg.federation.num_clients
    recorded = _recorded_noise_multiplier(run_dir)
    skipped: dict[str, str] = {}
    if "global_bottom" in state and "top" in state:  # split family: releases and bottom-LoRA updates
        model = split_model(cfg.model, cfg.split, cfg.lora, task.num_labels, "cpu", cfg.seed,
                            lora_top=cfg.lora.top)  # with the run's release projection, if any
        load_trainable(model.bottom, state["global_bottom"], source="checkpoint")
        load_trainable(model.top, state["top"], source="checkpoint")
        bottom = model.bottom.eval()
        _release_attacks(cfg, bottom, opts, out, say, tok=tok, special=special, n=n)
        replays: dict[int, Any] = {}  # each client's round is replayed once for both update attacks
        for name in UPDATE_ATTACKS:
            if name in opts.attacks:
                t0 = time.perf_counter()
                out[name] = _update_attack(cfg, tok, special, secure=name == "update_secure", n=n,
                                           vocab=_aux_vocab(cfg, tok, special, opts), recorded=recorded, opts=opts,
                                           split=(bottom, model.top), replays=replays)
                _done(out, name, t0, say)
    elif "global_head" in state:  # gradfree: the frozen base bottom's releases
        base = split_model(cfg.model, cfg.split.layer, cfg.lora, task.num_labels, "cpu", cfg.seed,
                           lora_bottom=False, lora_top=False).bottom.eval()  # as gradfree_parts builds it
        for p in base.parameters():
            p.requires_grad_(False)
        _release_attacks(cfg, base, opts, out, say, tok=tok, special=special, n=n)
        skipped.update({a: "gradfree's update is the output head's, trained on hidden states the server computed "
                           "and sent: it carries the client's labels, not its tokens" for a in UPDATE_ATTACKS})
    elif "global" in state:  # offsite: adapter updates only
        emu = _offsite_model(cfg, task.num_labels, state["global"])
        skipped.update({a: "offsite releases no activations" for a in RELEASE_ATTACKS})
        replays = {}
        for name in UPDATE_ATTACKS:
            if name in opts.attacks:
                t0 = time.perf_counter()
                out[name] = _update_attack(cfg, tok, special, secure=name == "update_secure", n=n,
                                           vocab=_aux_vocab(cfg, tok, special, opts), recorded=recorded, opts=opts, local=emu,
                                           replays=replays)
                _done(out, name, t0, say)
    elif opts.attacks:
        # no trained bottom, head or sandwich adapters to rebuild (fedlora's updates cover the whole model)
        skipped.update({a: "the run keeps no client-side part the attacks can replay" for a in opts.attacks})
    for a in off:  # a design's own reason (e.g. "offsite releases no activations") comes first
        skipped.setdefault(a, f"not on the attack surface the run's recipe declares ({', '.join(surface) or 'nothing'})")
    if skipped:
        out["skipped"] = "; ".join(f"{a}: {why}" for a, why in skipped.items() if a in opts.attacks or a in off)
    out["seconds"] = round(time.perf_counter() - t_all, 1)
    return out


def _done(out: dict[str, Any], name: str, t0: float, say: Callable[[str], None]) -> None:
    out[name]["seconds"] = round(time.perf_counter() - t0, 1)
    say(f"{name}: {out[name]['metric']} {out[name]['asr']:.3f}")


def _recorded_noise_multiplier(run_dir: Path) -> float | None:
    """The DP-SGD noise multiplier the run's results record (the clients' plan), if any."""
    import json

    path = run_dir / "results.json"
    if not path.is_file():
        return None
    try:
        dp = json.loads(path.read_text()).get("privacy", {}).get("dp", {})
    except (ValueError, AttributeError):
        return None
    value = dp.get("noise_multiplier") if isinstance(dp, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


def _aux(cfg: RunConfig, opts: AttackOptions) -> list[Any]:
    """The attacker's public auxiliary rows: the run's held-out split (never a client's rows).

    Instruction rows are tokenised as the clients tokenise theirs (prompt template and
    response), so the attacker's text has the victim's format and response vocabulary.
    """
    from guardedtuning.data.batches import tokenize_rows
    from guardedtuning.data.sources import load_task
    from guardedtuning.models.loading import kind_of, load_tokenizer

    task = load_task(cfg.data, cfg.seed)
    rows = task.test.select(range(min(opts.aux_rows, len(task.test))))
    if task.format == "instruction":
        return tokenize_rows(rows, load_tokenizer(cfg.model.name), kind_of(cfg.model.name),
                             max_length=cfg.model.max_length, label_names=task.label_names,
                             instruction=task.instruction)
    return _examples(cfg, list(rows["text"]), list(rows["label"]))


def _aux_vocab(cfg: RunConfig, tok: Any, special: tuple[int, ...], opts: AttackOptions) -> torch.Tensor:
    return aux_vocabulary(aux_batches(_aux(cfg, opts), tok.pad_token_id, 16), special)


def _release_attacks(cfg: RunConfig, bottom: Any, opts: AttackOptions, out: dict[str, Any],
                     say: Callable[[str], None], *, tok: Any, special: tuple[int, ...], n: int) -> None:
    """The attacks on client 0's released activations through ``bottom`` (its own mechanism)."""
    victim = _victim_rows(cfg, 0, n)[:opts.victim_rows]
    vbatch = collate(victim, tok.pad_token_id)
    rel = make_releaser(bottom, client_privacy(cfg, 0, n, seed=12345))
    h = rel(vbatch)
    aux = _aux(cfg, opts)
    abatches = aux_batches(aux, tok.pad_token_id, 16)
    context = (tok.cls_token_id, tok.sep_token_id) if tok.cls_token_id is not None else None
    vocab_size = int(bottom.word_embeddings().shape[0])
    attacker = client_privacy(cfg, 1, n, seed=999, privacy=cfg.privacy, examples=aux)  # public settings

    def report(name: str, cands: torch.Tensor, t0: float, **extra: Any) -> None:
        out[name] = {**token_report(cands, vbatch.input_ids, vbatch.attention_mask, special),
                     "metric": "token top-1", "chance": 1.0 / vocab_size, **extra}
        _done(out, name, t0, say)

    nn_best = bottom_table = None
    if any(a in opts.attacks for a in ("eia_nn", "eia_opt", "eia_nn_adaptive")):
        t0 = time.perf_counter()
        scores, cands_by = {}, {}
        for table in ("embedding", "bottom"):
            if table == "embedding" and bottom.word_embeddings().shape[1] != h.shape[-1]:
                continue  # a lower release dimension: the embedding rows are not comparable
            a = NearestNeighbourEIA.from_bottom(bottom, table=table, context=context)
            if table == "bottom":
                bottom_table = a.table
            cands_by[table] = a.candidates(h, k=max(5, opts.opt_candidates))
            scores[table] = token_report(cands_by[table], vbatch.input_ids, vbatch.attention_mask, special)["asr"]
        best = max(scores, key=lambda k: scores[k])
        nn_best = cands_by[best]
        if "eia_nn" in opts.attacks:
            report("eia_nn", nn_best, t0, table=best, by_table=scores)
    if "eia_nn_adaptive" in opts.attacks:
        t0 = time.perf_counter()
        try:
            table = NearestNeighbourEIA.adaptive(bottom, attacker.mechanism, context=context, table=bottom_table)
        except ValueError as exc:  # e.g. a mean-shift table of another dimension than the release
            out["eia_nn_adaptive"] = {"asr": None, "metric": "token top-1", "error": str(exc),
                                      "seconds": round(time.perf_counter() - t0, 1)}
            say(f"eia_nn_adaptive: not run ({exc})")
        else:
            attack = AdaptiveNN(bottom, attacker.mechanism, context=context, k=opts.adaptive_k,
                                sweeps=opts.adaptive_sweeps, table=table)
            report("eia_nn_adaptive", attack.candidates(h, vbatch.attention_mask), t0,
                   mean_shift=getattr(attacker.mechanism, "mean_shift", None) is not None,
                   clip=float(getattr(attacker.mechanism, "clip", 0.0) or 0.0))
    if "eia_opt" in opts.attacks and nn_best is not None:
        t0 = time.perf_counter()
        report("eia_opt", OptimizationEIA(bottom, steps=opts.opt_steps).invert(h, vbatch.attention_mask, nn_best), t0)
    learned = [a for a in ("eia_ridge", "eia_mlp", "eia_transformer") if a in opts.attacks]
    if learned:
        multiples = sorted({1.0, *opts.noise_levels})  # the run's own eta among the noise levels
        levels = [dataclasses.replace(cfg.privacy, eta=cfg.privacy.eta * m) for m in multiples] \
            if cfg.privacy.mechanism in ("dchi", "privtune") else [cfg.privacy]
        exact = [make_releaser(bottom, client_privacy(cfg, 1, n, seed=999 + i, privacy=p, examples=aux),
                               first_step=10_000 * i) for i, p in enumerate(levels)]
        own = exact[multiples.index(1.0)] if len(levels) > 1 else exact[0]
        vocab = aux_vocabulary(abatches, special, limit=8000)
        trained_on = [float(p.eta) for p in levels] if len(levels) > 1 else None
        for name in learned:
            t0 = time.perf_counter()
            if name == "eia_ridge":  # a linear map: fit at the run's own eta only
                ridge = RidgeInversion(vocab, special).fit(abatches, [own], passes=opts.ridge_passes)
                report(name, ridge.candidates(h), t0, ridge_lambda=ridge.chosen, aux_vocabulary=int(vocab.numel()))
                continue
            inv = LearnedInversion(vocab, int(h.shape[-1]), special, arch=name.removeprefix("eia_"))
            inv.fit(abatches, exact, epochs=opts.learned_epochs, log=say)
            report(name, inv.candidates(h, vbatch.attention_mask), t0, trained_on_eta=trained_on,
                   aux_vocabulary=int(vocab.numel()))
    if "aia" in opts.attacks:
        t0 = time.perf_counter()
        out["aia"] = _aia(cfg, bottom, rel, n, opts)
        out["aia"]["seconds"] = round(time.perf_counter() - t0, 1)
        say(f"aia: {out['aia']['asr']:.3f} (majority {out['aia']['majority_rate']:.3f})")


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


def _offsite_model(cfg: RunConfig, num_labels: int, global_state: dict[str, torch.Tensor]) -> Any:
    """The emulator sandwich a client trains, with its adapters, at the run's final global adapters.

    Built as the server builds it, without the optional distillation (which changes only
    the middle blocks, and the span attack reads the first block's LoRA-A gradient).
    """
    from guardedtuning.models.emulator import add_adapters, emulator_sandwich
    from guardedtuning.models.lora import load_trainable

    emu = emulator_sandwich(cfg.model, cfg.offsite, num_labels, cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        add_adapters(emu, cfg.lora, cfg.offsite.adapter)
    load_trainable(emu, global_state, source="checkpoint")
    return emu.eval()


def _update_attack(cfg: RunConfig, tok: Any, special: tuple[int, ...], *, secure: bool, n: int,
                   vocab: torch.Tensor, recorded: float | None, split: tuple[Any, Any] | None = None,
                   local: Any = None, replays: dict[int, Any] | None = None,
                   opts: AttackOptions = AttackOptions()) -> dict[str, Any]:
    """The victim's round (its real local training, its DP plan), seen alone or in the round's secure sum.

    ``split``: (bottom, top) of a split run; ``local``: the sandwich an offsite client trains.
    The span attack reads the first block's LoRA-A rows of the bottom's part of the update.
    ``replays`` keeps each client's replayed round (pid -> it) for the next call.
    """
    import numpy as np

    from guardedtuning.codecs import compress_update, rand_k_support
    from guardedtuning.privacy.attacks.round_replay import local_round, replay_privacy, split_round

    model = split[0] if split is not None else local
    bottom = split[0] if split is not None else local.bottom
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    prefix = "" if split is not None else "bottom."
    sizes = [p.numel() for p in model.parameters() if p.requires_grad]
    offsets = np.cumsum([0, *sizes])
    bottom_idx = torch.cat([torch.arange(int(offsets[i]), int(offsets[i + 1])) for i, name in enumerate(names)
                            if name.startswith(prefix)])
    clients = [0]
    if secure:  # the other clients of the round: their real rounds, summed
        clients += list(range(1, min(n, cfg.federation.clients_per_round, max(1, opts.secure_clients))))
    rounds, plan_sigma = [], None
    replays = {} if replays is None else replays
    for pid in clients:
        if pid in replays:
            rounds.append(replays[pid])
            plan_sigma = replays[pid].noise_multiplier if pid == 0 else plan_sigma
            continue
        examples = _victim_rows(cfg, pid, n)
        priv = replay_privacy(cfg, pid=pid, num_examples=len(examples), mechanism=client_mechanism(cfg, pid, n),
                              membership_visible=split is not None, noise_multiplier=recorded)
        if split is not None:
            r = split_round(cfg, split[0], split[1], examples, priv, round_=cfg.federation.rounds,
                            pad_id=tok.pad_token_id)
        else:
            r = local_round(cfg, local, examples, priv, round_=cfg.federation.rounds, pad_id=tok.pad_token_id)
        plan_sigma = r.noise_multiplier if pid == 0 else plan_sigma
        replays[pid] = r
        rounds.append(r)
    support = None
    if secure and cfg.aggregation.secure:
        a = cfg.aggregation
        sup = rand_k_support(size=rounds[0].update.numel(), density=a.density, seed=b"trilemma-round")
        total = np.zeros(rounds[0].update.numel())
        for r in rounds:
            total += compress_update(update=r.update.numpy(), residual=None, support=sup, bits=a.bits, clip=a.clip,
                                     norm_clip=a.norm_clip, rng=np.random.default_rng(7)).sent
        full = torch.from_numpy(total).float()
        keep = torch.zeros(full.numel(), dtype=torch.bool)
        keep[torch.from_numpy(sup).long()] = True
        in_bottom = keep[bottom_idx]  # the bottom's coordinates that the support holds
        support = in_bottom.nonzero()[:, 0]
        observed = full[bottom_idx][support]
    else:
        total_update = torch.stack([r.update for r in rounds]).sum(0) if secure else rounds[0].update
        observed = total_update[bottom_idx]
    victim_batches = rounds[0].batches
    f1s, r1s, r2s = [], [], []
    if victim_batches:
        cands = SpanAttack(bottom, vocab).candidates(observed, [b.attention_mask for b in victim_batches],
                                                     support=support, k=1)
        for b, cand in zip(victim_batches, cands, strict=True):
            for pred, ref, mask in zip(cand[..., 0].tolist(), b.input_ids.tolist(), b.attention_mask.tolist(),
                                       strict=True):
                keep_pos = [bool(m) and t not in set(special) for t, m in zip(ref, mask, strict=True)]
                r_tok = [t for t, k in zip(ref, keep_pos, strict=True) if k]
                p_tok = [t for t, k in zip(pred, keep_pos, strict=True) if k]
                f1s.append(token_set_f1(p_tok, r_tok))
                r1s.append(rouge_n(p_tok, r_tok, 1))
                r2s.append(rouge_n(p_tok, r_tok, 2))
    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs) if xs else float("nan")

    return {"asr": mean(f1s), "rouge_1": mean(r1s), "rouge_2": mean(r2s), "metric": "token-set F1",
            "clients_in_sum": len(clients) if secure else 1, "clients_in_round": cfg.federation.clients_per_round,
            "secure_aggregation": bool(secure and cfg.aggregation.secure),
            "local_steps": cfg.train.local_steps, "batch_size": cfg.train.batch_size,
            "rows_attacked": len(f1s), "dp": cfg.dp.enabled, "dp_noise_multiplier": plan_sigma,
            "dp_noise_multiplier_recorded": recorded}
