"""Offsite tuning's model parts: the adapter sandwich, the emulator, and what a client receives.

The provider's model (L blocks) is seen as three parts: the *first* ``a`` blocks (with
the embeddings), the *middle* ``L - 2a`` blocks, and the *last* ``a`` blocks (with the
final norm and the task head). :class:`SandwichModel` holds them in that shape. Clients
fine-tune adapters on the two ends only (LoRA on those blocks, or the blocks themselves,
``offsite.adapter``) and the task head, through an *emulator* of the middle:

- layer drop: the emulator keeps ``L'`` (``offsite.emulator-layers``) of the ``M = L - 2a``
  middle blocks at a uniform stride, block ``floor((i + 1/2) M / L')`` for i < L'
  (:func:`uniform_keep`);
- distillation (optional, ``offsite.distill-steps`` > 0): the kept blocks are then trained
  to imitate the full middle on public text (seeded synthetic rows, never a client's data).
  Both see the same input, the hidden states ``x`` after the embeddings and the first ``a``
  blocks; the loss is the mean squared error over real tokens,
  ``sum_{b,t: mask=1} ||E(x)_{b,t} - M(x)_{b,t}||^2 / (n_tokens * D)``, for the emulator
  E and the full middle M (:func:`distill_emulator`).

The emulator and the full model share every name outside the middle, so the adapters
trained on one load into the other with identical keys (:func:`adapter_state`): the
server plugs the aggregated adapters into its full model.

What a client receives once (:func:`frozen_package`): the emulator's frozen weights (the
embeddings, the first and last ``a`` blocks, the ``L'`` emulator blocks, the final norm,
and an untied LM head), by name; its digest names it in later messages.
:func:`client_emulator` rebuilds the emulator from the model's config and that package.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from guardedtuning.config import LoraConfig, ModelConfig
from guardedtuning.config.sections import OffsiteConfig
from guardedtuning.errors import MessageError, ModelLoadError
from guardedtuning.models.loading import Backbone, load_backbone, load_model_config, load_tokenizer, model_kind
from guardedtuning.models.lora import add_lora
from guardedtuning.models.split import Bottom, Top
from guardedtuning.models.split import _Blocks as Blocks


def check_offsite_layers(offsite: OffsiteConfig, num_layers: int, name: str) -> int:
    """The number of middle blocks ``M = L - 2a``; a ModelLoadError when a or L' do not fit."""
    a, keep = offsite.adapter_layers, offsite.emulator_layers
    middle = num_layers - 2 * a
    if middle < 1:
        raise ModelLoadError(
            f"`offsite.adapter-layers` is {a} but {name!r} has {num_layers} blocks, which leaves no middle to "
            f"emulate; pass --set offsite.adapter-layers=A with 1 <= A <= {(num_layers - 1) // 2}"
        )
    if keep > middle:
        raise ModelLoadError(
            f"`offsite.emulator-layers` is {keep} but {name!r} with offsite.adapter-layers={a} has {middle} middle "
            f"blocks; pass --set offsite.emulator-layers=K with 0 <= K <= {middle} (K < {middle} drops layers)"
        )
    return middle


def uniform_keep(middle: int, keep: int) -> list[int]:
    """Indices of the ``keep`` middle blocks the emulator keeps, at a uniform stride.

    ``floor((i + 1/2) * middle / keep)`` for ``i < keep``: increasing, distinct, spread
    evenly and centred (4 of 4 -> [0, 1, 2, 3]; 2 of 4 -> [1, 3]; 1 of 4 -> [2]).
    """
    if not 0 <= keep <= middle:
        raise ValueError(f"cannot keep {keep} of {middle} middle blocks")
    return [int((i + 0.5) * middle / keep) for i in range(keep)]


class SandwichModel(nn.Module):
    """First ``a`` blocks (with embeddings), a middle, last ``a`` blocks (with norm and head).

    Parameter names are the same whatever the middle holds: ``bottom.*`` (embeddings,
    first blocks), ``middle.layers.<i>.*``, ``top.*`` (last blocks, norm, head).
    """

    def __init__(self, backbone: Backbone, a: int, middle: list[nn.Module], num_labels: int) -> None:
        super().__init__()
        self.kind = backbone.kind
        self.bottom = Bottom(backbone, a)
        self.middle = Blocks(backbone, middle)
        self.top = Top(backbone, backbone.num_layers - a, num_labels)

    @property
    def num_middle(self) -> int:
        return len(self.middle.layers)

    def end_blocks(self) -> list[nn.Module]:
        """The blocks the client adapts: the first ``a`` and the last ``a``."""
        return [*self.bottom.blocks.layers, *self.top.blocks.layers]

    def hidden_in(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The middle's input: embeddings and the first blocks, (B, T, D)."""
        return self.bottom(input_ids, attention_mask)

    def per_example_loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         labels: torch.Tensor) -> torch.Tensor:
        h = self.middle.run(self.bottom(input_ids, attention_mask), attention_mask)
        return self.top.per_example_loss(h, attention_mask, labels)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.middle.run(self.bottom(input_ids, attention_mask), attention_mask)
        return self.top.logits(h, attention_mask)


