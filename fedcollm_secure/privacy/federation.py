"""Privacy across the rounds of a federation: per-client DP-SGD accountants, the budget
check before every round, distributed DP aggregation, and the ledger records.

The engine asks :meth:`PrivacyController.admit` which clients may train in round ``t``
*before* any training: a client whose DP-SGD budget the round would exceed is refused
(logged, typed :class:`PrivacyBudgetError`) and, by policy, dropped from the round or the
run is stopped (the error propagates). Accountants are stepped only for clients that trained
(:meth:`record_training`) and saved as JSON after every round when ``state_dir`` is set.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..crypto.randomness import RandomSource
from ..errors import ConfigError, PrivacyBudgetError, ThresholdError
from ..secagg import SecureSumResult, TensorSpec
from .accountant import ClientAccountant, compute_epsilon, noise_for_epsilon
from .config import DDPSettings, DPSGDSettings, PrivacySettings
from .ddp import DDPParams, decode_sum, encode_update, secure_integer_sum
from .ledger import PrivacyLedger, library_versions

__all__ = ["PrivacyController", "ddp_masking_options", "ddp_params", "load_accountant",
           "plan_dpsgd"]

log = logging.getLogger("fedcollm_secure.privacy")


def _planned(n: int, batch_size: int, epochs: int, max_steps: int) -> tuple[float, int]:
    q = min(1.0, batch_size / n)
    steps = epochs * math.ceil(n / batch_size)
    return q, min(steps, max_steps) if max_steps else steps


def plan_dpsgd(dp: DPSGDSettings, *, n_examples: int, batch_size: int, epochs: int,
               max_steps: int, rounds: int) -> tuple[float, float, int]:
    """``(noise_multiplier, sample_rate, steps per round)`` of one client's DP-SGD: the given
    noise, or the noise that spends ``target_epsilon`` over the planned steps of all rounds."""
    q, steps = _planned(n_examples, batch_size, epochs, max_steps)
    if dp.noise_multiplier is not None:
        return dp.noise_multiplier, q, steps
    if dp.target_epsilon is None:
        raise ConfigError("dpsgd needs noise_multiplier or target_epsilon")
    sigma = noise_for_epsilon(target_epsilon=dp.target_epsilon, sample_rate=q,
                              steps=steps * rounds, delta=dp.delta, accountant=dp.accountant)
    return sigma, q, steps


def load_accountant(dp: DPSGDSettings, client_id: str, path: Path | None) -> ClientAccountant:
    """``client_id``'s accountant saved at ``path`` (checked against this run's settings, with
    this run's budget), or a fresh one."""
    if path is not None and path.exists():
        acc = ClientAccountant.load(path)
        if (acc.client_id, acc.accountant, acc.delta) != (client_id, dp.accountant, dp.delta):
            raise ConfigError(f"{path}: saved accountant ({acc.client_id}, {acc.accountant}, "
                              f"delta {acc.delta}) does not match this run")
        acc.budget = dp.budget
        return acc
    return ClientAccountant(client_id, delta=dp.delta, accountant=dp.accountant,
                            budget=dp.budget)


