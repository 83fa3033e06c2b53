"""Secure-aggregation primitives with tiny, hand-worked values: Shamir, PRG, keys, graph, masks."""

from __future__ import annotations

import numpy as np
import pytest

from guardedtuning.strategies.secagg import graph, keys, masking, prg, shamir


def _is_probable_prime(n: int) -> bool:
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41):
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def test_field_is_prime_and_holds_256_bit_secrets():
    assert _is_probable_prime(shamir.PRIME) and shamir.PRIME > 2**256


def test_shamir_hand_worked_in_gf11():
    # f(x) = 5 + 3x over GF(11): f(1) = 8, f(2) = 0, f(3) = 3
    shares = shamir.split_int(5, xs=[1, 2, 3], threshold=2, coefficients=[3], prime=11)
    assert shares == {1: 8, 2: 0, 3: 3}
    assert shamir.combine_int({1: 8, 2: 0}, threshold=2, prime=11) == 5
    assert shamir.combine_int({2: 0, 3: 3}, threshold=2, prime=11) == 5
    assert shamir.lagrange_at_zero([1, 2], prime=11) == [2, 10]  # 2*f(1) - f(2)


def test_shamir_256_bit_secret_any_t_of_n():
    secret = bytes(range(32))
    shares = shamir.split_secret(secret, xs=[3, 7, 9, 12, 20], threshold=3)
    assert all(len(s) == 33 for s in shares.values())
    for subset in ([3, 7, 9], [9, 12, 20], [3, 20, 12, 7]):
        assert shamir.combine_secret({x: shares[x] for x in subset}, threshold=3) == secret
    wrong = dict(shares)
    wrong[3] = (1).to_bytes(33, "big")
    try:  # a wrong share gives a wrong secret or a ValueError, never the right secret
        got = shamir.combine_secret({x: wrong[x] for x in (3, 7, 9)}, threshold=3)
    except ValueError:
        got = None
    assert got != secret


def test_shamir_rejects_too_few_shares_and_values_outside_the_field():
    with pytest.raises(ValueError, match="needed"):
        shamir.combine_int({1: 2}, threshold=2)
    with pytest.raises(ValueError, match="outside the field"):
        shamir.share_from_bytes((shamir.PRIME).to_bytes(33, "big"))
    with pytest.raises(ValueError, match="33 bytes"):
        shamir.share_from_bytes(b"\x00" * 32)


def test_prg_known_answer_aes256_ctr():
    # AES-256 of the zero block under the zero key is dc95c078 a2408989 ... (FIPS-197 style KAT)
    out = prg.expand(bytes(32), length=2, bits=32)
    assert out.tolist() == [0x78C095DC, 0x898940A2]
    assert prg.expand(bytes(32), length=2, bits=8).tolist() == [0xDC, 0xA2]


def test_prg_is_deterministic_in_range_and_seed_dependent():
    a = prg.expand(b"\x01" * 32, length=1000, bits=13)
    assert a.dtype == np.uint64 and int(a.max()) < 2**13
    assert np.array_equal(a, prg.expand(b"\x01" * 32, length=1000, bits=13))
    assert not np.array_equal(a, prg.expand(b"\x02" * 32, length=1000, bits=13))
    assert prg.expand(b"\x01" * 32, length=10, bits=64).dtype == np.uint64
    with pytest.raises(ValueError, match="32 bytes"):
        prg.expand(b"\x01" * 4, length=3, bits=8)  # no 32-bit seeds


def test_x25519_pair_seed_is_symmetric_and_bound_to_context():
    a_sk, a_pk = keys.new_keypair()
    b_sk, b_pk = keys.new_keypair()
    ab = keys.pair_seed(private=a_sk, public=b_pk, context=b"ctx", a=1, b=2)
    assert ab == keys.pair_seed(private=b_sk, public=a_pk, context=b"ctx", a=2, b=1)
    assert ab != keys.pair_seed(private=b_sk, public=a_pk, context=b"ctx2", a=2, b=1)
    assert len(ab) == 32 and keys.public_key_of(a_sk) == a_pk


