"""The trained adapters out of a run, in the formats a Hugging Face user loads.

A run's global adapters live on split modules (``bottom.blocks.layers.<i>``,
``top.blocks.layers.<j>``, the offsite sandwich's ``middle.layers.<i>``), whose names the
unsplit model does not have. :func:`write_adapter` renames them to the unsplit model's
module names (``encoder.layer.<n>`` of ``AutoModel`` for encoders, ``model.layers.<n>`` of
``AutoModelForCausalLM`` for decoders) and lets PEFT write the folder: it builds a
``PeftModel`` on a weightless (meta-device) copy of the unsplit model, with LoRA on exactly
the modules that carry it in the run, loads the tensors under PEFT's own parameter names and
calls ``save_pretrained``. So

    PeftModel.from_pretrained(AutoModel.from_pretrained(base), "<out>/adapter")

computes what the split model computes (``tests/test_export.py``). What the folder holds:

- ``adapter_config.json`` + ``adapter_model.safetensors``: PEFT's LoRA adapter (every
  trained LoRA matrix, bottom and top; ``target_modules`` lists the full module paths);
- ``classifier_head.safetensors`` (encoders): the task head, ``weight`` (C, D) and ``bias``
  (C,), applied to the attention-masked mean of ``last_hidden_state``
  (:func:`classify`). It is not a PEFT ``modules_to_save``: ``AutoModel`` has no classifier,
  and ``AutoModelForSequenceClassification`` pools the [CLS] token through a pooler, which is
  another function;
- ``guardedtuning.json``: the base model (name, source, ``num-layers``, seed: the tiny and
  ``random:`` models are rebuilt by :func:`load_base`), the round, and what is not held.

What cannot be written, and why (:class:`NotExportable`): the release projection of
``split.release-dim`` > 0 (a D -> k -> D map at the cut, which the unsplit model has no
module for), trained full weights (``offsite.adapter=full``), an emulator in place of the
model's middle, and anything trained beside the model (``gradfree``'s output adapter).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from guardedtuning.config import LoraConfig, ModelConfig
from guardedtuning.errors import ModelLoadError

ADAPTER_DIR = "adapter"
HEAD_FILE = "classifier_head.safetensors"
INFO_FILE = "guardedtuning.json"
INFO_SCHEMA = "guardedtuning.adapter/v1"
BLOCK_PATHS = {"encoder": "encoder.layer", "decoder": "model.layers"}  # AutoModel / AutoModelForCausalLM
TASK_TYPES = {"encoder": "FEATURE_EXTRACTION", "decoder": "CAUSAL_LM"}
PEFT_PREFIX = "base_model.model."
HEAD_PARAMS = ("top.head.weight", "top.head.bias")


_PEFT_SKELETONS: dict[tuple[Any, ...], nn.Module] = {}  # the last PeftModel skeleton, by what shapes it


class NotExportable(ModelLoadError):
    """The run's trained state has no place in the unsplit model as a PEFT adapter (the reason says why)."""


@dataclass
class AdapterPlan:
    """What :func:`write_adapter` writes: LoRA tensors by PEFT parameter name, their modules, the head."""

    kind: str
    lora: dict[str, torch.Tensor]  # PEFT parameter name (``base_model.model.<path>.lora_A.default.weight``)
    targets: list[str]  # the unsplit model's module paths that carry LoRA
    head: dict[str, torch.Tensor] | None  # encoders: ``weight``, ``bias``


def _block_offsets(model: nn.Module, num_layers: int) -> dict[str, int]:
    """Our block-list prefixes and the unsplit model's index of their first block."""
    bottom = len(model.bottom.blocks.layers)
    middle = len(model.middle.layers) if hasattr(model, "middle") else 0
    top = len(model.top.blocks.layers)
    if bottom + middle + top != num_layers:
        raise NotExportable(
            f"the model holds {bottom + middle + top} of the base model's {num_layers} blocks (an offsite "
            "emulator?); only a model with every block has a place for its adapters in the unsplit model"
        )
    offsets = {"bottom.blocks.layers.": 0, "top.blocks.layers.": bottom + middle}
    if middle:
        offsets["middle.layers."] = bottom
    return offsets


