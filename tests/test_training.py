from __future__ import annotations

import copy

import numpy as np
import torch

from guardedtuning.config import LoraConfig, ModelConfig
from guardedtuning.data.batches import encode
from guardedtuning.models.lora import trainable_state
from guardedtuning.models.parts import split_model
from guardedtuning.training import (
    ClientActs,
    backward_from_server,
    forward_activations,
    load_optimizer_state,
    make_optimizer,
    optimizer_state,
    top_step,
)

LABELS = ("negative", "neutral", "positive")


def _model(seed=0, dropout=False):
    model = split_model(ModelConfig(name="tiny-bert"), 2, LoraConfig(rank=4), 3, "cpu", seed)
    if not dropout:  # the server's top trains in train mode; compare without random masks
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    return model


def _batch(model, texts, labels):
    from guardedtuning.models.loading import load_tokenizer

    return encode(load_tokenizer("tiny-bert"), "encoder", texts, labels, max_length=32, label_names=LABELS,
                  instruction="")


def test_top_step_gives_each_client_the_gradient_of_its_own_mean_loss():
    model = _model()
    ref = copy.deepcopy(model)
    b1 = _batch(model, ["good movie", "awful", "fine"], [2, 0, 1])
    b2 = _batch(model, ["great fun indeed, loved it", "bad"], [2, 0])
    acts = [ClientActs(forward_activations(model.bottom, b, torch.device("cpu")), b.attention_mask, b.labels)
            for b in (b1, b2)]
    opt = torch.optim.SGD([p for p in model.top.parameters() if p.requires_grad], lr=0.1)
    grads, losses = top_step(model.top, opt, acts, torch.device("cpu"))
    # brute force: each client alone, its own mean loss
    top_grads = []
    for a, g, loss in zip(acts, grads, losses, strict=True):
        h = a.h.clone().requires_grad_(True)
        ref.top.zero_grad()
        mean = ref.top.per_example_loss(h, a.attention_mask, a.labels).mean()
        mean.backward()
        torch.testing.assert_close(g, h.grad, rtol=1e-4, atol=1e-6)
        assert abs(float(mean.detach()) - loss) < 1e-5
        top_grads.append({n: p.grad.clone() for n, p in ref.top.named_parameters() if p.requires_grad})
    # the top moved by lr x the mean over clients of their gradients
    before = dict(ref.top.named_parameters())
    for n, p in model.top.named_parameters():
        if p.requires_grad:
            expected = before[n].detach() - 0.1 * (top_grads[0][n] + top_grads[1][n]) / 2
            torch.testing.assert_close(p.detach(), expected, rtol=1e-4, atol=1e-6)


def test_split_backward_equals_end_to_end_backward_and_lora_moves():
    model = _model()
    b = _batch(model, ["good movie", "awful", "fine, I guess"], [2, 0, 1])
    # end to end
    model.zero_grad()
    model.per_example_loss(b.input_ids, b.attention_mask, b.labels).mean().backward()
    expected = {n: p.grad.clone() for n, p in model.bottom.named_parameters() if p.requires_grad}
    # split: server computes dL/dh, client back-propagates it
    h = forward_activations(model.bottom, b, torch.device("cpu")).requires_grad_(True)
    model.top.per_example_loss(h, b.attention_mask, b.labels).mean().backward()
    model.zero_grad()
    before = trainable_state(model.bottom)
    opt = torch.optim.SGD([p for p in model.bottom.parameters() if p.requires_grad], lr=1.0)
    backward_from_server(model.bottom, opt, b, h.grad, torch.device("cpu"))
    after = trainable_state(model.bottom)
    for n, g in expected.items():
        torch.testing.assert_close(before[n] - after[n], g, rtol=1e-4, atol=1e-7)
    assert any(not torch.equal(before[n], after[n]) for n in before if "lora_B" in n)


def test_optimizer_state_round_trip_continues_exactly():
    torch.manual_seed(0)
    a, b = _model(), _model()
    batch = _batch(a, ["good", "bad", "so so"], [2, 0, 1])

    def step(model, opt):
        opt.zero_grad()
        model.per_example_loss(batch.input_ids, batch.attention_mask, batch.labels).mean().backward()
        opt.step()

    opt_a = make_optimizer(a, lr=1e-2)
    step(a, opt_a)
    step(a, opt_a)
    opt_b = make_optimizer(b, lr=1e-2)
    step(b, opt_b)
    saved = {k: np.array(v) for k, v in optimizer_state(opt_b, b).items()}
    assert set(saved) == {"step", "exp_avg", "exp_avg_sq"}
    opt_b2 = make_optimizer(b, lr=1e-2)  # a fresh optimizer, as in the next message
    load_optimizer_state(opt_b2, b, saved)
    step(b, opt_b2)
    for (n, pa), (_, pb) in zip(trainable_state(a).items(), trainable_state(b).items(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7, msg=n)


def test_top_step_refuses_a_non_finite_client_before_anything_steps():
    """A client whose loss overflows is named (NonFiniteClients) and the top, and its optimizer, are unchanged."""
    import pytest

    from guardedtuning.training import NonFiniteClients

    model = _model()
    b = _batch(model, ["good movie", "awful"], [2, 0])
    good = ClientActs(forward_activations(model.bottom, b, torch.device("cpu")), b.attention_mask, b.labels)
    bad = ClientActs(torch.full_like(good.h, 3e38), b.attention_mask, b.labels)
    opt = make_optimizer(model.top, lr=0.1)
    before = trainable_state(model.top)
    with pytest.raises(NonFiniteClients) as info:
        top_step(model.top, opt, [good, bad], torch.device("cpu"))
    assert set(info.value.reasons) == {1} and "non-finite" in info.value.reasons[1]
    after = trainable_state(model.top)
    assert all(torch.equal(before[n], after[n]) for n in before) and not opt.state
    grads, losses = top_step(model.top, opt, [good], torch.device("cpu"))  # the others alone: a finite step
    assert bool(torch.isfinite(grads[0]).all()) and np.isfinite(losses).all()
    assert any(not torch.equal(before[n], v) for n, v in trainable_state(model.top).items())
