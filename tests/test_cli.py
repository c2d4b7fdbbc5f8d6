from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedcollm_secure.cli import main


def test_demo_runs_a_secure_round_and_writes_a_report(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--clients", "6", "--layers", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "[unmask" in text and "max |secure - plaintext|" in text
    report = json.loads((out / "report.json").read_text())
    assert report["protocol"] == "masking"
    assert report["dropped"] == {"client-01": "share_keys"}
    assert report["late_dropouts"] == ["client-02"]
    assert len(report["survivors"]) == 5
    assert report["max_abs_error_vs_plaintext"] <= report["error_bound"]


def test_demo_below_threshold_exits_nonzero(tmp_path: Path) -> None:
    # 6 clients, 2 dropouts, threshold 6: the round must abort cleanly
    assert main(["demo", "--clients", "6", "--layers", "1", "--threshold", "6",
                 "--out", str(tmp_path)]) == 2
    assert not (tmp_path / "report.json").exists()


def test_aggregators_lists_registry(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["aggregators"]) == 0
    text = capsys.readouterr().out
    assert "masking" in text and "plaintext" in text and "INSECURE" in text
