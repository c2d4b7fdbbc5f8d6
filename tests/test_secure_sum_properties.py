"""Property tests: the masked secure sum equals the plaintext sum of the survivors' updates.

* within the documented float bound (``stats["params"]["error_bound"]``) for arbitrary inputs,
  including values at and beyond the clip (which must be clipped);
* EXACTLY, when every input is an exact multiple of the quantisation step, so that stochastic
  rounding is deterministic and the ring sum can be predicted bit for bit;
* with dropouts injected at every stage, on complete and k-regular graphs, weighted or not;
* and a round left with fewer than ``threshold`` live clients raises ``ThresholdError``.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fedcollm_secure import secure_sum
from fedcollm_secure.errors import ConfigError, ThresholdError
from fedcollm_secure.secagg.masking import STAGES, MaskingConfig, RoundParams

# FCS_HYPOTHESIS_EXAMPLES=500 explores more (and randomly); the default run is deterministic.
_EXPLORE = int(os.environ.get("FCS_HYPOTHESIS_EXAMPLES", "0"))
FAST = settings(max_examples=_EXPLORE or 100, deadline=None, derandomize=not _EXPLORE,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.filter_too_much])

names = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)),
                min_size=1, max_size=6)


@st.composite
def tensor_shapes(draw: Any, max_elements: int = 64) -> dict[str, tuple[int, ...]]:
    """1-3 named tensors of 0-3 dims (size-0 dims included), <= max_elements in all."""
    k = draw(st.integers(1, 3))
    tensor_names = draw(st.lists(names, min_size=k, max_size=k, unique=True))
    shapes = {name: tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
              for name in tensor_names}
    assume(sum(math.prod(s) for s in shapes.values()) <= max_elements)
    return shapes


def special_values(clip: float) -> np.ndarray:
    return np.array([clip, -clip, 0.0, -0.0, clip * 1.5, -clip * 1.5, 1e6, -1e6,
                     np.nextafter(clip, np.inf), np.nextafter(-clip, -np.inf)])


def random_updates(shapes: dict[str, tuple[int, ...]], ids: list[str], clip: float,
                   seed: int) -> dict[str, dict[str, np.ndarray]]:
    """Uniform values on [-1.3 clip, 1.3 clip] with ~1/3 of them replaced by specials:
    exactly +-clip, (signed) zero and values beyond the clip."""
    gen = np.random.default_rng(seed)
    specials = special_values(clip)
    out = {}
    for cid in ids:
        upd = {}
        for name, shape in shapes.items():
            n = math.prod(shape)
            vals = gen.uniform(-1.3 * clip, 1.3 * clip, n)
            pick = gen.random(n) < 0.35
            vals[pick] = gen.choice(specials, int(pick.sum()))
            upd[name] = vals.reshape(shape)
        out[cid] = upd
    return out


def draw_drops(draw: Any, ids: list[str], max_drops: int) -> dict[str, str]:
    n_drops = draw(st.integers(0, max(0, min(max_drops, len(ids)))))
    who = draw(st.permutations(ids))[:n_drops]
    return {cid: draw(st.sampled_from(STAGES)) for cid in who}


def resolved(n: int, graph: str, degree: int | None, threshold: int | None,
             **options: Any) -> RoundParams:
    """The parameters the server will announce; combinations it refuses are not drawn."""
    try:
        return RoundParams.resolve(MaskingConfig(graph=graph, degree=degree, **options), n,
                                   threshold)
    except ConfigError:  # e.g. an explicit threshold below the k-regular share threshold
        assume(False)
        raise


def safe_drop_budget(params: RoundParams) -> int:
    """Dropouts (summed over all stages) that can never stop the round.

    Complete graph: the round completes iff n - drops >= threshold. k-regular graph: with at
    most degree - share_threshold dropouts every node keeps enough live neighbours to recover
    its secrets, and n - drops >= threshold keeps the global threshold.
    """
    global_budget = params.n_nodes - params.threshold
    if params.graph == "complete":
        return global_budget
    return min(global_budget, params.degree - params.share_threshold)


def check_membership(result: Any, ids: list[str], drops: dict[str, str]) -> None:
    before_unmask = {c: s for c, s in drops.items() if s != "unmask"}
    assert result.dropped == before_unmask
    assert set(result.survivors) == set(ids) - set(before_unmask)
    assert sorted(result.stats["late_dropouts"]) == sorted(
        c for c, s in drops.items() if s == "unmask")
    assert result.stats["rejected"] == {}


@st.composite
def rounds(draw: Any) -> dict[str, Any]:
    n = draw(st.integers(3, 20))
    ids = [f"client-{i:02d}" for i in range(n)]
    graph = draw(st.sampled_from(["complete", "k_regular"]))
    degree = None
    if graph == "k_regular" and n >= 6:
        degree = draw(st.sampled_from([None, 4]))
    threshold = draw(st.one_of(st.none(), st.integers(2, n)))
    params = resolved(n, graph, degree, threshold)
    drops = draw_drops(draw, ids, safe_drop_budget(params))
    clip = draw(st.sampled_from([4.0, 1.0, 0.3]))
    weights = None
    if draw(st.booleans()):
        weights = {cid: draw(st.one_of(st.just(0.0), st.floats(0.0, 3.0),
                                       st.sampled_from([1.0, 3.0]))) for cid in ids}
    return {"n": n, "ids": ids, "graph": graph, "degree": degree, "threshold": threshold,
            "drops": drops, "clip": clip, "weights": weights, "seed": draw(st.integers(0, 2**32)),
            "shapes": draw(tensor_shapes()), "ring_bits": draw(st.sampled_from([32, 32, 16, 64]))}


@FAST
@given(case=rounds())
def test_secure_sum_matches_clipped_plaintext_sum(case: dict[str, Any], make_rng: Any,
                                                  sums: Any) -> None:
    ids, clip, weights = case["ids"], case["clip"], case["weights"]
    updates = random_updates(case["shapes"], ids, clip, case["seed"])
    options: dict[str, Any] = {"graph": case["graph"], "clip": clip,
                               "ring_bits": case["ring_bits"]}
    if case["degree"] is not None:
        options["degree"] = case["degree"]
    result = secure_sum(updates, threshold=case["threshold"], weights=weights,
                        drop=case["drops"], rng=make_rng(case["seed"]), **options)

    check_membership(result, ids, case["drops"])
    expected = sums.expected(updates, result.survivors, clip=clip, weights=weights)
    bound = result.stats["params"]["error_bound"]
    assert 0 < bound
    assert sums.diff(result.sum, expected) <= bound
    for name, shape in case["shapes"].items():
        assert result.sum[name].shape == shape
    # the weight total: one quantum of max_weight/levels per contributor (= bound / clip)
    # (unweighted: the count of survivors, up to float rounding of levels * step)
    w_expected = math.fsum(1.0 if weights is None else weights[c] for c in result.survivors)
    assert abs(result.weight_total - w_expected) <= bound / clip
    if weights is None:
        assert round(result.weight_total) == len(result.survivors)


@st.composite
def exact_rounds(draw: Any) -> dict[str, Any]:
    n = draw(st.integers(3, 20))
    ids = [f"c{i:02d}" for i in range(n)]
    graph = draw(st.sampled_from(["complete", "k_regular"]))
    ring_bits = draw(st.sampled_from([8, 16, 32, 64]))
    # levels = 2**m with n * levels inside the ring; m <= 20 keeps y + u exact in float64
    max_m = min(20, ((1 << (ring_bits - 1)) - 1) // n).bit_length() - 1
    assume(max_m >= 2)
    m = draw(st.integers(2, max_m))
    params = resolved(n, graph, None, None, ring_bits=ring_bits, levels=1 << m)
    drops = draw_drops(draw, ids, safe_drop_budget(params))
    clip = draw(st.sampled_from([1.0, 4.0, 0.5]))
    weighted = draw(st.booleans())
    max_w = draw(st.sampled_from([1.0, 2.0, 0.25]))
    return {"n": n, "ids": ids, "graph": graph, "ring_bits": ring_bits, "levels": 1 << m,
            "drops": drops, "clip": clip, "weighted": weighted, "max_w": max_w,
            "shapes": draw(tensor_shapes()), "seed": draw(st.integers(0, 2**32))}


@FAST
@given(case=exact_rounds())
def test_ring_sum_is_exact_for_inputs_on_the_quantisation_grid(case: dict[str, Any],
                                                               make_rng: Any,
                                                               sums: Any) -> None:
    """Inputs k * step (plus values beyond the clip) quantise deterministically, so the
    decoded sum must equal the plaintext sum bit for bit: any mask left over, any wrong sign
    or any lost carry in the ring would show."""
    ids, clip, levels = case["ids"], case["clip"], case["levels"]
    gen = np.random.default_rng(case["seed"])
    weights = None
    max_w = 1.0
    if case["weighted"]:  # powers of two below max_weight keep w * k / max_w an integer
        max_w = case["max_w"]
        weights = {cid: float(max_w * gen.choice([0.0, 0.25, 0.5, 1.0])) for cid in ids}
        weights[ids[0]] = max_w
    step = clip / levels
    updates = {}
    for cid in ids:
        upd = {}
        for name, shape in case["shapes"].items():
            size = math.prod(shape)
            k = 4 * gen.integers(-(levels // 4), levels // 4 + 1, size)  # multiples of 4
            vals = k * step
            beyond = gen.random(size) < 0.2
            vals[beyond] = np.sign(gen.standard_normal(int(beyond.sum()))) * clip * 3
            upd[name] = vals.reshape(shape)
        updates[cid] = upd

    result = secure_sum(updates, weights=weights, drop=case["drops"], rng=make_rng(case["seed"]),
                        graph=case["graph"], clip=clip, ring_bits=case["ring_bits"],
                        levels=levels)
    check_membership(result, ids, case["drops"])
    assert result.stats["params"]["levels"] == levels
    expected = sums.expected(updates, result.survivors, clip=clip, weights=weights)
    for name in case["shapes"]:
        np.testing.assert_array_equal(result.sum[name], expected[name], strict=True)
    w_expected = math.fsum(1.0 if weights is None else weights[c] for c in result.survivors)
    assert result.weight_total == w_expected


@st.composite
def threshold_cases(draw: Any) -> dict[str, Any]:
    n = draw(st.integers(3, 12))
    ids = [f"c{i:02d}" for i in range(n)]
    graph = draw(st.sampled_from(["complete", "k_regular"]))
    threshold = draw(st.one_of(st.none(), st.integers(2, n)))
    drops = draw_drops(draw, ids, n)
    return {"ids": ids, "graph": graph, "threshold": threshold, "drops": drops,
            "seed": draw(st.integers(0, 2**32))}


@FAST
@given(case=threshold_cases())
def test_threshold_error_exactly_when_too_few_survive(case: dict[str, Any], make_rng: Any,
                                                     sums: Any) -> None:
    """Complete graph: the round completes iff n - dropouts >= t, else ThresholdError.
    k-regular graph: fewer than t live clients always aborts; a safe number of dropouts always
    completes; in between either outcome is allowed, but a completed sum must be right."""
    ids = case["ids"]
    n = len(ids)
    params = resolved(n, case["graph"], None, case["threshold"])
    updates = {cid: {"x": np.full(3, (i % 7) * 0.25 - 0.5)} for i, cid in enumerate(ids)}
    live = n - len(case["drops"])
    run = lambda: secure_sum(updates, threshold=case["threshold"], drop=case["drops"],  # noqa: E731
                             rng=make_rng(case["seed"]), graph=case["graph"])
    if live < params.threshold:
        with pytest.raises(ThresholdError):
            run()
        return
    if len(case["drops"]) <= safe_drop_budget(params):
        result = run()
    else:
        try:
            result = run()
        except ThresholdError:
            return
    assert len(result.survivors) >= params.threshold
    assert set(result.survivors) <= set(ids) - {c for c, s in case["drops"].items()
                                                if s != "unmask"}
    expected = sums.expected(updates, result.survivors, clip=4.0)
    assert sums.diff(result.sum, expected) <= result.stats["params"]["error_bound"]


def test_specials_are_clipped_not_wrapped(make_rng: Any, sums: Any) -> None:
    """Every special value in one round: +-clip, zeros, just beyond, far beyond."""
    clip = 4.0
    vals = special_values(clip)
    updates = {f"c{i}": {"v": np.roll(vals, i), "s": np.array(vals[i % vals.size])}
               for i in range(5)}
    result = secure_sum(updates, rng=make_rng(3), drop={"c4": "share_keys"})
    expected = sums.expected(updates, result.survivors, clip=clip)
    assert sums.diff(result.sum, expected) <= result.stats["params"]["error_bound"]
    # far beyond the clip must not leak through (1e6 would dominate any wrap-around)
    assert np.abs(result.sum["v"]).max() <= clip * len(result.survivors) + 1e-6
    assert result.sum["s"].shape == ()


@pytest.mark.parametrize("ring_bits", [32, 48])
def test_long_vectors_decode_piece_by_piece_into_the_result_buffer(ring_bits: int,
                                                                   make_rng: Any,
                                                                   sums: Any) -> None:
    """Vectors of several keystream pieces (2^16 words each): the server decodes each unmasked
    piece into the float64 result whose tail holds the running sum (32- and 64-bit words)."""
    ids = ["a", "b", "c", "d", "e"]
    shapes = {"w": (3, 70_001), "b": (5,)}  # 210,008 elements: four pieces, a short last one
    updates = random_updates(shapes, ids, 2.0, 11)
    result = secure_sum(updates, threshold=3, drop={"d": "unmask", "c": "masked_input"},
                        rng=make_rng(11), clip=2.0, ring_bits=ring_bits)
    expected = sums.expected(updates, result.survivors, clip=2.0, weights=None)
    assert sums.diff(result.sum, expected) <= result.stats["params"]["error_bound"]
    assert sorted(result.survivors) == ["a", "b", "d", "e"]
    assert result.weight_total == pytest.approx(4)
    assert {n: v.shape for n, v in result.sum.items()} == shapes