def _seeded_head(backbone: Backbone, a: int, middle: list[nn.Module], num_labels: int, seed: int) -> SandwichModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the head's initialisation, as split_model
        model = SandwichModel(backbone, a, middle, num_labels)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def full_sandwich(model: ModelConfig, offsite: OffsiteConfig, num_labels: int, seed: int) -> SandwichModel:
    """The provider's whole model in sandwich shape (no adapters yet)."""
    backbone = load_backbone(model.name, num_layers=model.num_layers, seed=seed)
    a = offsite.adapter_layers
    check_offsite_layers(offsite, backbone.num_layers, backbone.name)
    return _seeded_head(backbone, a, list(backbone.blocks[a: backbone.num_layers - a]), num_labels, seed)


def emulator_sandwich(model: ModelConfig, offsite: OffsiteConfig, num_labels: int, seed: int) -> SandwichModel:
    """The emulator: the same ends, ``L'`` middle blocks kept by uniform layer drop (a separate copy)."""
    backbone = load_backbone(model.name, num_layers=model.num_layers, seed=seed)
    a = offsite.adapter_layers
    middle = check_offsite_layers(offsite, backbone.num_layers, backbone.name)
    kept = [backbone.blocks[a + i] for i in uniform_keep(middle, offsite.emulator_layers)]
    return _seeded_head(backbone, a, kept, num_labels, seed)  # the dropped blocks are in no module of it


def add_adapters(model: SandwichModel, lora: LoraConfig, mode: str) -> SandwichModel:
    """Make the end blocks trainable (``lora``: LoRA on them; ``full``: their weights) and the head.

    Everything else stays frozen. Put ``model`` on its device first (see :func:`add_lora`).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.end_blocks():
        if mode == "lora":
            add_lora(block, lora, model.kind)
        elif mode == "full":
            block.requires_grad_(True)
        else:
            raise ValueError(f"adapter mode must be 'lora' or 'full' but is {mode!r}")
    if model.kind == "encoder":
        model.top.head.requires_grad_(True)
    return model


def frozen_package(model: SandwichModel) -> dict[str, torch.Tensor]:
    """The weights a client receives once: every parameter but an encoder's (new) head.

    Call it before :func:`add_adapters` (LoRA renames the wrapped weights). A tied LM head
    appears once, as the input embeddings.
    """
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()
            if not (model.kind == "encoder" and n.startswith("top.head."))}


def package_digest(package: Mapping[str, torch.Tensor | np.ndarray]) -> str:
    """SHA-256 (first 16 hex digits) over the names, shapes and float32 bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(package):
        v = package[name]
        arr = np.ascontiguousarray(v.detach().cpu().float().numpy() if isinstance(v, torch.Tensor) else
                                   np.asarray(v, dtype=np.float32))
        h.update(name.encode())
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()[:16]


def num_package_values(package: Mapping[str, torch.Tensor]) -> int:
    return int(sum(v.numel() for v in package.values()))


