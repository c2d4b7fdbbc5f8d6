"""Privacy accounting for DP-SGD (Opacus accountants) and persistent per-client state.

:func:`compute_epsilon` is epsilon(delta) of ``steps`` Poisson-subsampled Gaussian steps with
Opacus's ``rdp`` or ``prv`` accountant. :class:`ClientAccountant` keeps one client's history
across rounds as the list of ``(noise_multiplier, sample_rate, steps)`` entries Opacus uses
(saved as JSON, never pickle), is stepped only in rounds the client joins, and refuses a
round that would exceed the client's budget *before* any training
(:meth:`ClientAccountant.check`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from opacus.accountants import IAccountant, PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from ..errors import ConfigError, PrivacyBudgetError

__all__ = ["ACCOUNTANTS", "AccountantName", "ClientAccountant", "History", "compute_epsilon",
           "epsilon_of_history", "noise_for_epsilon"]

AccountantName = Literal["rdp", "prv"]
ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")
History = list[tuple[float, float, int]]  # (noise_multiplier, sample_rate, steps)
STATE_FORMAT = "fedcollm-secure/privacy-accountant"
STATE_VERSION = 1


def _opacus_accountant(name: str) -> IAccountant:
    if name == "rdp":
        return RDPAccountant()
    if name == "prv":
        return PRVAccountant()
    raise ConfigError(f"unknown accountant {name!r}; choose one of {list(ACCOUNTANTS)}")


def _check_entry(noise_multiplier: float, sample_rate: float, steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ConfigError(f"steps must be a non-negative integer, got {steps!r}")
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ConfigError(f"noise_multiplier must be finite and positive, got {noise_multiplier}")
    if not (math.isfinite(sample_rate) and 0 < sample_rate <= 1):
        raise ConfigError(f"sample_rate must be in (0, 1], got {sample_rate}")


def _check_delta(delta: float) -> None:
    if not (math.isfinite(delta) and 0 < delta < 1):
        raise ConfigError(f"delta must be in (0, 1), got {delta}")


def _merge(history: Iterable[tuple[float, float, int]]) -> History:
    """Opacus's run-length form: consecutive entries with equal (sigma, q) are merged."""
    out: History = []
    for sigma, q, steps in history:
        if steps == 0:
            continue
        if out and out[-1][0] == sigma and out[-1][1] == q:
            out[-1] = (sigma, q, out[-1][2] + steps)
        else:
            out.append((float(sigma), float(q), int(steps)))
    return out


def epsilon_of_history(history: Sequence[tuple[float, float, int]], delta: float,
                       accountant: str = "rdp") -> float:
    """epsilon(delta) of a composition of Poisson-subsampled Gaussian runs (0 if empty)."""
    _check_delta(delta)
    for entry in history:
        _check_entry(*entry)
    merged = _merge(history)
    acc = _opacus_accountant(accountant)
    if not merged:
        return 0.0
    acc.history = list(merged)
    return float(acc.get_epsilon(delta=delta))


def compute_epsilon(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                    accountant: str = "rdp") -> float:
    """epsilon(delta) after ``steps`` DP-SGD steps of noise ``noise_multiplier`` at Poisson
    rate ``sample_rate``, with Opacus's ``rdp`` or ``prv`` accountant (PRV: its upper bound)."""
    _check_entry(noise_multiplier, sample_rate, steps)
    return epsilon_of_history([(noise_multiplier, sample_rate, steps)], delta, accountant)


def noise_for_epsilon(*, target_epsilon: float, sample_rate: float, steps: int, delta: float,
                      accountant: str = "rdp") -> float:
    """The smallest noise multiplier (to Opacus's tolerance) whose epsilon after ``steps`` is
    at most ``target_epsilon``."""
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ConfigError(f"target_epsilon must be finite and positive, got {target_epsilon}")
    _check_delta(delta)
    _check_entry(1.0, sample_rate, steps)
    if steps == 0:
        raise ConfigError("cannot calibrate noise for zero steps")
    _opacus_accountant(accountant)
    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                      sample_rate=sample_rate, steps=steps,
                                      accountant=accountant))


