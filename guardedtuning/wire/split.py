"""The ``train.split`` messages of split learning, packed and checked by both sides.

One round of S local steps is S + 1 round trips per client:

=========  ===============================================  ==========================================
step s     server -> client (``train.split``)               client -> server
=========  ===============================================  ==========================================
0          ``config`` (:data:`STEP_KEYS`), the global        ``acts`` of batch 0 (:func:`unpack_acts`)
           bottom LoRA (``arrays``, built by the strategy)
1..S-1     ``config``, ``grad``: {``h``: float (B, T, D)}    ``acts`` of batch s
S          ``config``, ``grad``                              the bottom-LoRA ``update`` (+ metrics)
=========  ===============================================  ==========================================

``acts`` holds ``h`` float (B, T, D), ``mask`` uint8 (B, T) of 0/1 and ``labels`` int
((B,) class ids for encoders, (B, T) token ids or -100 for decoders); under
``privacy.quantize-bits`` ``h`` is replaced by ``codes`` uint8 (B, T, D) or packed
(B, T, ceil(D/2)), ``scales`` float32 (B, T) and ``meta`` int32 [bits, D]. B may be 0 (an
empty Poisson batch under DP-SGD). A client whose privacy budget is spent replies with
``metrics`` only (``budget-spent``, ``epsilon``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from guardedtuning.errors import MessageError
from guardedtuning.models.split import IGNORE
from guardedtuning.privacy.quantize import QuantizedActivations, dequantize_activations
from guardedtuning.training import ClientActs
from guardedtuning.wire.records import (
    MAX_ROUND,
    config_value,
    float32_tensors,
    get_record,
    record_to_tensors,
    round_value,
    tensors_to_record,
)

MESSAGE_TYPE = "train.split"
ACTS_KEY, GRAD_KEY = "acts", "grad"
STEP_KEYS = ("server-round", "step", "steps", "resumed-after")


@dataclass(frozen=True)
class SplitStep:
    """What a ``train.split`` message asks of a client.

    ``grad`` is the server's gradient for the activations of step ``step - 1``, (B, T, D);
    None at step 0 (that message carries the global adapter instead).
    """

    round_: int
    step: int
    steps: int
    resumed_after: int = 0
    grad: torch.Tensor | None = None


def step_message(node: int, round_: int, step: int, steps: int, grad: torch.Tensor | None,
                 resumed_after: int = 0) -> Message:
    """The server's message for step ``step`` >= 1 of ``round_`` to ``node``, with its activation gradient."""
    content = RecordDict({"config": ConfigRecord({"server-round": round_, "step": step, "steps": steps,
                                                  "resumed-after": resumed_after})})
    if grad is not None:
        content[GRAD_KEY] = tensors_to_record({"h": grad})
    return Message(content=content, message_type=MESSAGE_TYPE, dst_node_id=node)


def unpack_step(msg: Message, *, source: str) -> SplitStep:
    """A ``train.split`` message's step, checked: 0 <= step <= steps, and a gradient from step 1 on."""
    conf = get_record(msg.content, "config", ConfigRecord, source=source, sender="ServerApp")
    round_ = round_value(conf, source=source)
    step = config_value(conf, "step", int, source=source)
    steps = config_value(conf, "steps", int, source=source)
    resumed_after = resumed_after_of(conf, source)
    if not 0 <= step <= steps:
        raise MessageError(f"{source}: step {step} is outside 0..{steps} (`steps`)")
    grad = None
    if step > 0:
        record = get_record(msg.content, GRAD_KEY, ArrayRecord, source=source, sender="ServerApp")
        tensors = float32_tensors(record, source=source, what="activation gradient")
        if "h" not in tensors:
            raise MessageError(f"{source}: the `grad` record lacks 'h' (the gradient of the released activations)")
        grad = tensors["h"]
    return SplitStep(round_, step, steps, resumed_after, grad)


def resumed_after_of(conf: ConfigRecord, source: str) -> int:
    """The round a restarted run resumed after (``resumed-after``; 0 for a fresh run).

    Every design's training messages carry it (see :mod:`guardedtuning.privacy.client`:
    a client without its accountant charges itself the rounds before the restart).
    """
    if "resumed-after" not in conf:
        return 0
    value = config_value(conf, "resumed-after", int, source=source)
    if not 0 <= value <= MAX_ROUND:
        raise MessageError(f"{source}: `resumed-after` must be a round in 0..{MAX_ROUND} but is {value}")
    return value


