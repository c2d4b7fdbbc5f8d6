"""Run reports (JSON, Markdown, PNG, adapters) and ``fedcollm-secure run --config``."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from fedcollm_secure.cli import DEMO_CONFIG, load_config_file, main
from fedcollm_secure.cotuning.data import generated_mc_dataset
from fedcollm_secure.cotuning.engine import FedCoLLMConfig
from fedcollm_secure.cotuning.lora import load_adapter
from fedcollm_secure.cotuning.models import save_tiny_model
from fedcollm_secure.cotuning.report import (
    build_report,
    chance_accuracy,
    render_markdown,
    write_report,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _round(t: int, llm: float, slm: float) -> dict[str, Any]:
    return {
        "round": t, "aggregator": "masking", "aggregator_options": {"clip": 1.0},
        "clipped_fraction": {"client-0": 0.0, "client-1": 0.0},
        "survivors": ["client-0", "client-1"], "dropped": {},
        "bytes": {"client-0": {"sent": 1000 * t, "received": 2000},
                  "client-1": {"sent": 1100 * t, "received": 2100}},
        "seconds": {"clients": 1.5, "aggregate": 0.25, "distill": 2.0, "evaluate": 0.5},
        "client_loss": {"client-0": 1.0, "client-1": float("nan")},
        "client_steps": {"client-0": 2, "client-1": 2},
        "mean_client_loss": 1.0,
        "distill": {"steps": 2, "order": "interleaved", "slm_losses": [1.0, 0.5],
                    "llm_losses": [0.5, 0.25], "mean_slm_loss": 0.75, "mean_llm_loss": 0.375},
        "eval": {"llm": {"acc": llm, "acc_norm": llm, "n": 10, "seconds": 0.1},
                 "slm": {"acc": slm, "acc_norm": slm, "n": 10, "seconds": 0.1}},
    }


def _config(**changes: Any) -> FedCoLLMConfig:
    data: dict[str, Any] = {"llm": {"source": "/models/llm"}, "slm_prune_layers": 2,
                            "n_clients": 2}
    data.update(changes)
    return FedCoLLMConfig.from_dict(data)


def test_report_on_a_synthetic_history(tmp_path: Path) -> None:
    history = [_round(1, 0.5, 0.25), _round(2, 0.6, 0.3)]
    state = {"layer.lora_A": torch.ones(2, 3), "layer.lora_B": torch.zeros(3, 2)}
    files = write_report(tmp_path, _config(), history, llm_state=state, slm_state=state,
                         chance=0.25, total_seconds=12.5)
    report = json.loads(files["json"].read_text())  # strict JSON: NaN became null
    assert report["aggregator"] == "masking"
    assert report["config"]["slm_prune_layers"] == 2
    assert report["bytes_per_client_per_round"]["2"]["client-1"] == {"sent": 2200,
                                                                     "received": 2100}
    assert report["seconds_per_phase_per_round"]["1"]["distill"] == 2.0
    assert report["totals"]["seconds_per_phase"]["clients"] == 3.0
    assert report["totals"]["bytes_sent_per_client"]["client-0"] == 3000
    assert report["history"][0]["client_loss"]["client-1"] is None
    assert report["final_eval"]["llm"]["acc"] == 0.6
    md = files["markdown"].read_text()
    assert md.count("## Round ") == 2
    assert "| LLM accuracy (summed / length-normalised) | 60.0% / 60.0% (n=10) |" in md
    assert "| SLM (global) accuracy" in md and "| seconds: distill | 2.00 |" in md
    assert "client-1 (sent / received) | 2.20 kB / 2.10 kB" in md
    assert "unhealed pruned SLM is near chance" in md and "25.0%" in md
    for kind in ("llm_adapter", "slm_adapter"):
        loaded, meta = load_adapter(files[kind])
        assert meta["model"] == kind.split("_")[0]
        assert torch.equal(loaded["layer.lora_A"], state["layer.lora_A"])
    pytest.importorskip("matplotlib")
    assert files["plot"].read_bytes()[:8] == PNG_MAGIC


def test_report_without_pruning_or_eval_has_no_chance_note() -> None:
    history = [_round(1, 0.5, 0.25)]
    history[0]["eval"] = {}
    report = build_report(_config(slm_prune_layers=None, slm={"source": "/models/slm"}),
                          history)
    md = render_markdown(report)
    assert "near chance" not in md and "not evaluated" in md
    assert report["slm_pruned_layers"] is None


def test_chance_accuracy() -> None:
    examples = generated_mc_dataset(8, seed=0)
    expected = sum(1 / len(e.choices) for e in examples) / len(examples)
    assert math.isclose(chance_accuracy(examples) or 0.0, expected)
    assert chance_accuracy([]) is None


def test_example_toml_is_the_embedded_demo_config() -> None:
    data = load_config_file(REPO / "examples" / "demo.toml")
    assert FedCoLLMConfig.from_dict(data) == FedCoLLMConfig.from_dict(DEMO_CONFIG)


def _write_toml(path: Path, llm: Path, slm: Path, extra: str = "") -> Path:
    path.write_text(f"""