def unsplit_name(name: str, kind: str, offsets: dict[str, int]) -> str | None:
    """The unsplit model's name of our parameter ``name`` (None: not in a block)."""
    for prefix, offset in offsets.items():
        if name.startswith(prefix):
            index, rest = name[len(prefix):].split(".", 1)
            return f"{BLOCK_PATHS[kind]}.{int(index) + offset}.{rest}"
    return None


def adapter_plan(model: nn.Module, num_layers: int) -> AdapterPlan:
    """Sort ``model``'s trainable parameters into LoRA, head, and what no PEFT folder can hold.

    Parameters
    ----------
    model : nn.Module
        A :class:`~guardedtuning.models.parts.SplitModel` or an offsite ``SandwichModel`` with
        every block (``bottom``, ``top`` and, for the sandwich, ``middle``).
    num_layers : int
        The base model's number of blocks (after ``model.num-layers``).

    Raises
    ------
    NotExportable
        With the reason, for a release projection, trained full weights or a partial model.
    """
    kind = model.kind
    offsets = _block_offsets(model, num_layers)
    lora: dict[str, torch.Tensor] = {}
    head: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        value = p.detach().to("cpu", torch.float32, copy=True)
        if name.startswith(("bottom.project.", "top.expand.")):
            raise NotExportable(
                "the run has a release projection (split.release-dim > 0): the client releases k numbers per "
                "token through a trained D -> k map and the server maps them back k -> D, a change of the "
                "architecture at the cut that the unsplit model has no module for; its adapters only work with "
                "that projection, so no PEFT folder is written (rerun with --set split.release-dim=0 for one)"
            )
        if name in HEAD_PARAMS and kind == "encoder":
            head[name.rsplit(".", 1)[1]] = value
            continue
        path = unsplit_name(name, kind, offsets) if "lora_" in name else None
        if path is None:
            raise NotExportable(
                f"the run trains {name}, which is not a LoRA matrix (e.g. offsite.adapter=full trains whole "
                "blocks): a LoRA adapter cannot hold it; rerun with LoRA adapters (offsite.adapter=lora)"
            )
        lora[PEFT_PREFIX + path] = value
    if not lora:
        raise NotExportable("the run trains no LoRA matrix of the model, so there is no adapter to write")
    targets = sorted({n[len(PEFT_PREFIX):].split(".lora_", 1)[0] for n in lora})
    return AdapterPlan(kind, lora, targets, head or None)


def _skeleton(kind: str, config: Any) -> nn.Module:
    """The unsplit Hugging Face model without weights (meta device): only its module names matter."""
    import copy

    from transformers import AutoModel, AutoModelForCausalLM

    with torch.device("meta"):
        if kind == "encoder":
            return AutoModel.from_config(copy.deepcopy(config), add_pooling_layer=False)
        return AutoModelForCausalLM.from_config(copy.deepcopy(config))


def base_source(name: str) -> str:
    """``base_model_name_or_path`` for model ``name``: its folder or hub id; the name for tiny/``random:`` models."""
    from guardedtuning.models.loading import RANDOM, TINY, resolve_model_source

    if name in TINY or name.startswith(RANDOM):
        return name  # nothing to load from: :func:`load_base` rebuilds it from guardedtuning.json
    return resolve_model_source(name)


