"""The contract every registered aggregator must meet.

Parametrised over ``available_aggregators()`` at collection time, so an aggregator that is
registered later is tested here without any change. Stage names come from each aggregator's
``.stages``; whether it must warn comes from its ``.secure`` flag. Precision: an aggregator
documents its float error in ``stats["params"]["error_bound"]``; one that documents none must
be exact (inputs here are dyadic, so an exact sum does not depend on the order of addition).
Every aggregator must work with its default options and record a refused client's typed
error in ``stats["rejected"]``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pytest
import torch

from fedcollm_secure import available_aggregators, get_aggregator, secure_sum
from fedcollm_secure.crypto import InsecureSeededRandomForTests
from fedcollm_secure.errors import (
    AggregatorNotFoundError,
    ConfigError,
    ThresholdError,
    UpdateValidationError,
)
from fedcollm_secure.secagg import Aggregator, TensorSpec
from fedcollm_secure.secagg.plaintext import InsecureAggregationWarning
from fedcollm_secure.transport import InProcessChannel, drive

pytestmark = pytest.mark.filterwarnings("ignore::fedcollm_secure.secagg.plaintext."
                                        "InsecureAggregationWarning")


def make(name: str, **options: Any) -> tuple[Aggregator, list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        aggregator = get_aggregator(name, **options)
    return aggregator, list(caught)


NAMES = available_aggregators()
STAGE_CASES = [(name, stage) for name in NAMES for stage in make(name)[0].active_stages()]
IDS = ["alice", "bob", "carol", "dave", "erin"]


def rng(seed: int = 0) -> InsecureSeededRandomForTests:
    return InsecureSeededRandomForTests(seed, quiet=True)


def dyadic_updates(ids: list[str] = IDS, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Multiples of 2**-10 in [-1, 1]: float sums of these are exact in any order."""
    gen = np.random.default_rng(seed)
    def draw(*shape: int) -> np.ndarray:
        return gen.integers(-1024, 1025, shape) / 1024.0
    return {cid: {"layer.0.lora_A": draw(3, 4), "layer.0.lora_B": draw(4, 3), "bias": draw(5),
                  "scale": np.asarray(draw(1)[0])} for cid in ids}


def weighted_sum(updates: dict[str, dict[str, Any]], survivors: list[str],
                 weights: dict[str, float] | None = None) -> dict[str, np.ndarray]:
    first = updates[survivors[0]]
    return {name: sum((np.asarray(updates[c][name], dtype=np.float64)
                       * (1.0 if weights is None else weights[c]) for c in survivors),
                      np.zeros(np.shape(first[name])))
            for name in first}


def bound_of(result: Any) -> float:
    return float(result.stats.get("params", {}).get("error_bound", 0.0))


def assert_sum(result: Any, expected: dict[str, np.ndarray]) -> None:
    bound = bound_of(result)
    assert set(result.sum) == set(expected)
    for name, arr in expected.items():
        got = result.sum[name]
        assert isinstance(got, np.ndarray) and got.shape == arr.shape, name
        assert np.issubdtype(got.dtype, np.floating), (name, got.dtype)
        if bound == 0.0:
            np.testing.assert_array_equal(got, arr)
        else:
            assert float(np.max(np.abs(got - arr), initial=0.0)) <= bound, name


def assert_membership(result: Any, ids: list[str], drops: dict[str, str]) -> None:
    """Survivors are the clients whose input is in the sum; the others are in ``dropped``
    with the stage where they vanished. A client lost after its input was counted may
    appear as a survivor listed in ``stats["late_dropouts"]``."""
    assert set(result.survivors).isdisjoint(result.dropped)
    assert set(result.survivors) | set(result.dropped) == set(ids)
    late = set(result.stats.get("late_dropouts", []))
    assert late <= set(result.survivors)
    for cid in ids:
        if cid in drops:
            assert result.dropped.get(cid) == drops[cid] or cid in late, cid
        else:
            assert cid in result.survivors and cid not in late, cid


def run(name: str, updates: dict[str, dict[str, Any]] | None = None, **kw: Any) -> Any:
    return secure_sum(dyadic_updates() if updates is None else updates, protocol=name,
                      rng=rng(kw.pop("seed", 1)), **kw)


# --- registry and flags --------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_registered_aggregator_is_well_formed(name: str) -> None:
    aggregator, _ = make(name)
    assert aggregator.name == name
    assert isinstance(aggregator.secure, bool)
    assert isinstance(aggregator.stages, tuple) and aggregator.stages
    assert all(isinstance(s, str) and s for s in aggregator.stages)
    assert len(set(aggregator.stages)) == len(aggregator.stages)


