"""The implementation against the committed ``protocols/ckks/v1`` test vectors.

Nothing here regenerates the vectors; expected values and error classes are read from the
JSON files. Regenerate deliberately with ``.venv/bin/python
protocols/ckks/v1/generate_vectors.py`` and review the diff.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedcollm_secure import errors
from fedcollm_secure.crypto.signatures import SigningKey, VerifyKey
from fedcollm_secure.secagg import TensorSpec
from fedcollm_secure.secagg.ckks import CKKSAggregator, CKKSConfig, he
from fedcollm_secure.secagg.ckks.messages import (
    AUTHORITY,
    DECRYPT,
    ENCRYPTED_INPUT,
    envelope,
    receipt_bytes,
)
from fedcollm_secure.wire import SERVER, b64, decode

VECTOR_DIR = Path(__file__).resolve().parents[1] / "protocols" / "ckks" / "v1" / "vectors"
IDS = ["c1", "c2", "c3", "c4"]


def load(name: str) -> dict[str, Any]:
    doc = json.loads((VECTOR_DIR / name).read_text(encoding="utf-8"))
    assert doc["protocol"] == "ckks/v1" and doc["version"] == 1 and doc["description"]
    return doc


def error_class(name: str) -> type[errors.FedCoLLMSecureError]:
    cls = getattr(errors, name)
    assert issubclass(cls, errors.FedCoLLMSecureError)
    return cls


def test_vector_files_present() -> None:
    assert {p.name for p in VECTOR_DIR.glob("*.json")} == {
        "params.json", "encodings.json", "must_fail.json"}


# --- parameters ------------------------------------------------------------------------------
PARAMS = load("params.json")


@pytest.mark.parametrize("case", PARAMS["cases"], ids=lambda c: json.dumps(c["options"]))
def test_parameter_vectors(case: dict[str, Any]) -> None:
    if case["valid"]:
        params = CKKSConfig.from_dict(case["options"]).params()
        assert params.describe() == case["describe"]
        assert [str(q) for q in he._chain(params)[0]] == case["primes"]
        assert [q.bit_length() for q in map(int, case["primes"])] == \
            case["describe"]["coeff_mod_bit_sizes"]
    else:
        with pytest.raises(error_class(case["error"]), match=case["match"]):
            CKKSConfig.from_dict(case["options"])


def test_max_abs_vectors() -> None:
    for case in PARAMS["max_abs"]:
        assert CKKSConfig.from_dict(case["options"]).max_abs_for(case["n_clients"]) == \
            case["max_abs"]


# --- encodings -------------------------------------------------------------------------------
def test_encoding_vectors() -> None:
    doc = load("encodings.json")
    assert AUTHORITY == doc["authority_index"]
    cdig = he.context_digest(bytes.fromhex(doc["context_bytes_hex"]))
    tdig = he.ciphertext_digest(bytes.fromhex(doc["ciphertext_bytes_hex"]))
    assert cdig.hex() == doc["context_digest_hex"] and tdig.hex() == doc["ciphertext_digest_hex"]
    key = SigningKey(bytes.fromhex(doc["signing_key_hex"]))
    assert key.verify_key.raw.hex() == doc["verify_key_hex"]
    verify = VerifyKey(bytes.fromhex(doc["verify_key_hex"]))
    session = bytes.fromhex(doc["session_hex"])
    for r in doc["receipts"]:
        msg = receipt_bytes(session, r["round"], r["node"], cdig, tdig)
        assert msg.hex() == r["receipt_bytes_hex"]
        assert key.sign(msg).hex() == r["signature_hex"]
        verify.verify(bytes.fromhex(r["signature_hex"]), msg)
        with pytest.raises(errors.SignatureError):
            verify.verify(bytes.fromhex(r["signature_hex"]),
                          receipt_bytes(session, r["round"] + 1, r["node"], cdig, tdig))
    for c in doc["chunks"]:
        params = CKKSConfig(preset="n8192" if c["slots"] == 4096 else "n16384").params()
        assert params.slots == c["slots"] and he.chunks_for(c["length"], params) == c["chunks"]


# --- must-fail -------------------------------------------------------------------------------
MUST_FAIL = load("must_fail.json")


def honest_round(sign: bool) -> tuple[CKKSAggregator, Any, dict[str, bytes], dict[str, Any]]:
    agg = CKKSAggregator(sign=sign)
    gen = np.random.default_rng(0)
    ups = {c: {"w": gen.uniform(-1, 1, 9)} for c in IDS}
    session = bytes(range(16))
    clients = {c: agg.client(c, ups[c], session=session, round_=2) for c in IDS}
    server = agg.server(IDS, TensorSpec.of(ups["c1"]), threshold=3, session=session, round_=2)
    req = server.next_requests()
    replies = {c: clients[c].process(m) for c, m in req.messages.items()}
    return agg, server, replies, ups


def edit_reply(data: bytes, edit: dict[str, Any], key: SigningKey | None) -> bytes:
    op = edit["op"]
    if op == "truncate":
        return data[:-edit["bytes"]]
    if op == "flip_body_bit":
        b = bytearray(data)
        sig = 64 if decode(data).signature is not None else 0
        b[len(b) - sig - edit["from_end"]] ^= 1 << edit["bit"]
        return bytes(b)
    env = decode(data)
    env.signature = None
    resign = key if edit.get("resign") else None
    if op == "cut_body":
        env.body = bytes(env.body)[:-edit["bytes"]]
        if edit.get("fix_digest"):
            env.fields["ciphertext_digest"] = b64(he.ciphertext_digest(env.body))
    elif op == "set_field":
        env.fields[edit["field"]] = (b64(bytes.fromhex(edit["value_hex"]))
                                     if "value_hex" in edit else edit["value"])
    elif op == "drop_field":
        del env.fields[edit["field"]]
    elif op == "set_session":
        env.session = bytes.fromhex(edit["session_hex"])
    elif op == "set_round":
        env.round = edit["round"]
    elif op == "set_src":
        env.src = edit["src"]
    elif op != "unsign":
        raise AssertionError(f"unknown op {op}")
    return env.encode(resign)


@pytest.mark.parametrize("case", MUST_FAIL["reply"], ids=lambda c: c["name"])
def test_must_fail_replies(case: dict[str, Any]) -> None:
    agg, server, replies, ups = honest_round(case["sign"])
    replies["c2"] = edit_reply(replies["c2"], case["edit"], agg.identities.get("c2"))
    server.receive(ENCRYPTED_INPUT, replies)
    result = server.result()
    assert result.survivors == ["c1", "c3", "c4"]
    assert result.stats["rejected"]["c2"].split(":")[0] == case["error"]
    want = sum(ups[c]["w"] for c in result.survivors)
    assert np.abs(result.sum["w"] - want).max() <= result.stats["params"]["error_bound"]


@pytest.mark.parametrize("case", MUST_FAIL["authority"], ids=lambda c: c["name"])
def test_must_fail_decrypt_requests(case: dict[str, Any]) -> None:
    agg, server, replies, ups = honest_round(True)
    captured: list[bytes] = []
    real = server.authority

    class Captured(Exception):
        pass

    def capture(request: bytes) -> bytes:
        if decode(request).stage == DECRYPT:  # keep the honest request, do not deliver it
            captured.append(request)
            raise Captured
        return real(request)

    server.authority = capture
    with pytest.raises(Captured):
        server.receive(ENCRYPTED_INPUT, replies)
    ka = agg.authority
    assert ka.decryptions == []
    if case["edit"]["op"] == "repeat":
        ka.process(captured[0])  # the honest decryption, then the same request again
        assert len(ka.decryptions) == 1
    env = decode(captured[0])
    edit = case["edit"]
    op = edit["op"]
    if op == "contributors":
        env.fields["contributors"] = edit["value"]
    elif op == "single_ciphertext":
        env.body = decode(replies["c1"]).body
    elif op == "forge_receipt":
        env.fields["receipts"][str(edit["node"])][1] = b64(bytes(64))
    elif op == "drop_receipt":
        del env.fields["receipts"][str(edit["node"])]
    elif op == "context_digest_hex":
        env.fields["context_digest"] = b64(bytes.fromhex(edit["value_hex"]))
    elif op == "src":
        env.src = edit["value"]
    request = envelope(DECRYPT, env.session, env.round, env.src, AUTHORITY, env.fields,
                       bytes(env.body)).encode()
    with pytest.raises(error_class(case["error"])) as info:
        ka.process(request)
    assert type(info.value).__name__ == case["error"]
    assert len(ka.decryptions) == (1 if op == "repeat" else 0)
    assert SERVER == 0
