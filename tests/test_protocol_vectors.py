"""The implementation against the committed ``protocols/masking/v1`` test vectors.

Nothing here regenerates the vectors: every expected value is read from the JSON files, and
the protocol runs are rebuilt from what the files say (configs, seeds, edits), so a change of
behaviour shows up as a failing comparison. Regenerate deliberately with
``.venv/bin/python protocols/masking/v1/generate_vectors.py`` and review the diff.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedcollm_secure import errors
from fedcollm_secure.crypto import InsecureSeededRandomForTests, KdfContext, derive_key
from fedcollm_secure.crypto.randomness import FixedBytesForTests
from fedcollm_secure.crypto.aead import associated_data, open_sealed, seal
from fedcollm_secure.crypto.key_agreement import agree, load_private_key, public_of
from fedcollm_secure.crypto.prg import expand_seed, uniform01
from fedcollm_secure.crypto.quantization import QuantizationSpec
from fedcollm_secure.crypto.shamir import PRIME, Share, reconstruct_secret, split_secret
from fedcollm_secure.crypto.signatures import SigningKey, VerifyKey
from fedcollm_secure.secagg.masking import MaskingClient, MaskingConfig, MaskingServer, RoundParams
from fedcollm_secure.secagg.masking import messages as M
from fedcollm_secure.secagg.masking.config import default_degree
from fedcollm_secure.secagg.masking.graph import harary_graph
from fedcollm_secure.secagg.tensors import TensorSpec
from fedcollm_secure.crypto.mac import mac_tag
from fedcollm_secure.wire import Envelope, decode, signature_message

VECTOR_DIR = Path(__file__).resolve().parents[1] / "protocols" / "masking" / "v1" / "vectors"
EXPECTED_FILES = {"aead.json", "encodings.json", "end_to_end.json", "kdf.json",
                  "mask_cancellation.json", "must_fail.json", "prg.json", "quantization.json",
                  "shamir.json"}


def load(name: str) -> dict[str, Any]:
    return json.loads((VECTOR_DIR / name).read_text(encoding="utf-8"))


def hx(s: str) -> bytes:
    return bytes.fromhex(s)


def as_ints(values: list[int | str]) -> list[int]:
    return [int(v) for v in values]


def error_class(name: str) -> type[errors.FedCoLLMSecureError]:
    cls = getattr(errors, name)
    assert issubclass(cls, errors.FedCoLLMSecureError)
    return cls


def raises_exactly(name: str, fn: Any, *args: Any, **kwargs: Any) -> None:
    with pytest.raises(error_class(name)) as info:
        fn(*args, **kwargs)
    assert type(info.value).__name__ == name


def rng(seed: Any) -> InsecureSeededRandomForTests:
    return InsecureSeededRandomForTests(seed, quiet=True)


FixedBytes = FixedBytesForTests


# --- every file ---------------------------------------------------------------------------------
def test_vector_files_present_and_labelled() -> None:
    names = {p.name for p in VECTOR_DIR.glob("*.json")}
    assert names == EXPECTED_FILES
    for name in sorted(names):
        doc = load(name)
        assert isinstance(doc["description"], str) and doc["description"]
        assert doc["version"] == 1
        assert doc["protocol"] == "masking/v1"


# --- kdf ----------------------------------------------------------------------------------------
KDF = load("kdf.json")


@pytest.mark.parametrize("case", KDF["cases"], ids=lambda c: c["description"][:40])
def test_kdf(case: dict[str, Any]) -> None:
    ctx = KdfContext(case["protocol"], case["version"], hx(case["session_hex"]), int(case["round"]))
    pair = (int(case["pair"][0]), int(case["pair"][1]))
    assert ctx.salt().hex() == case["salt_hex"]
    assert ctx.info(case["purpose"], pair).hex() == case["info_hex"]
    okm = derive_key(hx(case["ikm_hex"]), ctx, purpose=case["purpose"], pair=pair,
                     length=case["length"])
    assert okm.hex() == case["okm_hex"]
    # the salt is SHA-256 of the encoded (label, protocol, version, session)
    fields = [hx(KDF["salt_label_hex"]), case["protocol"].encode(),
              struct.pack(">I", case["version"]), hx(case["session_hex"])]
    enc = b"".join(struct.pack(">I", len(f)) + f for f in fields)
    assert hashlib.sha256(enc).hexdigest() == case["salt_hex"]


@pytest.mark.parametrize("case", KDF["must_fail"], ids=lambda c: c["description"][:40])
def test_kdf_must_fail(case: dict[str, Any]) -> None:
    ctx = KdfContext(case["protocol"], case["version"], hx(case["session_hex"]), case["round"])
    raises_exactly(case["expected_error"], derive_key, hx(case["ikm_hex"]), ctx,
                   purpose=case["purpose"], pair=tuple(case["pair"]), length=case["length"])


# --- prg ----------------------------------------------------------------------------------------
PRG = load("prg.json")


@pytest.mark.parametrize("case", PRG["cases"],
                         ids=lambda c: f"{c['seed_hex'][:8]}-r{c['ring_bits']}")
def test_prg(case: dict[str, Any]) -> None:
    out = expand_seed(hx(case["seed_hex"]), case["length"], case["ring_bits"])
    assert out.dtype.itemsize == case["word_bytes"]
    assert [int(x) for x in out] == as_ints(case["words"])
    # the words are the keystream read little-endian, reduced mod 2**ring_bits
    ks = hx(case["keystream_hex"])
    w = case["word_bytes"]
    raw = [int.from_bytes(ks[i:i + w], "little") for i in range(0, len(ks), w)]
    assert [x % (1 << case["ring_bits"]) for x in raw] == as_ints(case["words"])


def test_prg_rfc8439_keystream() -> None:
    zero = next(c for c in PRG["cases"] if c["seed_hex"] == "00" * 32)
    # RFC 8439 appendix A.1, test vector #1 (key 0, nonce 0, block counter 0)
    assert zero["keystream_hex"].startswith("76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1a")


def test_uniform01() -> None:
    u = PRG["uniform01"]
    vals = uniform01(hx(u["seed_hex"]), u["length"])
    assert [float(x) for x in vals] == u["values"]
    assert [w / 2**32 for w in as_ints(u["words"])] == u["values"]


@pytest.mark.parametrize("case", PRG["must_fail"], ids=lambda c: c["description"])
def test_prg_must_fail(case: dict[str, Any]) -> None:
    raises_exactly(case["expected_error"], expand_seed, hx(case["seed_hex"]), case["length"],
                   case["ring_bits"])


# --- aead ---------------------------------------------------------------------------------------
AEAD = load("aead.json")


def _ad(ad: dict[str, Any]) -> bytes:
    return associated_data(ad["label"], hx(ad["session_hex"]), int(ad["round"]), int(ad["src"]),
                           int(ad["dst"]))


@pytest.mark.parametrize("case", AEAD["cases"], ids=lambda c: c["description"][:40])
def test_aead(case: dict[str, Any]) -> None:
    ad = _ad(case["ad"])
    assert ad.hex() == case["ad_hex"]
    sealed = seal(hx(case["key_hex"]), hx(case["plaintext_hex"]), ad,
                  FixedBytes(hx(case["nonce_hex"])))
    assert sealed.hex() == case["sealed_hex"]
    assert sealed[:12].hex() == case["nonce_hex"]
    assert open_sealed(hx(case["key_hex"]), sealed, ad).hex() == case["plaintext_hex"]


@pytest.mark.parametrize("case", AEAD["must_fail"], ids=lambda c: c["description"][:40])
def test_aead_must_fail(case: dict[str, Any]) -> None:
    ad = _ad(case["ad"])
    assert ad.hex() == case["ad_hex"]
    raises_exactly(case["expected_error"], open_sealed, hx(case["key_hex"]),
                   hx(case["sealed_hex"]), ad)


# --- shamir -------------------------------------------------------------------------------------
SHAMIR = load("shamir.json")


def test_shamir_prime() -> None:
    assert int(SHAMIR["prime"]) == PRIME == 2**256 + 297


@pytest.mark.parametrize("case", SHAMIR["split"], ids=lambda c: c["description"][:40])
def test_shamir_split(case: dict[str, Any]) -> None:
    secret, t, xs = hx(case["secret_hex"]), case["threshold"], as_ints(case["xs"])
    shares = split_secret(secret, t, xs, rng(case["rng_seed"]))
    assert [shares[x].to_bytes().hex() for x in xs] == [s["share_hex"] for s in case["shares"]]
    # the polynomial from the stored coefficients gives the same shares
    poly = [int.from_bytes(secret, "big"), *as_ints(case["coefficients"])]
    accepted = [int.from_bytes(hx(d["draw_hex"]), "big") & (2**257 - 1)
                for d in case["rng_draws"] if d["accepted"]]
    assert accepted == poly[1:]
    for s in case["shares"]:
        x = int(s["x"])
        assert int(s["y"]) == sum(c * pow(x, i, PRIME) for i, c in enumerate(poly)) % PRIME
        assert Share.from_bytes(hx(s["share_hex"])) == Share(x, int(s["y"]))
    if t <= len(xs):
        got = reconstruct_secret([Share.from_bytes(hx(s["share_hex"])) for s in case["shares"]], t)
        assert got == secret


def _check(digest: str | None) -> Any:
    if digest is None:
        return None
    return lambda s: hashlib.sha256(s).hexdigest() == digest


@pytest.mark.parametrize("case", SHAMIR["reconstruct"], ids=lambda c: c["description"][:40])
def test_shamir_reconstruct(case: dict[str, Any]) -> None:
    shares = [Share.from_bytes(hx(s)) for s in case["shares_hex"]]
    out = reconstruct_secret(shares, case["threshold"], check=_check(case["check_sha256_hex"]))
    assert out.hex() == case["secret_hex"]


@pytest.mark.parametrize("case", SHAMIR["must_fail"]["split"], ids=lambda c: c["description"])
def test_shamir_split_must_fail(case: dict[str, Any]) -> None:
    raises_exactly(case["expected_error"], split_secret, hx(case["secret_hex"]),
                   case["threshold"], as_ints(case["xs"]), rng("unused"))


@pytest.mark.parametrize("case", SHAMIR["must_fail"]["reconstruct"],
                         ids=lambda c: c["description"][:40])
def test_shamir_reconstruct_must_fail(case: dict[str, Any]) -> None:
    shares = [Share.from_bytes(hx(s)) for s in case["shares_hex"]]
    raises_exactly(case["expected_error"], reconstruct_secret, shares, case["threshold"],
                   check=_check(case["check_sha256_hex"]))


@pytest.mark.parametrize("case", SHAMIR["must_fail"]["decode_share"],
                         ids=lambda c: c["description"])
def test_shamir_decode_must_fail(case: dict[str, Any]) -> None:
    raises_exactly(case["expected_error"], Share.from_bytes, hx(case["share_hex"]))


# --- quantisation -------------------------------------------------------------------------------
QUANT = load("quantization.json")


def _spec(d: dict[str, Any]) -> QuantizationSpec:
    return QuantizationSpec(float(d["clip"]), d["ring_bits"], int(d["levels"]), d["max_summands"])


@pytest.mark.parametrize("case", QUANT["kat"], ids=lambda c: c["description"][:40])
def test_quantization_kat(case: dict[str, Any]) -> None:
    q = _spec(case["spec"])
    assert q.step == case["step"]
    seed = hx(case["uniform_seed_hex"])
    n = len(case["values"])
    assert [float(u) for u in uniform01(seed, n)] == case["uniform"]
    assert [w / 2**32 for w in as_ints(case["uniform_words"])] == case["uniform"]
    ring = q.quantize(np.array(case["values"], dtype=np.float64), FixedBytes(seed))
    assert [int(x) for x in ring] == as_ints(case["ring"])
    assert [int(x) for x in q.lift(ring)] == as_ints(case["lifted"])
    assert [float(x) for x in q.dequantize(ring)] == case["dequantized"]
    # the rule in SPEC.md: y = clamp(v * scale * 2**F), Y = trunc(y),
    # k = (Y + (word >> (32 - F))) >> F, reduced
    f = min(32, 62 - q.levels.bit_length())
    scale = q.levels / q.clip
    bound = q.levels * 2.0**f
    words = as_ints(case["uniform_words"])
    for v, w, r in zip(case["values"], words, as_ints(case["ring"]), strict=True):
        y = min(max(v * scale * 2.0**f, -bound), bound)
        k = (int(y) + (w >> (32 - f))) >> f
        assert abs(k) <= q.levels
        assert abs(k - v * scale) < 1 or abs(v) > q.clip
        assert k % (1 << q.ring_bits) == r


@pytest.mark.parametrize("case", QUANT["sums"], ids=lambda c: c["description"][:40])
def test_quantization_sums(case: dict[str, Any]) -> None:
    q = _spec(case["spec"])
    acc = np.zeros(len(case["ring_sum"]), dtype=q.dtype)
    for values, seed, ring in zip(case["inputs"], case["uniform_seeds_hex"], case["rings"],
                                  strict=True):
        out = q.quantize(np.array(values), FixedBytes(hx(seed)))
        assert [int(x) for x in out] == as_ints(ring)
        acc += out
    acc &= q.dtype((1 << q.ring_bits) - 1) if q.ring_bits < 64 else q.dtype(2**64 - 1)
    assert [int(x) for x in acc] == as_ints(case["ring_sum"])
    dec = q.dequantize(acc)
    assert [float(x) for x in dec] == case["decoded_sum"]
    n = len(case["inputs"])
    assert q.error_bound(n) == case["error_bound"]
    assert np.all(np.abs(dec - np.array(case["clipped_sum"])) < case["error_bound"])


@pytest.mark.parametrize("case", QUANT["fit"],
                         ids=lambda c: f"{c['ring_bits']}-{c['max_summands']}")
def test_quantization_fit(case: dict[str, Any]) -> None:
    q = QuantizationSpec.fit(case["clip"], case["ring_bits"], case["max_summands"])
    assert q.levels == int(case["levels"])
    assert q.max_summands * q.levels <= 2 ** (q.ring_bits - 1) - 1


@pytest.mark.parametrize("case", QUANT["must_fail"]["spec"], ids=lambda c: c["description"][:40])
def test_quantization_spec_must_fail(case: dict[str, Any]) -> None:
    s = case["spec"]
    raises_exactly(case["expected_error"], QuantizationSpec, s["clip"], s["ring_bits"],
                   int(s["levels"]), s["max_summands"])


@pytest.mark.parametrize("case", QUANT["must_fail"]["values"], ids=lambda c: c["description"])
def test_quantization_values_must_fail(case: dict[str, Any]) -> None:
    q = _spec(case["spec"])
    values = np.array([float({"NaN": "nan", "Infinity": "inf", "-Infinity": "-inf"}.get(v, v))
                       if isinstance(v, str) else v for v in case["values"]])
    raises_exactly(case["expected_error"], q.quantize, values, FixedBytes(bytes(32)))


# --- mask cancellation --------------------------------------------------------------------------
MASKS = load("mask_cancellation.json")


def test_mask_cancellation() -> None:
    session, round_, length = hx(MASKS["session_hex"]), MASKS["round"], MASKS["length"]
    nodes = {n["node"]: n for n in MASKS["nodes"]}
    for n in nodes.values():
        assert public_of(hx(n["private_hex"])).hex() == n["public_hex"]
    ctx = M.kdf_context(session, round_)
    seeds = {}
    for p in MASKS["pairs"]:
        u, v = p["pair"]
        assert u < v
        shared = agree(load_private_key(hx(nodes[u]["private_hex"])), hx(nodes[v]["public_hex"]))
        assert shared == agree(load_private_key(hx(nodes[v]["private_hex"])),
                               hx(nodes[u]["public_hex"]))
        assert shared.hex() == p["shared_secret_hex"]
        seed = derive_key(shared, ctx, purpose=M.PURPOSE_PAIR_MASK, pair=(u, v))
        assert seed.hex() == p["mask_seed_hex"]
        assert derive_key(shared, ctx, purpose=M.PURPOSE_SHARE_KEY, pair=(u, v)).hex() == \
            p["share_key_hex"]
        assert [int(x) for x in expand_seed(seed, length, 32)] == as_ints(p["prg32"])
        seeds[(u, v)] = seeds[(v, u)] = seed
    for bits, ring in MASKS["rings"].items():
        r = 1 << int(bits)
        total = [0] * length
        for u in nodes:
            mask = [0] * length
            for v in nodes:
                if v == u:
                    continue
                prg = [int(x) for x in expand_seed(seeds[(u, v)], length, int(bits))]
                sign = M.mask_sign(u, v)
                assert sign == (1 if u < v else -1)
                mask = [(a + sign * b) % r for a, b in zip(mask, prg, strict=True)]
            assert mask == as_ints(ring["pairwise_mask"][str(u)])
            total = [(a + b) % r for a, b in zip(total, mask, strict=True)]
        assert total == [0] * length == as_ints(ring["sum"])


@pytest.mark.parametrize("case", MASKS["must_fail"], ids=lambda c: c["description"][:40])
def test_key_agreement_must_fail(case: dict[str, Any]) -> None:
    raises_exactly(case["expected_error"], agree, load_private_key(hx(case["private_hex"])),
                   hx(case["peer_public_hex"]))


# --- encodings ----------------------------------------------------------------------------------
ENC = load("encodings.json")


def test_envelope_encoding() -> None:
    e = ENC["envelope"]
    env = Envelope(protocol=e["protocol"], stage=e["stage"], session=hx(e["session_hex"]),
                   round=e["round"], src=e["src"], dst=e["dst"], fields=e["fields"],
                   body=hx(e["body_hex"]))
    assert env.header_json().decode() == e["header_json"]
    assert env.encode().hex() == e["unsigned_hex"]
    signer = SigningKey(hx(e["signing_key_hex"]))
    assert signer.verify_key.raw.hex() == e["verify_key_hex"]
    signed = env.encode(signer)
    assert signed.hex() == e["signed_hex"]
    assert signature_message(signed[:-64]).hex() == e["signature_message_hex"]
    assert signature_message(signed[:-64]) == hx(e["signature_label_hex"]) + \
        blake3.blake3(signed[:-64]).digest()
    unsigned = hx(e["unsigned_hex"])
    magic, version, flags, hlen, blen = struct.unpack_from(">3sBBIQ", unsigned)
    header = e["header_json"].encode()
    pad = -(17 + len(header)) % 16  # spaces align the (non-empty) body at 16 bytes
    assert (magic, version, flags, hlen, blen) == (b"FCS", 1, 0, len(header) + pad,
                                                   len(hx(e["body_hex"])))
    assert unsigned[17:17 + hlen] == header + b" " * pad and (17 + hlen) % 16 == 0
    assert hx(e["signed_hex"])[4] == 1
    got = decode(hx(e["signed_hex"]))
    assert got.fields == e["fields"] and got.body.hex() == e["body_hex"]
    got.verify(VerifyKey(hx(e["verify_key_hex"])))
    # the MACed form: flag bit 1 and a one-time GMAC tag over everything before it
    key = M.client_mac_keys(hx(e["mac_shared_secret_hex"]),
                            M.kdf_context(env.session, env.round), e["mac_node"])[env.stage]
    assert key.hex() == e["mac_key_hex"]
    maced = env.encode(mac_key=key)
    assert maced.hex() == e["maced_hex"] and maced[4] == 2
    assert AESGCM(key).encrypt(bytes(12), b"", maced[:-16]) == maced[-16:]  # GMAC
    decode(maced).verify_mac(key)


def test_key_bundle_encoding() -> None:
    b = ENC["key_bundle"]
    digest = M.params_digest(b["advertised_params"])
    assert digest.hex() == b["params_digest_hex"]
    # the per-client neighbour list is not part of the digest; every shared parameter is
    assert M.params_digest({**b["advertised_params"], M.F_NEIGHBOURS: [9]}) == digest
    for key in M.SHARED_PARAMS:
        changed = {**b["advertised_params"], key: "changed"}
        assert M.params_digest(changed) != digest, key
    msg = M.KeyBundle.signed_bytes(hx(b["session_hex"]), b["round"], b["node"],
                                   hx(b["cipher_pk_hex"]), hx(b["mask_pk_hex"]),
                                   hx(b["sig_pk_hex"]), digest)
    assert msg.hex() == b["signed_bytes_hex"]
    signer = SigningKey(hx(b["signing_key_hex"]))
    assert signer.sign(msg).hex() == b["signature_hex"]
    VerifyKey(hx(b["sig_pk_hex"])).verify(hx(b["signature_hex"]), msg)
    bundle = M.KeyBundle.from_bytes(b["node"], hx(b["bundle_hex"]))
    assert (bundle.cipher_pk.hex(), bundle.mask_pk.hex(), bundle.sig_pk.hex(),
            bundle.signature.hex()) == (b["cipher_pk_hex"], b["mask_pk_hex"], b["sig_pk_hex"],
                                        b["signature_hex"])
    assert len(hx(b["bundle_hex"])) == M.BUNDLE_SIZE == 160


def test_share_plaintext_and_commitment() -> None:
    s = ENC["share_plaintext"]
    pt = M.share_plaintext(s["src"], s["dst"], hx(s["b_share_hex"]), hx(s["s_share_hex"]))
    assert pt.hex() == s["plaintext_hex"]
    assert M.parse_share_plaintext(pt) == (s["src"], s["dst"], hx(s["b_share_hex"]),
                                           hx(s["s_share_hex"]))
    assert s["sealed_size"] == M.SEALED_SHARE_SIZE == 12 + len(pt) + 16
    c = ENC["b_commitment"]
    assert M.b_commitment(hx(c["session_hex"]), c["round"], c["node"],
                          hx(c["b_seed_hex"])).hex() == c["commitment_hex"]


def test_graphs_and_params() -> None:
    for n, d in ENC["default_degree"].items():
        assert default_degree(int(n)) == d
    for g in ENC["harary_graphs"]:
        got = harary_graph(g["nodes"], g["degree"], rng(g["rng_seed"]))
        assert {str(u): sorted(v) for u, v in got.items()} == g["neighbours"]
        ring, n, half = g["ring_order"], len(g["ring_order"]), g["degree"] // 2
        for i, u in enumerate(ring):
            want = sorted(ring[(i + k) % n] for k in range(-half, half + 1) if k)
            assert g["neighbours"][str(u)] == want
    for p in ENC["round_params"]:
        r = RoundParams.resolve(MaskingConfig.from_dict(p["config"]), p["n_nodes"],
                                p["threshold_argument"])
        assert (r.threshold, r.share_threshold, r.graph, r.degree) == (
            p["threshold"], p["share_threshold"], p["graph"], p["degree"])
        assert r.values == _spec(p["values"]) and r.weight == _spec(p["weight"])


def test_test_rng() -> None:
    for t in ENC["test_rng"]:
        seed = hx(t["seed"]) if t["seed_kind"] == "bytes" else t["seed"]
        assert rng(seed).bytes(64).hex() == t["first_64_bytes_hex"]
        raw = seed if isinstance(seed, bytes) else (
            seed.to_bytes(16, "little", signed=True) if isinstance(seed, int) else seed.encode())
        key = hashlib.sha256(b"fedcollm-secure/insecure-test-rng\x00" + raw).digest()
        assert expand_seed(key, 16, 32).astype("<u4").tobytes().hex() == t["first_64_bytes_hex"]


# --- protocol runs ------------------------------------------------------------------------------
E2E = load("end_to_end.json")
MUST_FAIL = load("must_fail.json")


def build(sc: dict[str, Any]) -> tuple[MaskingServer, dict[str, MaskingClient]]:
    config = MaskingConfig.from_dict(sc["config"])
    seeds = sc["rng_seeds"]
    session = hx(sc["session_hex"])
    updates = {c: {k: np.array(v, dtype=np.float64) for k, v in sc["inputs"][c].items()}
               for c in sc["clients"]}
    spec = TensorSpec.of(updates[sc["clients"][0]])
    server = MaskingServer(sc["clients"], spec, config=config, threshold=sc["threshold"],
                           rng=rng(seeds["server"]), session=session, round_=sc["round"])
    clients = {c: MaskingClient(c, updates[c], weight=sc["weights"][c], config=config,
                                rng=rng(seeds[c]), session=session, round_=sc["round"])
               for c in sc["clients"]}
    return server, clients


def honest_run(sc: dict[str, Any], drops: dict[str, str]) -> tuple[
        MaskingServer, dict[str, MaskingClient], list[tuple[str, str, str, bytes]]]:
    server, clients = build(sc)
    log: list[tuple[str, str, str, bytes]] = []
    gone: set[str] = set()
    while (req := server.next_requests()) is not None:
        replies = {}
        for cid, msg in req.messages.items():
            log.append((req.stage, "request", cid, msg))
            if cid in gone or drops.get(cid) == req.stage:
                gone.add(cid)
                continue
            replies[cid] = clients[cid].process(msg)
            log.append((req.stage, "reply", cid, replies[cid]))
        server.receive(req.stage, replies)
    return server, clients, log


def flat_sum(server: MaskingServer) -> list[float]:
    res = server.result()
    return [float(x) for name, _ in server.spec.entries for x in np.asarray(res.sum[name]).ravel()]


def check_result(server: MaskingServer, want: dict[str, Any]) -> None:
    res = server.result()
    assert res.survivors == want["survivors"]
    assert res.dropped == want["dropped"]
    assert res.stats["late_dropouts"] == want["late_dropouts"]
    assert {k: [float(x) for x in np.asarray(v).ravel()] for k, v in res.sum.items()} == want["sum"]
    assert res.weight_total == want["weight_total"]
    p = server.params
    ring = np.array(as_ints(want["ring_sum"]), dtype=np.uint64)
    assert [float(x) for x in p.values.dequantize(ring[:-1])] == flat_sum(server)
    assert float(p.weight.dequantize(ring[-1:])[0]) == want["weight_total"]
    plain = np.array(want["plaintext_weighted_clipped_sum"])
    assert np.all(np.abs(np.array(flat_sum(server)) - plain) < want["error_bound"])


@pytest.mark.parametrize("inst", E2E["instances"], ids=lambda i: i["name"])
def test_end_to_end_live(inst: dict[str, Any]) -> None:
    """Deterministic parties reproduce every message byte and the stored sum."""
    server, clients, log = honest_run(inst, inst["drop"] or {})
    stored = inst["messages"]
    assert [(s, d, c) for s, d, c, _ in log] == [(m["stage"], m["direction"], m["client"])
                                                 for m in stored]
    for (stage, direction, cid, data), m in zip(log, stored, strict=True):
        assert hashlib.sha256(data).hexdigest() == m["sha256"], (stage, direction, cid)
        assert data.hex() == m["hex"]
        assert hashlib.sha256(hx(m["hex"])).hexdigest() == m["sha256"]
    check_result(server, inst["result"])
    p = server.params
    assert server.length == inst["params"]["length"]
    assert (p.threshold, p.share_threshold, p.graph, p.degree) == (
        inst["params"]["threshold"], inst["params"]["share_threshold"], inst["params"]["graph"],
        inst["params"]["degree"])
    assert {str(u): sorted(v) for u, v in server.graph.items()} == inst["neighbours"]
    for cid, info in inst["parties"].items():
        assert clients[cid].signer.private_bytes().hex() == info["signing_key_hex"]
        assert clients[cid].revealed == info["revealed"]


@pytest.mark.parametrize("inst", E2E["instances"], ids=lambda i: i["name"])
def test_end_to_end_decomposition(inst: dict[str, Any]) -> None:
    """masked = quantized + PRG(b) + pairwise mask, and the quantized inputs sum to ring_sum."""
    bits = inst["params"]["values"]["ring_bits"]
    r = 1 << bits
    length = inst["params"]["length"]
    total = [0] * length
    for cid in inst["result"]["survivors"]:
        info = inst["parties"][cid]
        self_mask = [int(x) for x in expand_seed(hx(info["b_seed_hex"]), length, bits)]
        assert self_mask == as_ints(info["self_mask"])
        parts = zip(as_ints(info["quantized"]), self_mask, as_ints(info["pairwise_mask"]),
                    strict=True)
        assert [(a + b + c) % r for a, b, c in parts] == as_ints(info["masked"])
        total = [(a + b) % r for a, b in zip(total, as_ints(info["quantized"]), strict=True)]
    assert total == as_ints(inst["result"]["ring_sum"])


@pytest.mark.parametrize("inst", E2E["instances"], ids=lambda i: i["name"])
def test_end_to_end_pairwise_masks_from_keys(inst: dict[str, Any]) -> None:
    """Each contributor's pairwise mask follows from the mask keys by the formula of SPEC §8."""
    bits = inst["params"]["values"]["ring_bits"]
    length = inst["params"]["length"]
    ctx = M.kdf_context(hx(inst["session_hex"]), inst["round"])
    node_of = inst["nodes"]
    client_of = {n: c for c, n in node_of.items()}
    for cid in inst["result"]["survivors"]:
        info, u = inst["parties"][cid], node_of[cid]
        mask = [0] * length
        for v in info["peers"]:
            peer_pk = public_of(hx(inst["parties"][client_of[v]]["mask_sk_hex"]))
            seed = derive_key(agree(load_private_key(hx(info["mask_sk_hex"])), peer_pk), ctx,
                              purpose="pairwise-mask", pair=(min(u, v), max(u, v)))
            sign = 1 if u < v else -1
            prg = [int(x) for x in expand_seed(seed, length, bits)]
            mask = [(a + sign * b) % (1 << bits) for a, b in zip(mask, prg, strict=True)]
        assert mask == as_ints(info["pairwise_mask"])


