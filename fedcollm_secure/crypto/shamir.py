"""Shamir secret sharing of 32-byte secrets over the prime field GF(2**256 + 297).

Share ``x`` coordinates are the holders' positive integer indices. A share travels as
``x`` (8 bytes, big-endian) || ``y`` (33 bytes, big-endian).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from itertools import combinations

from ..errors import SecretSharingError, ShareVerificationError
from .randomness import RandomSource, default_random

PRIME = (1 << 256) + 297
SECRET_SIZE = 32
Y_SIZE = 33
SHARE_SIZE = 8 + Y_SIZE
MAX_X = (1 << 63) - 1


@dataclass(frozen=True)
class Share:
    x: int
    y: int

    def to_bytes(self) -> bytes:
        return self.x.to_bytes(8, "big") + self.y.to_bytes(Y_SIZE, "big")

    @classmethod
    def from_bytes(cls, raw: bytes) -> Share:
        if len(raw) != SHARE_SIZE:
            raise SecretSharingError(f"a share is {SHARE_SIZE} bytes, got {len(raw)}")
        x = int.from_bytes(raw[:8], "big")
        y = int.from_bytes(raw[8:], "big")
        if not 1 <= x <= MAX_X or y >= PRIME:
            raise SecretSharingError("share coordinates out of range")
        return cls(x, y)


def _random_element(rng: RandomSource) -> int:
    while True:  # rejection sampling: uniform on [0, PRIME)
        v = int.from_bytes(rng.bytes(Y_SIZE), "big") & ((1 << 257) - 1)
        if v < PRIME:
            return v


def split_secret(secret: bytes, threshold: int, xs: Iterable[int],
                 rng: RandomSource | None = None) -> dict[int, Share]:
    """Shares of ``secret`` for each holder index in ``xs``; any ``threshold`` recover it."""
    if len(secret) != SECRET_SIZE:
        raise SecretSharingError(f"secret must be {SECRET_SIZE} bytes")
    xs = list(xs)
    if len(set(xs)) != len(xs):
        raise SecretSharingError("duplicate share indices")
    if any(not 1 <= x <= MAX_X for x in xs):
        raise SecretSharingError("share indices must be in [1, 2**63-1]")
    if not 1 <= threshold <= len(xs):
        raise SecretSharingError(f"threshold {threshold} not in [1, {len(xs)}]")
    rng = rng or default_random()
    coeffs = [int.from_bytes(secret, "big")] + [_random_element(rng) for _ in range(threshold - 1)]
    out = {}
    for x in xs:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        out[x] = Share(x, y)
    return out


@functools.lru_cache(maxsize=1024)
def _lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """The Lagrange basis polynomials of the points ``xs`` evaluated at 0. They depend only
    on the holders, so secrets rebuilt from the same holders (every self-mask seed of a round
    on the complete graph) share them.

    ``l_i = prod_{j != i} x_j / (x_j - x_i) = N_i / D_i`` with exact integers; one modular
    inversion of the least common multiple of the ``D_i`` serves every point (``D_i`` is a
    product of differences of indices below ``2**63 < PRIME``, so it is invertible)."""
    nums, dens = [], []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if i != j:
                num *= xj
                den *= xj - xi
        nums.append(num)
        dens.append(den)
    common = math.lcm(*dens)
    inverse = pow(common, -1, PRIME)
    return tuple(num * (common // den) % PRIME * inverse % PRIME
                 for num, den in zip(nums, dens, strict=True))


def _interpolate_at_zero(shares: list[Share]) -> int:
    coeffs = _lagrange_at_zero(tuple(s.x for s in shares))
    return sum(s.y * c for s, c in zip(shares, coeffs, strict=True)) % PRIME


def reconstruct_secret(shares: Iterable[Share], threshold: int,
                       check: Callable[[bytes], bool] | None = None,
                       max_attempts: int = 64) -> bytes:
    """Recover a secret from at least ``threshold`` shares.

    With ``check`` (e.g. "this private key matches the advertised public key") a wrong result
    is detected: further subsets of the shares are tried, and :class:`ShareVerificationError`
    is raised if none verifies. Without it, the first ``threshold`` shares are used.
    """
    shares = list(shares)
    if len({s.x for s in shares}) != len(shares):
        raise SecretSharingError("duplicate share indices")
    if len(shares) < threshold:
        raise SecretSharingError(f"need {threshold} shares, have {len(shares)}")
    shares.sort(key=lambda s: s.x)
    for attempt, subset in enumerate(combinations(shares, threshold)):
        if attempt >= max_attempts:
            break
        value = _interpolate_at_zero(list(subset))
        if value >> (8 * SECRET_SIZE):
            candidate = None  # out of range: some share in the subset is wrong
        else:
            candidate = value.to_bytes(SECRET_SIZE, "big")
        if candidate is not None and (check is None or check(candidate)):
            return candidate
        if check is None:
            raise ShareVerificationError("reconstructed value is out of range: a share is wrong")
    raise ShareVerificationError("no subset of the shares reconstructs a verified secret")


def shares_by_x(shares: Mapping[int, bytes]) -> list[Share]:
    return [Share.from_bytes(raw) for raw in shares.values()]
