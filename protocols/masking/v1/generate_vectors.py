#!/usr/bin/env python
"""Regenerate the ``masking/v1`` test vectors from the reference implementation.

Run from the repository root::

    .venv/bin/python protocols/masking/v1/generate_vectors.py

Every value comes from calling ``fedcollm_secure`` itself; all randomness comes from
``InsecureSeededRandomForTests`` with fixed seeds (or from bytes written into the vectors), so
running the script twice writes byte-identical files. ``tests/test_protocol_vectors.py``
checks the implementation against the committed files and never regenerates them.

Conventions of the JSON files (see SPEC.md, "Test vectors"):
  * byte strings are lowercase hex in keys ending ``_hex``;
  * an integer that may reach 2**53 or more is a decimal string (field elements, 64-bit ring
    words); smaller integers are JSON numbers;
  * every file has ``description``, ``version`` (the vector-format version, 1) and ``protocol``.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import math
import struct
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np

from fedcollm_secure import errors
from fedcollm_secure.crypto import InsecureSeededRandomForTests, KdfContext, derive_key
from fedcollm_secure.crypto.randomness import FixedBytesForTests
from fedcollm_secure.crypto.aead import associated_data, open_sealed, seal
from fedcollm_secure.crypto.key_agreement import agree, load_private_key, public_of
from fedcollm_secure.crypto.prg import expand_seed, uniform01
from fedcollm_secure.crypto.quantization import QuantizationSpec
from fedcollm_secure.crypto.shamir import PRIME, Share, reconstruct_secret, split_secret
from fedcollm_secure.crypto.mac import mac_tag
from fedcollm_secure.crypto.signatures import SigningKey
from fedcollm_secure.secagg.masking import MaskingClient, MaskingConfig, MaskingServer, RoundParams
from fedcollm_secure.secagg.masking import graph as graph_mod
from fedcollm_secure.secagg.masking import messages as M
from fedcollm_secure.secagg.masking.config import default_degree
from fedcollm_secure.secagg.tensors import TensorSpec
from fedcollm_secure.wire import SIG_LABEL, Envelope, decode, signature_message

HERE = Path(__file__).resolve().parent
VECTORS = HERE / "vectors"
PROTOCOL = "masking/v1"
FORMAT_VERSION = 1


# --- helpers -----------------------------------------------------------------------------------
def rng(seed: str) -> InsecureSeededRandomForTests:
    return InsecureSeededRandomForTests(seed, quiet=True)


FixedBytes = FixedBytesForTests


def big(v: int) -> int | str:
    """JSON number below 2**53, decimal string from there on."""
    v = int(v)
    return v if -(1 << 53) < v < (1 << 53) else str(v)


def words(arr: np.ndarray) -> list[int | str]:
    return [big(int(x)) for x in np.asarray(arr).reshape(-1).tolist()]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def expect_error(name: str, fn: Any, *args: Any, **kwargs: Any) -> str:
    """Run ``fn`` and check that it raises exactly ``errors.<name>``; return ``name``."""
    cls = getattr(errors, name)
    try:
        fn(*args, **kwargs)
    except cls as exc:
        if type(exc).__name__ != name:
            raise AssertionError(f"expected {name}, got {type(exc).__name__}: {exc}") from None
        return name
    raise AssertionError(f"expected {name}, nothing was raised")


def _scalars(obj: Any) -> bool:
    return isinstance(obj, list) and all(not isinstance(x, (list, dict)) for x in obj)


def _compact(obj: Any) -> bool:
    """Print inline: a list of scalars, or a short list of short lists of scalars."""
    if _scalars(obj):
        return True
    return (isinstance(obj, list) and all(_scalars(x) for x in obj)
            and len(json.dumps(obj)) <= 96)


def dumps(obj: Any, indent: int = 0) -> str:
    """Readable, deterministic JSON: objects one key per line, short scalar lists inline."""
    pad, inner = "  " * indent, "  " * (indent + 1)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{inner}{json.dumps(str(k))}: {dumps(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list):
        if not obj:
            return "[]"
        if _compact(obj):
            return json.dumps(obj, separators=(", ", ": "), allow_nan=False)
        return "[\n" + ",\n".join(inner + dumps(x, indent + 1) for x in obj) + "\n" + pad + "]"
    return json.dumps(obj, allow_nan=False)


def write(name: str, description: str, body: dict[str, Any]) -> None:
    doc = {"description": description, "version": FORMAT_VERSION, "protocol": PROTOCOL, **body}
    (VECTORS / name).write_text(dumps(doc) + "\n", encoding="utf-8")


# --- kdf.json ------------------------------------------------------------------------------
def gen_kdf() -> None:
    r = rng("masking/v1/vectors/kdf")
    cases = []
    session = r.bytes(16)
    ikm = r.bytes(32)
    specs = [
        ("share-encryption key of pair (1, 2)", session, 0, "share-encryption", (1, 2), 32, ikm),
        ("pairwise-mask seed of the same pair and secret", session, 0, "pairwise-mask", (1, 2),
         32, ikm),
        ("pair reversed: derive_key uses the pair as given, so the protocol always sorts it",
         session, 0, "pairwise-mask", (2, 1), 32, ikm),
        ("another round", session, 1, "pairwise-mask", (1, 2), 32, ikm),
        ("large round and node indices (64-bit big-endian)", session, (1 << 63) - 1,
         "pairwise-mask", (7, (1 << 40) + 3), 32, ikm),
        ("empty session, 16-byte input keying material, 64-byte output", b"", 3,
         "share-encryption", (3, 4), 64, r.bytes(16)),
        ("another session", r.bytes(16), 0, "pairwise-mask", (1, 2), 32, ikm),
        ("node 3's reply MAC keys: 32 bytes per stage, in the order advertise_keys, "
         "share_keys, masked_input, consistency_check, unmask", session, 0,
         "client-message-mac", (0, 3), 160, ikm),
    ]
    for desc, sess, rnd, purpose, pair, length, key in specs:
        ctx = KdfContext(protocol=PROTOCOL, version=1, session=sess, round=rnd)
        okm = derive_key(key, ctx, purpose=purpose, pair=pair, length=length)
        cases.append({
            "description": desc, "protocol": PROTOCOL, "version": 1, "session_hex": sess.hex(),
            "round": big(rnd), "purpose": purpose, "pair": [big(pair[0]), big(pair[1])],
            "length": length, "ikm_hex": key.hex(), "salt_hex": ctx.salt().hex(),
            "info_hex": ctx.info(purpose, pair).hex(), "okm_hex": okm.hex()})
    must_fail = []
    ctx_ok = {"protocol": PROTOCOL, "version": 1, "session_hex": session.hex(), "round": 0,
              "purpose": "pairwise-mask", "pair": [1, 2], "length": 32}
    for desc, changes in [
        ("input keying material shorter than 16 bytes", {"ikm_hex": ikm[:15].hex()}),
        ("negative round", {"round": -1, "ikm_hex": ikm.hex()}),
        ("negative pair member", {"pair": [-1, 2], "ikm_hex": ikm.hex()}),
    ]:
        case = {**ctx_ok, **changes, "description": desc}
        ctx = KdfContext(PROTOCOL, 1, bytes.fromhex(case["session_hex"]), case["round"])
        case["expected_error"] = expect_error(
            "CryptoError", derive_key, bytes.fromhex(case["ikm_hex"]), ctx,
            purpose=case["purpose"], pair=tuple(case["pair"]))
        must_fail.append(case)
    write("kdf.json", "HKDF-SHA256 key derivation bound to (protocol, version, session, round, "
          "purpose, pair): salt and info byte strings and output keying material.",
          {"salt_label_hex": b"fedcollm-secure/hkdf-salt/v1".hex(), "cases": cases,
           "must_fail": must_fail})


# --- prg.json ------------------------------------------------------------------------------
def gen_prg() -> None:
    r = rng("masking/v1/vectors/prg")
    seeds = [("all-zero seed: the keystream is RFC 8439 appendix A.1 test vector #1", bytes(32)),
             ("seed 00 01 .. 1f", bytes(range(32))),
             ("random seed", r.bytes(32))]
    cases = []
    for desc, seed in seeds:
        for bits in (32, 20, 64, 33, 8):
            n = 20  # crosses a 64-byte ChaCha20 block boundary for both word sizes
            wbytes = 4 if bits <= 32 else 8
            out = expand_seed(seed, n, bits)
            cases.append({"description": f"{desc}, ring_bits={bits}", "seed_hex": seed.hex(),
                          "ring_bits": bits, "word_bytes": wbytes, "length": n,
                          "keystream_hex": _keystream(seed, n * wbytes).hex(),
                          "words": words(out)})
    u_seed = r.bytes(32)
    uni = uniform01(u_seed, 8)
    must_fail = [
        {"description": "seed of 31 bytes", "seed_hex": bytes(31).hex(), "ring_bits": 32,
         "length": 4, "expected_error": expect_error("CryptoError", expand_seed, bytes(31), 4, 32)},
        {"description": "ring_bits 65", "seed_hex": bytes(32).hex(), "ring_bits": 65, "length": 4,
         "expected_error": expect_error("CryptoError", expand_seed, bytes(32), 4, 65)},
        {"description": "ring_bits 1", "seed_hex": bytes(32).hex(), "ring_bits": 1, "length": 4,
         "expected_error": expect_error("CryptoError", expand_seed, bytes(32), 4, 1)},
    ]
    write("prg.json", "Mask PRG: ChaCha20 keystream (32-byte key = seed, block counter 0, nonce 0) "
          "read as little-endian 32-bit words (ring_bits <= 32) or 64-bit words (ring_bits > 32), "
          "each reduced mod 2**ring_bits; and uniform01 (32-bit words / 2**32).",
          {"cases": cases,
           "uniform01": {"seed_hex": u_seed.hex(), "length": 8,
                         "words": words(np.frombuffer(_keystream(u_seed, 32), "<u4")),
                         "values": [float(x) for x in uni]},
           "must_fail": must_fail})


def _keystream(seed: bytes, n: int) -> bytes:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
    enc = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    return enc.update(bytes(n))


# --- aead.json -----------------------------------------------------------------------------
def gen_aead() -> None:
    r = rng("masking/v1/vectors/aead")
    session = r.bytes(16)
    key = r.bytes(32)
    b_share = Share(3, int.from_bytes(r.bytes(32), "big")).to_bytes()
    s_share = Share(3, int.from_bytes(r.bytes(32), "big")).to_bytes()
    share_pt = M.share_plaintext(1, 3, b_share, s_share)
    cases = []
    for desc, pt, rnd, src, dst in [
        ("a share plaintext from node 1 to node 3 (the protocol's use)", share_pt, 5, 1, 3),
        ("empty plaintext", b"", 0, 2, 1),
        ("large round and indices", b"hello", (1 << 63) - 1, (1 << 63) - 1, 1),
    ]:
        nonce = r.bytes(12)
        ad = associated_data(M.AD_SHARE, session, rnd, src, dst)
        sealed = seal(key, pt, ad, FixedBytes(nonce))
        assert open_sealed(key, sealed, ad) == pt
        cases.append({"description": desc, "key_hex": key.hex(), "nonce_hex": nonce.hex(),
                      "ad": {"label": M.AD_SHARE, "session_hex": session.hex(), "round": big(rnd),
                             "src": big(src), "dst": big(dst)},
                      "ad_hex": ad.hex(), "plaintext_hex": pt.hex(), "sealed_hex": sealed.hex()})
    base = cases[0]
    sealed = bytes.fromhex(base["sealed_hex"])

    def flip(data: bytes, offset: int) -> bytes:
        b = bytearray(data)
        b[offset] ^= 1
        return bytes(b)

    ad0 = base["ad"]
    other_session = r.bytes(16).hex()
    mf = []
    for desc, sealed_x, ad_x, key_x, err in [
        ("flipped bit in the nonce", flip(sealed, 0), ad0, key, "DecryptionError"),
        ("flipped bit in the ciphertext", flip(sealed, 20), ad0, key, "DecryptionError"),
        ("flipped bit in the tag", flip(sealed, len(sealed) - 1), ad0, key, "DecryptionError"),
        ("wrong AD: src and dst swapped", sealed, {**ad0, "src": 3, "dst": 1}, key,
         "DecryptionError"),
        ("wrong AD: other src", sealed, {**ad0, "src": 2}, key, "DecryptionError"),
        ("wrong AD: other dst", sealed, {**ad0, "dst": 4}, key, "DecryptionError"),
        ("wrong AD: other round (replay)", sealed, {**ad0, "round": 6}, key, "DecryptionError"),
        ("wrong AD: other session", sealed, {**ad0, "session_hex": other_session}, key,
         "DecryptionError"),
        ("wrong AD: other label", sealed, {**ad0, "label": "masking/v2/share"}, key,
         "DecryptionError"),
        ("wrong key", sealed, ad0, flip(key, 0), "DecryptionError"),
        ("sealed message shorter than nonce + tag (27 bytes)", sealed[:27], ad0, key,
         "DecryptionError"),
        ("31-byte key", sealed, ad0, key[:31], "KeyFormatError"),
    ]:
        ad_bytes = associated_data(ad_x["label"], bytes.fromhex(ad_x["session_hex"]),
                                   int(ad_x["round"]), int(ad_x["src"]), int(ad_x["dst"]))
        mf.append({"description": desc, "key_hex": key_x.hex(), "ad": ad_x,
                   "ad_hex": ad_bytes.hex(), "sealed_hex": sealed_x.hex(),
                   "expected_error": expect_error(err, open_sealed, key_x, sealed_x, ad_bytes)})
    write("aead.json", "ChaCha20-Poly1305 share encryption: sealed = nonce(12) || ciphertext || "
          "tag(16); associated data = encode_fields(label, session, u64 round || u64 src || "
          "u64 dst).", {"cases": cases, "must_fail": mf})


# --- shamir.json ---------------------------------------------------------------------------
def gen_shamir() -> None:
    split_cases = []
    for desc, seed, threshold, xs in [
        ("threshold 3 of 5 holders", "masking/v1/vectors/shamir/1", 3, [1, 2, 3, 4, 5]),
        ("threshold 2, holder indices need not be contiguous", "masking/v1/vectors/shamir/2", 2,
         [2, 7, 10]),
        ("threshold 1: every share is the secret itself", "masking/v1/vectors/shamir/3", 1,
         [1, 2]),
        ("threshold 4, large holder indices", "masking/v1/vectors/shamir/4", 4,
         [1, 9, (1 << 40) + 1, (1 << 63) - 1, 1000]),
    ]:
        secret = rng(seed + "/secret").bytes(32)
        shares = split_secret(secret, threshold, xs, rng(seed))
        # the coefficients come from the same stream: 33-byte big-endian draws, masked to 257
        # bits, rejected unless < PRIME
        r, coeffs, draws = rng(seed), [], []
        for _ in range(threshold - 1):
            while True:
                raw = r.bytes(33)
                v = int.from_bytes(raw, "big") & ((1 << 257) - 1)
                draws.append({"draw_hex": raw.hex(), "accepted": v < PRIME})
                if v < PRIME:
                    coeffs.append(v)
                    break
        poly = [int.from_bytes(secret, "big"), *coeffs]
        for x, sh in shares.items():
            assert sh.y == sum(c * pow(x, i, PRIME) for i, c in enumerate(poly)) % PRIME
        split_cases.append({
            "description": desc, "secret_hex": secret.hex(), "threshold": threshold,
            "xs": [big(x) for x in xs], "rng_seed": seed, "rng_draws": draws,
            "coefficients": [str(c) for c in coeffs],
            "shares": [{"x": big(x), "y": str(shares[x].y), "share_hex": shares[x].to_bytes().hex()}
                       for x in xs]})
    base = split_cases[0]
    sh = [bytes.fromhex(s["share_hex"]) for s in base["shares"]]
    secret = bytes.fromhex(base["secret_hex"])
    commit = hashlib.sha256(secret).hexdigest()
    bad = bytearray(sh[1])
    bad[-1] ^= 1
    bad_share = bytes(bad)

    def rec(shares: list[bytes], t: int, check: str | None) -> bytes:
        c = None if check is None else (lambda s: hashlib.sha256(s).hexdigest() == check)
        return reconstruct_secret([Share.from_bytes(s) for s in shares], t, check=c)

    recon = []
    for desc, shares, check in [
        ("the first three shares", sh[:3], None),
        ("three other shares, in any order", [sh[4], sh[1], sh[3]], None),
        ("all five shares (the first three by x are used)", sh, None),
        ("four shares, one corrupted, with a SHA-256 check of the secret: another subset "
         "verifies", [sh[0], bad_share, sh[2], sh[3]], commit),
    ]:
        out = rec(shares, 3, check)
        assert out == secret
        recon.append({"description": desc, "threshold": 3, "shares_hex": [s.hex() for s in shares],
                      "check_sha256_hex": check, "secret_hex": out.hex()})
    silent = rec([sh[0], bad_share, sh[2]], 3, None)
    assert silent != secret
    recon.append({"description": "a corrupted share without a check yields a wrong secret "
                  "silently (the protocol always passes a check)", "threshold": 3,
                  "shares_hex": [sh[0].hex(), bad_share.hex(), sh[2].hex()],
                  "check_sha256_hex": None, "secret_hex": silent.hex()})
    mf_split = []
    for desc, secret_x, t, xs, err in [
        ("threshold 0", secret, 0, [1, 2, 3], "SecretSharingError"),
        ("threshold above the number of holders", secret, 4, [1, 2, 3], "SecretSharingError"),
        ("duplicate holder index", secret, 2, [1, 2, 2], "SecretSharingError"),
        ("holder index 0 (would reveal the secret)", secret, 2, [0, 1, 2], "SecretSharingError"),
        ("holder index 2**63", secret, 2, [1, 1 << 63], "SecretSharingError"),
        ("31-byte secret", secret[:31], 2, [1, 2], "SecretSharingError"),
    ]:
        mf_split.append({"description": desc, "secret_hex": secret_x.hex(), "threshold": t,
                         "xs": [big(x) for x in xs],
                         "expected_error": expect_error(err, split_secret, secret_x, t, xs,
                                                        rng("unused"))})
    mf_rec = []
    for desc, shares, t, check, err in [
        ("too few shares", sh[:2], 3, None, "SecretSharingError"),
        ("duplicate x", [sh[0], sh[0], sh[1]], 3, None, "SecretSharingError"),
        ("one corrupted share among exactly threshold shares, with a check", [sh[0], bad_share,
                                                                           sh[2]], 3, commit,
         "ShareVerificationError"),
    ]:
        mf_rec.append({"description": desc, "threshold": t, "shares_hex": [s.hex() for s in shares],
                       "check_sha256_hex": check,
                       "expected_error": expect_error(err, rec, shares, t, check)})
    mf_dec = []
    for desc, raw in [
        ("40 bytes", sh[0][:40]),
        ("42 bytes", sh[0] + b"\x00"),
        ("x = 0", (0).to_bytes(8, "big") + sh[0][8:]),
        ("x = 2**63", (1 << 63).to_bytes(8, "big") + sh[0][8:]),
        ("y = PRIME", (1).to_bytes(8, "big") + PRIME.to_bytes(33, "big")),
        ("y = 2**264 - 1", (1).to_bytes(8, "big") + b"\xff" * 33),
    ]:
        mf_dec.append({"description": desc, "share_hex": raw.hex(),
                       "expected_error": expect_error("SecretSharingError", Share.from_bytes, raw)})
    y_max = (1).to_bytes(8, "big") + (PRIME - 1).to_bytes(33, "big")
    assert Share.from_bytes(y_max).y == PRIME - 1  # the largest valid y decodes
    write("shamir.json", "Shamir sharing of 32-byte secrets over GF(p), p = 2**256 + 297; "
          "share = x (u64 big-endian) || y (33 bytes big-endian); coefficients drawn by rejection "
          "sampling of 33-byte big-endian integers masked to 257 bits.",
          {"prime": str(PRIME), "split": split_cases, "reconstruct": recon,
           "must_fail": {"split": mf_split, "reconstruct": mf_rec, "decode_share": mf_dec}})


# --- quantization.json ---------------------------------------------------------------------
def _spec_json(q: QuantizationSpec) -> dict[str, Any]:
    return {"clip": q.clip, "ring_bits": q.ring_bits, "levels": big(q.levels),
            "max_summands": q.max_summands}


def gen_quantization() -> None:
    r = rng("masking/v1/vectors/quantization")
    kat = []
    specs = [
        ("32-bit ring, 4 summands, the most levels that fit", QuantizationSpec.fit(4.0, 32, 4)),
        ("20-bit ring, 10 summands", QuantizationSpec.fit(1.0, 20, 10)),
        ("64-bit ring (levels capped at 2**52)", QuantizationSpec.fit(2.5, 64, 3)),
        ("few levels: the rounding is visible", QuantizationSpec(1.0, 16, 4, 8)),
    ]
    values = [0.0, 0.3, -0.3, 1.0, -1.0, 0.123456789, -2.75, 2.5, 4.0, -4.0, 5.0, -1e9, 1e-12]
    for desc, q in specs:
        seed = r.bytes(32)
        out = q.quantize(np.array(values), FixedBytes(seed))
        u_words = np.frombuffer(_keystream(seed, 4 * len(values)), "<u4")
        kat.append({"description": desc, "spec": _spec_json(q), "step": q.step,
                    "values": values, "uniform_seed_hex": seed.hex(),
                    "uniform_words": words(u_words),
                    "uniform": [float(x) for x in uniform01(seed, len(values))],
                    "ring": words(out), "lifted": words(q.lift(out)),
                    "dequantized": [float(x) for x in q.dequantize(out)]})
    sums = []
    for desc, q, n in [("sum of 4 inputs in a 32-bit ring", QuantizationSpec.fit(4.0, 32, 4), 4),
                       ("sum of 10 inputs in a 20-bit ring, worst-case magnitudes",
                        QuantizationSpec.fit(1.0, 20, 10), 10),
                       ("sum of 3 inputs in a 64-bit ring", QuantizationSpec.fit(2.5, 64, 3), 3)]:
        inputs, seeds, rings = [], [], []
        acc = np.zeros(6, dtype=q.dtype)
        for i in range(n):
            v = (np.frombuffer(r.bytes(48), "<u8").astype(np.float64) / 2.0**64 * 2 - 1)
            v = v * q.clip * 1.2  # some values beyond the clip
            if i == 0 and n == 10:
                v = np.array([q.clip] * 3 + [-q.clip] * 3)
            seed = r.bytes(32)
            ring = q.quantize(v, FixedBytes(seed))
            acc += ring
            inputs.append([float(x) for x in v])
            seeds.append(seed.hex())
            rings.append(words(ring))
        if q.ring_bits not in (32, 64):
            acc &= q.dtype((1 << q.ring_bits) - 1)
        dec = q.dequantize(acc)
        true = np.clip(np.array(inputs), -q.clip, q.clip).sum(axis=0)
        assert np.all(np.abs(dec - true) < q.error_bound(n))
        sums.append({"description": desc, "spec": _spec_json(q), "inputs": inputs,
                     "uniform_seeds_hex": seeds, "rings": rings, "ring_sum": words(acc),
                     "decoded_sum": [float(x) for x in dec],
                     "clipped_sum": [float(x) for x in true],
                     "error_bound": q.error_bound(n)})
    fits = []
    for clip, bits, n in [(4.0, 32, 4), (4.0, 32, 1000), (1.0, 20, 10), (1.0, 64, 2), (8.0, 8, 3),
                          (8.0, 33, 5)]:
        fits.append({"clip": clip, "ring_bits": bits, "max_summands": n,
                     "levels": big(QuantizationSpec.fit(clip, bits, n).levels)})
    mf_spec = []
    for desc, args in [
        ("ring overflow: 4 summands x 2**29 levels > 2**31 - 1", (1.0, 32, 1 << 29, 4)),
        ("ring overflow: 2 summands x 64 levels > 2**7 - 1", (1.0, 8, 64, 2)),
        ("clip 0", (0.0, 32, 10, 2)),
        ("negative clip", (-1.0, 32, 10, 2)),
        ("levels 0", (1.0, 32, 0, 2)),
        ("max_summands 0", (1.0, 32, 10, 0)),
        ("levels above 2**52", (1.0, 64, (1 << 52) + 1, 1)),
        ("ring_bits 65", (1.0, 65, 10, 2)),
        ("ring_bits 1", (1.0, 1, 1, 1)),
    ]:
        mf_spec.append({"description": desc, "spec": {
            "clip": args[0], "ring_bits": args[1], "levels": big(args[2]),
            "max_summands": args[3]},
            "expected_error": expect_error("ConfigError", QuantizationSpec, *args)})
    mf_val = []
    q = QuantizationSpec.fit(4.0, 32, 4)
    for desc, v in [("NaN input", "NaN"), ("+infinity input", "Infinity"),
                    ("-infinity input", "-Infinity")]:
        arr = np.array([0.5, float(v.replace("Infinity", "inf")), 0.25])
        mf_val.append({"description": desc, "spec": _spec_json(q),
                       "values": [0.5, v, 0.25],
                       "expected_error": expect_error("QuantizationError", q.quantize, arr,
                                                      FixedBytes(bytes(32)))})
    write("quantization.json", "Fixed-point quantisation into Z_(2**ring_bits): clip to "
          "[-clip, clip] and multiply by (levels / clip) (as clamp(v * scale, -levels, levels)), "
          "then round stochastically in fixed point: F = min(32, 62 - bit_length(levels)), "
          "Y = trunc(y * 2**F), k = (Y + (word >> (32 - F))) >> F (arithmetic shift; words are "
          "the ChaCha20 keystream of a fresh 32-byte seed), reduce mod 2**ring_bits; "
          "centred lift and dequantisation (lift * (clip / levels)). Non-finite values in "
          "must_fail.values are the strings NaN / Infinity / -Infinity.",
          {"kat": kat, "sums": sums, "fit": fits,
           "must_fail": {"spec": mf_spec, "values": mf_val}})


# --- mask_cancellation.json ----------------------------------------------------------------
def gen_mask_cancellation() -> None:
    r = rng("masking/v1/vectors/mask-cancellation")
    session = r.bytes(16)
    round_ = 3
    nodes = [1, 2, 5, 9]
    priv = {u: r.bytes(32) for u in nodes}
    pub = {u: public_of(priv[u]) for u in nodes}
    ctx = M.kdf_context(session, round_)
    length = 8
    pairs = []
    seeds = {}
    for i, u in enumerate(nodes):
        for v in nodes[i + 1:]:
            shared = agree(load_private_key(priv[u]), pub[v])
            assert shared == agree(load_private_key(priv[v]), pub[u])
            seed = derive_key(shared, ctx, purpose=M.PURPOSE_PAIR_MASK, pair=M.ordered(u, v))
            share_key = derive_key(shared, ctx, purpose=M.PURPOSE_SHARE_KEY, pair=M.ordered(u, v))
            seeds[(u, v)] = seeds[(v, u)] = seed
            pairs.append({"pair": [u, v], "shared_secret_hex": shared.hex(),
                          "mask_seed_hex": seed.hex(), "share_key_hex": share_key.hex(),
                          "prg32": words(expand_seed(seed, length, 32))})
    rings = {}
    for bits in (32, 20, 64):
        dtype = np.uint32 if bits <= 32 else np.uint64
        per_node, total = {}, np.zeros(length, dtype=dtype)
        for u in nodes:
            m = np.zeros(length, dtype=dtype)
            for v in nodes:
                if v != u:
                    p = expand_seed(seeds[(u, v)], length, bits)
                    m = m + p if M.mask_sign(u, v) > 0 else m - p
            if bits not in (32, 64):
                m &= dtype((1 << bits) - 1)
            per_node[str(u)] = words(m)
            total += m
        if bits not in (32, 64):
            total &= dtype((1 << bits) - 1)
        assert not total.any()
        rings[str(bits)] = {"pairwise_mask": per_node, "sum": words(total)}
    mf = [
        {"description": "all-zero (low-order) peer public key: X25519 output is all zero",
         "private_hex": priv[1].hex(), "peer_public_hex": bytes(32).hex(),
         "expected_error": expect_error("CryptoError", agree, load_private_key(priv[1]),
                                        bytes(32))},
        {"description": "31-byte peer public key", "private_hex": priv[1].hex(),
         "peer_public_hex": pub[2][:31].hex(),
         "expected_error": expect_error("KeyFormatError", agree, load_private_key(priv[1]),
                                        pub[2][:31])},
        {"description": "33-byte peer public key", "private_hex": priv[1].hex(),
         "peer_public_hex": (pub[2] + b"\x00").hex(),
         "expected_error": expect_error("KeyFormatError", agree, load_private_key(priv[1]),
                                        pub[2] + b"\x00")},
    ]
    write("mask_cancellation.json", "Pairwise masks: X25519 shared secrets, seeds s_uv = "
          "HKDF(purpose 'pairwise-mask', pair (min, max)), node u's pairwise mask "
          "sum_v sign(u, v) * PRG(s_uv) with sign = +1 if u < v else -1; the masks of all nodes "
          "sum to 0 mod 2**ring_bits.",
          {"session_hex": session.hex(), "round": round_, "length": length,
           "nodes": [{"node": u, "private_hex": priv[u].hex(), "public_hex": pub[u].hex()}
                     for u in nodes],
           "pairs": pairs, "rings": rings, "must_fail": mf})


# --- encodings.json ------------------------------------------------------------------------
def gen_encodings() -> None:
    r = rng("masking/v1/vectors/encodings")
    session = r.bytes(16)
    signer = SigningKey(r.bytes(32))
    env = Envelope(protocol=PROTOCOL, stage=M.MASKED_INPUT, session=session, round=2, src=3, dst=0,
                   fields={M.F_LENGTH: 3, "z": "\u00e9", "a": [1.5, 1e-05, 1e16, 4.0]},
                   body=np.array([1, 2, 0xFFFFFFFF], "<u4").tobytes())
    unsigned = env.encode()
    signed = env.encode(signer)
    assert decode(signed).fields == env.fields
    sig_msg = signature_message(signed[:-64])
    cipher_pk, mask_pk = public_of(r.bytes(32)), public_of(r.bytes(32))
    sig_pk = signer.verify_key.raw
    adv_params = {M.F_N_NODES: 4, M.F_THRESHOLD: 3, M.F_SHARE_THRESHOLD: 3, M.F_GRAPH: "complete",
              M.F_RING_BITS: 32, M.F_LEVELS: 536870911, M.F_CLIP: 4.0, M.F_MAX_WEIGHT: 1.0,
              M.F_SPEC: [["bias", [2]], ["weight", [2, 2]]], M.F_NEIGHBOURS: [1, 2, 4],
              M.F_SERVER_PK: _b64(public_of(r.bytes(32))), M.F_CONSISTENCY: False}
    digest = M.params_digest(adv_params)
    bundle_msg = M.KeyBundle.signed_bytes(session, 2, 3, cipher_pk, mask_pk, sig_pk, digest)
    bundle_sig = signer.sign(bundle_msg)
    bundle = M.KeyBundle(3, cipher_pk, mask_pk, sig_pk, bundle_sig)
    b_share = Share(4, int.from_bytes(r.bytes(32), "big")).to_bytes()
    s_share = Share(4, int.from_bytes(r.bytes(32), "big")).to_bytes()
    b_seed = r.bytes(32)
    server_secret = r.bytes(32)
    mac_key = M.client_mac_keys(server_secret, M.kdf_context(session, 2), 3)[M.MASKED_INPUT]
    maced = env.encode(mac_key=mac_key)
    assert decode(maced).mac == maced[-16:]
    graphs = []
    for n, degree, seed in [(10, 4, "masking/v1/vectors/graph/1"), (7, 2, "masking/v1/vectors/"
                                                                           "graph/2")]:
        nodes = list(range(1, n + 1))
        perm = graph_mod._random_permutation(nodes, rng(seed))
        g = graph_mod.harary_graph(nodes, degree, rng(seed))
        graphs.append({"nodes": nodes, "degree": degree, "rng_seed": seed, "ring_order": perm,
                       "neighbours": {str(u): sorted(g[u]) for u in nodes}})
    params = []
    for n, cfg, threshold in [
        (4, {}, None), (2, {}, None), (3, {"graph": "k_regular"}, None),
        (10, {"graph": "k_regular", "degree": 4, "ring_bits": 20, "clip": 1.0}, None),
        (100, {"graph": "k_regular"}, None), (100, {"graph": "k_regular"}, 60),
        (10, {"graph": "k_regular", "share_threshold": 5}, None),
        (5, {"max_weight": 2.0, "clip": 0.5, "ring_bits": 64}, 3),
    ]:
        p = RoundParams.resolve(MaskingConfig.from_dict(cfg), n, threshold)
        params.append({"n_nodes": n, "config": cfg, "threshold_argument": threshold,
                       "threshold": p.threshold, "share_threshold": p.share_threshold,
                       "graph": p.graph, "degree": p.degree, "values": _spec_json(p.values),
                       "weight": _spec_json(p.weight)})
    test_rng = []
    for seed in [0, -1, 12345, "masking/v1", b"\x00\x01"]:
        s = seed.hex() if isinstance(seed, bytes) else seed
        test_rng.append({"seed": s, "seed_kind": type(seed).__name__,
                         "first_64_bytes_hex": InsecureSeededRandomForTests(seed, quiet=True)
                         .bytes(64).hex()})
    write("encodings.json", "Byte encodings shared by every stage: envelope, signature message, "
          "key bundle, share plaintext, self-mask commitment; parameter resolution, default "
          "degree, Harary graphs; and the deterministic test RNG used by the other vectors.", {
              "envelope": {
                  "protocol": PROTOCOL, "stage": env.stage, "session_hex": session.hex(),
                  "round": 2, "src": 3, "dst": 0, "fields": env.fields,
                  "body_hex": env.body.hex(), "header_json": env.header_json().decode(),
                  "unsigned_hex": unsigned.hex(), "signing_key_hex": signer.private_bytes().hex(),
                  "verify_key_hex": sig_pk.hex(), "signature_label_hex": SIG_LABEL.hex(),
                  "signature_message_hex": sig_msg.hex(), "signed_hex": signed.hex(),
                  "mac_shared_secret_hex": server_secret.hex(), "mac_node": 3,
                  "mac_key_hex": mac_key.hex(), "maced_hex": maced.hex()},
              "key_bundle": {
                  "session_hex": session.hex(), "round": 2, "node": 3,
                  "cipher_pk_hex": cipher_pk.hex(), "mask_pk_hex": mask_pk.hex(),
                  "sig_pk_hex": sig_pk.hex(), "signing_key_hex": signer.private_bytes().hex(),
                  "advertised_params": adv_params, "params_digest_hex": digest.hex(),
                  "signed_bytes_hex": bundle_msg.hex(), "signature_hex": bundle_sig.hex(),
                  "bundle_hex": bundle.to_bytes().hex()},
              "share_plaintext": {"src": 3, "dst": 4, "b_share_hex": b_share.hex(),
                                  "s_share_hex": s_share.hex(),
                                  "plaintext_hex": M.share_plaintext(3, 4, b_share, s_share).hex(),
                                  "sealed_size": M.SEALED_SHARE_SIZE},
              "b_commitment": {"session_hex": session.hex(), "round": 2, "node": 3,
                               "b_seed_hex": b_seed.hex(),
                               "commitment_hex": M.b_commitment(session, 2, 3, b_seed).hex()},
              "default_degree": {str(n): default_degree(n) for n in
                                 [2, 3, 4, 5, 8, 9, 10, 16, 17, 100, 1000, 10000]},
              "harary_graphs": graphs, "round_params": params, "test_rng": test_rng})


# --- protocol runs (end_to_end.json and must_fail.json) -------------------------------------
_K_REGULAR = {
    "config": {"graph": "k_regular", "degree": 4, "ring_bits": 20, "clip": 1.0},
    "threshold": None,
    "round": 0,
    "clients": [f"c{i:02d}" for i in range(1, 11)],
    "weights": {f"c{i:02d}": [1.0, 0.25, 0.5, 1.0, 0.75][i % 5] for i in range(1, 11)},
    "inputs": {f"c{i:02d}": {"delta": [round(math.sin(i * k + 1) * 1.3, 6) for k in range(5)]}
               for i in range(1, 11)},
}
SCENARIOS: dict[str, dict[str, Any]] = {
    "complete-4": {
        "description": "SecAgg on the complete graph: 4 clients, threshold 3 (default), 32-bit "
                       "ring, clip 4.0, max_weight 2.0 (so values are quantised with clip 8.0); "
                       "c3 answers share_keys and then drops out, so the server reconstructs "
                       "c3's mask key from the survivors' s-shares and removes its pairwise "
                       "masks.",
        "config": {"max_weight": 2.0},
        "threshold": None,
        "session_hex": "6d61736b696e672f76312f653265412e",
        "round": 7,
        "clients": ["c1", "c2", "c3", "c4"],
        "weights": {"c1": 1.0, "c2": 0.5, "c3": 2.0, "c4": 1.5},
        "inputs": {
            "c1": {"bias": [0.25, -1.5], "weight": [[0.5, -0.125], [3.0, 5.0]]},
            "c2": {"bias": [1.0, 2.0], "weight": [[-4.5, 0.75], [0.1, -0.2]]},
            "c3": {"bias": [-3.0, 0.5], "weight": [[1.25, 2.5], [-0.3, 0.0]]},
            "c4": {"bias": [0.0, -0.0625], "weight": [[-1.0, 1.0], [2.2, -3.3]]},
        },
        "drop": {"c3": "masked_input"},
    },
    "k-regular-10": {
        "description": "SecAgg+ on a random 4-regular Harary graph: 10 clients c01..c10 (node "
                       "indices 1..10), threshold 6 (default), share threshold 3 (default), "
                       "20-bit ring, clip 1.0. The client at ring position 0 never answers "
                       "share_keys, its ring neighbour (position 1) never answers masked_input "
                       "(mask key reconstructed), and the client at position 5, adjacent to "
                       "neither, never answers unmask (its input stays in the sum; its self-mask "
                       "seed is reconstructed from its neighbours' shares).",
        **copy.deepcopy(_K_REGULAR),
        "session_hex": "6d61736b696e672f76312f653265422e",
        "drop_ring_positions": {"0": M.SHARE_KEYS, "1": M.MASKED_INPUT, "5": M.UNMASK},
    },
    "k-regular-10-pruned": {
        "description": "As k-regular-10 with other keys: the clients at ring positions 8, 9 and 1 "
                       "never answer advertise_keys, so the client at position 0 keeps one live "
                       "neighbour (+1 < share threshold 3) and the server prunes it before "
                       "share_keys; the other 6 (= threshold) complete the round.",
        **copy.deepcopy(_K_REGULAR),
        "session_hex": "6d61736b696e672f76312f653265432e",
        "drop_ring_positions": {"8": M.ADVERTISE_KEYS, "9": M.ADVERTISE_KEYS,
                                "1": M.ADVERTISE_KEYS},
    },
}


CHECKED = "complete-4-checked"
# used by must_fail.json only: peers check bundle signatures only with the consistency check
MUST_FAIL_SCENARIOS: dict[str, dict[str, Any]] = {
    CHECKED: {
        **copy.deepcopy(SCENARIOS["complete-4"]),
        "description": "As complete-4 with the consistency check on (so that peers check each "
                       "other's bundle signatures; without it the shares' associated data "
                       "binds the bundles instead).",
        "config": {"max_weight": 2.0, "consistency_check": True},
        "session_hex": "6d61736b696e672f76312f653265442e",
    },
}


def _arrays(inputs: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: np.array(v, dtype=np.float64) for k, v in inputs.items()}


def seeds_of(name: str, sc: dict[str, Any]) -> dict[str, str]:
    return {"server": f"masking/v1/vectors/{name}/server",
            **{c: f"masking/v1/vectors/{name}/{c}" for c in sc["clients"]}}


def build(name: str, sc: dict[str, Any]) -> tuple[MaskingServer, dict[str, MaskingClient]]:
    config = MaskingConfig.from_dict(sc["config"])
    seeds = seeds_of(name, sc)
    session = bytes.fromhex(sc["session_hex"])
    updates = {c: _arrays(sc["inputs"][c]) for c in sc["clients"]}
    spec = TensorSpec.of(updates[sc["clients"][0]])
    server = MaskingServer(sc["clients"], spec, config=config, threshold=sc["threshold"],
                           rng=rng(seeds["server"]), session=session, round_=sc["round"])
    clients = {c: MaskingClient(c, updates[c], weight=sc["weights"][c], config=config,
                                rng=rng(seeds[c]), session=session, round_=sc["round"])
               for c in sc["clients"]}
    return server, clients


def resolve_scenario(name: str, sc: dict[str, Any]) -> dict[str, Any]:
    """Fix 'drop' of a k-regular scenario from the ring order of the server's Harary graph."""
    sc = copy.deepcopy(sc)
    positions = sc.pop("drop_ring_positions", None)
    if positions is not None:
        server, _ = build(name, {**sc, "drop": None})
        nodes = sorted(server.ids)
        ring = graph_mod._random_permutation(nodes, rng(seeds_of(name, sc)["server"]))
        assert graph_mod.harary_graph(nodes, sc["config"]["degree"],
                                      rng(seeds_of(name, sc)["server"])) == server.graph
        sc["ring_order"] = ring
        sc["drop"] = {server.ids[ring[int(pos)]]: stage for pos, stage in positions.items()}
    return sc


