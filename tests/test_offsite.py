"""The ``offsite`` recipe: emulator by uniform layer drop, adapters that plug back, local DP-SGD."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from guardedtuning.clients.client_app import app as client_app
from guardedtuning.data.batches import encode
from guardedtuning.errors import ConfigError, ModelLoadError
from guardedtuning.models import emulator as em
from guardedtuning.models.loading import kind_of, load_tokenizer
from guardedtuning.models.lora import load_trainable, trainable_state
from guardedtuning.recipes import build_config
from guardedtuning.server_app.server_app import execute
from tests.local_grid import LocalGrid
from tests.test_drivers import check_contract


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Clients keep the emulator under $GUARDEDTUNING_CACHE: a fresh one per test."""
    monkeypatch.setenv("GUARDEDTUNING_CACHE", str(tmp_path / "cache"))


def _flat(tiny_flat, **extra):
    return {**tiny_flat, "recipe": "offsite", "offsite.emulator-layers": 1, **extra}


def _run(flat):
    cfg = build_config(flat)
    grid = LocalGrid(client_app, cfg.federation.num_clients, cfg.flat())
    return execute(cfg, grid), grid


def test_uniform_layer_drop_keeps_evenly_spread_blocks():
    assert em.uniform_keep(4, 4) == [0, 1, 2, 3]
    assert em.uniform_keep(4, 2) == [1, 3]
    assert em.uniform_keep(4, 1) == [2]
    assert em.uniform_keep(6, 3) == [1, 3, 5]
    assert em.uniform_keep(5, 0) == []


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_emulator_layers_and_adapters_plug_back_with_identical_keys(tiny_flat, name, mode):
    cfg = build_config(_flat(tiny_flat, **{"model.name": name, "offsite.adapter": mode}))
    full = em.full_sandwich(cfg.model, cfg.offsite, 3, cfg.seed)
    emu = em.emulator_sandwich(cfg.model, cfg.offsite, 3, cfg.seed)
    assert full.num_middle == 2 and emu.num_middle == 1  # 4 blocks, a = 1: middle 2, keep 1
    assert len(emu.end_blocks()) == 2 and emu.end_blocks()[0] is not full.end_blocks()[0]
    # the kept block is a copy of the full middle's block 1 (uniform_keep(2, 1) == [1])
    kept, original = emu.middle.layers[0].state_dict(), full.middle.layers[1].state_dict()
    assert all(torch.equal(kept[k], original[k]) for k in original)
    package = em.frozen_package(emu)
    em.add_adapters(full, cfg.lora, mode)
    em.add_adapters(emu, cfg.lora, mode)
    assert set(trainable_state(emu)) == set(trainable_state(full))  # identical keys
    # a client rebuilds the emulator from the package alone and gets the same function
    client = em.build_client_emulator(cfg.model, cfg.offsite, cfg.lora, 3, package, "cpu", cfg.seed)
    with torch.no_grad():
        for p in emu.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))  # a trained adapter
    adapters = trainable_state(emu)
    load_trainable(client, adapters, source="test")
    b = encode(load_tokenizer(name), kind_of(name), ["a short text", "and a somewhat longer one here"], [0, 2],
               max_length=32, label_names=("negative", "neutral", "positive"), instruction="Classify")
    with torch.no_grad():
        assert torch.allclose(client.logits(b.input_ids, b.attention_mask), emu.logits(b.input_ids, b.attention_mask),
                              atol=1e-5)
        before = full.logits(b.input_ids, b.attention_mask)
        load_trainable(full, adapters, source="test")  # the plug-in
        after = full.logits(b.input_ids, b.attention_mask)
    assert not torch.allclose(before, after)
    plugged = trainable_state(full)
    assert all(torch.equal(plugged[k], adapters[k]) for k in adapters)


def test_layer_counts_that_do_not_fit_fail_with_the_fix(tiny_flat):
    cfg = build_config(_flat(tiny_flat, **{"offsite.emulator-layers": 3}))
    with pytest.raises(ModelLoadError, match=r"offsite.emulator-layers=K with 0 <= K <= 2"):
        em.emulator_sandwich(cfg.model, cfg.offsite, 3, cfg.seed)
    cfg = build_config(_flat(tiny_flat, **{"offsite.adapter-layers": 2}))
    with pytest.raises(ModelLoadError, match="leaves no middle"):
        em.full_sandwich(cfg.model, cfg.offsite, 3, cfg.seed)
    with pytest.raises(ConfigError, match="releases no activations"):
        build_config(_flat(tiny_flat, **{"privacy.mechanism": "dchi"}))