def distill_emulator(full: SandwichModel, emulator: SandwichModel, texts: list[str], *, model_name: str,
                     max_length: int, steps: int, lr: float, batch_size: int, seed: int,
                     device: torch.device) -> dict[str, float]:
    """Train the emulator's middle to imitate the full middle on ``texts`` (public); returns the losses.

    Loss: the mean squared error over real tokens between the two middles' outputs on the
    same input (the full model's embeddings and first blocks), per hidden unit (see the
    module docstring). AdamW on the emulator's middle only; the full model is untouched.
    """
    tok = load_tokenizer(model_name)
    enc = tok(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    params = list(emulator.middle.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr)
    rng = np.random.default_rng([seed, 7_919])
    losses: list[float] = []
    full.to(device)
    emulator.to(device)
    emulator.middle.train()
    try:
        for _ in range(steps):
            rows = torch.from_numpy(rng.choice(len(texts), size=min(batch_size, len(texts)), replace=False))
            b_ids, b_mask = ids[rows].to(device), mask[rows].to(device)
            with torch.no_grad():
                x = full.hidden_in(b_ids, b_mask)  # (B, T, D)
                target = full.middle.run(x, b_mask)  # (B, T, D)
            out = emulator.middle.run(x, b_mask)
            m = b_mask.unsqueeze(-1).to(out.dtype)  # (B, T, 1)
            loss = (((out - target) ** 2) * m).sum() / (m.sum() * out.shape[-1])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        emulator.middle.eval()
        for p in params:
            p.requires_grad_(False)
    return {"loss_first": losses[0], "loss_last": losses[-1]} if losses else {}


def middle_mse(full: SandwichModel, emulator: SandwichModel, input_ids: torch.Tensor,
               attention_mask: torch.Tensor) -> float:
    """The distillation loss of :func:`distill_emulator` on one batch, without training."""
    with torch.no_grad():
        x = full.hidden_in(input_ids, attention_mask)
        out, target = emulator.middle.run(x, attention_mask), full.middle.run(x, attention_mask)
        m = attention_mask.unsqueeze(-1).to(out.dtype)
        return float((((out - target) ** 2) * m).sum() / (m.sum() * out.shape[-1]))


# -- the client side ---------------------------------------------------------------------------


def skeleton(model: ModelConfig, num_blocks: int, seed: int) -> Backbone:
    """The model's architecture with ``num_blocks`` blocks and random weights (nothing read from disk but
    the config and tokenizer): what a client fills with the package it received."""
    from transformers import AutoModel, AutoModelForCausalLM

    config = load_model_config(model.name)
    config.num_hidden_layers = num_blocks
    kind = model_kind(config, model.name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "encoder":
            full = AutoModel.from_config(config, add_pooling_layer=False, dtype=torch.float32)
            body, lm_head = full, None
        else:
            full = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            body, lm_head = full.model, full.lm_head
    full.eval()
    return Backbone(model.name, kind, body, lm_head, load_tokenizer(model.name), body.config)


def load_package(model: SandwichModel, package: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Copy a received package into ``model``'s frozen weights; names and shapes must match exactly."""
    params = {n: p for n, p in model.named_parameters()
              if not (model.kind == "encoder" and n.startswith("top.head."))}
    missing, extra = sorted(set(params) - set(package)), sorted(set(package) - set(params))
    if missing or extra:
        raise MessageError(f"{source}: emulator weights do not match this model (missing {missing[:3]}, unexpected "
                           f"{extra[:3]}); client and server must use the same model.name and offsite.* settings")
    with torch.no_grad():
        for name, p in params.items():
            value = package[name]
            if tuple(value.shape) != tuple(p.shape):
                raise MessageError(f"{source}: emulator tensor {name} has shape {tuple(value.shape)}, "
                                   f"expected {tuple(p.shape)}")
            p.copy_(value.to(p.device, p.dtype))


def build_client_emulator(model: ModelConfig, offsite: OffsiteConfig, lora: LoraConfig, num_labels: int,
                          package: Mapping[str, torch.Tensor], device: str, seed: int, *,
                          source: str = "emulator package") -> SandwichModel:
    """The client's emulator, filled from ``package``, with its adapters (trainable) added."""
    a, keep = offsite.adapter_layers, offsite.emulator_layers
    backbone = skeleton(model, 2 * a + keep, seed)
    emu = _seeded_head(backbone, a, list(backbone.blocks[a: a + keep]), num_labels, seed)
    load_package(emu, package, source=source)
    emu.to(torch.device(device))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        add_adapters(emu, lora, offsite.adapter)
    return emu.eval()


# -- a client's copy of the package, kept across messages ---------------------------------------


def package_dir(root: Path) -> Path:
    return root / "offsite"


def store_package(package: Mapping[str, torch.Tensor], digest: str, root: Path) -> Path:
    """Keep a received package on disk (``<root>/offsite/<digest>.safetensors``), written atomically."""
    from safetensors.torch import save_file

    folder = package_dir(root)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{digest}.safetensors"
    if not path.is_file():
        tmp = path.with_suffix(f".{id(package)}.tmp")
        save_file({k: v.contiguous() for k, v in package.items()}, str(tmp))
        tmp.replace(path)
    return path


def stored_package(digest: str, root: Path) -> dict[str, torch.Tensor] | None:
    """The package stored under ``digest``, or None when this client never received it."""
    from safetensors.torch import load_file

    path = package_dir(root) / f"{digest}.safetensors"
    return load_file(str(path)) if path.is_file() else None


@functools.lru_cache(maxsize=2)
def client_emulator(model: ModelConfig, offsite: OffsiteConfig, lora: LoraConfig, num_labels: int,
                    digest: str, root: str, device: str, seed: int) -> SandwichModel:
    """The emulator named ``digest``, built once per process from the stored package."""
    package = stored_package(digest, Path(root))
    if package is None:
        raise MessageError(f"emulator {digest} was never received by this client (nothing under "
                           f"{package_dir(Path(root))}); the server sends it with the client's first round")
    if package_digest(package) != digest:
        raise MessageError(f"stored emulator {digest} is corrupt (its digest differs); delete "
                           f"{package_dir(Path(root)) / (digest + '.safetensors')} and rerun")
    return build_client_emulator(model, offsite, lora, num_labels, package, device, seed,
                                 source=f"emulator {digest}")
