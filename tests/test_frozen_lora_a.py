"""``aggregation.scope=lora-b`` trains only LoRA's B (issue 13, item 2): LoRA's A is frozen on every client
before Opacus wraps the model, never moves within a round, keeps no error-feedback residual, and nothing of it
is sent or aggregated; DP-SGD's per-sample gradients stay exact with A frozen."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guardedtuning.clients.client_app import app as client_app
from guardedtuning.config import LoraConfig, build_config
from guardedtuning.errors import ConfigError
from guardedtuning.models.loading import load_backbone
from guardedtuning.models.lora import add_lora, apply_scope, load_trainable, trainable_state
from guardedtuning.models.split import build_split
from guardedtuning.privacy.dpsgd import DPPlan, DPStep
from guardedtuning.results import read_checkpoint
from guardedtuning.server_app.server_app import execute
from guardedtuning.strategies.secagg import mod as secagg_mod_module
from tests.local_grid import LocalGrid
from tests.test_privacy_dpsgd import brute_force, server_grad, tiny_parts


def _lora_a(name: str) -> bool:
    return ".lora_A." in f".{name}."


# ---------------------------------------------------------------------------- a secure round, client and server

def _secure_flat(tiny_flat, recipe: str, **extra):
    return {**tiny_flat, "recipe": recipe, "federation.num-clients": 4, "federation.clients-per-round": 4,
            "aggregation.secure": True, "aggregation.support": "topk", "aggregation.scope": "lora-b",
            "aggregation.density": 0.5, "aggregation.bits": 4, "aggregation.clip": 0.02, **extra}


@pytest.mark.parametrize("recipe, extra", [
    ("split", {"dp.enabled": True, "dp.target-epsilon": 50.0, "dp.max-grad-norm": 1.0}),  # guarded's DP-SGD bottom
    ("fedlora", {}),
    ("offsite", {}),  # the adapters train on the emulator
])
def test_scope_lora_b_leaves_lora_a_bit_identical_on_client_and_server(tiny_flat, monkeypatch, recipe, extra):
    seen: list[dict[str, np.ndarray]] = []
    real = secagg_mod_module.seal_update

    def recording(update, **kw):  # type: ignore[no-untyped-def]
        seen.append({k: np.array(v, copy=True) for k, v in update.items()})
        return real(update, **kw)

    monkeypatch.setattr(secagg_mod_module, "seal_update", recording)
    cfg = build_config(_secure_flat(tiny_flat, recipe, **extra))
    grid = LocalGrid(client_app, cfg.federation.num_clients, cfg.flat())
    record = execute(cfg, grid)
    assert record["cost"]["rejected_replies"] == 0 and len(record["history"]) == 2

    # what each client computed before the codec: nothing of A (no tensor, or an exact zero), B moved
    assert len(seen) == 2 * 4
    for update in seen:
        assert not any(np.any(v) for k, v in update.items() if _lora_a(k)), "a client's LoRA A moved in its round"
        assert any(np.any(v) for k, v in update.items() if ".lora_B." in k)

    # the server: the global A every client was sent, and the final one, are bit-identical; B moved
    sent = [m.content["arrays"] for m in grid.sent
            if m.content.get("secagg-stage", {}).get("stage") == "collect-masked"]
    state = read_checkpoint(tiny_flat["output.dir"])["state"]
    final = state["global_bottom"] if recipe == "split" else state["global"]
    first = {k: sent[0][k].numpy() for k in sent[0].keys()}
    a_names = sorted(k for k in final if _lora_a(k))
    assert a_names
    for k in a_names:
        assert np.array_equal(final[k].numpy(), first[k])
        assert all(np.array_equal(s[k].numpy(), first[k]) for s in sent)
    assert any(not np.array_equal(final[k].numpy(), first[k]) for k in final if ".lora_B." in k)

    # no client keeps an error-feedback residual on A
    names = sorted(first)
    start, a_slices = 0, []
    for k in names:
        n = first[k].size
        if _lora_a(k):
            a_slices.append(slice(start, start + n))
        start += n
    for ctx in grid.contexts.values():
        residual = ctx.state["secagg.residual"]["residual"].numpy()
        assert residual.size == start
        assert not any(residual[s].any() for s in a_slices)
        assert residual.any()  # B's unsent part is kept


def test_scope_lora_b_needs_secure_aggregation():
    with pytest.raises(ConfigError, match=r"aggregation\.scope.*aggregation\.secure=true.*'lora-b'"):
        build_config({"aggregation.secure": False, "aggregation.support": "topk", "aggregation.scope": "lora-b"})


# ---------------------------------------------------------------------------- the model and DP-SGD with A frozen

@pytest.fixture(scope="module")
def frozen_parts():
    return tiny_parts("lora-b")


def test_apply_scope_freezes_exactly_lora_a_and_undoes_it():
    bb = load_backbone("tiny-bert")
    bottom, _ = build_split(bb, 2, num_labels=3)
    add_lora(bottom, LoraConfig(rank=4), "encoder")
    every = set(trainable_state(bottom))
    apply_scope(bottom, "lora-b")
    assert set(trainable_state(bottom)) == {k for k in every if not _lora_a(k)}
    assert all(".lora_B." in k for k in trainable_state(bottom))
    apply_scope(bottom, "all")  # a cached model reused by a run of another scope
    assert set(trainable_state(bottom)) == every
    with pytest.raises(ValueError, match=r"`scope` is 'lora-a'.*`all` or `lora-b`"):
        apply_scope(bottom, "lora-a")


def test_a_frozen_lora_a_is_loaded_from_the_global_adapter_but_never_trained():
    bb = load_backbone("tiny-bert")
    bottom, _ = build_split(bb, 2, num_labels=3)
    add_lora(bottom, LoraConfig(rank=4), "encoder")
    glob = {k: torch.randn_like(v) for k, v in trainable_state(bottom).items()}  # A and B, as the server sends
    apply_scope(bottom, "lora-b")
    load_trainable(bottom, glob, source="test")
    params = dict(bottom.named_parameters())
    assert all(torch.equal(params[k].detach(), v) for k, v in glob.items())  # A too: the server's, bit for bit
    with pytest.raises(Exception, match="missing"):
        load_trainable(bottom, {k: v for k, v in glob.items() if _lora_a(k)}, source="test")  # B is still needed


def test_dp_sgd_per_sample_gradients_match_a_per_example_loop_with_a_frozen(frozen_parts):
    bottom, top, batch = frozen_parts
    want = brute_force(bottom, top, batch)  # trainable tensors only: B
    dp = DPStep(bottom, DPPlan(noise_multiplier=0.0, sample_rate=0.5, max_grad_norm=1e6, expected_batch_size=5.0,
                               planned_steps=100, target_epsilon=float("inf"), delta=1e-5))
    try:
        grads = dp.per_sample_gradients(batch, server_grad(bottom, top, batch))
    finally:
        dp.close()
    assert len(grads) == 4  # 2 blocks x (query, value) x B only
    for g, w in zip(grads, want, strict=True):
        assert g.shape == (5, *w.shape[1:]) and w.abs().sum() > 0
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_a_dp_step_with_a_frozen_moves_b_and_leaves_a_bit_identical(frozen_parts):
    from guardedtuning.privacy.dpsgd import DPAccountant
    from guardedtuning.training import make_optimizer

    bottom, top, batch = frozen_parts
    before = {k: p.detach().clone() for k, p in bottom.named_parameters() if "lora_" in k}
    opt = make_optimizer(bottom, lr=1e-2)
    dp = DPStep(bottom, DPPlan(noise_multiplier=1.0, sample_rate=1.0, max_grad_norm=1.0, expected_batch_size=5.0,
                               planned_steps=10, target_epsilon=1e9, delta=1e-5))
    try:
        dp.step(opt, batch, server_grad(bottom, top, batch), generator=torch.Generator().manual_seed(0),
                accountant=DPAccountant())
    finally:
        dp.close()
    after = dict(bottom.named_parameters())
    for k, v in before.items():
        if _lora_a(k):
            assert torch.equal(after[k].detach(), v), k  # frozen: not even the noise touches it
        else:
            assert not torch.equal(after[k].detach(), v), k  # the trainable weights did change
    with torch.no_grad():
        for k, v in before.items():
            after[k].copy_(v)


def test_a_frozen_lora_a_is_the_global_one_at_every_step_even_in_a_fresh_process(tiny_flat, monkeypatch):
    """Steps after step 0 must not use whatever A a process's cached bottom holds: with one process per
    message (Flower's stock SuperNode, a restarted runner, a Ray actor that ran no step 0) the cache
    starts from the client's own initial A, which is not the server's."""
    from guardedtuning.clients import split_client
    from guardedtuning.models import parts

    def fresh_process(*args, **kw):  # type: ignore[no-untyped-def]
        parts.client_bottom.cache_clear()  # every message finds an empty cache
        return parts.client_bottom(*args, **kw)

    used: list[dict[str, torch.Tensor]] = []
    real_step = split_client.split_step

    def recording(setup, priv, step, start, state, *, source):  # type: ignore[no-untyped-def]
        out = real_step(setup, priv, step, start, state, source=source)
        cfg = setup.cfg  # the bottom this step used (the cache was filled by it)
        bottom = parts.client_bottom(cfg.model, cfg.split, cfg.lora, str(setup.device), cfg.seed)
        used.append({n: p.detach().clone() for n, p in bottom.named_parameters() if _lora_a(n)})
        return out

    monkeypatch.setattr(split_client, "client_bottom", fresh_process)
    monkeypatch.setattr(split_client, "split_step", recording)
    cfg = build_config(_secure_flat(tiny_flat, "split", **{"federation.rounds": 1}))
    grid = LocalGrid(client_app, cfg.federation.num_clients, cfg.flat())
    execute(cfg, grid)
    final = read_checkpoint(tiny_flat["output.dir"])["state"]["global_bottom"]
    assert len(used) == 4 * (cfg.train.local_steps + 1)  # every step message of every client
    for a in used:
        assert a and all(torch.equal(v, final[k]) for k, v in a.items()), "a step ran with another LoRA A"
    parts.client_bottom.cache_clear()
