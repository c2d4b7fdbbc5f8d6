"""User-level distributed DP on top of ``masking`` (protocols/ddp/v1/SPEC.md).

Client: clip the whole update in L2 to ``clip``, scale by ``1 / granularity``, round
each coordinate randomly (conditionally: redraw until the rounded vector's L2 norm is within
the bound the accounting assumes), add discrete Gaussian noise ``N_Z(0, sigma^2)`` per
coordinate from an exact sampler (Canonne, Kamath, Steinke 2020) driven by a CSPRNG, and
hand the integer vector to masking (:func:`secure_integer_sum`). ``sigma`` is sized so that
the noise of the *minimum* number of survivors alone meets the target; more survivors only
add noise. Fewer survivors than that minimum abort the round (masking's threshold), so an
under-noised sum is never released.

Server: masking returns the exact integer sum; times ``granularity`` it is the noisy sum of
the clipped updates. Accounting: Renyi DP of the distributed discrete Gaussian (Kairouz,
Liu, Steinke 2021, Proposition 14) composed over rounds and converted to (epsilon, delta)
with Opacus's RDP conversion.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
from opacus.accountants.analysis.rdp import get_privacy_spent

from ..api import secure_sum
from ..crypto.randomness import RandomSource, default_random
from ..errors import ConfigError, QuantizationError, ThresholdError, UpdateValidationError
from ..secagg import SecureSumResult, TensorSpec
from .config import DDPSettings

__all__ = ["DDPEncoded", "DDPParams", "RDP_ORDERS", "conditional_round",
           "ddp_epsilon", "ddp_rdp", "decode_sum", "discrete_gaussian", "discrete_gaussian_pmf",
           "encode_update", "rounded_l2_bound", "secure_integer_sum"]

RDP_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)]
                                      + list(range(12, 257)))
MAX_EXACT_SUM = 1 << 50  # integer sums decode exactly through float64 below this
_MAX_ROUNDING_TRIES = 1000


# --------------------------------------------------------------------------------------------
# exact sampling (Canonne, Kamath, Steinke 2020, Algorithms 1-3), rational parameters only
# --------------------------------------------------------------------------------------------
class _Bits:
    """Uniform integers from a RandomSource: bytes fetched in large chunks, consumed 64
    bits at a time (shifting a small integer is cheap)."""

    def __init__(self, rng: RandomSource, chunk: int = 1 << 14) -> None:
        self.rng, self.chunk = rng, chunk
        self.buf, self.pos = b"", 0
        self.pool, self.left = 0, 0

    def _word(self) -> int:
        if self.pos + 8 > len(self.buf):
            self.buf, self.pos = self.rng.bytes(self.chunk), 0
        w = int.from_bytes(self.buf[self.pos:self.pos + 8], "little")
        self.pos += 8
        return w

    def bits(self, k: int) -> int:
        while k > self.left:
            self.pool |= self._word() << self.left
            self.left += 64
        out = self.pool & ((1 << k) - 1)
        self.pool >>= k
        self.left -= k
        return out

    def below(self, m: int) -> int:
        """Uniform in ``[0, m)`` by rejection (exact)."""
        k = (m - 1).bit_length()
        while True:
            u = self.bits(k) if k else 0
            if u < m:
                return u


def _exp_neg_one(src: _Bits) -> bool:
    """Bernoulli(exp(-1)): the K-loop of Algorithm 1 with gamma = 1."""
    k = 1
    while src.below(k) == 0:
        k += 1
    return k % 2 == 1


def _bernoulli_exp_neg(num: int, den: int, src: _Bits) -> bool:
    """Bernoulli(exp(-num/den)) for integers num >= 0, den >= 1, exactly (Algorithm 1;
    integer arithmetic, no floating point)."""
    while num > den:
        if not _exp_neg_one(src):
            return False
        num -= den
    k = 1
    while src.below(den * k) < num:
        k += 1
    return k % 2 == 1


def _discrete_laplace(t: int, src: _Bits) -> int:
    """P(x) proportional to exp(-|x| / t), integer t >= 1 (Algorithm 2)."""
    while True:
        u = src.below(t)
        if not _bernoulli_exp_neg(u, t, src):
            continue
        v = 0
        while _exp_neg_one(src):
            v += 1
        x = u + t * v
        negative = src.bits(1) == 1
        if negative and x == 0:
            continue
        return -x if negative else x


def _discrete_gaussian_one(sn: int, sd: int, t: int, src: _Bits) -> int:
    """Algorithm 3 for sigma^2 = sn/sd: accept a discrete Laplace draw y with probability
    exp(-(|y| - sigma^2/t)^2 / (2 sigma^2)) = exp(-(|y| t sd - sn)^2 / (2 sn sd t^2))."""
    den = 2 * sn * sd * t * t
    while True:
        y = _discrete_laplace(t, src)
        d = abs(y) * t * sd - sn
        if _bernoulli_exp_neg(d * d, den, src):
            return y


def exact_variance(sigma: float) -> Fraction:
    """The rational variance parameter used for ``sigma`` (``sigma^2`` rounded *up* to a
    multiple of 2^-16, so the noise is never below the one asked for)."""
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ConfigError("sigma must be finite and >= 0")
    return Fraction(math.ceil(Fraction(sigma) ** 2 * (1 << 16)), 1 << 16)


def discrete_gaussian(sigma: float | Fraction, size: int,
                      rng: RandomSource | None = None) -> np.ndarray:
    """``size`` independent draws of the discrete Gaussian ``N_Z(0, sigma^2)`` (int64), exact
    for the rational variance :func:`exact_variance` (or ``sigma`` given as that variance
    when a :class:`~fractions.Fraction`)."""
    sigma2 = sigma if isinstance(sigma, Fraction) else exact_variance(float(sigma))
    out = np.zeros(size, dtype=np.int64)
    if sigma2 == 0 or size == 0:
        return out
    src = _Bits(rng or default_random())
    t = math.isqrt(math.floor(sigma2)) + 1  # floor(sigma) + 1
    sn, sd = sigma2.numerator, sigma2.denominator
    for i in range(size):
        out[i] = _discrete_gaussian_one(sn, sd, t, src)
    return out


def discrete_gaussian_pmf(sigma: float, support: np.ndarray) -> np.ndarray:
    """Probabilities of ``N_Z(0, sigma^2)`` at ``support`` (normalised over +-40 sigma)."""
    sigma2 = float(exact_variance(sigma))
    radius = int(40 * math.sqrt(sigma2)) + 2
    z = np.arange(-radius, radius + 1, dtype=np.float64)
    norm = np.exp(-z * z / (2 * sigma2)).sum()
    s = np.asarray(support, dtype=np.float64)
    return np.asarray(np.exp(-s * s / (2 * sigma2)) / norm)


# --------------------------------------------------------------------------------------------
# parameters
# --------------------------------------------------------------------------------------------
def rounded_l2_bound(c: float, dim: int, beta: float) -> float:
    """L2 bound after conditional randomised rounding of a vector of L2 norm <= ``c`` (KLS21):
    ``min(c + sqrt(d), sqrt(c^2 + d/4 + sqrt(2 ln(1/beta)) (c + sqrt(d)/2)))``."""
    b1 = c + math.sqrt(dim)
    b2 = math.sqrt(c * c + dim / 4 + math.sqrt(2 * math.log(1 / beta)) * (c + math.sqrt(dim) / 2))
    return min(b1, b2)


def _tau(sigma2: float, n: int) -> float:
    return 10 * sum(math.exp(-2 * math.pi ** 2 * sigma2 * k / (k + 1)) for k in range(1, n))


def ddp_rdp(*, sigma: float, n: int, l2: float, dim: int,
            orders: Sequence[float] = RDP_ORDERS) -> np.ndarray:
    """RDP at ``orders`` of one release of the sum of ``n`` clients' ``N_Z(0, sigma^2)``
    noise for integer sensitivity ``l2`` in dimension ``dim`` (KLS21 Proposition 14)."""
    if sigma <= 0:
        return np.full(len(orders), np.inf)
    if sigma < 0.5:
        raise ConfigError("the distributed discrete Gaussian bound needs sigma >= 1/2")
    sigma2 = float(exact_variance(sigma))
    tau = _tau(sigma2, n)
    l1 = l2 * min(math.sqrt(dim), l2)  # integer vectors: |x|_1 <= min(sqrt(d)|x|_2, |x|_2^2)
    s = math.sqrt(n * sigma2)
    a = np.asarray(orders, dtype=np.float64)
    t1 = a / 2 * (l2 / s) ** 2 + tau * dim
    t2 = a / 2 * ((l2 / s) ** 2 + 2 * (l1 / s) * tau + tau ** 2 * dim)
    t3 = a / 2 * (l2 / s + math.sqrt(dim) * tau) ** 2
    return np.asarray(np.minimum(np.minimum(t1, t2), t3))


def ddp_epsilon(*, sigma: float, n: int, l2: float, dim: int, rounds: int, delta: float,
                orders: Sequence[float] = RDP_ORDERS) -> float:
    """epsilon(delta) of ``rounds`` releases (RDP composition, Opacus's conversion)."""
    if rounds == 0:
        return 0.0
    rdp = ddp_rdp(sigma=sigma, n=n, l2=l2, dim=dim, orders=orders) * rounds
    if not np.isfinite(rdp).any():
        return math.inf
    eps, _ = get_privacy_spent(orders=list(orders), rdp=list(rdp), delta=delta)
    return float(eps)


@dataclass(frozen=True)
class DDPParams:
    """Everything a round of distributed DP needs, resolved from :class:`DDPSettings`.

    ``granularity``: float units per integer step; ``scaled_clip`` = clip / granularity;
    ``l2_bound``: integer L2 bound after rounding (the sensitivity); ``sigma``: each
    client's discrete Gaussian standard deviation (integer units); ``bound``: each client's
    integer range ``[-bound, bound]`` (exceeded with probability <= ``beta``);
    ``min_survivors``/``max_clients``: the noise and ring sizes.
    """

    clip: float
    dim: int
    min_survivors: int
    max_clients: int
    granularity: float
    l2_bound: float
    sigma: float
    bound: int
    ring_bits: int
    beta: float
    delta: float

    @property
    def scaled_clip(self) -> float:
        return self.clip / self.granularity

    @property
    def noise_multiplier(self) -> float:
        """Central noise standard deviation (min survivors) over the integer sensitivity."""
        return math.sqrt(self.min_survivors) * self.sigma / self.l2_bound

    @property
    def central_variance(self) -> float:
        """Provisioned variance of the summed noise per coordinate (minimum survivors)."""
        return self.min_survivors * float(exact_variance(self.sigma))

    def epsilon(self, rounds: int) -> float:
        """epsilon at ``delta_total`` after ``rounds`` releases."""
        return ddp_epsilon(sigma=self.sigma, n=self.min_survivors, l2=self.l2_bound,
                           dim=self.dim, rounds=rounds, delta=self.delta)

    @property
    def delta_total(self) -> float:
        """delta of every reported guarantee: accountant delta + range failures."""
        return self.delta + self.max_clients * self.beta

    def to_json(self) -> dict[str, Any]:
        return {"clip": self.clip, "dim": self.dim, "min_survivors": self.min_survivors,
                "max_clients": self.max_clients, "granularity": self.granularity,
                "scaled_clip": self.scaled_clip, "l2_bound": self.l2_bound,
                "sigma": self.sigma, "variance": str(exact_variance(self.sigma)),
                "noise_multiplier": self.noise_multiplier, "bound": self.bound,
                "ring_bits": self.ring_bits, "beta": self.beta, "delta": self.delta,
                "delta_total": self.delta_total}

    @classmethod
    def build(cls, settings: DDPSettings, *, dim: int, min_survivors: int, max_clients: int,
              noise_multiplier: float, granularity: float | None = None) -> DDPParams:
        """Parameters for a central noise multiplier ``noise_multiplier`` (0: no noise).

        Without a ``granularity`` the finest one whose range fits the ring is chosen.
        Raises :class:`ConfigError` if the ring cannot hold ``max_clients`` x range.
        """
        if dim < 1:
            raise ConfigError("distributed DP needs a non-empty update")
        if not 2 <= min_survivors <= max_clients:
            raise ConfigError(f"min_survivors {min_survivors} must be in [2, {max_clients}]")
        capacity = min(((1 << (settings.ring_bits - 1)) - 1) // max_clients,
                       MAX_EXACT_SUM // max_clients)
        tail = math.sqrt(2 * math.log(2 * dim / settings.beta))

        def make(gran: float) -> DDPParams:
            c = settings.clip / gran
            l2 = rounded_l2_bound(c, dim, settings.beta)
            sigma = noise_multiplier * l2 / math.sqrt(min_survivors)
            bound = math.ceil(l2) + (math.ceil(math.sqrt(float(exact_variance(sigma))) * tail)
                                     if sigma > 0 else 0)
            return cls(settings.clip, dim, min_survivors, max_clients, gran, l2, sigma, bound,
                       settings.ring_bits, settings.beta, settings.delta)

        gran = granularity if granularity is not None else settings.granularity
        if gran is None:  # bisection on log(granularity): the finest that fits
            lo, hi = math.log(settings.clip) - 60, math.log(settings.clip) + 5
            if make(math.exp(hi)).bound > capacity:
                raise ConfigError(f"privacy.ddp: even the coarsest granularity does not fit "
                                  f"{max_clients} clients in a {settings.ring_bits}-bit ring")
            for _ in range(80):
                mid = (lo + hi) / 2
                lo, hi = (lo, mid) if make(math.exp(mid)).bound <= capacity else (mid, hi)
            gran = math.exp(hi)
        params = make(gran)
        if params.bound > capacity:
            raise ConfigError(
                f"privacy.ddp: {max_clients} clients x range {params.bound} does not fit a "
                f"{settings.ring_bits}-bit ring (at most {capacity} per client); use more "
                f"ring bits or a coarser granularity")
        if 0 < params.sigma < 0.5:
            raise ConfigError("privacy.ddp: per-client sigma below 1/2 integer units; use a "
                              "finer granularity")
        return params

    @classmethod
    def for_target(cls, settings: DDPSettings, *, dim: int, min_survivors: int,
                   max_clients: int, rounds: int, target_epsilon: float) -> DDPParams:
        """The smallest noise (to 0.1%) whose epsilon after ``rounds`` is <= the target."""
        def eps(z: float) -> float:
            return cls.build(settings, dim=dim, min_survivors=min_survivors,
                             max_clients=max_clients, noise_multiplier=z).epsilon(rounds)

        lo, hi = 1e-3, 1.0
        while eps(hi) > target_epsilon:
            lo, hi = hi, hi * 2
            if hi > 1e6:
                raise ConfigError("privacy.ddp: target epsilon unreachable")
        while hi - lo > 1e-3 * hi:
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if eps(mid) <= target_epsilon else (mid, hi)
        return cls.build(settings, dim=dim, min_survivors=min_survivors,
                         max_clients=max_clients, noise_multiplier=hi)


# --------------------------------------------------------------------------------------------
# client side
# --------------------------------------------------------------------------------------------
def conditional_round(x: np.ndarray, l2_bound: float, rng: RandomSource) -> np.ndarray:
    """Unbiased randomised rounding of each coordinate, redrawn until the L2 norm of the
    result is <= ``l2_bound`` (it succeeds with probability >= 1 - beta per draw)."""
    floor = np.floor(x)
    frac = x - floor
    for _ in range(_MAX_ROUNDING_TRIES):
        u = np.frombuffer(rng.bytes(8 * x.size), dtype="<u8") >> np.uint64(11)
        up = u.astype(np.float64) * (1.0 / (1 << 53)) < frac
        out: np.ndarray = (floor + up).astype(np.int64)
        if float(np.dot(out.astype(np.float64), out.astype(np.float64))) <= l2_bound ** 2:
            return out
    raise QuantizationError("conditional rounding failed repeatedly; the L2 bound is too tight")


@dataclass
class DDPEncoded:
    """One client's integer vector for masking and what it did (for its own records)."""

    vector: np.ndarray
    norm: float
    clipped: bool
    out_of_range: int = 0
    stats: dict[str, float] = field(default_factory=dict)


def encode_update(update: Mapping[str, Any], params: DDPParams, spec: TensorSpec,
                  rng: RandomSource | None = None) -> DDPEncoded:
    """Clip, scale, round and noise one client's update (named tensors -> int64 vector)."""
    rng = rng or default_random()
    x = spec.flatten(update, who="ddp update")
    if x.size != params.dim:
        raise UpdateValidationError(f"update has {x.size} elements, parameters say {params.dim}")
    norm = float(np.linalg.norm(x))
    clipped = norm > params.clip
    if clipped:
        x = x * (params.clip / norm)
    ints = conditional_round(x / params.granularity, params.l2_bound, rng)
    if params.sigma > 0:
        ints = ints + discrete_gaussian(params.sigma, ints.size, rng)
    over = int((np.abs(ints) > params.bound).sum())
    if over:  # probability <= beta; counted in delta_total. Clamp so masking can sum it.
        np.clip(ints, -params.bound, params.bound, out=ints)
    return DDPEncoded(ints, norm, clipped, over)


# --------------------------------------------------------------------------------------------
# aggregation and decoding
# --------------------------------------------------------------------------------------------
def secure_integer_sum(vectors: Mapping[str, np.ndarray], *, bound: int, ring_bits: int,
                       min_survivors: int, drop: Mapping[str, str] | None = None,
                       rng: RandomSource | None = None, round_: int = 0,
                       **options: Any) -> tuple[np.ndarray, SecureSumResult]:
    """The exact sum of integer vectors with entries in ``[-bound, bound]`` through
    ``masking``; the server learns only the sum. Fewer than ``min_survivors`` survivors
    abort the round (:class:`ThresholdError`).

    Masking's quantiser is the identity here: its clip and its levels are both ``bound``,
    so each integer maps to itself in the ring (every client's weight is 1).
    """
    if not vectors:
        raise UpdateValidationError("no vectors to sum")
    n = len(vectors)
    if n < min_survivors:
        raise ThresholdError(f"{n} clients, fewer than the {min_survivors} distributed DP needs")
    if n * bound > min(MAX_EXACT_SUM, (1 << (ring_bits - 1)) - 1):
        raise ConfigError(f"{n} clients x range {bound} does not fit a {ring_bits}-bit ring")
    size = None
    updates: dict[str, dict[str, np.ndarray]] = {}
    for cid, v in vectors.items():
        arr = np.asarray(v)
        if arr.dtype.kind not in "iu" or arr.ndim != 1:
            raise UpdateValidationError(f"{cid}: expected a 1-D integer vector")
        if size is not None and arr.size != size:
            raise UpdateValidationError(f"{cid}: vector length differs")
        size = arr.size
        if arr.size and int(np.abs(arr.astype(np.int64)).max()) > bound:
            raise UpdateValidationError(f"{cid}: entries outside [-{bound}, {bound}]")
        updates[cid] = {"ddp": arr.astype(np.int64)}
    result = secure_sum(updates, protocol="masking", threshold=min_survivors, drop=drop,
                        rng=rng, round_=round_, clip=float(bound), levels=int(bound),
                        ring_bits=ring_bits, **options)
    if len(result.survivors) < min_survivors:  # masking's threshold already enforces this
        raise ThresholdError(f"{len(result.survivors)} survivors < {min_survivors}")
    total = np.asarray(result.sum["ddp"], dtype=np.float64)
    ints = np.rint(total)
    if not np.all(np.abs(total - ints) < 1e-3):
        raise QuantizationError("masking returned a non-integer sum; the integer path broke")
    return ints.astype(np.int64), result


def decode_sum(total: np.ndarray, params: DDPParams, spec: TensorSpec) -> dict[str, np.ndarray]:
    """Float sum of the clipped updates (plus noise) from the integer ring sum."""
    out: dict[str, np.ndarray] = spec.unflatten(total.astype(np.float64) * params.granularity)
    return out