def run(name: str, sc: dict[str, Any]) -> tuple[MaskingServer, dict[str, MaskingClient],
                                                list[dict[str, Any]]]:
    """An honest run; clients in sc['drop'] vanish from the named stage on."""
    server, clients = build(name, sc)
    log: list[dict[str, Any]] = []
    drop = sc["drop"] or {}
    gone: set[str] = set()
    while (req := server.next_requests()) is not None:
        replies = {}
        for cid, msg in req.messages.items():
            log.append({"stage": req.stage, "direction": "request", "client": cid,
                        "node": server.node_of[cid], "sha256": sha256_hex(msg), "hex": msg.hex()})
            if cid in gone or drop.get(cid) == req.stage:
                gone.add(cid)
                continue
            reply = clients[cid].process(msg)
            replies[cid] = reply
            log.append({"stage": req.stage, "direction": "reply", "client": cid,
                        "node": server.node_of[cid], "sha256": sha256_hex(reply),
                        "hex": reply.hex()})
        server.receive(req.stage, replies)
    return server, clients, log


def _all_ones(bits: int) -> int:
    return (1 << bits) - 1 if bits < 64 else 0xFFFFFFFFFFFFFFFF


def _mask_parts(client: MaskingClient) -> tuple[np.ndarray, np.ndarray]:
    """Recompute a contributor's self mask and pairwise mask (debug fields of the vector)."""
    bits = client.values_q.ring_bits
    n = client.spec.size + 1
    dtype = client.values_q.dtype
    ctx = M.kdf_context(client.session or b"", client.round or 0)
    self_mask = expand_seed(client.b_seed, n, bits)
    pair = np.zeros(n, dtype=dtype)
    for v in sorted(client.peers):
        seed = derive_key(agree(client.mask_keys.private, client.bundles[v].mask_pk), ctx,
                          purpose=M.PURPOSE_PAIR_MASK, pair=M.ordered(client.node, v))
        p = expand_seed(seed, n, bits)
        pair = pair + p if M.mask_sign(client.node, v) > 0 else pair - p
    return self_mask, pair & dtype(_all_ones(bits))


