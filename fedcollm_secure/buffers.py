"""Reuse of large per-round buffers once nothing references them.

Every round writes a few multi-megabyte buffers: each client's masked reply and the server's
result (eight bytes per parameter, with the running sum of masked inputs at its end). Memory
fresh from the kernel costs a page fault and a zeroed page per 4 KiB on first write, and more
in a virtual machine whose host reclaims freed memory. When the allocator hands such memory
back to the kernel between rounds (it does, once other work frees more than its trim
threshold), that cost recurs every round: on the reference machine about 3 ms of a 17 ms
server round. :class:`BufferPool` keeps recently used blocks and hands one out again only when
nothing outside the pool references it.

A block is handed out as a view; every array derived from that view (reshapes, slices, dtype
views, the named tensors of a result) keeps the block itself alive, so the block's reference
count says whether any of them is still in use. This is the same test NumPy's own
``ndarray.resize(refcheck=True)`` relies on.
"""

from __future__ import annotations

import sys
import threading

import numpy as np

DEFAULT_MAX_BLOCKS = 4
DEFAULT_MAX_BYTES = 256 << 20


def _baseline_refcount() -> int:
    """What ``sys.getrefcount(blocks[i])`` reports for a block only the pool's list holds."""
    blocks = [np.empty(1, dtype=np.uint8)]
    return sys.getrefcount(blocks[0])


_UNSHARED = _baseline_refcount()


class BufferPool:
    """Blocks of uninitialised bytes, reused once no array derived from them is alive.

    ``take(nbytes)`` returns a uint8 array of exactly ``nbytes``. The pool keeps at most
    ``max_blocks`` blocks and ``max_bytes`` bytes; requests larger than ``max_bytes`` are plain
    allocations. Thread-safe.
    """

    def __init__(self, max_blocks: int = DEFAULT_MAX_BLOCKS,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_blocks < 0 or max_bytes < 0:
            raise ValueError("pool limits must be non-negative")
        self.max_blocks = max_blocks
        self.max_bytes = max_bytes
        self._blocks: list[np.ndarray] = []  # least recently handed out first
        self._lock = threading.Lock()
        self.reused = 0
        self.allocated = 0

    def take(self, nbytes: int) -> np.ndarray:
        if nbytes < 0:
            raise ValueError("nbytes must be non-negative")
        if nbytes > self.max_bytes or self.max_blocks == 0:
            return np.empty(nbytes, dtype=np.uint8)
        with self._lock:
            blocks = self._blocks
            for i in range(len(blocks)):
                if blocks[i].nbytes == nbytes and sys.getrefcount(blocks[i]) == _UNSHARED:
                    block = blocks.pop(i)
                    blocks.append(block)
                    self.reused += 1
                    return block[:]  # the view (and all derived from it) marks the block used
            block = np.empty(nbytes, dtype=np.uint8)
            blocks.append(block)
            self.allocated += 1
            self._trim()
            return block[:]

    def _trim(self) -> None:
        """Forget the least recently used blocks beyond the limits. A block still in use is
        only forgotten by the pool: its arrays keep it alive until they are dropped."""
        blocks = self._blocks
        while blocks and (len(blocks) > self.max_blocks
                          or sum(b.nbytes for b in blocks) > self.max_bytes):
            blocks.pop(0)

    def clear(self) -> None:
        """Forget every block (free ones are released to the allocator)."""
        with self._lock:
            self._blocks.clear()

    @property
    def held_bytes(self) -> int:
        with self._lock:
            return sum(b.nbytes for b in self._blocks)


ROUND_BUFFERS = BufferPool()
"""The process-wide pool (the masking server's result buffers)."""

__all__ = ["BufferPool", "ROUND_BUFFERS", "DEFAULT_MAX_BLOCKS", "DEFAULT_MAX_BYTES"]
