"""Validated privacy settings of a run (the ``privacy`` section of a FedCoLLM config).

``dpsgd``: sample-level DP-SGD at every client (Opacus), one persistent accountant per
client. ``ddp``: user-level distributed DP on top of ``masking``. ``on_budget_exceeded``
says what a run does when a client's next round would exceed its DP-SGD budget: ``drop``
that client from the round (and later ones it cannot afford) or ``stop`` the run cleanly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Literal

from ..config import ConfigBase, require

__all__ = ["DDPSettings", "DPSGDSettings", "PrivacySettings"]


def _delta_ok(name: str, delta: float) -> None:
    require(math.isfinite(delta) and 0 < delta < 1, f"{name} must be in (0, 1)")


def _positive_or_inf(name: str, value: float | None) -> None:
    require(value is None or (not math.isnan(value) and value > 0),
            f"{name} must be a positive number (or inf)")


@dataclasses.dataclass(frozen=True)
class DPSGDSettings(ConfigBase):
    """Client DP-SGD on the SLM's LoRA parameters (per-example clipping + Gaussian noise).

    Give ``noise_multiplier`` or ``target_epsilon`` (the whole run's budget per client, from
    which the noise is calibrated over the planned steps of all rounds). ``epsilon_budget``
    caps a client's epsilon(delta) across rounds (default: ``target_epsilon``; none: account
    only). ``target_epsilon = inf`` means no DP-SGD (the non-private baseline of a sweep).
    Sampling is Poisson with rate ``batch_size / n_examples`` (the privacy unit is one
    training example, add/remove adjacency).
    """

    section: ClassVar[str] = "privacy.dpsgd"
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    epsilon_budget: float | None = None
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    accountant: Literal["rdp", "prv"] = "rdp"
    sampling: Literal["poisson"] = "poisson"

    def validate(self) -> None:
        require((self.noise_multiplier is None) != (self.target_epsilon is None),
                "privacy.dpsgd: give exactly one of noise_multiplier and target_epsilon")
        require(self.noise_multiplier is None
                or (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0),
                "privacy.dpsgd.noise_multiplier must be finite and positive")
        _positive_or_inf("privacy.dpsgd.target_epsilon", self.target_epsilon)
        _positive_or_inf("privacy.dpsgd.epsilon_budget", self.epsilon_budget)
        require(math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0,
                "privacy.dpsgd.max_grad_norm must be finite and positive")
        _delta_ok("privacy.dpsgd.delta", self.delta)

    @property
    def enabled(self) -> bool:
        """False for ``target_epsilon = inf`` (no noise, no clipping: the baseline)."""
        return not (self.target_epsilon is not None and math.isinf(self.target_epsilon))

    @property
    def budget(self) -> float | None:
        b = self.epsilon_budget if self.epsilon_budget is not None else self.target_epsilon
        return None if b is None or math.isinf(b) else b


@dataclasses.dataclass(frozen=True)
class DDPSettings(ConfigBase):
    """User-level distributed DP: clipped, scaled, rounded updates plus discrete Gaussian
    noise, summed by ``masking`` (protocols/ddp/v1/SPEC.md).

    ``clip``: L2 bound of a client's whole update (float units). ``min_survivors``: the
    smallest number of clients whose noise the released sum must contain (the round aborts
    below it; default: the run's threshold). Give ``noise_multiplier`` (central noise
    standard deviation over ``clip``, with ``min_survivors`` contributors) or
    ``target_epsilon`` (the whole run, calibrated over ``rounds``). ``ring_bits`` is the
    masking ring; ``beta`` bounds the failure probabilities of conditional rounding and of
    the range check (added to ``delta`` in every reported guarantee). ``target_epsilon = inf``
    switches distributed DP off (plain masking).
    """

    section: ClassVar[str] = "privacy.ddp"
    clip: float = 1.0
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    min_survivors: int | None = None
    ring_bits: int = 32
    beta: float = 1e-9
    granularity: float | None = None

    def validate(self) -> None:
        require(math.isfinite(self.clip) and self.clip > 0,
                "privacy.ddp.clip must be finite and positive")
        require((self.noise_multiplier is None) != (self.target_epsilon is None),
                "privacy.ddp: give exactly one of noise_multiplier and target_epsilon")
        require(self.noise_multiplier is None
                or (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0),
                "privacy.ddp.noise_multiplier must be finite and >= 0")
        _positive_or_inf("privacy.ddp.target_epsilon", self.target_epsilon)
        _delta_ok("privacy.ddp.delta", self.delta)
        require(self.min_survivors is None or self.min_survivors >= 2,
                "privacy.ddp.min_survivors must be >= 2")
        require(16 <= self.ring_bits <= 64, "privacy.ddp.ring_bits must be in [16, 64]")
        require(0 < self.beta < 1e-3, "privacy.ddp.beta must be in (0, 1e-3)")
        require(self.granularity is None
                or (math.isfinite(self.granularity) and self.granularity > 0),
                "privacy.ddp.granularity must be finite and positive")

    @property
    def enabled(self) -> bool:
        return not (self.target_epsilon is not None and math.isinf(self.target_epsilon))


@dataclasses.dataclass(frozen=True)
class PrivacySettings(ConfigBase):
    """The ``privacy`` section: DP-SGD and/or distributed DP, the budget policy, a ledger.

    ``ledger``: a JSONL file that receives one privacy record per round (also kept in the
    run history). ``state_dir``: where each client's accountant state is saved as JSON
    after every round (and loaded from, if present, when the run starts).
    """

    section: ClassVar[str] = "privacy"
    dpsgd: DPSGDSettings | None = None
    ddp: DDPSettings | None = None
    on_budget_exceeded: Literal["drop", "stop"] = "drop"
    ledger: str | None = None
    state_dir: str | None = None

    def validate(self) -> None:
        require(self.on_budget_exceeded in ("drop", "stop"),
                "privacy.on_budget_exceeded must be drop or stop")

    @property
    def dpsgd_on(self) -> bool:
        return self.dpsgd is not None and self.dpsgd.enabled

    @property
    def ddp_on(self) -> bool:
        return self.ddp is not None and self.ddp.enabled
