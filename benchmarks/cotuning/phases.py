"""The measured phases of the co-tuning benchmark; each job runs in its own child process.

``run.py`` starts one child per job (``run_job``); the child builds the models and data,
records its resident set size (RSS), resets the kernel's peak-RSS mark, runs the phase (warm-up
and timed steps), reads the peak, then runs one more step under :class:`TensorPeak` (untimed)
and writes a JSON result. Library code is called as the engine calls it; baselines that the
library does not offer (dense KL, a full-length LM head) are swapped in for the duration of a
job by replacing one module-level function of ``fedcollm_secure.cotuning.server`` or
``.trainer`` (:func:`_patched`).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import statistics
import tempfile
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers.utils import logging as hf_logging

from fedcollm_secure.cotuning import server as server_mod
from fedcollm_secure.cotuning import trainer as trainer_mod
from fedcollm_secure.cotuning.data import (
    MCExample,
    generated_mc_dataset,
    load_bigbench_mc,
    tokenize_examples,
)
from fedcollm_secure.cotuning.distill import (
    DistillSettings,
    answer_cross_entropy,
    dense_kl,
    distillation_loss,
)
from fedcollm_secure.cotuning.evaluation import evaluate_mc
from fedcollm_secure.cotuning.lora import LoraSettings, attach_lora
from fedcollm_secure.cotuning.models import (
    derive_slm_by_pruning,
    load_model,
    save_tiny_model,
    unwrap_causal_lm,
)
from fedcollm_secure.cotuning.server import mutual_distill
from fedcollm_secure.cotuning.trainer import TrainSettings, train_lora

MB = 1 << 20
BIGBENCH_TASKS = ("social_iqa", "goal_step_wikihow.step_inference", "strategyqa",
                  "unit_conversion.different_systems")


# --------------------------------------------------------------------------------------------
# memory probes
# --------------------------------------------------------------------------------------------
def proc_status() -> dict[str, int]:
    """``VmRSS``, ``VmHWM``, ``RssAnon`` and ``RssFile`` of this process, in bytes."""
    out: dict[str, int] = {}
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def release_free_memory() -> None:
    """Collect garbage and return glibc's free heap pages, so the baseline RSS is tight."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class TensorPeak(TorchDispatchMode):
    """Peak bytes of tensor storage allocated while active and alive at the same time.

    Every storage an operator returns (forward, backward, optimizer, factories) is counted
    once from the moment it appears until it is freed (a weak reference to the storage).
    Storages that existed before (weights, an earlier step's tensors) are not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self._refs: dict[int, Any] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or key in self.live:
            return
        size = storage.nbytes()
        self.live[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        self._refs[key] = weakref.ref(storage, lambda _r, k=key: self._free(k))

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)
        self._refs.pop(key, None)


# --------------------------------------------------------------------------------------------
# models and data
# --------------------------------------------------------------------------------------------
def prepare_tiny(directory: str) -> None:
    """Save the quick mode's tiny random LLM (llama, 4 layers) where later jobs load it."""
    save_tiny_model(directory, "llama", seed=0, hidden=64, layers=4, heads=4, kv_heads=2,
                    intermediate=128)


def _fault_in(model: Any) -> None:
    """One tiny no-grad forward, so weights and kernels are resident before the baseline."""
    with torch.no_grad():
        model(input_ids=torch.ones((1, 8), dtype=torch.long), use_cache=False)


def load_models(job: Mapping[str, Any], which: Sequence[str]) -> tuple[dict[str, Any], Any]:
    """``({"llm": peft model, "slm": peft model}, tokenizer)`` for the names in ``which``."""
    llm, tokenizer = load_model(job["model_source"])
    models: dict[str, Any] = {}
    if "slm" in which:
        models["slm"] = derive_slm_by_pruning(llm, job["slm_layers"])
    if "llm" in which:
        models["llm"] = llm
    del llm
    for name in list(models):
        models[name] = attach_lora(models[name], LoraSettings())
        _fault_in(models[name])
    return models, tokenizer


def describe_model(model: Any) -> dict[str, Any]:
    lm = unwrap_causal_lm(model)
    config = lm.config
    return {"parameters": sum(p.numel() for p in lm.parameters()),
            "trainable": sum(p.numel() for p in lm.parameters() if p.requires_grad),
            "layers": int(config.num_hidden_layers), "hidden": int(config.hidden_size),
            "vocab": int(config.vocab_size), "arch": str(config.model_type)}


