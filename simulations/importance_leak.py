"""How much of a client's own token importance a server reads back from PrivTune releases.

The attack of ``tests/test_importance_leak.py`` on the ``privtune`` recipe's real setting
(MiniLM, the sentiment task, client 0 of 10, its own partition released ``--releases``
times, about what one run releases of each row): estimate eta_t per released token as
``D / mean ||release - clip(table[t]) - shift[t]||`` (``table``: each token alone through the
bottom, public) and compare the estimate with

- the client's own eta table (``client`` importance, the old behaviour),
- the public eta table (importance from public rows no client holds and no evaluation reads, the default),
- the client-only part, ``client eta - public eta``: what the client's rows say beyond public text.

The estimate (default) needs no table: two releases of the same row differ by ``z1 - z2``
exactly, ``E||z1 - z2||^2 = 2 D (D + 1) / eta_t^2``; ``--table`` estimates against the public
per-token table instead (context makes that one fail on MiniLM).

``partial`` is the rank correlation of the estimate with the client-only part after the
public table is regressed out of the estimate; ``top-k`` how many of the k tokens with the
largest client-only part are among the estimate's k largest (chance ``k^2 / N``).

Run: ``nice -n 19 python simulations/importance_leak.py [--releases 2] [--min-count 3] [--k 50]``.
"""

from __future__ import annotations

import argparse
import time

import torch
from scipy.stats import spearmanr

from guardedtuning.data.batches import collate
from guardedtuning.models.loading import load_tokenizer
from guardedtuning.models.parts import client_bottom
from guardedtuning.privacy.attacks.common import special_ids, vocabulary_outputs
from guardedtuning.privacy.attacks.harness import make_releaser
from guardedtuning.privacy.client import ClientPrivacy, partition_examples, public_examples, token_mechanism
from guardedtuning.privacy.dchi import clip_tokens
from guardedtuning.recipes import config_for


def estimate(bottom, tok, mech, knobs, batch, releases: int,
             spread: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(vocab ids, eta estimates, occurrences) from ``releases`` releases of ``batch``.

    ``spread``: from the difference of two releases of the same row, ``z1 - z2`` exactly
    (the clean vector, clip and shift cancel): ``E||z1 - z2||^2 = 2 D (D + 1) / eta_t^2``.
    Otherwise against the public table: ``D / mean ||release - clip(table[t]) - shift[t]||``.
    """
    keep = batch.attention_mask.bool() & ~torch.isin(batch.input_ids, torch.tensor(special_ids(tok)))
    ids = batch.input_ids[keep]
    vocab, where = ids.unique(return_inverse=True)
    table = None
    if not spread:
        with torch.no_grad():
            table = vocabulary_outputs(bottom, vocab, context=(tok.cls_token_id, tok.sep_token_id))
        if knobs.clip > 0:
            table = clip_tokens(table, clip=knobs.clip)
        if getattr(mech, "mean_shift", None) is not None:
            table = table + mech.mean_shift[vocab]
    total = torch.zeros(len(vocab), dtype=torch.float64)
    seen = torch.zeros(len(vocab), dtype=torch.float64)
    release = make_releaser(bottom, ClientPrivacy(seed=7, mechanism=mech, knobs=knobs, pid=0))
    for start in range(0, len(batch), 64):  # in batches, as a client releases
        part = collate_slice(batch, start, start + 64)
        k = keep[start:start + 64]
        w = where_slice(keep, where, start, start + 64)
        hs = [release(part)[k] for _ in range(releases)]
        if spread:
            for a, b in zip(hs, hs[1:], strict=False):
                total.index_add_(0, w, ((a - b) ** 2).sum(-1).double())
                seen.index_add_(0, w, torch.ones(len(w), dtype=torch.float64))
        else:
            for h in hs:
                total.index_add_(0, w, (h - table[w]).norm(dim=-1).double())
                seen.index_add_(0, w, torch.ones(len(w), dtype=torch.float64))
    d = bottom(batch.input_ids[:1], batch.attention_mask[:1]).shape[-1] if spread else table.shape[-1]
    est = (2 * d * (d + 1) / (total / seen)).sqrt() if spread else d / (total / seen)
    return vocab, est, seen / max(1, releases - 1 if spread else releases)


def collate_slice(batch, a: int, b: int):
    return type(batch)(batch.input_ids[a:b], batch.attention_mask[a:b], batch.labels[a:b], batch.class_ids[a:b])


def where_slice(keep: torch.Tensor, where: torch.Tensor, a: int, b: int) -> torch.Tensor:
    before = int(keep[:a].sum())
    return where[before:before + int(keep[a:b].sum())]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--releases", type=int, default=2)
    ap.add_argument("--min-count", type=int, default=3, help="score tokens the client holds at least this often")
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--client", type=int, default=0)
    ap.add_argument("--table", action="store_true", help="estimate against the public table, not the spread")
    args = ap.parse_args()
    t0 = time.perf_counter()
    own_cfg = config_for("privtune", {"privacy.importance-source": "client"})
    pub_cfg = config_for("privtune", {"privacy.importance-source": "public"})
    n = own_cfg.federation.num_clients
    tok = load_tokenizer(own_cfg.model.name)
    bottom = client_bottom(own_cfg.model, own_cfg.split, own_cfg.lora, "cpu", own_cfg.seed).eval()
    rows = list(partition_examples(own_cfg.data, own_cfg.seed, args.client, n, own_cfg.model.name,
                                   own_cfg.model.max_length))
    batch = collate(rows, tok.pad_token_id)
    own = token_mechanism(own_cfg, rows)
    pub = token_mechanism(pub_cfg, rows)
    public_rows = len(public_examples(pub_cfg.data, pub_cfg.seed, pub_cfg.model.name, pub_cfg.model.max_length))
    print(f"model {own_cfg.model.name}, cut after {own_cfg.split.layer}, eta {own_cfg.privacy.eta}, "
          f"rho {own_cfg.privacy.rho}, strength {own_cfg.privacy.importance_strength}; client {args.client}: "
          f"{len(rows)} rows, public rows {public_rows}, {args.releases} releases of each")
    for name, cfg, mech in (("client", own_cfg, own), ("public", pub_cfg, pub)):
        vocab, est, count = estimate(bottom, tok, mech, cfg.privacy, batch, args.releases, spread=not args.table)
        sel = count >= args.min_count
        v, e = vocab[sel], est[sel]
        e_own, e_pub = own.token_eta[v].double(), pub.token_eta[v].double()
        private = e_own - e_pub  # what the client's rows say beyond public text
        x = torch.stack([torch.ones_like(e_pub), e_pub], 1)
        resid = e - x @ torch.linalg.lstsq(x, e[:, None]).solution[:, 0]
        k = min(args.k, len(v))
        top_est = set(e.topk(k).indices.tolist())
        top_priv = set(private.topk(k).indices.tolist())
        base = len(set(e_pub.topk(k).indices.tolist()) & top_priv)  # what the public table alone names
        err = float(((e / mech.token_eta[v].double()) - 1).abs().mean())
        print(f"importance-source={name}: {len(v)} tokens; rank corr. with own eta "
              f"{spearmanr(e, e_own).statistic:.3f}, with public eta {spearmanr(e, e_pub).statistic:.3f}, "
              f"partial with client-only part {spearmanr(resid, private).statistic:.3f}; top-{k} client-only "
              f"hits {len(top_est & top_priv)} (public table's top-{k}: {base}, chance {k * k / len(v):.1f}); mean |est/eta_t - 1| {err:.3f}")
    print(f"seconds {time.perf_counter() - t0:.0f}")


if __name__ == "__main__":
    main()
