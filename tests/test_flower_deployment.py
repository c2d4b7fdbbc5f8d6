"""FedCoLLM over a real Flower deployment on loopback: SuperLink, three SuperNodes, a dropout.

The round's aggregate is checked against the in-process path for the same inputs: the
broadcast adapter the Flower server saved, the engine's own client shards, trainer and seeds,
and ``aggregate_deltas`` with the same dropout. Masks and stochastic rounding draw from
independent CSPRNGs on the two paths, so the sums agree within the quantisation bound.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("flwr", reason="flwr is not installed (the 'flower' extra)")
tomli_w = pytest.importorskip("tomli_w", reason="tomli_w (a flwr dependency) is missing")

from fedcollm_secure.transport.flower.loopback import (  # noqa: E402
    LoopbackFederation,
    tiny_run_config,
)
from fedcollm_secure.transport.flower.replay import update_from_bytes  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "flower" / "pyproject.toml"
BIN = Path(sys.executable).parent  # flower-superlink & co. sit next to the interpreter
TEST_BUDGET_S = 150.0  # watchdog: the whole test, processes included
DROP = 2  # partition id of the node killed after it sent its masked input
LORA = {"r": 4, "alpha": 8, "dropout": 0.0}

pytestmark = pytest.mark.skipif(not (BIN / "flower-superlink").exists(),
                                reason="flower-superlink is not next to the Python executable")


TEST_TIMEOUTS = {"flower.node_wait_timeout": 60.0, "flower.train_timeout": 90.0,
                 "flower.stage_timeout": 40.0, "flower.stage_timeouts.unmask": 15.0}


def write_app(app_dir: Path, run_config: dict[str, Any]) -> None:
    """The example's Flower app with ``run_config`` as its configuration."""
    project = tomllib.loads(EXAMPLE.read_text())
    project["tool"]["flwr"]["app"]["config"] = run_config
    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "pyproject.toml").write_text(tomli_w.dumps(project))


def progress(out: Path) -> list[dict[str, Any]]:
    path = out / "progress.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def in_process_sum(models: Path, run_config: dict[str, Any], theta: dict[str, np.ndarray],
                   drop: dict[str, str]) -> tuple[dict[str, np.ndarray], Any]:
    """The same round's aggregate computed in process by the engine's own pieces."""
    import torch

    from fedcollm_secure.cotuning import engine as engine_mod
    from fedcollm_secure.cotuning.server import aggregate_deltas
    from fedcollm_secure.cotuning.trainer import client_update
    from fedcollm_secure.transport.flower.config import fedcollm_config

    cfg = fedcollm_config(run_config)
    eng = engine_mod.FedCoLLM(cfg)
    theta_t = {n: torch.from_numpy(v.copy()) for n, v in theta.items()}
    deltas = {}
    for k, (cid, features) in enumerate(zip(eng.client_ids, eng.client_features, strict=True)):
        deltas[cid], _ = client_update(eng.slm, eng.tokenizer, theta_t, features, cfg.train,
                                       seed=engine_mod._seed(cfg.seed, 1, k))
    weights = eng._weights()
    _, result = aggregate_deltas(deltas, weights, protocol="masking", threshold=cfg.threshold,
                                 drop=drop, **cfg.resolved_aggregator_options())
    return result.sum, result


@pytest.fixture()
def watchdog() -> Any:
    """Fail (rather than hang) if the test outlives its budget: the federation fixture's
    ``finally`` then stops every process."""
    fired = threading.Event()
    timer = threading.Timer(TEST_BUDGET_S, fired.set)
    timer.daemon = True
    timer.start()
    yield fired
    timer.cancel()


