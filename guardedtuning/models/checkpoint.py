"""A run's checkpoint on disk: ``checkpoint.json`` and the safetensors file of its tensors.

The server's state after a round (the designs' ``checkpoint()`` output: adapters, optimizer
state, numbers) is split into a JSON tree, where each tensor is a reference
``{"__tensor__": name}``, and one safetensors file holding the tensors by those names: no
pickle, nothing that runs code when it is read. ``checkpoint.json`` also carries the record
so far (history, ledgers, wall seconds) and names its tensor file
(``checkpoint-r<round>.safetensors``); :class:`~guardedtuning.results.Recorder` writes both.
A ``checkpoint.pt`` of the earlier version (a torch pickle) is read only with
``torch.load(weights_only=True)``: tensors, numbers, text and containers, else refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_FILE = "checkpoint.json"
CHECKPOINT_FORMAT = "guardedtuning.checkpoint/v2"
LEGACY_CHECKPOINT = "checkpoint.pt"  # v1: a torch pickle


def encode_tree(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """``obj`` as JSON, its tensors moved into ``tensors`` (named by their path) and replaced by references.

    Dicts with text keys stay objects; other dicts (an optimizer's state, keyed by int) become
    ``{"__items__": [[key, value], ...]}``, tuples ``{"__tuple__": [...]}``, tensors
    ``{"__tensor__": name}``, so :func:`decode_tree` gives back exactly what went in.
    """
    if isinstance(obj, torch.Tensor):
        name = path if path not in tensors else f"{path}#{len(tensors)}"
        tensors[name] = obj.detach().to("cpu").clone().contiguous()  # own storage: safetensors refuses shared
        return {"__tensor__": name}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode_tree(v, tensors, f"{path}/{k}") for k, v in obj.items()}
        for k in obj:
            if not isinstance(k, (str, int, float, bool)) or k is None:
                raise TypeError(f"checkpoint state at {path}: key {k!r} is a {type(k).__name__}; "
                                "keys must be text or numbers")
        return {"__items__": [[k, encode_tree(v, tensors, f"{path}/{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_tree(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_tree(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint state at {path} is a {type(obj).__name__}; a design's checkpoint() may "
                    "hold only tensors, numbers, text, None and dicts, lists or tuples of them")


def decode_tree(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`encode_tree`."""
    if isinstance(obj, list):
        return [decode_tree(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__items__"}:
            return {k: decode_tree(v, tensors) for k, v in obj["__items__"]}
        if set(obj) == {"__tuple__"}:
            return tuple(decode_tree(v, tensors) for v in obj["__tuple__"])
        return {k: decode_tree(v, tensors) for k, v in obj.items()}
    return obj


def read_checkpoint(out_dir: str | Path) -> dict[str, Any]:
    """The checkpoint of the run in ``out_dir`` (``checkpoint.json`` and its tensors), ``state`` decoded."""
    from safetensors.torch import load_file

    from guardedtuning.errors import ConfigError

    out = Path(out_dir)
    payload = json.loads((out / CHECKPOINT_FILE).read_text())
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{out / CHECKPOINT_FILE} has format {payload.get('format')!r}, expected "
                          f"{CHECKPOINT_FORMAT!r}; pass --set output.resume=false or --out to a new folder")
    tensor_file = out / payload["tensors"]
    if not tensor_file.is_file():
        raise ConfigError(f"{out / CHECKPOINT_FILE} names {tensor_file.name}, which is missing; pass --set "
                          "output.resume=false or --out to a new folder to start over")
    payload["state"] = decode_tree(payload["state"], load_file(str(tensor_file)))
    return payload


def read_legacy(path: Path) -> dict[str, Any]:
    """A v1 ``checkpoint.pt``, loaded without running pickled code (``weights_only=True``)."""
    import pickle

    from guardedtuning.errors import ConfigError

    try:
        return torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"{path} is a checkpoint of an earlier version (a pickle) that cannot be loaded safely ({first[:160]}); "
            f"this version writes {CHECKPOINT_FILE} + safetensors: pass --set output.resume=false or --out to a "
            "new folder to start over"
        ) from exc


def read_state(run_dir: str | Path) -> dict[str, Any]:
    """The ``state`` of the checkpoint in ``run_dir`` (a v1 ``checkpoint.pt`` too); ``{}`` when it has none."""
    out = Path(run_dir)
    if (out / CHECKPOINT_FILE).is_file():
        state = read_checkpoint(out)["state"]
    elif (out / LEGACY_CHECKPOINT).is_file():
        state = read_legacy(out / LEGACY_CHECKPOINT).get("state")
    else:
        return {}
    return state if isinstance(state, dict) else {}