def test_distillation_brings_the_emulator_closer_to_the_middle(tiny_flat):
    cfg = build_config(_flat(tiny_flat))
    full = em.full_sandwich(cfg.model, cfg.offsite, 3, cfg.seed)
    emu = em.emulator_sandwich(cfg.model, cfg.offsite, 3, cfg.seed)
    tok = load_tokenizer(cfg.model.name)
    texts = [f"public sentence number {i} about the weather and the city" for i in range(32)]
    enc = tok(texts, padding=True, return_tensors="pt")
    before = em.middle_mse(full, emu, enc["input_ids"], enc["attention_mask"])
    losses = em.distill_emulator(full, emu, texts, model_name=cfg.model.name, max_length=32, steps=30, lr=1e-3,
                                 batch_size=8, seed=0, device=torch.device("cpu"))
    after = em.middle_mse(full, emu, enc["input_ids"], enc["attention_mask"])
    assert losses["loss_last"] < losses["loss_first"] and after < before
    assert not any(p.requires_grad for p in emu.parameters())  # frozen again for the clients


@pytest.mark.e2e  # slow: in-process rounds plus the full-FT yardstick
def test_offsite_learns_and_reports_plug_in_emulator_and_full_ft(tiny_flat):
    record, grid = _run(_flat(tiny_flat, **{"train.lr": 1e-2}))
    check_contract(record)
    losses = [r["train_loss"] for r in record["history"]]
    assert len(losses) == 2 and losses[1] < losses[0], losses
    u = record["utility"]
    assert u["value"] == u["plug_in"] == record["history"][-1]["utility"]
    assert 0 <= u["emulator"] <= 1 and 0 <= u["full_ft"] <= 1
    assert u["plug_in_gap"] == pytest.approx(u["full_ft"] - u["plug_in"])
    info = record["offsite"]
    assert info["emulator_layers"] == 1 and info["middle_layers"] == 2 and info["kept_middle_blocks"] == [1]
    # the emulator goes to each client once; nothing but adapters and metrics comes back
    with_emulator = [m.metadata.dst_node_id for m in grid.sent if "emulator" in m.content]
    assert sorted(with_emulator) == sorted(set(with_emulator)) and info["emulator_sends"] == len(with_emulator) == 3
    assert {m.metadata.message_type for m in grid.sent} == {"train.offsite"}
    for msg in grid.received:
        assert set(msg.content.keys()) <= {"update", "metrics", "privacy"}
    assert record["history"][0]["bytes_down"] > 3 * info["emulator_bytes"] > record["history"][1]["bytes_down"]
    assert 0 < record["cost"]["model_ip_exposure"] < 1


def test_offsite_with_dp_sgd_and_secure_aggregation(tiny_flat):
    flat = _flat(tiny_flat, **{"dp.enabled": True, "aggregation.secure": True, "aggregation.density": 1.0,
                               "federation.rounds": 1, "offsite.reference": False})
    record, grid = _run(flat)
    assert record["cost"]["rejected_replies"] == 0
    assert record["history"][0]["epsilon"] > 0 and record["privacy"]["dp"]["scope"].startswith("the adapter updates")
    assert record["utility"]["full_ft"] is None and record["utility"]["plug_in_gap"] is None
    assert all("update" not in m.content for m in grid.received if not m.has_error())
    assert any("secagg-stage" in m.content for m in grid.sent)  # the secure stages ran (through the client mod)


@pytest.mark.e2e
def test_offsite_on_the_simulation_engine(tmp_path):
    from tests.test_e2e import TINY

    out = tmp_path / "offsite"
    args = [sys.executable, "-m", "guardedtuning.cli", "run", "--recipe", "offsite", "--out", str(out)]
    for s in [*TINY, "recipe=offsite", "offsite.emulator-layers=1", "dp.enabled=true", "privacy.noise-seed=7",
              "aggregation.secure=true", "aggregation.density=1.0", "train.lr=1e-2"]:
        args += ["--set", s]
    res = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    record = json.loads((out / "results.json").read_text())
    check_contract(record)
    assert len(record["history"]) == 2 and record["cost"]["rejected_replies"] == 0
    assert record["privacy"]["epsilon"] > 0 and record["utility"]["plug_in"] is not None
    assert record["offsite"]["emulator_sends"] == 3
