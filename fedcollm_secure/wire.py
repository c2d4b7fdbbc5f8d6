"""Versioned wire envelope shared by every protocol. No pickle.

Layout (all integers big-endian)::

    0   4  magic+version  b"FCS" || WIRE_VERSION
    4   1  flags          bit 0: a 64-byte Ed25519 signature trails the message
                          bit 1: a 16-byte one-time GMAC tag trails it instead
    5   4  header_len
    9   8  body_len
    17  .. header         canonical UTF-8 JSON object (sorted keys, no spaces); before a
                          non-empty body, padded with spaces to end at a multiple of 16
    ..  .. body           raw bytes (e.g. a little-endian ring vector), may be empty
    ..  64 signature      over every byte before it, present iff flag bit 0
    ..  16 MAC tag        over every byte before it, present iff flag bit 1 (never both)

Sizes are checked against limits, and against the actual length, before any JSON is parsed.
The header always carries ``protocol``, ``stage``, ``session`` (hex), ``round``, ``src``,
``dst`` and ``fields`` (the stage's message fields; bytes as base64 strings).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import blake3
import numpy as np

from .crypto.mac import MAC_TAG_SIZE, mac_tag, verify_mac
from .crypto.signatures import SIGNATURE_SIZE, SigningKey, VerifyKey
from .errors import (
    MacError,
    PartyError,
    ReplayError,
    SessionMismatchError,
    StageError,
    WireFormatError,
)

MAGIC = b"FCS"
WIRE_VERSION = 1
PREFIX = struct.Struct(">3sBBIQ")
FLAG_SIGNED = 1
FLAG_MAC = 2
SERVER = 0  # party index of the server
DEFAULT_MAX_HEADER = 4 << 20
DEFAULT_MAX_BODY = 1 << 31
_CANONICAL_INDEX = re.compile(r"0|[1-9][0-9]{0,18}")
SIG_LABEL = b"fedcollm-secure/envelope-signature/blake3/v1\x00"
_HEADER_KEYS = {"protocol", "stage", "session", "round", "src", "dst", "fields"}
BODY_ALIGN = 16


Message: TypeAlias = bytes | memoryview
"""An encoded envelope: bytes, or a read-only byte view of a buffer the sender built in place
(:meth:`Envelope.encode_in_place`). Transports carry either; :func:`decode` reads both."""


@dataclass(frozen=True)
class Limits:
    max_header: int = DEFAULT_MAX_HEADER
    max_body: int = DEFAULT_MAX_BODY


def nbytes(data: bytes | memoryview) -> int:
    return memoryview(data).nbytes


@dataclass
class Envelope:
    protocol: str
    stage: str
    session: bytes
    round: int
    src: int
    dst: int
    fields: dict[str, Any] = field(default_factory=dict)
    body: bytes | memoryview = b""  # decode() returns a zero-copy view into the message
    signature: bytes | None = None
    signed_bytes: bytes | memoryview = b""  # filled by decode(): what the signature covers
    mac: bytes | None = None  # filled by decode(): the GMAC tag, if the sender MACed

    def header_json(self) -> bytes:
        header = {"protocol": self.protocol, "stage": self.stage, "session": self.session.hex(),
                  "round": self.round, "src": self.src, "dst": self.dst, "fields": self.fields}
        return _HEADER_ENCODER.encode(header).encode()

    def _head(self, flags: int, body_nbytes: int) -> bytes:
        """Prefix and header. Before a body, the header is padded with spaces (still valid
        JSON) so that the body starts at a multiple of BODY_ALIGN bytes: vectors read from an
        aligned message buffer are aligned, which numpy processes faster."""
        header = self.header_json()
        if body_nbytes:
            header += b" " * (-(PREFIX.size + len(header)) % BODY_ALIGN)
        return PREFIX.pack(MAGIC, WIRE_VERSION, flags, len(header), body_nbytes) + header

    def encode(self, signer: SigningKey | None = None, *, mac_key: bytes | None = None) -> bytes:
        """The message bytes, signed by ``signer`` or authenticated with the one-time
        GMAC ``mac_key`` (cheaper for bulk bodies; the key must never be reused)."""
        if signer is not None and mac_key is not None:
            raise ValueError("an envelope is either signed or MACed, not both")
        flags = FLAG_SIGNED if signer is not None else FLAG_MAC if mac_key is not None else 0
        head = self._head(flags, nbytes(self.body))
        parts: list[bytes | memoryview] = [head, self.body]
        if signer is not None:
            parts.append(signer.sign(signature_message(head, self.body)))
        elif mac_key is not None:
            parts.append(mac_tag(mac_key, head, self.body))
        return b"".join(parts)

    def encode_in_place(self, body_nbytes: int, fill: Callable[[memoryview], None], *,
                        mac_key: bytes) -> memoryview:
        """Like ``encode(mac_key=...)`` for a large body that ``fill`` writes straight into
        the message buffer, so the body is never copied. The buffer is a numpy allocation
        (large ones get transparent huge pages: fewer page faults than a ``bytes`` copy);
        the result is a read-only view of it. ``self.body`` is ignored."""
        head = self._head(FLAG_MAC, body_nbytes)
        end = len(head) + body_nbytes
        view = np.empty(end + MAC_TAG_SIZE, dtype=np.uint8).data.cast("B")
        view[:len(head)] = head
        fill(view[len(head):end])
        view[end:] = mac_tag(mac_key, view[:end])
        return view.toreadonly()

    def verify_mac(self, key: bytes) -> None:
        """Raise :class:`MacError` unless the envelope carries a valid tag under ``key``."""
        if self.mac is None:
            raise MacError(f"{self.stage} message from {self.src} carries no MAC")
        verify_mac(key, self.mac, self.signed_bytes)

    def verify(self, key: VerifyKey) -> None:
        """Raise :class:`SignatureError` unless the envelope is signed by ``key``."""
        from .errors import SignatureError

        if self.signature is None:
            raise SignatureError(f"{self.stage} message from {self.src} is not signed")
        key.verify(self.signature, signature_message(self.signed_bytes))

    def expect(self, *, protocol: str, stage: str, session: bytes, round_: int,
               src: int | None = None, dst: int | None = None) -> None:
        """Check the routing header; typed errors for each kind of mismatch."""
        if self.protocol != protocol:
            raise WireFormatError(f"protocol {self.protocol!r}, expected {protocol!r}")
        if self.session != session:
            raise SessionMismatchError("message belongs to another session")
        if self.round != round_:
            raise ReplayError(f"message is for round {self.round}, this is round {round_}")
        if self.stage != stage:
            raise StageError(f"got stage {self.stage!r} while expecting {stage!r}")
        if src is not None and self.src != src:
            raise PartyError(f"message claims sender {self.src}, expected {src}")
        if dst is not None and self.dst != dst:
            raise PartyError(f"message addressed to {self.dst}, expected {dst}")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise WireFormatError("header JSON has duplicate keys")
    return out


def _no_constants(name: str) -> Any:
    raise WireFormatError(f"header JSON contains the non-standard constant {name}")


# built once: json.dumps/json.loads with options construct a new coder on every call
_HEADER_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), allow_nan=False)
_HEADER_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicate_keys,
                                   parse_constant=_no_constants)


def signature_message(*signed: bytes | memoryview) -> bytes:
    """What Ed25519 signs: a label and the BLAKE3-256 digest of the envelope before the signature.

    Pre-hashing keeps signing and verifying a multi-megabyte masked vector cheap (BLAKE3 runs
    at several GB/s per core, SHA-256 well under half that here); the label separates it from
    every other signed message.
    """
    digest = blake3.blake3()
    for part in signed:
        digest.update(memoryview(part).cast("B"))
    return SIG_LABEL + digest.digest()


DEFAULT_LIMITS = Limits()


def decode(data: Message | bytearray, limits: Limits = DEFAULT_LIMITS) -> Envelope:
    """Parse an envelope; raise :class:`WireFormatError` on anything malformed.

    ``bytes`` and read-only views are read in place: the envelope's ``body`` and
    ``signed_bytes`` are views into ``data``. A read-only view must not be backed by a buffer
    that someone still writes (:meth:`Envelope.encode_in_place` hands out such views only
    once the buffer is complete). Mutable buffers are copied first."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireFormatError("message must be bytes")
    # bytes and read-only views are parsed in place; a mutable buffer is copied first, so
    # that nobody can change the message after it was checked
    if isinstance(data, bytearray) or (isinstance(data, memoryview) and not data.readonly):
        data = bytes(data)
    view = memoryview(data).cast("B")
    if view.nbytes < PREFIX.size:
        raise WireFormatError("message shorter than the envelope prefix")
    magic, version, flags, hlen, blen = PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise WireFormatError("bad magic: not a fedcollm_secure message")
    if version != WIRE_VERSION:
        raise WireFormatError(f"unsupported wire version {version} (this is {WIRE_VERSION})")
    if flags & ~(FLAG_SIGNED | FLAG_MAC) or flags == FLAG_SIGNED | FLAG_MAC:
        raise WireFormatError(f"unknown flags {flags:#x}")
    if hlen > limits.max_header or blen > limits.max_body:
        raise WireFormatError(f"message exceeds size limits (header {hlen}, body {blen})")
    sig_len = SIGNATURE_SIZE if flags & FLAG_SIGNED else MAC_TAG_SIZE if flags & FLAG_MAC else 0
    if view.nbytes != PREFIX.size + hlen + blen + sig_len:
        raise WireFormatError("message length does not match its declared sizes")
    end = PREFIX.size + hlen
    try:
        header = _HEADER_DECODER.decode(bytes(view[PREFIX.size:end]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise WireFormatError(f"header is not valid JSON: {exc}") from None
    if not isinstance(header, dict) or set(header) != _HEADER_KEYS:
        raise WireFormatError("header must be an object with exactly the envelope keys")
    for key in ("protocol", "stage", "session"):
        if not isinstance(header[key], str):
            raise WireFormatError(f"header.{key} must be a string")
    for key in ("round", "src", "dst"):
        _check_uint(header[key], f"header.{key}")
    if not isinstance(header["fields"], dict):
        raise WireFormatError("header.fields must be an object")
    try:
        session = bytes.fromhex(header["session"])
    except ValueError:
        raise WireFormatError("header.session must be hex") from None
    return Envelope(
        protocol=header["protocol"], stage=header["stage"], session=session,
        round=header["round"], src=header["src"], dst=header["dst"], fields=header["fields"],
        body=view[end:end + blen],
        signature=bytes(view[end + blen:]) if flags & FLAG_SIGNED else None,
        mac=bytes(view[end + blen:]) if flags & FLAG_MAC else None,
        signed_bytes=view[:end + blen],
    )


# --- field helpers: explicit schemas, typed errors -------------------------------------------
def _check_uint(value: Any, name: str, maximum: int = (1 << 63) - 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        raise WireFormatError(f"{name} must be an integer in [0, {maximum}]")
    return value


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


if sys.version_info >= (3, 11):
    def _a2b(value: str) -> bytes:
        # strict: only the alphabet, correct padding, nothing after it
        return binascii.a2b_base64(value, strict_mode=True)
else:  # pragma: no cover - Python 3.10
    def _a2b(value: str) -> bytes:
        return base64.b64decode(value, validate=True)


def unb64(value: Any, name: str, size: int | None = None, max_size: int | None = None) -> bytes:
    if type(value) is not str:
        raise WireFormatError(f"{name} must be a base64 string")
    try:
        raw = _a2b(value)
    except (binascii.Error, ValueError):
        raise WireFormatError(f"{name} is not valid base64") from None
    if size is not None and len(raw) != size:
        raise WireFormatError(f"{name} must be {size} bytes, got {len(raw)}")
    if max_size is not None and len(raw) > max_size:
        raise WireFormatError(f"{name} exceeds {max_size} bytes")
    return raw


class Fields:
    """Typed access to an envelope's ``fields`` with exact-key checking."""

    def __init__(self, env: Envelope, required: set[str], optional: frozenset[str] = frozenset()):
        keys = set(env.fields)
        missing, unknown = required - keys, keys - required - optional
        if missing or unknown:
            raise WireFormatError(
                f"{env.stage}: missing fields {sorted(missing)}, unknown fields {sorted(unknown)}")
        self.f = env.fields
        self.stage = env.stage

    def has(self, name: str) -> bool:
        return name in self.f

    def uint(self, name: str, maximum: int = (1 << 63) - 1) -> int:
        return _check_uint(self.f[name], f"{self.stage}.{name}", maximum)

    def number(self, name: str) -> float:
        v = self.f[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise WireFormatError(f"{self.stage}.{name} must be a number")
        return float(v)

    def string(self, name: str, max_len: int = 256) -> str:
        v = self.f[name]
        if not isinstance(v, str) or len(v) > max_len:
            raise WireFormatError(f"{self.stage}.{name} must be a string of <= {max_len} chars")
        return v

    def raw(self, name: str, size: int | None = None, max_size: int | None = None) -> bytes:
        return unb64(self.f[name], f"{self.stage}.{name}", size, max_size)

    def boolean(self, name: str) -> bool:
        v = self.f[name]
        if not isinstance(v, bool):
            raise WireFormatError(f"{self.stage}.{name} must be true or false")
        return v

    def string_map(self, name: str, max_len: int, max_str: int = 128) -> dict[int, str]:
        """A JSON object whose keys are decimal party indices and values short strings."""
        v = self.f[name]
        if not isinstance(v, dict) or len(v) > max_len:
            raise WireFormatError(f"{self.stage}.{name} must be an object of <= {max_len} items")
        out: dict[int, str] = {}
        for k, s in v.items():
            if not isinstance(k, str) or not _CANONICAL_INDEX.fullmatch(k):
                raise WireFormatError(f"{self.stage}.{name} keys must be decimal indices")
            if not isinstance(s, str) or len(s) > max_str:
                raise WireFormatError(f"{self.stage}.{name} values must be strings of "
                                      f"<= {max_str} chars")
            out[int(k)] = s
        return out

    def uint_list(self, name: str, max_len: int) -> list[int]:
        v = self.f[name]
        if not isinstance(v, list) or len(v) > max_len:
            raise WireFormatError(f"{self.stage}.{name} must be a list of <= {max_len} items")
        return [_check_uint(x, f"{self.stage}.{name}[]") for x in v]

    def bytes_map(self, name: str, max_len: int, size: int | None = None,
                  max_size: int | None = None) -> dict[int, bytes]:
        """A JSON object whose keys are decimal party indices and values base64 bytes."""
        v = self.f[name]
        if not isinstance(v, dict) or len(v) > max_len:
            raise WireFormatError(f"{self.stage}.{name} must be an object of <= {max_len} items")
        out: dict[int, bytes] = {}
        for k, item in v.items():
            if not (isinstance(k, str) and _CANONICAL_INDEX.fullmatch(k)):
                raise WireFormatError(f"{self.stage}.{name} keys must be canonical decimals")
            idx = _check_uint(int(k), f"{self.stage}.{name} key")
            out[idx] = unb64(item, f"{self.stage}.{name}[{k}]", size, max_size)
        return out

    def list_of(self, name: str, max_len: int) -> list[Any]:
        v = self.f[name]
        if not isinstance(v, list) or len(v) > max_len:
            raise WireFormatError(f"{self.stage}.{name} must be a list of <= {max_len} items")
        return v


def bytes_map(items: dict[int, bytes]) -> dict[str, str]:
    return {str(k): b64(v) for k, v in sorted(items.items())}
