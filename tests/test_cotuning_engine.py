"""FedCoLLM engine: secure aggregation of SLM deltas, mutual distillation, full rounds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedcollm_secure.cotuning import engine as engine_mod
from fedcollm_secure.cotuning import server as server_mod
from fedcollm_secure.cotuning.data import generated_mc_dataset, tokenize_examples, write_jsonl
from fedcollm_secure.cotuning.distill import DistillSettings, sparse_kl, teacher_topk
from fedcollm_secure.cotuning.engine import DEFAULT_MASKING_CLIP, FedCoLLM, FedCoLLMConfig
from fedcollm_secure.cotuning.lora import LoraSettings, adapter_state, attach_lora
from fedcollm_secure.cotuning.models import load_model, save_tiny_model
from fedcollm_secure.cotuning.server import aggregate_deltas, mutual_distill
from fedcollm_secure.cotuning.trainer import TrainSettings
from fedcollm_secure.errors import ConfigError

LORA = {"r": 4, "alpha": 8, "dropout": 0.0}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("engine")
    llm = save_tiny_model(root / "llm", "llama", seed=3, hidden=48, layers=2)
    slm = save_tiny_model(root / "slm", "llama", seed=4, hidden=32, layers=1)
    return llm, slm


def _pair(dirs: tuple[Path, Path], seed: int = 0) -> tuple[Any, Any, Any]:
    """Fresh peft LLM and SLM with identical LoRA initialisation for equal ``seed``."""
    (llm, tok), (slm, _) = load_model(str(dirs[0])), load_model(str(dirs[1]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        llm = attach_lora(llm, LoraSettings(**LORA))  # type: ignore[arg-type]
        slm = attach_lora(slm, LoraSettings(**LORA))  # type: ignore[arg-type]
    return llm, slm, tok


def _config(dirs: tuple[Path, Path], **changes: Any) -> FedCoLLMConfig:
    data: dict[str, Any] = {
        "llm": {"source": str(dirs[0])}, "slm": {"source": str(dirs[1])}, "lora": LORA,
        "train": {"batch_size": 8, "learning_rate": 1e-2, "schedule": "constant"},
        "distill_train": {"batch_size": 8, "learning_rate": 1e-2, "schedule": "constant"},
        "data": {"limit": 60, "eval_limit": 8, "max_length": 64},
        "partition": {"scheme": "iid"}, "n_clients": 3, "rounds": 2}
    data.update(changes)
    return FedCoLLMConfig.from_dict(data)


def _differs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[n] - b[n]).abs().max()) for n in a)


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------
def test_config_needs_exactly_one_slm_source_and_defaults_to_masking(
        dirs: tuple[Path, Path]) -> None:
    cfg = _config(dirs)
    assert cfg.aggregator == "masking"
    assert cfg.resolved_aggregator_options() == {"clip": DEFAULT_MASKING_CLIP}
    assert _config(dirs, aggregator_options={"clip": 0.25}).resolved_aggregator_options() == {
        "clip": 0.25}
    assert FedCoLLMConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="exactly one"):
        _config(dirs, slm_prune_layers=1)
    with pytest.raises(ConfigError, match="exactly one"):
        _config(dirs, slm=None)
    with pytest.raises(ConfigError, match="unknown key"):
        _config(dirs, epochs=3)


# --------------------------------------------------------------------------------------------
# aggregation
# --------------------------------------------------------------------------------------------
def _deltas(n: int, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return {f"c{i}": {"a.lora_A.weight": 0.02 * torch.randn(4, 6, generator=gen),
                      "a.lora_B.weight": 0.02 * torch.randn(6, 4, generator=gen)}
            for i in range(n)}


def test_aggregate_deltas_with_masking_is_the_weighted_mean_within_the_quantisation_bound(
        ) -> None:
    deltas = _deltas(3, seed=1)
    weights = {"c0": 10.0, "c1": 25.0, "c2": 5.0}
    mean, result = aggregate_deltas(deltas, weights, protocol="masking", clip=1.0)
    assert result.protocol.startswith("masking") and sorted(result.survivors) == list(deltas)
    total = sum(weights.values())
    bound = result.stats["params"]["error_bound"]
    assert 0 < bound < 1e-6
    assert result.weight_total == pytest.approx(total, rel=1e-6)
    for name in mean:
        expected = sum(weights[c] * deltas[c][name] for c in deltas) / total
        assert mean[name].dtype == torch.float32 and mean[name].shape == expected.shape
        err = float((mean[name] - expected).abs().max())
        assert err <= 2 * bound / total + 1e-7, (name, err, bound)
    # the plaintext baseline gives the same mean up to float rounding
    with pytest.warns(UserWarning):
        plain, _ = aggregate_deltas(deltas, weights, protocol="plaintext")
    for name in mean:
        torch.testing.assert_close(plain[name], mean[name], rtol=0, atol=1e-6)


def test_aggregate_deltas_averages_over_the_survivors_only() -> None:
    deltas = _deltas(4, seed=2)
    mean, result = aggregate_deltas(deltas, None, protocol="masking", threshold=3,
                                    drop={"c3": "masked_input"}, clip=1.0)
    assert result.dropped == {"c3": "masked_input"} and "c3" not in result.survivors
    for name in mean:
        expected = sum(deltas[c][name] for c in ("c0", "c1", "c2")) / 3
        torch.testing.assert_close(mean[name], expected, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------
# mutual distillation
# --------------------------------------------------------------------------------------------
def _public(tok: Any, n: int = 24) -> list[dict[str, list[int]]]:
    return tokenize_examples(generated_mc_dataset(n, seed=7), tok, max_length=64)


def _distill(dirs: tuple[Path, Path], settings: DistillSettings,
             ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], Any]:
    llm, slm, tok = _pair(dirs)
    result = mutual_distill(llm, slm, tok, _public(tok), settings,
                            TrainSettings(batch_size=8, learning_rate=1e-2,
                                          schedule="constant"), seed=0)
    return adapter_state(llm), adapter_state(slm), result


def test_mutual_distill_changes_both_adapters(dirs: tuple[Path, Path]) -> None:
    llm0, slm0, _ = _pair(dirs)
    before_llm, before_slm = adapter_state(llm0), adapter_state(slm0)
    llm, slm, result = _distill(dirs, DistillSettings(lambda_kl=1.0, top_k=16))
    assert result.steps == 3 and len(result.slm_losses) == len(result.llm_losses) == 3
    assert all(np.isfinite(result.slm_losses)) and all(np.isfinite(result.llm_losses))
    assert _differs(llm, before_llm) > 1e-4
    assert _differs(slm, before_slm) > 1e-4


def _kl_effect(dirs: tuple[Path, Path], order: str = "interleaved") -> tuple[float, float]:
    """How far lambda=2 moves each adapter from where CE alone (lambda=0) takes it,
    relative to the CE-only update."""
    llm0, slm0, _ = _pair(dirs)
    start_llm, start_slm = adapter_state(llm0), adapter_state(slm0)
    llm_ce, slm_ce, _ = _distill(dirs, DistillSettings(lambda_kl=0.0, order=order))  # type: ignore[arg-type]
    llm_kl, slm_kl, _ = _distill(dirs, DistillSettings(lambda_kl=2.0, order=order))  # type: ignore[arg-type]
    return (_differs(llm_kl, llm_ce) / _differs(llm_ce, start_llm),
            _differs(slm_kl, slm_ce) / _differs(slm_ce, start_slm))


def test_the_kl_term_carries_gradient_into_both_students(dirs: tuple[Path, Path]) -> None:
    # With the KL detached from the student (or computed on a copy), lambda changes the loss
    # value but not the gradient, so both runs would end at the same adapters.
    llm_effect, slm_effect = _kl_effect(dirs)
    assert llm_effect > 0.05, llm_effect
    assert slm_effect > 0.05, slm_effect


def test_the_gradient_check_fails_when_the_student_is_detached(
        dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    def detached_kl_loss(student: torch.Tensor, targets: torch.Tensor,
                         teacher: torch.Tensor, settings: DistillSettings) -> torch.Tensor:
        ce = torch.nn.functional.cross_entropy(student.float(), targets)
        top = teacher_topk(teacher, settings.top_k, settings.temperature)
        kl = sparse_kl(student.detach().clone(), top, settings.temperature)
        return ce + settings.lambda_kl * kl

    monkeypatch.setattr(server_mod, "distillation_loss", detached_kl_loss)
    llm_effect, slm_effect = _kl_effect(dirs)
    assert llm_effect < 1e-3 and slm_effect < 1e-3, (llm_effect, slm_effect)


def test_interleaved_and_sequential_orders_both_run_and_differ(dirs: tuple[Path, Path]) -> None:
    llm_i, slm_i, res_i = _distill(dirs, DistillSettings(top_k=16, order="interleaved"))
    llm_s, slm_s, res_s = _distill(dirs, DistillSettings(top_k=16, order="sequential"))
    assert res_i.steps == res_s.steps == 3
    assert len(res_s.slm_losses) == len(res_s.llm_losses) == 3
    # the SLM's first step sees the same (untouched) LLM either way; later ones do not
    assert res_i.slm_losses[0] == pytest.approx(res_s.slm_losses[0], rel=1e-6)
    assert _differs(slm_i, slm_s) > 1e-6
    assert _differs(llm_i, llm_s) > 1e-6


# --------------------------------------------------------------------------------------------
# full runs
# --------------------------------------------------------------------------------------------
def test_two_rounds_with_masking_and_three_clients(dirs: tuple[Path, Path]) -> None:
    run = FedCoLLM(_config(dirs))
    n_params = sum(v.numel() for v in run.global_state.values())
    phases: list[tuple[int, str]] = []
    history = run.run(progress=lambda t, phase: phases.append((t, phase)))
    assert [h["round"] for h in history] == [1, 2]
    assert phases[:4] == [(1, "clients"), (1, "aggregate"), (1, "distill"), (1, "evaluate")]
    for h in history:
        assert h["aggregator"].startswith("masking") and h["dropped"] == {}
        assert h["aggregator_options"] == {"clip": DEFAULT_MASKING_CLIP}
        assert h["survivors"] == ["client-0", "client-1", "client-2"]
        assert h["clipped_fraction"] == {cid: 0.0 for cid in h["survivors"]}
        for cid in h["survivors"]:
            assert h["bytes"][cid]["sent"] >= 4 * n_params  # the masked vector, 32-bit ring
            assert h["bytes"][cid]["received"] > 0
            assert np.isfinite(h["client_loss"][cid]) and h["client_steps"][cid] >= 1
        assert set(h["seconds"]) == {"clients", "aggregate", "distill", "evaluate"}
        assert h["distill"]["steps"] >= 1 and np.isfinite(h["distill"]["mean_slm_loss"])
        for model in ("llm", "slm"):
            assert h["eval"][model]["n"] == 8 and 0 <= h["eval"][model]["acc"] <= 1
            per_client = h["eval"][model]["per_client"]  # each client's own test split
            assert set(per_client) == set(h["survivors"])
            assert all(r["n"] >= 1 and np.isfinite(r["ppl"]) for r in per_client.values())
    assert run.history is history


def test_clients_receive_the_distilled_adapter_not_the_aggregate(
        dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    received: list[dict[str, torch.Tensor]] = []
    deltas: list[dict[str, torch.Tensor]] = []
    around: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []
    real_update, real_distill = engine_mod.client_update, engine_mod.mutual_distill

    def recording_update(model: Any, tok: Any, state: Any, *args: Any,
                         **kwargs: Any) -> Any:
        received.append({n: v.clone() for n, v in state.items()})
        delta, result = real_update(model, tok, state, *args, **kwargs)
        deltas.append(delta)
        return delta, result

    def recording_distill(llm: Any, slm: Any, *args: Any, **kwargs: Any) -> Any:
        before = adapter_state(slm)
        out = real_distill(llm, slm, *args, **kwargs)
        around.append((before, adapter_state(slm)))
        return out

    monkeypatch.setattr(engine_mod, "client_update", recording_update)
    monkeypatch.setattr(engine_mod, "mutual_distill", recording_distill)
    run = FedCoLLM(_config(dirs, weighting="uniform"))
    theta_1 = {n: v.clone() for n, v in run.global_state.items()}
    run.run()
    assert len(received) == 6 and len(around) == 2
    for state in received[:3]:
        assert _differs(state, theta_1) == 0
    aggregate_1, distilled_1 = around[0]
    # what the server distils from is theta_1 + the mean delta of round 1
    for name in theta_1:
        mean = sum(d[name] for d in deltas[:3]) / 3
        torch.testing.assert_close(aggregate_1[name], theta_1[name] + mean, rtol=0, atol=1e-6)
    assert _differs(distilled_1, aggregate_1) > 1e-4
    for state in received[3:]:  # round 2 broadcasts the distilled adapter
        assert _differs(state, distilled_1) == 0
        assert _differs(state, aggregate_1) > 1e-4
    assert _differs(run.slm_state(), around[1][1]) == 0


def test_a_pruned_slm_and_a_passed_in_pair_both_run(dirs: tuple[Path, Path]) -> None:
    cfg = _config(dirs, slm=None, slm_prune_layers=1, rounds=1,
                  distill={"order": "sequential", "top_k": 8},
                  data={"limit": 40, "eval_limit": 0, "max_length": 64})
    history = FedCoLLM(cfg).run()
    assert len(history) == 1 and history[0]["eval"] == {}
    llm, slm, tok = _pair(dirs)
    examples = generated_mc_dataset(30, seed=5)
    run = FedCoLLM(_config(dirs, rounds=1, n_clients=2, aggregator="plaintext"), llm=llm,
                   slm=slm, tokenizer=tok, client_data=[examples[:10], examples[10:20]],
                   public_data=examples[20:], eval_data=examples[20:24])
    with pytest.warns(UserWarning):
        history = run.run()
    assert history[0]["aggregator"].startswith("plaintext") and history[0]["eval"]["slm"]["n"] == 4
    with pytest.raises(ConfigError, match="tokenizer"):
        FedCoLLM(_config(dirs), llm=llm)


def test_a_single_file_source_has_no_eval_split(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    write_jsonl(generated_mc_dataset(24, seed=9), path)
    with pytest.raises(ConfigError, match="no 'validation' split"):
        FedCoLLM(_config(dirs, data={"source": str(path), "max_length": 64}))
    run = FedCoLLM(_config(dirs, data={"source": str(path), "eval_limit": 0, "max_length": 64}))
    assert run.eval_data == [] and sum(map(len, run.client_data)) + len(run.public_data) == 24


def test_a_masking_clip_that_cuts_deltas_is_reported(dirs: tuple[Path, Path]) -> None:
    run = FedCoLLM(_config(dirs, rounds=1, aggregator_options={"clip": 1e-4},
                           data={"limit": 40, "eval_limit": 0, "max_length": 64}))
    with pytest.warns(UserWarning, match="masking clip"):
        history = run.run()
    assert history[0]["aggregator_options"] == {"clip": 1e-4}
    assert all(f > 0 for f in history[0]["clipped_fraction"].values())
