from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from guardedtuning.config.privacy import DPConfig, PrivacyConfig, check_combination
from guardedtuning.errors import ConfigError
from guardedtuning.privacy.dchi import clip_tokens, sample_dchi_noise
from guardedtuning.privacy.mechanisms import (
    DESCRIBE_KEYS,
    DChiMechanism,
    GaussianMechanism,
    LaplaceMechanism,
    PrivTuneMechanism,
    analytic_gaussian_sigma,
    classical_gaussian_sigma,
    gaussian_delta,
    make_mechanism,
    mechanism_from_config,
)
from guardedtuning.privacy.randomness import STREAM_TOKEN_NOISE, derive_seed, make_generator


def gen(seed: int = 0) -> torch.Generator:
    return make_generator(seed, STREAM_TOKEN_NOISE)


# --- d_chi sampling ---------------------------------------------------------------------


@pytest.mark.parametrize(("dim", "eta"), [(16, 2.0), (384, 100.0)])
def test_dchi_norms_follow_gamma_d_rate_eta(dim, eta):
    z = sample_dchi_noise((4000,), dim=dim, eta=eta, generator=gen(), dtype=torch.float64)
    norms = z.norm(dim=-1).numpy()
    res = stats.kstest(norms, stats.gamma(a=dim, scale=1.0 / eta).cdf)
    assert res.pvalue > 0.01
    assert norms.mean() == pytest.approx(dim / eta, rel=0.02)


def test_dchi_directions_are_isotropic():
    dim, n = 8, 20000
    z = sample_dchi_noise((n,), dim=dim, eta=1.0, generator=gen(1), dtype=torch.float64)
    u = (z / z.norm(dim=-1, keepdim=True)).numpy()
    assert np.linalg.norm(u.mean(0)) < 4 / math.sqrt(n)  # mean direction ~ 0
    # second moment of a uniform direction is I / d
    np.testing.assert_allclose(u.T @ u / n, np.eye(dim) / dim, atol=0.01)
    # the projection on any fixed axis, mapped to [0, 1], is Beta((d-1)/2, (d-1)/2)
    axis = np.random.default_rng(0).normal(size=dim)
    axis /= np.linalg.norm(axis)
    proj = (u @ axis + 1) / 2
    assert stats.kstest(proj, stats.beta((dim - 1) / 2, (dim - 1) / 2).cdf).pvalue > 0.01


def test_dchi_per_position_eta_scales_each_norm():
    eta = torch.tensor([[1.0, 10.0, 100.0]]).expand(3000, 3)
    z = sample_dchi_noise((3000, 3), dim=32, eta=eta, generator=gen(2), dtype=torch.float64)
    scaled = (z.norm(dim=-1) * eta.double()).numpy()  # each column ~ Gamma(32, 1)
    for col in range(3):
        assert stats.kstest(scaled[:, col], stats.gamma(a=32).cdf).pvalue > 0.01


