"""Unit tests of the cryptographic primitives (known answers live in test_protocol_vectors)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedcollm_secure.crypto import (
    PRIME, InsecureSeededRandomForTests, KdfContext, QuantizationSpec, associated_data,
    derive_key, expand_seed, generate_keypair, generate_signing_key, open_sealed,
    reconstruct_secret, seal, split_secret, uniform01,
)
from fedcollm_secure.crypto.key_agreement import agree, public_of
from fedcollm_secure.crypto.prg import MaskPRG
from fedcollm_secure.crypto.shamir import Share
from fedcollm_secure.errors import (
    ConfigError, CryptoError, DecryptionError, KeyFormatError, QuantizationError,
    SecretSharingError, ShareVerificationError, SignatureError,
)

CTX = KdfContext(protocol="masking/v1", version=1, session=b"s" * 16, round=3)


def test_prime_is_probably_prime_and_above_secret_space() -> None:
    assert PRIME > 1 << 256
    for a in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37):
        assert pow(a, PRIME - 1, PRIME) == 1


def test_kdf_binds_every_context_field() -> None:
    ikm = os.urandom(32)
    base = derive_key(ikm, CTX, purpose="pairwise-mask", pair=(1, 2))
    variants = [
        derive_key(ikm, KdfContext("other", 1, CTX.session, 3), purpose="pairwise-mask",
                   pair=(1, 2)),
        derive_key(ikm, KdfContext(CTX.protocol, 2, CTX.session, 3), purpose="pairwise-mask",
                   pair=(1, 2)),
        derive_key(ikm, KdfContext(CTX.protocol, 1, b"t" * 16, 3), purpose="pairwise-mask",
                   pair=(1, 2)),
        derive_key(ikm, KdfContext(CTX.protocol, 1, CTX.session, 4), purpose="pairwise-mask",
                   pair=(1, 2)),
        derive_key(ikm, CTX, purpose="share-encryption", pair=(1, 2)),
        derive_key(ikm, CTX, purpose="pairwise-mask", pair=(2, 1)),
        derive_key(ikm, CTX, purpose="pairwise-mask", pair=(1, 3)),
    ]
    assert len({base, *variants}) == len(variants) + 1
    assert derive_key(ikm, CTX, purpose="pairwise-mask", pair=(1, 2)) == base
    with pytest.raises(CryptoError):
        derive_key(b"short", CTX, purpose="x", pair=(1, 2))


def test_x25519_agreement_is_symmetric_and_rejects_bad_keys() -> None:
    a, b = generate_keypair(), generate_keypair()
    assert agree(a.private, b.public_bytes) == agree(b.private, a.public_bytes)
    assert public_of(a.private_bytes()) == a.public_bytes
    with pytest.raises(KeyFormatError):
        agree(a.private, b"\x01" * 31)
    with pytest.raises(CryptoError):
        agree(a.private, bytes(32))  # low-order point: all-zero shared secret


def test_prg_uses_full_seed_and_reduces_to_ring() -> None:
    seed = os.urandom(32)
    full = expand_seed(seed, 1000, 32)
    assert full.dtype == np.uint32
    assert not np.array_equal(full, expand_seed(seed[:31] + bytes([seed[31] ^ 1]), 1000, 32))
    small = expand_seed(seed, 1000, 20)
    assert np.array_equal(small, full & ((1 << 20) - 1))
    wide = expand_seed(seed, 10, 64)
    assert wide.dtype == np.uint64 and wide.max() > (1 << 40)
    with pytest.raises(CryptoError):
        expand_seed(b"x" * 16, 10, 32)


def test_prg_add_into_matches_expand_and_cancels() -> None:
    seed = os.urandom(32)
    prg = MaskPRG(257, 32)
    acc = np.arange(257, dtype=np.uint32)
    prg.add_into(acc, seed, 1)
    assert np.array_equal(acc, np.arange(257, dtype=np.uint32) + expand_seed(seed, 257, 32))
    prg.add_into(acc, seed, -1)
    assert np.array_equal(acc, np.arange(257, dtype=np.uint32))
    assert prg.bytes_generated == 2 * 257 * 4


def test_uniform01_range_and_mean() -> None:
    u = uniform01(os.urandom(32), 200_000)
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.005


def test_aead_binds_associated_data() -> None:
    key = os.urandom(32)
    ad = associated_data("share", b"s" * 16, 1, 2, 3)
    sealed = seal(key, b"secret share", ad)
    assert open_sealed(key, sealed, ad) == b"secret share"
    for other in (associated_data("share", b"t" * 16, 1, 2, 3),
                  associated_data("share", b"s" * 16, 2, 2, 3),
                  associated_data("share", b"s" * 16, 1, 3, 2)):
        with pytest.raises(DecryptionError):
            open_sealed(key, sealed, other)
    flipped = bytearray(sealed)
    flipped[20] ^= 1
    with pytest.raises(DecryptionError):
        open_sealed(key, bytes(flipped), ad)
    with pytest.raises(DecryptionError):
        open_sealed(key, sealed[:10], ad)


def test_signatures_verify_or_raise() -> None:
    key = generate_signing_key()
    sig = key.sign(b"message")
    key.verify_key.verify(sig, b"message")
    with pytest.raises(SignatureError):
        key.verify_key.verify(sig, b"messagf")
    with pytest.raises(SignatureError):
        generate_signing_key().verify_key.verify(sig, b"message")
    with pytest.raises(SignatureError):
        key.verify_key.verify(sig[:63], b"message")


@pytest.mark.parametrize("threshold,holders", [(1, 1), (2, 3), (3, 5), (7, 12)])
def test_shamir_any_threshold_subset_recovers(threshold: int, holders: int) -> None:
    secret = os.urandom(32)
    xs = list(range(3, 3 + 2 * holders, 2))
    shares = split_secret(secret, threshold, xs)
    rng = np.random.default_rng(threshold)
    for _ in range(5):
        pick = rng.choice(xs, size=threshold, replace=False)
        assert reconstruct_secret([shares[int(x)] for x in pick], threshold) == secret


def test_shamir_below_threshold_and_bad_shares() -> None:
    secret = os.urandom(32)
    shares = split_secret(secret, 3, [1, 2, 3, 4])
    with pytest.raises(SecretSharingError):
        reconstruct_secret([shares[1], shares[2]], 3)
    with pytest.raises(SecretSharingError):
        reconstruct_secret([shares[1], shares[1], shares[2]], 3)
    with pytest.raises(SecretSharingError):
        split_secret(secret, 5, [1, 2, 3])
    with pytest.raises(SecretSharingError):
        split_secret(secret, 2, [0, 1])
    with pytest.raises(SecretSharingError):
        Share.from_bytes(b"\x00" * 40)
    bad = Share(shares[2].x, (shares[2].y + 1) % PRIME)
    with pytest.raises(ShareVerificationError):
        reconstruct_secret([shares[1], bad, shares[3]], 3, check=lambda s: s == secret)
    # with a spare share and a check, the wrong share is routed around
    assert reconstruct_secret([shares[1], bad, shares[3], shares[4]], 3,
                              check=lambda s: s == secret) == secret


def test_shamir_fewer_than_threshold_shares_are_uniform() -> None:
    """Two shares of a 3-of-n sharing do not depend on the secret (first share value spread)."""
    ys = [split_secret(bytes(32), 3, [1, 2, 3])[1].y for _ in range(200)]
    assert len(set(ys)) == 200 and max(ys) > PRIME // 2


def test_shamir_shares_private_keys() -> None:
    key = X25519PrivateKey.generate()
    raw = key.private_bytes_raw()
    shares = split_secret(raw, 2, [5, 9])
    pub = key.public_key().public_bytes_raw()
    assert reconstruct_secret(shares.values(), 2, check=lambda s: public_of(s) == pub) == raw


def test_quantisation_overflow_checked_at_config_time() -> None:
    QuantizationSpec(clip=1.0, ring_bits=16, levels=3276, max_summands=10)
    with pytest.raises(ConfigError, match="overflow"):
        QuantizationSpec(clip=1.0, ring_bits=16, levels=3277, max_summands=10)
    spec = QuantizationSpec.fit(1.0, 32, 1000)
    assert 1000 * spec.levels <= (1 << 31) - 1 < 1000 * (spec.levels + 1)


def test_quantisation_is_unbiased_and_wraps_negatives() -> None:
    spec = QuantizationSpec(clip=1.0, ring_bits=32, levels=10, max_summands=4)
    x = np.full(100_000, 0.123)  # 1.23 levels: rounds to 1 or 2
    q = spec.lift(spec.quantize(x))
    assert set(np.unique(q)) == {1, 2}
    assert abs(q.mean() - 1.23) < 0.01
    neg = spec.quantize(np.array([-1.0, -0.5, 0.0, 0.5, 1.0, 7.0, -7.0]))
    assert list(spec.lift(neg)) == [-10, -5, 0, 5, 10, 10, -10]
    total = (neg.astype(np.uint64) * 4) & np.uint64((1 << 32) - 1)
    assert list(spec.dequantize(total)) == [-4.0, -2.0, 0.0, 2.0, 4.0, 4.0, -4.0]


def test_quantisation_refuses_non_finite() -> None:
    spec = QuantizationSpec.fit(1.0, 32, 3)
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(QuantizationError):
            spec.quantize(np.array([0.0, bad]))


def test_seeded_source_is_deterministic_and_loud() -> None:
    with pytest.warns(UserWarning, match="deterministic"):
        a = InsecureSeededRandomForTests(7)
    b = InsecureSeededRandomForTests(7, quiet=True)
    assert a.bytes(40) == b.bytes(40)
    assert InsecureSeededRandomForTests(8, quiet=True).bytes(40) != a.bytes(40)


def test_gmac_is_aes_gcm_over_associated_data_and_verification_raises() -> None:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from fedcollm_secure.crypto.mac import MacStream, mac_tag, verify_mac
    from fedcollm_secure.errors import KeyFormatError, MacError

    key, msg = bytes(range(32)), bytes(range(256)) * 1000
    tag = mac_tag(key, msg[:1000], memoryview(msg)[1000:])
    assert tag == AESGCM(key).encrypt(bytes(12), b"", msg)  # GMAC, NIST SP 800-38D
    stream = MacStream(key)
    for i in range(0, len(msg), 4096):
        stream.update(msg[i:i + 4096])
    stream.verify(tag)
    verify_mac(key, tag, msg)
    for bad_key, bad_tag, bad_msg in [(bytes(32), tag, msg), (key, tag[:-1] + b"\0", msg),
                                      (key, tag, msg[:-1]), (key, tag[:15], msg)]:
        with pytest.raises(MacError):
            verify_mac(bad_key, bad_tag, bad_msg)
    with pytest.raises(KeyFormatError):
        mac_tag(bytes(16), msg)


def test_add_many_hands_each_finished_piece_to_then() -> None:
    n = (1 << 16) + 7  # more than one piece
    seeds = [(os.urandom(32), 1), (os.urandom(32), -1), (os.urandom(32), 1)]
    acc = np.arange(n, dtype=np.uint32)
    expected = acc.copy()
    for seed, sign in seeds:
        MaskPRG(n, 32).add_into(expected, seed, sign)
    seen: list[tuple[int, np.ndarray]] = []
    MaskPRG(n, 32).add_many(acc, seeds, then=lambda start, part: seen.append((start,
                                                                             part.copy())))
    assert np.array_equal(acc, expected)
    assert [s for s, _ in seen] == sorted(s for s, _ in seen) and seen[0][0] == 0
    assert np.array_equal(np.concatenate([p for _, p in seen]), expected)


def test_dequantize_into_a_buffer_matches_and_checks_it() -> None:
    spec = QuantizationSpec.fit(clip=4.0, ring_bits=32, max_summands=10)
    ring = spec.quantize(np.linspace(-4, 4, 101))
    out = np.empty(101)
    assert spec.dequantize(ring, out=out) is out
    assert np.array_equal(out, spec.dequantize(ring))
    with pytest.raises(QuantizationError):
        spec.dequantize(ring, out=np.empty(100))
    with pytest.raises(QuantizationError):
        spec.dequantize(ring, out=np.empty(101, dtype=np.float32))
