#!/usr/bin/env python
"""Regenerate the ``ckks/v1`` test vectors from the reference implementation.

Run from the repository root::

    .venv/bin/python protocols/ckks/v1/generate_vectors.py

Deterministic: every value comes from fixed inputs (Ed25519 signatures are deterministic),
so running the script twice writes byte-identical files. Ciphertexts are random (SEAL's own
generator), so the must-fail cases are edits that ``tests/test_ckks_vectors.py`` applies to a
freshly run honest round. Byte strings are lowercase hex in keys ending ``_hex``; integers
that may reach 2**53 are decimal strings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedcollm_secure.crypto.signatures import SigningKey
from fedcollm_secure.errors import ConfigError
from fedcollm_secure.secagg.ckks import PRESETS, CKKSConfig, he
from fedcollm_secure.secagg.ckks.messages import AUTHORITY, receipt_bytes

HERE = Path(__file__).resolve().parent
VECTORS = HERE / "vectors"
PROTOCOL = "ckks/v1"
FORMAT_VERSION = 1


def write(name: str, doc: dict[str, Any]) -> None:
    doc = {"protocol": PROTOCOL, "version": FORMAT_VERSION, **doc}
    (VECTORS / name).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n",
                                encoding="utf-8")


def params_vectors() -> dict[str, Any]:
    valid_options: list[dict[str, Any]] = [
        {}, {"preset": "n16384"}, {"coeff_mod_bit_sizes": [60, 40, 40, 60]},
        {"poly_modulus_degree": 16384, "coeff_mod_bit_sizes": [60, 50, 50, 50, 60],
         "scale_bits": 50},
        {"poly_modulus_degree": 4096, "coeff_mod_bit_sizes": [40, 20, 40], "scale_bits": 20},
    ]
    invalid: list[tuple[dict[str, Any], str]] = [
        ({"coeff_mod_bit_sizes": [60, 40, 40, 60, 60]}, "HE-standard limit"),
        ({"poly_modulus_degree": 4096}, "HE-standard limit"),
        ({"poly_modulus_degree": 32768, "coeff_mod_bit_sizes": [60] * 15}, "HE-standard limit"),
        ({"poly_modulus_degree": 2048, "coeff_mod_bit_sizes": [30, 20, 30],
          "scale_bits": 20}, "must be one of"),
        ({"scale_bits": 55}, "scale_bits must be in"),
        ({"coeff_mod_bit_sizes": [45, 40, 60]}, "must exceed scale_bits"),
        ({"coeff_mod_bit_sizes": [60, 30, 60]}, "middle primes"),
        ({"coeff_mod_bit_sizes": [60, 40, 50]}, "special"),
        ({"coeff_mod_bit_sizes": [60, 40, 61]}, "20 to 60 bits"),
        ({"coeff_mod_bit_sizes": [60]}, "at least two primes"),
        ({"preset": "n4096"}, "not one of"),
        ({"min_threshold": 1}, "min_threshold"),
        ({"n_threads": 0}, "n_threads"),
        ({"unknown": 1}, "unknown key"),
    ]
    cases: list[dict[str, Any]] = []
    for options in valid_options:
        params = CKKSConfig.from_dict(options).params()
        primes = he._chain(params)[0]
        cases.append({"options": options, "valid": True, "describe": params.describe(),
                      "primes": [str(q) for q in primes]})
    for options, match in invalid:
        try:
            CKKSConfig.from_dict(options)
        except ConfigError as exc:
            if match not in str(exc):
                raise SystemExit(f"{options}: message {exc} lacks {match!r}") from None
        else:
            raise SystemExit(f"{options} was accepted")
        cases.append({"options": options, "valid": False, "error": "ConfigError",
                      "match": match})
    bounds = [{"options": {}, "n_clients": n, "max_abs": CKKSConfig().max_abs_for(n)}
              for n in (2, 10, 100)]
    return {"description": "CKKS parameter presets and custom combinations: valid ones with "
            "their documented security and precision (and SEAL's primes), invalid ones with "
            "the error class and a fragment of its message; per-client bounds max_abs.",
            "presets": sorted(PRESETS), "cases": cases, "max_abs": bounds}


def encoding_vectors() -> dict[str, Any]:
    key = SigningKey(bytes(range(32)))
    session = bytes.fromhex("636b6b732f76312f766563746f727321")
    context = b"an example serialized public context"
    ciphertext = b"an example serialized ciphertext"
    cdig, tdig = he.context_digest(context), he.ciphertext_digest(ciphertext)
    receipts = []
    for round_, node in ((0, 1), (7, 3), (2**40, 2**20)):
        msg = receipt_bytes(session, round_, node, cdig, tdig)
        receipts.append({"round": round_, "node": node, "receipt_bytes_hex": msg.hex(),
                         "signature_hex": key.sign(msg).hex()})
    chunks = [{"length": n, "slots": s, "chunks": -(-n // s)}
              for n, s in ((1, 4096), (4096, 4096), (4097, 4096), (2**20 + 2, 4096),
                           (2**20 + 2, 8192))]
    return {"description": "Digests, contribution receipts (signed with a fixed Ed25519 key) "
            "and chunk counts of ckks/v1.",
            "authority_index": AUTHORITY,
            "context_bytes_hex": context.hex(), "context_digest_hex": cdig.hex(),
            "ciphertext_bytes_hex": ciphertext.hex(), "ciphertext_digest_hex": tdig.hex(),
            "session_hex": session.hex(), "signing_key_hex": key.private_bytes().hex(),
            "verify_key_hex": key.verify_key.raw.hex(), "receipts": receipts,
            "chunks": chunks}


def must_fail_vectors() -> dict[str, Any]:
    reply = [  # edits of client c2's honest encrypted_input reply -> reason recorded
        ("truncated message", False, {"op": "truncate", "bytes": 100}, "WireFormatError"),
        ("bit flip in the ciphertext, unsigned", False,
         {"op": "flip_body_bit", "from_end": 5000, "bit": 3}, "CiphertextError"),
        ("bit flip in the ciphertext, signed", True,
         {"op": "flip_body_bit", "from_end": 5000, "bit": 3}, "SignatureError"),
        ("ciphertext cut, envelope re-encoded", False,
         {"op": "cut_body", "bytes": 1000}, "CiphertextError"),
        ("ciphertext cut, digest recomputed", False,
         {"op": "cut_body", "bytes": 1000, "fix_digest": True}, "CiphertextError"),
        ("another context", False,
         {"op": "set_field", "field": "context_digest", "value_hex": "00" * 32},
         "CiphertextError"),
        ("wrong length", False, {"op": "set_field", "field": "length", "value": 3},
         "CiphertextError"),
        ("unknown field", False, {"op": "set_field", "field": "extra", "value": 1},
         "WireFormatError"),
        ("another session", False, {"op": "set_session", "session_hex": "01" * 16},
         "SessionMismatchError"),
        ("another round", False, {"op": "set_round", "round": 99}, "ReplayError"),
        ("claims another sender", False, {"op": "set_src", "src": 1}, "PartyError"),
        ("signature removed", True, {"op": "unsign"}, "SignatureError"),
        ("receipt removed", True, {"op": "drop_field", "field": "receipt", "resign": True},
         "WireFormatError"),
    ]
    authority = [  # edits of the aggregator's decrypt request -> error raised by the KA
        ("below threshold", {"op": "contributors", "value": [1, 2]}, "ThresholdError"),
        ("duplicate contributor", {"op": "contributors", "value": [1, 1, 2]}, "PartyError"),
        ("unknown contributor", {"op": "contributors", "value": [1, 2, 9]}, "PartyError"),
        ("one ciphertext presented as three", {"op": "single_ciphertext"}, "CiphertextError"),
        ("forged receipt", {"op": "forge_receipt", "node": 2}, "SignatureError"),
        ("missing receipt", {"op": "drop_receipt", "node": 2}, "PartyError"),
        ("another context", {"op": "context_digest_hex", "value_hex": "11" * 32},
         "CiphertextError"),
        ("second decryption of the round", {"op": "repeat"}, "StageError"),
        ("sent by a client", {"op": "src", "value": 1}, "PartyError"),
    ]
    return {"description": "Edits a conforming party must refuse. 'reply' cases edit client "
            "c2's honest encrypted_input reply in a round of clients c1..c4 (options: sign as "
            "given; threshold 3) and expect the aggregator to record the named error class "
            "(exact) as its reason for rejecting c2, while the round completes with c1, c3, "
            "c4. 'authority' cases edit the aggregator's decrypt request of an honest signed "
            "round and expect the key authority to raise the named class and decrypt nothing.",
            "reply": [{"name": n, "sign": s, "edit": e, "error": err}
                      for n, s, e, err in reply],
            "authority": [{"name": n, "edit": e, "error": err} for n, e, err in authority]}


def main() -> None:
    VECTORS.mkdir(parents=True, exist_ok=True)
    write("params.json", params_vectors())
    write("encodings.json", encoding_vectors())
    write("must_fail.json", must_fail_vectors())
    print(f"wrote {sorted(p.name for p in VECTORS.glob('*.json'))} to {VECTORS}")


if __name__ == "__main__":
    main()