def write_adapter(model: nn.Module, *, model_cfg: ModelConfig, lora: LoraConfig, seed: int, dest: Path,
                  info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``model``'s trained adapters as a PEFT folder ``dest`` (replaced atomically); what it holds.

    Parameters
    ----------
    model : nn.Module
        The run's model with its global adapters loaded (see :func:`adapter_plan`).
    model_cfg, lora, seed
        The run's ``model.*`` and ``lora.*`` sections and ``seed`` (they rebuild the base).
    dest : Path
        The folder to write (``<out>/adapter``).
    info : dict, optional
        More fields for ``guardedtuning.json`` (e.g. ``round``, ``recipe``).

    Returns
    -------
    dict
        The record's ``adapter`` block: ``path``, ``format``, ``base_model``, ``holds``, ``not_held``.

    Raises
    ------
    NotExportable
        When the run's state has no place in the unsplit model (the reason says why).
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from safetensors.torch import save_file

    config = model.bottom.blocks.config
    plan = adapter_plan(model, int(config.num_hidden_layers))
    key = (plan.kind, config.to_json_string(), tuple(plan.targets), lora.rank, lora.alpha, lora.dropout)
    peft_model = _PEFT_SKELETONS.get(key)
    if peft_model is None:  # built once per run: the skeleton and PEFT's injection cost more than the write
        peft_cfg = PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                  target_modules=plan.targets, task_type=TASK_TYPES[plan.kind])
        peft_model = get_peft_model(_skeleton(plan.kind, config), peft_cfg)
        _PEFT_SKELETONS.clear()  # one run's at a time
        _PEFT_SKELETONS[key] = peft_model
    expected = {n for n, _ in peft_model.named_parameters() if "lora_" in n}
    if expected != set(plan.lora):
        raise NotExportable(f"PEFT puts LoRA on {sorted(expected - set(plan.lora))[:3]} where the run has none, "
                            f"or the run has {sorted(set(plan.lora) - expected)[:3]} where PEFT has none")
    peft_model.load_state_dict(plan.lora, strict=False, assign=True)
    source = base_source(model_cfg.name)
    peft_model.peft_config["default"].base_model_name_or_path = source
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(str(tmp), save_embedding_layers=False)  # no embedding trains; no hub lookup
    head = None
    if plan.head is not None:
        head = {"file": HEAD_FILE, "num_labels": int(plan.head["weight"].shape[0]),
                "pooling": "mean of last_hidden_state over attention_mask == 1, then weight @ pooled + bias"}
        save_file(plan.head, str(tmp / HEAD_FILE), metadata={"pooling": "masked-mean"})
    record = {
        "schema": INFO_SCHEMA, "kind": plan.kind,
        "base": {"name": model_cfg.name, "source": source, "num_layers": model_cfg.num_layers, "seed": seed,
                 "auto_class": "AutoModel" if plan.kind == "encoder" else "AutoModelForCausalLM"},
        "lora_modules": len(plan.targets), "head": head, **(info or {}),
    }
    (tmp / INFO_FILE).write_text(json.dumps(record, indent=2))
    _swap(tmp, dest)
    return {"path": str(dest), "format": "peft-lora", "base_model": source, "holds": _holds(plan),
            "not_held": None}


def _holds(plan: AdapterPlan) -> str:
    blocks = sorted({int(t.split(".")[2]) for t in plan.targets})  # encoder.layer.<n>... / model.layers.<n>...
    text = f"LoRA on {len(plan.targets)} modules of blocks {', '.join(map(str, blocks))}"
    return text + (f"; the classifier head ({HEAD_FILE})" if plan.head is not None else "")


def not_written(reason: str) -> dict[str, Any]:
    """The record's ``adapter`` block of a run whose state has no PEFT form."""
    return {"path": None, "format": None, "base_model": None, "holds": None, "not_held": reason}


