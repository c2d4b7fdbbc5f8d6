"""Communication graphs: complete (SecAgg) and random k-regular Harary graphs (SecAgg+)."""

from __future__ import annotations

from collections.abc import Sequence

from ...crypto.randomness import RandomSource, default_random
from ...errors import ConfigError


def _random_permutation(items: Sequence[int], rng: RandomSource) -> list[int]:
    out = list(items)
    for i in range(len(out) - 1, 0, -1):  # Fisher-Yates with unbiased rejection sampling
        bound = i + 1
        limit = (1 << 64) - ((1 << 64) % bound)
        while True:
            r = int.from_bytes(rng.bytes(8), "big")
            if r < limit:
                break
        j = r % bound
        out[i], out[j] = out[j], out[i]
    return out


def complete_graph(nodes: Sequence[int]) -> dict[int, frozenset[int]]:
    everyone = frozenset(nodes)
    return {u: everyone - {u} for u in nodes}


def harary_graph(nodes: Sequence[int], degree: int,
                 rng: RandomSource | None = None) -> dict[int, frozenset[int]]:
    """A k-regular graph: nodes on a randomly permuted ring, each linked to k/2 on each side."""
    n = len(nodes)
    if degree % 2 or not 2 <= degree <= n - 1:
        raise ConfigError(f"degree must be even and in [2, {n - 1}]")
    if degree == n - 1:
        return complete_graph(nodes)
    ring = _random_permutation(sorted(nodes), rng or default_random())
    half = degree // 2
    return {ring[i]: frozenset(ring[(i + d) % n] for d in range(-half, half + 1) if d != 0)
            for i in range(n)}