@pytest.mark.parametrize("name", NAMES)
def test_insecure_aggregators_warn_and_secure_ones_do_not(name: str) -> None:
    aggregator, caught = make(name)
    insecure = [w for w in caught if issubclass(w.category, InsecureAggregationWarning)]
    if aggregator.secure:
        assert not insecure
    else:
        assert insecure and name in str(insecure[0].message)


def test_plaintext_is_marked_insecure_and_warns() -> None:
    assert "plaintext" in NAMES and "masking" in NAMES
    with pytest.warns(InsecureAggregationWarning, match="INSECURE"):
        aggregator = get_aggregator("plaintext")
    assert aggregator.secure is False
    with pytest.warns(InsecureAggregationWarning):
        secure_sum(dyadic_updates(), protocol="plaintext")
    assert make("masking")[0].secure is True


def test_unknown_aggregator_name() -> None:
    with pytest.raises(AggregatorNotFoundError, match="no-such-aggregator"):
        get_aggregator("no-such-aggregator")
    with pytest.raises(KeyError):
        get_aggregator("")
    with pytest.raises(AggregatorNotFoundError):
        secure_sum(dyadic_updates(), protocol="Masking")


@pytest.mark.parametrize("name", NAMES)
def test_unknown_drop_stage_is_a_config_error(name: str) -> None:
    with pytest.raises(ConfigError, match="unknown stage"):
        run(name, drop={"bob": "not-a-stage"})


# --- correctness -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_sum_is_correct(name: str) -> None:
    updates = dyadic_updates(seed=2)
    result = run(name, updates)
    assert result.protocol == name
    assert sorted(result.survivors) == sorted(IDS) and result.dropped == {}
    assert_sum(result, weighted_sum(updates, IDS))
    assert result.weight_total == pytest.approx(len(IDS), abs=bound_of(result))
    mean = result.mean()
    for k, v in result.sum.items():
        np.testing.assert_array_equal(mean[k], v / result.weight_total)


@pytest.mark.parametrize("name", NAMES)
def test_weighted_sum_and_weight_total(name: str) -> None:
    updates = dyadic_updates(seed=3)
    weights = {"alice": 0.5, "bob": 2.0, "carol": 0.0, "dave": 1.25, "erin": 3.0}
    result = run(name, updates, weights=weights)
    assert_sum(result, weighted_sum(updates, IDS, weights))
    assert abs(result.weight_total - sum(weights.values())) <= bound_of(result)
    unweighted = run(name, updates)
    assert abs(result.weight_total - unweighted.weight_total) > 1.0  # weights were applied


@pytest.mark.parametrize("name,stage", STAGE_CASES)
def test_dropout_at_each_stage(name: str, stage: str) -> None:
    updates = dyadic_updates(seed=4)
    drops = {"carol": stage}
    result = run(name, updates, drop=drops)
    assert_membership(result, IDS, drops)
    assert_sum(result, weighted_sum(updates, result.survivors))
    assert len(result.survivors) >= len(IDS) - 1


@pytest.mark.parametrize("name,stage", STAGE_CASES)
def test_below_threshold_raises(name: str, stage: str) -> None:
    with pytest.raises(ThresholdError):
        run(name, threshold=len(IDS), drop={"dave": stage})


# --- validation ------------------------------------------------------------------------------
MISMATCHES = {
    "shape": lambda u: {**u, "bias": np.zeros(6)},
    "transposed": lambda u: {**u, "layer.0.lora_A": u["layer.0.lora_A"].T},
    "extra tensor": lambda u: {**u, "extra": np.zeros(2)},
    "missing tensor": lambda u: {k: v for k, v in u.items() if k != "bias"},
    "renamed tensor": lambda u: {("Bias" if k == "bias" else k): v for k, v in u.items()},
    "scalar vs vector": lambda u: {**u, "scale": np.zeros(1)},
}


@pytest.mark.parametrize("case", sorted(MISMATCHES))
@pytest.mark.parametrize("name", NAMES)
def test_mismatched_updates_are_refused_by_the_api(name: str, case: str) -> None:
    updates = dyadic_updates()
    updates["dave"] = MISMATCHES[case](updates["dave"])
    with pytest.raises(UpdateValidationError, match="dave"):
        run(name, updates)