def acts_record(arrays: dict[str, np.ndarray | torch.Tensor]) -> ArrayRecord:
    """A client's release (tensors, and numpy arrays that keep their integer dtype) as one record."""
    out = tensors_to_record({k: v for k, v in arrays.items() if isinstance(v, torch.Tensor)})
    for k, v in arrays.items():
        if isinstance(v, np.ndarray):
            out[k] = Array(np.ascontiguousarray(v))
    return out


MAX_TOKEN_NORM = 1e6
"""Largest L2 norm the server accepts for one released token vector (after the cast to float32).

A generous constant, not a privacy parameter: hidden states of the supported models have
per-token norms of at most a few thousand, and the token noise of any sensible
``privacy.*`` setting adds far less than 1e6 (Gaussian/laplace noise of scale
``privacy.clip * sqrt(2 ln(1.25/delta)) / epsilon`` per coordinate stays below 1e4 for
``epsilon >= 0.1``, ``clip <= 1`` and D <= 4096). At 1e6 the top's attention logits are at
most ~1e12, far from float32's 3.4e38, so an accepted vector cannot overflow the top's
first layer; what still overflows later is caught by the top step
(:func:`guardedtuning.training.top_step` drops the sender). See docs/recipes.md.
"""
MAX_SEQUENCE = 4096
"""Ceiling on T when the caller passes no ``max_length`` (the drivers pass ``model.max-length``)."""


def checked_activations(h: torch.Tensor, *, source: str, hidden: int, max_length: int,
                        what: str = "B") -> torch.Tensor:
    """Released activations as float32, checked after the cast: (rows, T, ``hidden``), T <= ``max_length``.

    Parameters
    ----------
    h : torch.Tensor
        The decoded activations, any float dtype (float64 values beyond float32 become inf in the cast).
    source : str
        Who sent them, for the error message.
    hidden : int
        The model's hidden size D.
    max_length : int
        ``model.max-length``: the longest sequence a client tokenizes.
    what : str
        The name of the row dimension in the error message (``B`` or ``N``).

    Returns
    -------
    torch.Tensor
        ``h`` as float32; every value finite and every token's L2 norm <= :data:`MAX_TOKEN_NORM`.

    Raises
    ------
    MessageError
        On a wrong dtype or shape, T > ``max_length``, or a value that is non-finite after the
        cast or a token norm beyond :data:`MAX_TOKEN_NORM`.
    """
    if not h.is_floating_point() or h.dim() != 3 or h.shape[2] != hidden:
        raise MessageError(f"{source}: activations have shape {tuple(h.shape)} / dtype {h.dtype}, "
                           f"expected float ({what}, T, {hidden})")
    if not h.shape[1] <= max_length:
        raise MessageError(f"{source}: activations have sequence length T = {h.shape[1]}, expected at most {max_length} "
                           "(`model.max-length`); the client must truncate to it")
    h = h.to(torch.float32)  # float64 beyond float32's range becomes inf here: checked below
    if not bool(torch.isfinite(h).all()):
        raise MessageError(f"{source}: activations are non-finite after the cast to float32 (a value beyond "
                           f"+-3.4e38 or NaN/inf); send float32 token vectors of norm <= {MAX_TOKEN_NORM:g}")
    if h.numel():
        worst = float(h.double().norm(dim=-1).max())
        if not worst <= MAX_TOKEN_NORM:
            raise MessageError(f"{source}: a token vector has L2 norm {worst:.3g}, beyond MAX_TOKEN_NORM = "
                               f"{MAX_TOKEN_NORM:g} (wire/split.py); the client's activations are corrupt")
    return h


