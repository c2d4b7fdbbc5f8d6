"""Baselines (zero-shot, standalone, FedAvg, centralized, FedCoLLM) and per-client evaluation."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from fedcollm_secure.cotuning import baselines as baselines_mod
from fedcollm_secure.cotuning import engine as engine_mod
from fedcollm_secure.cotuning.baselines import BASELINES, run_all, run_baseline
from fedcollm_secure.cotuning.data import MCExample, generated_mc_dataset, partition_by_task
from fedcollm_secure.cotuning.engine import FedCoLLM, FedCoLLMConfig
from fedcollm_secure.cotuning.evaluation import evaluate_mc
from fedcollm_secure.cotuning.lora import LoraSettings, adapter_state, attach_lora
from fedcollm_secure.cotuning.models import load_model, save_tiny_model
from fedcollm_secure.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LORA = {"r": 4, "alpha": 8, "dropout": 0.0}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("baselines")
    llm = save_tiny_model(root / "llm", "llama", seed=3, hidden=48, layers=2)
    slm = save_tiny_model(root / "slm", "llama", seed=4, hidden=32, layers=1)
    return llm, slm


def _config(dirs: tuple[Path, Path], **changes: Any) -> FedCoLLMConfig:
    data: dict[str, Any] = {
        "llm": {"source": str(dirs[0])}, "slm": {"source": str(dirs[1])}, "lora": LORA,
        "train": {"batch_size": 8, "learning_rate": 1e-2, "schedule": "constant"},
        "distill_train": {"batch_size": 8, "learning_rate": 1e-2, "schedule": "constant"},
        "data": {"limit": 48, "eval_limit": 0, "client_eval_limit": 4, "max_length": 64},
        "partition": {"scheme": "task"}, "n_clients": 2, "rounds": 1, "weighting": "uniform"}
    data.update(changes)
    return FedCoLLMConfig.from_dict(data)


def _prebuilt(dirs: tuple[Path, Path]) -> dict[str, Any]:
    """A fresh peft pair and a task-partitioned data set: client 0 and client 1 hold
    different tasks; the evaluation pool covers all of them."""
    (llm, tok), (slm, _) = load_model(str(dirs[0])), load_model(str(dirs[1]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        llm = attach_lora(llm, LoraSettings(**LORA))  # type: ignore[arg-type]
        slm = attach_lora(slm, LoraSettings(**LORA))  # type: ignore[arg-type]
    examples = generated_mc_dataset(40, seed=5)
    clients = partition_by_task(examples[:32], 2)
    return {"llm": llm, "slm": slm, "tokenizer": tok, "client_data": clients,
            "public_data": examples[32:], "eval_data": generated_mc_dataset(16, seed=11)}


def _state(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max(float((a[n].float() - b[n].float()).abs().max()) for n in a)


def _trap(what: str) -> Any:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"{what} must not be called")

    return refuse


# --------------------------------------------------------------------------------------------
# per-client evaluation in the engine
# --------------------------------------------------------------------------------------------
def test_each_client_is_scored_on_its_own_split(dirs: tuple[Path, Path],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    scored: list[tuple[int, list[MCExample]]] = []
    ppl: list[tuple[int, list[MCExample]]] = []
    real_score, real_ppl = engine_mod.score_choices, engine_mod.perplexity

    def recording_score(model: Any, tok: Any, examples: Any, **kwargs: Any) -> Any:
        scored.append((id(model), list(examples)))
        return real_score(model, tok, examples, **kwargs)

    def recording_ppl(model: Any, tok: Any, examples: Any, *args: Any, **kwargs: Any) -> Any:
        ppl.append((id(model), list(examples)))
        return real_ppl(model, tok, examples, *args, **kwargs)

    monkeypatch.setattr(engine_mod, "score_choices", recording_score)
    monkeypatch.setattr(engine_mod, "perplexity", recording_ppl)
    pre = _prebuilt(dirs)
    run = FedCoLLM(_config(dirs, data={"client_eval_limit": 3, "max_length": 64}), **pre)
    history = run.run()
    evaluation = history[0]["eval"]
    splits = run.client_eval_data
    assert set(evaluation) == {"llm", "slm"}
    tasks = [{e.task for e in shard} for shard in run.client_data]
    assert tasks[0].isdisjoint(tasks[1])  # the task checks below would pass trivially otherwise
    # each model is scored once, on the shared set; the client splits reuse those scores
    assert scored == [(id(run.llm), pre["eval_data"]), (id(run.slm), pre["eval_data"])]
    assert ppl == [(id(m), splits[k]) for m in (run.llm, run.slm) for k in range(2)]
    for model, which in ((run.llm, "llm"), (run.slm, "slm")):
        entry = evaluation[which]
        assert entry["n"] == 16  # the shared set: the eval_data passed in
        assert set(entry["per_client"]) == {"client-0", "client-1"}
        for k, cid in enumerate(run.client_ids):
            r = entry["per_client"][cid]
            assert 1 <= r["n"] == len(splits[k]) <= 3
            assert set(r["tasks"]) <= tasks[k]
            assert all(any(ex is e for e in pre["eval_data"]) for ex in splits[k])
            direct = evaluate_mc(model, pre["tokenizer"], splits[k], 8)  # scored afresh
            assert (r["acc"], r["acc_norm"]) == (direct["acc"], direct["acc_norm"])
            assert math.isfinite(r["ppl"]) and r["ppl"] > 1
        mean = entry["per_client_mean"]
        assert mean["acc"] == pytest.approx(
            sum(r["acc"] for r in entry["per_client"].values()) / 2)


def test_shared_set_and_per_client_keys_coexist_and_zero_disables(
        dirs: tuple[Path, Path]) -> None:
    run = FedCoLLM(_config(dirs, data={"limit": 48, "eval_limit": 6, "client_eval_limit": 2,
                                       "max_length": 64}))
    ev = run.evaluate()
    for which in ("llm", "slm"):
        assert ev[which]["n"] == 6 and set(ev[which]["per_client"]) == set(run.client_ids)
        assert all(r["n"] <= 2 for r in ev[which]["per_client"].values())
    run = FedCoLLM(_config(dirs, data={"limit": 48, "eval_limit": 0, "client_eval_limit": 0,
                                       "max_length": 64}))
    assert run.client_eval_data == [[], []] and run.evaluate() == {}
    with pytest.raises(ConfigError, match="mode"):
        _config(dirs, mode="bogus")


# --------------------------------------------------------------------------------------------
# baselines
# --------------------------------------------------------------------------------------------
def test_zero_shot_changes_no_weights(dirs: tuple[Path, Path],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("client_update", "aggregate_deltas", "mutual_distill"):
        monkeypatch.setattr(engine_mod, name, _trap(name))
    monkeypatch.setattr(baselines_mod, "train_lora", _trap("train_lora"))
    pre = _prebuilt(dirs)
    llm0, slm0 = _state(pre["llm"]), _state(pre["slm"])
    result = run_baseline("zero_shot", _config(dirs), **pre)
    assert _max_diff(_state(pre["llm"]), llm0) == 0
    assert _max_diff(_state(pre["slm"]), slm0) == 0
    assert result["name"] == "zero_shot" and result["trained"] == {"slm": False, "llm": False}
    for which in ("slm", "llm"):
        assert set(result[which]["per_client"]) == {"client-0", "client-1"}
        assert 0 <= result[which]["mean"]["acc"] <= 1


def test_fedavg_averages_without_distillation(dirs: tuple[Path, Path],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_mod, "mutual_distill", _trap("mutual_distill"))
    deltas: list[dict[str, torch.Tensor]] = []
    real = engine_mod.client_update

    def recording(*args: Any, **kwargs: Any) -> Any:
        delta, result = real(*args, **kwargs)
        deltas.append(delta)
        return delta, result

    monkeypatch.setattr(engine_mod, "client_update", recording)
    pre = _prebuilt(dirs)
    theta_0 = adapter_state(pre["slm"])
    llm0 = _state(pre["llm"])
    result = run_baseline("fedavg", _config(dirs), **pre)
    assert len(deltas) == 2
    assert result["history"][0]["mode"] == "fedavg"
    assert result["history"][0]["distill"]["steps"] == 0
    final = adapter_state(pre["slm"])
    for name in theta_0:
        expected = theta_0[name] + (deltas[0][name] + deltas[1][name]) / 2
        torch.testing.assert_close(final[name], expected, rtol=0, atol=1e-6)
    assert max(float(d.abs().max()) for d in deltas[0].values()) > 1e-4
    assert _max_diff(_state(pre["llm"]), llm0) == 0
    assert result["trained"] == {"slm": True, "llm": False}
    assert set(result["slm"]["per_client"]) == {"client-0", "client-1"}


def test_standalone_trains_each_client_alone(dirs: tuple[Path, Path],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_mod, "aggregate_deltas", _trap("aggregate_deltas"))
    monkeypatch.setattr(engine_mod, "mutual_distill", _trap("mutual_distill"))
    pre = _prebuilt(dirs)
    received: list[dict[str, torch.Tensor]] = []
    finals: list[dict[str, torch.Tensor]] = []
    real_update, real_eval = baselines_mod.client_update, engine_mod.score_choices

    def recording_update(model: Any, tok: Any, state: Any, *args: Any, **kwargs: Any) -> Any:
        received.append({n: v.clone() for n, v in state.items()})
        delta, result = real_update(model, tok, state, *args, **kwargs)
        finals.append({n: state[n] + delta[n] for n in state})
        return delta, result

    scored: list[tuple[list[MCExample], dict[str, torch.Tensor]]] = []

    def recording_eval(model: Any, tok: Any, examples: Any, **kwargs: Any) -> Any:
        if model is pre["slm"]:
            scored.append((list(examples), adapter_state(model)))
        return real_eval(model, tok, examples, **kwargs)

    monkeypatch.setattr(baselines_mod, "client_update", recording_update)
    monkeypatch.setattr(engine_mod, "score_choices", recording_eval)
    theta_0 = adapter_state(pre["slm"])
    llm0 = _state(pre["llm"])
    result = run_baseline("standalone", _config(dirs, rounds=2), **pre)
    assert len(received) == 4  # 2 clients x 2 rounds, client 0 first
    assert _max_diff(received[0], theta_0) == 0 and _max_diff(received[2], theta_0) == 0
    assert _max_diff(received[1], finals[0]) == 0  # client 0 continues from its own adapter
    assert _max_diff(received[3], finals[2]) == 0
    assert _max_diff(finals[1], finals[3]) > 1e-4  # the clients end apart
    assert _max_diff(_state(pre["llm"]), llm0) == 0
    # client k's adapter is scored on client k's split
    run_splits = [entry[0] for entry in scored]
    assert len(scored) == 2
    for k, (examples, state) in enumerate(scored):
        assert _max_diff(state, finals[2 * k + 1]) < 1e-7
        assert {e.task for e in examples} <= {e.task for e in pre["client_data"][k]}
    assert run_splits[0] != run_splits[1]
    assert result["trained"] == {"slm": True, "llm": False}
    assert set(result["slm"]["per_client"]) == {"client-0", "client-1"}


def test_centralized_trains_only_the_llm_on_the_union(dirs: tuple[Path, Path],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("client_update", "aggregate_deltas", "mutual_distill"):
        monkeypatch.setattr(engine_mod, name, _trap(name))
    pre = _prebuilt(dirs)
    calls: list[tuple[Any, int, int]] = []
    real = baselines_mod.train_lora

    def recording(model: Any, tok: Any, features: Any, settings: Any, **kwargs: Any) -> Any:
        calls.append((model, len(features), settings.epochs))
        return real(model, tok, features, settings, **kwargs)

    monkeypatch.setattr(baselines_mod, "train_lora", recording)
    llm0, slm0 = _state(pre["llm"]), _state(pre["slm"])
    result = run_baseline("centralized", _config(dirs, rounds=2), **pre)
    union = sum(len(c) for c in pre["client_data"]) + len(pre["public_data"])
    assert [(c[0] is pre["llm"], c[1], c[2]) for c in calls] == [(True, union, 2)]
    assert _max_diff(_state(pre["llm"]), llm0) > 1e-4
    assert _max_diff(_state(pre["slm"]), slm0) == 0
    assert result["trained"] == {"slm": False, "llm": True}
    assert result["history"][0]["examples"] == union


def test_run_all_gives_comparable_results_from_the_same_start(
        dirs: tuple[Path, Path]) -> None:
    pre = _prebuilt(dirs)
    llm0, slm0 = _state(pre["llm"]), _state(pre["slm"])
    results = run_all(_config(dirs), names=("zero_shot", "fedcollm"), **pre)
    assert list(results) == ["zero_shot", "fedcollm"]
    assert _max_diff(_state(pre["llm"]), llm0) == 0  # run_all trains copies
    assert _max_diff(_state(pre["slm"]), slm0) == 0
    fed = results["fedcollm"]
    assert fed["history"][0]["mode"] == "fedcollm" and fed["history"][0]["distill"]["steps"] >= 1
    for r in results.values():
        assert set(r) >= {"name", "slm", "llm", "trained", "seconds", "eval", "history"}
        for which in ("slm", "llm"):
            assert set(r[which]["per_client"]) == {"client-0", "client-1"}
            assert set(r[which]["mean"]) == {"acc", "acc_norm", "ppl", "n_clients"}
    # distillation moved both models away from zero-shot on the same splits
    assert fed["llm"]["per_client"]["client-0"]["ppl"] != pytest.approx(
        results["zero_shot"]["llm"]["per_client"]["client-0"]["ppl"], rel=1e-9)
    assert BASELINES == ("zero_shot", "standalone", "fedavg", "centralized", "fedcollm")
    with pytest.raises(ConfigError, match="unknown baseline"):
        run_all(_config(dirs), names=("nope",))
    with pytest.raises(ConfigError, match="unknown baseline"):
        run_baseline("nope", _config(dirs))


# --------------------------------------------------------------------------------------------
# different tokenizers, seeding, evaluator hook
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cross_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from fedcollm_secure.cotuning.models import tiny_sentencepiece_tokenizer, tiny_tokenizer

    root = tmp_path_factory.mktemp("baselines-cross")
    llm = save_tiny_model(root / "llm", "llama", seed=3, hidden=48, layers=1,
                          tokenizer=tiny_sentencepiece_tokenizer())
    slm = save_tiny_model(root / "slm", "llama", seed=4, hidden=32, layers=1,
                          tokenizer=tiny_tokenizer())
    return llm, slm


def test_centralized_trains_the_llm_on_its_own_tokens(cross_dirs: tuple[Path, Path],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from fedcollm_secure.cotuning.data import tokenize_examples

    calls: list[tuple[Any, Any, list[list[int]]]] = []
    real = baselines_mod.train_lora

    def recording(model: Any, tok: Any, features: Any, settings: Any, **kwargs: Any) -> Any:
        calls.append((model, tok, [list(f["input_ids"]) for f in features]))
        return real(model, tok, features, settings, **kwargs)

    monkeypatch.setattr(baselines_mod, "train_lora", recording)
    config = _config(cross_dirs, data={"limit": 24, "eval_limit": 0, "client_eval_limit": 0,
                                       "max_length": 64})
    result = run_baseline("centralized", config)
    assert len(calls) == 1
    model, tok, ids = calls[0]
    assert result["history"][0]["examples"] == len(ids)
    assert len(tok) != len(_slm_tokenizer(cross_dirs))  # two real vocabularies
    assert tok.convert_ids_to_tokens(1) == "<bos>"  # the LLM's (sentencepiece) tokenizer
    # the features are the LLM's tokenisation of every client example and the public data
    from fedcollm_secure.cotuning.models import load_tokenizer
    llm_tok = load_tokenizer(str(cross_dirs[0]))
    run = FedCoLLM(config)
    expected = [list(f["input_ids"]) for d in [*run.client_data, run.public_data]
                for f in tokenize_examples(d, llm_tok, 64)]
    assert ids == expected
    assert ids != [list(f["input_ids"]) for fs in [*run.client_features, run.public_features]
                   for f in fs]  # not the SLM's tokens (the old behaviour)
    assert math.isfinite(result["history"][0]["mean_loss"])


def _slm_tokenizer(dirs: tuple[Path, Path]) -> Any:
    from fedcollm_secure.cotuning.models import load_tokenizer

    return load_tokenizer(str(dirs[1]))


def test_same_seed_same_run_other_seed_other_run(dirs: tuple[Path, Path]) -> None:
    """LoRA initialisation and dropout follow config.seed: two runs with one seed end with
    identical adapters; another seed starts and ends elsewhere; the caller's RNG is kept."""
    lora = {"r": 4, "alpha": 8, "dropout": 0.3}

    def run_once(seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        run = FedCoLLM(_config(dirs, lora=lora, seed=seed, rounds=1))
        start = adapter_state(run.llm)
        _, _ = baselines_mod._standalone(run, lambda r, states: {"states": states})
        return start, run.global_state

    torch.manual_seed(1234)
    expected_next = torch.rand(3)
    torch.manual_seed(1234)
    a, b, c = run_once(0), run_once(0), run_once(1)
    assert torch.equal(torch.rand(3), expected_next)  # the global generator is untouched
    assert _max_diff(a[0], b[0]) == 0 and _max_diff(a[0], c[0]) > 0
    assert any(float(v.abs().max()) > 0 for v in a[0].values())  # lora_A is random


def test_standalone_states_are_reproducible_and_the_evaluator_sees_them(
        dirs: tuple[Path, Path]) -> None:
    lora = {"r": 4, "alpha": 8, "dropout": 0.3}
    seen: list[dict[str, dict[str, torch.Tensor]] | None] = []

    def evaluator(run: FedCoLLM, states: Any) -> dict[str, Any]:
        seen.append(None if states is None else {
            cid: {n: v.clone() for n, v in s.items()} for cid, s in states.items()})
        return {}

    for seed in (0, 0, 5):
        run_baseline("standalone", _config(dirs, lora=lora, seed=seed), evaluator=evaluator)
    run_baseline("zero_shot", _config(dirs), evaluator=evaluator)
    assert len(seen) == 4 and seen[3] is None
    first, again, other = seen[0], seen[1], seen[2]
    assert first is not None and again is not None and other is not None
    assert set(first) == {"client-0", "client-1"}
    for cid in first:
        assert _max_diff(first[cid], again[cid]) == 0
        assert _max_diff(first[cid], other[cid]) > 1e-6