def test_masking_round_on_a_loopback_deployment_survives_a_node_killed_after_masking(
        tmp_path: Path, watchdog: threading.Event) -> None:
    from fedcollm_secure.cotuning.models import save_tiny_model

    started = time.monotonic()
    models = tmp_path / "models"
    save_tiny_model(models / "llm", "llama", seed=3, hidden=48, layers=2)
    save_tiny_model(models / "slm", "llama", seed=4, hidden=32, layers=1)
    out = tmp_path / "out"
    run_config = tiny_run_config(models, out, overrides=TEST_TIMEOUTS)
    write_app(tmp_path / "app", run_config)

    dropped_id = f"client-{DROP}"
    theta_file = out / "round-1" / "theta.safetensors"
    reference: dict[str, Any] = {}

    def compute_reference() -> None:  # while the federation waits on its pollers
        try:
            theta = update_from_bytes(theta_file.read_bytes())
            reference["theta"] = theta
            reference["sum"], reference["result"] = in_process_sum(
                models, run_config, theta, {dropped_id: "unmask"})
        except Exception as exc:  # reported by the main thread
            reference["error"] = exc

    worker = threading.Thread(target=compute_reference, daemon=True)
    fed = LoopbackFederation(3, tmp_path / "fed", bin_dir=BIN)
    try:
        fed.start()
        submitted = fed.run_app(tmp_path / "app")
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        killed = False
        while True:
            if worker.ident is None and theta_file.exists():
                worker.start()
            if watchdog.is_set():
                pytest.fail(f"no result within {TEST_BUDGET_S:g} s; events: {progress(out)}; "
                            f"logs in {fed.logs}")
            events = progress(out)
            masked = [e for e in events if e.get("stage") == "masked_input"]
            if not killed and masked:
                assert masked[0]["received"] == 3, masked  # every node sent its masked input
                fed.kill_node(DROP)
                killed = True
            if any(e.get("event") == "done" for e in events):
                break
            if fed.superlink is not None and fed.superlink.poll() is not None:
                pytest.fail(f"the SuperLink exited; logs in {fed.logs}")
            time.sleep(0.05)
    finally:
        fed.stop()
    wall = time.monotonic() - started
    assert all(p is not None and p.poll() is not None for p in [*fed.nodes, fed.superlink])

    worker.join(timeout=max(1.0, TEST_BUDGET_S - (time.monotonic() - started)))
    assert "error" not in reference, reference.get("error")
    assert "result" in reference, "the in-process reference did not finish in time"
    rounds = json.loads((out / "rounds.json").read_text())
    assert len(rounds) == 1
    record = rounds[0]
    assert record["transport"] == "flower" and record["aggregator"].startswith("masking")
    assert set(record["nodes"]) == {"client-0", "client-1", "client-2"}
    # gone after its masked input: its update stays in the sum (self-mask rebuilt from shares)
    assert record["dropped"] == {}, record["dropped"]
    assert record["late_dropouts"] == [dropped_id]
    assert sorted(record["survivors"]) == ["client-0", "client-1", "client-2"]
    assert list(record["missing"]) == ["unmask"] and list(record["missing"]["unmask"]) == [
        dropped_id]

    flower_sum = update_from_bytes((out / "round-1" / "sum.safetensors").read_bytes())
    ref_sum, ref_result = reference["sum"], reference["result"]
    assert ref_result.dropped == {} and ref_result.stats["late_dropouts"] == [dropped_id]
    assert record["weight_total"] == pytest.approx(ref_result.weight_total, rel=1e-6)
    bound = ref_result.stats["params"]["error_bound"]
    assert bound == pytest.approx(record["error_bound"])
    assert 0 < bound < 1e-3
    assert set(flower_sum) == set(ref_sum)
    worst = max(float(np.max(np.abs(flower_sum[n].astype(np.float64) - ref_sum[n])))
                for n in ref_sum)
    scale = max(float(np.max(np.abs(ref_sum[n]))) for n in ref_sum)
    assert scale > 100 * bound  # the clients really trained: the sum is far from zero
    assert worst <= 2 * bound, (worst, bound)  # each path is within `bound` of the exact sum
    print(f"loopback deployment round: {wall:.1f} s wall (test total), max |diff| {worst:.3g}, "
          f"bound {bound:.3g}; stage seconds {record['stage_seconds']}")


