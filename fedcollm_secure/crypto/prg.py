"""ChaCha20 keystream PRG producing ring elements.

``expand_seed(seed, n, ring_bits)`` is the ChaCha20 keystream under the full 32-byte ``seed``
(block counter 0, nonce 0), read as little-endian 32-bit words (``ring_bits <= 32``) or 64-bit
words (``ring_bits > 32``), each reduced modulo 2**ring_bits. Every seed is derived for a single
(session, round, pair) and expanded once, so the fixed nonce is never reused with one key.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from ..errors import CryptoError

SEED_SIZE = 32
_NONCE = bytes(16)  # 4-byte block counter (0) || 12-byte nonce (0)


def ring_dtype(ring_bits: int) -> type[np.unsignedinteger]:
    if not 2 <= ring_bits <= 64:
        raise CryptoError("ring_bits must be in [2, 64]")
    return np.uint32 if ring_bits <= 32 else np.uint64


def ring_mask(ring_bits: int) -> int:
    return (1 << ring_bits) - 1


def _check_seed(seed: bytes) -> bytes:
    if len(seed) != SEED_SIZE:
        raise CryptoError(f"PRG seed must be {SEED_SIZE} bytes, got {len(seed)}")
    return bytes(seed)


class MaskPRG:
    """Reusable expander for one vector length; avoids reallocating keystream buffers."""

    def __init__(self, length: int, ring_bits: int) -> None:
        if length < 0:
            raise CryptoError("length must be non-negative")
        self.length = length
        self.ring_bits = ring_bits
        self.dtype = ring_dtype(ring_bits)
        self._nbytes = length * np.dtype(self.dtype).itemsize
        self._zeros = bytes(self._nbytes)
        self._buf = bytearray(self._nbytes + 64)
        self._view = np.frombuffer(self._buf, dtype=self.dtype, count=length)
        self._full = ring_bits in (32, 64)
        self.bytes_generated = 0

    def _fill(self, seed: bytes) -> np.ndarray:
        enc = Cipher(algorithms.ChaCha20(_check_seed(seed), _NONCE), mode=None).encryptor()
        enc.update_into(self._zeros, self._buf)
        self.bytes_generated += self._nbytes
        return self._view

    def expand(self, seed: bytes) -> np.ndarray:
        out = self._fill(seed).copy()
        if not self._full:
            out &= self.dtype(ring_mask(self.ring_bits))
        return out

    def add_into(self, acc: np.ndarray, seed: bytes, sign: int = 1) -> None:
        """acc += sign * PRG(seed), modulo 2**w (w = word size; reduce mod 2**ring_bits later)."""
        ks = self._fill(seed)
        if sign > 0:
            np.add(acc, ks, out=acc)
        else:
            np.subtract(acc, ks, out=acc)


def expand_seed(seed: bytes, length: int, ring_bits: int) -> np.ndarray:
    return MaskPRG(length, ring_bits).expand(seed)


class KeystreamWords:
    """The ChaCha20 keystream of ``seed`` as consecutive little-endian 32-bit words, read in
    pieces (the same words as ``expand_seed(seed, n, 32)``, without materialising them all)."""

    def __init__(self, seed: bytes) -> None:
        self._enc = Cipher(algorithms.ChaCha20(_check_seed(seed), _NONCE), mode=None).encryptor()
        self._zeros = b""
        self._buf = bytearray()

    def next(self, count: int) -> np.ndarray:
        """The next ``count`` words (a view valid until the next call)."""
        nbytes = 4 * count
        if len(self._zeros) < nbytes:
            self._zeros = bytes(nbytes)
            self._buf = bytearray(nbytes + 64)
        self._enc.update_into(memoryview(self._zeros)[:nbytes], self._buf)
        return np.frombuffer(self._buf, dtype="<u4", count=count)


def uniform01(seed: bytes, length: int) -> np.ndarray:
    """``length`` float64 values uniform on [0, 1) in steps of 2**-32, from ChaCha20."""
    words = MaskPRG(length, 32)._fill(seed)
    return words * (1.0 / (1 << 32))
