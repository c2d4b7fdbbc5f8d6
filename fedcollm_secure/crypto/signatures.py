"""Ed25519 signatures. Verification raises; it never returns a bool."""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import KeyFormatError, SignatureError
from .randomness import RandomSource, default_random

SIGNATURE_SIZE = 64


class VerifyKey:
    def __init__(self, raw: bytes) -> None:
        if len(raw) != 32:
            raise KeyFormatError("Ed25519 public key must be 32 bytes")
        try:
            self._key = Ed25519PublicKey.from_public_bytes(raw)
        except ValueError as exc:
            raise KeyFormatError(f"invalid Ed25519 public key: {exc}") from None
        self.raw = bytes(raw)

    def verify(self, signature: bytes, message: bytes) -> None:
        if len(signature) != SIGNATURE_SIZE:
            raise SignatureError("signature has the wrong length")
        try:
            self._key.verify(signature, message)
        except InvalidSignature:
            raise SignatureError("signature does not verify") from None


class SigningKey:
    def __init__(self, raw: bytes) -> None:
        if len(raw) != 32:
            raise KeyFormatError("Ed25519 private key must be 32 bytes")
        self._key = Ed25519PrivateKey.from_private_bytes(raw)
        self.verify_key = VerifyKey(self._key.public_key().public_bytes_raw())

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    def private_bytes(self) -> bytes:
        return self._key.private_bytes_raw()


def generate_signing_key(rng: RandomSource | None = None) -> SigningKey:
    return SigningKey((rng or default_random()).bytes(32))
