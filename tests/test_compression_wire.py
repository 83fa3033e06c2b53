"""The masked vector's transport (issue 13, item 2): its packed words go as raw bytes, no numpy header.

numpy's file format (Flower's ``Array`` from an ndarray) put a 128-byte header in front of every
sealed reply's masked vector: 2.3 % of ``guarded``'s whole compressed upload per client-round.
The masked vector now travels as an ``Array`` of ``stype`` ``raw`` holding exactly the packed
bytes; the server checks its stype, dtype, shape and byte length and drops a client whose vector
comes in another form. Checked under secure aggregation through LocalGrid with the fake ClientApp of
``tests/test_update_codec.py`` (no Ray, no model)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message

from guardedtuning import codecs as C
from guardedtuning.compat import get_all_nested_objects
from guardedtuning.strategies.secagg.masking import field_bits, packed_dtype, packed_length
from guardedtuning.strategies.secagg.wire import MASKED_KEY, RAW_STYPE
from guardedtuning.strategies.secure import SecureSparseFedAvg
from guardedtuning.wire.records import message_nbytes
from tests.local_grid import LocalGrid
from tests.test_update_codec import SHAPES, SIZE, fake_app, secure_round, update_of

NPY_HEADER = 128  # numpy's .npy header for a 1-D array (magic, version, length, padded dict)


@pytest.mark.parametrize("packing", ["bits", "word"])
def test_the_masked_vector_travels_as_its_packed_bytes_alone(packing):
    """Each sealed reply's ``y`` holds exactly the packed words (``(k + 1) * m`` bits, or ``k + 1`` words),
    and the round's mean is still the plaintext mean of what each client's codec sent."""
    clients = 5
    grid = LocalGrid(fake_app(0.02), clients, {})
    strategy = SecureSparseFedAvg(clients_per_round=clients, seed=0, density=0.2, bits=2, clip=0.05, support="topk",
                                  scope="lora-b", max_weight=1, packing=packing, timeout=0.2)
    support, avg, metrics, ex = secure_round(strategy, grid, 1)
    m = field_bits(clients=clients, bits=2, max_weight=1)
    want_dtype = packed_dtype(bits=m, packing=packing)
    want_bytes = packed_length(length=support.size + 1, bits=m, packing=packing) * want_dtype.itemsize
    assert avg is not None and metrics["clients"] == clients
    for reply in ex.replies.values():
        arr = reply.content[MASKED_KEY]["y"]
        assert arr.stype == RAW_STYPE and np.dtype(arr.dtype) == want_dtype
        assert len(arr.data) == want_bytes  # numpy's format made it want_bytes + 128
    total = np.zeros(SIZE)
    for v in grid.node_ids:
        comp = C.compress_update(update=C.flatten(update_of(v, 1, 0.02)), residual=None, support=support, bits=2,
                                 clip=0.05, rng=np.random.default_rng(v * 7 + 1))
        total += comp.sent
    np.testing.assert_allclose(C.flatten({k: avg[k].numpy() for k in SHAPES}), total / clients, rtol=1e-5, atol=1e-7)


def test_the_raw_transport_saves_the_numpy_header_on_the_wire():
    """The serialised masked record (what the byte accounting counts, object by object) is at least the
    numpy-format one less its header; the whole sealed reply's count holds it."""
    grid = LocalGrid(fake_app(0.02), 5, {})
    strategy = SecureSparseFedAvg(clients_per_round=5, seed=0, density=0.2, bits=2, clip=0.05, support="topk",
                                  scope="lora-b", max_weight=1, timeout=0.2)
    _, _, _, ex = secure_round(strategy, grid, 1)
    for reply in ex.replies.values():
        raw = reply.content[MASKED_KEY]
        as_numpy = ArrayRecord({"y": _numpy_form(raw["y"])})
        assert _nbytes(as_numpy) - _nbytes(raw) >= NPY_HEADER
        assert message_nbytes(reply) > _nbytes(raw)  # the reply's count holds the record


def _nbytes(record: ArrayRecord) -> int:
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(record).values())