@pytest.mark.parametrize("inst", E2E["instances"], ids=lambda i: i["name"])
def test_end_to_end_rng_draw_order(inst: dict[str, Any]) -> None:
    """The client draw order documented in SPEC §13 reproduces keys, nonces and quantisation."""
    p = inst["params"]
    t_s, length = p["share_threshold"], p["length"]
    values_q, weight_q = _spec(p["values"]), _spec(p["weight"])
    msgs = {(m["stage"], m["direction"], m["client"]): hx(m["hex"]) for m in inst["messages"]}
    for cid in inst["result"]["survivors"]:
        info, u = inst["parties"][cid], inst["nodes"][cid]
        r = rng(inst["rng_seeds"][cid])
        assert r.bytes(32).hex() == info["signing_key_hex"]
        assert r.bytes(32).hex() == info["cipher_sk_hex"]
        assert r.bytes(32).hex() == info["mask_sk_hex"]
        assert r.bytes(32).hex() == info["b_seed_hex"]
        for _ in range(2 * (t_s - 1)):  # coefficients of b, then of the mask key
            while int.from_bytes(r.bytes(33), "big") & (2**257 - 1) >= PRIME:
                pass
        bundles = split(msgs[(M.SHARE_KEYS, "request", cid)])[0]["fields"][M.F_BUNDLES]
        sealed = split(msgs[(M.SHARE_KEYS, "reply", cid)])[0]["fields"][M.F_SHARES]
        for v in bundles:  # JSON object order
            if v != str(u):
                assert base64.b64decode(sealed[v])[:12] == r.bytes(12)
        x = np.concatenate([np.asarray(inst["inputs"][cid][name], dtype=np.float64).ravel()
                            for name, _ in inst["tensor_spec"]])
        c = values_q.clip / weight_q.clip
        w = inst["weights"][cid]
        y = np.concatenate([values_q.quantize(np.clip(x, -c, c) * w, FixedBytes(r.bytes(32))),
                            weight_q.quantize(np.array([w]), FixedBytes(r.bytes(32)))])
        assert len(y) == length
        assert [int(q) for q in y] == as_ints(info["quantized"])


