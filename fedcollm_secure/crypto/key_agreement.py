"""X25519 key agreement."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from ..errors import CryptoError, KeyFormatError
from .randomness import RandomSource, default_random

KEY_SIZE = 32


@dataclass(frozen=True)
class KeyPair:
    private: X25519PrivateKey
    public_bytes: bytes

    def private_bytes(self) -> bytes:
        return self.private.private_bytes_raw()


def load_private_key(raw: bytes) -> X25519PrivateKey:
    if len(raw) != KEY_SIZE:
        raise KeyFormatError(f"X25519 private key must be {KEY_SIZE} bytes, got {len(raw)}")
    return X25519PrivateKey.from_private_bytes(raw)


def load_public_key(raw: bytes) -> X25519PublicKey:
    if len(raw) != KEY_SIZE:
        raise KeyFormatError(f"X25519 public key must be {KEY_SIZE} bytes, got {len(raw)}")
    try:
        return X25519PublicKey.from_public_bytes(raw)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyFormatError(f"invalid X25519 public key: {exc}") from None


def generate_keypair(rng: RandomSource | None = None) -> KeyPair:
    """A fresh X25519 key pair; the private scalar comes from ``rng`` (CSPRNG by default)."""
    private = load_private_key((rng or default_random()).bytes(KEY_SIZE))
    return KeyPair(private, private.public_key().public_bytes_raw())


def agree(private: X25519PrivateKey, peer_public: bytes) -> bytes:
    """Raw X25519 shared secret; refuses the all-zero output of a low-order peer key."""
    try:
        return private.exchange(load_public_key(peer_public))
    except ValueError as exc:
        raise CryptoError(f"X25519 exchange failed: {exc}") from None


def public_of(private_raw: bytes) -> bytes:
    return load_private_key(private_raw).public_key().public_bytes_raw()
