"""CKKS parameter presets, their validation, and the options of the ``ckks`` aggregator.

A preset fixes the ring degree N, the coefficient-modulus chain and the scale. Every preset,
and every custom combination, is checked against the HomomorphicEncryption.org standard
(128-bit classical security, ternary secret): the total coefficient-modulus bits must not
exceed the limit for N. Precision is documented per preset and reported in
``stats["params"]["error_bound"]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from ...config import ConfigBase, require

PROTOCOL = "ckks/v1"
PROTOCOL_NAME = "ckks"
VERSION = 1

# Largest total coefficient-modulus bit count for 128-bit classical security with a ternary
# secret (HomomorphicEncryption.org security standard, Table 1; SEAL's CoeffModulus::MaxBitCount).
HE_STANDARD_MAX_BITS_128 = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}
MIN_HEADROOM_BITS = 9  # the first prime must leave at least this many bits above the scale


@dataclass(frozen=True)
class CKKSParams:
    """Concrete CKKS parameters.

    The chain is ``[q0, q1 .. q_{L}, special]``: clients encrypt at the lowest level, so a
    ciphertext on the wire holds two polynomials modulo ``q0`` only. A value ``m`` is held as
    ``round(m * 2^scale_bits)`` modulo ``q0``: an aggregate must stay below
    ``2^headroom_bits`` in magnitude.
    """

    name: str
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def scale(self) -> float:
        return float(2 ** self.scale_bits)

    @property
    def total_bits(self) -> int:
        return sum(self.coeff_mod_bit_sizes)

    @property
    def max_total_bits(self) -> int:
        return HE_STANDARD_MAX_BITS_128.get(self.poly_modulus_degree, 0)

    @property
    def headroom_bits(self) -> int:
        """An aggregate must satisfy ``|sum| < 2^headroom_bits`` (centred modulo q0)."""
        return self.coeff_mod_bit_sizes[0] - self.scale_bits - 1

    @property
    def max_abs_sum(self) -> float:
        return float(2 ** self.headroom_bits)

    @property
    def error_per_contribution(self) -> float:
        """Documented bound on the absolute error one ciphertext adds to each decrypted value:
        ``2^(20 - scale_bits)`` (about 9.5e-7 at scale 2^40). Measured: the largest error over
        2^18 values of one fresh N=8192 ciphertext is about 1e-8, so the bound has a margin of
        about 100."""
        return float(2.0 ** (20 - self.scale_bits))

    def error_bound(self, contributions: int) -> float:
        return max(1, contributions) * self.error_per_contribution

    def validate(self) -> None:
        n, bits, scale = self.poly_modulus_degree, self.coeff_mod_bit_sizes, self.scale_bits
        require(n in HE_STANDARD_MAX_BITS_128 and n >= 4096,
                f"ckks: poly_modulus_degree {n} must be one of 4096, 8192, 16384, 32768")
        require(len(bits) >= 2, "ckks: coeff_mod_bit_sizes needs at least two primes "
                "(data level and the special prime)")
        require(all(isinstance(b, int) and 20 <= b <= 60 for b in bits),
                "ckks: every coefficient-modulus prime must have 20 to 60 bits")
        require(sum(bits) <= self.max_total_bits,
                f"ckks: {sum(bits)} coefficient-modulus bits exceed the HE-standard limit of "
                f"{self.max_total_bits} for N={n} (128-bit security); refused as unsafe")
        require(20 <= scale <= 52, "ckks: scale_bits must be in [20, 52]")
        require(bits[0] - scale - 1 >= MIN_HEADROOM_BITS,
                f"ckks: the first prime ({bits[0]} bits) must exceed scale_bits ({scale}) by "
                f"at least {MIN_HEADROOM_BITS + 1} bits, or sums overflow")
        require(all(b == scale for b in bits[1:-1]),
                "ckks: the middle primes must have exactly scale_bits bits (so that a client "
                "may also reach the lowest level by an exact rescale, SPEC section 3.2)")
        require(bits[-1] >= max(bits[:-1]),
                "ckks: the special (last) prime must be at least as large as every other prime")

    def to_json(self) -> dict[str, Any]:
        return {"preset": self.name, "poly_modulus_degree": self.poly_modulus_degree,
                "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes),
                "scale_bits": self.scale_bits}

    def describe(self) -> dict[str, Any]:
        """Parameters with their documented security level and precision."""
        return {**self.to_json(), "slots": self.slots, "total_bits": self.total_bits,
                "he_standard_max_bits": self.max_total_bits, "security_bits": 128,
                "headroom_bits": self.headroom_bits,
                "error_per_contribution": self.error_per_contribution}


PRESETS: dict[str, CKKSParams] = {
    # 4096 slots; 160 of the 218 bits allowed for N=8192 at 128-bit security.
    "n8192": CKKSParams("n8192", 8192, (60, 40, 60), 40),
    # 8192 slots; 160 of 438 bits: a much larger security margin, same wire cost per value.
    "n16384": CKKSParams("n16384", 16384, (60, 40, 60), 40),
    # For sums only (what aggregation needs): one 60-bit data prime and the special prime,
    # 120 of 218 bits. Same scale, headroom, precision, bytes on the wire and encryption speed
    # as n8192; a shorter chain and a smaller public context.
    "n8192-sum": CKKSParams("n8192-sum", 8192, (60, 60), 40),
}
for _p in PRESETS.values():
    _p.validate()


@dataclass(frozen=True)
class CKKSConfig(ConfigBase):
    """User-facing options of ``ckks`` (all optional).

    preset: ``n8192`` (default), ``n16384``, or ``n8192-sum`` (one data prime, shorter chain);
    ``poly_modulus_degree``, ``coeff_mod_bit_sizes`` and ``scale_bits`` override it (validated:
    unsafe combinations are refused). min_threshold: the key authority never decrypts an
    aggregate of fewer distinct contributors. max_abs_value: the largest weighted value a client
    may send (default: the headroom split evenly between the round's clients). sign: clients
    sign their ciphertexts and contribution receipts with enrolled Ed25519 identity keys, and
    the aggregator and key authority verify them. n_threads: TenSEAL threads per party.
    """

    section: ClassVar[str] = "ckks"
    preset: str = "n8192"
    poly_modulus_degree: int | None = None
    coeff_mod_bit_sizes: tuple[int, ...] | None = None
    scale_bits: int | None = None
    min_threshold: int = 2
    max_abs_value: float | None = None
    sign: bool = True
    max_clients: int = 10_000
    n_threads: int = 1

    def validate(self) -> None:
        require(self.preset in PRESETS,
                f"ckks.preset {self.preset!r} is not one of {sorted(PRESETS)}")
        require(self.min_threshold >= 2, "ckks.min_threshold must be >= 2 (a sum of one "
                "client is that client's update)")
        require(self.max_clients >= 2, "ckks.max_clients must be >= 2")
        require(1 <= self.n_threads <= 256, "ckks.n_threads must be in [1, 256]")
        if self.max_abs_value is not None:
            require(math.isfinite(self.max_abs_value) and self.max_abs_value > 0,
                    "ckks.max_abs_value must be a finite positive number")
        self.params().validate()

    def params(self) -> CKKSParams:
        base = PRESETS[self.preset]
        if (self.poly_modulus_degree, self.coeff_mod_bit_sizes, self.scale_bits) == (
                None, None, None):
            return base
        return CKKSParams(
            "custom",
            self.poly_modulus_degree or base.poly_modulus_degree,
            tuple(self.coeff_mod_bit_sizes or base.coeff_mod_bit_sizes),
            self.scale_bits if self.scale_bits is not None else base.scale_bits)

    def max_abs_for(self, n_clients: int) -> float:
        """The per-client bound on |weighted value| for a round of ``n_clients``."""
        params = self.params()
        fair = params.max_abs_sum / (2 * max(1, n_clients))  # half the headroom, split evenly
        if self.max_abs_value is None:
            return fair
        require(self.max_abs_value * n_clients < params.max_abs_sum,
                f"ckks.max_abs_value {self.max_abs_value} x {n_clients} clients can overflow "
                f"the headroom 2^{params.headroom_bits}")
        return self.max_abs_value
