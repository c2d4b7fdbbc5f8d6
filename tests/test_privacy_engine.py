"""Privacy in FedCoLLM rounds: DP-SGD accountants across rounds, budget policies, the
ledger, distributed DP through masking."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedcollm_secure.cotuning.data import generated_mc_dataset
from fedcollm_secure.cotuning.engine import FedCoLLM, FedCoLLMConfig
from fedcollm_secure.cotuning.models import save_tiny_model
from fedcollm_secure.errors import ConfigError
from fedcollm_secure.privacy import ClientAccountant, compute_epsilon

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LORA = {"r": 4, "alpha": 8, "dropout": 0.0}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("privacy-engine")
    return (save_tiny_model(root / "llm", "llama", seed=3, hidden=48, layers=2),
            save_tiny_model(root / "slm", "llama", seed=4, hidden=32, layers=1))


def _config(dirs: tuple[Path, Path], privacy: dict[str, Any], **changes: Any) -> FedCoLLMConfig:
    data: dict[str, Any] = {
        "llm": {"source": str(dirs[0])}, "slm": {"source": str(dirs[1])}, "lora": LORA,
        "train": {"batch_size": 8, "learning_rate": 1e-2, "schedule": "constant"},
        "distill_train": {"batch_size": 8, "learning_rate": 1e-2, "schedule": "constant",
                          "max_steps": 1},
        "data": {"limit": 60, "eval_limit": 0, "client_eval_limit": 0, "max_length": 64},
        "partition": {"scheme": "iid"}, "n_clients": 3, "rounds": 2, "privacy": privacy}
    data.update(changes)
    return FedCoLLMConfig.from_dict(data)


def _data(sizes: list[int]) -> tuple[list[list[Any]], list[Any]]:
    pool = generated_mc_dataset(sum(sizes) + 8, seed=7)
    out, start = [], 8
    for s in sizes:
        out.append(pool[start:start + s])
        start += s
    return out, pool[:8]


def test_dpsgd_rounds_keep_one_accountant_per_client_and_write_the_ledger(
        dirs: tuple[Path, Path], tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.jsonl"
    cfg = _config(dirs, {"dpsgd": {"target_epsilon": 8.0, "accountant": "rdp"},
                         "ledger": str(ledger), "state_dir": str(tmp_path / "state")})
    clients, public = _data([16, 16, 24])
    run = FedCoLLM(cfg, client_data=clients, public_data=public, eval_data=[])
    history = run.run()
    assert len(history) == 2 and run.stopped is None
    lines = [json.loads(x) for x in ledger.read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2]
    last = lines[-1]["dpsgd"]
    assert last["privacy_unit"] == "example" and last["sampling"] == "poisson"
    assert set(lines[-1]["libraries"]) >= {"opacus", "torch"}
    for cid, entry in last["clients"].items():
        acc = ClientAccountant.load(tmp_path / "state" / f"{cid}.json")
        assert acc.rounds == [1, 2] and acc.steps == 2 * entry["steps"]
        one_run = compute_epsilon(noise_multiplier=entry["sigma"], sample_rate=entry["q"],
                                  steps=acc.steps, delta=1e-5)
        assert entry["epsilon_cumulative"] == pytest.approx(one_run)
        assert entry["epsilon_cumulative"] <= 8.0
        assert entry["epsilon_round"] < entry["epsilon_cumulative"]
    assert last["aggregate"]["epsilon_cumulative"] == max(
        c["epsilon_cumulative"] for c in last["clients"].values())


def test_a_client_over_budget_is_dropped_before_training(dirs: tuple[Path, Path]) -> None:
    # client-0 has 8 examples (q = 1), the others 24 (q = 1/3): with the same noise, one
    # round costs client-0 far more. The budget admits every client once and client-0 twice
    # never.
    small = compute_epsilon(noise_multiplier=2.0, sample_rate=1.0, steps=2, delta=1e-5)
    big = compute_epsilon(noise_multiplier=2.0, sample_rate=8 / 24, steps=6, delta=1e-5)
    budget = compute_epsilon(noise_multiplier=2.0, sample_rate=8 / 24, steps=12, delta=1e-5)
    assert small < budget < compute_epsilon(noise_multiplier=2.0, sample_rate=1.0, steps=4,
                                            delta=1e-5) and big < budget
    cfg = _config(dirs, {"dpsgd": {"noise_multiplier": 2.0, "epsilon_budget": budget * 1.001},
                         "on_budget_exceeded": "drop"}, train={
        "batch_size": 8, "learning_rate": 1e-2, "schedule": "constant", "epochs": 2},
        aggregator="plaintext")
    clients, public = _data([8, 24, 24])
    run = FedCoLLM(cfg, client_data=clients, public_data=public, eval_data=[])
    with pytest.warns(UserWarning):  # plaintext is warned about
        history = run.run()
    assert len(history) == 2
    assert set(history[1]["client_steps"]) == {"client-1", "client-2"}
    record = history[1]["privacy"]["dpsgd"]["clients"]
    assert record["client-0"]["participated"] is False and "budget" in record["client-0"][
        "refused"]
    assert run.privacy is not None
    assert run.privacy.accountants["client-0"].steps == 2  # one round: 2 epochs x 1 step
    assert all(c["epsilon_cumulative"] <= budget * 1.001 for c in record.values())


def test_stop_policy_ends_the_run_cleanly(dirs: tuple[Path, Path]) -> None:
    one = compute_epsilon(noise_multiplier=1.0, sample_rate=0.5, steps=2, delta=1e-5)
    two = compute_epsilon(noise_multiplier=1.0, sample_rate=0.5, steps=4, delta=1e-5)
    budget = (one + two) / 2
    cfg = _config(dirs, {"dpsgd": {"noise_multiplier": 1.0, "epsilon_budget": budget},
                         "on_budget_exceeded": "stop"}, aggregator="plaintext", rounds=3)
    clients, public = _data([16, 16, 16])
    run = FedCoLLM(cfg, client_data=clients, public_data=public, eval_data=[])
    with pytest.warns(UserWarning, match="stopped"):
        history = run.run()
    assert len(history) == 1 and run.stopped is not None and "round 2" in run.stopped
    assert run.privacy is not None
    assert all(a.epsilon() <= budget for a in run.privacy.accountants.values())


def test_distributed_dp_round_through_masking(dirs: tuple[Path, Path]) -> None:
    cfg = _config(dirs, {"ddp": {"clip": 0.5, "noise_multiplier": 0.8, "min_survivors": 2}},
                  rounds=1)
    clients, public = _data([16, 16, 16])
    run = FedCoLLM(cfg, client_data=clients, public_data=public, eval_data=[])
    history = run.run()
    ddp = history[0]["privacy"]["ddp"]
    assert ddp["survivors"] == 3 and ddp["privacy_unit"] == "client"
    assert 0 < ddp["epsilon_cumulative"] == ddp["epsilon_round"] < float("inf")
    assert ddp["params"]["noise_multiplier"] == pytest.approx(0.8)
    with pytest.raises(ConfigError, match="masking"):
        _config(dirs, {"ddp": {"noise_multiplier": 1.0}}, aggregator="plaintext")


def test_run_report_has_a_privacy_section(dirs: tuple[Path, Path]) -> None:
    from fedcollm_secure.cotuning.report import build_report, render_markdown

    cfg = _config(dirs, {"dpsgd": {"noise_multiplier": 1.0}}, aggregator="plaintext",
                  rounds=1)
    clients, public = _data([8, 8, 8])
    run = FedCoLLM(cfg, client_data=clients, public_data=public, eval_data=[])
    with pytest.warns(UserWarning):
        history = run.run()
    report = build_report(cfg, history)
    eps = report["privacy"]["dpsgd"]["clients"]["client-0"]["epsilon_cumulative"]
    assert eps == pytest.approx(compute_epsilon(noise_multiplier=1.0, sample_rate=1.0, steps=1,
                                                delta=1e-5))
    text = render_markdown(report)
    assert "## Privacy" in text and f"{eps:.3f}" in text
    assert build_report(_config(dirs, {}), [])["privacy"] is None
