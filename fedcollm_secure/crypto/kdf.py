"""HKDF-SHA256 bound to (protocol, version, session, round, purpose, pair)."""

from __future__ import annotations

import functools
import hashlib
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import CryptoError

_SALT_LABEL = b"fedcollm-secure/hkdf-salt/v1"


def encode_fields(*fields: bytes) -> bytes:
    """Unambiguous concatenation: each field as a 4-byte big-endian length then the bytes."""
    return b"".join([part for f in fields for part in (len(f).to_bytes(4, "big"), f)])


@functools.lru_cache(maxsize=64)
def _salt(protocol: str, version: int, session: bytes) -> bytes:
    """One SHA-256 per (protocol, version, session), not per derived key."""
    return hashlib.sha256(
        encode_fields(_SALT_LABEL, protocol.encode(), struct.pack(">I", version), session)
    ).digest()


@dataclass(frozen=True)
class KdfContext:
    """Everything a derived key is bound to besides the input keying material."""

    protocol: str
    version: int
    session: bytes
    round: int

    def salt(self) -> bytes:
        return _salt(self.protocol, self.version, bytes(self.session))

    def info(self, purpose: str, pair: tuple[int, int]) -> bytes:
        return _info_prefix(self.protocol, self.version, bytes(self.session), self.round) + \
            encode_fields(purpose.encode(), struct.pack(">QQ", pair[0], pair[1]))


@functools.lru_cache(maxsize=64)
def _info_prefix(protocol: str, version: int, session: bytes, round_: int) -> bytes:
    """The fields of ``info`` shared by every key of one round."""
    return encode_fields(protocol.encode(), struct.pack(">I", version), session,
                         struct.pack(">Q", round_))


def derive_key(ikm: bytes, ctx: KdfContext, *, purpose: str, pair: tuple[int, int],
               length: int = 32) -> bytes:
    """HKDF-SHA256(ikm, salt=ctx.salt(), info=ctx.info(purpose, pair)).

    ``pair`` is used as given; callers that need a symmetric key pass it sorted.
    """
    if not isinstance(ikm, (bytes, bytearray)) or len(ikm) < 16:
        raise CryptoError("HKDF input keying material must be at least 16 bytes")
    if ctx.round < 0 or pair[0] < 0 or pair[1] < 0:
        raise CryptoError("round and pair members must be non-negative")
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=ctx.salt(),
                info=ctx.info(purpose, pair)).derive(bytes(ikm))