def ddp_params(ddp: DDPSettings, *, dim: int, n_clients: int, threshold: int | None,
               rounds: int) -> DDPParams:
    """A run's distributed-DP parameters. Deterministic in its arguments, so the server and
    every client resolve the same ones from the same configuration."""
    m = ddp.min_survivors or threshold or max(2, n_clients // 2 + 1)
    if m > n_clients:
        raise ConfigError(f"privacy.ddp.min_survivors {m} exceeds the {n_clients} clients")
    if ddp.target_epsilon is not None:
        return DDPParams.for_target(ddp, dim=dim, min_survivors=m, max_clients=n_clients,
                                    rounds=rounds, target_epsilon=ddp.target_epsilon)
    if ddp.noise_multiplier is None:
        raise ConfigError("ddp needs noise_multiplier or target_epsilon")
    return DDPParams.build(ddp, dim=dim, min_survivors=m, max_clients=n_clients,
                           noise_multiplier=ddp.noise_multiplier)


def ddp_masking_options(params: DDPParams) -> dict[str, Any]:
    """Masking options that sum distributed-DP integer vectors exactly: the quantiser is the
    identity (clip and levels both ``bound``), and clients refuse a round whose threshold is
    below the minimum number of survivors the noise was sized for."""
    return {"clip": float(params.bound), "levels": int(params.bound),
            "ring_bits": params.ring_bits, "min_threshold": params.min_survivors}


class PrivacyController:
    """The privacy side of one run (see the module docstring).

    ``n_examples``: each client's number of training examples; ``batch_size``, ``epochs``,
    ``max_steps``: the local training schedule (Poisson rate ``batch_size / n``);
    ``rounds``: planned rounds (noise calibration for a target epsilon); ``threshold``: the
    aggregation threshold (default minimum survivors of distributed DP); ``dim``: number of
    adapter parameters.
    """

    def __init__(self, settings: PrivacySettings, *, n_examples: Mapping[str, int],
                 batch_size: int, epochs: int, max_steps: int, rounds: int,
                 threshold: int | None, dim: int) -> None:
        self.settings = settings
        self.client_ids = list(n_examples)
        self.ledger = PrivacyLedger(settings.ledger)
        self.versions = library_versions()
        self.plan: dict[str, tuple[float, float, int]] = {}  # cid -> (sigma, q, steps)
        self.accountants: dict[str, ClientAccountant] = {}
        self.refused: dict[int, dict[str, str]] = {}
        self.trained: dict[int, dict[str, dict[str, Any]]] = {}
        dp = settings.dpsgd
        if settings.dpsgd_on and dp is not None:
            for cid, n in n_examples.items():
                self.plan[cid] = plan_dpsgd(dp, n_examples=n, batch_size=batch_size,
                                            epochs=epochs, max_steps=max_steps, rounds=rounds)
                self.accountants[cid] = self._load_or_new(cid)
        self.ddp: DDPParams | None = None
        self.ddp_releases = 0
        ddp = settings.ddp
        if settings.ddp_on and ddp is not None:
            self.ddp = ddp_params(ddp, dim=dim, n_clients=len(self.client_ids),
                                  threshold=threshold, rounds=rounds)
            self.ddp_target = ddp.target_epsilon

    # --- DP-SGD ---------------------------------------------------------------------------
    def _state_path(self, cid: str) -> Path | None:
        d = self.settings.state_dir
        return Path(d) / f"{cid}.json" if d else None

    def _load_or_new(self, cid: str) -> ClientAccountant:
        dp = self.settings.dpsgd
        if dp is None:
            raise ConfigError("no dpsgd settings: client accountants are not used")
        return load_accountant(dp, cid, self._state_path(cid))

    def dpsgd_args(self, cid: str) -> tuple[float, float] | None:
        """``(noise_multiplier, max_grad_norm)`` of ``cid``'s DP-SGD, or None without it."""
        if cid not in self.plan or self.settings.dpsgd is None:
            return None
        return self.plan[cid][0], self.settings.dpsgd.max_grad_norm

    def admit(self, t: int, client_ids: Sequence[str]) -> list[str]:
        """The clients that may train in round ``t``: a client whose planned round would
        exceed its budget is refused before training (``drop``) or the run stops (``stop``,
        :class:`PrivacyBudgetError`). Distributed DP also needs its minimum of clients."""
        admitted, refused = [], {}
        for cid in client_ids:
            if cid in self.accountants:
                sigma, q, steps = self.plan[cid]
                try:
                    self.accountants[cid].check(sigma, q, steps)
                except PrivacyBudgetError as exc:
                    log.warning("round %d: %s refused: %s", t, cid, exc)
                    refused[cid] = str(exc)
                    continue
            admitted.append(cid)
        self.refused[t] = refused
        if refused and self.settings.on_budget_exceeded == "stop":
            raise PrivacyBudgetError(f"round {t}: stopping the run; DP-SGD budget exhausted "
                                     f"for {sorted(refused)}")
        if self.ddp is not None:
            if self.ddp_target is not None and self.ddp.epsilon(self.ddp_releases + 1) > \
                    self.ddp_target * (1 + 1e-9):
                raise PrivacyBudgetError(f"round {t}: another distributed-DP release would "
                                         f"exceed epsilon {self.ddp_target}")
            if len(admitted) < self.ddp.min_survivors:
                raise PrivacyBudgetError(
                    f"round {t}: {len(admitted)} clients may train, fewer than the "
                    f"{self.ddp.min_survivors} distributed DP needs")
        if not admitted:
            raise PrivacyBudgetError(f"round {t}: no client has budget left")
        return admitted

    def record_training(self, t: int, cid: str, steps: int, sample_rate: float | None = None,
                        noise_multiplier: float | None = None) -> None:
        """Step ``cid``'s accountant by the steps it took in round ``t``."""
        if cid not in self.accountants:
            return
        sigma, q, planned = self.plan[cid]
        sigma = noise_multiplier if noise_multiplier is not None else sigma
        q = sample_rate if sample_rate is not None else q
        acc = self.accountants[cid]
        acc.record(sigma, q, steps, round_=t)
        self.trained.setdefault(t, {})[cid] = {"sigma": sigma, "q": q, "steps": steps}
        path = self._state_path(cid)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            acc.save(path)

    # --- distributed DP -------------------------------------------------------------------
    def aggregate(self, deltas: Mapping[str, Mapping[str, torch.Tensor]], *, t: int,
                  drop: Mapping[str, str] | None = None, rng: RandomSource | None = None,
                  ) -> tuple[dict[str, torch.Tensor], SecureSumResult]:
        """The mean of the survivors' deltas under distributed DP: each client encodes its
        own delta (clip, scale, round, noise) and masking sums the integers."""
        params = self.ddp
        if params is None:
            raise ConfigError("distributed DP is not configured")
        ids = list(deltas)
        spec = TensorSpec.of(deltas[ids[0]])
        if spec.size != params.dim:
            raise ConfigError(f"the adapter has {spec.size} parameters, distributed DP was "
                              f"sized for {params.dim}")
        encoded = {cid: encode_update({n: v.detach().numpy() for n, v in deltas[cid].items()},
                                      params, spec, rng) for cid in ids}
        self.ddp_clipped = sum(e.clipped for e in encoded.values()) / len(encoded)
        self.ddp_out_of_range = sum(e.out_of_range for e in encoded.values())
        try:
            total, result = secure_integer_sum({c: e.vector for c, e in encoded.items()},
                                               bound=params.bound, ring_bits=params.ring_bits,
                                               min_survivors=params.min_survivors, drop=drop,
                                               rng=rng, round_=t)
        except ThresholdError:
            log.warning("round %d: fewer than %d survivors; distributed-DP round aborted",
                        t, params.min_survivors)
            raise
        self.ddp_releases += 1
        sums = decode_sum(total, params, spec)
        n = len(result.survivors)
        mean = {name: torch.from_numpy(np.ascontiguousarray(v / n, dtype=np.float32))
                for name, v in sums.items()}
        result.weight_total = float(n)
        return mean, result

    # --- ledger -----------------------------------------------------------------------------
    def round_record(self, t: int, secure: SecureSumResult | None = None) -> dict[str, Any]:
        """The ledger record of round ``t`` (appended to the JSONL ledger, returned)."""
        record: dict[str, Any] = {"round": t, "time": time.time(), "libraries": self.versions}
        dp = self.settings.dpsgd
        if self.accountants and dp is not None:
            clients: dict[str, Any] = {}
            for cid, acc in self.accountants.items():
                sigma, q, steps = self.plan[cid]
                took = self.trained.get(t, {}).get(cid)
                clients[cid] = {
                    "participated": took is not None,
                    "refused": self.refused.get(t, {}).get(cid),
                    "q": took["q"] if took else q, "sigma": took["sigma"] if took else sigma,
                    "clip": dp.max_grad_norm, "steps": took["steps"] if took else 0,
                    "epsilon_round": compute_epsilon(
                        noise_multiplier=took["sigma"], sample_rate=took["q"],
                        steps=took["steps"], delta=dp.delta, accountant=dp.accountant)
                    if took else 0.0,
                    "epsilon_cumulative": acc.epsilon(), "steps_cumulative": acc.steps,
                    "budget": acc.budget}
            record["dpsgd"] = {
                "privacy_unit": "example", "adjacency": "add/remove one example",
                "sampling": "poisson", "accountant": dp.accountant, "delta": dp.delta,
                "clients": clients,
                "aggregate": {
                    "epsilon_cumulative": max(c["epsilon_cumulative"] for c in clients.values()),
                    "composition": "parallel over disjoint client datasets (max over clients); "
                                   "the aggregate is post-processing of the clients' outputs"}}
        if self.ddp is not None:
            p = self.ddp
            record["ddp"] = {
                "privacy_unit": "client", "adjacency": "add/remove one client's whole update",
                "sampling": "none (every admitted client, every round)",
                "accountant": "rdp: distributed discrete Gaussian (Kairouz-Liu-Steinke 2021, "
                              "Prop. 14), Opacus RDP-to-DP conversion",
                "params": p.to_json(), "survivors": len(secure.survivors) if secure else 0,
                "clipped_fraction": getattr(self, "ddp_clipped", 0.0),
                "out_of_range": getattr(self, "ddp_out_of_range", 0),
                "epsilon_round": p.epsilon(1), "epsilon_cumulative": p.epsilon(self.ddp_releases),
                "releases": self.ddp_releases, "delta": p.delta_total}
        return self.ledger.append(record)

    def summary(self) -> dict[str, Any]:
        """Cumulative epsilons now (per client and aggregate) for reports."""
        out: dict[str, Any] = {}
        dp = self.settings.dpsgd
        if self.accountants and dp is not None:
            eps = {cid: acc.epsilon() for cid, acc in self.accountants.items()}
            out["dpsgd"] = {"delta": dp.delta, "accountant": dp.accountant,
                            "clients": eps, "aggregate": max(eps.values())}
        if self.ddp is not None:
            out["ddp"] = {"delta": self.ddp.delta_total,
                          "epsilon": self.ddp.epsilon(self.ddp_releases),
                          "noise_multiplier": self.ddp.noise_multiplier}
        return out