def test_dpsgd_on_a_loopback_deployment_each_node_keeps_its_accountant_and_budget(
        tmp_path: Path, watchdog: threading.Event) -> None:
    """DP-SGD over Flower: every node plans and accounts its own DP-SGD (Opacus) and reports
    it; a budget that fits one round but not two makes every node refuse round 2 before
    training, and the server ends the run cleanly after round 1."""
    from fedcollm_secure.cotuning import engine as engine_mod
    from fedcollm_secure.cotuning.models import save_tiny_model
    from fedcollm_secure.privacy import compute_epsilon
    from fedcollm_secure.privacy.federation import plan_dpsgd
    from fedcollm_secure.transport.flower.config import fedcollm_config

    models = tmp_path / "models"
    save_tiny_model(models / "llm", "llama", seed=3, hidden=48, layers=2)
    save_tiny_model(models / "slm", "llama", seed=4, hidden=32, layers=1)
    out = tmp_path / "out"
    sigma, delta = 1.0, 1e-5
    run_config = tiny_run_config(models, out, overrides={
        **TEST_TIMEOUTS, "fedcollm.rounds": 2, "fedcollm.aggregator_options.clip": 4.0,
        "fedcollm.privacy.dpsgd.noise_multiplier": sigma,
        "fedcollm.privacy.dpsgd.epsilon_budget": 1e9})  # placeholder, set below
    cfg = fedcollm_config(run_config)
    eng = engine_mod.FedCoLLM(cfg)
    plans, one, two = {}, {}, {}
    for cid, features in zip(eng.client_ids, eng.client_features, strict=True):
        plans[cid] = plan_dpsgd(cfg.privacy.dpsgd,  # type: ignore[arg-type]
                                n_examples=len(features), batch_size=cfg.train.batch_size,
                                epochs=cfg.train.epochs, max_steps=cfg.train.max_steps,
                                rounds=2)
        _, q, steps = plans[cid]
        one[cid] = compute_epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps,
                                   delta=delta)
        two[cid] = compute_epsilon(noise_multiplier=sigma, sample_rate=q, steps=2 * steps,
                                   delta=delta)
    assert max(one.values()) < min(two.values())  # one budget: one round fits, two do not
    run_config["fedcollm.privacy.dpsgd.epsilon_budget"] = (max(one.values())
                                                          + min(two.values())) / 2
    write_app(tmp_path / "app", run_config)

    fed = LoopbackFederation(3, tmp_path / "fed", bin_dir=BIN)
    try:
        fed.start()
        submitted = fed.run_app(tmp_path / "app")
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        while not any(e.get("event") == "done" for e in progress(out)):
            if watchdog.is_set():
                pytest.fail(f"no result within {TEST_BUDGET_S:g} s; events: {progress(out)}; "
                            f"logs in {fed.logs}")
            if fed.superlink is not None and fed.superlink.poll() is not None:
                pytest.fail(f"the SuperLink exited; logs in {fed.logs}")
            time.sleep(0.05)
    finally:
        fed.stop()

    rounds = json.loads((out / "rounds.json").read_text())
    assert len(rounds) == 1  # round 2 never aggregated
    reports = rounds[0]["privacy"]["dpsgd"]
    assert sorted(reports) == ["client-0", "client-1", "client-2"]
    for cid, rep in reports.items():
        _, q, steps = plans[cid]
        assert rep["noise_multiplier"] == sigma and rep["sample_rate"] == pytest.approx(q)
        assert rep["steps"] == steps and rep["delta"] == delta
        assert rep["epsilon"] == pytest.approx(one[cid], rel=1e-6)
        assert rep["epsilon"] < rep["budget"] < two[cid]
    stopped = [e for e in progress(out) if e.get("event") == "stopped"]
    assert len(stopped) == 1 and stopped[0]["round"] == 2
    assert "PrivacyBudgetError" in stopped[0]["reason"]