def _values(arr: Array) -> np.ndarray:
    """The packed words an ``Array`` carries, in either transport (raw bytes, or numpy's format)."""
    return np.frombuffer(arr.data, dtype=np.dtype(arr.dtype)).copy() if arr.stype == RAW_STYPE else arr.numpy()


def _numpy_form(arr: Array) -> Array:
    return Array(_values(arr))


def _truncated(arr: Array) -> Array:
    return Array(dtype=arr.dtype, shape=tuple(arr.shape), stype=RAW_STYPE, data=arr.data[:-1])


def _float_words(arr: Array) -> Array:
    return Array(dtype="<f4", shape=(len(arr.data) // 4,), stype=RAW_STYPE, data=arr.data[:len(arr.data) // 4 * 4])


def _two_dims(arr: Array) -> Array:
    return Array(dtype=arr.dtype, shape=(1, len(arr.data)), stype=RAW_STYPE, data=arr.data)


def _dtype_string(text: str):
    """The same bytes under a dtype string a client chose (numpy raises ValueError, not TypeError, on some)."""
    def form(arr: Array) -> Array:
        return Array(dtype=text, shape=tuple(arr.shape), stype=RAW_STYPE, data=arr.data)
    return form


@pytest.mark.parametrize("form", [_numpy_form, _truncated, _float_words, _two_dims, _dtype_string("(-1,)u1"),
                                  _dtype_string("(99999999999999,)u1"), _dtype_string("u1,u2"), _dtype_string("O"),
                                  _dtype_string("no such dtype " * 50)],
                         ids=["numpy-format", "truncated", "float-dtype", "two-dims", "dtype-negative-subarray",
                              "dtype-huge-subarray", "dtype-structured", "dtype-object", "dtype-garbage"])
def test_a_masked_vector_in_another_form_drops_the_client_and_the_round_goes_on(form):
    bad = 1002

    def tamper(node: int, request: Message, reply: Message) -> Message:
        if node == bad and reply.has_content() and MASKED_KEY in reply.content:
            reply.content[MASKED_KEY] = ArrayRecord({"y": form(reply.content[MASKED_KEY]["y"])})
        return reply

    grid = LocalGrid(fake_app(0.02), 5, {}, tamper=tamper)
    strategy = SecureSparseFedAvg(clients_per_round=5, seed=0, density=0.2, bits=2, clip=0.05, support="topk",
                                  scope="lora-b", max_weight=1, timeout=0.2)
    support, avg, metrics, _ = secure_round(strategy, grid, 1)
    assert any(f"node {bad}" in r and "masked vector" in r for r in strategy.rejections), strategy.rejections
    assert avg is not None and metrics["clients"] == 4
    total = np.zeros(SIZE)
    for v in (n for n in grid.node_ids if n != bad):
        comp = C.compress_update(update=C.flatten(update_of(v, 1, 0.02)), residual=None, support=support, bits=2,
                                 clip=0.05, rng=np.random.default_rng(v * 7 + 1))
        total += comp.sent
    np.testing.assert_allclose(C.flatten({k: avg[k].numpy() for k in SHAPES}), total / 4, rtol=1e-5, atol=1e-7)


def test_a_decoder_failure_on_one_clients_reply_drops_that_client_not_the_run(monkeypatch):
    """Defence in depth: whatever a client's bytes make the decoder raise (here a stand-in bug, a ValueError,
    not the MessageError the checks raise) rejects that client; the round sums the other four."""
    import guardedtuning.strategies.secure as secure

    bad = 1003
    real = secure.from_content

    def buggy(content, kind, *, stage, server_round, source):
        if f"node {bad}" in source:
            raise ValueError("a decoder bug")
        return real(content, kind, stage=stage, server_round=server_round, source=source)

    monkeypatch.setattr(secure, "from_content", buggy)
    grid = LocalGrid(fake_app(0.02), 5, {})
    strategy = SecureSparseFedAvg(clients_per_round=5, seed=0, density=0.2, bits=2, clip=0.05, support="topk",
                                  scope="lora-b", max_weight=1, timeout=0.2)
    _, avg, metrics, _ = secure_round(strategy, grid, 1)
    assert any(f"node {bad}" in r and "could not be decoded" in r for r in strategy.rejections), strategy.rejections
    assert avg is not None and metrics["clients"] == 4
