"""Adapters out (issue 14, item 3): PEFT folders under the unsplit model's names, merged models, checkpoints.

The split model is the reference: what ``PeftModel.from_pretrained(AutoModel..., "<out>/adapter")``
and the merged folder compute must equal what bottom then top compute, on the tiny encoder and
the tiny decoder. Checkpoints are safetensors + JSON, and a run resumes from them (and from a
checkpoint.pt of the earlier version).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModel, AutoModelForCausalLM

from guardedtuning.cli import main as cli_main
from guardedtuning.clients.client_app import app as client_app
from guardedtuning.config import build_config
from guardedtuning.errors import ConfigError
from guardedtuning.models import export
from guardedtuning.models.checkpoint import decode_tree, encode_tree, read_checkpoint
from guardedtuning.models.lora import load_trainable
from guardedtuning.models.parts import split_model
from guardedtuning.results import Recorder
from guardedtuning.server_app.server_app import execute
from tests.local_grid import LocalGrid, crash_before_checkpoint

AUTO = {"tiny-bert": AutoModel, "tiny-llama": AutoModelForCausalLM}


class NotATensor:
    """An object in a pickle: loading it would import and build arbitrary classes."""


def _trained_split(name: str, *, layer: int = 2, release_dim: int = 0, lora_top: bool = True):
    """A split model whose every trainable tensor is random (LoRA B is no longer zero): a trained adapter."""
    cfg = build_config({"model.name": name, "split.layer": layer, "split.release-dim": release_dim})
    model = split_model(cfg.model, cfg.split, cfg.lora, 3, "cpu", cfg.seed, lora_top=lora_top)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return cfg, model


def _batch():
    ids = torch.randint(1000, 8000, (3, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding: positions an unsplit model numbers as the split does
    return ids, mask


def _outputs(name: str, hf_model, adapter_dir: Path, ids, mask) -> torch.Tensor:
    """What the Hugging Face model computes for the split model's ``logits`` (valid positions of a decoder)."""
    with torch.no_grad():
        out = hf_model(input_ids=ids, attention_mask=mask)
    if name == "tiny-bert":
        return export.classify(export.load_head(adapter_dir), out.last_hidden_state, mask)
    return out.logits[mask.bool()]


def _reference(name: str, model, ids, mask) -> torch.Tensor:
    with torch.no_grad():
        logits = model.logits(ids, mask)
    return logits if name == "tiny-bert" else logits[mask.bool()]


def _save_base(adapter_dir: Path, dest: Path) -> Path:
    """The tiny models are seeded, not on disk: write the run's base once, as a user would have it."""
    export.load_base(export.read_info(adapter_dir)).save_pretrained(str(dest))
    return dest


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
@pytest.mark.parametrize("lora_top", [True, False])
def test_peft_from_pretrained_computes_what_the_split_model_computes(tmp_path, name, lora_top):
    cfg, model = _trained_split(name, lora_top=lora_top)
    block = export.write_adapter(model, model_cfg=cfg.model, lora=cfg.lora, seed=cfg.seed,
                                 dest=tmp_path / "adapter", info={"round": 1})
    adapter = tmp_path / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "guardedtuning.json"} <= {
        p.name for p in adapter.iterdir()}
    assert (adapter / export.HEAD_FILE).is_file() == (name == "tiny-bert")
    conf = json.loads((adapter / "adapter_config.json").read_text())
    prefix = "encoder.layer" if name == "tiny-bert" else "model.layers"
    blocks = {int(t.split(".")[2]) for t in conf["target_modules"]}
    assert all(t.startswith(prefix) for t in conf["target_modules"])  # the unsplit model's names
    assert blocks == ({0, 1, 2, 3} if lora_top else {0, 1})  # LoRA exactly where the run has it
    assert conf["r"] == cfg.lora.rank and conf["lora_alpha"] == cfg.lora.alpha and block["not_held"] is None

    base_dir = _save_base(adapter, tmp_path / "base")
    ids, mask = _batch()
    ref = _reference(name, model, ids, mask)
    peft = PeftModel.from_pretrained(AUTO[name].from_pretrained(str(base_dir)), str(adapter)).eval()
    got = _outputs(name, peft, adapter, ids, mask)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # the adapter matters: the base model alone (same head) is far from the split model's outputs
    plain = _outputs(name, AUTO[name].from_pretrained(str(base_dir)).eval(), adapter, ids, mask)
    assert (plain - ref).abs().max() > 100 * 1e-5


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
def test_export_merged_writes_a_folder_auto_model_loads_with_the_same_outputs(tmp_path, name):
    cfg, model = _trained_split(name)
    run_dir = tmp_path / "run"
    export.write_adapter(model, model_cfg=cfg.model, lora=cfg.lora, seed=cfg.seed, dest=run_dir / "adapter",
                         info={"round": 3})
    assert cli_main(["export", "--merged", str(run_dir), str(tmp_path / "merged")]) == 0
    merged = tmp_path / "merged"
    assert (merged / "model.safetensors").is_file() and (merged / "tokenizer.json").is_file()
    hf = AUTO[name].from_pretrained(str(merged)).eval()
    assert not any("lora_" in n for n, _ in hf.named_parameters())  # merged, not wrapped
    ids, mask = _batch()
    torch.testing.assert_close(_outputs(name, hf, merged, ids, mask), _reference(name, model, ids, mask),
                               rtol=1e-4, atol=1e-5)
    # a second export to the same folder would overwrite it: refused
    assert cli_main(["export", "--merged", str(run_dir), str(merged)]) == 2