def test_batched_pair_seeds_equal_single_ones():
    me_sk, _ = keys.new_keypair()
    pubs = {7: keys.new_keypair()[1], 3: keys.new_keypair()[1]}
    batch = keys.pair_seeds(private=me_sk, publics=pubs, context=b"c", me=5)
    assert batch == {v: keys.pair_seed(private=me_sk, public=pk, context=b"c", a=5, b=v) for v, pk in pubs.items()}


def test_sealed_shares_authenticate_the_route():
    a_sk, a_pk = keys.new_keypair()
    b_sk, b_pk = keys.new_keypair()
    k_ab = keys.channel_key(private=a_sk, public=b_pk, context=b"c", src=1, dst=2)
    ct = keys.seal(key=k_ab, plaintext=b"share", context=b"c", src=1, dst=2)
    k_ba = keys.channel_key(private=b_sk, public=a_pk, context=b"c", src=1, dst=2)
    assert keys.open_sealed(key=k_ba, ciphertext=ct, context=b"c", src=1, dst=2) == b"share"
    with pytest.raises(ValueError, match="authenticate"):
        keys.open_sealed(key=k_ba, ciphertext=ct, context=b"c", src=3, dst=2)  # re-routed


def test_low_order_public_key_is_refused():
    sk, _ = keys.new_keypair()
    with pytest.raises(ValueError):
        keys.agree(private=sk, public=bytes(32), info=b"x")


def test_harary_graph_is_symmetric_regular_and_seeded():
    nodes = list(range(100, 150))
    g = graph.neighbour_graph(nodes, degree=6, seed=b"s" * 32)
    assert all(len(v) == 6 for v in g.values())
    assert all(u in g[v] for u in g for v in g[u])
    assert g == graph.neighbour_graph(list(reversed(nodes)), degree=6, seed=b"s" * 32)
    assert g != graph.neighbour_graph(nodes, degree=6, seed=b"t" * 32)
    assert all(len(v) == 4 for v in graph.neighbour_graph(nodes[:5], degree=30, seed=b"s" * 32).values())


def test_degree_and_threshold_defaults():
    # sigma = 40, gamma = 1/3: the degree follows from the security parameter (docs/threat-model.md)
    assert [graph.effective_degree(n, 0) for n in (2, 5, 10, 100, 1000)] == [1, 4, 8, 52, 128]
    assert graph.effective_degree(100, 5) == 6  # made even
    assert [graph.auto_threshold(d) for d in (1, 4, 9, 30)] == [2, 3, 6, 16]
    # hand-worked, n = 10: C = floor(10 / 3) = 3 colluders. Degree 4 (a client's 4 neighbours are a random
    # 4 of the other 9): with t = 4 the colluders hold t - 1 = 3 of its shares with probability
    # C(3,3) C(6,1) / C(9,4) = 6/126, times 10 clients: far above 2^-40. With t = 5 they would need 4 of
    # only 3: probability 0 -> degree 4 with t = 5 is the privacy minimum
    assert graph.min_threshold(10, 4, 1 / 3) == 3
    assert graph.leak_probability(10, 4, 4, 1 / 3) == pytest.approx(10 * 6 / 126)
    assert graph.leak_probability(10, 4, 5, 1 / 3) == 0.0 and graph.min_degree(10) == 4
    # ... but t = 5 of 5 holders leaves no dropout slack; degree 8 keeps t = 5 <= 9 - ceil(9 / 3) = 6
    assert graph.auto_degree(10) == 8 and graph.round_shape(10) == (8, 5, 7)  # quorum floor((10 + 3) / 2) + 1
    # hand-worked hypergeometric tail: n = 5, C = 2, degree 2, t = 3: P[both neighbours corrupt] =
    # C(2,2) C(2,0) / C(4,2) = 1/6, times 5 clients (union bound)
    assert graph.leak_probability(5, 2, 3, 0.4) == pytest.approx(5 / 6)
    assert graph.min_quorum(5, 3, 1 / 3) == 4 and graph.min_quorum(7, 4, 0.0) == 4
    # large n: the sparse regime, where sigma sets the degree
    assert graph.min_degree(1000) == 32 and graph.round_shape(1000) == (128, 86, 667)
    assert 0 < graph.leak_probability(1000, 128, 86, 1 / 3) <= 2.0 ** -40
    assert graph.min_degree(1000, 64) > graph.min_degree(1000, 40)


