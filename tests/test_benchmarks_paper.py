"""The paper's experiment (benchmarks/paper/run.py) end to end on tiny models and data:
every method's cell, resumability, cell selection and the README table."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from fedcollm_secure.cotuning.data import generated_mc_dataset, load_bigbench_mc
from fedcollm_secure.cotuning.evaluation import score_choices
from fedcollm_secure.cotuning.models import (
    load_model,
    save_tiny_model,
    tiny_sentencepiece_tokenizer,
    tiny_tokenizer,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RUN_PY = Path(__file__).resolve().parents[1] / "benchmarks" / "paper" / "run.py"
TASKS = ["arithmetic", "next_word", "successor", "opposite"]


@pytest.fixture(scope="module")
def paper() -> Any:
    spec = importlib.util.spec_from_file_location("paper_run", RUN_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["paper_run"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("paper")
    data = root / "bigbench-mc"
    for split, seed in (("train", 1), ("validation", 2), ("test", 3)):
        for task in TASKS:
            folder = data / task
            folder.mkdir(parents=True, exist_ok=True)
            examples = generated_mc_dataset(12 if split == "train" else 5, seed=seed,
                                            tasks=[task])
            (folder / f"{split}.jsonl").write_text("".join(
                json.dumps({"id": f"{task}-{split}-{i}", "question": e.question,
                            "choices": list(e.choices), "answer": e.answer, "task": task})
                + "\n" for i, e in enumerate(examples)))
    llm = save_tiny_model(root / "llm", "llama", seed=3, hidden=32, layers=1,
                          tokenizer=tiny_sentencepiece_tokenizer())
    slm = save_tiny_model(root / "slm", "llama", seed=4, hidden=32, layers=1,
                          tokenizer=tiny_tokenizer())
    rowsets = {"tiny": {"llm": str(llm), "slm": str(slm), "slm_prune_layers": None,
                        "label": "tiny cross-tokenizer pair"},
               "tinypruned": {"llm": str(slm), "slm": None, "slm_prune_layers": 1,
                              "label": "tiny pruned pair"}}
    settings = {"tasks": TASKS, "data_dir": str(data), "train_per_task": 12,
                "max_length": 64, "lora": {"r": 2, "alpha": 4, "dropout": 0.0},
                "train": {"batch_size": 8, "learning_rate": 1e-2},
                "distill": {"top_k": 8}, "distill_train": {"batch_size": 8,
                                                           "learning_rate": 1e-2},
                "rounds": 1, "eval_batch_size": 8, "llm_bf16_autocast": False}
    return {"root": root, "rowsets": rowsets, "settings": settings}


def test_every_cell_runs_resumes_and_summarizes(paper: Any, world: dict[str, Any],
                                                monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    monkeypatch.setenv("FEDCOLLM_SECURE_CACHE", str(tmp_path / "cache"))
    settings = paper.merge(paper.SETTINGS, world["settings"])
    results = tmp_path / "results"
    cells = paper.all_cells(["tiny"], seeds=[0, 1])
    assert [c.name for c in cells][:7] == [f"tiny:{m}:0" for m in paper.METHODS]
    assert sum(c.method.startswith("zero_shot") for c in cells) == 2  # seed-independent
    logs: list[str] = []
    first = cells[:7]
    done = paper.run_cells(first, settings, results, rowsets=world["rowsets"], log=logs.append)
    assert done == first
    records = {c.method: json.loads(c.path(results).read_text()) for c in first}
    n_test = 5 * len(TASKS)
    for method, record in records.items():
        assert set(record["rows"]) == set(paper._SCORED[method])
        for row in record["rows"].values():
            assert row["overall"]["n"] == n_test == len(row["pred"]) == len(row["ids"])
            assert set(row["per_task"]) == set(TASKS)
            assert sum(r["n"] for r in row["per_task"].values()) == n_test
            # one task per client: a client's accuracy is that of its task
            for cid, client in row["per_client"].items():
                (task,) = client["tasks"]
                assert client["acc"] == row["per_task"][task]["acc"]
                assert record["data"]["clients"][cid]["tasks"] == [task]
            correct = sum(p == a for p, a in zip(row["pred"], _answers(world, "test"),
                                                  strict=True))
            assert correct / n_test == pytest.approx(row["overall"]["acc"])
        assert record["seconds"]["total"] > 0 and record["fingerprint"]
    # each model is scored with its own tokenizer: zero-shot predictions equal direct scoring
    for which in ("llm", "slm"):
        model, tok = load_model(world["rowsets"]["tiny"][which])
        test = load_bigbench_mc(TASKS, "test", data_dir=world["settings"]["data_dir"])
        direct = [s.pred for s in score_choices(model, tok, test)]
        assert records[f"zero_shot_{which}"]["rows"][which]["pred"] == direct
    assert records["centralized"]["history"][0]["examples"] == 48
    assert records["fedcollm"]["history"][0]["distill"]["steps"] >= 1
    # trained adapters are kept; fedcollm_llm scores the LLM with the one fedcollm saved
    from fedcollm_secure.cotuning.lora import load_adapter

    for method, model in (("fedavg", "slm"), ("fedcollm", "slm"), ("fedcollm", "llm"),
                          ("centralized", "llm")):
        state, meta = load_adapter(paper.Cell("tiny", method, 0).adapter_path(results, model))
        assert meta["cell"] == f"tiny:{method}:0"
        assert any(float(v.abs().max()) > 0 for n, v in state.items() if "lora_B" in n)
    assert records["fedcollm_llm"]["history"] == []
    # a rerun skips finished cells; a deadline stops before new ones
    logs.clear()
    assert paper.run_cells(first, settings, results, rowsets=world["rowsets"],
                           log=logs.append) == []
    assert all(line.startswith("skip") for line in logs) and len(logs) == 7
    assert paper.run_cells(cells, settings, results, rowsets=world["rowsets"], deadline=0,
                           log=logs.append) == []
    # other settings for a finished cell: refused, not silently mixed
    other = paper.merge(settings, {"rounds": 2})
    with pytest.raises(SystemExit, match="other settings"):
        paper.run_cells(first[:1], other, results, rowsets=world["rowsets"], log=logs.append)
    # the table: finished cells with their seeds, the others marked
    text = paper.summary_markdown(results, settings, {"tiny": world["rowsets"]["tiny"]})
    lines = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in text.splitlines()
             if line.startswith("| SLM |") or line.startswith("| LLM |")}
    assert len(lines) == 7
    assert "(det.)" in lines[("SLM", "zero-shot")] and "(n=1)" in lines[("LLM", "FedCoLLM")]
    fed = records["fedavg"]["rows"]["slm"]["overall"]["acc"] * 100
    assert f"{fed:.1f} (n=1)" in lines[("SLM", "FedAvg")]
    assert "Cells finished: 7 of 17" in text  # 2 zero-shot + 5 cells x 3 seeds
    # paired comparisons on the same questions, from the stored predictions
    assert "| SLM FedCoLLM vs FedAvg | 0 |" in text and "| LLM FedCoLLM vs zero-shot | 0 |" in text
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{paper.README_START}\nold\n{paper.README_END}\ntail\n")
    paper.write_readme(readme, text)
    body = readme.read_text()
    assert body.startswith("intro\n") and body.endswith("tail\n") and "old" not in body


def _answers(world: dict[str, Any], split: str) -> list[int]:
    out = []
    for task in TASKS:
        path = Path(world["settings"]["data_dir"]) / task / f"{split}.jsonl"
        out.extend(json.loads(line)["answer"] for line in path.read_text().splitlines())
    return out


def test_select_cells_pruned_rowset_and_search(paper: Any, world: dict[str, Any],
                                               monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    cells = paper.all_cells(["main", "pruned"])
    assert len(cells) == 2 * (2 + 3 * 5)
    chosen = paper.select_cells(cells, ["main:zero_shot*:*", "pruned:fedavg:2"])
    assert [c.name for c in chosen] == ["main:zero_shot_llm:0", "main:zero_shot_slm:0",
                                        "pruned:fedavg:2"]
    with pytest.raises(SystemExit, match="matches no cell"):
        paper.select_cells(cells, ["nope:*:*"])
    with pytest.raises(SystemExit, match="unknown setting"):
        paper.merge(paper.SETTINGS, {"learning_rate": 1})
    # the same-tokenizer pruned pair runs FedCoLLM too (exact path, no bridge)
    settings = paper.merge(paper.SETTINGS, {**world["settings"], "llm_bf16_autocast": True})
    results = tmp_path / "results"
    cell = paper.Cell("tinypruned", "fedcollm", 0)
    paper.run_cells([cell], settings, results, rowsets=world["rowsets"], log=lambda m: None)
    record = json.loads(cell.path(results).read_text())
    assert not record["history"][0]["distill"]["bridge"]
    assert set(record["rows"]) == {"slm"}
    llm_cell = paper.Cell("tinypruned", "fedcollm_llm", 0)
    paper.run_cells([llm_cell], settings, results, rowsets=world["rowsets"], log=lambda m: None)
    record = json.loads(llm_cell.path(results).read_text())
    assert set(record["rows"]) == {"llm"} and record["settings"]["llm_bf16_autocast"]
    assert record["rows"]["llm"]["overall"]["n"] == 5 * len(TASKS)
    with pytest.raises(SystemExit, match="needs"):  # no fedcollm cell for seed 1 yet
        paper.run_cells([paper.Cell("tinypruned", "fedcollm_llm", 1)], settings, results,
                        rowsets=world["rowsets"], log=lambda m: None)
    # validation search: one record per grid point, scored on the validation split
    monkeypatch.setitem(paper.ROWSETS, "tiny", world["rowsets"]["tiny"])
    found = paper.run_search(settings, results, rowset_name="tiny", method="fedavg",
                             grid={"train.learning_rate": [1e-3, 1e-2]}, val_per_task=2,
                             seed=0, log=lambda m: None)
    assert [r["point"] for r in found] == [{"train.learning_rate": 1e-3},
                                           {"train.learning_rate": 1e-2}]
    for r in found:
        assert r["data"]["eval_split"] == "validation"
        assert r["rows"]["slm"]["overall"]["n"] == 2 * len(TASKS)
        assert all(i.split("-")[1] == "validation" for i in r["rows"]["slm"]["ids"])


def test_mcnemar_counts_discordant_questions(paper: Any) -> None:
    assert paper.mcnemar([True, True, False], [False, True, True]) == (1, 1, 1.0)
    b, c, p = paper.mcnemar([True] * 10 + [False] * 5, [False] * 10 + [False] * 5)
    assert (b, c) == (10, 0) and p == pytest.approx(2 / 1024)
    assert paper.mcnemar([True], [True]) == (0, 0, 1.0)
