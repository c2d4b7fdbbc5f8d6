"""Command-line interface: ``fedcollm-secure demo`` and ``fedcollm-secure aggregators``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .api import secure_sum
from .errors import FedCoLLMSecureError
from .secagg import available_aggregators, get_aggregator

STAGE_LABELS = {"advertise_keys": "advertise keys", "share_keys": "share keys",
                "masked_input": "masked input", "unmask": "unmask", "input": "input"}


def lora_shaped_update(rng: np.random.Generator, layers: int, hidden: int, kv: int,
                       rank: int) -> dict[str, np.ndarray]:
    """Synthetic LoRA deltas shaped like a SmolLM2-135M adapter (r=rank on q/k/v/o)."""
    out = {}
    for layer in range(layers):
        for proj, width in (("q_proj", hidden), ("k_proj", kv), ("v_proj", kv), ("o_proj", hidden)):
            base = f"layers.{layer}.self_attn.{proj}"
            out[f"{base}.lora_A"] = rng.normal(0, 0.02, (rank, hidden)).astype(np.float32)
            out[f"{base}.lora_B"] = rng.normal(0, 0.02, (width, rank)).astype(np.float32)
    return out


def _progress(stage: str, sent: int, received: int) -> None:
    label = STAGE_LABELS.get(stage, stage)
    print(f"  [{label:<15}] {sent:>3} requests -> {received:>3} replies", flush=True)


def cmd_demo(args: argparse.Namespace) -> int:
    rng = np.random.default_rng(args.data_seed)  # synthetic demo data only, not key material
    ids = [f"client-{i:02d}" for i in range(args.clients)]
    updates = {cid: lora_shaped_update(rng, args.layers, 576, 192, 8) for cid in ids}
    n_params = sum(v.size for v in updates[ids[0]].values())
    drop: dict[str, str] = {}
    if args.protocol == "masking" and args.clients >= 5:
        drop = {ids[1]: "share_keys", ids[2]: "unmask"}
    options: dict[str, Any] = {}
    if args.protocol == "masking":
        options = {"graph": args.graph, "clip": args.clip}
    print(f"fedcollm_secure demo: one secure aggregation round ({args.protocol})")
    print(f"  {args.clients} clients x {n_params:,} LoRA-shaped float32 parameters "
          f"({args.layers} layers); simulated dropouts: "
          + (", ".join(f"{c} at {s}" for c, s in drop.items()) or "none"))
    start = time.perf_counter()
    try:
        result = secure_sum(updates, protocol=args.protocol, threshold=args.threshold, drop=drop,
                            progress=_progress, **options)
    except FedCoLLMSecureError as exc:
        print(f"round aborted: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - start
    clip = args.clip if args.protocol == "masking" else np.inf
    max_err = max(
        float(np.abs(result.sum[k] - sum(np.clip(updates[c][k].astype(np.float64), -clip, clip)
                                          for c in result.survivors)).max())
        for k in result.sum)
    sent = result.stats.get("bytes_sent", {})
    per_client = [sum(sent[c].values()) for c in result.survivors if c in sent]
    report = {
        "protocol": result.protocol, "clients": args.clients, "parameters": int(n_params),
        "survivors": result.survivors, "dropped": result.dropped,
        "late_dropouts": result.stats.get("late_dropouts", []),
        "rejected": result.stats.get("rejected", {}),
        "max_abs_error_vs_plaintext": max_err,
        "error_bound": result.stats.get("params", {}).get("error_bound", 0.0),
        "params": result.stats.get("params", {}),
        "wall_seconds": wall, "stage_seconds": result.stats.get("stage_seconds", {}),
        "server_seconds": result.stats.get("server_seconds", {}),
        "mean_bytes_sent_per_client": float(np.mean(per_client)) if per_client else 0.0,
        "bytes_per_parameter": (float(np.mean(per_client)) / n_params) if per_client else 0.0,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print("report")
    late = report["late_dropouts"] or "none"
    print(f"  survivors ({len(result.survivors)}): inputs in the sum; "
          f"dropped: {result.dropped or 'none'}; late dropouts: {late}")
    print(f"  max |secure - plaintext| = {max_err:.3g} (bound {report['error_bound']:.3g})")
    print(f"  weight total {result.weight_total:.6g}; wall {wall:.2f} s; "
          f"{report['mean_bytes_sent_per_client'] / 1e6:.2f} MB sent per client "
          f"({report['bytes_per_parameter']:.2f} B/parameter)")
    for stage, secs in report["stage_seconds"].items():
        print(f"    {STAGE_LABELS.get(stage, stage):<15} {secs:7.3f} s")
    print(f"  written to {out / 'report.json'}")
    return 0


def cmd_aggregators(args: argparse.Namespace) -> int:
    import warnings

    for name in available_aggregators():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            agg = get_aggregator(name)
        note = "" if agg.secure else "  (INSECURE baseline)"
        print(f"{name:<12} stages: {', '.join(agg.stages)}{note}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedcollm-secure", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="run one secure aggregation round and write a report")
    d.add_argument("--clients", type=int, default=10)
    d.add_argument("--layers", type=int, default=30, help="adapter layers (30 = SmolLM2-135M)")
    d.add_argument("--protocol", default="masking", choices=available_aggregators())
    d.add_argument("--graph", default="complete", choices=["complete", "k_regular"])
    d.add_argument("--threshold", type=int, default=None)
    d.add_argument("--clip", type=float, default=1.0)
    d.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic updates")
    d.add_argument("--out", default="runs/demo")
    d.set_defaults(func=cmd_demo)
    a = sub.add_parser("aggregators", help="list registered aggregators")
    a.set_defaults(func=cmd_aggregators)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
