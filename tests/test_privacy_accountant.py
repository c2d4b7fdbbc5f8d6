"""DP-SGD accounting: golden values through our API, persistent per-client accountants,
the budget check before a round."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fedcollm_secure.errors import ConfigError, PrivacyBudgetError
from fedcollm_secure.privacy import ClientAccountant, compute_epsilon, noise_for_epsilon
from fedcollm_secure.privacy.config import DDPSettings, DPSGDSettings, PrivacySettings


def test_golden_values_of_opacus_through_our_api() -> None:
    # Opacus's accountants_test: RDP at int(90 / 0.04) = 2250 steps, PRV at
    # int(90 // 0.04) = 2249 steps (floor division of floats gives 2249.0).
    rdp = compute_epsilon(noise_multiplier=1.5, sample_rate=0.04, steps=2250, delta=1e-5,
                          accountant="rdp")
    assert rdp == pytest.approx(7.32911117143, abs=1e-6)
    prv = compute_epsilon(noise_multiplier=1.5, sample_rate=0.04, steps=2249, delta=1e-5,
                          accountant="prv")
    assert prv == pytest.approx(6.777395712150674, abs=1e-4)


def test_prv_at_2250_steps_equals_opacus_stepped_one_step_at_a_time() -> None:
    acc = PRVAccountant()
    for _ in range(2250):
        acc.step(noise_multiplier=1.5, sample_rate=0.04)
    ours = compute_epsilon(noise_multiplier=1.5, sample_rate=0.04, steps=2250, delta=1e-5,
                           accountant="prv")
    assert ours == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)
    assert ours > 6.7774  # one more step than the golden value


@pytest.mark.parametrize("bad", [
    {"noise_multiplier": 0.0}, {"sample_rate": 0.0}, {"sample_rate": 1.5}, {"steps": -1},
    {"delta": 0.0}, {"delta": 1.0}, {"accountant": "gdp"}])
def test_bad_accounting_input_is_a_config_error(bad: dict[str, object]) -> None:
    args: dict[str, object] = {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 10,
                               "delta": 1e-5, "accountant": "rdp"}
    args.update(bad)
    with pytest.raises(ConfigError):
        compute_epsilon(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_multi_round_epsilon_equals_one_accountant_run_over_the_same_steps(kind: str,
                                                                           tmp_path: Path) -> None:
    acc = ClientAccountant("client-0", delta=1e-5, accountant=kind)
    for t in (1, 2, 3):  # rounds of 40 steps, saved and reloaded in between
        acc.record(1.1, 0.05, 40, round_=t)
        acc.save(tmp_path / "acc.json")
        acc = ClientAccountant.load(tmp_path / "acc.json")
    single = RDPAccountant() if kind == "rdp" else PRVAccountant()
    for _ in range(120):
        single.step(noise_multiplier=1.1, sample_rate=0.05)
    assert acc.steps == 120 and acc.rounds == [1, 2, 3]
    assert acc.history == [(1.1, 0.05, 120)]
    assert acc.epsilon() == pytest.approx(single.get_epsilon(delta=1e-5), rel=1e-9)


def test_state_is_plain_json_with_opacus_history_and_rejects_tampering(tmp_path: Path) -> None:
    acc = ClientAccountant("c", delta=1e-5, budget=3.0)
    acc.record(1.0, 0.1, 5, round_=1)
    acc.record(2.0, 0.1, 7, round_=3)  # a different sigma starts a new history entry
    path = tmp_path / "c.json"
    acc.save(path)
    data = json.loads(path.read_text())
    assert data["history"] == [[1.0, 0.1, 5], [2.0, 0.1, 7]] and data["rounds"] == [1, 3]
    assert ClientAccountant.load(path).epsilon() == pytest.approx(acc.epsilon())
    for key, value in [("history", [[1.0, 0.1, "5"]]), ("history", [[1.0, 0.1, 2.5]]),
                       ("version", 2), ("budget", "big"), ("extra", 1)]:
        bad = dict(data, **{key: value})
        with pytest.raises(ConfigError):
            ClientAccountant.from_json(bad)
    path.write_text("not json")
    with pytest.raises(ConfigError):
        ClientAccountant.load(path)


def test_a_round_that_would_exceed_the_budget_is_refused_before_it_is_recorded() -> None:
    eps_one = compute_epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=20, delta=1e-5)
    eps_two = compute_epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=40, delta=1e-5)
    acc = ClientAccountant("c", delta=1e-5, budget=(eps_one + eps_two) / 2)
    assert acc.check(1.0, 0.1, 20) == pytest.approx(eps_one)
    acc.record(1.0, 0.1, 20, round_=1)
    with pytest.raises(PrivacyBudgetError, match="budget"):
        acc.check(1.0, 0.1, 20)
    assert acc.steps == 20 and acc.epsilon() <= acc.budget  # type: ignore[operator]


def test_noise_for_epsilon_reaches_the_target_from_below() -> None:
    sigma = noise_for_epsilon(target_epsilon=2.0, sample_rate=0.1, steps=100, delta=1e-5)
    eps = compute_epsilon(noise_multiplier=sigma, sample_rate=0.1, steps=100, delta=1e-5)
    assert 1.95 < eps <= 2.0
    with pytest.raises(ConfigError):
        noise_for_epsilon(target_epsilon=math.inf, sample_rate=0.1, steps=100, delta=1e-5)


def test_privacy_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        DPSGDSettings()
    with pytest.raises(ConfigError, match="exactly one"):
        DPSGDSettings(noise_multiplier=1.0, target_epsilon=1.0)
    with pytest.raises(ConfigError):
        DPSGDSettings.from_dict({"noise_multiplier": 1.0, "delta": 2.0})
    with pytest.raises(ConfigError):
        PrivacySettings.from_dict({"on_budget_exceeded": "ignore"})
    with pytest.raises(ConfigError):
        DDPSettings(noise_multiplier=1.0, min_survivors=1)
    s = PrivacySettings.from_dict({"dpsgd": {"target_epsilon": 4}, "on_budget_exceeded": "stop"})
    assert s.dpsgd_on and s.dpsgd is not None and s.dpsgd.budget == 4.0
    off = PrivacySettings.from_dict({"dpsgd": {"target_epsilon": math.inf}})
    assert not off.dpsgd_on and PrivacySettings.from_dict(s.to_dict()) == s