def instance_vector(name: str, sc: dict[str, Any]) -> dict[str, Any]:
    server, clients, log = run(name, sc)
    res = server.result()
    p = server.params
    bits = p.values.ring_bits
    dtype = p.values.dtype
    contributors = [server.ids[u] for u in server.contributors]
    ring_sum = np.zeros(server.length, dtype=dtype)
    parties: dict[str, Any] = {}
    for cid in sc["clients"]:
        c = clients[cid]
        info: dict[str, Any] = {"node": server.node_of[cid],
                                "signing_key_hex": c.signer.private_bytes().hex()}
        if hasattr(c, "cipher_keys"):
            info["cipher_sk_hex"] = c.cipher_keys.private_bytes().hex()
            info["mask_sk_hex"] = c.mask_keys.private_bytes().hex()
        if hasattr(c, "b_seed"):
            info["b_seed_hex"] = c.b_seed.hex()
        if cid in contributors:
            reply = next(m["hex"] for m in log if (m["stage"], m["direction"], m["client"])
                         == (M.MASKED_INPUT, "reply", cid))
            masked = np.frombuffer(parse_message(bytes.fromhex(reply))[1],
                                   np.dtype(dtype).newbyteorder("<")).astype(dtype)
            self_mask, pair = _mask_parts(c)
            y = (masked - self_mask - pair) & dtype(_all_ones(bits))
            ring_sum += y
            info["peers"] = sorted(c.peers)
            info["quantized"] = words(y)
            info["self_mask"] = words(self_mask)
            info["pairwise_mask"] = words(pair)
            info["masked"] = words(masked)
        info["revealed"] = c.revealed
        parties[cid] = info
    ring_sum &= dtype(_all_ones(bits))
    flat = np.concatenate([np.asarray(res.sum[n]).reshape(-1) for n, _ in server.spec.entries])
    assert np.array_equal(p.values.dequantize(ring_sum[:-1]), flat)
    assert float(p.weight.dequantize(ring_sum[-1:])[0]) == res.weight_total
    clip = sc["config"].get("clip", 4.0)
    plain = sum(np.clip(np.concatenate([np.asarray(v, float).reshape(-1) for _, v in
                                        sorted(sc["inputs"][c].items())]), -clip, clip)
                * sc["weights"][c] for c in contributors)
    bound = p.values.error_bound(len(contributors))
    assert np.all(np.abs(flat - plain) < bound)
    wsum = sum(sc["weights"][c] for c in contributors)
    assert abs(res.weight_total - wsum) < p.weight.error_bound(len(contributors))
    return {
        "name": name, **sc,
        "rng_seeds": seeds_of(name, sc),
        "tensor_spec": server.spec.to_json(),
        "params": {"n_nodes": p.n_nodes, "threshold": p.threshold,
                   "share_threshold": p.share_threshold, "graph": p.graph, "degree": p.degree,
                   "values": _spec_json(p.values), "weight": _spec_json(p.weight),
                   "length": server.length},
        "nodes": {cid: server.node_of[cid] for cid in sc["clients"]},
        "neighbours": {str(u): sorted(server.graph[u]) for u in sorted(server.graph)},
        "messages": log,
        "parties": parties,
        "result": {
            "survivors": res.survivors, "dropped": res.dropped,
            "late_dropouts": res.stats["late_dropouts"],
            "ring_sum": words(ring_sum),
            "sum": {n: [float(x) for x in np.asarray(v).reshape(-1)] for n, v in res.sum.items()},
            "weight_total": res.weight_total,
            "plaintext_weighted_clipped_sum": [float(x) for x in plain],
            "plaintext_weight_total": wsum,
            "error_bound": bound,
        },
    }


