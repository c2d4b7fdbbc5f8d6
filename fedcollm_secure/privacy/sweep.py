"""Privacy-budget sweeps: the same federation at several epsilons, a CSV and a
privacy-utility plot (SLM and LLM accuracy against epsilon, with the non-private baseline).

The swept mechanism is the config's ``privacy.ddp`` section when it has one, else
``privacy.dpsgd`` (created with defaults when absent); each epsilon becomes its
``target_epsilon`` (``inf``: that mechanism off, the non-private baseline). The run's seed
stays fixed, so data splits and example order are the same at every budget.
"""

from __future__ import annotations

import copy
import csv
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["parse_epsilons", "plot_sweep", "run_sweep"]

FIELDS = ["epsilon", "mechanism", "rounds_completed", "slm_acc", "slm_acc_norm", "llm_acc",
          "llm_acc_norm", "epsilon_spent", "delta", "seconds"]


def parse_epsilons(text: str) -> list[float]:
    """``"1,2,4,8,inf"`` -> ``[1.0, 2.0, 4.0, 8.0, inf]`` (positive, no duplicates)."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        try:
            value = math.inf if part in ("inf", "infinity") else float(part)
        except ValueError:
            raise ConfigError(f"--epsilons: {part!r} is not a number or inf") from None
        if not value > 0 or math.isnan(value):
            raise ConfigError(f"--epsilons: {part!r} must be positive")
        out.append(value)
    if not out or len(set(out)) != len(out):
        raise ConfigError("--epsilons needs distinct values")
    return out


def _with_epsilon(data: dict[str, Any], eps: float) -> tuple[dict[str, Any], str]:
    data = copy.deepcopy(data)
    privacy = data.setdefault("privacy", {})
    mechanism = "ddp" if privacy.get("ddp") else "dpsgd"
    section = dict(privacy.get(mechanism) or {})
    section.pop("noise_multiplier", None)
    section["target_epsilon"] = eps
    privacy[mechanism] = section
    return data, mechanism


def run_sweep(data: dict[str, Any], epsilons: Sequence[float], out: str | Path, *,
              run: Callable[[dict[str, Any]], tuple[list[dict[str, Any]], Any]] | None = None,
              log: Callable[[str], None] = print) -> dict[str, Path]:
    """Run the federation of ``data`` (a FedCoLLM config mapping) at every epsilon; write
    ``sweep.csv`` and ``sweep.png`` under ``out``. ``run`` (tests) maps a config mapping to
    ``(history, engine)``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for eps in epsilons:
        cfg, mechanism = _with_epsilon(data, eps)
        start = time.perf_counter()
        log(f"sweep: epsilon {eps} ({mechanism}) ...")
        history, engine = (run or _run_engine)(cfg)
        final = history[-1]["eval"] if history else {}
        summary = engine.privacy.summary() if getattr(engine, "privacy", None) else {}
        if mechanism == "dpsgd":
            spent = (summary.get("dpsgd") or {}).get("aggregate", 0.0 if math.isinf(eps)
                                                      else math.nan)
            delta = (summary.get("dpsgd") or {}).get("delta", "")
        else:
            spent = (summary.get("ddp") or {}).get("epsilon", 0.0 if math.isinf(eps)
                                                   else math.nan)
            delta = (summary.get("ddp") or {}).get("delta", "")
        rows.append({"epsilon": eps, "mechanism": mechanism, "rounds_completed": len(history),
                     "slm_acc": (final.get("slm") or {}).get("acc", math.nan),
                     "slm_acc_norm": (final.get("slm") or {}).get("acc_norm", math.nan),
                     "llm_acc": (final.get("llm") or {}).get("acc", math.nan),
                     "llm_acc_norm": (final.get("llm") or {}).get("acc_norm", math.nan),
                     "epsilon_spent": spent if not math.isinf(eps) else 0.0, "delta": delta,
                     "seconds": time.perf_counter() - start})
        log(f"  SLM acc {rows[-1]['slm_acc']}, LLM acc {rows[-1]['llm_acc']}, epsilon spent "
            f"{rows[-1]['epsilon_spent']}")
    csv_path = out / "sweep.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    png = plot_sweep(rows, out / "sweep.png")
    return {"csv": csv_path, "png": png}


def _run_engine(cfg: dict[str, Any]) -> tuple[list[dict[str, Any]], Any]:
    from ..cotuning.engine import FedCoLLM, FedCoLLMConfig

    engine = FedCoLLM(FedCoLLMConfig.from_dict(cfg))
    return engine.run(), engine


def plot_sweep(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Accuracy against epsilon (log axis); the epsilon = inf run as dashed baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = sorted((r for r in rows if math.isfinite(r["epsilon"])),
                    key=lambda r: r["epsilon"])
    base = [r for r in rows if not math.isfinite(r["epsilon"])]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label, color in (("slm_acc", "SLM (global)", "tab:blue"),
                              ("llm_acc", "LLM", "tab:orange")):
        if finite:
            ax.plot([r["epsilon"] for r in finite], [100 * r[key] for r in finite], "o-",
                    color=color, label=f"{label}, private")
        if base:
            ax.axhline(100 * base[0][key], color=color, ls="--",
                       label=f"{label}, non-private")
    ax.set_xscale("log")
    mech = rows[0]["mechanism"] if rows else ""
    ax.set_xlabel(f"epsilon ({'user-level distributed DP' if mech == 'ddp' else 'DP-SGD'})")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("privacy-utility trade-off")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