def test_noise_is_reproducible_from_the_seed_and_differs_across_streams():
    a = sample_dchi_noise((5,), dim=4, eta=1.0, generator=gen(7))
    b = sample_dchi_noise((5,), dim=4, eta=1.0, generator=gen(7))
    c = sample_dchi_noise((5,), dim=4, eta=1.0, generator=make_generator(7, STREAM_TOKEN_NOISE, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert derive_seed(1, 2) != derive_seed(2, 1)


def test_clip_tokens_bounds_each_token_and_keeps_short_ones():
    h = torch.tensor([[[3.0, 4.0], [0.3, 0.4]]])  # norms 5 and 0.5
    out = clip_tokens(h, clip=1.0)
    torch.testing.assert_close(out, torch.tensor([[[0.6, 0.8], [0.3, 0.4]]]))
    assert clip_tokens(h, clip=0.0) is h


# --- mechanisms --------------------------------------------------------------------------


def test_dchi_mechanism_clips_adds_noise_and_zeroes_padding():
    h = torch.randn(2, 5, 16) * 10
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    mech = DChiMechanism(eta=1e6, clip=1.0)  # almost no noise
    out = mech.perturb(h, mask, generator=gen())
    assert (out[0, 3:] == 0).all()
    assert torch.allclose(out[mask.bool()].norm(dim=-1), torch.ones(8), atol=1e-3)
    d = mech.describe()
    assert set(d) == set(DESCRIBE_KEYS)
    assert d["epsilon"] == pytest.approx(2e6) and d["delta"] is None and d["sigma"] is None


def test_gaussian_noise_std_matches_its_calibration():
    mech = GaussianMechanism(epsilon=2.0, delta=1e-5, clip=1.0)
    assert gaussian_delta(sigma=mech.sigma, epsilon=2.0, sensitivity=2.0) <= 1e-5
    assert gaussian_delta(sigma=mech.sigma * 0.99, epsilon=2.0, sensitivity=2.0) > 1e-5  # tight
    out = mech.perturb(torch.zeros(50, 40, 64), torch.ones(50, 40), generator=gen())
    assert out.std().item() == pytest.approx(mech.sigma, rel=0.02)
    assert abs(out.mean().item()) < 0.02 * mech.sigma
    assert mech.describe()["sigma"] == mech.sigma


@pytest.mark.parametrize("eps", [0.1, 0.5, 0.9])
def test_analytic_gaussian_is_never_above_the_classical_bound(eps):
    analytic = analytic_gaussian_sigma(epsilon=eps, delta=1e-5, sensitivity=1.0)
    classical = classical_gaussian_sigma(epsilon=eps, delta=1e-5, sensitivity=1.0)
    assert analytic < classical
    assert gaussian_delta(sigma=classical, epsilon=eps, sensitivity=1.0) <= 1e-5  # classical is valid too


def test_analytic_gaussian_scales_with_sensitivity_and_handles_large_epsilon():
    s1 = analytic_gaussian_sigma(epsilon=20.0, delta=1e-6, sensitivity=1.0)
    s3 = analytic_gaussian_sigma(epsilon=20.0, delta=1e-6, sensitivity=3.0)
    assert s3 == pytest.approx(3 * s1, rel=1e-6)
    with pytest.raises(ValueError, match="epsilon < 1"):
        classical_gaussian_sigma(epsilon=2.0, delta=1e-5, sensitivity=1.0)


def test_laplace_scale_follows_the_l1_sensitivity_of_the_l2_clip():
    mech = LaplaceMechanism(epsilon=4.0, clip=0.5)
    out = mech.perturb(torch.zeros(40, 50, 64), torch.ones(40, 50), generator=gen())
    b = 2 * 0.5 * math.sqrt(64) / 4.0
    assert mech.scale(64) == pytest.approx(b)
    assert out.abs().mean().item() == pytest.approx(b, rel=0.02)  # E|Laplace(b)| = b
    assert out.var().item() == pytest.approx(2 * b * b, rel=0.04)
    assert mech.describe()["laplace_scale"] == pytest.approx(b)


def test_privtune_mechanism_applies_the_token_tables():
    v, d = 10, 8
    token_eta = torch.linspace(1.0, 10.0, v)
    shift = torch.zeros(v, d)
    shift[3, 0] = 0.5
    mech = PrivTuneMechanism(eta=5.0, clip=0.0, rho=0.5, token_eta=token_eta, mean_shift=shift)
    ids = torch.full((1, 3000), 3)
    ids[0, 1500:] = 9
    h = torch.zeros(1, 3000, d)
    out = mech.perturb(h, torch.ones(1, 3000), generator=gen(), input_ids=ids)
    mean3 = out[0, :1500].mean(0)
    assert mean3[0].item() == pytest.approx(0.5, abs=0.05)
    n3, n9 = out[0, :1500].norm(dim=-1).mean(), out[0, 1500:].norm(dim=-1).mean()
    assert n3.item() == pytest.approx(d / token_eta[3].item(), rel=0.05)
    assert n9.item() == pytest.approx(d / token_eta[9].item(), rel=0.05)
    desc = mech.describe()
    assert desc["mean_shift_bound"] == 1.0 and desc["eta_max"] == 10.0 and desc["epsilon"] is None
    uniform = PrivTuneMechanism(eta=5.0, clip=1.0, rho=0.5, mean_shift=shift)
    assert uniform.describe()["epsilon"] == pytest.approx(5.0 * (2 * 1.0 + 2 * 0.5))
    with pytest.raises(ValueError, match="input_ids"):
        mech.perturb(h, torch.ones(1, 3000), generator=gen())


def test_privtune_refuses_a_table_that_breaks_its_bound():
    with pytest.raises(ValueError, match="rho"):
        PrivTuneMechanism(eta=1.0, rho=0.1, mean_shift=torch.ones(4, 4))


def test_none_mechanism_is_the_identity():
    h = torch.randn(2, 3, 4)
    assert make_mechanism("none").perturb(h, torch.zeros(2, 3), generator=gen()) is h


# --- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"name": "dchi", "eta": 0.0}, "privacy.eta"),
        ({"name": "privtune", "eta": -1.0}, "privacy.eta"),
        ({"name": "privtune", "rho": -0.1}, "privacy.rho"),
        ({"name": "gaussian", "epsilon": 0.0, "clip": 1.0}, "privacy.epsilon"),
        ({"name": "gaussian", "delta": 1.0, "clip": 1.0}, "privacy.delta"),
        ({"name": "gaussian", "delta": 0.0, "clip": 1.0}, "privacy.delta"),
        ({"name": "gaussian", "clip": 0.0}, "privacy.clip"),
        ({"name": "laplace", "epsilon": -2.0, "clip": 1.0}, "privacy.epsilon"),
        ({"name": "dhci"}, "privacy.mechanism"),
    ],
)
def test_bad_mechanism_input_names_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=f"`{key}`"):
        make_mechanism(**kwargs)


