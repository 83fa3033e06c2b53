"""The ``gradfree`` recipe: no gradient crosses the cut, no label leaves the client."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from guardedtuning.clients.client_app import app as client_app
from guardedtuning.errors import ConfigError
from guardedtuning.models.output_adapter import build_gradfree_head
from guardedtuning.models.parts import split_model
from guardedtuning.privacy.dpsgd import DPPlan
from guardedtuning.privacy.local_dpsgd import LocalDPStep, LossBatch, PerExampleLoss
from guardedtuning.recipes import build_config
from guardedtuning.server_app.server_app import execute
from tests.local_grid import LocalGrid
from tests.test_drivers import check_contract

CLIENT_RECORDS = {"acts", "metrics", "privacy", "update"}  # plus the secure stages' own records


def _run(flat, tamper=None):
    cfg = build_config(flat)
    grid = LocalGrid(client_app, cfg.federation.num_clients, cfg.flat(), tamper=tamper)
    return execute(cfg, grid), grid


def _flat(tiny_flat, **extra):
    return {**tiny_flat, "recipe": "gradfree", "gradfree.adapter-dim": 16, **extra}


def _arrays(msg):
    """Every (record name, array name, ndarray) in a message."""
    return [(key, name, rec[name].numpy()) for key, rec in msg.content.items() if isinstance(rec, ArrayRecord)
            for name in rec.keys()]


def test_gradfree_learns_and_sends_no_gradient_and_no_label(tiny_flat):
    record, grid = _run(_flat(tiny_flat, **{"privacy.mechanism": "dchi", "privacy.eta": 500.0}))
    check_contract(record)
    losses = [r["train_loss"] for r in record["history"]]
    assert len(losses) == 2 and losses[1] < losses[0], losses
    assert {m.metadata.message_type for m in grid.sent} == {"train.gradfree"}
    # two round trips per client and round
    assert len(grid.sent) == 2 * 2 * 3
    # client -> server: activations and a mask (never labels), metrics, and the head update
    replies = [m for m in grid.received if not m.has_error()]
    for msg in replies:
        assert set(msg.content.keys()) <= CLIENT_RECORDS, set(msg.content.keys())
        if "acts" in msg.content:
            assert set(msg.content["acts"].keys()) == {"h", "mask"}
        for key, name, arr in _arrays(msg):
            assert "label" not in name and "grad" not in name, (key, name)
            assert not (arr.dtype.kind in "iu" and arr.ndim == 1), (key, name)  # no class ids under another name
    # server -> client: the global adapter and head, then output hidden states; never a gradient
    for msg in grid.sent:
        assert "grad" not in msg.content
        if "out" in msg.content:
            assert set(msg.content["out"].keys()) == {"z"}
    # what comes back is the frozen middle and top's output on exactly what the client released
    cfg = build_config(_flat(tiny_flat))
    model = split_model(cfg.model, cfg.split.layer, cfg.lora, 3, "cpu", cfg.seed, lora_bottom=False, lora_top=False)
    release = next(m for m in replies if "acts" in m.content)
    node = release.metadata.src_node_id
    back = next(m for m in grid.sent if "out" in m.content and m.metadata.dst_node_id == node)
    h = torch.from_numpy(release.content["acts"]["h"].numpy())
    mask = torch.from_numpy(release.content["acts"]["mask"].numpy()).long()
    with torch.no_grad():
        expected = model.top.hidden(h, mask)
    assert torch.allclose(torch.from_numpy(back.content["out"]["z"].numpy()), expected, atol=1e-5)
    # the head moved: the round-2 global head differs from the first one sent
    first = [m for m in grid.sent if "arrays" in m.content]
    w1, w2 = (first[0].content["arrays"]["head.weight"].numpy(), first[-1].content["arrays"]["head.weight"].numpy())
    assert not np.allclose(w1, w2)
    cost = record["cost"]
    assert 0 < cost["model_ip_exposure"] < 1 and cost["client_s_per_step"] > 0 and cost["bytes_per_round"] > 0
    # between its two messages a client keeps only the round's starting adapter, never the activations
    assert 0 < cost["client_state_bytes_max"] < 64 * 1024
    assert record["privacy"]["mechanism"]["name"] == "dchi"


def test_gradfree_with_dp_quantization_and_secure_aggregation(tiny_flat):
    flat = _flat(tiny_flat, **{"privacy.mechanism": "dchi", "privacy.eta": 500.0, "privacy.quantize-bits": 8,
                               "dp.enabled": True, "aggregation.secure": True, "aggregation.density": 1.0,
                               "federation.rounds": 1})
    record, grid = _run(flat)
    assert record["cost"]["rejected_replies"] == 0
    assert record["history"][0]["epsilon"] > 0 and record["privacy"]["dp"]["enabled"]
    assert "output-adapter-and-head" in record["privacy"]["dp"]["scope"]
    replies = [m for m in grid.received if not m.has_error()]
    acts = [m.content["acts"] for m in replies if "acts" in m.content]
    assert acts and all(set(a.keys()) == {"codes", "scales", "meta", "mask"} for a in acts)
    assert all("update" not in m.content for m in replies)  # only masked, through the secure stages
    assert any("secagg-stage" in m.content for m in grid.sent)  # the secure stages ran (through the client mod)


def test_a_release_that_carries_labels_is_refused(tiny_flat):
    def tamper(node, request, reply):
        if node == 1001 and not reply.has_error() and "acts" in reply.content:
            reply.content["acts"]["labels"] = Array(np.zeros(4, dtype=np.int64))
        return reply

    record, _ = _run(_flat(tiny_flat, **{"federation.rounds": 1}), tamper=tamper)
    assert record["cost"]["rejected_replies"] >= 1
    events = [json.loads(x) for x in (Path(tiny_flat["output.dir"]) / "events.jsonl").read_text().splitlines()]
    dropped = [e for e in events if e["event"] == "dropped"]
    assert dropped and "labels never leave" in dropped[0]["reason"] and dropped[0]["node"] == 1001


def test_local_dp_per_example_gradients_match_a_loop():
    head = build_gradfree_head("encoder", 16, 3, 8, seed=0)
    torch.nn.init.normal_(head.adapter.up.weight, std=0.1)
    plan = DPPlan(noise_multiplier=1.0, sample_rate=0.1, max_grad_norm=1.0, expected_batch_size=4.0,
                  planned_steps=10, target_epsilon=8.0, delta=1e-5)
    gen = torch.Generator().manual_seed(0)
    z, y = torch.randn(4, 5, 16, generator=gen), torch.tensor([0, 1, 2, 1])
    mask = torch.ones(4, 5, dtype=torch.long)
    mask[0, 3:] = 0
    dp = LocalDPStep(PerExampleLoss(head), plan)
    try:
        per_example = dp.per_sample_gradients(LossBatch((z, mask, y)))
    finally:
        dp.close()
    params = [p for p in head.parameters() if p.requires_grad]
    for i in range(4):
        head.zero_grad()
        head.per_example_loss(z[i:i + 1], mask[i:i + 1], y[i:i + 1]).sum().backward()
        for p, g in zip(params, per_example, strict=True):
            assert torch.allclose(p.grad, g[i], atol=1e-5)


def test_gradfree_knobs_are_checked(tiny_flat):
    with pytest.raises(ConfigError, match="nopeek-weight"):
        build_config(_flat(tiny_flat, **{"privacy.nopeek-weight": 0.5}))
    with pytest.raises(ConfigError, match="gradfree.adapter-dim"):
        build_config(_flat(tiny_flat, **{"gradfree.adapter-dim": -1}))
    build_config(_flat(tiny_flat, **{"privacy.mechanism": "privtune", "dp.enabled": True}))  # both apply


def test_a_decoder_needs_an_output_adapter(tiny_flat):
    with pytest.raises(ConfigError, match="pass --set gradfree.adapter-dim"):
        _run(_flat(tiny_flat, **{"model.name": "tiny-llama", "gradfree.adapter-dim": 0, "federation.rounds": 1}))


@pytest.mark.e2e
def test_gradfree_on_the_simulation_engine(tmp_path):
    from tests.test_e2e import TINY

    out = tmp_path / "gradfree"
    args = [sys.executable, "-m", "guardedtuning.cli", "run", "--recipe", "gradfree", "--out", str(out)]
    for s in [*TINY, "recipe=gradfree", "privacy.mechanism=dchi", "privacy.eta=500.0", "privacy.noise-seed=7",
              "aggregation.secure=true", "aggregation.density=1.0"]:
        args += ["--set", s]
    res = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    record = json.loads((out / "results.json").read_text())
    check_contract(record)
    losses = [r["train_loss"] for r in record["history"]]
    assert len(losses) == 2 and losses[1] < losses[0]
    assert record["cost"]["rejected_replies"] == 0 and record["cost"]["model_ip_exposure"] > 0