def test_policy_names_the_value_and_the_minimum():
    p = graph.Policy()
    assert p.problem(n=5, degree=4, threshold=3, quorum=4) == ""
    assert "threshold 2 is below the minimum 3" in p.problem(n=5, degree=4, threshold=2, quorum=4)
    assert "degree 2 is below the minimum 4" in p.problem(n=10, degree=2, threshold=3, quorum=7)
    assert "quorum 3 is below the minimum 4" in p.problem(n=5, degree=4, threshold=3, quorum=3)
    with pytest.raises(ValueError, match="collusion"):
        graph.Policy(collusion=1.0)


def test_field_bits_hand_worked():
    assert masking.field_bits(clients=5, bits=8, max_weight=1) == 11  # 5 * 254 = 1270 < 2048
    assert masking.field_bits(clients=1000, bits=8, max_weight=1) == 18
    assert masking.field_bits(clients=10, bits=8, max_weight=1024) == 22
    with pytest.raises(ValueError, match="max-weight"):
        masking.field_bits(clients=10**6, bits=32, max_weight=2**20)


def test_masks_hand_worked_mod_16():
    x = np.array([3, 15], dtype=np.uint64)
    y = masking.apply_masks(x, masks=[(1, np.array([14, 2], np.uint64)), (1, np.array([5, 5], np.uint64))], bits=4)
    assert y.tolist() == [6, 6]  # (3+14+5) % 16, (15+2+5) % 16
    z = masking.apply_masks(y, masks=[(-1, np.array([5, 5], np.uint64)), (-1, np.array([14, 2], np.uint64))], bits=4)
    assert z.tolist() == [3, 15]


def test_pair_masks_cancel_in_a_sum():
    seeds = {(1, 2): b"a" * 32, (1, 3): b"b" * 32, (2, 3): b"c" * 32}
    xs = {v: np.array([v, 10 * v], np.uint64) for v in (1, 2, 3)}
    ys = []
    for v in (1, 2, 3):
        pairs = {u: seeds[tuple(sorted((u, v)))] for u in (1, 2, 3) if u != v}
        ys.append(masking.mask_input(xs[v], self_seed=bytes([v]) * 32, pair_seeds=pairs, me=v, bits=12))
    total = masking.apply_masks(sum(ys), masks=[(-1, prg.expand(bytes([v]) * 32, length=2, bits=12))
                                                for v in (1, 2, 3)], bits=12)
    assert total.tolist() == [6, 60]


def test_fold_and_clamp_weight():
    assert masking.fold_weight(np.array([2, 3], np.uint8), weight=4, max_weight=8).tolist() == [8, 12, 4]
    assert masking.clamp_weight(320.0, max_weight=256) == 256 and masking.clamp_weight(0.4, max_weight=8) == 1
    with pytest.raises(ValueError, match="num_examples"):
        masking.clamp_weight(float("nan"), max_weight=8)


@pytest.mark.parametrize("packing", ["word", "bits"])
def test_unpack_masked_rejects_wrong_dtype_shape_and_values_outside_the_field(packing):
    y = np.array([1, 2047, 5], dtype=np.uint64)
    packed = masking.pack_masked(y, bits=11, packing=packing)
    assert packed.dtype == (np.uint16 if packing == "word" else np.uint8)
    assert np.array_equal(masking.unpack_masked(packed, bits=11, packing=packing, length=3), y)
    with pytest.raises(ValueError, match="dtype"):
        masking.unpack_masked(packed.astype(np.int64), bits=11, packing=packing, length=3)
    with pytest.raises(ValueError, match="shape"):
        masking.unpack_masked(packed[:-1], bits=11, packing=packing, length=3)
    if packing == "word":
        with pytest.raises(ValueError, match="outside the field"):
            masking.unpack_masked(np.array([1, 2048, 5], np.uint16), bits=11, packing="word", length=3)