def train_examples(job: Mapping[str, Any]) -> list[MCExample]:
    """Training / public examples: the same for every job of a run."""
    if job["data"] == "generated":
        return generated_mc_dataset(job["train_examples"], seed=0)
    per_task = -(-job["train_examples"] // len(BIGBENCH_TASKS))
    by_task = [load_bigbench_mc(t, "train", limit=per_task) for t in BIGBENCH_TASKS]
    mixed = [ex for group in zip(*by_task, strict=True) for ex in group]  # round-robin
    return mixed[:job["train_examples"]]


def eval_examples(job: Mapping[str, Any]) -> list[MCExample]:
    if job["data"] == "generated":
        return generated_mc_dataset(job["eval_questions"], seed=1)
    per_task = -(-job["eval_questions"] // len(BIGBENCH_TASKS))
    by_task = [load_bigbench_mc(t, "validation", limit=per_task) for t in BIGBENCH_TASKS]
    mixed = [ex for group in zip(*by_task, strict=True) for ex in group]
    return mixed[:job["eval_questions"]]


# --------------------------------------------------------------------------------------------
# baselines swapped in for one job
# --------------------------------------------------------------------------------------------
def dense_distillation_loss(student_logits: torch.Tensor, targets: torch.Tensor,
                            teacher_logits: torch.Tensor,
                            settings: DistillSettings) -> torch.Tensor:
    """``distillation_loss`` with the library's reference ``dense_kl`` (whole vocabulary)."""
    loss = answer_cross_entropy(student_logits, targets)
    if settings.lambda_kl:
        loss = loss + settings.lambda_kl * dense_kl(student_logits, teacher_logits,
                                                    settings.temperature)
    return loss


def full_head_answer_logits(model: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Answer-position logits taken from a full-length ``(batch, length, vocab)`` head."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                use_cache=False)
    logits: torch.Tensor = out.logits[batch["answer_mask"]]
    return logits


def full_head_answer_loss(model: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``trainer.answer_loss`` with the LM head over every position (then selected)."""
    return F.cross_entropy(full_head_answer_logits(model, batch).float(),
                           batch["answer_targets"])


@contextlib.contextmanager
def _patched(module: Any, name: str, replacement: Any) -> Iterator[None]:
    original = getattr(module, name)
    setattr(module, name, replacement)
    try:
        yield
    finally:
        setattr(module, name, original)


DISTILL_VARIANTS: dict[str, dict[str, Any]] = {
    "sparse_top128": {"top_k": 128},
    "full_vocab_topk": {"top_k": 0},
    "dense_kl": {"top_k": 128, "loss": dense_distillation_loss},
    "dense_kl_full_head": {"top_k": 128, "loss": dense_distillation_loss,
                           "logits": full_head_answer_logits},
}
TRAIN_VARIANTS: dict[str, Callable[..., torch.Tensor] | None] = {
    "answer_head": None, "full_head": full_head_answer_loss}
EVAL_MODES = ("always", "never", "auto")


def _variant_context(job: Mapping[str, Any]) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    if job["phase"] == "distill":
        spec = DISTILL_VARIANTS[job["variant"]]
        if "loss" in spec:
            stack.enter_context(_patched(server_mod, "distillation_loss", spec["loss"]))
        if "logits" in spec:
            stack.enter_context(_patched(server_mod, "_answer_logits", spec["logits"]))
    elif job["phase"] == "train":
        replacement = TRAIN_VARIANTS[job["variant"]]
        if replacement is not None:
            stack.enter_context(_patched(trainer_mod, "answer_loss", replacement))
    return stack


# --------------------------------------------------------------------------------------------
# phases
# --------------------------------------------------------------------------------------------
def _train_settings(job: Mapping[str, Any], steps: int) -> TrainSettings:
    return TrainSettings(batch_size=job["batch_size"], learning_rate=3e-4,
                         max_length=job["max_length"], max_steps=steps)


def _distill(job: Mapping[str, Any], models: Mapping[str, Any], tokenizer: Any,
             features: Sequence[Mapping[str, Sequence[int]]], steps: int) -> dict[str, Any]:
    """One ``mutual_distill`` call (interleaved) of ``steps`` batches, timed per direction."""
    settings = DistillSettings(top_k=DISTILL_VARIANTS[job["variant"]]["top_k"])
    marks: list[tuple[str, float, float, float]] = []

    def progress(side: str, _step: int, loss: float) -> None:
        marks.append((side, time.perf_counter(), time.process_time(), loss))

    torch.manual_seed(0)  # same LoRA-dropout masks in every variant (benchmark only)
    start = (time.perf_counter(), time.process_time())
    mutual_distill(models["llm"], models["slm"], tokenizer, features, settings,
                   _train_settings(job, steps), seed=0, order="interleaved", progress=progress)
    out: dict[str, list[float]] = {k: [] for k in (
        "step_s", "slm_direction_s", "llm_direction_s", "step_cpu_s", "slm_direction_cpu_s",
        "llm_direction_cpu_s", "slm_loss", "llm_loss")}
    previous = start
    for i in range(0, len(marks), 2):
        (_, w_slm, c_slm, l_slm), (_, w_llm, c_llm, l_llm) = marks[i], marks[i + 1]
        out["slm_direction_s"].append(w_slm - previous[0])
        out["llm_direction_s"].append(w_llm - w_slm)
        out["step_s"].append(w_llm - previous[0])
        out["slm_direction_cpu_s"].append(c_slm - previous[1])
        out["llm_direction_cpu_s"].append(c_llm - c_slm)
        out["step_cpu_s"].append(c_llm - previous[1])
        out["slm_loss"].append(l_slm)
        out["llm_loss"].append(l_llm)
        previous = (w_llm, c_llm)
    return dict(out)


def _train(job: Mapping[str, Any], models: Mapping[str, Any], tokenizer: Any,
           features: Sequence[Mapping[str, Sequence[int]]], steps: int) -> dict[str, Any]:
    model = models[job["model"]]
    marks: list[tuple[float, float, float]] = []
    torch.manual_seed(0)
    marks.append((time.perf_counter(), time.process_time(), float("nan")))
    train_lora(model, tokenizer, features, _train_settings(job, steps), seed=0,
               progress=lambda _s, loss: marks.append(
                   (time.perf_counter(), time.process_time(), loss)))
    return {"step_s": [b[0] - a[0] for a, b in zip(marks, marks[1:], strict=False)],
            "step_cpu_s": [b[1] - a[1] for a, b in zip(marks, marks[1:], strict=False)],
            "loss": [m[2] for m in marks[1:]]}


def _evaluate(job: Mapping[str, Any], model: Any, tokenizer: Any,
              examples: Sequence[MCExample]) -> dict[str, Any]:
    cpu = time.process_time()
    result = evaluate_mc(model, tokenizer, examples, batch_size=job["batch_size"],
                         max_length=job["max_length"], prefix_sharing=job["variant"])
    out = {k: float(v) for k, v in result.items()}
    out["cpu_seconds_per_question"] = (time.process_time() - cpu) / len(examples)
    return out


def _teacher_breakdown(models: Mapping[str, Any], tokenizer: Any,
                       features: Sequence[Mapping[str, Sequence[int]]],
                       batch_size: int, reps: int) -> dict[str, float]:
    """Median seconds of each model's no-grad teacher forward (the server's
    ``_teacher_logits``) on the first batches of the public data."""
    from fedcollm_secure.cotuning.data import CausalLMCollator, pad_token_id_of

    collate = CausalLMCollator(pad_token_id_of(tokenizer))
    out: dict[str, float] = {}
    for name in ("llm", "slm"):
        times, cpu = [], []
        for r in range(reps):
            batch = collate(list(features[r * batch_size:(r + 1) * batch_size]))
            t0, c0 = time.perf_counter(), time.process_time()
            server_mod._teacher_logits(models[name], batch)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        out[f"{name}_teacher_forward_s"] = statistics.median(times)
        out[f"{name}_teacher_forward_cpu_s"] = statistics.median(cpu)
    return out


def _kl_micro(job: Mapping[str, Any], vocab: int, n_positions: int) -> dict[str, Any]:
    """``distillation_loss`` forward + backward alone on (N, V) logits: sparse vs dense."""
    generator = torch.Generator().manual_seed(0)
    student0 = torch.randn(n_positions, vocab, generator=generator) * 3
    teacher = torch.randn(n_positions, vocab, generator=generator) * 3
    targets = torch.randint(0, vocab, (n_positions,), generator=generator)
    variants: dict[str, Callable[..., torch.Tensor]] = {
        "sparse_top128": lambda s: distillation_loss(s, targets, teacher,
                                                     DistillSettings(top_k=128)),
        "full_vocab_topk": lambda s: distillation_loss(s, targets, teacher,
                                                       DistillSettings(top_k=0)),
        "dense_kl": lambda s: dense_distillation_loss(s, targets, teacher, DistillSettings()),
    }
    out: dict[str, Any] = {"positions": n_positions, "vocab": vocab}
    for name, fn in variants.items():
        times, cpu = [], []
        for _ in range(job["kl_reps"] + 1):
            student = student0.clone().requires_grad_(True)
            t0, c0 = time.perf_counter(), time.process_time()
            fn(student).backward()
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        student = student0.clone().requires_grad_(True)
        with TensorPeak() as tracker:
            fn(student).backward()
        out[name] = {"step_s": times[1:], "step_cpu_s": cpu[1:],
                     "tensor_peak_bytes": tracker.peak,
                     "loss": float(fn(student0).detach())}
    return out


def run_job(job_json: str, out_path: str) -> None:
    """Child-process entry point: run one job and write its result as JSON to ``out_path``."""
    gc.freeze()  # the imported modules: later collections (and COW copies) skip them
    job = json.loads(job_json)
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    warnings.filterwarnings("ignore", category=FutureWarning)
    hf_logging.disable_progress_bar()
    result: dict[str, Any] = {"job": job, "pid": os.getpid(),
                              "loadavg_start": os.getloadavg(),
                              "torch_threads": torch.get_num_threads()}
    if job["phase"] == "prepare":
        prepare_tiny(job["model_source"])
        Path(out_path).write_text(json.dumps(result), encoding="utf-8")
        return
    phase = job["phase"]
    which = {"distill": ("llm", "slm"), "kl": ()}.get(phase, (job.get("model", ""),))
    t0 = time.perf_counter()
    models, tokenizer = load_models(job, which)
    features = tokenize_examples(train_examples(job), tokenizer, job["max_length"])
    evals = eval_examples(job) if phase == "eval" else []
    result["setup_s"] = time.perf_counter() - t0
    result["models"] = {name: describe_model(m) for name, m in models.items()}

    warmup, reps = job["warmup"], job["reps"]
    if phase == "kl":
        bs = job["batch_size"]
        counts = [sum(len(f["answer_positions"]) for f in features[i:i + bs])
                  for i in range(0, len(features), bs)]
        vocab = len(tokenizer)
        result["kl"] = _kl_micro(job, vocab, int(statistics.median(counts)))
        result["loadavg_end"] = os.getloadavg()
        Path(out_path).write_text(json.dumps(result), encoding="utf-8")
        return

    release_free_memory()
    before = proc_status()
    result["peak_reset"] = reset_peak_rss()
    with _variant_context(job):
        if phase == "distill":
            timed = _distill(job, models, tokenizer, features, warmup + reps)
        elif phase == "train":
            timed = _train(job, models, tokenizer, features, warmup + reps)
        elif phase == "eval":
            model = models[job["model"]]
            _evaluate(job, model, tokenizer, evals[:job["batch_size"]])  # warm-up
            timed = _evaluate(job, model, tokenizer, evals)
        else:
            raise ValueError(f"unknown phase {phase!r}")
        after = proc_status()
        result["rss"] = {"baseline_bytes": before["VmRSS"], "peak_bytes": after["VmHWM"],
                         "peak_delta_bytes": after["VmHWM"] - before["VmRSS"],
                         "baseline_anon_bytes": before.get("RssAnon"),
                         "baseline_file_bytes": before.get("RssFile"),
                         "end_file_bytes": after.get("RssFile")}
        if phase in ("distill", "train"):
            for key in [k for k in timed if k.endswith("_s")]:
                timed[f"warmup_{key}"] = timed[key][:warmup]
                timed[key] = timed[key][warmup:]
        result["timed"] = timed
        if phase == "distill" and job["variant"] == "sparse_top128":
            result["breakdown"] = _teacher_breakdown(models, tokenizer, features,
                                                     job["batch_size"], 3)
        # one more (untimed) step under the tensor tracker
        with TensorPeak() as tracker:
            if phase == "distill":
                _distill(job, models, tokenizer, features, 1)
            elif phase == "train":
                _train(job, models, tokenizer, features, 1)
            else:
                longest = sorted(evals, key=lambda e: -(len(e.question)
                                                        + sum(map(len, e.choices))))
                _evaluate(job, models[job["model"]], tokenizer, longest[:job["batch_size"]])
        result["tensor_peak_bytes"] = tracker.peak
    result["loadavg_end"] = os.getloadavg()
    Path(out_path).write_text(json.dumps(result), encoding="utf-8")


def scratch_dir() -> str:
    return tempfile.mkdtemp(prefix="fedcollm-bench-")