class ClientAccountant:
    """One client's DP-SGD budget across rounds.

    ``budget`` is the largest epsilon(delta) the client may ever reach (``None``: account
    only). :meth:`check` raises :class:`PrivacyBudgetError` when a planned round would take
    the client over it; :meth:`record` adds the steps actually taken.
    """

    def __init__(self, client_id: str, *, delta: float, accountant: str = "rdp",
                 budget: float | None = None, history: Iterable[tuple[float, float, int]] = (),
                 rounds: Iterable[int] = ()) -> None:
        _check_delta(delta)
        _opacus_accountant(accountant)
        if budget is not None and not (budget > 0 and not math.isnan(budget)):
            raise ConfigError(f"budget must be positive, got {budget}")
        if not isinstance(client_id, str) or not client_id:
            raise ConfigError("client_id must be a non-empty string")
        self.client_id = client_id
        self.delta = float(delta)
        self.accountant = accountant
        self.budget = None if budget is None or math.isinf(budget) else float(budget)
        entries = list(history)
        for entry in entries:
            _check_entry(*entry)
        self.history: History = _merge(entries)
        self.rounds: list[int] = [int(r) for r in rounds]

    @property
    def steps(self) -> int:
        return sum(s for _, _, s in self.history)

    def epsilon(self) -> float:
        """epsilon(delta) spent so far."""
        return epsilon_of_history(self.history, self.delta, self.accountant)

    def projected_epsilon(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """epsilon(delta) after a further run of ``steps`` steps."""
        _check_entry(noise_multiplier, sample_rate, steps)
        return epsilon_of_history(self.history + [(noise_multiplier, sample_rate, steps)],
                                  self.delta, self.accountant)

    def check(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """The projected epsilon of a planned run; raises :class:`PrivacyBudgetError` if it
        would exceed the budget (nothing is recorded either way)."""
        projected = self.projected_epsilon(noise_multiplier, sample_rate, steps)
        if self.budget is not None and projected > self.budget:
            raise PrivacyBudgetError(
                f"{self.client_id}: {steps} more steps (sigma {noise_multiplier:g}, q "
                f"{sample_rate:g}) would reach epsilon {projected:.4f} > budget "
                f"{self.budget:g} at delta {self.delta:g}; spent so far {self.epsilon():.4f}")
        return projected

    def record(self, noise_multiplier: float, sample_rate: float, steps: int,
               round_: int | None = None) -> None:
        """Add ``steps`` steps taken (in round ``round_``)."""
        _check_entry(noise_multiplier, sample_rate, steps)
        self.history = _merge(self.history + [(noise_multiplier, sample_rate, steps)])
        if round_ is not None:
            self.rounds.append(int(round_))

    # --- persistence (JSON only) -------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "client_id": self.client_id,
                "accountant": self.accountant, "delta": self.delta, "budget": self.budget,
                "history": [[s, q, n] for s, q, n in self.history], "rounds": self.rounds}

    @classmethod
    def from_json(cls, data: Any) -> ClientAccountant:
        if not isinstance(data, dict):
            raise ConfigError("accountant state must be a JSON object")
        expected = {"format", "version", "client_id", "accountant", "delta", "budget",
                    "history", "rounds"}
        if set(data) != expected:
            raise ConfigError(f"accountant state keys {sorted(data)}; expected {sorted(expected)}")
        if data["format"] != STATE_FORMAT or data["version"] != STATE_VERSION:
            raise ConfigError(f"not a version-{STATE_VERSION} accountant state")
        history = data["history"]
        if not isinstance(history, list) or not all(
                isinstance(e, list) and len(e) == 3 and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in e)
                for e in history):
            raise ConfigError("accountant history must be a list of [sigma, q, steps]")
        if any(float(e[2]) != int(e[2]) for e in history):
            raise ConfigError("accountant history steps must be integers")
        rounds = data["rounds"]
        if not isinstance(rounds, list) or not all(
                isinstance(r, int) and not isinstance(r, bool) for r in rounds):
            raise ConfigError("accountant rounds must be a list of integers")
        for key in ("delta",):
            if isinstance(data[key], bool) or not isinstance(data[key], (int, float)):
                raise ConfigError(f"accountant {key} must be a number")
        budget = data["budget"]
        if budget is not None and (isinstance(budget, bool)
                                   or not isinstance(budget, (int, float))):
            raise ConfigError("accountant budget must be a number or null")
        return cls(str(data["client_id"]), delta=float(data["delta"]),
                   accountant=str(data["accountant"]), budget=budget,
                   history=[(float(s), float(q), int(n)) for s, q, n in history],
                   rounds=rounds)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ClientAccountant:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not JSON ({exc})") from None
        return cls.from_json(data)
