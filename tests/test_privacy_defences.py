"""Decorrelation (NoPeek) and uplink quantization."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from guardedtuning.privacy.decorrelation import decorrelation_loss, distance_correlation
from guardedtuning.privacy.quantize import QuantizedActivations, dequantize_activations, quantize_activations
from guardedtuning.training import split_backward


def reference_dcor(x: np.ndarray, y: np.ndarray, bias_corrected: bool = False) -> float:
    """Textbook formulas, loops and all."""
    n = len(x)
    a = np.array([[np.linalg.norm(x[i] - x[j]) for j in range(n)] for i in range(n)])
    b = np.array([[np.linalg.norm(y[i] - y[j]) for j in range(n)] for i in range(n)])

    def centre(d):
        if not bias_corrected:
            return d - d.mean(0)[None] - d.mean(1)[:, None] + d.mean()
        c = d - d.sum(0)[None] / (n - 2) - d.sum(1)[:, None] / (n - 2) + d.sum() / ((n - 1) * (n - 2))
        np.fill_diagonal(c, 0.0)
        return c

    ca, cb = centre(a), centre(b)
    r2 = (ca * cb).sum() / math.sqrt((ca * ca).sum() * (cb * cb).sum())
    return math.sqrt(max(r2, 0.0))


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("bias_corrected", [False, True])
def test_distance_correlation_matches_the_textbook_formula(bias_corrected):
    x, y = rand(12, 3), rand(12, 5, seed=1)
    y[:, 0] += 2 * x[:, 0]
    got = distance_correlation(x, y, bias_corrected=bias_corrected).item()
    assert got == pytest.approx(reference_dcor(x.numpy(), y.numpy(), bias_corrected), abs=1e-5)


def test_distance_correlation_is_zero_for_independent_and_high_for_dependent_data():
    x, noise = rand(400, 4), rand(400, 4, seed=2)
    assert distance_correlation(x, noise, bias_corrected=True).item() < 0.1
    assert distance_correlation(x, noise).item() < 0.2  # the V-statistic is biased up at finite n
    assert distance_correlation(x, 3 * x + 1).item() == pytest.approx(1.0, abs=1e-4)
    assert distance_correlation(x, x**2, bias_corrected=True).item() > 0.3  # uncorrelated, yet dependent
    assert distance_correlation(x, x @ rand(4, 9, seed=3) + 0.1 * rand(400, 9, seed=4)).item() > 0.9


def test_masked_batches_equal_trimmed_examples():
    x, y = rand(3, 7, 4), rand(3, 7, 6, seed=1)
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4])
    got = distance_correlation(x, y, mask)
    for i, n in enumerate((7, 5, 3)):
        assert got[i].item() == pytest.approx(distance_correlation(x[i, :n], y[i, :n]).item(), abs=1e-6)


def test_decorrelation_loss_is_differentiable_and_descends():
    x = rand(4, 10, 8).float()
    w = torch.eye(8, requires_grad=True)
    mask = torch.ones(4, 10)
    mask[0, 6:] = 0
    for level in ("token", "example"):
        loss = decorrelation_loss(x, torch.tanh(x @ w), mask, level=level)  # dCor(x, x) = 1 is flat
        (g,) = torch.autograd.grad(loss, w)
        assert torch.isfinite(g).all() and g.abs().sum() > 0
    start = decorrelation_loss(x, x @ w, mask).item()
    opt = torch.optim.SGD([w], lr=0.5)
    for _ in range(20):
        opt.zero_grad()
        decorrelation_loss(x, torch.tanh(x @ w) + 0.5 * torch.sin(3 * x @ w), mask).backward()
        opt.step()
    assert decorrelation_loss(x, torch.tanh(x @ w) + 0.5 * torch.sin(3 * x @ w), mask).item() < start


def test_split_backward_adds_the_local_term_to_the_server_gradient():
    w = torch.randn(3, 3, requires_grad=True)
    x = torch.randn(5, 3)
    grad_h = torch.randn(5, 3)
    split_backward(x @ w, grad_h, extra_loss=(x @ w).pow(2).mean())
    got = w.grad.clone()
    w.grad = None
    ((x @ w) * grad_h).sum().add((x @ w).pow(2).mean()).backward()
    torch.testing.assert_close(got, w.grad)


# --- quantization ------------------------------------------------------------------------

shapes = st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 9))


@settings(max_examples=60, deadline=None)
@given(data=shapes.flatmap(lambda s: arrays(np.float32, s, elements=st.floats(-1e4, 1e4, width=32))),
       bits=st.sampled_from([8, 4]))
def test_quantization_round_trip_is_within_half_a_step(data, bits):
    h = torch.from_numpy(data)
    qa = quantize_activations(h, bits=bits)
    back = dequantize_activations(QuantizedActivations.from_arrays(qa.arrays()))
    assert back.shape == h.shape and back.dtype == torch.float32
    err = (back - h).abs().numpy()
    bound = qa.scales[..., None] / 2 * (1 + 1e-5) + 1e-30
    assert (err <= bound).all()
    b, t, d = data.shape
    per_token = d if bits == 8 else (d + 1) // 2
    assert qa.codes.dtype == np.uint8 and qa.codes.nbytes == b * t * per_token
    assert qa.nbytes == b * t * per_token + 4 * b * t


def test_quantization_sizes_and_exact_zeros():
    h = torch.randn(16, 64, 384)
    h[0, 0] = 0.0
    q8, q4 = quantize_activations(h, bits=8), quantize_activations(h, bits=4)
    assert q8.nbytes == 16 * 64 * (384 + 4) and q4.nbytes == 16 * 64 * (192 + 4)
    assert q8.nbytes < h.numel() * 4 / 3.9 and q4.nbytes < h.numel() * 4 / 7.5
    assert (dequantize_activations(q4)[0, 0] == 0).all()
    # dequantizing is an exact float32 product of code and scale
    codes = q8.codes.astype(np.int16) - 128
    np.testing.assert_array_equal(dequantize_activations(q8).numpy(), codes.astype(np.float32) * q8.scales[..., None])
    with pytest.raises(ValueError, match="8 or 4"):
        quantize_activations(h, bits=2)
