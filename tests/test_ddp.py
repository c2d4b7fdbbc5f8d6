"""Distributed DP: exact discrete Gaussian sampler, encoding through masking, accounting."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from scipy import stats

from fedcollm_secure.crypto import InsecureSeededRandomForTests
from fedcollm_secure.errors import ConfigError, ThresholdError
from fedcollm_secure.privacy.config import DDPSettings
from fedcollm_secure.privacy.ddp import (
    DDPParams, _tau, ddp_epsilon, decode_sum, discrete_gaussian, discrete_gaussian_pmf,
    encode_update, exact_variance, rounded_l2_bound, secure_integer_sum,
)
from fedcollm_secure.secagg import TensorSpec

TEST_SEED = "ddp-tests"  # named test-mode randomness: results are reproducible


def _rng(tag: str) -> InsecureSeededRandomForTests:
    return InsecureSeededRandomForTests(f"{TEST_SEED}/{tag}", quiet=True)


def _chi2_pvalue(samples: np.ndarray, sigma: float) -> float:
    """Chi-square goodness of fit against N_Z(0, sigma^2), bins with >= 20 expected counts
    (tails pooled)."""
    n = samples.size
    lo, hi = -int(4 * sigma), int(4 * sigma)
    support = np.arange(lo, hi + 1)
    probs = discrete_gaussian_pmf(sigma, support)
    expected = list(n * probs)
    observed = [float(np.sum(samples == k)) for k in support]
    below, above = float(np.sum(samples < lo)), float(np.sum(samples > hi))
    tail = (1 - probs.sum()) / 2 * n
    exp_all = [tail] + expected + [tail]
    obs_all = [below] + observed + [above]
    e_bins, o_bins, acc_e, acc_o = [], [], 0.0, 0.0
    for e, o in zip(exp_all, obs_all, strict=True):
        acc_e, acc_o = acc_e + e, acc_o + o
        if acc_e >= 20:
            e_bins.append(acc_e)
            o_bins.append(acc_o)
            acc_e, acc_o = 0.0, 0.0
    e_bins[-1] += acc_e
    o_bins[-1] += acc_o
    e, o = np.array(e_bins), np.array(o_bins)
    chi2 = float(((o - e) ** 2 / e).sum())
    return float(stats.chi2.sf(chi2, len(e) - 1))


def test_discrete_gaussian_sampler_passes_at_sigma_and_fails_at_106_sigma() -> None:
    sigma = 3.0
    samples = discrete_gaussian(sigma, 30_000, _rng("closeness"))
    assert _chi2_pvalue(samples, sigma) > 1e-3
    assert _chi2_pvalue(samples, 1.06 * sigma) < 1e-6
    wider = discrete_gaussian(1.06 * sigma, 30_000, _rng("closeness-wide"))
    assert _chi2_pvalue(wider, sigma) < 1e-6
    assert abs(float(samples.mean())) < 4 * sigma / math.sqrt(samples.size)


def test_sampler_variance_parameter_rounds_up_and_zero_noise_is_zero() -> None:
    assert exact_variance(2.0) == 4 and exact_variance(0.3) >= 0.3 ** 2
    assert not discrete_gaussian(0.0, 10, _rng("zero")).any()


def test_at_noise_zero_distributed_dp_returns_the_exact_clipped_sum() -> None:
    rng = np.random.default_rng(0)
    updates = {f"c{i}": {"a": rng.normal(size=(20, 5)) * s, "b": rng.normal(size=7) * s}
               for i, s in enumerate([0.01, 0.05, 3.0, 0.02])}  # client c2 exceeds the clip
    spec = TensorSpec.of(updates["c0"])
    params = DDPParams.build(DDPSettings(clip=1.0, noise_multiplier=0.0), dim=spec.size,
                             min_survivors=3, max_clients=4, noise_multiplier=0.0)
    enc = {c: encode_update(u, params, spec, _rng(c)) for c, u in updates.items()}
    assert [e.clipped for e in enc.values()] == [False, False, True, False]
    total, result = secure_integer_sum({c: e.vector for c, e in enc.items()},
                                       bound=params.bound, ring_bits=params.ring_bits,
                                       min_survivors=3, rng=_rng("sum"))
    assert total.tolist() == sum(e.vector for e in enc.values()).tolist()  # exact integers
    decoded = decode_sum(total, params, spec)
    for name in spec.entries:
        n = name[0]
        clipped = sum(np.asarray(u[n]) * min(1.0, 1.0 / np.sqrt(sum(
            float((np.asarray(v) ** 2).sum()) for v in u.values()))) for u in updates.values())
        assert np.abs(decoded[n] - clipped).max() <= 4 * params.granularity
    assert sorted(result.survivors) == sorted(updates)


def test_aggregate_noise_variance_matches_the_provisioned_value_with_min_survivors() -> None:
    dim, n, m = 6000, 5, 3
    params = DDPParams.build(DDPSettings(clip=1.0, noise_multiplier=1.0), dim=dim,
                             min_survivors=m, max_clients=n, noise_multiplier=0.002,
                             granularity=1e-4)
    assert 3 < params.sigma < 20  # small integer noise keeps the test fast
    spec = TensorSpec.of({"w": np.zeros(dim)})
    enc = {f"c{i}": encode_update({"w": np.zeros(dim)}, params, spec, _rng(f"v{i}"))
           for i in range(n)}
    drop = {"c3": "masked_input", "c4": "masked_input"}  # only the minimum survive
    total, result = secure_integer_sum({c: e.vector for c, e in enc.items()},
                                       bound=params.bound, ring_bits=params.ring_bits,
                                       min_survivors=m, drop=drop, rng=_rng("vsum"))
    assert len(result.survivors) == m
    var = float(np.var(total.astype(np.float64)))
    assert var == pytest.approx(params.central_variance, rel=0.06)  # sd of estimate ~1.8%
    assert not var == pytest.approx(n * params.central_variance / m, rel=0.2)
    with pytest.raises(ThresholdError):  # below the minimum: abort, release nothing
        secure_integer_sum({c: e.vector for c, e in enc.items()}, bound=params.bound,
                           ring_bits=params.ring_bits, min_survivors=m,
                           drop={"c2": "masked_input", **drop}, rng=_rng("abort"))


def test_ring_bits_are_checked_against_clients_times_range_at_config_time() -> None:
    settings = DDPSettings(clip=1.0, noise_multiplier=1.0, ring_bits=16)
    with pytest.raises(ConfigError, match="ring"):
        DDPParams.build(settings, dim=10_000, min_survivors=2, max_clients=3,
                        noise_multiplier=1.0, granularity=1e-6)
    ok = DDPParams.build(settings, dim=10_000, min_survivors=2, max_clients=3,
                         noise_multiplier=1.0)
    assert 3 * ok.bound <= (1 << 15) - 1
    with pytest.raises(ConfigError):
        DDPParams.build(settings, dim=10, min_survivors=4, max_clients=3, noise_multiplier=1.0)


def test_accounting_matches_dp_accounting_zcdp_composition() -> None:
    # Prop. 14's first bound is (xi, rho)-zCDP with rho = Delta^2 / (2 n sigma^2), xi = tau d.
    # dp-accounting composes that independently; ours takes the min of three bounds, so it
    # can only be lower, and equals it where the first bound is the smallest.
    for sigma, n, l2, dim, rounds in [(40.0, 3, 100.0, 1000, 5), (0.6, 4, 3.0, 50, 3),
                                      (2000.0, 5, 5000.0, 10**5, 10)]:
        ours = ddp_epsilon(sigma=sigma, n=n, l2=l2, dim=dim, rounds=rounds, delta=1e-5)
        s2 = float(exact_variance(sigma))
        acc = dp_accounting.rdp.RdpAccountant()
        acc.compose(dp_accounting.ZCDpEvent(rho=l2 ** 2 / (2 * n * s2), xi=_tau(s2, n) * dim),
                    rounds)
        ref = acc.get_epsilon(1e-5)
        assert ours <= ref * (1 + 1e-3)
        if _tau(s2, n) * dim < 1e-12:  # tau negligible: the bounds coincide
            assert ours == pytest.approx(ref, rel=0.02)


def test_target_epsilon_calibration_and_rounding_bound() -> None:
    p = DDPParams.for_target(DDPSettings(clip=1.0, target_epsilon=3.0), dim=5000,
                             min_survivors=3, max_clients=4, rounds=4, target_epsilon=3.0)
    assert 2.9 < p.epsilon(4) <= 3.0 and p.epsilon(5) > 3.0
    assert rounded_l2_bound(100.0, 10_000, 1e-9) < 100 + math.sqrt(10_000)
