"""ChaCha20 keystream PRG producing ring elements.

``expand_seed(seed, n, ring_bits)`` is the ChaCha20 keystream under the full 32-byte ``seed``
(block counter 0, nonce 0), read as little-endian 32-bit words (``ring_bits <= 32``) or 64-bit
words (``ring_bits > 32``), each reduced modulo 2**ring_bits. Every seed is derived for a single
(session, round, pair) and expanded once, so the fixed nonce is never reused with one key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

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


_CHUNK_BYTES = 1 << 18  # keystream is produced in cache-sized pieces


class MaskPRG:
    """Expander for one vector length. Keystream is produced chunk by chunk into one small
    reusable buffer, so masking a long vector allocates nothing and stays in cache."""

    def __init__(self, length: int, ring_bits: int) -> None:
        if length < 0:
            raise CryptoError("length must be non-negative")
        self.length = length
        self.ring_bits = ring_bits
        self.dtype = ring_dtype(ring_bits)
        self._itemsize = np.dtype(self.dtype).itemsize
        self._chunk = max(1, min(length, _CHUNK_BYTES // self._itemsize))
        self._zeros = bytes(self._chunk * self._itemsize)
        self._buf = bytearray(self._chunk * self._itemsize + 64)
        self._words = np.frombuffer(self._buf, dtype=np.dtype(self.dtype).newbyteorder("<"),
                                    count=self._chunk)
        self._full = ring_bits in (32, 64)
        self.bytes_generated = 0

    def _pieces(self, seed: bytes) -> Iterator[tuple[int, np.ndarray]]:
        """(offset, keystream words) pieces covering the vector, in order."""
        enc = Cipher(algorithms.ChaCha20(_check_seed(seed), _NONCE), mode=None).encryptor()
        zeros = memoryview(self._zeros)
        for start in range(0, self.length, self._chunk):
            m = min(self._chunk, self.length - start)
            enc.update_into(zeros[:m * self._itemsize], self._buf)
            yield start, self._words[:m]
        self.bytes_generated += self.length * self._itemsize

    def expand(self, seed: bytes) -> np.ndarray:
        out = np.empty(self.length, dtype=self.dtype)
        for start, words in self._pieces(seed):
            out[start:start + words.size] = words
        if not self._full:
            out &= self.dtype(ring_mask(self.ring_bits))
        return out

    def add_into(self, acc: np.ndarray, seed: bytes, sign: int = 1) -> None:
        """acc += sign * PRG(seed), modulo 2**w (w = word size; reduce mod 2**ring_bits later)."""
        self.add_many(acc, [(seed, sign)])

    def add_many(self, acc: np.ndarray, masks: Sequence[tuple[bytes, int]],
                 then: Callable[[int, np.ndarray], None] | None = None) -> None:
        """acc += sum of sign * PRG(seed) over ``masks``, chunk by chunk: each piece of ``acc``
        receives every mask while it is in cache. ``then(offset, piece)``, if given, is called
        on each finished piece while it is still in cache (e.g. to decode it)."""
        if acc.shape != (self.length,):
            raise CryptoError(f"accumulator must have shape ({self.length},)")
        streams = [(Cipher(algorithms.ChaCha20(_check_seed(seed), _NONCE), mode=None).encryptor(),
                    np.add if sign > 0 else np.subtract) for seed, sign in masks]
        zeros = memoryview(self._zeros)
        for start in range(0, self.length, self._chunk):
            m = min(self._chunk, self.length - start)
            part, words = acc[start:start + m], self._words[:m]
            for enc, op in streams:
                enc.update_into(zeros[:m * self._itemsize], self._buf)
                op(part, words, out=part)
            if then is not None:
                then(start, part)
        self.bytes_generated += len(streams) * self.length * self._itemsize


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
    return KeystreamWords(seed).next(length) * (1.0 / (1 << 32))
