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
* ``centralized``: the LLM's LoRA adapter trained on all client data plus the public data,
  tokenised with the LLM's own tokenizer (``train.epochs * rounds`` epochs with the clients'
  training settings); the SLM is not trained.
* ``fedcollm``: the full method.

:func:`run_baseline` returns a comparable dict: ``{"name", "slm", "llm", "trained",
"seconds", "eval", "history"}`` where ``slm``/``llm`` are ``{"per_client": {cid: {"acc",
"acc_norm", "ppl", "n"}}, "mean": {"acc", "acc_norm", "ppl", "n_clients"}}`` (the final
models on each client's test split) and ``eval`` the full evaluation dict. An
``evaluator`` (``(run, slm_states) -> evaluation``) replaces :meth:`FedCoLLM.evaluate` for the
final scoring (the experiment in ``benchmarks/paper`` scores full test splits its own way).

Training randomness (LoRA initialisation, dropout, example order) is seeded from
``config.seed`` (:func:`engine.seeded_torch`), so a baseline is reproducible for its seed up
to the secure aggregator's CSPRNG rounding.
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
from .data import tokenize_examples
from .engine import FedCoLLM, FedCoLLMConfig, _seed, seeded_torch
from .lora import apply_delta, load_adapter_state
from .trainer import client_update, train_lora

__all__ = ["BASELINES", "run_all", "run_baseline", "summarize"]

BASELINES = ("zero_shot", "standalone", "fedavg", "centralized", "fedcollm")
"""The baselines in the paper's order; :func:`run_all` runs these by default."""

_PREBUILT = frozenset({"llm", "slm", "tokenizer", "llm_tokenizer", "client_data",
                       "public_data", "eval_data", "client_eval_data"})

SlmStates = dict[str, dict[str, torch.Tensor]]
Evaluator = Callable[[FedCoLLM, SlmStates | None], dict[str, Any]]
Runner = Callable[[FedCoLLM, Evaluator], tuple[dict[str, Any], list[dict[str, Any]]]]


def _default_evaluator(run: FedCoLLM, slm_states: SlmStates | None) -> dict[str, Any]:
    return run.evaluate(slm_states)


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


def _zero_shot(run: FedCoLLM, evaluate: Evaluator,
               ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    return evaluate(run, None), []


def _standalone(run: FedCoLLM, evaluate: Evaluator,
                ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    cfg = run.config
    theta_0 = {n: v.clone() for n, v in run.global_state.items()}
    states: dict[str, dict[str, torch.Tensor]] = {}
    history: list[dict[str, Any]] = []
    for k, (cid, features) in enumerate(zip(run.client_ids, run.client_features, strict=True)):
        state = {n: v.clone() for n, v in theta_0.items()}
        losses: list[float] = []
        for t in range(1, cfg.rounds + 1):  # the federation's per-round schedule and seeds
            with seeded_torch(_seed(cfg.seed, t, k, -5)):  # as in the engine's rounds
                delta, result = client_update(run.slm, run.tokenizer, state, features,
                                              cfg.train, seed=_seed(cfg.seed, t, k))
            state = apply_delta(state, delta)
            losses.append(result.mean_loss)
        states[cid] = state
        history.append({"client": cid, "round_loss": losses})
    load_adapter_state(run.slm, theta_0)
    return evaluate(run, states), history


def _federated(run: FedCoLLM, evaluate: Evaluator,
               ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    history = run.run()
    if evaluate is _default_evaluator:  # the last round has scored the final models
        return (history[-1]["eval"] if history else {}), history
    return evaluate(run, None), history


def _centralized(run: FedCoLLM, evaluate: Evaluator,
                 ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The LLM on the union of the clients' and the public data, tokenised with the
    LLM's own tokenizer (``run.client_features`` hold the SLM's tokens)."""
    cfg = run.config
    if run.llm_tokenizer is run.tokenizer:
        union = [f for features in run.client_features for f in features]
        union.extend(run.public_features)
    else:
        union = [f for d in [*run.client_data, run.public_data]
                 for f in tokenize_examples(d, run.llm_tokenizer, cfg.data.max_length,
                                            prompt=cfg.eval.prompt)]
    settings = dataclasses.replace(cfg.train, epochs=cfg.train.epochs * cfg.rounds)
    with seeded_torch(_seed(cfg.seed, 0, -2, -5)):
        result = train_lora(run.llm, run.llm_tokenizer, union, settings,
                            seed=_seed(cfg.seed, 0, -2))
    return evaluate(run, None), [{"examples": len(union), "steps": result.steps,
                                  "mean_loss": result.mean_loss}]


_RUNNERS: dict[str, Runner] = {
    "zero_shot": _zero_shot, "standalone": _standalone, "fedavg": _federated,
    "centralized": _centralized, "fedcollm": _federated}
_TRAINED = {"zero_shot": (False, False), "standalone": (True, False), "fedavg": (True, False),
            "centralized": (False, True), "fedcollm": (True, True)}


def run_baseline(name: str, config: FedCoLLMConfig, *, evaluator: Evaluator | None = None,
                 **prebuilt: Any) -> dict[str, Any]:
    """Run baseline ``name`` (one of :data:`BASELINES`) with ``config``.

    ``prebuilt`` takes :class:`FedCoLLM`'s keyword arguments (``llm``, ``slm``,
    ``tokenizer``, ``llm_tokenizer``, ``client_data``, ``public_data``, ``eval_data``,
    ``client_eval_data``); passed models are trained in place. ``fedavg`` and ``fedcollm``
    set ``config.mode``. ``evaluator(run, slm_states)`` scores the final models instead of
    :meth:`FedCoLLM.evaluate` (``slm_states``: each client's own adapter, standalone only).
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
    evaluation, history = _RUNNERS[name](run, evaluator or _default_evaluator)
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
