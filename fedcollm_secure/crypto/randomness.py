"""Sources of randomness, passed in explicitly.

The default is the operating system's CSPRNG. A seeded source exists only for reproducible
tests and experiments, and its name says so.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from typing import Protocol

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms


class RandomSource(Protocol):
    """Anything that returns uniformly random bytes."""

    def bytes(self, n: int) -> bytes: ...


class CSPRNG:
    """The operating system's cryptographically secure generator (``os.urandom``)."""

    def bytes(self, n: int) -> bytes:
        return os.urandom(n)


class InsecureSeededRandomForTests:
    """Deterministic bytes from a seed (ChaCha20 keystream of SHA-256(seed)).

    Only for tests, test vectors and reproducible experiments: anyone who knows the seed knows
    every key and mask. Creating one emits a warning.
    """

    def __init__(self, seed: int | bytes | str, *, quiet: bool = False) -> None:
        if isinstance(seed, int):
            seed = seed.to_bytes(16, "little", signed=True)
        elif isinstance(seed, str):
            seed = seed.encode()
        key = hashlib.sha256(b"fedcollm-secure/insecure-test-rng\x00" + seed).digest()
        self._enc = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
        if not quiet:
            warnings.warn(
                "InsecureSeededRandomForTests: deterministic randomness; never use in deployment",
                stacklevel=2,
            )

    def bytes(self, n: int) -> bytes:
        return self._enc.update(bytes(n))


class FixedBytesForTests:
    """Returns exactly the given bytes, in order, then refuses: pins every random draw of a
    test vector. Only for tests and test vectors."""

    def __init__(self, data: bytes) -> None:
        self.data = bytes(data)

    def bytes(self, n: int) -> bytes:
        if n > len(self.data):
            raise RuntimeError("FixedBytesForTests: more randomness drawn than was provided")
        out, self.data = self.data[:n], self.data[n:]
        return out


_DEFAULT = CSPRNG()


def default_random() -> RandomSource:
    return _DEFAULT