def test_a_release_projection_has_no_peft_form_and_export_says_why(tmp_path, capsys):
    cfg, model = _trained_split("tiny-bert", release_dim=4)
    with pytest.raises(export.NotExportable, match="split.release-dim"):
        export.write_adapter(model, model_cfg=cfg.model, lora=cfg.lora, seed=cfg.seed, dest=tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
    rec = Recorder(cfg, tmp_path, model="tiny-bert", dataset="d")
    rec.save_adapter(model)  # what a driver's checkpoint does
    assert rec.extra["adapter"]["path"] is None and "split.release-dim" in rec.extra["adapter"]["not_held"]
    rec.save_checkpoint(1, {})
    capsys.readouterr()
    assert cli_main(["export", "--merged", str(tmp_path), str(tmp_path / "merged")]) == 2
    said = capsys.readouterr().err
    assert "release projection" in said and "split.release-dim=0" in said


def test_checkpoint_state_round_trips_through_safetensors_and_json(tmp_path):
    """Optimizer state is keyed by int and holds tuples: a JSON object would lose both (and Adam its moments)."""
    layer = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, betas=(0.8, 0.95))
    layer(torch.randn(5, 4)).sum().backward()
    opt.step()
    state = {"global": {"w.lora_A": torch.randn(2, 4)}, "opt": opt.state_dict(), "none": None, "ids": [1, 2]}
    tensors: dict[str, torch.Tensor] = {}
    tree = json.loads(json.dumps(encode_tree(state, tensors, "state")))
    back = decode_tree(tree, tensors)
    assert back["opt"]["param_groups"][0]["betas"] == (0.8, 0.95)
    assert set(back["opt"]["state"]) == {0, 1}
    torch.testing.assert_close(back["opt"]["state"][0]["exp_avg"], state["opt"]["state"][0]["exp_avg"])
    fresh = torch.optim.AdamW(torch.nn.Linear(4, 3).parameters(), lr=1e-2)
    fresh.load_state_dict(back["opt"])
    assert fresh.state_dict()["state"][1]["exp_avg_sq"].abs().sum() > 0  # the moments were restored
    with pytest.raises(TypeError, match="state/x"):
        encode_tree({"x": object()}, {}, "state")


def _flat(tmp_path, **extra):
    from tests.conftest import TINY

    return {**TINY, "output.dir": str(tmp_path / "run"), "federation.rounds": 2, "train.local-steps": 2,
            "data.train-size": 96, "data.test-size": 24, **extra}