@pytest.mark.parametrize("inst", E2E["instances"], ids=lambda i: i["name"])
def test_end_to_end_server_replay(inst: dict[str, Any]) -> None:
    """A fresh server fed the stored client replies emits the stored requests and the sum."""
    server, _ = build(inst)
    msgs = inst["messages"]
    while (req := server.next_requests()) is not None:
        want_req = {m["client"]: m["hex"] for m in msgs
                    if m["stage"] == req.stage and m["direction"] == "request"}
        assert {c: b.hex() for c, b in req.messages.items()} == want_req
        replies = {m["client"]: hx(m["hex"]) for m in msgs
                   if m["stage"] == req.stage and m["direction"] == "reply"}
        server.receive(req.stage, replies)
    check_result(server, inst["result"])


# --- must-fail cases ----------------------------------------------------------------------------
def split(data: bytes) -> tuple[Any, bytes]:
    data = bytes(data)  # replies may be read-only views (masked inputs are built in place)
    _, _, _, hlen, blen = struct.unpack_from(">3sBBIQ", data)
    return json.loads(data[17:17 + hlen]), data[17 + hlen:17 + hlen + blen]


def unsigned(header: Any, body: bytes, text: bytes | None = None) -> bytes:
    h = text if text is not None else json.dumps(header, sort_keys=True,
                                                 separators=(",", ":")).encode()
    return struct.pack(">3sBBIQ", b"FCS", 1, 0, len(h), len(body)) + h + body


