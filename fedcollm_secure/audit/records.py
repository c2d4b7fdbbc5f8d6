"""Record format of the audit log: canonical JSON, the hash chain, signatures, parsing.

One record per line, each line the canonical JSON of the record followed by ``\\n``::

    {"hash": H, "kind": K, "payload": {...}, "prev": P, "seq": N, "sig": S?, "time": T}

* canonical JSON: ``json.dumps(obj, sort_keys=True, separators=(",", ":"),
  ensure_ascii=True, allow_nan=False)`` (keys sorted, no spaces, ASCII only, no NaN or
  infinity); the line must be byte-for-byte that encoding, so there is exactly one way to
  write a record and no duplicate keys;
* ``hash`` = SHA-256 (hex) of the canonical JSON of ``{seq, time, kind, payload, prev}``;
* ``prev`` = the ``hash`` of the previous line's record; the first record of a file chains
  to the genesis value (32 zero bytes, or a caller-chosen anchor);
* ``sig`` (runs with a signing key only) = Ed25519 signature (hex) over
  :data:`SIG_LABEL` || the 32 bytes of ``hash``;
* ``seq`` counts records from 0 over the whole file (line ``n`` holds ``seq`` ``n - 1``);
* ``time``: UTC, RFC 3339 with microseconds (``2025-01-31T12:00:00.000000Z``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from ..crypto.signatures import SIGNATURE_SIZE, SigningKey, VerifyKey
from ..errors import AuditChainError, AuditLogError, FedCoLLMSecureError

__all__ = [
    "FORMAT",
    "GENESIS",
    "KINDS",
    "MAX_LINE",
    "SIG_LABEL",
    "VERSION",
    "canonical_json",
    "library_versions",
    "parse_record",
    "plain",
    "record_hash",
    "sha256_file",
    "sign_hash",
    "state_digest",
    "verify_hash_signature",
]

FORMAT = "fedcollm-secure/audit-log"
VERSION = 1
GENESIS = "00" * 32
SIG_LABEL = b"fedcollm-secure/audit-record/v1\x00"
MAX_LINE = 64 << 20  # bytes per record line; checked before any JSON is parsed

# record kinds
START = "start"  # opens a run: format, version, run id, signer public key
CONFIG = "config"  # run configuration and library versions
ROUND = "round"  # one aggregation round: participants, survivors, dropouts, parameters
MESSAGES = "messages"  # SHA-256 of every reply the server received in one stage
ARTIFACT = "artifact"  # SHA-256 of a file written by the run (adapters, reports)
DECRYPTION = "decryption"  # a decryption performed by the CKKS key authority
PRIVACY = "privacy"  # privacy spent (epsilon, delta) after a round
NOTE = "note"  # anything else the server wants on record
END = "end"  # closes a run: status and its record count
KINDS = (START, CONFIG, ROUND, MESSAGES, ARTIFACT, DECRYPTION, PRIVACY, NOTE, END)

_BODY_KEYS = frozenset({"seq", "time", "kind", "payload", "prev"})
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX128 = re.compile(r"[0-9a-f]{128}")
_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")
_LIBRARIES = ("fedcollm_secure", "torch", "transformers", "peft", "opacus", "tenseal",
              "cryptography", "flwr", "numpy", "safetensors", "dp-accounting")


def canonical_json(obj: Any) -> bytes:
    """The canonical encoding (sorted keys, compact, ASCII, no NaN/infinity)."""
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                          allow_nan=False).encode("ascii")
    except (TypeError, ValueError, RecursionError) as exc:
        raise AuditLogError(f"record is not canonical JSON data: {exc}"[:300]) from None


def record_hash(body: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of a record's ``{seq, time, kind, payload, prev}``."""
    return hashlib.sha256(canonical_json({k: body[k] for k in _BODY_KEYS})).hexdigest()


def sign_hash(signer: SigningKey, digest_hex: str) -> str:
    return signer.sign(SIG_LABEL + bytes.fromhex(digest_hex)).hex()