def gen_end_to_end() -> dict[str, dict[str, Any]]:
    scenarios = {name: resolve_scenario(name, sc) for name, sc in SCENARIOS.items()}
    write("end_to_end.json", "Complete protocol runs with deterministic parties. Party P draws "
          "its randomness from InsecureSeededRandomForTests(rng_seeds[P]) in the order given in "
          "SPEC.md; messages are listed in the order the server emits and receives them, with "
          "their SHA-256 and bytes. 'drop' maps a client to the first stage whose request it "
          "never receives (and so never answers). 'parties' holds each client's derived secrets "
          "and, for contributors, the quantised input y, self mask PRG(b), pairwise mask and "
          "masked vector (masked = y + self_mask + pairwise_mask mod 2**ring_bits).",
          {"instances": [instance_vector(name, sc) for name, sc in scenarios.items()]})
    return scenarios


# --- must_fail.json ------------------------------------------------------------------------
def parse_message(data: bytes) -> tuple[dict[str, Any], bytes]:
    data = bytes(data)  # replies may be read-only views (masked inputs are built in place)
    _, _, _, hlen, blen = struct.unpack_from(">3sBBIQ", data)
    return json.loads(data[17:17 + hlen]), data[17 + hlen:17 + hlen + blen]


def encode_message(header: Any, body: bytes, header_text: bytes | None = None) -> bytes:
    h = header_text if header_text is not None else json.dumps(
        header, sort_keys=True, separators=(",", ":")).encode()
    return struct.pack(">3sBBIQ", b"FCS", 1, 0, len(h), len(body)) + h + body