n_clients = 3
rounds = 2
aggregator = "masking"
{extra}
[llm]
source = "{llm.as_posix()}"
[slm]
source = "{slm.as_posix()}"
[lora]
r = 4
alpha = 8
dropout = 0.0
[data]
source = "generated"
limit = 36
eval_limit = 6
max_length = 48
[partition]
scheme = "iid"
[train]
batch_size = 8
learning_rate = 1e-2
schedule = "constant"
[distill_train]
batch_size = 8
learning_rate = 1e-2
schedule = "constant"
""")
    return path


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("report-models")
    return (save_tiny_model(root / "llm", "llama", seed=3, hidden=32, layers=2),
            save_tiny_model(root / "slm", "llama", seed=4, hidden=32, layers=1))


def test_run_config_on_tiny_models_writes_the_report(
        tmp_path: Path, tiny_pair: tuple[Path, Path],
        capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _write_toml(tmp_path / "run.toml", *tiny_pair)
    out = tmp_path / "out"
    assert main(["run", "--config", str(cfg), "--out", str(out), "--no-tqdm"]) == 0
    text = capsys.readouterr().out
    assert "round 2/2: distill" in text and "# FedCoLLM run report" in text
    report = json.loads((out / "report.json").read_text())
    assert report["aggregator"] == "masking" and report["rounds"] == 2
    for t in ("1", "2"):
        per_client = report["bytes_per_client_per_round"][t]
        assert sorted(per_client) == ["client-0", "client-1", "client-2"]
        assert all(b["sent"] > 0 for b in per_client.values())
        assert set(report["seconds_per_phase_per_round"][t]) == {
            "clients", "aggregate", "distill", "evaluate"}
    assert {"llm", "slm"} <= set(report["final_eval"])
    assert "near chance" not in (out / "report.md").read_text()  # a real SLM, not pruned
    slm, _ = load_adapter(out / "slm_adapter.safetensors")
    assert slm and all(torch.isfinite(v).all() for v in slm.values())
    assert load_adapter(out / "llm_adapter.safetensors")[0]
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "accuracy.png").read_bytes()[:8] == PNG_MAGIC


def test_run_config_refuses_unknown_keys_and_bad_toml(
        tmp_path: Path, tiny_pair: tuple[Path, Path],
        capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _write_toml(tmp_path / "bad.toml", *tiny_pair, extra="epochs = 3")
    assert main(["run", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "config error" in err and "unknown key(s) ['epochs']" in err
    (tmp_path / "broken.toml").write_text("rounds = = 2\n")
    assert main(["run", "--config", str(tmp_path / "broken.toml")]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    assert main(["run", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "cannot read config" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