def test_a_node_keeps_its_dpsgd_accountant_in_its_state_file_or_the_run_state(
        tmp_path: Path) -> None:
    from types import SimpleNamespace

    from flwr.app import Context, RecordDict

    from fedcollm_secure.errors import ConfigError, PrivacyBudgetError
    from fedcollm_secure.transport.flower.client_app import DP_RECORD, _ClientParts, _DPSGD
    from fedcollm_secure.transport.flower.config import fedcollm_config

    cfg = fedcollm_config(tiny_run_config(tmp_path / "models", tmp_path / "out", overrides={
        "fedcollm.rounds": 2, "fedcollm.privacy.dpsgd.noise_multiplier": 1.0,
        "fedcollm.privacy.dpsgd.epsilon_budget": 1e9}))
    parts = _ClientParts("client-0", 0, None, None, None, 16)
    ran = SimpleNamespace(steps=2, noise_multiplier=1.0, sample_rate=0.5)
    for node_config in ({"dp-state-file": str(tmp_path / "c0.json")}, {}):
        ctx = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(),
                      run_config={})
        dp = _DPSGD(cfg, ctx, parts)
        assert dp.args == (1.0, cfg.privacy.dpsgd.max_grad_norm)  # type: ignore[union-attr]
        dp.admit()
        first = dp.record(1, ran)["epsilon"]
        again = _DPSGD(cfg, ctx, parts)  # the next round's view: the saved accountant
        assert again.accountant.steps == 2 and again.accountant.epsilon() == first
        assert again.record(2, ran)["epsilon"] > first
        if node_config:
            assert DP_RECORD not in ctx.state.config_records  # the file, not the run state
            with pytest.raises(ConfigError, match="does not match"):  # another client's file
                _DPSGD(cfg, ctx, _ClientParts("client-1", 1, None, None, None, 16))
        else:
            assert DP_RECORD in ctx.state.config_records
    tight = fedcollm_config(tiny_run_config(tmp_path / "models", tmp_path / "out", overrides={
        "fedcollm.privacy.dpsgd.noise_multiplier": 1.0,
        "fedcollm.privacy.dpsgd.epsilon_budget": 1e-3}))
    with pytest.raises(PrivacyBudgetError):
        _DPSGD(tight, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(),
                              run_config={}), parts).admit()


def test_the_server_accepts_only_well_formed_dpsgd_reports() -> None:
    from fedcollm_secure.transport.flower.server_app import _dp_report

    good = {"noise_multiplier": 1.0, "sample_rate": 0.5, "max_grad_norm": 1.0,
            "delta": 1e-5, "epsilon": 2.5, "steps": 2, "budget": 4.0, "accountant": "rdp"}
    assert _dp_report(json.dumps(good)) == good
    assert _dp_report(json.dumps({**good, "budget": None})) is not None
    for bad in (None, b"{}", "not json", "[]", json.dumps({**good, "epsilon": -1.0}),
                json.dumps({**good, "epsilon": True}), json.dumps({**good, "steps": 1.5}),
                json.dumps({**good, "epsilon": float("nan")}), json.dumps({**good, "budget": 0}),
                json.dumps({k: v for k, v in good.items() if k != "delta"}),
                json.dumps({**good, "pad": "x" * 5000})):
        assert _dp_report(bad) is None, bad