def apply_edits(data: bytes, edits: list[dict[str, Any]], signers: dict[str, SigningKey],
                sender: str, genuine: dict[tuple[str, str, str], bytes],
                mac_keys: Callable[[str, str], bytes] | None = None) -> bytes:
    """Apply the must_fail edit operations (defined in SPEC.md) to a message, in order.
    ``mac_keys(client, stage)`` is that client's one-time MAC key for its ``stage`` reply."""
    for e in edits:
        op = e["op"]
        if op in ("set", "delete", "set_body", "set_header_text"):
            header, body = parse_message(data)
            text = None
            if op == "set_body":
                body = bytes.fromhex(e["hex"])
            elif op == "set_header_text":
                text = e["text"].encode()
            else:
                obj = header
                for k in e["path"][:-1]:
                    obj = obj[k]
                if op == "set":
                    obj[e["path"][-1]] = e["value"]
                else:
                    del obj[e["path"][-1]]
            data = encode_message(header, body, text)  # no trailer; "sign"/"mac" add one
        elif op == "sign":
            key = signers[sender if e["key"] == "sender" else e["key"]]
            b = bytearray(data)
            b[4] |= 1
            data = bytes(b) + key.sign(signature_message(bytes(b)))
        elif op == "mac":
            assert mac_keys is not None
            b = bytearray(data)
            b[4] |= 2
            who = sender if e["key"] == "sender" else e["key"]
            data = bytes(b) + mac_tag(mac_keys(who, parse_message(data)[0]["stage"]), bytes(b))
        elif op == "strip_trailer":
            trailer = 64 if data[4] & 1 else 16 if data[4] & 2 else 0
            b = bytearray(data[:len(data) - trailer])
            b[4] &= 0xFC
            data = bytes(b)
        elif op == "flip_bit":
            b = bytearray(data)
            b[e["offset"]] ^= 1 << e["bit"]
            data = bytes(b)
        elif op == "overwrite":
            b = bytearray(data)
            patch = bytes.fromhex(e["hex"])
            b[e["offset"]:e["offset"] + len(patch)] = patch
            data = bytes(b)
        elif op == "truncate":
            data = data[:e["length"]]
        elif op == "append":
            data = data + bytes.fromhex(e["hex"])
        elif op == "replace_with":
            data = genuine[(e["stage"], e["direction"], e["client"])]
        else:
            raise ValueError(f"unknown edit op {op!r}")
    return data


def client_mac_keys(clients: dict[str, MaskingClient]) -> Callable[[str, str], bytes]:
    """``(client, stage) -> that client's one-time MAC key for its stage reply``."""
    def key(cid: str, stage: str) -> bytes:
        c = clients[cid]
        return c.mac_keys[stage]
    return key


def genuine_messages(log: list[dict[str, Any]]) -> dict[tuple[str, str, str], bytes]:
    """(stage, direction, client) -> bytes of an honest run's log."""
    return {(m["stage"], m["direction"], m["client"]): bytes.fromhex(m["hex"]) for m in log}