@pytest.mark.e2e  # a two-round split run, crashed in round 2 and resumed
def test_a_run_writes_the_adapter_at_each_checkpoint_and_resumes_from_safetensors(tmp_path, monkeypatch):
    flat = _flat(tmp_path)
    cfg = build_config(flat)
    out = Path(cfg.output.dir)
    crash_before_checkpoint(cfg, monkeypatch, 2)
    first = read_checkpoint(out)
    assert first["round"] == 1 and not list(out.glob("*.pt"))
    assert json.loads((out / "adapter" / "guardedtuning.json").read_text())["round"] == 2  # written, then crash
    resumed = execute(cfg, LocalGrid(client_app, 3, cfg.flat()))
    assert [r["round"] for r in resumed["history"]] == [1, 2]
    assert '"resume"' in (out / "events.jsonl").read_text()
    ckpt = read_checkpoint(out)
    assert ckpt["round"] == 2 and [p.name for p in out.glob("checkpoint-r*")] == ["checkpoint-r00002.safetensors"]
    info = json.loads((out / "adapter" / "guardedtuning.json").read_text())
    assert info["round"] == 2 and resumed["adapter"]["path"] == str(out / "adapter")

    # the folder holds the checkpoint's global adapters: the server's model rebuilt from the checkpoint and
    # PeftModel.from_pretrained agree
    labels = ckpt["state"]["top"]["head.weight"].shape[0]
    model = split_model(cfg.model, cfg.split, cfg.lora, labels, "cpu", cfg.seed, lora_top=cfg.lora.top)
    load_trainable(model.bottom, ckpt["state"]["global_bottom"], source="test")
    load_trainable(model.top, ckpt["state"]["top"], source="test")
    base = _save_base(out / "adapter", tmp_path / "base")
    peft = PeftModel.from_pretrained(AutoModel.from_pretrained(str(base)), str(out / "adapter")).eval()
    ids, mask = _batch()
    torch.testing.assert_close(_outputs("tiny-bert", peft, out / "adapter", ids, mask),
                               _reference("tiny-bert", model, ids, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.e2e  # a one-round split run, then resumed from a checkpoint.pt of the earlier version
def test_an_old_pickle_checkpoint_resumes_or_is_refused_with_the_fix(tmp_path):
    cfg = build_config(_flat(tmp_path, **{"federation.rounds": 1}))
    out = Path(cfg.output.dir)
    execute(cfg, LocalGrid(client_app, 3, cfg.flat()))
    payload = {k: v for k, v in read_checkpoint(out).items()
               if k in ("round", "digest", "history", "ledger", "privacy_ledger", "wall_s", "state")}
    for p in [out / "checkpoint.json", *out.glob("checkpoint-r*.safetensors")]:
        p.unlink()
    torch.save(payload, out / "checkpoint.pt")  # what the earlier version wrote
    again = execute(cfg, LocalGrid(client_app, 3, cfg.flat()))  # resumed after its last round: nothing to run
    assert [r["round"] for r in again["history"]] == [1]
    assert '"resume"' in (out / "events.jsonl").read_text()

    torch.save({"round": 1, "state": NotATensor()}, out / "checkpoint.pt")
    with pytest.raises(ConfigError, match=r"checkpoint\.pt is a checkpoint of an earlier version.*output.resume=false"):
        Recorder(cfg, out, model="m", dataset="d").load_checkpoint()


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
def test_offsite_exports_the_plug_in_and_refuses_the_emulator_and_full_blocks(tmp_path, name):
    from guardedtuning.models import emulator as em
    from tests.conftest import TINY

    cfg = build_config({**TINY, "recipe": "offsite", "model.name": name, "offsite.emulator-layers": 1})
    full = em.add_adapters(em.full_sandwich(cfg.model, cfg.offsite, 3, cfg.seed), cfg.lora, "lora")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in full.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    export.write_adapter(full, model_cfg=cfg.model, lora=cfg.lora, seed=cfg.seed, dest=tmp_path / "adapter")
    conf = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert {int(t.split(".")[2]) for t in conf["target_modules"]} == {0, 3}  # the first and last block
    base = _save_base(tmp_path / "adapter", tmp_path / "base")
    peft = PeftModel.from_pretrained(AUTO[name].from_pretrained(str(base)), str(tmp_path / "adapter")).eval()
    ids, mask = _batch()
    torch.testing.assert_close(_outputs(name, peft, tmp_path / "adapter", ids, mask),
                               _reference(name, full, ids, mask), rtol=1e-5, atol=1e-5)
    emu = em.add_adapters(em.emulator_sandwich(cfg.model, cfg.offsite, 3, cfg.seed), cfg.lora, "lora")
    with pytest.raises(export.NotExportable, match="emulator"):
        export.adapter_plan(emu, 4)
    blocks = em.add_adapters(em.full_sandwich(cfg.model, cfg.offsite, 3, cfg.seed), cfg.lora, "full")
    with pytest.raises(export.NotExportable, match="offsite.adapter=lora"):
        export.adapter_plan(blocks, 4)