def _swap(tmp: Path, dest: Path) -> None:
    """Put the folder ``tmp`` at ``dest``; ``dest`` is whole at every moment but the two renames."""
    old = dest.with_name(dest.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


def read_info(adapter_dir: Path) -> dict[str, Any]:
    """``guardedtuning.json`` of an adapter folder written by :func:`write_adapter`."""
    path = Path(adapter_dir) / INFO_FILE
    if not path.is_file():
        raise ModelLoadError(f"{adapter_dir} has no {INFO_FILE}; pass an adapter folder a run wrote "
                             f"(<run dir>/{ADAPTER_DIR})")
    return json.loads(path.read_text())


def load_base(info: dict[str, Any]) -> nn.Module:
    """The unsplit Hugging Face model the adapters were trained on, exactly as the run loaded it.

    ``AutoModel`` (encoders, no pooler) or ``AutoModelForCausalLM`` (decoders), on the CPU, with
    the run's ``model.num-layers`` and, for the tiny and ``random:`` models, its seeded weights.
    """
    from transformers import AutoModelForCausalLM

    from guardedtuning.models.loading import load_backbone

    base = info["base"]
    backbone = load_backbone(base["name"], num_layers=int(base["num_layers"]), seed=int(base["seed"]))
    if backbone.kind == "encoder":
        return backbone.body
    with torch.device("meta"):
        full = AutoModelForCausalLM.from_config(backbone.config)
    full.model = backbone.body  # the modules the run used; lm_head stays tied to embed_tokens
    full.lm_head = backbone.lm_head
    return full.eval()


def load_head(adapter_dir: Path) -> nn.Linear | None:
    """The encoder's classifier head of an adapter folder (None for a decoder's)."""
    from safetensors.torch import load_file

    path = Path(adapter_dir) / HEAD_FILE
    if not path.is_file():
        return None
    state = load_file(str(path))
    head = nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
    head.load_state_dict(state)
    return head.eval()


def classify(head: nn.Linear, last_hidden_state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Class logits (B, C) from an encoder's ``last_hidden_state`` (B, T, D): masked mean pool, then ``head``."""
    m = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)  # (B, T, 1)
    return head((last_hidden_state * m).sum(1) / m.sum(1).clamp(min=1.0))


def export_merged(run_dir: Path, dest: Path) -> dict[str, Any]:
    """Merge ``<run_dir>/adapter`` into its base model and ``save_pretrained`` it (and the tokenizer) to ``dest``.

    Encoders also get the classifier head file (``classifier_head.safetensors``) beside the
    weights. Returns ``guardedtuning.json`` as written to ``dest``.

    Raises
    ------
    ModelLoadError
        When the run wrote no adapter folder (with the run's reason where its record has one).
    """
    from peft import PeftModel

    from guardedtuning.models.loading import load_tokenizer

    run_dir, dest = Path(run_dir), Path(dest)
    adapter = run_dir / ADAPTER_DIR
    if not (adapter / "adapter_config.json").is_file():
        raise ModelLoadError(f"{run_dir} has no adapter folder ({adapter}/adapter_config.json): "
                             f"{_why_none(run_dir)}")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ModelLoadError(f"destination {dest} exists and is not an empty folder; pass a new folder")
    info = read_info(adapter)
    merged = PeftModel.from_pretrained(load_base(info), str(adapter)).merge_and_unload()
    dest.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(dest))
    load_tokenizer(info["base"]["name"]).save_pretrained(str(dest))
    if (adapter / HEAD_FILE).is_file():
        shutil.copyfile(adapter / HEAD_FILE, dest / HEAD_FILE)
    out = {**info, "merged_from": str(adapter)}
    (dest / INFO_FILE).write_text(json.dumps(out, indent=2))
    return out


def _why_none(run_dir: Path) -> str:
    """Why a run has no adapter folder, from its record; a hint where it has none."""
    for name in ("results.json", "checkpoint.json"):
        path = run_dir / name
        if path.is_file():
            block = json.loads(path.read_text()).get("adapter")
            if isinstance(block, dict) and block.get("not_held"):
                return str(block["not_held"])
    return ("pass the output folder of a run that finished at least one round "
            "(a run writes <out>/adapter at each checkpoint)")
