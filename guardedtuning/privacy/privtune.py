r"""PrivTune's two tables: a per-token noise scale and a per-token optimized noise mean.

PrivTune (Liu et al., arXiv 2512.08809) perturbs each released token vector with d_chi
noise whose *scale* follows the token's importance for the client's task and whose
*mean* is moved so that the token resembles its indirect neighbours. The paper's exact
formulas are not public; this module implements the following, and
:class:`~guardedtuning.privacy.mechanisms.PrivTuneMechanism` applies the tables.

(a) Token importance, from labelled rows (C classes, vocabulary V): by default
(``privacy.importance-source=public``) the task's held-out rows, public and the same for
every client, so the eta table is one public table; with ``client`` the client's own rows,
whose class-discriminative tokens each release then shows (eta_t can be read back from the
noise norm, ``E||z|| = D / eta_t``). Let :math:`n_{t,c}` count the occurrences of token t in examples of class c (padding
excluded), :math:`N_c = \sum_t n_{t,c}`, :math:`n_t = \sum_c n_{t,c}`,
:math:`df_t = |\{c : n_{t,c} > 0\}|`. Then

.. math::
    \mathrm{tfidf}_t = \max_c \frac{n_{t,c}}{N_c}\,\Big(\ln\frac{1 + C}{1 + df_t} + 1\Big),\qquad
    p(c \mid t) = \frac{n_{t,c} + \alpha}{n_t + C\alpha},\qquad
    w_t = 1 - \frac{H(p(\cdot \mid t))}{\ln C},

:math:`r_t = \mathrm{tfidf}_t \, w_t` and the importance :math:`s_t = r_t / \max_u r_u \in [0, 1]`
(0 for tokens the rows never hold; ``alpha = 1`` smoothing keeps a token seen once from
looking class-certain; with one class ``w_t = 1``).

(b) Per-token eta at the same average budget. With :math:`\bar s` the occurrence-weighted
mean importance :math:`\sum_t n_t s_t / \sum_t n_t` and strength :math:`\gamma \in [0, 1)`,

.. math:: \eta_t = \eta\,(1 + \gamma (s_t - \bar s)) \in [\eta(1-\gamma), \eta(1+\gamma)].

It is increasing in :math:`s_t` (important tokens get a larger eta, i.e. less noise:
:math:`E\lVert z \rVert = D / \eta_t`), always positive, and its occurrence-weighted mean over
the tokens of the rows it was computed from is exactly :math:`\eta`: the average token of
those rows gets the configured budget.

(c) Optimized mean. On the embedding matrix E with k-NN graph :mod:`.knn`, for every
vocabulary token v with embedding :math:`e_v`, 1-hop neighbours :math:`N_1(v)` and n-hop
indirect-neighbour centroid :math:`c_v`, we solve by projected gradient descent

.. math::
    \min_{\lVert\delta\rVert \le \rho}\;
      \lVert x - c_v \rVert
      + \beta \sum_{u \in \{v\} \cup N_1(v)} \max(0, \rho - \lVert x - e_u \rVert)
      + \lambda \lVert e_v \rVert (1 - \cos(x, e_v)), \qquad x = e_v + \delta:

pull toward the indirect neighbours; a hinge (margin rho) pushing x away from the token's
own embedding and its nearest neighbours, where an attacker looks first; and a utility
term (weight ``lambda``, ``privacy.utility-weight``) that keeps x's direction, which is
what the downstream blocks read. All terms are in distance units. PGD starts at 0, takes
``steps`` normalised-gradient steps of size ``2.5 rho / steps``, projects onto the ball
after each and keeps each token's best iterate; the result always obeys
``||delta|| <= rho``. It runs vectorised over vocabulary chunks.

Where the mean shift goes. The cut is after ``split.layer >= 1`` blocks, but the graph
and the PGD live in the input-embedding space. We optimise there with radius
``rho / s`` and release ``s * delta[t]`` added to the *cut* activation of each position
holding token t, with ``s`` = :func:`activation_scale` (typical cut-norm over
embedding-norm). So the shift at the cut is at most ``rho`` in the units of the released
vectors, and the guarantee consequence is exact: between positions of different tokens
the means are moved by at most 2 rho, so d_chi gives ``exp(eta (||x - x'|| + 2 rho))``.
That the direction still means "toward the neighbours" after k blocks is an assumption
(the residual stream of a shallow cut still carries the input embedding); it affects
utility and attack success, never the bound.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from guardedtuning.config import ModelConfig
from guardedtuning.config.privacy import PrivacyConfig, check_eta, check_rho
from guardedtuning.models.loading import load_backbone
from guardedtuning.models.split import Bottom
from guardedtuning.privacy.knn import cached, cached_knn_graph, default_cache_dir, embedding_digest, hop_centroids
from guardedtuning.privacy.mechanisms import PrivTuneMechanism


@dataclass
class TokenImportance:
    """Importance ``score`` (V,) in [0, 1] and occurrence ``count`` (V,) in the rows it came from."""

    score: torch.Tensor
    count: torch.Tensor


def token_importance(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    *,
    vocab_size: int,
    num_classes: int,
    ignore_ids: tuple[int, ...] = (),
    smoothing: float = 1.0,
) -> TokenImportance:
    """Importance of every vocabulary token for the task of the labelled rows given (formula (a) above).

    Parameters
    ----------
    input_ids, attention_mask
        (N, T) tokenised labelled rows (public rows, or the client's own: see the module docstring).
    labels
        (N,) class ids in ``[0, num_classes)``.
    ignore_ids
        Token ids left out entirely (e.g. special tokens).
    """
    keep = attention_mask.bool()
    tok = input_ids[keep]  # (M,)
    cls = labels.view(-1, 1).expand_as(input_ids)[keep]  # (M,)
    if ignore_ids:
        sel = ~torch.isin(tok, torch.tensor(ignore_ids, dtype=tok.dtype))
        tok, cls = tok[sel], cls[sel]
    n = torch.zeros(vocab_size * num_classes, dtype=torch.float64)
    n.index_add_(0, tok * num_classes + cls, torch.ones(tok.numel(), dtype=torch.float64))
    n = n.view(vocab_size, num_classes)  # (V, C) n_{t,c}
    per_class = n.sum(0).clamp(min=1.0)  # (C,) N_c
    df = (n > 0).sum(1).to(torch.float64)  # (V,)
    idf = torch.log((1.0 + num_classes) / (1.0 + df)) + 1.0
    tfidf = (n / per_class).max(1).values * idf  # (V,)
    count = n.sum(1)  # (V,)
    if num_classes > 1:
        p = (n + smoothing) / (count[:, None] + num_classes * smoothing)  # (V, C)
        entropy = -(p * p.log()).sum(1)
        w = 1.0 - entropy / math.log(num_classes)
    else:
        w = torch.ones(vocab_size, dtype=torch.float64)
    raw = tfidf * w * (count > 0)
    top = float(raw.max()) if raw.numel() else 0.0
    score = raw / top if top > 0 else torch.zeros_like(raw)
    return TokenImportance(score=score.float(), count=count.float())


def token_eta(importance: TokenImportance, *, eta: float, strength: float) -> torch.Tensor:
    """Per-token eta (V,) by formula (b): monotone in importance, occurrence-weighted mean = ``eta``."""
    check_eta(eta)
    if not 0 <= strength < 1:
        raise ValueError(f"strength must be in [0, 1) but is {strength}")
    s = importance.score.double()
    c = importance.count.double()
    mean = float((c * s).sum() / c.sum()) if float(c.sum()) > 0 else 0.0
    return (eta * (1.0 + strength * (s - mean))).float()


def _project(delta: torch.Tensor, rho: float) -> torch.Tensor:
    norms = delta.norm(dim=-1, keepdim=True)
    factor: torch.Tensor = (rho * norms.clamp(min=1e-12).reciprocal()).clamp(max=1.0)
    return delta * factor


def _objective_and_grad(delta: torch.Tensor, e: torch.Tensor, nbrs: torch.Tensor, nbr_sq: torch.Tensor,
                        centre: torch.Tensor, *, rho: float, hinge_weight: float,
                        utility_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Objective (c) per token (n,) and its gradient in ``delta`` (n, D), in closed form.

    ``nbrs`` (n, k, D) are the 1-hop embeddings and ``nbr_sq`` (n, k) their squared norms;
    distances to them come from one batched matmul, so no (n, k, D) temporary is formed.
    """
    x = e + delta  # (n, D)
    eps = 1e-12
    to_c = x - centre
    d_c = to_c.norm(dim=-1).clamp(min=eps)  # (n,)
    grad = to_c / d_c[:, None]  # pull
    # hinge on the own embedding: ||x - e|| = ||delta||
    d_own = delta.norm(dim=-1)  # (n,)
    own_on = (d_own < rho).to(x.dtype)
    grad = grad - hinge_weight * own_on[:, None] * delta / d_own.clamp(min=eps)[:, None]
    # hinge on the 1-hop neighbours
    xe = torch.bmm(nbrs, x[:, :, None])[:, :, 0]  # (n, k) x . e_u
    d_u = ((x * x).sum(-1, keepdim=True) + nbr_sq - 2.0 * xe).clamp(min=0).sqrt()  # (n, k)
    on = (d_u < rho).to(x.dtype)
    w = on / d_u.clamp(min=eps)  # (n, k)
    grad = grad - hinge_weight * (w.sum(1, keepdim=True) * x - torch.bmm(w[:, None, :], nbrs)[:, 0])
    hinge = (rho - d_own) * own_on + ((rho - d_u) * on).sum(1)
    # utility: ||e|| (1 - cos(x, e))
    nx = x.norm(dim=-1).clamp(min=eps)
    ne = e.norm(dim=-1).clamp(min=eps)
    cos = (x * e).sum(-1) / (nx * ne)
    utility = ne * (1.0 - cos)
    grad = grad + utility_weight * (-e / nx[:, None] + (ne * cos / nx**2)[:, None] * x)
    return d_c + hinge_weight * hinge + utility_weight * utility, grad


def optimized_mean_shift(
    embeddings: torch.Tensor,
    knn: torch.Tensor,
    centroids: torch.Tensor,
    *,
    rho: float,
    steps: int = 20,
    utility_weight: float = 0.5,
    hinge_weight: float = 1.0,
    chunk: int = 4096,
) -> torch.Tensor:
    """PGD of objective (c) for every vocabulary token: shifts (V, D) with norms <= ``rho``."""
    check_rho(rho)
    e_all = embeddings.detach().to("cpu", torch.float32)
    out = torch.zeros_like(e_all)
    if rho == 0:
        return out
    alpha = 2.5 * rho / steps
    kw = dict(rho=rho, hinge_weight=hinge_weight, utility_weight=utility_weight)
    for start in range(0, e_all.shape[0], chunk):
        sl = slice(start, min(start + chunk, e_all.shape[0]))
        e, nbrs, centre = e_all[sl], e_all[knn[sl]], centroids[sl]  # (n, D), (n, k, D), (n, D)
        nbr_sq = (nbrs * nbrs).sum(-1)  # (n, k)
        delta = torch.zeros_like(e)
        best = delta.clone()
        best_loss = torch.full((e.shape[0],), float("inf"))
        for it in range(steps + 1):
            loss, grad = _objective_and_grad(delta, e, nbrs, nbr_sq, centre, **kw)
            better = loss < best_loss
            best[better], best_loss[better] = delta[better], loss[better]
            if it == steps:
                break
            step = grad / grad.norm(dim=-1, keepdim=True).clamp(min=1e-12)
            delta = _project(delta - alpha * step, rho)
        out[sl] = _project(best, rho)  # exact bound despite float rounding
    return out


def activation_scale(bottom: torch.nn.Module, embeddings: torch.Tensor, *, num_tokens: int = 256) -> float:
    """Mean cut-activation norm over mean embedding norm, on single-token probes (public).

    Probes are ``num_tokens`` evenly spaced vocabulary ids, each run alone through the
    bottom; nothing of the client's data enters.
    """
    v = embeddings.shape[0]
    ids = torch.linspace(0, v - 1, steps=min(num_tokens, v)).long()
    device = embeddings.device
    with torch.no_grad():
        h = bottom(ids[:, None].to(device), torch.ones((len(ids), 1), dtype=torch.long, device=device))  # (n, 1, D)
        ratio = h[:, 0].norm(dim=-1).mean() / embeddings[ids.to(device)].norm(dim=-1).mean()
    return float(ratio)


@dataclass
class PrivTuneTables:
    """What :class:`PrivTuneMechanism` needs, plus how long each part took."""

    token_eta: torch.Tensor  # (V,)
    mean_shift: torch.Tensor  # (V, D), norms <= rho (cut units)
    importance: TokenImportance
    seconds: dict[str, float] = field(default_factory=dict)


def build_privtune(
    *,
    embeddings: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    eta: float,
    rho: float,
    strength: float = 0.5,
    knn_k: int = 10,
    hops: int = 2,
    pgd_steps: int = 20,
    utility_weight: float = 0.5,
    scale: float = 1.0,
    cache_dir: Path | None = None,
    ignore_ids: tuple[int, ...] = (),
) -> PrivTuneTables:
    """Importance and eta from the labelled rows given; graph, centroids and PGD shifts from E.

    ``input_ids``, ``attention_mask`` and ``labels`` are the rows importance comes from:
    the public rows or the client's own (:func:`privtune_from_config` says which; see
    :func:`guardedtuning.privacy.client.importance_rows`). The graph-dependent parts are
    cached per process and on disk (``cache_dir``; None =
    :func:`~guardedtuning.privacy.knn.default_cache_dir`); the importance is not cached here
    (computing it takes milliseconds; the rows it comes from are cached by the caller). ``scale`` maps embedding units to cut units (see the module
    docstring): the PGD runs with radius ``rho / scale`` and its result is multiplied by
    ``scale``.
    """
    check_rho(rho)
    if not scale > 0:
        raise ValueError(f"scale must be positive but is {scale}")
    folder = cache_dir if cache_dir is not None else default_cache_dir()
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    imp = token_importance(input_ids, attention_mask, labels, vocab_size=embeddings.shape[0],
                           num_classes=num_classes, ignore_ids=ignore_ids)
    etas = token_eta(imp, eta=eta, strength=strength)
    seconds["importance"] = time.perf_counter() - t0
    if rho == 0:
        return PrivTuneTables(etas, torch.zeros(embeddings.shape, dtype=torch.float32), imp, seconds)
    t0 = time.perf_counter()
    digest = embedding_digest(embeddings)
    knn = cached_knn_graph(embeddings, k=knn_k, cache_dir=folder, digest=digest)
    seconds["knn"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    centres = cached(("centroids", digest, f"k{knn_k}", f"h{hops}"), folder,
                     lambda: hop_centroids(embeddings, knn, hops=hops))
    seconds["centroids"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rho_e = rho / scale
    key = ("shift", digest, f"k{knn_k}", f"h{hops}", f"s{pgd_steps}", f"u{utility_weight!r}", f"r{rho_e!r}")
    shift_e = cached(key, folder, lambda: optimized_mean_shift(
        embeddings, knn, centres, rho=rho_e, steps=pgd_steps, utility_weight=utility_weight))
    # in cut units; one table per process for all clients (it is public and 47 MB for MiniLM)
    shift = cached((*key, f"cut{scale!r}", f"rho{rho!r}"), None, lambda: _project(shift_e * scale, rho))
    seconds["pgd"] = time.perf_counter() - t0
    return PrivTuneTables(etas, shift, imp, seconds)


def privtune_from_config(
    cfg: PrivacyConfig,
    *,
    embeddings: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    scale: float = 1.0,
    ignore_ids: tuple[int, ...] = (),
) -> tuple[PrivTuneMechanism, PrivTuneTables]:
    """Build the tables with ``privacy.*`` settings and the mechanism that applies them.

    ``input_ids``, ``attention_mask`` and ``labels`` must be the rows that
    ``cfg.importance_source`` names (the public rows for ``public``, the client's for
    ``client``); the mechanism's privacy statement says which it was.
    """
    tables = build_privtune(
        embeddings=embeddings, input_ids=input_ids, attention_mask=attention_mask, labels=labels,
        num_classes=num_classes, eta=cfg.eta, rho=cfg.rho, strength=cfg.importance_strength,
        knn_k=cfg.knn_k, hops=cfg.hops, pgd_steps=cfg.pgd_steps, utility_weight=cfg.utility_weight,
        scale=scale, cache_dir=Path(cfg.cache_dir).expanduser() if cfg.cache_dir else None, ignore_ids=ignore_ids,
    )
    mech = PrivTuneMechanism(eta=cfg.eta, clip=cfg.clip, rho=cfg.rho, token_eta=tables.token_eta,
                             mean_shift=tables.mean_shift, importance_source=cfg.importance_source)
    return mech, tables


@functools.lru_cache(maxsize=2)
def privtune_base(model: ModelConfig, layer: int, seed: int) -> tuple[torch.Tensor, float]:
    """The public inputs of PrivTune's tables: the vocabulary embeddings and the cut's scale.

    Both come from the *base* bottom (no adapter), so they are the same in every process
    and for every client, and the tables cached on disk from them are found again.
    """
    backbone = load_backbone(model.name, num_layers=model.num_layers, seed=seed)
    bottom = Bottom(backbone, layer).eval()
    embeddings = bottom.word_embeddings().detach().cpu()
    return embeddings, activation_scale(bottom, embeddings)
