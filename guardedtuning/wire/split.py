"""The ``train.split`` messages of split learning, packed and checked by both sides.

One round of S local steps is S + 1 round trips per client:

=========  ===============================================  ==========================================
step s     server -> client (``train.split``)               client -> server
=========  ===============================================  ==========================================
0          ``config`` (:data:`STEP_KEYS`), the global        ``acts`` of batch 0 (:func:`unpack_acts`)
           bottom LoRA (``arrays``, built by the strategy)
1..S-1     ``config``, ``grad`` (:func:`grad_record`)        ``acts`` of batch s
S          ``config``, ``grad``                              the bottom-LoRA ``update`` (+ metrics)
=========  ===============================================  ==========================================

``acts`` holds ``h`` float (B, T, D), ``mask`` uint8 (B, T) of 0/1 and ``labels`` int
((B,) class ids for encoders, (B, T) token ids or -100 for decoders); under
``privacy.quantize-bits`` ``h`` is replaced by ``codes`` uint8 (B, T, D) or packed
(B, T, ceil(D/2)), ``scales`` float32 (B, T) and ``meta`` int32 [bits, D]
(:mod:`guardedtuning.privacy.quantize`). B may be 0 (an empty Poisson batch under DP-SGD).
A client whose privacy budget is spent replies with ``metrics`` only (``budget-spent``,
``epsilon``).

``grad`` holds the server's activation gradient the same ways: ``h`` float32 (B, T, D), or
under ``split.grad-bits`` ``codes``/``scales``/``meta`` (:func:`grad_record`), decoded by
the client as strictly as the server decodes the uplink (:func:`decode_grad`).

Padding never crosses (``split.trim-padding``, the default): both directions then send only
the rows of the real tokens (``attention_mask == 1``), in row-major order: ``h`` (N, D),
or ``codes`` (N, .) and ``scales`` (N,), N = ``mask.sum()``; a decoder's ``labels`` go as (N,)
too when every padding label is -100. The uplink keeps its ``mask`` (B, T), from which the
server rebuilds (B, T, D) with zeros at padding (:func:`rows_to_dense`); the downlink sends
no mask: the client rebuilds with its own batch's (:meth:`SplitStep.grad_for`). The top
masks padding out of attention and of the loss, so the losses and the gradients at the real
tokens are those of the untrimmed exchange, and the gradient at padding is zero. The rank
of ``h``/``codes`` tells the layouts apart; both are accepted.

Trimming and quantization are applied to what the token mechanism has already noised
(post-processing): they cannot weaken the token guarantee. They hide nothing either: which
positions are padding is the ``mask``, sent in either layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from guardedtuning.errors import MessageError
from guardedtuning.models.split import IGNORE
from guardedtuning.privacy.quantize import QuantizedActivations, dequantize_activations, quantize_activations
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

    ``grad`` is the server's gradient for the activations of step ``step - 1``, decoded and
    checked (:func:`decode_grad`): (B, T, D), or (N, D) for the real tokens only when the
    server trimmed padding; :meth:`grad_for` gives the (B, T, D) the backward needs. None at
    step 0 (that message carries the global adapter instead).
    """

    round_: int
    step: int
    steps: int
    resumed_after: int = 0
    grad: torch.Tensor | None = None

    def grad_for(self, mask: torch.Tensor, *, dim: int, source: str) -> torch.Tensor:
        """The gradient as (B, T, ``dim``) for this client's batch ``mask`` (B, T): zeros at padding.

        Raises
        ------
        MessageError
            When a trimmed gradient's rows are not one per real token of ``mask`` or not of
            width ``dim`` (a dense gradient's shape is checked by the backward).
        """
        if self.grad is None:
            raise MessageError(f"{source}: step {self.step} carries no activation gradient")
        if self.grad.dim() == 3:
            return self.grad
        if self.grad.shape[1] != dim:
            raise MessageError(f"{source}: the activation gradient has rows of width {self.grad.shape[1]}, expected "
                               f"{dim} (what this client releases per token)")
        return rows_to_dense(self.grad, mask, fill=0.0, source=source, what="activation gradient")


