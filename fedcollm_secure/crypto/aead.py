"""ChaCha20-Poly1305 with (session, round, src, dst) as associated data."""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from ..errors import DecryptionError, KeyFormatError
from .kdf import encode_fields
from .randomness import RandomSource, default_random

AEAD_KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16


def associated_data(label: str, session: bytes, round_: int, src: int, dst: int) -> bytes:
    return encode_fields(label.encode(), session, struct.pack(">QQQ", round_, src, dst))


def _cipher(key: bytes) -> ChaCha20Poly1305:
    if len(key) != AEAD_KEY_SIZE:
        raise KeyFormatError(f"AEAD key must be {AEAD_KEY_SIZE} bytes")
    return ChaCha20Poly1305(key)


def seal(key: bytes, plaintext: bytes, ad: bytes, rng: RandomSource | None = None) -> bytes:
    """nonce || ciphertext || tag, with a random 96-bit nonce."""
    nonce = (rng or default_random()).bytes(NONCE_SIZE)
    return nonce + _cipher(key).encrypt(nonce, plaintext, ad)


def open_sealed(key: bytes, sealed: bytes, ad: bytes) -> bytes:
    """Inverse of :func:`seal`; raises :class:`DecryptionError` on any mismatch."""
    if len(sealed) < NONCE_SIZE + TAG_SIZE:
        raise DecryptionError("ciphertext too short")
    try:
        return _cipher(key).decrypt(sealed[:NONCE_SIZE], sealed[NONCE_SIZE:], ad)
    except InvalidTag:
        raise DecryptionError(
            "AEAD authentication failed (tampered, wrong key or context)") from None
