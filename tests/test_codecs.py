"""Codecs: supports, quantization, error feedback, packing, downlink (plain numpy)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guardedtuning import codecs as C

SEED = bytes(range(32))


def test_rand_k_support_is_identical_across_clients_and_changes_with_the_seed():
    a = C.rand_k_support(size=1000, density=0.05, seed=SEED)
    b = C.rand_k_support(size=1000, density=0.05, seed=bytes(SEED))  # another client, same broadcast seed
    assert np.array_equal(a, b)
    assert a.shape == (50,) and np.all(np.diff(a) > 0) and a.min() >= 0 and a.max() < 1000
    assert not np.array_equal(a, C.rand_k_support(size=1000, density=0.05, seed=bytes(32)))


def test_support_size_rounds_up_and_is_at_least_one():
    assert C.support_size(size=24_576, density=0.05) == 1229
    assert C.support_size(size=10, density=0.01) == 1
    with pytest.raises(ValueError, match="density"):
        C.support_size(size=10, density=0.0)


def test_top_k_support_is_identical_and_takes_the_largest_public_coordinates():
    score = np.zeros(100)
    score[[3, 50, 97]] = [5.0, -9.0, 1.0]
    clients = [C.top_k_support(score=score.copy(), density=0.05, explore=0.0, seed=SEED) for _ in range(3)]
    assert all(np.array_equal(clients[0], c) for c in clients)
    assert {3, 50, 97} <= set(clients[0].tolist()) and clients[0].size == 5
    # with exploration, the top coordinates are still in, the rest is random but shared
    mixed = C.top_k_support(score=score, density=0.1, explore=0.5, seed=SEED)
    assert {3, 50, 97} <= set(mixed.tolist()) and mixed.size == 10
    assert np.array_equal(mixed, C.top_k_support(score=score, density=0.1, explore=0.5, seed=SEED))


def test_top_k_support_moves_when_exploring():
    score = np.zeros(200)
    score[:10] = 1.0  # last round's aggregate lived on coordinates 0..9
    frozen = C.top_k_support(score=score, density=0.05, explore=0.0, seed=SEED)
    moving = C.top_k_support(score=score, density=0.05, explore=0.5, seed=SEED)
    assert set(frozen.tolist()) == set(range(10))
    assert len(set(moving.tolist()) - set(range(10))) == 5


def test_quantize_hand_worked_levels():
    # bits=3: h=3, grid {-3..3} * clip/3 stored as 0..6
    q = C.quantize(np.array([-1.0, -0.5, 0.0, 0.34, 2.0]), bits=3, clip=1.0)
    assert q.dtype == np.uint8
    assert q.tolist() == [0, 2, 3, 4, 6]  # -0.5 -> 1.5 -> 2 (round half to even), 0.34 -> 4.02 -> 4
    assert C.dequantize(q, bits=3, clip=1.0).tolist() == pytest.approx([-1.0, -1 / 3, 0.0, 1 / 3, 1.0])


def test_quantize_deterministic_error_is_at_most_half_a_step():
    x = np.linspace(-0.05, 0.05, 1001)
    back = C.dequantize(C.quantize(x, bits=8, clip=0.05), bits=8, clip=0.05)
    assert np.abs(back - x).max() <= 0.5 * 0.05 / 127 + 1e-12


def test_stochastic_quantization_is_unbiased_and_seeded():
    x = np.full(20_000, 0.0123)
    q1 = C.quantize(x, bits=4, clip=0.05, rng=np.random.default_rng(1))
    q2 = C.quantize(x, bits=4, clip=0.05, rng=np.random.default_rng(1))
    assert np.array_equal(q1, q2)
    mean = C.dequantize(q1, bits=4, clip=0.05).mean()
    assert abs(mean - 0.0123) < 3 * (0.05 / 7) / np.sqrt(x.size)
    assert len(set(q1.tolist())) == 2  # the two neighbouring levels only


def test_quantize_rejects_bad_arguments():
    with pytest.raises(ValueError, match="bits"):
        C.quantize(np.zeros(3), bits=1, clip=1.0)
    with pytest.raises(ValueError, match="clip"):
        C.quantize(np.zeros(3), bits=8, clip=0.0)
    with pytest.raises(ValueError, match="NaN"):
        C.quantize(np.array([np.nan]), bits=8, clip=1.0)


def test_dequantize_mean_of_a_weighted_sum():
    q = [np.array([0, 254], np.uint8), np.array([127, 127], np.uint8)]
    w = [3, 1]
    total = sum(wi * qi.astype(np.int64) for wi, qi in zip(w, q, strict=True))
    mean = C.dequantize_mean(total, weight=4, bits=8, clip=1.0)
    assert mean.tolist() == pytest.approx([-0.75, 0.75])


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 300), st.floats(0.01, 1.0), st.integers(2, 12), st.floats(0.0, 2.0), st.booleans(),
       st.integers(0, 2**32 - 1))
def test_error_feedback_identity(size, density, bits, norm_clip, stochastic, seed):
    rng = np.random.default_rng(seed)
    update, residual = rng.normal(0, 0.1, size), rng.normal(0, 0.05, size)
    support = C.rand_k_support(size=size, density=density, seed=seed.to_bytes(32, "little"))
    out = C.compress_update(update=update, residual=residual, support=support, bits=bits, clip=0.2,
                            norm_clip=norm_clip, rng=rng if stochastic else None)
    np.testing.assert_allclose(out.sent + out.residual, update + residual, rtol=0, atol=1e-12)
    off = np.setdiff1d(np.arange(size), support)
    assert not out.sent[off].any()
    if norm_clip:
        # the sent values are within one quantization step per coordinate of the clipped ones
        assert np.linalg.norm(out.sent) <= norm_clip + np.sqrt(support.size) * 0.2 / (2 ** (bits - 1) - 1) + 1e-9


def test_compress_update_refuses_nan():
    with pytest.raises(ValueError, match="NaN"):
        C.compress_update(update=np.array([np.nan, 1.0]), residual=None, support=np.array([0]), bits=8, clip=1.0)


@pytest.mark.parametrize(("bits", "dtype"), [(1, np.uint8), (8, np.uint8), (9, np.uint16), (16, np.uint16),
                                             (17, np.uint32), (32, np.uint32), (33, np.uint64), (64, np.uint64)])
def test_word_dtype_is_the_smallest_word(bits, dtype):
    assert C.word_dtype(bits) == dtype
    top = np.array([2**bits - 1], dtype=np.uint64)
    packed = C.pack_words(top, bits=bits)
    assert packed.dtype == dtype and int(packed[0]) == 2**bits - 1


def test_pack_words_rejects_values_outside_the_range():
    with pytest.raises(ValueError, match="2\\*\\*11"):
        C.pack_words(np.array([2048]), bits=11)


def test_pack_bits_hand_worked():
    packed = C.pack_bits(np.array([5, 3], dtype=np.uint64), bits=3)  # 101 011 00
    assert packed.tolist() == [0b10101100]
    assert C.unpack_bits(packed, bits=3, count=2).tolist() == [5, 3]
    with pytest.raises(ValueError, match="pad bits"):
        C.unpack_bits(np.array([0b10101101], np.uint8), bits=3, count=2)
    with pytest.raises(ValueError, match="bytes"):
        C.unpack_bits(np.array([1, 2], np.uint8), bits=3, count=2)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 64), st.lists(st.integers(0, 2**64 - 1), min_size=0, max_size=50))
def test_pack_bits_round_trip(bits, values):
    v = np.array([x % (2**bits) for x in values], dtype=np.uint64)
    packed = C.pack_bits(v, bits=bits)
    assert packed.size == -(-v.size * bits // 8)
    assert np.array_equal(C.unpack_bits(packed, bits=bits, count=v.size), v)


def test_flatten_unflatten_round_trip_in_sorted_name_order():
    arrays = {"b": np.arange(6.0).reshape(2, 3), "a": np.array([7.0])}
    flat = C.flatten(arrays)
    assert flat.tolist() == [7.0, 0, 1, 2, 3, 4, 5]
    back = C.unflatten(flat, shapes={k: v.shape for k, v in arrays.items()})
    assert all(np.array_equal(back[k], arrays[k]) for k in arrays)


def test_downlink_round_trip_error_and_zero_tensors():
    rng = np.random.default_rng(0)
    arrays = {"lora_A": rng.normal(0, 0.02, (8, 384)).astype(np.float32), "lora_B": np.zeros((384, 8), np.float32)}
    levels, scales = C.encode_downlink(arrays, bits=8)
    assert levels["lora_A"].dtype == np.uint8 and scales["lora_B"] == 0.0
    back = C.decode_downlink(levels, scales, bits=8)
    assert np.array_equal(back["lora_B"], arrays["lora_B"])
    assert np.abs(back["lora_A"] - arrays["lora_A"]).max() <= scales["lora_A"] / 254 + 1e-7