def grad_record(grad: torch.Tensor, *, mask: torch.Tensor | None = None, bits: int = 0,
                generator: torch.Generator | None = None) -> ArrayRecord:
    """The server's activation gradient (B, T, D) as it is sent: trimmed, quantized, or as it is.

    Parameters
    ----------
    grad : torch.Tensor
        The gradient of one client's released activations, (B, T, D).
    mask : torch.Tensor, optional
        That client's attention mask (B, T): send only the rows at ``mask == 1`` (``h`` or
        ``codes`` of N rows, ``split.trim-padding``); None sends (B, T, D).
    bits : int
        0 sends float32 ``h``; 8 or 4 sends ``codes``/``scales``/``meta`` with one scale per
        token (``split.grad-bits``, :func:`~guardedtuning.privacy.quantize.quantize_activations`).
    generator : torch.Generator, optional
        Stochastic rounding's uniforms (``split.stochastic-rounding``); None rounds to nearest.
    """
    g = grad.detach().to("cpu", torch.float32)
    if mask is not None:
        g = trim_rows(g, mask)
    if bits:
        return acts_record(dict(quantize_activations(g, bits=bits, generator=generator).arrays()))
    return tensors_to_record({"h": g})


def step_message(node: int, round_: int, step: int, steps: int, grad: torch.Tensor | None,
                 resumed_after: int = 0, *, mask: torch.Tensor | None = None, bits: int = 0,
                 generator: torch.Generator | None = None) -> Message:
    """The server's message for step ``step`` >= 1 of ``round_`` to ``node``, with its activation gradient.

    ``mask``, ``bits`` and ``generator`` say how the gradient is sent (:func:`grad_record`).
    """
    content = RecordDict({"config": ConfigRecord({"server-round": round_, "step": step, "steps": steps,
                                                  "resumed-after": resumed_after})})
    if grad is not None:
        content[GRAD_KEY] = grad_record(grad, mask=mask, bits=bits, generator=generator)
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
        grad = decode_grad(record, source=source)
    return SplitStep(round_, step, steps, resumed_after, grad)


def decode_grad(record: ArrayRecord, *, source: str) -> torch.Tensor:
    """The ``grad`` record's activation gradient as float32, checked: (B, T, D) or trimmed (N, D).

    Float ``h`` must be finite after the cast to float32; quantized ``codes``/``scales``/``meta``
    are checked as the uplink's are (:func:`dequantize`) and must decode to finite values.

    Raises
    ------
    MessageError
        Naming what is wrong: a missing or undecodable array, both ``h`` and ``codes``, a bad
        dtype, shape, bit width, scale or code count, or a non-finite value.
    """
    what = "activation gradient"
    if "codes" in record.keys():
        if "h" in record.keys():
            raise MessageError(f"{source}: the activation gradient (`grad` record) carries both 'h' and 'codes'; "
                               "a gradient is sent as float 'h' or as quantized 'codes'/'scales'/'meta', not both")
        grad = dequantize(record, source=source, what=what)
    else:
        try:
            tensors = float32_tensors(record, source=source, what=what)
        except MessageError as exc:
            raise MessageError(f"{source}: the activation gradient is malformed "
                               f"({str(exc).removeprefix(source + ': ')})") from exc
        if "h" not in tensors:
            raise MessageError(f"{source}: the activation gradient (`grad` record) lacks 'h', the gradient of the "
                               "released activations (or 'codes'/'scales'/'meta' under split.grad-bits)")
        grad = tensors["h"]
    if grad.dim() not in (2, 3):
        raise MessageError(f"{source}: the activation gradient has shape {tuple(grad.shape)}, expected (B, T, D), "
                           "or (N, D) for the real tokens when padding is trimmed")
    return grad


