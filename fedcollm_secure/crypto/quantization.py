"""Fixed-point quantisation into the ring Z_{2**ring_bits} with stochastic rounding.

A value ``v`` is clipped to ``[-clip, clip]``, scaled by ``levels / clip`` and rounded
stochastically (unbiased) to an integer in ``[-levels, levels]``, represented modulo
``2**ring_bits``. A sum of at most ``max_summands`` such integers lies in
``[-max_summands * levels, max_summands * levels]`` and is recovered exactly by the centred
lift iff ``max_summands * levels <= 2**(ring_bits-1) - 1``; that is checked at construction.
The decoded float sum differs from the sum of the clipped inputs by less than
``max_summands * clip / levels`` per element (one quantum per summand).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, QuantizationError
from .prg import SEED_SIZE, KeystreamWords, ring_dtype, ring_mask
from .randomness import RandomSource, default_random


_CHUNK = 1 << 16


def _pieces(parts: list[np.ndarray], chunk: int) -> Iterator[tuple[int, np.ndarray, int, int]]:
    """(offset in the concatenation, part, start in part, length) pieces of at most ``chunk``."""
    at = 0
    for x in parts:
        for start in range(0, x.size, chunk):
            m = min(chunk, x.size - start)
            yield at, x, start, m
            at += m


@dataclass(frozen=True)
class QuantizationSpec:
    clip: float
    ring_bits: int
    levels: int
    max_summands: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError("quantisation clip must be finite and positive")
        if not 2 <= self.ring_bits <= 64:
            raise ConfigError("ring_bits must be in [2, 64]")
        if self.levels < 1 or self.max_summands < 1:
            raise ConfigError("levels and max_summands must be >= 1")
        if self.max_summands * self.levels > (1 << (self.ring_bits - 1)) - 1:
            raise ConfigError(
                f"ring overflow: {self.max_summands} summands x {self.levels} levels does not fit "
                f"a {self.ring_bits}-bit ring (need <= {(1 << (self.ring_bits - 1)) - 1}); "
                "use more ring bits or fewer levels"
            )
        if self.levels > (1 << 52):
            raise ConfigError("levels above 2**52 exceed float64 precision")

    @classmethod
    def fit(cls, clip: float, ring_bits: int, max_summands: int,
            levels: int | None = None) -> QuantizationSpec:
        """The spec with the most levels that fit, or the given ``levels`` (checked)."""
        if levels is None:
            if max_summands < 1:
                raise ConfigError("max_summands must be >= 1")
            levels = min(((1 << (ring_bits - 1)) - 1) // max_summands, 1 << 52)
        return cls(clip=clip, ring_bits=ring_bits, levels=levels, max_summands=max_summands)

    @property
    def fraction_bits(self) -> int:
        """F, the fixed-point fraction bits of stochastic rounding: levels * 2**F + 2**F
        must stay below 2**63."""
        return min(32, 62 - self.levels.bit_length())

    @property
    def step(self) -> float:
        """One quantum in input units."""
        return self.clip / self.levels

    def error_bound(self, summands: int) -> float:
        return summands * self.step

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        return ring_dtype(self.ring_bits)

    def quantize(self, values: np.ndarray | Sequence[np.ndarray],
                 rng: RandomSource | None = None, *,
                 multiplier: float = 1.0, pre_clip: float | None = None,
                 check_finite: bool = True, out: np.ndarray | None = None) -> np.ndarray:
        """Ring elements for ``multiplier * clip(values, pre_clip)`` (flattened).

        ``values`` may be a list of arrays, quantised as their concatenation without building
        it. ``pre_clip`` (default ``clip / multiplier``) bounds the values before they are
        multiplied; the product is always bounded by ``clip``. ``out`` receives the result.
        """
        parts = [np.asarray(values).reshape(-1)] if isinstance(values, np.ndarray) else [
            np.asarray(v).reshape(-1) for v in values]
        size = sum(p.size for p in parts)
        if check_finite and not all(np.isfinite(p).all() for p in parts):
            raise QuantizationError("cannot quantise NaN or infinite values")
        if not (math.isfinite(multiplier) and multiplier >= 0):
            raise QuantizationError("multiplier must be finite and non-negative")
        frac_bits = self.fraction_bits
        scale = multiplier * self.levels / self.clip * float(1 << frac_bits)
        bound = float(self.levels)
        if pre_clip is not None:
            bound = min(bound, pre_clip * multiplier * self.levels / self.clip)
        bound *= float(1 << frac_bits)  # exact: a power-of-two scaling
        q = out if out is not None else np.empty(size, dtype=self.dtype)
        if q.shape != (size,) or q.dtype != self.dtype:
            raise QuantizationError("output buffer has the wrong shape or dtype")
        # Stochastic rounding in fixed point with F = fraction_bits bits: Y = trunc(y * 2**F),
        # k = (Y + w) >> F with w the top F bits of a ChaCha20 keystream word of a fresh seed.
        # P(k = floor(y) + 1) = (Y mod 2**F) / 2**F, so E[k] = Y / 2**F = y to within 2**-F;
        # an integer y is never rounded up, so |k| <= levels. Chunked to stay in cache.
        words = KeystreamWords((rng or default_random()).bytes(SEED_SIZE))
        chunk = min(_CHUNK, max(size, 1))
        y, fixed = np.empty(chunk), np.empty(chunk, dtype=np.int64)
        for at, x, start, m in _pieces(parts, chunk):
            yc, fc = y[:m], fixed[:m]
            if x.dtype == np.float64:
                np.multiply(x[start:start + m], scale, out=yc)
            else:  # widening as its own pass beats a mixed-type multiply; same values
                np.copyto(yc, x[start:start + m], casting="unsafe")
                yc *= scale
            np.clip(yc, -bound, bound, out=yc)
            np.copyto(fc, yc, casting="unsafe")  # truncation toward zero
            w = words.next(m)
            if frac_bits < 32:
                w = w >> np.uint32(32 - frac_bits)
            np.add(fc, w, out=fc)
            np.right_shift(fc, frac_bits, out=fc)  # arithmetic: floor division by 2**F
            q[at:at + m] = fc  # two's complement wrap = reduction mod 2**wordsize
        if self.ring_bits not in (32, 64):
            q &= self.dtype(ring_mask(self.ring_bits))
        return q

    def lift(self, ring_values: np.ndarray) -> np.ndarray:
        """Centred lift of ring elements to signed int64."""
        r = np.asarray(ring_values)
        if self.ring_bits in (32, 64) and r.dtype == self.dtype:
            return r.view(np.int32 if self.ring_bits == 32 else np.int64).astype(np.int64)
        r = r.astype(np.uint64) & np.uint64(ring_mask(self.ring_bits))
        signed = r.astype(np.int64)
        if self.ring_bits < 64:
            half = 1 << (self.ring_bits - 1)
            signed = np.where(signed >= half, signed - (1 << self.ring_bits), signed)
        return signed

    def dequantize(self, ring_values: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Float values of ring elements (a single input or a sum of inputs), written into
        the float64 array ``out`` if given: ``lift(z) * (clip / levels)``."""
        r = np.asarray(ring_values)
        if self.ring_bits in (32, 64) and r.dtype == self.dtype:  # the lift is a view
            signed = r.view(np.int32 if self.ring_bits == 32 else np.int64)
        else:
            signed = self.lift(r)
        if out is None:
            out = np.empty(r.shape, dtype=np.float64)
        elif out.shape != r.shape or out.dtype != np.float64:
            raise QuantizationError("output buffer must be float64 of the input's shape")
        # lift * step with step = clip / levels rounded once to float64: one multiply per
        # element instead of a multiply and a (much slower) divide; the result is within one
        # rounding of the exact quotient, far inside the quantisation error. The integer ->
        # float64 conversion as its own pass is faster than a mixed-type multiply.
        np.copyto(out, signed, casting="unsafe")
        out *= self.clip / self.levels
        return out