def verify_hash_signature(key: VerifyKey, digest_hex: str, sig_hex: str) -> None:
    """Raise :class:`SignatureError` unless ``sig_hex`` signs ``digest_hex`` under ``key``."""
    key.verify(bytes.fromhex(sig_hex), SIG_LABEL + bytes.fromhex(digest_hex))


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def plain(value: Any) -> Any:
    """JSON-safe copy of ``value``: mappings with string keys, lists, finite numbers, strings.

    Tuples and sets become lists (sets sorted), bytes hex, numpy scalars and arrays Python
    numbers and lists, paths strings; non-finite floats become the strings ``"NaN"``,
    ``"Infinity"``, ``"-Infinity"`` (canonical JSON has none).
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((plain(v) for v in value), key=canonical_json)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    item = getattr(value, "item", None)  # numpy / torch scalars
    tolist = getattr(value, "tolist", None)  # numpy arrays, torch tensors
    if callable(tolist):
        return plain(tolist())
    if callable(item):
        return plain(item())
    if hasattr(value, "to_dict"):
        return plain(value.to_dict())
    return str(value)


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries a run depends on (``absent`` if not installed)."""
    import platform

    out = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    if out["fedcollm_secure"] == "absent":
        from .. import __version__

        out["fedcollm_secure"] = __version__
    return out


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> tuple[str, int]:
    """SHA-256 (hex) and size in bytes of a file."""
    digest, size = hashlib.sha256(), 0
    try:
        with Path(path).open("rb") as fh:
            while block := fh.read(chunk):
                digest.update(block)
                size += len(block)
    except OSError as exc:
        raise AuditLogError(f"cannot hash {os.fspath(path)!r}: {exc}") from None
    return digest.hexdigest(), size


def state_digest(state: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of a named-tensor state: sorted names, dtypes, shapes and raw bytes.

    Equal states give equal digests on every machine (little-endian bytes), so a client can
    check that it received the global adapter the audit log names.
    """
    import numpy as np

    from ..secagg.tensors import to_numpy

    digest = hashlib.sha256(b"fedcollm-secure/state-digest/v1\x00")
    for name in sorted(state):
        value = state[name]
        if hasattr(value, "detach") and str(getattr(value, "dtype", "")) == "torch.bfloat16":
            value = value.float()
        arr = np.ascontiguousarray(to_numpy(value))
        arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        digest.update(canonical_json([name, arr.dtype.str, list(arr.shape)]) + b"\x00")
        digest.update(arr.tobytes())
    return digest.hexdigest()


# --- parsing ---------------------------------------------------------------------------------
def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise AuditChainError("record JSON has duplicate keys")
    return out


def _no_constants(name: str) -> Any:
    raise AuditChainError(f"record JSON contains the non-standard constant {name}")


def parse_record(line: bytes, line_no: int | None = None) -> dict[str, Any]:
    """Parse and check one record line (without its newline).

    Checks: size, canonical JSON (byte for byte), exact keys and types, and that ``hash``
    is the SHA-256 of the record body. The chain (``prev``, ``seq``) and the signature are
    checked by the verifier, which knows the neighbours and the key. Raises
    :class:`AuditChainError` (with ``line``) on anything else.
    """
    def fail(message: str, seq: int | None = None) -> AuditChainError:
        return AuditChainError(message, line=line_no, seq=seq)

    if not isinstance(line, (bytes, bytearray)):
        raise fail("a record line must be bytes")
    if len(line) > MAX_LINE:
        raise fail(f"record line of {len(line)} bytes exceeds the limit of {MAX_LINE}")
    try:
        record = json.loads(bytes(line).decode("ascii"), object_pairs_hook=_no_duplicates,
                            parse_constant=_no_constants)
    except AuditChainError as exc:
        raise fail(str(exc)) from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise fail(f"not a JSON record: {type(exc).__name__}: {exc}"[:300]) from None
    if not isinstance(record, dict):
        raise fail("a record must be a JSON object")
    keys = set(record)
    if keys not in (_BODY_KEYS | {"hash"}, _BODY_KEYS | {"hash", "sig"}):
        raise fail(f"record keys {sorted(keys)} are not the record schema")
    seq = record["seq"]
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < 1 << 62:
        raise fail("seq must be a non-negative integer")
    if not isinstance(record["kind"], str) or record["kind"] not in KINDS:
        raise fail(f"unknown record kind {str(record['kind'])[:40]!r}", seq)
    if not isinstance(record["time"], str) or not _TIME.fullmatch(record["time"]):
        raise fail("time must be RFC 3339 UTC with microseconds", seq)
    if not isinstance(record["payload"], dict):
        raise fail("payload must be an object", seq)
    for key in ("prev", "hash"):
        if not isinstance(record[key], str) or not _HEX64.fullmatch(record[key]):
            raise fail(f"{key} must be 64 lowercase hex digits", seq)
    if "sig" in record and (not isinstance(record["sig"], str)
                            or not _HEX128.fullmatch(record["sig"])):
        raise fail(f"sig must be {2 * SIGNATURE_SIZE} lowercase hex digits", seq)
    try:
        canonical = canonical_json(record)
    except FedCoLLMSecureError:
        raise fail("record is not canonical JSON", seq) from None
    if canonical != bytes(line):
        raise fail("record line is not in canonical form (edited by hand?)", seq)
    if record_hash(record) != record["hash"]:
        raise fail("hash does not match the record: the record was edited", seq)
    return record
