"""The low-dimensional release (``split.release-dim``): what a client releases, that it trains, what is refused."""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from guardedtuning.config import LoraConfig, ModelConfig, SplitConfig, build_config
from guardedtuning.data.batches import encode
from guardedtuning.errors import ConfigError, ModelLoadError
from guardedtuning.models.loading import load_tokenizer
from guardedtuning.models.lora import trainable_state
from guardedtuning.models.parts import client_bottom, split_model
from guardedtuning.privacy.client import ClientPrivacy
from guardedtuning.privacy.dpsgd import DPAccountant, DPPlan, DPStep
from guardedtuning.privacy.mechanisms import DChiMechanism
from guardedtuning.recipes import config_for
from guardedtuning.training import forward_activations

TEXTS = ["a fine day for a walk in the park", "awful", "it was ok I guess, nothing special", "great film"]
SPLIT = SplitConfig(layer=2, release_dim=4)


def _batch():
    return encode(load_tokenizer("tiny-bert"), "encoder", TEXTS, [2, 0, 1, 2], max_length=32,
                  label_names=("negative", "neutral", "positive"), instruction="")


def test_the_bottom_releases_k_numbers_per_token_and_the_maps_train():
    model = split_model(ModelConfig(name="tiny-bert"), SPLIT, LoraConfig(rank=2), 3, "cpu", 0)
    batch = _batch()
    h = model.bottom(batch.input_ids, batch.attention_mask)
    assert h.shape == (*batch.input_ids.shape, 4) and model.bottom.release_dim == 4
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"bottom.project.linear.weight", "bottom.project.linear.bias", "top.expand.weight"} <= names
    w = model.bottom.project.linear.weight
    torch.testing.assert_close(w @ w.T, torch.eye(4), atol=1e-5, rtol=0)  # orthonormal rows at the start
    loss = model.per_example_loss(batch.input_ids, batch.attention_mask, batch.labels).mean()
    loss.backward()
    assert model.bottom.project.linear.weight.grad.abs().sum() > 0 and model.top.expand.weight.grad.abs().sum() > 0
    # without a projection the bottom releases the hidden state, as before
    plain = split_model(ModelConfig(name="tiny-bert"), 2, LoraConfig(rank=2), 3, "cpu", 0)
    assert plain.bottom(batch.input_ids, batch.attention_mask).shape[-1] == plain.bottom.word_embeddings().shape[1]


def test_the_token_noise_lives_in_the_released_space():
    """d_chi noise norms of a k-dimensional release are Gamma(k, eta), not Gamma(D, eta) (KS test)."""
    bottom = client_bottom(ModelConfig(name="tiny-bert"), SPLIT, LoraConfig(rank=2), "cpu", 0)
    batch = _batch()
    clean = forward_activations(bottom, batch, torch.device("cpu"))
    eta = 2.0
    priv = ClientPrivacy(seed=5, mechanism=DChiMechanism(eta=eta), knobs=build_config({"model.name": "tiny-bert"}).privacy)
    norms = []
    for step in range(40):
        out = priv.release_batch(bottom, batch, torch.device("cpu"), step=step)
        norms.append((out["h"] - clean)[batch.attention_mask.bool()].norm(dim=-1))
    r = torch.cat(norms).double().numpy()
    assert stats.kstest(r, stats.gamma(a=4, scale=1 / eta).cdf).pvalue > 1e-3
    assert stats.kstest(r, stats.gamma(a=clean.shape[-1] + 1, scale=1 / eta).cdf).pvalue < 1e-6


def one_dp_step(bottom, batch, *, width: int):
    """One DP-SGD step of ``bottom`` on ``batch`` from a random server gradient: (trainable state before, after)."""
    start = trainable_state(bottom)
    grad = torch.randn(*batch.input_ids.shape, width) * batch.attention_mask.unsqueeze(-1)
    plan = DPPlan(noise_multiplier=1.0, sample_rate=0.5, max_grad_norm=1.0, expected_batch_size=4.0,
                  planned_steps=10, target_epsilon=50.0, delta=1e-5)
    step = DPStep(bottom, plan)
    try:
        params = [p for p in bottom.parameters() if p.requires_grad]
        step.step(torch.optim.SGD(params, lr=0.1), batch, grad, generator=torch.Generator().manual_seed(0),
                  accountant=DPAccountant())
    finally:
        step.close()
    return start, trainable_state(bottom)


def test_dp_sgd_moves_the_projection_with_the_adapter():
    """The projection is a trainable bottom tensor under DP-SGD (opacus issue 820's trap checked here too)."""
    bottom = client_bottom(ModelConfig(name="tiny-bert"), SPLIT, LoraConfig(rank=2), "cpu", 1)
    batch = _batch()
    start, after = one_dp_step(bottom, batch, width=4)
    assert any(n.startswith("project.") for n in start)
    assert all(not torch.equal(after[n], start[n]) for n in start)
    with torch.no_grad():
        for n, p in bottom.named_parameters():
            if p.requires_grad:
                p.copy_(start[n])


def test_settings_a_projection_cannot_honour_are_refused():
    with pytest.raises(ConfigError, match="split.release-dim"):
        build_config({"split.release-dim": -1})
    with pytest.raises(ConfigError, match="privtune"):
        config_for("privtune", {"split.release-dim": 4})
    with pytest.raises(ConfigError, match="trains no client bottom"):
        config_for("fedlora", {"split.release-dim": 4})
    with pytest.raises(ModelLoadError, match="hidden size"):
        split_model(ModelConfig(name="tiny-bert"), SplitConfig(layer=2, release_dim=10_000), LoraConfig(), 3, "cpu", 0)


def test_an_empty_poisson_draw_releases_the_projections_width():
    """Regression (review): an empty batch released (0, 1, hidden) zeros, which the server refuses from a
    release-dim bottom (it expects k), so the client was dropped from the round late in a capped DP run."""
    from guardedtuning.privacy.client import _empty_batch

    model = split_model(ModelConfig(name="tiny-bert"), SPLIT, LoraConfig(rank=2), 3, "cpu", 0)
    priv = ClientPrivacy(seed=0, mechanism=DChiMechanism(eta=2.0), knobs=build_config({}).privacy)
    out = priv.release_batch(model.bottom, _empty_batch(), torch.device("cpu"), step=1)
    assert tuple(out["h"].shape) == (0, 1, SPLIT.release_dim)
