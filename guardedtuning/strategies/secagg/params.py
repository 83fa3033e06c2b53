"""The public parameters of one secure-aggregation round, and the context digest.

The server fixes them in ``configure_train`` and sends them in the round's first
message (a ``secagg`` ConfigRecord plus a ``secagg-setup`` ArrayRecord holding the
participant ids and, for a top-k support, its indices). Every client derives the
same graph, support and field from them, and binds their SHA-256 digest (the
*context*) into every key it derives and every statement it signs: a server that sent
two clients different parameters would get pair masks that do not cancel, which the
range check on the unmasked sum catches, instead of a wrong aggregate.

The graph's seed is not the server's: it is :func:`~.graph.graph_seed` of the run id
(which the client checks against its own ``context.run_id``) and the round; ``seed``
only draws the rand-k support, which is public and data-independent anyway.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from guardedtuning.codecs import max_level, rand_k_support, support_digest, support_size, word_dtype
from guardedtuning.errors import MessageError
from guardedtuning.strategies.secagg.graph import effective_degree, graph_seed, neighbour_graph
from guardedtuning.strategies.secagg.masking import PACKINGS, field_bits

SUPPORTS = ("rand", "topk")
CONFIG_KEY = "secagg"
SETUP_KEY = "secagg-setup"


@dataclass(frozen=True, eq=False)
class RoundParams:
    """Everything public about one round (see the module docstring).

    Attributes
    ----------
    server_round : int
        The round number.
    nodes : tuple of int
        The round's participants, sorted; node ``v`` has Shamir x-coordinate ``1 + index``.
    degree : int
        Effective neighbour count (even, or ``n - 1`` for the complete graph).
    threshold : int
        Shares needed to reconstruct a secret, and the fewest survivors a round accepts.
    size : int
        Length of the flattened adapter update.
    density : float
        Fraction of the ``size`` coordinates sent (a top-k support may hold fewer, when its
        scope has fewer coordinates than ``ceil(density * size)``).
    support_mode : str
        ``"rand"`` (derived from ``seed``) or ``"topk"`` (indices sent by the server).
    support : numpy.ndarray
        Sorted int64 indices of the sent coordinates.
    bits, clip : int, float
        Quantization of the sent values (see :func:`guardedtuning.codecs.quantize`).
    norm_clip : float
        L2 clip of each client's sent values before quantization (0: off).
    max_weight : int
        Cap on a client's integer weight (its example count).
    packing : str
        ``"word"`` (smallest numpy word) or ``"bits"`` (exactly ``field_bits`` per value).
    seed : bytes
        32-byte public round seed of the rand-k support.
    run_id : int
        The Flower run id; with ``server_round`` it seeds the graph (:func:`~.graph.graph_seed`).
    quorum : int
        Signatures on one survivor set a client needs before it reveals shares (0: ``threshold``).
    """

    server_round: int
    nodes: tuple[int, ...]
    degree: int
    threshold: int
    size: int
    density: float
    support_mode: str
    support: np.ndarray = field(repr=False)
    bits: int
    clip: float
    norm_clip: float
    max_weight: int
    packing: str
    seed: bytes = field(repr=False)
    run_id: int = 0
    quorum: int = 0

    def __post_init__(self) -> None:
        n = len(self.nodes)
        if self.quorum == 0:
            object.__setattr__(self, "quorum", self.threshold)
        if list(self.nodes) != sorted(set(self.nodes)):
            raise ValueError("`nodes` must be sorted and distinct")
        if self.degree != effective_degree(n, self.degree):
            raise ValueError(f"`degree` {self.degree} is not an effective degree for {n} nodes")
        if not 2 <= self.threshold <= self.degree + 1:
            raise ValueError(f"`threshold` must be in [2, degree + 1 = {self.degree + 1}] but is {self.threshold}; "
                             "lower aggregation.threshold or raise aggregation.degree")
        if not self.threshold <= self.quorum <= n:
            raise ValueError(f"`quorum` must be in [threshold = {self.threshold}, {n} clients] but is {self.quorum}")
        if not 0 <= self.run_id < 2**64:
            raise ValueError(f"`run_id` must be a 64-bit unsigned integer but is {self.run_id}")
        if self.support_mode not in SUPPORTS:
            raise ValueError(f"`support_mode` must be one of {SUPPORTS} but is {self.support_mode!r}")
        if self.packing not in PACKINGS:
            raise ValueError(f"`packing` must be one of {PACKINGS} but is {self.packing!r}")
        if len(self.seed) != 32:
            raise ValueError(f"`seed` must be 32 bytes but is {len(self.seed)}")
        if not self.clip > 0 or self.norm_clip < 0:
            raise ValueError(f"`clip` must be > 0 and `norm_clip` >= 0 but are {self.clip} and {self.norm_clip}")
        max_level(self.bits)
        sup = np.asarray(self.support)
        k = support_size(size=self.size, density=self.density)
        # a top-k support the server sends may be shorter than k (a scope with fewer coordinates, e.g. LoRA's B)
        short = self.support_mode == "topk" and sup.ndim == 1 and 1 <= sup.size <= k
        if (sup.shape != (k,) and not short) or (sup.size > 1 and not (np.diff(sup) > 0).all()) or sup[0] < 0 \
                or sup[-1] >= self.size:
            raise ValueError(f"`support` must be {k} sorted distinct indices in [0, {self.size})"
                             + (" (at most that many in top-k mode)" if self.support_mode == "topk" else ""))
        self.field_bits  # noqa: B018 - raises if the field would exceed 64 bits

    @cached_property
    def field_bits(self) -> int:
        """``m``: the masked vectors live in Z_{2**m}."""
        return field_bits(clients=len(self.nodes), bits=self.bits, max_weight=self.max_weight)

    @property
    def length(self) -> int:
        """Values per masked vector: the support plus the weight slot."""
        return len(self.support) + 1

    def x_of(self, node: int) -> int:
        """Shamir x-coordinate of ``node``."""
        return self._index[node] + 1

    @cached_property
    def _index(self) -> dict[int, int]:
        return {v: i for i, v in enumerate(self.nodes)}

    @cached_property
    def graph(self) -> dict[int, tuple[int, ...]]:
        return neighbour_graph(self.nodes, degree=self.degree, seed=graph_seed(self.run_id, self.server_round))

    @cached_property
    def context(self) -> bytes:
        """SHA-256 of every public parameter: bound into all derived keys."""
        h = hashlib.sha256(b"gt-secagg/v2/")
        h.update(struct.pack("<Qqqqqqqdqddq", self.run_id, self.server_round, len(self.nodes), self.degree,
                             self.threshold, self.quorum, self.size, self.density, self.bits, self.clip,
                             self.norm_clip, self.max_weight))
        h.update(np.asarray(self.nodes, dtype="<u8").tobytes())
        h.update(self.support_mode.encode() + b"/" + self.packing.encode() + b"/" + self.seed)
        h.update(support_digest(self.support))
        return h.digest()

    def to_records(self) -> tuple[ConfigRecord, ArrayRecord]:
        """The ``secagg`` ConfigRecord and ``secagg-setup`` ArrayRecord of the first message."""
        cfg = ConfigRecord({
            "server-round": self.server_round, "degree": self.degree, "threshold": self.threshold,
            "size": self.size, "density": self.density, "support-mode": self.support_mode, "bits": self.bits,
            "clip": self.clip, "norm-clip": self.norm_clip, "max-weight": self.max_weight,
            "packing": self.packing, "seed": self.seed, "run-id": self.run_id.to_bytes(8, "little"), "quorum": self.quorum,
        })
        arrays = ArrayRecord({"nodes": Array(np.asarray(self.nodes, dtype=np.uint64))})
        if self.support_mode == "topk":
            arrays["support"] = Array(self.support.astype(word_dtype(max(1, int(self.size - 1).bit_length()))))
        return cfg, arrays

    @classmethod
    def from_records(cls, cfg: ConfigRecord, arrays: ArrayRecord, *, source: str) -> RoundParams:
        """Parse and check what the server sent; a :class:`MessageError` names the bad field."""
        def val(key: str, typ: type):  # type: ignore[no-untyped-def]
            value = cfg.get(key)
            if typ is float and isinstance(value, int) and not isinstance(value, bool):
                return float(value)
            if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
                raise MessageError(f"{source}: config key {key!r} is {value!r}, expected {typ.__name__}; "
                                   "the strategy sends it")
            return value

        try:
            nodes_arr = arrays["nodes"].numpy()
        except KeyError as exc:
            raise MessageError(f"{source}: {SETUP_KEY} lacks 'nodes'; the strategy sends it") from exc
        if nodes_arr.dtype != np.uint64 or nodes_arr.ndim != 1:
            raise MessageError(f"{source}: 'nodes' must be a 1-D uint64 array, not {nodes_arr.dtype} {nodes_arr.shape}")
        mode, size, density, seed = val("support-mode", str), val("size", int), val("density", float), val("seed", bytes)
        try:
            if mode == "topk":
                if "support" not in arrays:
                    raise MessageError(f"{source}: top-k round without 'support' in {SETUP_KEY}")
                support = arrays["support"].numpy().astype(np.int64)
            else:
                support = rand_k_support(size=size, density=density, seed=seed)
            return cls(server_round=val("server-round", int), nodes=tuple(int(v) for v in nodes_arr),
                       degree=val("degree", int), threshold=val("threshold", int), size=size, density=density,
                       support_mode=mode, support=support, bits=val("bits", int), clip=val("clip", float),
                       norm_clip=val("norm-clip", float), max_weight=val("max-weight", int),
                       packing=val("packing", str), seed=seed, run_id=int.from_bytes(val("run-id", bytes)[:8], "little"),
                       quorum=val("quorum", int))
        except ValueError as exc:
            raise MessageError(f"{source}: bad secure-aggregation parameters: {exc}") from exc