def probe(name: str, sc: dict[str, Any], case: dict[str, Any]) -> dict[str, Any]:
    """Run scenario ``name`` honestly except for ``case``; report what was observed.

    ``case['drops']`` (if present) replaces the scenario's drop plan. An edit case replaces
    the message (stage, direction, client) by the edited one.
    """
    drops = case["drops"] if "drops" in case else (sc["drop"] or {})
    genuine: dict[tuple[str, str, str], bytes] = {}
    signers: dict[str, SigningKey] = {}
    mac_keys = None
    if "edits" in case:
        _, clients0, log = run(name, {**sc, "drop": drops})
        genuine = genuine_messages(log)
        signers = {c: clients0[c].signer for c in clients0}
        mac_keys = client_mac_keys(clients0)
    server, clients = build(name, sc)
    gone: set[str] = set()
    while (req := server.next_requests()) is not None:
        replies = {}
        target_stage = case.get("stage") == req.stage
        for cid, msg in req.messages.items():
            if cid in gone or drops.get(cid) == req.stage:
                gone.add(cid)
                continue
            target = target_stage and case.get("client") == cid
            if target and case["direction"] == "request":
                data = apply_edits(msg, case["edits"], signers, "server", genuine, mac_keys)
                out = {"delivered": data}
                try:
                    clients[cid].process(data)
                    out["observed"] = "accepted"
                except Exception as exc:  # noqa: BLE001 - report any class, typed or not
                    out["observed"] = type(exc).__name__
                if case.get("then_deliver_genuine"):
                    try:
                        clients[cid].process(msg)
                        out["then_observed"] = "accepted"
                    except Exception as exc:  # noqa: BLE001
                        out["then_observed"] = type(exc).__name__
                return out
            reply = clients[cid].process(msg)
            if target and case["direction"] == "reply":
                reply = apply_edits(reply, case["edits"], signers, cid, genuine, mac_keys)
                delivered = reply
            replies[cid] = reply
        outcome = "continues"
        try:
            server.receive(req.stage, replies)
        except errors.FedCoLLMSecureError as exc:
            outcome = f"{type(exc).__name__} after {req.stage}"
        if target_stage and case.get("direction") == "reply":
            why = server.rejected.get(case["client"], "")
            return {"delivered": delivered,
                    "observed": why.split(":")[1].strip() if why else "accepted",
                    "round_outcome": outcome}
        if outcome != "continues":
            return {"observed": outcome}
    return {"observed": "completed"}


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _flip(raw: bytes, offset: int) -> bytes:
    b = bytearray(raw)
    b[offset] ^= 1
    return bytes(b)