def drive_with_one_bad_client(name: str, bad_update: dict[str, Any]) -> Any:
    """Endpoints used directly: the server announces the common spec, one client holds an
    update that does not fit it. It must be refused with UpdateValidationError."""
    aggregator, _ = make(name)
    updates = dyadic_updates(seed=5)
    source = rng(9)
    session = source.bytes(16)
    spec = TensorSpec.of(updates["alice"])
    clients = {cid: aggregator.client(cid, bad_update if cid == "bob" else updates[cid],
                                      rng=source, session=session, round_=0) for cid in IDS}
    server = aggregator.server(IDS, spec, rng=source, session=session, round_=0)
    result = drive(server, InProcessChannel(clients))
    assert "bob" not in result.survivors and "bob" in result.dropped
    assert "UpdateValidationError" in result.stats["rejected"]["bob"]
    assert_sum(result, weighted_sum(updates, result.survivors))
    return result


@pytest.mark.parametrize("case", sorted(MISMATCHES))
@pytest.mark.parametrize("name", NAMES)
def test_mismatched_update_is_refused_by_the_client_endpoint(name: str, case: str) -> None:
    drive_with_one_bad_client(name, MISMATCHES[case](dyadic_updates(seed=5)["bob"]))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("name", NAMES)
def test_non_finite_updates_are_refused(name: str, bad: float) -> None:
    updates = dyadic_updates()
    updates["erin"]["layer.0.lora_B"][2, 1] = bad
    with pytest.raises(UpdateValidationError, match="NaN or infinite"):
        run(name, updates)
    bob = dyadic_updates(seed=5)["bob"]
    bob["scale"] = np.asarray(bad)
    drive_with_one_bad_client(name, bob)


@pytest.mark.parametrize("name", NAMES)
def test_non_finite_torch_update_is_refused(name: str) -> None:
    updates: dict[str, Any] = {c: {"w": torch.zeros(4)} for c in IDS}
    updates["alice"] = {"w": torch.tensor([0.0, float("nan"), 0.0, 0.0])}
    with pytest.raises(UpdateValidationError):
        run(name, updates)


# --- torch input, shapes, dtypes -----------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", NAMES)
def test_torch_tensors_are_accepted(name: str, dtype: torch.dtype) -> None:
    updates = {c: {k: torch.tensor(v, dtype=dtype, requires_grad=True) for k, v in u.items()}
               for c, u in dyadic_updates(seed=6).items()}
    # the values the tensors hold (bfloat16 rounds some of them), as float64
    held = {c: {k: v.detach().double().numpy() for k, v in u.items()} for c, u in updates.items()}
    result = run(name, updates, drop={"erin": make(name)[0].stages[0]})
    assert_sum(result, weighted_sum(held, result.survivors))
    for k, v in updates["alice"].items():
        assert result.sum[k].shape == tuple(v.shape)


@pytest.mark.parametrize("name", NAMES)
def test_result_shapes_and_names_follow_the_input(name: str) -> None:
    shapes = {"scalar": (), "vector": (7,), "matrix": (2, 3), "cube": (2, 1, 3), "empty": (0, 4)}
    gen = np.random.default_rng(7)
    updates = {c: {k: gen.integers(-64, 65, s) / 64.0 for k, s in shapes.items()} for c in IDS}
    result = run(name, updates)
    assert set(result.sum) == set(shapes)
    for k, s in shapes.items():
        assert result.sum[k].shape == s
    assert_sum(result, weighted_sum(updates, IDS))


# --- statistics ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_stats_report_bytes_and_seconds(name: str) -> None:
    stages = make(name)[0].active_stages()
    dropped_at = stages[-1]
    result = run(name, drop={"bob": dropped_at})
    stats = result.stats
    assert set(stats["bytes_sent"]) == set(IDS)
    for cid in IDS:
        expected_stages = set(stages) if cid != "bob" else set(stages[:stages.index(dropped_at)])
        assert set(stats["bytes_sent"][cid]) == expected_stages, cid
        assert all(isinstance(b, int) and b > 0 for b in stats["bytes_sent"][cid].values())
    assert set(stats["server_seconds"]) == set(stages)
    assert all(isinstance(t, float) and t >= 0 for t in stats["server_seconds"].values())
    # more data, more bytes: the per-stage counts measure the messages
    big = {c: {"w": np.zeros(4096)} for c in IDS}
    small = {c: {"w": np.zeros(4)} for c in IDS}
    sent_big = run(name, big).stats["bytes_sent"]["alice"]
    sent_small = run(name, small).stats["bytes_sent"]["alice"]
    assert sum(sent_big.values()) > sum(sent_small.values()) + 4096