@pytest.mark.parametrize(
    ("cls", "kwargs", "key"),
    [
        (PrivacyConfig, {"mechanism": "gauss"}, "privacy.mechanism"),
        (PrivacyConfig, {"eta": 0.0}, "privacy.eta"),
        (PrivacyConfig, {"rho": -1.0}, "privacy.rho"),
        (PrivacyConfig, {"epsilon": 0.0}, "privacy.epsilon"),
        (PrivacyConfig, {"delta": 1.5}, "privacy.delta"),
        (PrivacyConfig, {"mechanism": "laplace", "clip": 0.0}, "privacy.clip"),
        (PrivacyConfig, {"hops": 1}, "privacy.hops"),
        (PrivacyConfig, {"importance_strength": 1.0}, "privacy.importance-strength"),
        (PrivacyConfig, {"quantize_bits": 2}, "privacy.quantize-bits"),
        (PrivacyConfig, {"nopeek_level": "batch"}, "privacy.nopeek-level"),
        (DPConfig, {"target_epsilon": 0.0}, "dp.target-epsilon"),
        (DPConfig, {"delta": 0.0}, "dp.delta"),
        (DPConfig, {"delta": 1.0}, "dp.delta"),
        (DPConfig, {"max_grad_norm": 0.0}, "dp.max-grad-norm"),
        (DPConfig, {"accountant": "gdp"}, "dp.accountant"),
    ],
)
def test_bad_settings_name_the_key(cls, kwargs, key):
    with pytest.raises(ConfigError, match=f"`{key}`"):
        cls(**kwargs)


def test_settings_build_mechanisms_and_reject_unsafe_combinations():
    assert isinstance(mechanism_from_config(PrivacyConfig(mechanism="dchi", eta=3.0)), DChiMechanism)
    with pytest.raises(ValueError, match="mean_shift table"):
        mechanism_from_config(PrivacyConfig(mechanism="privtune", rho=1.0))  # tables come from privtune_from_config
    with pytest.raises(ConfigError, match="privacy.nopeek-level"):
        check_combination(PrivacyConfig(nopeek_weight=0.1, nopeek_level="example"), DPConfig(enabled=True))
    check_combination(PrivacyConfig(nopeek_weight=0.1), DPConfig(enabled=True))