def gen_must_fail(scenarios: dict[str, dict[str, Any]]) -> None:
    scenarios = {**scenarios, **{n: resolve_scenario(n, sc)
                                 for n, sc in MUST_FAIL_SCENARIOS.items()}}
    name = "complete-4"
    sc = scenarios[name]
    _, clients0, log = run(name, sc)
    genuine = genuine_messages(log)
    signers = {c: clients0[c].signer for c in clients0}

    def hdr(stage: str, direction: str, client: str = "c2") -> dict[str, Any]:
        return parse_message(genuine[(stage, direction, client)])[0]

    RQ, RP = "request", "reply"
    ADV, SK, MI, UM = M.ADVERTISE_KEYS, M.SHARE_KEYS, M.MASKED_INPUT, M.UNMASK
    bundles = hdr(SK, RQ)["fields"][M.F_BUNDLES]
    # c2 is node 2; its peers are nodes 1, 3, 4; c3 (node 3) drops at masked_input
    b1, b3 = (base64.b64decode(bundles[k]) for k in ("1", "3"))
    reuse = _b64(b1[:32] + b3[32:])  # node 3's bundle carries node 1's cipher key
    sess = bytes.fromhex(sc["session_hex"])
    zero_msg = M.KeyBundle.signed_bytes(sess, sc["round"], 3, bytes(32), b3[32:64], b3[64:96],
                                        clients0["c3"].params_digest)
    zero_bundle = bytes(32) + b3[32:96] + signers["c3"].sign(zero_msg)
    shares = hdr(MI, RQ)["fields"][M.F_SHARES]
    sealed1 = base64.b64decode(shares["1"])
    adv_rep, sk_rep = hdr(ADV, RP), hdr(SK, RP)
    mi_rep, um_rep = hdr(MI, RP), hdr(UM, RP)
    b_shares = um_rep["fields"][M.F_B_SHARES]
    s_shares = um_rep["fields"][M.F_S_SHARES]
    b_share_1 = base64.b64decode(b_shares["1"])
    body_len = len(parse_message(genuine[(MI, RP, "c2")])[1])
    bundle_sig = base64.b64decode(adv_rep["fields"][M.F_BUNDLE_SIG])
    sign = {"op": "sign", "key": "sender"}
    mac = {"op": "mac", "key": "sender"}

    def setf(field: str, value: Any) -> dict[str, Any]:
        return {"op": "set", "path": ["fields", field], "value": value}

    def sethdr(key: str, value: Any) -> dict[str, Any]:
        return {"op": "set", "path": [key], "value": value}

    client_cases: list[tuple[str, str, str, str, list[dict[str, Any]], str]] = [
        # envelope: checked before any field is read
        ("wire-bad-magic", "magic is not FCS", ADV, "c2",
         [{"op": "overwrite", "offset": 0, "hex": b"XCS".hex()}], "WireFormatError"),
        ("wire-bad-version", "wire version 2", ADV, "c2",
         [{"op": "overwrite", "offset": 3, "hex": "02"}], "WireFormatError"),
        ("wire-unknown-flag", "flags bit 1 set", ADV, "c2",
         [{"op": "overwrite", "offset": 4, "hex": "02"}], "WireFormatError"),
        ("wire-header-over-limit", "declared header length 4 MiB + 1: refused on the declared "
         "size, before the length match and before parsing", ADV, "c2",
         [{"op": "overwrite", "offset": 5, "hex": "00400001"}], "WireFormatError"),
        ("wire-truncated", "one byte missing", ADV, "c2",
         [{"op": "truncate", "length": len(genuine[(ADV, RQ, "c2")]) - 1}], "WireFormatError"),
        ("wire-trailing-byte", "one byte too many", ADV, "c2", [{"op": "append", "hex": "00"}],
         "WireFormatError"),
        ("wire-too-short", "shorter than the 17-byte prefix", ADV, "c2",
         [{"op": "truncate", "length": 16}], "WireFormatError"),
        ("wire-header-not-utf8", "header starts with byte 0xff", ADV, "c2",
         [{"op": "overwrite", "offset": 17, "hex": "ff"}], "WireFormatError"),
        ("wire-header-not-json", "header is not JSON", ADV, "c2",
         [{"op": "set_header_text", "text": "{\"round\":"}], "WireFormatError"),
        ("wire-header-not-object", "header is a JSON array", ADV, "c2",
         [{"op": "set_header_text", "text": "[]"}], "WireFormatError"),
        ("wire-header-extra-key", "header has a key beyond the seven envelope keys", ADV, "c2",
         [sethdr("extra", 1)], "WireFormatError"),
        ("wire-header-missing-key", "header lacks dst", ADV, "c2",
         [{"op": "delete", "path": ["dst"]}], "WireFormatError"),
        ("wire-round-negative", "round -1", ADV, "c2", [sethdr("round", -1)], "WireFormatError"),
        ("wire-round-boolean", "round true (booleans are not integers)", ADV, "c2",
         [sethdr("round", True)], "WireFormatError"),
        ("wire-round-float", "round 7.0 (integers only)", ADV, "c2", [sethdr("round", 7.0)],
         "WireFormatError"),
        ("wire-round-too-large", "round 2**63", ADV, "c2", [sethdr("round", 1 << 63)],
         "WireFormatError"),
        ("wire-session-not-hex", "session 'zz'", ADV, "c2", [sethdr("session", "zz")],
         "WireFormatError"),
        ("wire-stage-not-string", "stage 1", ADV, "c2", [sethdr("stage", 1)],
         "WireFormatError"),
        ("wire-fields-not-object", "fields is a list", ADV, "c2", [sethdr("fields", [])],
         "WireFormatError"),
        # routing
        ("route-other-protocol", "protocol masking/v2", ADV, "c2",
         [sethdr("protocol", "masking/v2")], "WireFormatError"),
        ("route-other-session", "another session", ADV, "c2", [sethdr("session", "00" * 16)],
         "SessionMismatchError"),
        ("route-other-round", "round 6 while the client is in round 7 (replay)", ADV, "c2",
         [sethdr("round", 6)], "ReplayError"),
        ("route-src-not-server", "request claims to come from node 3", ADV, "c2",
         [sethdr("src", 3)], "PartyError"),
        ("route-dst-zero", "request addressed to index 0 (the server)", ADV, "c2",
         [sethdr("dst", 0)], "PartyError"),
        ("route-out-of-order", "a share_keys request before advertise_keys", ADV, "c2",
         [{"op": "replace_with", "stage": SK, "direction": RQ, "client": "c2"}], "StageError"),
        ("route-unknown-stage", "stage 'bogus'", ADV, "c2", [sethdr("stage", "bogus")],
         "StageError"),
        ("route-duplicate", "advertise_keys delivered again when share_keys is expected", SK,
         "c2", [{"op": "replace_with", "stage": ADV, "direction": RQ, "client": "c2"}],
         "StageError"),
        ("route-wrong-dst-later", "the share_keys request addressed to node 3 delivered to node "
         "2", SK, "c2", [{"op": "replace_with", "stage": SK, "direction": RQ, "client": "c3"}],
         "PartyError"),
        # advertise_keys request
        ("adv-unknown-field", "an extra field", ADV, "c2", [setf("extra", 1)],
         "WireFormatError"),
        ("adv-missing-field", "no clip field", ADV, "c2",
         [{"op": "delete", "path": ["fields", M.F_CLIP]}], "WireFormatError"),
        ("adv-n-too-small", "n_nodes 1", ADV, "c2", [setf(M.F_N_NODES, 1)], "PartyError"),
        ("adv-node-out-of-range", "dst 5 with n_nodes 4", ADV, "c2", [sethdr("dst", 5)],
         "PartyError"),
        ("adv-neighbour-self", "the neighbour list contains the client itself", ADV, "c2",
         [setf(M.F_NEIGHBOURS, [1, 2, 3])], "PartyError"),
        ("adv-neighbour-duplicate", "a neighbour listed twice", ADV, "c2",
         [setf(M.F_NEIGHBOURS, [1, 3, 3])], "PartyError"),
        ("adv-neighbour-unknown", "neighbour 5 of 4 nodes", ADV, "c2",
         [setf(M.F_NEIGHBOURS, [1, 3, 5])], "PartyError"),
        ("adv-complete-missing-neighbour", "graph 'complete' with n-2 neighbours", ADV, "c2",
         [setf(M.F_NEIGHBOURS, [1, 3])], "PartyError"),
        ("adv-unknown-graph", "graph 'star'", ADV, "c2", [setf(M.F_GRAPH, "star")],
         "PartyError"),
        ("adv-threshold-below-minimum", "threshold 1 and share_threshold 1 (a sum of one client "
         "is that client's input)", ADV, "c2",
         [setf(M.F_THRESHOLD, 1), setf(M.F_SHARE_THRESHOLD, 1)], "PartyError"),
        ("adv-threshold-above-n", "threshold 5 of 4 nodes", ADV, "c2", [setf(M.F_THRESHOLD, 5)],
         "PartyError"),
        ("adv-share-threshold-above-threshold", "share_threshold 4 > threshold 3", ADV, "c2",
         [setf(M.F_SHARE_THRESHOLD, 4)], "PartyError"),
        ("adv-share-threshold-one", "share_threshold 1", ADV, "c2",
         [setf(M.F_SHARE_THRESHOLD, 1)], "PartyError"),
        ("adv-threshold-not-integer", "threshold 3.0", ADV, "c2", [setf(M.F_THRESHOLD, 3.0)],
         "WireFormatError"),
        ("adv-clip-string", "clip '8'", ADV, "c2", [setf(M.F_CLIP, "8")], "WireFormatError"),
        ("adv-weight-above-max", "max_weight 1.0 announced to c4, whose weight is 1.5", ADV,
         "c4", [setf(M.F_MAX_WEIGHT, 1.0)], "UpdateValidationError"),
        ("adv-ring-overflow", "levels 2**30 with 4 nodes in a 32-bit ring (4 * 2**30 > "
         "2**31 - 1)", ADV, "c2", [setf(M.F_LEVELS, 1 << 30)], "ConfigError"),
        ("adv-ring-bits-one", "ring_bits 1", ADV, "c2", [setf(M.F_RING_BITS, 1)],
         "PartyError"),
        ("adv-ring-bits-seven", "ring_bits 7 (below the minimum of 8)", ADV, "c2",
         [setf(M.F_RING_BITS, 7)], "PartyError"),
        ("adv-max-weight-zero", "max_weight 0", ADV, "c2", [setf(M.F_MAX_WEIGHT, 0.0)],
         "PartyError"),
        ("adv-clip-zero", "clip 0", ADV, "c2", [setf(M.F_CLIP, 0)], "ConfigError"),
        ("adv-tensor-spec-mismatch", "tensor_spec names a tensor the update lacks", ADV, "c2",
         [setf(M.F_SPEC, [["bias", [2]], ["other", [2, 2]]])], "UpdateValidationError"),
        ("adv-tensor-spec-shape", "tensor_spec with another shape", ADV, "c2",
         [setf(M.F_SPEC, [["bias", [2]], ["weight", [4]]])], "UpdateValidationError"),
        ("adv-tensor-spec-unsorted", "tensor_spec names not sorted", ADV, "c2",
         [setf(M.F_SPEC, [["weight", [2, 2]], ["bias", [2]]])], "WireFormatError"),
        # share_keys request
        ("sk-own-bundle-changed", "the client's own bundle is not forwarded unchanged", SK, "c2",
         [setf(M.F_BUNDLES, {**bundles, "2": bundles["1"]})], "PartyError"),
        ("sk-own-bundle-missing", "the client's own bundle is missing", SK, "c2",
         [{"op": "delete", "path": ["fields", M.F_BUNDLES, "2"]}], "PartyError"),
        ("sk-non-neighbour", "a bundle for node 5, not a neighbour", SK, "c2",
         [setf(M.F_BUNDLES, {**bundles, "5": bundles["3"]})], "PartyError"),
        ("sk-too-few-bundles", "2 bundles (its own included) < share threshold 3", SK, "c2",
         [setf(M.F_BUNDLES, {"1": bundles["1"], "2": bundles["2"]})], "PartyError"),
        ("sk-bundle-size", "a 159-byte bundle", SK, "c2",
         [setf(M.F_BUNDLES, {**bundles, "3": _b64(b3[:159])})], "WireFormatError"),
        ("sk-bundle-bad-base64", "a bundle that is not base64", SK, "c2",
         [setf(M.F_BUNDLES, {**bundles, "3": "***"})], "WireFormatError"),
        ("sk-bundle-key-not-canonical", "bundle key '03'", SK, "c2",
         [setf(M.F_BUNDLES, {"1": bundles["1"], "2": bundles["2"], "03": bundles["3"],
                             "4": bundles["4"]})], "WireFormatError"),
        ("sk-key-reuse", "node 3's bundle carries node 1's cipher key (checked before its "
         "signature)", SK, "c2", [setf(M.F_BUNDLES, {**bundles, "3": reuse})], "PartyError"),
        ("sk-low-order-key", "node 3's bundle has an all-zero X25519 cipher key, validly signed "
         "by node 3", SK, "c2", [setf(M.F_BUNDLES, {**bundles, "3": _b64(zero_bundle)})],
         "CryptoError"),
        # masked_input request
        ("mi-share-flipped", "a sealed share with a flipped bit", MI, "c2",
         [setf(M.F_SHARES, {**shares, "1": _b64(_flip(sealed1, 30))})], "DecryptionError"),
        ("mi-share-rerouted", "node 1's and node 4's sealed shares swapped (AD binds src and "
         "dst)", MI, "c2",
         [setf(M.F_SHARES, {"1": shares["4"], "3": shares["3"], "4": shares["1"]})],
         "DecryptionError"),
        ("mi-share-unknown-sender", "a share from node 5", MI, "c2",
         [setf(M.F_SHARES, {**shares, "5": shares["1"]})], "PartyError"),
        ("mi-share-from-self", "a share from the client itself", MI, "c2",
         [setf(M.F_SHARES, {**shares, "2": shares["1"]})], "PartyError"),
        ("mi-too-few-shares", "one share: 1 + 1 < share threshold 3", MI, "c2",
         [setf(M.F_SHARES, {"1": shares["1"]})], "PartyError"),
        ("mi-share-size", "a 141-byte sealed share", MI, "c2",
         [setf(M.F_SHARES, {**shares, "1": _b64(sealed1[:141])})], "WireFormatError"),
        # unmask request (genuine: survivors [1, 2, 4], dropped [3])
        ("um-both", "node 1 listed as surviving and as dropped: answering would reveal both "
         "shares of node 1", UM, "c2", [setf(M.F_DROPPED, [1, 3])], "UnmaskRequestError"),
        ("um-self-dropped", "the client is listed as dropped", UM, "c2",
         [setf(M.F_SURVIVORS, [1, 4]), setf(M.F_DROPPED, [2, 3])], "UnmaskRequestError"),
        ("um-self-missing", "the client is not among the survivors", UM, "c2",
         [setf(M.F_SURVIVORS, [1, 4])], "UnmaskRequestError"),
        ("um-unknown-node", "node 5 listed as dropped", UM, "c2", [setf(M.F_DROPPED, [3, 5])],
         "UnmaskRequestError"),
        ("um-unclassified-peer", "peer 3 neither surviving nor dropped", UM, "c2",
         [setf(M.F_DROPPED, [])], "UnmaskRequestError"),
        ("um-duplicate", "a survivor listed twice", UM, "c2",
         [setf(M.F_SURVIVORS, [1, 2, 2, 4])], "UnmaskRequestError"),
        ("um-below-share-threshold", "2 survivors < share threshold 3", UM, "c2",
         [setf(M.F_SURVIVORS, [1, 2]), setf(M.F_DROPPED, [3, 4])], "UnmaskRequestError"),
        ("um-not-a-list", "survivors is an object", UM, "c2", [setf(M.F_SURVIVORS, {"1": 1})],
         "WireFormatError"),
    ]
    server_cases: list[tuple[str, str, str, str, list[dict[str, Any]], str]] = [
        ("srv-adv-bundle-signature", "bundle_sig with a flipped bit (the reply's MAC covers "
         "it)", ADV, "c2", [setf(M.F_BUNDLE_SIG, _b64(_flip(bundle_sig, 0)))], "MacError"),
        ("srv-adv-unauthenticated", "advertise_keys reply without its MAC", ADV, "c2",
         [{"op": "strip_trailer"}], "MacError"),
        ("srv-adv-signed-not-maced", "advertise_keys reply signed by its sender instead of "
         "MACed", ADV, "c2", [{"op": "strip_trailer"}, sign], "MacError"),
        ("srv-adv-other-mac-key", "advertise_keys reply MACed with c3's key", ADV, "c2",
         [{"op": "strip_trailer"}, {"op": "mac", "key": "c3"}], "MacError"),
        ("srv-adv-params-hash", "the client reports the digest of other round parameters "
         "(validly MACed: it was told them)", ADV, "c2",
         [setf(M.F_PARAMS_HASH, _b64(bytes(32))), mac], "PartyError"),
        ("srv-adv-trailer", "64 stray bytes after the message", ADV, "c2",
         [{"op": "append", "hex": "00" * 64}], "WireFormatError"),
        ("srv-adv-key-size", "a 31-byte mask_pk", ADV, "c2",
         [setf(M.F_MASK_PK, _b64(base64.b64decode(adv_rep["fields"][M.F_MASK_PK])[:31]))],
         "WireFormatError"),
        ("srv-adv-src", "reply claims to come from node 3", ADV, "c2", [sethdr("src", 3)],
         "PartyError"),
        ("srv-adv-dst", "reply addressed to node 1", ADV, "c2", [sethdr("dst", 1)],
         "PartyError"),
        ("srv-adv-body", "a non-empty body (the body limit is 0 outside masked_input)", ADV,
         "c2", [{"op": "set_body", "hex": "00"}], "WireFormatError"),
        ("srv-sk-other-mac-key", "share_keys reply MACed with c3's key", SK, "c2",
         [{"op": "strip_trailer"}, {"op": "mac", "key": "c3"}], "MacError"),
        ("srv-sk-signed-not-maced", "share_keys reply signed by its sender instead of MACed",
         SK, "c2", [{"op": "strip_trailer"}, sign], "MacError"),
        ("srv-sk-unauthenticated", "share_keys reply without its MAC", SK, "c2",
         [{"op": "strip_trailer"}], "MacError"),
        ("srv-sk-flipped-tag", "a flipped bit in the MAC tag", SK, "c2",
         [{"op": "flip_bit", "offset": -1, "bit": 0}], "MacError"),
        ("srv-sk-missing-share", "no share for peer 4", SK, "c2",
         [{"op": "delete", "path": ["fields", M.F_SHARES, "4"]}, mac], "PartyError"),
        ("srv-sk-extra-share", "a share addressed to itself", SK, "c2",
         [setf(M.F_SHARES, {**sk_rep["fields"][M.F_SHARES],
                            "2": sk_rep["fields"][M.F_SHARES]["1"]}), mac], "PartyError"),
        ("srv-sk-commit-size", "a 31-byte b_commit", SK, "c2",
         [setf(M.F_B_COMMIT, _b64(bytes(31))), mac], "WireFormatError"),
        ("srv-sk-other-round", "reply for round 6", SK, "c2", [sethdr("round", 6), mac],
         "ReplayError"),
        ("srv-sk-other-session", "reply for another session", SK, "c2",
         [sethdr("session", "00" * 16), mac], "SessionMismatchError"),
        ("srv-sk-wrong-stage", "the client's advertise_keys reply replayed at share_keys", SK,
         "c2", [{"op": "replace_with", "stage": ADV, "direction": RP, "client": "c2"}],
         "StageError"),
        ("srv-client-error", "the client answers with an error message (it refused)", SK, "c2",
         [sethdr("stage", M.ERROR),
          sethdr("fields", {M.F_CODE: "PartyError", M.F_MESSAGE: "refused"}), sign],
         "ProtocolError"),
        ("srv-mi-length", "length field one short", MI, "c2",
         [setf(M.F_LENGTH, mi_rep["fields"][M.F_LENGTH] - 1), mac], "WireFormatError"),
        ("srv-mi-body-long", "body 4 bytes longer than length * 4 (over the size limit)", MI,
         "c2", [{"op": "set_body", "hex": "00" * (body_len + 4)}, mac], "WireFormatError"),
        ("srv-mi-body-short", "body 4 bytes shorter than length * 4", MI, "c2",
         [{"op": "set_body", "hex": "00" * (body_len - 4)}, mac], "WireFormatError"),
        ("srv-mi-flipped-body", "a flipped bit in the masked vector breaks the MAC", MI,
         "c2", [{"op": "flip_bit", "offset": -17, "bit": 0}], "MacError"),
        ("srv-mi-signed-not-maced", "the masked input signed by its sender instead of MACed",
         MI, "c2", [{"op": "strip_trailer"}, sign], "MacError"),
        ("srv-um-unauthenticated", "unmask reply without its MAC", UM, "c2",
         [{"op": "strip_trailer"}], "MacError"),
        ("srv-um-both", "the reply reveals node 3's self-mask share as well as its mask-key "
         "share", UM, "c2", [setf(M.F_B_SHARES, {**b_shares, "3": s_shares["3"]}), mac],
         "PartyError"),
        ("srv-um-missing", "the reply omits node 4's self-mask share", UM, "c2",
         [{"op": "delete", "path": ["fields", M.F_B_SHARES, "4"]}, mac], "PartyError"),
        ("srv-um-wrong-x", "a share whose x is not the holder's index", UM, "c2",
         [setf(M.F_B_SHARES, {**b_shares, "1": _b64((3).to_bytes(8, "big") + b_share_1[8:])}),
          mac], "PartyError"),
        ("srv-um-y-range", "a share with y = p", UM, "c2",
         [setf(M.F_B_SHARES, {**b_shares, "1": _b64(b_share_1[:8] + PRIME.to_bytes(33, "big"))}),
          mac], "WireFormatError"),
    ]
    abort_cases: list[tuple[str, str, str, dict[str, str], str]] = [
        ("abort-advertise", "2 of 4 clients never answer advertise_keys: the round aborts "
         "before share_keys is sent", name, {"c1": ADV, "c2": ADV},
         "ThresholdError after advertise_keys"),
        ("abort-share-keys", "2 of 4 clients never answer share_keys", name,
         {"c1": SK, "c4": SK}, "ThresholdError after share_keys"),
        ("abort-masked-input", "2 of 4 clients never answer masked_input: no unmask request is "
         "sent", name, {"c1": MI, "c4": MI}, "ThresholdError after masked_input"),
        ("abort-unmask", "c3 drops after share_keys and c4 after masked_input: 2 unmask answers "
         "< threshold 3", name, {"c3": MI, "c4": UM}, "ThresholdError after unmask"),
    ]
    kr = scenarios["k-regular-10"]
    ring = kr["ring_order"]
    ids = {u: f"c{u:02d}" for u in ring}
    abort_cases.append((
        "abort-unrecoverable", "k-regular-10 with the clients at ring positions 8, 9 and 1 "
        "dropping at masked_input: 7 >= threshold 6 inputs arrive, but only 2 < share threshold "
        "3 holders of the self-mask shares of the client at position 0 remain, so the round "
        "aborts before the unmask request", "k-regular-10",
        {ids[ring[8]]: MI, ids[ring[9]]: MI, ids[ring[1]]: MI},
        "ThresholdError after masked_input"))
    out: list[dict[str, Any]] = []

    def check(case: dict[str, Any], seen: dict[str, Any], want: str, key: str = "observed"
              ) -> None:
        if seen.get(key) != want:
            raise AssertionError(f"{case['id']}: expected {want!r}, observed {seen}")

    def add_client_cases(scen: str, cases: list[tuple[str, str, str, str, list[dict[str, Any]],
                                                      str]]) -> None:
        for cid_, desc, stage, client, edits, err in cases:
            case = {"id": cid_, "description": desc, "scenario": scen, "stage": stage,
                    "direction": RQ, "client": client, "edits": edits}
            seen = probe(scen, scenarios[scen], case)
            check(case, seen, err)
            out.append({**case, "observed_by": "client", "expected_error": err,
                        "delivered_sha256": sha256_hex(seen["delivered"]),
                        "delivered_hex": seen["delivered"].hex()})

    add_client_cases(name, client_cases)
    # Peers check bundle signatures only in rounds with the consistency check (or identities);
    # these cases run the same round with the check on.
    cname = CHECKED
    csc = scenarios[cname]
    cgenuine = genuine_messages(run(cname, csc)[2])
    cbundles = parse_message(cgenuine[(SK, RQ, "c2")])[0]["fields"][M.F_BUNDLES]
    cb3 = base64.b64decode(cbundles["3"])
    checked_cases: list[tuple[str, str, str, str, list[dict[str, Any]], str]] = [
        ("sk-bundle-signature", "consistency check on: node 3's bundle signature has a flipped "
         "bit", SK, "c2", [setf(M.F_BUNDLES, {**cbundles, "3": _b64(_flip(cb3, 159))})],
         "SignatureError"),
        ("sk-bundle-other-node", "consistency check on: node 3's and node 4's bundles swapped "
         "(the bundle signature binds the node index)", SK, "c2",
         [setf(M.F_BUNDLES, {"1": cbundles["1"], "2": cbundles["2"], "3": cbundles["4"],
                             "4": cbundles["3"]})], "SignatureError"),
    ]
    add_client_cases(cname, checked_cases)
    case = {"id": "abort-then-genuine", "description": "after refusing a share_keys request "
            "with a bad bundle signature (consistency check on) the client is aborted: the "
            "genuine request is then refused too", "scenario": cname, "stage": SK,
            "direction": RQ, "client": "c2",
            "edits": [setf(M.F_BUNDLES, {**cbundles, "3": _b64(_flip(cb3, 159))})],
            "then_deliver_genuine": True}
    seen = probe(cname, csc, case)
    check(case, seen, "SignatureError")
    check(case, seen, "StageError", "then_observed")
    out.append({**case, "observed_by": "client", "expected_error": "SignatureError",
                "then_expected_error": "StageError",
                "delivered_sha256": sha256_hex(seen["delivered"]),
                "delivered_hex": seen["delivered"].hex()})
    for cid_, desc, stage, client, edits, err in server_cases:
        case = {"id": cid_, "description": desc, "scenario": name, "stage": stage,
                "direction": RP, "client": client, "edits": edits}
        seen = probe(name, sc, case)
        check(case, seen, err)
        out.append({**case, "observed_by": "server", "expected_error": err,
                    "round_outcome": seen["round_outcome"],
                    "delivered_sha256": sha256_hex(seen["delivered"]),
                    "delivered_hex": seen["delivered"].hex()})
    for cid_, desc, scen, drops, want in abort_cases:
        case = {"id": cid_, "description": desc, "scenario": scen, "drops": drops}
        seen = probe(scen, scenarios[scen], case)
        check(case, seen, want)
        err, _, after = want.partition(" after ")
        out.append({**case, "observed_by": "server_abort", "expected_error": err,
                    "raised_after": after})
    known = []
    case = {"id": "sk-bundle-key-unicode-digit", "description": "bundle key '\u00b3' (SUPERSCRIPT "
            "THREE: Python's str.isdigit accepts it, int() rejects it)", "scenario": name,
            "stage": SK, "direction": RQ, "client": "c2",
            "edits": [setf(M.F_BUNDLES, {"1": bundles["1"], "2": bundles["2"],
                                         "\u00b3": bundles["3"], "4": bundles["4"]})]}
    seen = probe(name, sc, case)
    check(case, seen, "WireFormatError")
    out.append({**case, "observed_by": "client", "expected_error": "WireFormatError",
                "delivered_sha256": sha256_hex(seen["delivered"]),
                "delivered_hex": seen["delivered"].hex()})
    write("must_fail.json", "Messages a conforming party must refuse. Each case runs its scenario "
          "honestly (the scenario's 'drop' plan, or the case's 'drops' which replaces it), "
          "replaces the message (stage, direction, client) by the result of applying 'edits' "
          "(operations defined in SPEC.md, 'Test vectors') to the genuine one, and expects the "
          "named error class of fedcollm_secure.errors (exact class): raised by the client "
          "(observed_by 'client'), recorded by the server as its reason for rejecting that "
          "client's reply (observed_by 'server'; round_outcome says whether the round then "
          "continues or aborts), or raised by the server when it receives a stage's replies "
          "(observed_by 'server_abort'). delivered_hex are the exact bytes delivered. "
          "known_bugs lists cases the reference implementation does not yet get right.",
          {"scenarios": {n: {**scenarios[n], "rng_seeds": seeds_of(n, scenarios[n])}
                         for n in (name, "k-regular-10", CHECKED)},
           "cases": out, "known_bugs": known})


def main() -> None:
    VECTORS.mkdir(parents=True, exist_ok=True)
    gen_kdf()
    gen_prg()
    gen_aead()
    gen_shamir()
    gen_quantization()
    gen_mask_cancellation()
    gen_encodings()
    scenarios = gen_end_to_end()
    gen_must_fail(scenarios)
    for f in sorted(VECTORS.glob("*.json")):
        print(f"{f.name:<24} {f.stat().st_size:>8} bytes  sha256 {sha256_hex(f.read_bytes())}")


if __name__ == "__main__":
    main()
