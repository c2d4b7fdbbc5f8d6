"""The paper's baselines through the engine's own code paths (DESIGN.md section 1).

Every baseline builds a :class:`engine.FedCoLLM` (same model loading, data loading,
partitioning, tokenisation and per-client test splits), trains with the same trainer and
aggregator, and scores with :meth:`engine.FedCoLLM.evaluate`:

* ``zero_shot``: no training; the LLM and the SLM as loaded (LoRA adapters at their
  initialisation, which leaves the base models' outputs unchanged).
* ``standalone``: each client trains its own SLM adapter alone on its data, ``rounds`` times
  ``train.epochs`` local epochs (the same schedule and example orders as in the federation),
  and is scored on its own test split; no aggregation, no LLM training.
* ``fedavg``: the engine's rounds with mutual distillation switched off
  (``mode = "fedavg"``): the clients' adapters are averaged through the configured
  aggregator; the LLM is not trained.
* ``centralized``: the LLM's LoRA adapter trained on all client data plus the public data
  (``train.epochs * rounds`` epochs with the clients' training settings); the SLM is not
  trained.
* ``fedcollm``: the full method.

:func:`run_baseline` returns a comparable dict: ``{"name", "slm", "llm", "trained",
"seconds", "eval", "history"}`` where ``slm``/``llm`` are ``{"per_client": {cid: {"acc",
"acc_norm", "ppl", "n"}}, "mean": {"acc", "acc_norm", "ppl", "n_clients"}}`` (the final
models on each client's test split) and ``eval`` the full evaluation dict.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..errors import ConfigError
from .engine import FedCoLLM, FedCoLLMConfig, _seed
from .lora import apply_delta, load_adapter_state
from .trainer import client_update, train_lora

__all__ = ["BASELINES", "run_all", "run_baseline", "summarize"]

BASELINES = ("zero_shot", "standalone", "fedavg", "centralized", "fedcollm")
"""The baselines in the paper's order; :func:`run_all` runs these by default."""

_PREBUILT = frozenset({"llm", "slm", "tokenizer", "client_data", "public_data", "eval_data",
                       "client_eval_data"})


def summarize(evaluation: dict[str, Any]) -> dict[str, Any]:
    """The comparable part of an :meth:`FedCoLLM.evaluate` result: per-client and mean
    accuracy / perplexity of each model (``{}`` for a model that was not scored)."""
    out: dict[str, Any] = {}
    for which in ("slm", "llm"):
        entry = evaluation.get(which, {})
        per = entry.get("per_client", {})
        nan = {"acc": math.nan, "acc_norm": math.nan, "ppl": math.nan, "n_clients": 0.0}
        out[which] = {
            "per_client": {cid: {k: r[k] for k in ("acc", "acc_norm", "ppl", "n")}
                           for cid, r in per.items()},
            "mean": dict(entry.get("per_client_mean", nan)),
        }
    return out


def _zero_shot(run: FedCoLLM) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    return run.evaluate(), []


def _standalone(run: FedCoLLM) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    cfg = run.config
    theta_0 = {n: v.clone() for n, v in run.global_state.items()}
    states: dict[str, dict[str, torch.Tensor]] = {}
    history: list[dict[str, Any]] = []
    for k, (cid, features) in enumerate(zip(run.client_ids, run.client_features, strict=True)):
        state = {n: v.clone() for n, v in theta_0.items()}
        losses: list[float] = []
        for t in range(1, cfg.rounds + 1):  # the federation's per-round schedule and seeds
            delta, result = client_update(run.slm, run.tokenizer, state, features, cfg.train,
                                          seed=_seed(cfg.seed, t, k))
            state = apply_delta(state, delta)
            losses.append(result.mean_loss)
        states[cid] = state
        history.append({"client": cid, "round_loss": losses})
    load_adapter_state(run.slm, theta_0)
    return run.evaluate(states), history


def _federated(run: FedCoLLM) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    history = run.run()
    evaluation = history[-1]["eval"] if history else {}
    return evaluation, history


def _centralized(run: FedCoLLM) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    cfg = run.config
    union = [f for features in run.client_features for f in features]
    union.extend(run.public_features)
    settings = dataclasses.replace(cfg.train, epochs=cfg.train.epochs * cfg.rounds)
    result = train_lora(run.llm, run.tokenizer, union, settings, seed=_seed(cfg.seed, 0, -2))
    return run.evaluate(), [{"examples": len(union), "steps": result.steps,
                             "mean_loss": result.mean_loss}]


_RUNNERS: dict[str, Callable[[FedCoLLM], tuple[dict[str, Any], list[dict[str, Any]]]]] = {
    "zero_shot": _zero_shot, "standalone": _standalone, "fedavg": _federated,
    "centralized": _centralized, "fedcollm": _federated}
_TRAINED = {"zero_shot": (False, False), "standalone": (True, False), "fedavg": (True, False),
            "centralized": (False, True), "fedcollm": (True, True)}


def run_baseline(name: str, config: FedCoLLMConfig, **prebuilt: Any) -> dict[str, Any]:
    """Run baseline ``name`` (one of :data:`BASELINES`) with ``config``.

    ``prebuilt`` takes :class:`FedCoLLM`'s keyword arguments (``llm``, ``slm``,
    ``tokenizer``, ``client_data``, ``public_data``, ``eval_data``, ``client_eval_data``);
    passed models are trained in place. ``fedavg`` and ``fedcollm`` set ``config.mode``.
    """
    if name not in _RUNNERS:
        raise ConfigError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")
    unknown = sorted(set(prebuilt) - _PREBUILT)
    if unknown:
        raise ConfigError(f"run_baseline: unknown argument(s) {unknown}")
    if name in ("fedavg", "fedcollm"):
        config = config.replace(mode=name)
    start = time.perf_counter()
    run = FedCoLLM(config, **prebuilt)
    evaluation, history = _RUNNERS[name](run)
    slm_trained, llm_trained = _TRAINED[name]
    return {"name": name, **summarize(evaluation),
            "trained": {"slm": slm_trained, "llm": llm_trained},
            "seconds": time.perf_counter() - start, "eval": evaluation, "history": history}


def run_all(config: FedCoLLMConfig, names: Sequence[str] = BASELINES,
            **prebuilt: Any) -> dict[str, dict[str, Any]]:
    """Run each baseline in ``names`` from the same starting point: ``{name: result}``.

    Models given in ``prebuilt`` are deep-copied for each baseline (each trains its own
    copy); models loaded from ``config`` are loaded afresh each time.
    """
    unknown = [n for n in names if n not in _RUNNERS]
    if unknown:
        raise ConfigError(f"unknown baseline(s) {unknown}; choose from {', '.join(BASELINES)}")
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        kwargs = dict(prebuilt)
        for key in ("llm", "slm"):
            if kwargs.get(key) is not None:
                kwargs[key] = copy.deepcopy(kwargs[key])
        results[name] = run_baseline(name, config, **kwargs)
    return results
