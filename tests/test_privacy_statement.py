"""The mechanism's privacy statement: per released position, composed over releases, "no bound" where none holds."""

from __future__ import annotations

import pytest
import torch

from guardedtuning.privacy.mechanisms import (
    DChiMechanism,
    GaussianMechanism,
    NoMechanism,
    PrivTuneMechanism,
)
from guardedtuning.privacy.privtune import build_privtune


def _tables(strength: float, rho: float = 0.5):
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(120, 8, generator=g)
    ids = torch.randint(0, 120, (30, 6), generator=g)
    labels = (ids[:, 1] % 2).long()  # token 1 of a row decides its class: importance is not flat
    return build_privtune(embeddings=emb, input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels,
                          num_classes=2, eta=20.0, rho=rho, strength=strength, knn_k=4, pgd_steps=5,
                          cache_dir=None)


def test_non_uniform_eta_says_no_bound_and_states_the_importance_leak(tmp_path, monkeypatch):
    monkeypatch.setenv("GUARDEDTUNING_CACHE", str(tmp_path))
    t = _tables(strength=0.5)
    assert float(t.token_eta.max()) > float(t.token_eta.min())  # importance scaling is on
    mech = PrivTuneMechanism(eta=20.0, clip=1.0, rho=0.5, token_eta=t.token_eta, mean_shift=t.mean_shift)
    d = mech.describe(releases=12)
    assert d["calibration"].startswith("no bound:") and "eta differs across tokens" in d["calibration"]
    assert d["epsilon"] is None and d["epsilon_run"] is None
    assert "labelled rows" in d["importance"] and "class-discriminative" in d["importance"]


def test_uniform_eta_and_clip_state_a_bound_composed_over_releases(tmp_path, monkeypatch):
    monkeypatch.setenv("GUARDEDTUNING_CACHE", str(tmp_path))
    t = _tables(strength=0.0)
    mech = PrivTuneMechanism(eta=20.0, clip=1.0, rho=0.5, token_eta=t.token_eta, mean_shift=t.mean_shift)
    d = mech.describe(releases=12)
    per_release = 20.0 * (2 * 1.0 + 2 * 0.5)
    assert d["epsilon"] == pytest.approx(per_release) and d["epsilon_run"] == pytest.approx(12 * per_release)
    assert "no bound" not in d["calibration"] and f"{per_release:.6g}" in d["calibration"]
    assert d["importance"] is None and "per released position" in d["unit"]
    assert "basic composition" in d["composition"] and d["releases"] == 12
    # without releases the per-release figure stands alone
    assert mech.describe()["epsilon_run"] is None and mech.describe()["releases"] is None


def test_no_clip_says_no_bound():
    d = DChiMechanism(eta=50.0).describe(releases=3)
    assert d["calibration"].startswith("no bound:") and "no clip" in d["calibration"] and d["epsilon"] is None
    p = PrivTuneMechanism(eta=50.0).describe()
    assert p["calibration"].startswith("no bound:") and "no clip" in p["calibration"]
    clipped = DChiMechanism(eta=50.0, clip=2.0).describe(releases=3)
    assert clipped["epsilon"] == pytest.approx(200.0) and clipped["epsilon_run"] == pytest.approx(600.0)
    assert NoMechanism().describe()["calibration"].startswith("no bound:")
    g = GaussianMechanism(epsilon=2.0, delta=1e-5, clip=1.0).describe(releases=4)
    assert g["epsilon_run"] == pytest.approx(8.0)
    with pytest.raises(ValueError, match="releases"):
        DChiMechanism(eta=1.0).describe(releases=0)
