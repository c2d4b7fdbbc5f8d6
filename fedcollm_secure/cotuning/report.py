"""The report of a FedCoLLM run: JSON, Markdown, a PNG plot and the final adapters.

:func:`write_report` takes the run's config and history (:meth:`engine.FedCoLLM.run`) and
writes, into one directory:

* ``report.json``: config, aggregator (and its options), the full history, bytes on the wire
  per client per round, seconds per phase per round, totals;
* ``report.md``: a table per round (LLM and SLM accuracy, bytes, seconds) and, when the SLM
  was pruned from the LLM, a plain statement that an unhealed pruned SLM is near chance;
* ``accuracy.png``: accuracy per round for the LLM and the SLM(s) (matplotlib, Agg backend;
  skipped with a note when matplotlib is not installed);
* ``llm_adapter.safetensors`` / ``slm_adapter.safetensors`` when the adapter states are
  given (:func:`lora.save_adapter`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..privacy.ledger import markdown_lines as privacy_markdown
from ..privacy.ledger import summarise as privacy_summary
from ..audit.log import AuditLog
from .data import MCExample
from .lora import save_adapter

__all__ = [
    "REPORT_FORMAT",
    "REPORT_VERSION",
    "build_report",
    "chance_accuracy",
    "plot_accuracy",
    "render_markdown",
    "write_report",
]

REPORT_FORMAT = "fedcollm_secure.run-report"
REPORT_VERSION = 1
PHASES = ("clients", "aggregate", "distill", "evaluate")

PRUNED_SLM_NOTE = (
    "The SLM here is the LLM pruned to {layers} decoder layers with no healing stage. An "
    "unhealed pruned SLM is near chance on these tasks (chance is {chance} here), and neither "
    "local fine-tuning nor distillation at this budget repairs it (DESIGN.md section 4), so "
    "its accuracy says nothing about how well FedCoLLM works; this run shows the mechanics "
    "(secure aggregation, mutual distillation, costs).")


def chance_accuracy(examples: Sequence[MCExample]) -> float | None:
    """Expected accuracy of uniform guessing on ``examples`` (None when empty)."""
    if not examples:
        return None
    return sum(1.0 / ex.n_choices for ex in examples) / len(examples)


def _plain(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become None, tensors lists, tuples lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _plain(value.detach().cpu().tolist())
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def build_report(config: Any, history: Sequence[Mapping[str, Any]], *,
                 chance: float | None = None, total_seconds: float | None = None,
                 adapters: Mapping[str, str] | None = None,
                 extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The report as plain data (what ``report.json`` holds).

    ``config`` is a :class:`engine.FedCoLLMConfig` (or anything with ``to_dict``, or a
    mapping); ``history`` the list of round dicts the engine returns.
    """
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    aggregator = history[-1].get("aggregator") if history else cfg.get("aggregator")
    options = history[-1].get("aggregator_options") if history else cfg.get(
        "aggregator_options")
    bytes_per_round = {str(r["round"]): r.get("bytes", {}) for r in history}
    seconds_per_round = {str(r["round"]): r.get("seconds", {}) for r in history}
    phase_totals: dict[str, float] = {}
    for r in history:
        for phase, secs in r.get("seconds", {}).items():
            phase_totals[phase] = phase_totals.get(phase, 0.0) + float(secs)
    sent_total: dict[str, int] = {}
    for r in history:
        for cid, b in r.get("bytes", {}).items():
            sent_total[cid] = sent_total.get(cid, 0) + int(b.get("sent", 0))
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "aggregator": aggregator,
        "aggregator_options": options,
        "rounds": len(history),
        "slm_pruned_layers": cfg.get("slm_prune_layers"),
        "chance_accuracy": chance,
        "bytes_per_client_per_round": bytes_per_round,
        "seconds_per_phase_per_round": seconds_per_round,
        "totals": {"seconds_per_phase": phase_totals, "bytes_sent_per_client": sent_total,
                   "wall_seconds": total_seconds},
        "final_eval": history[-1].get("eval", {}) if history else {},
        "adapters": dict(adapters or {}),
        "privacy": privacy_summary(history),
        "config": cfg,
        "history": list(history),
    }
    if extra:
        report.update(extra)
    plain: dict[str, Any] = _plain(report)
    return plain


def _pct(value: Any) -> str:
    return f"{100 * float(value):.1f}%" if isinstance(value, (int, float)) else "n/a"


def _bytes(n: Any) -> str:
    n = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"  # pragma: no cover


def _model_label(key: str) -> str:
    return "LLM" if key == "llm" else ("SLM (global)" if key == "slm" else f"SLM ({key})")


