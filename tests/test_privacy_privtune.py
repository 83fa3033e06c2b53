from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from guardedtuning.config.privacy import PrivacyConfig
from guardedtuning.privacy import knn as knn_mod
from guardedtuning.privacy.knn import cached_knn_graph, exact_hop_neighbours, hop_centroids, knn_graph
from guardedtuning.privacy.privtune import (
    _objective_and_grad,
    build_privtune,
    optimized_mean_shift,
    privtune_from_config,
    token_eta,
    token_importance,
)


def vocab(v: int = 300, d: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(v, d, generator=torch.Generator().manual_seed(seed))


# --- k-NN graph --------------------------------------------------------------------------


def test_knn_graph_matches_brute_force_across_chunks():
    e = vocab()
    got = knn_graph(e, k=5, chunk=37)
    d = torch.cdist(e.double(), e.double())
    d.fill_diagonal_(float("inf"))
    want = d.topk(5, dim=1, largest=False).indices
    assert torch.equal(got, want)


def test_exact_hop_neighbours_on_a_hand_made_graph():
    # 0 -> 1 -> 2 -> 3 -> 4 -> 3 (k = 1)
    knn = torch.tensor([[1], [2], [3], [4], [3]])
    two = exact_hop_neighbours(knn, hops=2).toarray()
    three = exact_hop_neighbours(knn, hops=3).toarray()
    assert two[0].nonzero()[0].tolist() == [2]
    assert three[0].nonzero()[0].tolist() == [3]
    assert two[3].nonzero()[0].tolist() == []  # 3 -> 4 -> 3 is back to itself
    assert two[4].nonzero()[0].tolist() == []  # 4 -> 3 -> 4 likewise


def test_hop_centroids_fall_back_to_the_one_hop_centroid():
    e = torch.arange(10, dtype=torch.float32).view(5, 2)
    knn = torch.tensor([[1], [2], [3], [4], [3]])
    c = hop_centroids(e, knn, hops=2)
    torch.testing.assert_close(c[0], e[2])  # the 2-hop neighbour of 0 is 2
    torch.testing.assert_close(c[3], e[4])  # none: falls back to the 1-hop neighbour


def test_knn_graph_is_cached_in_memory_and_on_disk(tmp_path, monkeypatch):
    e = vocab(seed=3)
    first = cached_knn_graph(e, k=4, cache_dir=tmp_path)
    files = list(tmp_path.glob("knn-*-k4.pt"))
    assert len(files) == 1
    monkeypatch.setattr(knn_mod, "_MEMORY", {})
    monkeypatch.setattr(knn_mod, "knn_graph", lambda *a, **k: pytest.fail("rebuilt despite the disk cache"))
    assert torch.equal(cached_knn_graph(e, k=4, cache_dir=tmp_path), first)


# --- importance and per-token eta --------------------------------------------------------


def test_token_importance_by_hand():
    ids = torch.tensor([[1, 2], [1, 3], [2, 4]])
    labels = torch.tensor([0, 0, 1])
    imp = token_importance(ids, torch.ones_like(ids), labels, vocab_size=5, num_classes=2)
    idf1 = math.log(3 / 2) + 1  # tokens seen in one class
    h31 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))  # p(c|1) = (3, 1) / 4
    h21 = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))  # p(c|3) = (2, 1) / 3
    raw = {
        1: 0.5 * idf1 * (1 - h31 / math.log(2)),
        2: 0.5 * 1.0 * 0.0,  # in both classes equally: entropy weight 0
        3: 0.25 * idf1 * (1 - h21 / math.log(2)),
        4: 0.5 * idf1 * (1 - h21 / math.log(2)),
    }
    want = torch.tensor([0.0] + [raw[t] / raw[1] for t in (1, 2, 3, 4)])
    torch.testing.assert_close(imp.score, want.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(imp.count, torch.tensor([0.0, 2, 2, 1, 1]))


def test_token_importance_ignores_padding_and_ignored_ids():
    ids = torch.tensor([[1, 2, 0], [3, 0, 0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    imp = token_importance(ids, mask, torch.tensor([0, 1]), vocab_size=4, num_classes=2, ignore_ids=(2,))
    assert imp.count.tolist() == [0.0, 1.0, 0.0, 1.0]


def test_token_eta_is_monotone_and_keeps_the_average_budget():
    ids = torch.randint(0, 50, (40, 12), generator=torch.Generator().manual_seed(0))
    labels = (ids[:, 0] % 3)
    imp = token_importance(ids, torch.ones_like(ids), labels, vocab_size=60, num_classes=3)
    eta = token_eta(imp, eta=10.0, strength=0.6)
    order = imp.score.argsort()
    assert (eta[order].diff() >= -1e-5).all()  # more important -> larger eta -> less noise
    weighted = float((imp.count * eta).sum() / imp.count.sum())
    assert weighted == pytest.approx(10.0, rel=1e-6)
    assert float(eta.min()) >= 10.0 * 0.4 - 1e-5 and float(eta.max()) <= 10.0 * 1.6 + 1e-5
    assert float(eta[55]) < 10.0  # a token the client never saw gets more noise than average
    assert torch.equal(token_eta(imp, eta=10.0, strength=0.0), torch.full((60,), 10.0))


# --- optimized mean ----------------------------------------------------------------------


def _reference_objective(delta, e, nbrs, centre, rho, hinge_weight, utility_weight):
    x = e + delta
    pull = (x - centre).norm(dim=-1)
    near = torch.cat([e[:, None], nbrs], 1)
    hinge = torch.relu(rho - (x[:, None] - near).norm(dim=-1)).sum(1)
    cos = torch.nn.functional.cosine_similarity(x, e, dim=-1)
    return pull + hinge_weight * hinge + utility_weight * e.norm(dim=-1) * (1 - cos)


def test_closed_form_gradient_matches_autograd():
    e_all = vocab(v=60, d=8, seed=5).double()
    knn = knn_graph(e_all, k=4)
    centre = hop_centroids(e_all.float(), knn, hops=2).double()
    e, nbrs = e_all, e_all[knn]
    delta = 0.3 * torch.randn(60, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    rho = 2.0  # large, so that neighbour hinges are active too
    loss, grad = _objective_and_grad(delta, e, nbrs, (nbrs * nbrs).sum(-1), centre, rho=rho,
                                     hinge_weight=1.5, utility_weight=0.7)
    d = delta.clone().requires_grad_(True)
    ref = _reference_objective(d, e, nbrs, centre, rho, 1.5, 0.7)
    (ref_grad,) = torch.autograd.grad(ref.sum(), d)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("rho", [0.05, 0.5, 3.0])
def test_optimized_mean_obeys_the_bound_and_moves_toward_indirect_neighbours(rho):
    e = vocab(v=400, d=16, seed=2)
    knn = knn_graph(e, k=6)
    centre = hop_centroids(e, knn, hops=2)
    shift = optimized_mean_shift(e, knn, centre, rho=rho, steps=15, chunk=128)
    assert float(shift.norm(dim=-1).max()) <= rho * (1 + 1e-6)
    before = (e - centre).norm(dim=-1).mean()
    after = (e + shift - centre).norm(dim=-1).mean()
    assert after < before
    zero = optimized_mean_shift(e, knn, centre, rho=0.0)
    assert not zero.any()


def test_build_privtune_maps_the_shift_to_cut_units_and_caches(tmp_path):
    e = vocab(v=500, d=16, seed=4)
    ids = torch.randint(0, 500, (30, 10), generator=torch.Generator().manual_seed(0))
    labels = ids[:, 0] % 2
    kw = dict(embeddings=e, input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, num_classes=2,
              eta=20.0, rho=2.0, knn_k=5, pgd_steps=10, scale=4.0, cache_dir=tmp_path)
    tables = build_privtune(**kw)
    norms = tables.mean_shift.norm(dim=-1)
    assert float(norms.max()) <= 2.0 * (1 + 1e-6) and float(norms.mean()) > 1.0
    assert {p.name.split("-")[0] for p in tmp_path.glob("*.pt")} == {"knn", "centroids", "shift"}
    again = build_privtune(**kw)
    torch.testing.assert_close(again.mean_shift, tables.mean_shift)
    assert set(tables.seconds) == {"importance", "knn", "centroids", "pgd"}


def test_privtune_from_config_builds_the_mechanism(tmp_path):
    e = vocab(v=200, d=8, seed=6)
    ids = torch.randint(0, 200, (20, 6), generator=torch.Generator().manual_seed(1))
    cfg = PrivacyConfig(mechanism="privtune", eta=50.0, rho=0.3, clip=2.0, knn_k=4, pgd_steps=5,
                        cache_dir=str(tmp_path))
    mech, tables = privtune_from_config(cfg, embeddings=e, input_ids=ids, attention_mask=torch.ones_like(ids),
                                        labels=ids[:, 0] % 2, num_classes=2)
    desc = mech.describe()
    assert desc["mechanism"] == "privtune" and desc["mean_shift_bound"] == pytest.approx(0.6)
    assert desc["eta_min"] < 50.0 < desc["eta_max"]
    assert mech.importance_source == cfg.importance_source == "public" and "public" in desc["importance"]
    own, _ = privtune_from_config(dataclasses.replace(cfg, importance_source="client"), embeddings=e, input_ids=ids,
                                  attention_mask=torch.ones_like(ids), labels=ids[:, 0] % 2, num_classes=2)
    assert "client's own labelled rows" in own.describe()["importance"]
    out = mech.perturb(torch.randn(20, 6, 8), torch.ones(20, 6), generator=torch.Generator().manual_seed(0),
                       input_ids=ids)
    assert out.shape == (20, 6, 8) and torch.isfinite(out).all()
