from __future__ import annotations

import pytest

from fedcollm_secure.errors import ConfigError
from fedcollm_secure.secagg.masking.config import MaskingConfig, RoundParams, default_degree


def test_unknown_keys_and_bad_types_are_refused() -> None:
    with pytest.raises(ConfigError, match="unknown key"):
        MaskingConfig.from_dict({"clip": 1.0, "clpi": 2.0})
    with pytest.raises(ConfigError, match="number"):
        MaskingConfig.from_dict({"clip": "1.0"})
    with pytest.raises(ConfigError, match="integer"):
        MaskingConfig.from_dict({"ring_bits": 32.0})
    with pytest.raises(ConfigError, match="integer"):
        MaskingConfig.from_dict({"ring_bits": True})
    with pytest.raises(ConfigError):
        MaskingConfig.from_dict({"graph": "star"})
    with pytest.raises(ConfigError):
        MaskingConfig.from_dict(["clip", 1.0])  # type: ignore[arg-type]


def test_invariants() -> None:
    for bad in ({"clip": 0.0}, {"clip": float("inf")}, {"ring_bits": 4}, {"ring_bits": 65},
                {"min_threshold": 1}, {"degree": 3}, {"share_threshold": 1}, {"levels": 0},
                {"max_weight": -1.0}):
        with pytest.raises(ConfigError):
            MaskingConfig.from_dict(bad)


def test_round_trip() -> None:
    cfg = MaskingConfig.from_dict({"graph": "k_regular", "degree": 6, "clip": 2})
    assert cfg.clip == 2.0 and isinstance(cfg.clip, float)
    assert MaskingConfig.from_dict(cfg.to_dict()) == cfg


def test_round_params_overflow_and_thresholds() -> None:
    with pytest.raises(ConfigError, match="overflow"):
        RoundParams.resolve(MaskingConfig(ring_bits=16, levels=10_000), 10, None)
    p = RoundParams.resolve(MaskingConfig(), 10, None)
    assert p.threshold == 6 and p.graph == "complete" and p.share_threshold == 6
    assert 10 * p.values.levels <= (1 << 31) - 1
    with pytest.raises(ConfigError):
        RoundParams.resolve(MaskingConfig(), 10, 1)
    with pytest.raises(ConfigError):
        RoundParams.resolve(MaskingConfig(), 10, 11)
    with pytest.raises(ConfigError):
        RoundParams.resolve(MaskingConfig(), 1, None)
    k = RoundParams.resolve(MaskingConfig(graph="k_regular"), 50, None)
    assert k.graph == "k_regular" and k.degree == default_degree(50) == 12
    assert k.share_threshold == 7


def test_default_degree_grows_logarithmically() -> None:
    assert default_degree(4) == 3
    assert default_degree(100) == 14
    assert default_degree(1000) == 20
    assert all(default_degree(n) % 2 == 0 or default_degree(n) == n - 1 for n in range(2, 500))