def render_markdown(report: Mapping[str, Any]) -> str:
    """The Markdown report: setting, one table per round, totals and notes."""
    cfg = report.get("config", {})
    llm = (cfg.get("llm") or {}).get("source", "?")
    if cfg.get("slm"):
        slm = cfg["slm"].get("source", "?")
    else:
        slm = f"the LLM pruned to {cfg.get('slm_prune_layers')} decoder layers"
    lines = [
        "# FedCoLLM run report",
        "",
        f"- LLM: `{llm}`; SLM: {slm}",
        f"- {cfg.get('n_clients', '?')} clients, {report.get('rounds', 0)} rounds, aggregator "
        f"`{report.get('aggregator')}` (options {report.get('aggregator_options')})",
        f"- data: `{(cfg.get('data') or {}).get('source', '?')}`; chance accuracy "
        f"{_pct(report.get('chance_accuracy'))}",
    ]
    wall = (report.get("totals") or {}).get("wall_seconds")
    if isinstance(wall, (int, float)):
        lines.append(f"- wall time {wall:.1f} s")
    lines.append("")
    for r in report.get("history", []):
        t = r.get("round")
        lines += [f"## Round {t}", "", "| quantity | value |", "|---|---|"]
        evaluation = r.get("eval") or {}
        if not evaluation:
            lines.append("| accuracy | not evaluated |")
        for key, res in evaluation.items():
            lines.append(f"| {_model_label(key)} accuracy (summed / length-normalised) | "
                         f"{_pct(res.get('acc'))} / {_pct(res.get('acc_norm'))} "
                         f"(n={res.get('n')}) |")
        for cid, b in (r.get("bytes") or {}).items():
            lines.append(f"| bytes {cid} (sent / received) | {_bytes(b.get('sent', 0))} / "
                         f"{_bytes(b.get('received', 0))} |")
        for phase, secs in (r.get("seconds") or {}).items():
            lines.append(f"| seconds: {phase} | {float(secs):.2f} |")
        loss = r.get("mean_client_loss")
        if isinstance(loss, (int, float)):
            lines.append(f"| mean client loss | {loss:.3f} |")
        distill = r.get("distill") or {}
        for key, label in (("mean_slm_loss", "SLM"), ("mean_llm_loss", "LLM")):
            if isinstance(distill.get(key), (int, float)):
                lines.append(f"| distillation loss {label} | {distill[key]:.3f} |")
        survivors, dropped = r.get("survivors"), r.get("dropped")
        lines.append(f"| survivors / dropped | {len(survivors or [])} / "
                     f"{len(dropped or {})} |")
        lines.append("")
    lines += privacy_markdown(report.get("privacy"))
    if report.get("slm_pruned_layers") is not None:
        lines += ["## Note on the SLM", "",
                  PRUNED_SLM_NOTE.format(layers=report["slm_pruned_layers"],
                                         chance=_pct(report.get("chance_accuracy"))), ""]
    adapters = report.get("adapters") or {}
    if adapters:
        lines += ["## Files", ""]
        lines += [f"- {name}: `{path}`" for name, path in adapters.items()]
        lines.append("")
    return "\n".join(lines)


def plot_accuracy(report: Mapping[str, Any], path: str | Path) -> Path | None:
    """Accuracy per round for the LLM and the SLM(s) as a PNG; None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = report.get("history", [])
    rounds = [r["round"] for r in history]
    keys: list[str] = []
    for r in history:
        keys += [k for k in (r.get("eval") or {}) if k not in keys]
    fig, ax = plt.subplots(figsize=(6, 4))
    try:
        for key in keys:
            for metric, style in (("acc", "-o"), ("acc_norm", "--s")):
                raw = [((r.get("eval") or {}).get(key) or {}).get(metric) for r in history]
                ys = [math.nan if y is None else float(y) for y in raw]
                ax.plot(rounds, ys, style, label=f"{_model_label(key)} {metric}")
        chance = report.get("chance_accuracy")
        if isinstance(chance, (int, float)):
            ax.axhline(float(chance), color="grey", linestyle=":", label="chance")
        ax.set_xlabel("round")
        ax.set_ylabel("multiple-choice accuracy")
        ax.set_ylim(0.0, 1.0)
        ax.set_xticks(rounds)
        ax.set_title(f"FedCoLLM ({report.get('aggregator')})")
        if keys:
            ax.legend(fontsize=8)
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(out, dpi=100)
    finally:
        plt.close(fig)
    return out


def write_report(out_dir: str | Path, config: Any, history: Sequence[Mapping[str, Any]], *,
                 llm_state: Mapping[str, torch.Tensor] | None = None,
                 slm_state: Mapping[str, torch.Tensor] | None = None,
                 chance: float | None = None, total_seconds: float | None = None,
                 extra: Mapping[str, Any] | None = None,
                 audit: AuditLog | None = None) -> dict[str, Path]:
    """Write report.json, report.md, accuracy.png and the adapters into ``out_dir``.

    Returns the written files by kind (``json``, ``markdown``, ``plot``, ``llm_adapter``,
    ``slm_adapter``; absent kinds were not written). With ``audit`` (an open audit log) the
    SHA-256 of every written file is recorded there.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    meta = {"rounds": str(len(history))}
    for kind, state in (("llm_adapter", llm_state), ("slm_adapter", slm_state)):
        if state is not None:
            files[kind] = save_adapter(out / f"{kind}.safetensors", state,
                                       metadata={**meta, "model": kind.split("_")[0]})
    report = build_report(config, history, chance=chance, total_seconds=total_seconds,
                          adapters={k: v.name for k, v in files.items()}, extra=extra)
    plot = plot_accuracy(report, out / "accuracy.png")
    if plot is not None:
        files["plot"] = plot
    else:
        report["plot"] = "not written: matplotlib is not installed"
    files["json"] = out / "report.json"
    files["json"].write_text(json.dumps(report, indent=2, allow_nan=False) + "\n",
                             encoding="utf-8")
    files["markdown"] = out / "report.md"
    files["markdown"].write_text(render_markdown(report), encoding="utf-8")
    if audit is not None:
        for kind, path in files.items():
            audit.record_artifact(path, role=kind, round_=len(history))
    return files
