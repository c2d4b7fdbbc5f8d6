"""The privacy ledger: one JSON line per round with everything needed to re-derive epsilon.

Each record names the privacy unit, adjacency, sampling scheme, the mechanism parameters
(q, sigma, clip, steps), the accountant and the library versions, and epsilon(delta) for the
round and cumulatively, per client and for the aggregate (:mod:`.federation` builds them).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["LEDGER_FORMAT", "PrivacyLedger", "library_versions", "markdown_lines", "read_ledger",
           "summarise"]

LEDGER_FORMAT = "fedcollm-secure/privacy-ledger/v1"


def library_versions() -> dict[str, str]:
    """Versions of the packages whose code computes or enforces the guarantees."""
    out = {}
    for name in ("fedcollm-secure", "opacus", "torch", "numpy", "dp-accounting"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def _json_safe(value: Any) -> Any:
    """inf/nan become strings (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class PrivacyLedger:
    """Appends round records to a JSONL file (and keeps them in memory)."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.records: list[dict[str, Any]] = []
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, record: Mapping[str, Any]) -> dict[str, Any]:
        entry: dict[str, Any] = _json_safe({"format": LEDGER_FORMAT, **record})
        self.records.append(entry)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(entry, sort_keys=True) + "\n")
        return entry


def read_ledger(path: str | Path) -> Iterator[dict[str, Any]]:
    for line in Path(path).read_text().splitlines():
        if line.strip():
            yield json.loads(line)


def summarise(history: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The privacy section of a run report: the latest ledger record's cumulative epsilons
    (per client and aggregate) and the per-round records; None without DP."""
    records = [r["privacy"] for r in history if r.get("privacy")]
    if not records:
        return None
    last = records[-1]
    out: dict[str, Any] = {"rounds": len(records), "libraries": last.get("libraries", {})}
    if "dpsgd" in last:
        d = last["dpsgd"]
        out["dpsgd"] = {k: d[k] for k in ("privacy_unit", "adjacency", "sampling",
                                           "accountant", "delta")}
        out["dpsgd"]["clients"] = {
            cid: {k: c[k] for k in ("epsilon_cumulative", "steps_cumulative", "budget", "q",
                                    "sigma", "clip")}
            for cid, c in d["clients"].items()}
        out["dpsgd"]["aggregate_epsilon"] = d["aggregate"]["epsilon_cumulative"]
        out["dpsgd"]["refused"] = {str(r["round"]): [cid for cid, c in r["dpsgd"]["clients"]
                                                     .items() if c.get("refused")]
                                   for r in records if "dpsgd" in r}
    if "ddp" in last:
        d = last["ddp"]
        out["ddp"] = {k: d[k] for k in ("privacy_unit", "adjacency", "sampling", "accountant",
                                         "epsilon_cumulative", "releases", "delta")}
        out["ddp"]["params"] = d["params"]
    return out


def markdown_lines(summary: Mapping[str, Any] | None) -> list[str]:
    """Markdown of :func:`summarise` for the run report."""
    if not summary:
        return []
    lines = ["## Privacy", ""]
    if "dpsgd" in summary:
        d = summary["dpsgd"]
        lines += [f"DP-SGD (Opacus): unit {d['privacy_unit']}, {d['adjacency']}, "
                  f"{d['sampling']} sampling, {d['accountant']} accountant, delta "
                  f"{d['delta']:g}.", "",
                  "| client | epsilon (cumulative) | budget | steps | q | sigma | clip |",
                  "|---|---|---|---|---|---|---|"]
        for cid, c in d["clients"].items():
            budget = c["budget"] if c["budget"] is not None else "none"
            lines.append(f"| {cid} | {float(c['epsilon_cumulative']):.3f} | {budget} | "
                         f"{c['steps_cumulative']} | {float(c['q']):.4g} | "
                         f"{float(c['sigma']):.4g} | {c['clip']} |")
        lines.append(f"| aggregate (max over clients) | {float(d['aggregate_epsilon']):.3f} "
                     "| | | | | |")
        refused = {t: c for t, c in d.get("refused", {}).items() if c}
        if refused:
            lines += ["", "Refused before training (budget): " + "; ".join(
                f"round {t}: {', '.join(c)}" for t, c in refused.items())]
        lines.append("")
    if "ddp" in summary:
        d = summary["ddp"]
        p = d["params"]
        eps = d["epsilon_cumulative"]
        eps_s = f"{float(eps):.3f}" if not isinstance(eps, str) else eps
        lines += [f"Distributed DP (masking): unit {d['privacy_unit']}, {d['adjacency']}; "
                  f"epsilon {eps_s} at delta {float(d['delta']):.3g} after {d['releases']} "
                  f"releases; central noise multiplier {float(p['noise_multiplier']):.3g} with "
                  f"{p['min_survivors']} minimum survivors, clip {p['clip']}, "
                  f"{p['ring_bits']}-bit ring.", ""]
    versions = summary.get("libraries") or {}
    if versions:
        lines += ["Libraries: " + ", ".join(f"{k} {v}" for k, v in versions.items()), ""]
    return lines