def test_distributed_dp_on_a_loopback_deployment_sums_noised_integers(
        tmp_path: Path, watchdog: threading.Event) -> None:
    """Distributed DP over Flower: every node resolves the run's parameters itself, clips,
    rounds and noises its own delta, and masking sums the integers exactly. The decoded sum
    differs from the in-process sum of the clipped deltas by the provisioned noise of three
    clients (its empirical variance is checked) and nothing else."""
    import torch

    from fedcollm_secure.cotuning import engine as engine_mod
    from fedcollm_secure.cotuning.models import save_tiny_model
    from fedcollm_secure.cotuning.trainer import client_update
    from fedcollm_secure.privacy.ddp import exact_variance
    from fedcollm_secure.transport.flower.config import fedcollm_config

    models = tmp_path / "models"
    save_tiny_model(models / "llm", "llama", seed=3, hidden=48, layers=2)
    save_tiny_model(models / "slm", "llama", seed=4, hidden=32, layers=1)
    out = tmp_path / "out"
    run_config = tiny_run_config(models, out, overrides={
        **TEST_TIMEOUTS, "fedcollm.privacy.ddp.clip": 0.05,
        "fedcollm.privacy.ddp.noise_multiplier": 0.8, "fedcollm.privacy.ddp.min_survivors": 2})
    write_app(tmp_path / "app", run_config)
    fed = LoopbackFederation(3, tmp_path / "fed", bin_dir=BIN)
    try:
        fed.start()
        submitted = fed.run_app(tmp_path / "app")
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        while not any(e.get("event") == "done" for e in progress(out)):
            if watchdog.is_set():
                pytest.fail(f"no result within {TEST_BUDGET_S:g} s; events: {progress(out)}; "
                            f"logs in {fed.logs}")
            if fed.superlink is not None and fed.superlink.poll() is not None:
                pytest.fail(f"the SuperLink exited; logs in {fed.logs}")
            time.sleep(0.05)
    finally:
        fed.stop()

    record = json.loads((out / "rounds.json").read_text())[0]
    ddp = record["privacy"]["ddp"]
    assert ddp["survivors"] == 3 and ddp["releases"] == 1 and ddp["privacy_unit"] == "client"
    assert 0 < ddp["epsilon_cumulative"] == ddp["epsilon_round"] < float("inf")
    assert ddp["params"]["noise_multiplier"] == pytest.approx(0.8)
    assert record["weight_total"] == 3.0
    assert set(record["clients"]) == {"client-0", "client-1", "client-2"}
    assert all(r["ddp"]["sigma"] == ddp["params"]["sigma"] for r in record["clients"].values())

    # the same round in process: the engine's shards, trainer and seeds, clipped in L2
    cfg = fedcollm_config(run_config)
    eng = engine_mod.FedCoLLM(cfg)
    theta = update_from_bytes((out / "round-1" / "theta.safetensors").read_bytes())
    theta_t = {n: torch.from_numpy(v.copy()) for n, v in theta.items()}
    names = sorted(theta)
    exact = np.zeros(sum(theta[n].size for n in names))
    for k, features in enumerate(eng.client_features):
        delta, _ = client_update(eng.slm, eng.tokenizer, theta_t, features, cfg.train,
                                 seed=engine_mod._seed(cfg.seed, 1, k))
        x = np.concatenate([delta[n].double().numpy().ravel() for n in names])
        exact += x * min(1.0, 0.05 / float(np.linalg.norm(x)))
    got = update_from_bytes((out / "round-1" / "sum.safetensors").read_bytes())
    flat = np.concatenate([got[n].astype(np.float64).ravel() for n in names])
    noise = (flat - exact) / ddp["params"]["granularity"]  # integer units
    provisioned = 3 * float(exact_variance(ddp["params"]["sigma"]))
    ratio = float(np.var(noise)) / provisioned
    assert 0.8 < ratio < 1.2, (ratio, noise.size)
    assert abs(float(np.mean(noise))) < 5 * np.sqrt(provisioned / noise.size)


def test_integer_updates_travel_exactly_and_ddp_reports_are_checked() -> None:
    from fedcollm_secure.transport.flower.replay import update_to_bytes
    from fedcollm_secure.transport.flower.server_app import _ddp_report

    ints = np.array([-(1 << 40) - 1, 0, 7, (1 << 40) + 3], dtype=np.int64)
    back = update_from_bytes(update_to_bytes({"ddp": ints, "w": np.ones(2)}))
    assert back["ddp"].dtype == np.int64 and np.array_equal(back["ddp"], ints)
    assert back["w"].dtype == np.float32
    good = {"clipped": True, "norm": 0.3, "out_of_range": 0, "sigma": 12.5,
            "noise_multiplier": 0.8}
    assert _ddp_report(json.dumps(good)) == good
    for bad in (None, "{}", json.dumps({**good, "clipped": 1}),
                json.dumps({**good, "out_of_range": -1}), json.dumps({**good, "sigma": "x"}),
                json.dumps({**good, "norm": float("inf")})):
        assert _ddp_report(bad) is None, bad