def apply_edits(data: bytes, edits: list[dict[str, Any]], signers: dict[str, SigningKey],
                sender: str, genuine: dict[tuple[str, str, str], bytes],
                clients: dict[str, MaskingClient] | None = None) -> bytes:
    for e in edits:
        op = e["op"]
        if op in ("set", "delete", "set_body", "set_header_text"):
            header, body = split(data)
            text = e["text"].encode() if op == "set_header_text" else None
            if op == "set_body":
                body = hx(e["hex"])
            elif op in ("set", "delete"):
                obj = header
                for k in e["path"][:-1]:
                    obj = obj[k]
                if op == "set":
                    obj[e["path"][-1]] = e["value"]
                else:
                    del obj[e["path"][-1]]
            data = unsigned(header, body, text)
        elif op == "sign":
            b = bytearray(data)
            b[4] |= 1
            data = bytes(b) + signers[sender if e["key"] == "sender" else e["key"]].sign(
                signature_message(bytes(b)))
        elif op == "mac":
            assert clients is not None
            c = clients[sender if e["key"] == "sender" else e["key"]]
            key = c.mac_keys[split(data)[0]["stage"]]
            b = bytearray(data)
            b[4] |= 2
            data = bytes(b) + mac_tag(key, bytes(b))
        elif op == "strip_trailer":
            b = bytearray(data[:len(data) - (64 if data[4] & 1 else 16 if data[4] & 2 else 0)])
            b[4] &= 0xFC
            data = bytes(b)
        elif op == "flip_bit":
            b = bytearray(data)
            b[e["offset"]] ^= 1 << e["bit"]
            data = bytes(b)
        elif op == "overwrite":
            b = bytearray(data)
            patch = hx(e["hex"])
            b[e["offset"]:e["offset"] + len(patch)] = patch
            data = bytes(b)
        elif op == "truncate":
            data = data[:e["length"]]
        elif op == "append":
            data += hx(e["hex"])
        elif op == "replace_with":
            data = genuine[(e["stage"], e["direction"], e["client"])]
        else:
            raise AssertionError(f"unknown edit op {op!r}")
    return data


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    sc = MUST_FAIL["scenarios"][case["scenario"]]
    drops = case["drops"] if "drops" in case else (sc["drop"] or {})
    genuine: dict[tuple[str, str, str], bytes] = {}
    signers: dict[str, SigningKey] = {}
    clients0: dict[str, MaskingClient] = {}
    if "edits" in case:
        _, clients0, log = honest_run(sc, drops)
        genuine = {(s, d, c): b for s, d, c, b in log}
        signers = {c: cl.signer for c, cl in clients0.items()}
    server, clients = build(sc)
    gone: set[str] = set()
    while (req := server.next_requests()) is not None:
        replies = {}
        at_stage = case.get("stage") == req.stage
        for cid, msg in req.messages.items():
            if cid in gone or drops.get(cid) == req.stage:
                gone.add(cid)
                continue
            target = at_stage and case["client"] == cid
            if target and case["direction"] == "request":
                data = apply_edits(msg, case["edits"], signers, "server", genuine, clients0)
                seen: dict[str, Any] = {"delivered": data}
                try:
                    clients[cid].process(data)
                    seen["error"] = None
                except Exception as exc:  # noqa: BLE001 - any class is reported, typed or not
                    seen["error"] = exc
                if case.get("then_deliver_genuine"):
                    try:
                        clients[cid].process(msg)
                        seen["then_error"] = None
                    except Exception as exc:  # noqa: BLE001
                        seen["then_error"] = exc
                return seen
            reply = clients[cid].process(msg)
            if target and case["direction"] == "reply":
                reply = apply_edits(reply, case["edits"], signers, cid, genuine, clients0)
                delivered = reply
            replies[cid] = reply
        outcome, raised = "continues", None
        try:
            server.receive(req.stage, replies)
        except errors.FedCoLLMSecureError as exc:
            outcome, raised = f"{type(exc).__name__} after {req.stage}", exc
        if at_stage and case.get("direction") == "reply":
            return {"delivered": delivered, "rejected": server.rejected.get(case["client"]),
                    "outcome": outcome}
        if raised is not None:
            return {"raised": raised, "stage": req.stage}
    return {"completed": True}


