"""The round-buffer pool: blocks come back only when nothing derived from them is alive."""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest

from fedcollm_secure import secure_sum
from fedcollm_secure.buffers import ROUND_BUFFERS, BufferPool


def _address(a: np.ndarray) -> int:
    return int(a.__array_interface__["data"][0])


def test_a_released_block_is_handed_out_again() -> None:
    pool = BufferPool()
    first = pool.take(1 << 16)
    assert first.dtype == np.uint8 and first.shape == (1 << 16,)
    address = _address(first)
    del first
    again = pool.take(1 << 16)
    assert _address(again) == address and pool.reused == 1 and pool.allocated == 1


@pytest.mark.parametrize("derive", [
    lambda a: a.view(np.float64),
    lambda a: a[10:20],
    lambda a: a.view(np.uint32).reshape(4, -1),
    lambda a: memoryview(a),
    lambda a: np.frombuffer(memoryview(a).toreadonly(), dtype=np.uint16),
    lambda a: {"w": a.view(np.float64).reshape(8, -1)},  # like a result's named tensors
])
def test_a_block_is_never_reused_while_something_derived_from_it_lives(derive) -> None:
    pool = BufferPool()
    block = pool.take(1 << 12)
    block[:] = 7
    held = derive(block)
    del block
    gc.collect()
    other = pool.take(1 << 12)
    other[:] = 0
    flat = np.frombuffer(held if isinstance(held, memoryview) else
                         (held["w"] if isinstance(held, dict) else held).tobytes(), np.uint8)
    assert (flat == 7).all(), "a block in use was handed out and overwritten"
    assert pool.allocated == 2 and pool.reused == 0


def test_sizes_must_match_and_limits_hold() -> None:
    pool = BufferPool(max_blocks=2, max_bytes=1 << 20)
    a = pool.take(1000)
    del a
    b = pool.take(1001)  # another size: a fresh block
    assert pool.allocated == 2
    big = pool.take(2 << 20)  # above max_bytes: a plain allocation, not pooled
    assert big.nbytes == 2 << 20 and pool.allocated == 2
    c, d = pool.take(500), pool.take(600)  # beyond max_blocks: the oldest are forgotten
    assert pool.held_bytes <= 1 << 20 and len(pool._blocks) == 2
    del b, c, d
    pool.clear()
    assert pool.held_bytes == 0
    with pytest.raises(ValueError):
        pool.take(-1)
    with pytest.raises(ValueError):
        BufferPool(max_blocks=-1)


def test_threads_never_share_a_live_block() -> None:
    pool = BufferPool(max_blocks=4)
    errors: list[str] = []

    def work(tag: int) -> None:
        for _ in range(200):
            block = pool.take(4096)
            block[:] = tag
            if not (block == tag).all():
                errors.append(f"thread {tag} saw another thread's bytes")
            del block

    threads = [threading.Thread(target=work, args=(t,)) for t in (1, 2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_a_kept_result_is_not_overwritten_by_the_next_round() -> None:
    rng = np.random.default_rng(0)
    shape = (300, 7)

    def updates() -> dict[str, dict[str, np.ndarray]]:
        return {f"c{i}": {"w": rng.uniform(-1, 1, shape).astype(np.float32)} for i in range(4)}

    first_updates = updates()
    first = secure_sum(first_updates, protocol="masking", threshold=3)
    kept = first.sum["w"].copy()
    second = secure_sum(updates(), protocol="masking", threshold=3)
    np.testing.assert_array_equal(first.sum["w"], kept)
    assert not np.shares_memory(first.sum["w"], second.sum["w"])
    exact = sum(u["w"].astype(np.float64) for u in first_updates.values())
    assert np.abs(first.sum["w"] - exact).max() < 1e-5
    # once the first result is dropped, its block serves a later round
    del first, kept
    gc.collect()
    before = ROUND_BUFFERS.reused
    third = secure_sum(updates(), protocol="masking", threshold=3)
    assert ROUND_BUFFERS.reused > before
    assert not np.shares_memory(second.sum["w"], third.sum["w"])