def trim_rows(x: torch.Tensor | np.ndarray, mask: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """The rows of ``x`` (B, T, ...) at the real tokens (``mask == 1``, (B, T)), in row-major order: (N, ...)."""
    if isinstance(x, np.ndarray):
        return x[np.asarray(mask).astype(bool)]
    return x[torch.as_tensor(mask).to(x.device).bool()]


def rows_to_dense(rows: torch.Tensor, mask: torch.Tensor, *, fill: float, source: str, what: str) -> torch.Tensor:
    """Trimmed rows (N, ...) back to (B, T, ...) at ``mask == 1``, ``fill`` at padding.

    Raises
    ------
    MessageError
        When ``mask`` is not (B, T) of 0/1 integers or N is not its number of ones.
    """
    if mask.dim() != 2 or mask.is_floating_point() or mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
        raise MessageError(f"{source}: attention mask has shape {tuple(mask.shape)} / dtype {mask.dtype}, "
                           "expected (B, T) of 0/1 integers")
    m = mask.bool()
    real = int(m.sum())
    if rows.dim() < 1 or rows.shape[0] != real:
        raise MessageError(f"{source}: the trimmed {what} has {rows.shape[0] if rows.dim() else 0} token rows but "
                           f"the attention mask has {real} real tokens (mask == 1); send one row per real token")
    out = torch.full((*m.shape, *rows.shape[1:]), fill, dtype=rows.dtype)
    out[m] = rows
    return out


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


def acts_record(arrays: dict[str, np.ndarray | torch.Tensor], *, trim: bool = False) -> ArrayRecord:
    """A client's release (tensors, and numpy arrays that keep their integer dtype) as one record.

    With ``trim`` (``split.trim-padding``) only the real tokens' rows of ``h`` or
    ``codes``/``scales`` are sent (:func:`trim_rows`), and a decoder's (B, T) ``labels`` as (N,)
    when every padding label is -100; ``mask`` stays (B, T). Applied to a release that is
    already noised and quantized: post-processing, no change to the guarantee.
    """
    if trim and "mask" in arrays:
        arrays = trimmed_release(arrays)
    out = tensors_to_record({k: v for k, v in arrays.items() if isinstance(v, torch.Tensor)})
    for k, v in arrays.items():
        if isinstance(v, np.ndarray):
            out[k] = Array(np.ascontiguousarray(v))
    return out


def trimmed_release(arrays: dict[str, np.ndarray | torch.Tensor]) -> dict[str, np.ndarray | torch.Tensor]:
    """``arrays`` (a release with its (B, T) ``mask``) with only the real tokens' rows (see :func:`acts_record`)."""
    mask = torch.as_tensor(np.asarray(arrays["mask"]) if isinstance(arrays["mask"], np.ndarray) else arrays["mask"])
    out = dict(arrays)
    for key in ("h", "codes", "scales"):
        if key in out:
            out[key] = trim_rows(out[key], mask)
    labels = out.get("labels")
    if isinstance(labels, torch.Tensor) and labels.dim() == 2 and tuple(labels.shape) == tuple(mask.shape):
        if bool((labels[~mask.bool()] == IGNORE).all()):
            out["labels"] = trim_rows(labels, mask)
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
        acts["h"] = dequantize(record, source=source, max_values=max(1, max_batch) * max_length * hidden)
    for key in ("h", "mask", "labels"):
        if key not in acts:
            raise MessageError(f"{source}: activations record lacks {key!r}")
    h, mask, labels = acts["h"], acts["mask"], acts["labels"]
    if h.dim() == 2:  # the real tokens' rows only (split.trim-padding): rebuild (B, T, D) from the mask
        h, labels = _dense_release(h, mask, labels, source=source, hidden=hidden, max_batch=max_batch,
                                   max_length=max_length, kind=kind)
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


def _dense_release(h: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, *, source: str, hidden: int,
                   max_batch: int, max_length: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A trimmed release's (N, D) rows (and a decoder's (N,) labels) as (B, T, D) (and (B, T)).

    The mask's shape is bounded (B <= ``max_batch``, T <= ``max_length``) and the rows' width
    checked before anything of size B x T x D is allocated.
    """
    if not h.is_floating_point() or h.shape[1] != hidden:
        raise MessageError(f"{source}: trimmed activations have shape {tuple(h.shape)} / dtype {h.dtype}, "
                           f"expected float (N, {hidden}), one row per real token")
    if mask.dim() != 2 or not (0 <= mask.shape[0] <= max_batch and mask.shape[1] <= max_length):
        raise MessageError(f"{source}: attention mask has shape {tuple(mask.shape)}, expected (B, T) with "
                           f"B <= {max_batch} and T <= {max_length} (`model.max-length`)")
    dense = rows_to_dense(h, mask, fill=0.0, source=source, what="activations")
    if kind == "decoder" and labels.dim() == 1 and not labels.is_floating_point():
        labels = rows_to_dense(labels, mask, fill=IGNORE, source=source, what="labels")
    return dense, labels


def dequantize(record: ArrayRecord, *, source: str, what: str = "activations",
               max_values: int | None = None) -> torch.Tensor:
    """Quantized values (codes, scales, meta) back to float32, checked before use.

    Codes must be uint8 (B, T, D) or packed (B, T, ceil(D/2)), or with trimmed padding
    (N, D) / (N, ceil(D/2)); scales finite, non-negative float32 of the codes' leading shape
    ((B, T) or (N,)); the decoded values must be finite, since one client's inf would reach
    every client through the shared top (and a server's inf would wreck a client's bottom).
    Used for the uplink's activations and the downlink's gradients (``what``). ``max_values``:
    the most float32 values the message may decode to, checked before anything is decoded
    (4-bit codes grow 8x: a sender must not make the receiver allocate what it cannot hold).
    """
    try:
        arrays = {k: record[k].numpy() for k in ("codes", "scales", "meta")}
        codes, scales, meta = arrays["codes"], arrays["scales"], arrays["meta"]
        if codes.dtype != np.uint8 or codes.ndim not in (2, 3) or meta.shape != (2,) or meta.dtype.kind not in "iu":
            raise ValueError(f"codes {codes.dtype} {codes.shape}, meta {meta.dtype} {meta.shape} (uint8 codes "
                             "(B, T, .) or (N, .) and int32 meta [bits, D] expected)")
        if scales.dtype != np.float32 or scales.shape != codes.shape[:-1] or not np.isfinite(scales).all() or (
                scales < 0).any():
            raise ValueError(f"scales {scales.dtype} {scales.shape} (finite, non-negative float32 "
                             f"{codes.shape[:-1]} expected)")
        bits, dim = int(meta[0]), int(meta[1])
        if bits not in (4, 8):
            raise ValueError(f"{bits}-bit codes (4 or 8 expected)")
        if dim < 1 or codes.shape[-1] != (dim if bits == 8 else (dim + 1) // 2):
            raise ValueError(f"{codes.shape[-1]} code columns for {bits}-bit values of dimension {dim}")
        if max_values is not None and int(np.prod(codes.shape[:-1], dtype=np.int64)) * dim > max_values:
            raise ValueError(f"{codes.shape[:-1]} x {dim} values, more than the {max_values} a message of at most "
                             "the batch size x model.max-length tokens of the released width can hold")
        _check_codes(codes, bits, dim)
        h = dequantize_activations(QuantizedActivations.from_arrays(arrays))
    except (KeyError, ValueError, IndexError, TypeError, RuntimeError) as exc:
        raise MessageError(f"{source}: quantized {what} cannot be decoded ({exc})") from exc
    if not torch.isfinite(h).all():
        raise MessageError(f"{source}: quantized {what} decode to non-finite values (a scale beyond float32's "
                           "range / 127); send scales max|v| / q of finite float32 values")
    return h


def _check_codes(codes: np.ndarray, bits: int, dim: int) -> None:
    """Every code in the format's range: 1..255 (8 bit), 1..15 per nibble (4 bit), 0 in an odd D's padding nibble."""
    if bits == 8:
        if codes.size and int(codes.min()) < 1:
            raise ValueError("an 8-bit code is 0 (codes are 1..255: the value + 128)")
        return
    low, high = codes & 0x0F, codes >> 4
    if dim % 2:
        pad, high = high[..., -1], high[..., :-1]
        if pad.size and int(pad.max()) != 0:
            raise ValueError(f"the padding nibble of an odd D = {dim} is not 0")
    for nibbles in (low, high):
        if nibbles.size and int(nibbles.min()) < 1:
            raise ValueError("a 4-bit code is 0 (codes are 1..15: the value + 8)")