def _case_id(case: dict[str, Any]) -> str:
    return str(case["id"])


@pytest.mark.parametrize("case", MUST_FAIL["cases"], ids=_case_id)
def test_must_fail(case: dict[str, Any]) -> None:
    want = case["expected_error"]
    cls = error_class(want)
    seen = run_case(case)
    if case["observed_by"] == "client":
        assert seen["delivered"].hex() == case["delivered_hex"]
        assert hashlib.sha256(seen["delivered"]).hexdigest() == case["delivered_sha256"]
        assert isinstance(seen["error"], cls) and type(seen["error"]) is cls, seen["error"]
        if "then_expected_error" in case:
            then = error_class(case["then_expected_error"])
            assert type(seen["then_error"]) is then, seen["then_error"]
    elif case["observed_by"] == "server":
        assert seen["delivered"].hex() == case["delivered_hex"]
        assert seen["rejected"] is not None, "the server accepted the edited reply"
        assert seen["rejected"].startswith(f"{case['stage']}: {want}: "), seen["rejected"]
        assert seen["outcome"] == case["round_outcome"]
    else:
        assert case["observed_by"] == "server_abort"
        assert type(seen.get("raised")) is cls, seen
        assert seen["stage"] == case["raised_after"]


@pytest.mark.parametrize("case", MUST_FAIL["known_bugs"], ids=_case_id)
def test_must_fail_known_bugs(case: dict[str, Any]) -> None:
    """Cases the implementation does not get right yet: they pass once the bug is fixed."""
    seen = run_case(case)
    assert seen["delivered"].hex() == case["delivered_hex"]
    if type(seen["error"]).__name__ != case["expected_error"]:
        pytest.xfail(f"known bug: {case['known_bug']}")


def test_must_fail_covers_every_stage_and_side() -> None:
    cases = MUST_FAIL["cases"]
    for stage in M.STAGES:
        assert any(c.get("stage") == stage and c["direction"] == "request" for c in cases
                   if c["observed_by"] == "client"), stage
        assert any(c.get("stage") == stage for c in cases if c["observed_by"] == "server"), stage
        assert any(c.get("raised_after") == stage for c in cases
                   if c["observed_by"] == "server_abort"), stage
