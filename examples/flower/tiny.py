"""One FedCoLLM round with tiny random models: in process, on Flower's simulation engine, or
on a loopback deployment (a real SuperLink and SuperNodes on 127.0.0.1, INSECURE).

    python examples/flower/tiny.py inprocess
    python examples/flower/tiny.py simulation
    python examples/flower/tiny.py deployment
    python examples/flower/tiny.py deployment --aggregator ckks   # + a key-authority node

The Flower modes copy this directory's ``pyproject.toml`` with the tiny run config below into
``<workdir>/app`` and submit it with ``flwr run``; every process started is stopped at the
end. Prints one JSON line: wall seconds of the round (server view: from sending ``train``
to the aggregated, distilled adapter) and end to end (from submission to the end of the run).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def run_config(models: Path, out: Path, aggregator: str = "masking") -> dict[str, Any]:
    from fedcollm_secure.transport.flower.loopback import tiny_run_config

    return tiny_run_config(models, out, aggregator=aggregator)


def node_configs(aggregator: str, work: Path) -> list[dict[str, Any]] | None:
    """For ckks: three client nodes that pin the key authority's public key, and the
    key-authority node with its identity file and decryption log."""
    if aggregator != "ckks":
        return None
    from fedcollm_secure.identity import KEY_AUTHORITY_NAME, Identity

    authority = Identity.generate(KEY_AUTHORITY_NAME)
    key_file = work / "authority.key"
    authority.save(key_file)  # mode 0600, on the authority's machine only
    clients: list[dict[str, Any]] = [
        {"partition-id": k, "num-partitions": 3,
         "ckks-authority-key": authority.public_key.hex()} for k in range(3)]
    return [*clients, {"fedcollm-role": "key-authority", "identity-file": str(key_file),
                       "ckks-decryption-log": str(work / "decryptions.jsonl")}]


def tiny_models(models: Path) -> None:
    from fedcollm_secure.cotuning.models import save_tiny_model

    if not (models / "slm").exists():
        save_tiny_model(models / "llm", "llama", seed=3, hidden=48, layers=2)
        save_tiny_model(models / "slm", "llama", seed=4, hidden=32, layers=1)


def inprocess(cfg_flat: dict[str, Any]) -> dict[str, Any]:
    from fedcollm_secure.cotuning.engine import FedCoLLM
    from fedcollm_secure.transport.flower.config import fedcollm_config

    start = time.perf_counter()
    engine = FedCoLLM(fedcollm_config(cfg_flat))
    loaded = time.perf_counter()
    record = engine.run_round(1)
    end = time.perf_counter()
    return {"mode": "inprocess", "aggregator": cfg_flat["fedcollm.aggregator"],
            "round_s": round(end - loaded, 2),
            "end_to_end_s": round(end - start, 2), "survivors": record["survivors"],
            "round_phases_s": {k: round(v, 2) for k, v in record["seconds"].items()}}


def flower(mode: str, cfg_flat: dict[str, Any], work: Path) -> dict[str, Any]:
    aggregator = str(cfg_flat["fedcollm.aggregator"])
    if aggregator == "ckks" and mode == "simulation":
        raise SystemExit("ckks needs a key-authority SuperNode; the simulation engine cannot "
                         "give a simulated node that role (use the deployment mode)")
    import tomli_w

    from fedcollm_secure.transport.flower.loopback import LoopbackFederation

    project = tomllib.loads((HERE / "pyproject.toml").read_text())
    project["tool"]["flwr"]["app"]["config"] = cfg_flat
    (work / "app").mkdir(parents=True, exist_ok=True)
    (work / "app" / "pyproject.toml").write_text(tomli_w.dumps(project))
    out = Path(cfg_flat["flower.output_dir"])
    nodes = node_configs(aggregator, work)
    fed = LoopbackFederation(len(nodes) if nodes else 3, work / "fed", node_configs=nodes,
                             simulation=mode == "simulation")
    try:
        fed.start()
        start = time.time()
        submitted = fed.run_app(work / "app")
        if submitted.returncode != 0:
            raise SystemExit(submitted.stdout + submitted.stderr)
        events: list[dict[str, Any]] = []
        while time.time() - start < 900:
            path = out / "progress.jsonl"
            events = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
            if any(e["event"] == "done" for e in events):
                break
            time.sleep(0.2)
        else:
            raise SystemExit(f"no result after 900 s; logs in {fed.logs}")
    finally:
        fed.stop()
    sent = next(e["time"] for e in events if e.get("stage") == "train" and "phase" in e)
    rnd = next(e for e in events if e["event"] == "round")
    done = next(e["time"] for e in events if e["event"] == "done")
    record = json.loads((out / "rounds.json").read_text())[0]
    extra = {"ckks": record["ckks"]} if "ckks" in record else {}
    return {"mode": mode, "aggregator": aggregator, **extra,
            "round_s": round(rnd["time"] - sent, 2),
            "end_to_end_s": round(done - start, 2), "survivors": record["survivors"],
            "round_phases_s": {k: round(v, 2) for k, v in record["seconds"].items()},
            "stage_s": {k: round(v, 2) for k, v in record["stage_seconds"].items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["inprocess", "simulation", "deployment"])
    parser.add_argument("--workdir", default="runs/flower-tiny")
    parser.add_argument("--aggregator", choices=["masking", "ckks"], default="masking")
    args = parser.parse_args()
    work = Path(args.workdir).resolve() / f"{args.mode}-{args.aggregator}"
    shutil.rmtree(work, ignore_errors=True)
    models = Path(args.workdir).resolve() / "models"
    tiny_models(models)
    work.mkdir(parents=True, exist_ok=True)
    cfg = run_config(models, work / "out", args.aggregator)
    result = inprocess(cfg) if args.mode == "inprocess" else flower(args.mode, cfg, work)
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
