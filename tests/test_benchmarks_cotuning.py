"""The co-tuning benchmark's quick mode runs end to end (tiny random models, ~10 s)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "cotuning" / "run.py"
START = "<!-- results:start (written by run.py) -->"
END = "<!-- results:end -->"


def test_quick_mode_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{START}\nstale table\n{END}\noutro\n", encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--quiet", "--out", str(out),
         "--readme", str(readme)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    res = json.loads(out.read_text(encoding="utf-8"))
    assert res["mode"] == "quick"
    assert res["load_start"]["loadavg"] and res["load_end"]["loadavg"]
    assert res["software"]["torch"] and res["software"]["transformers"]
    s = res["summary"]
    assert s["checks"]["all"] is True, s["checks"]
    assert s["checks"]["peak_rss_reset_worked"] is True

    assert set(s["distill"]) == {"sparse_top128", "full_vocab_topk", "dense_kl",
                                 "dense_kl_full_head"}
    for entry in s["distill"].values():
        assert entry["step_s"]["n"] == res["settings"]["reps"]
        assert entry["step_s"]["median"] > 0
        assert entry["slm_direction_s"]["median"] > 0 and entry["llm_direction_s"]["median"] > 0
        assert entry["tensor_peak_mib"] > 0 and entry["baseline_rss_mib"] > 0
    assert set(s["kl"]) >= {"sparse_top128", "full_vocab_topk", "dense_kl"}
    for model in ("slm", "llm"):
        assert set(s["train"][model]) == {"answer_head", "full_head"}
        assert set(s["eval"][model]) == {"always", "never", "auto"}
        for mode in s["eval"][model].values():
            assert mode["questions"] == res["settings"]["eval_questions"]
            assert mode["seconds_per_question"]["median"] > 0
        assert s["ratios"]["train_full_vs_answer_head"][model]["step_time"] > 0
        assert s["ratios"]["eval_vs_shared"][model]["never"] > 0
    assert s["ratios"]["distill_vs_sparse_top128"]["dense_kl"]["step_time"] > 0

    text = readme.read_text(encoding="utf-8")
    assert text.startswith("intro\n") and text.endswith(END + "\noutro\n")
    assert "stale table" not in text
    for heading in ("Mutual distillation step", "KL loss alone", "Client LoRA train step",
                    "Multiple-choice evaluation"):
        assert heading in text