def unpack_acts(msg: Message, *, hidden: int, max_batch: int, num_labels: int, kind: str,
                max_length: int = MAX_SEQUENCE) -> ClientActs:
    """A client's released activations, checked before they touch the top.

    Parameters
    ----------
    msg : Message
        The client's reply.
    hidden : int
        The hidden size D.
    max_batch : int
        The most rows a batch may have (0 rows is an empty Poisson batch under DP-SGD).
    num_labels : int
        The number of classes (encoders) or the vocabulary size (decoders).
    kind : str
        ``"encoder"`` or ``"decoder"``.
    max_length : int
        ``model.max-length``: T may not exceed it.

    Returns
    -------
    ClientActs
        ``h`` float32 (B, T, D), finite, each token's norm <= :data:`MAX_TOKEN_NORM`
        (:func:`checked_activations`); ``mask`` (B, T) of 0/1; checked labels.

    Raises
    ------
    MessageError
        When anything in the reply is missing, malformed or out of bounds (the reason names it).
    """
    source = f"reply of node {msg.metadata.src_node_id}"
    record = get_record(msg.content, ACTS_KEY, ArrayRecord, source=source, sender="ClientApp")
    acts = record_to_tensors(record, source=source)
    if "codes" in acts:  # quantized uplink (privacy.quantize-bits)
        acts["h"] = dequantize(record, source=source)
    for key in ("h", "mask", "labels"):
        if key not in acts:
            raise MessageError(f"{source}: activations record lacks {key!r}")
    h, mask, labels = acts["h"], acts["mask"], acts["labels"]
    h = checked_activations(h, source=source, hidden=hidden, max_length=max_length)
    b, t = h.shape[0], h.shape[1]
    if not 0 <= b <= max_batch:  # 0: an empty Poisson batch under DP-SGD
        raise MessageError(f"{source}: batch of {b} rows, expected 0..{max_batch}")
    if mask.is_floating_point() or labels.is_floating_point() or mask.is_complex():
        raise MessageError(f"{source}: mask and labels must be integer arrays but are {mask.dtype} / {labels.dtype}")
    if b == 0:
        if mask.numel() or labels.numel():
            raise MessageError(f"{source}: an empty batch carries {mask.numel()} mask and {labels.numel()} label "
                               "values, expected none")
        return ClientActs(h, mask.reshape(0, t), labels.reshape(0) if kind == "encoder" else labels.reshape(0, t))
    if tuple(mask.shape) != (b, t) or not bool(((mask == 0) | (mask == 1)).all()):
        raise MessageError(f"{source}: attention mask has shape {tuple(mask.shape)}, expected ({b}, {t}) of 0/1")
    if kind == "encoder":
        if tuple(labels.shape) != (b,) or labels.is_floating_point() or not bool(
                ((labels >= 0) & (labels < num_labels)).all()):
            raise MessageError(f"{source}: labels must be {b} class ids in 0..{num_labels - 1}")
    elif tuple(labels.shape) != (b, t) or labels.is_floating_point() or not bool(
            ((labels == IGNORE) | ((labels >= 0) & (labels < num_labels))).all()):
        raise MessageError(f"{source}: labels must be ({b}, {t}) token ids in 0..{num_labels - 1} or {IGNORE}")
    return ClientActs(h, mask, labels)


def dequantize(record: ArrayRecord, *, source: str) -> torch.Tensor:
    """Quantized activations (codes, scales, meta) back to float, checked before use.

    Codes must be uint8 (B, T, D) or packed (B, T, ceil(D/2)), scales finite float32
    (B, T); the decoded activations must be finite, since one client's inf would reach
    every client through the shared top.
    """
    try:
        arrays = {k: record[k].numpy() for k in ("codes", "scales", "meta")}
        codes, scales, meta = arrays["codes"], arrays["scales"], arrays["meta"]
        if codes.dtype != np.uint8 or codes.ndim != 3 or meta.shape != (2,) or meta.dtype.kind not in "iu":
            raise ValueError(f"codes {codes.dtype} {codes.shape}, meta {meta.dtype} {meta.shape}")
        if scales.dtype != np.float32 or scales.shape != codes.shape[:2] or not np.isfinite(scales).all():
            raise ValueError(f"scales {scales.dtype} {scales.shape} (finite float32 (B, T) expected)")
        bits, dim = int(meta[0]), int(meta[1])
        if bits not in (4, 8):
            raise ValueError(f"{bits}-bit codes (4 or 8 expected)")
        if codes.shape[2] != (dim if bits == 8 else (dim + 1) // 2):
            raise ValueError(f"{codes.shape[2]} code columns for {bits}-bit values of dimension {dim}")
        h = dequantize_activations(QuantizedActivations.from_arrays(arrays))
    except (KeyError, ValueError, IndexError, TypeError, RuntimeError) as exc:
        raise MessageError(f"{source}: quantized activations cannot be decoded ({exc})") from exc
    if not torch.isfinite(h).all():
        raise MessageError(f"{source}: quantized activations decode to non-finite values")
    return h
