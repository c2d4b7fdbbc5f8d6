"""What the server sees: never an unmasked individual update.

Every message crossing the channel is recorded. No reply (or request) may contain a client's
update in the clear, its masked input must look uniformly random even when every input is
zero, and the unmask replies may only reveal self-mask (b) shares of nodes whose input was
counted and mask-key (s) shares of nodes that dropped before sending it.
"""

from __future__ import annotations

import base64
import math
from typing import Any

import numpy as np
import pytest

from fedcollm_secure.crypto import InsecureSeededRandomForTests, QuantizationSpec
from fedcollm_secure.secagg import TensorSpec, get_aggregator
from fedcollm_secure.transport import FaultPlan, InProcessChannel, drive
from fedcollm_secure.wire import decode


def seeded(seed: int) -> InsecureSeededRandomForTests:
    return InsecureSeededRandomForTests(seed, quiet=True)


def run_round(updates: dict[str, dict[str, Any]], *, seed: int, drop: dict[str, str] | None = None,
              threshold: int | None = None, protocol: str = "masking",
              **options: Any) -> tuple[Any, Any, list[tuple[str, str, str, bytes]]]:
    """One round driven by hand, so the server object can be inspected afterwards."""
    rng = seeded(seed)
    aggregator = get_aggregator(protocol, **options)
    session = rng.bytes(16)
    ids = sorted(updates)
    spec = TensorSpec.of(updates[ids[0]])
    clients = {cid: aggregator.client(cid, updates[cid], rng=rng, session=session, round_=0)
               for cid in ids}
    server = aggregator.server(ids, spec, threshold=threshold, rng=rng, session=session,
                               round_=0)
    channel = InProcessChannel(clients, FaultPlan(drop=dict(drop or {})))
    messages: list[tuple[str, str, str, bytes]] = []
    channel.observers.append(lambda s, c, d, b: messages.append((s, c, d, bytes(b))))
    return drive(server, channel), server, messages


def float_fingerprints(update: dict[str, np.ndarray]) -> set[bytes]:
    """Byte patterns that would betray the update: each element as float64/float32 in either
    byte order, and the tensors' raw bytes."""
    out = set()
    for arr in update.values():
        arr = np.asarray(arr, dtype=np.float64)
        for v in arr.reshape(-1):
            for dt in ("<f8", ">f8", "<f4", ">f4"):
                out.add(np.array(v, dtype=dt).tobytes())
        out.add(arr.astype("<f8").tobytes())
    return out


def leaks(update: dict[str, np.ndarray], data: bytes) -> list[bytes]:
    return [p for p in float_fingerprints(update) if p in data]


def ring_words(env_body: bytes, ring_bits: int = 32) -> np.ndarray:
    return np.frombuffer(env_body, dtype="<u4" if ring_bits <= 32 else "<u8")


def random_updates(n: int, size: int, seed: int) -> dict[str, dict[str, np.ndarray]]:
    gen = np.random.default_rng(seed)
    return {f"c{i}": {"w": gen.uniform(-3, 3, size).reshape(-1, 8),
                      "b": gen.uniform(-3, 3, 8).astype(np.float32)} for i in range(n)}


# --- nothing in the clear ------------------------------------------------------------------
def test_no_message_contains_the_raw_update() -> None:
    updates = random_updates(6, 128, seed=1)
    result, _, messages = run_round(updates, seed=2, drop={"c5": "masked_input"})
    assert len(result.survivors) == 5
    assert {m[2] for m in messages} == {"request", "reply"}
    for stage, cid, _direction, data in messages:
        for owner, update in updates.items():
            assert not leaks(update, data), f"{stage} message of {cid} carries {owner}'s update"


def test_the_leak_detector_finds_plaintext_updates() -> None:
    """Control: the same detector flags the plaintext aggregator (which sends updates in the
    clear), so the test above can fail."""
    updates = random_updates(3, 64, seed=1)
    with pytest.warns(UserWarning):
        _, _, messages = run_round(updates, seed=2, protocol="plaintext")
    for cid, update in updates.items():
        reply = next(m[3] for m in messages if m[1] == cid and m[2] == "reply")
        assert leaks(update, reply)


def test_masked_input_is_not_the_quantised_input() -> None:
    """Inputs on the grid of a power-of-two ``levels`` quantise deterministically, so each
    client's quantised vector is known exactly; its masked vector must share (almost) no
    element with it and must not correlate with it."""
    clip, levels, n, size = 4.0, 1 << 16, 6, 512
    gen = np.random.default_rng(3)
    updates = {f"c{i}": {"w": gen.integers(-levels, levels + 1, size) * (clip / levels)}
               for i in range(n)}
    result, server, messages = run_round(updates, seed=4, clip=clip, levels=levels)
    spec = QuantizationSpec(clip, 32, levels, n)
    for cid in result.survivors:
        q = spec.quantize(updates[cid]["w"])
        assert np.array_equal(spec.lift(q), np.rint(updates[cid]["w"] * levels / clip))
        reply = decode(next(m[3] for m in messages if m[:3] == ("masked_input", cid, "reply")))
        masked = ring_words(reply.body)
        assert masked.size == size + 1  # the weight travels last
        same = int(np.sum(masked[:-1] == q))
        assert same <= 2, f"{cid}: {same} masked elements equal the quantised input"
        r = np.corrcoef(masked[:-1].astype(np.float64), spec.lift(q).astype(np.float64))[0, 1]
        assert abs(r) < 5 / math.sqrt(size), f"{cid}: masked input correlates (r = {r:.3f})"
        # a shift by one common mask would keep differences; they must look random too
        assert len(np.unique((masked[:-1] - q).astype(np.uint32))) > size - 4


# --- uniformity ----------------------------------------------------------------------------
def bit_chi2(words: np.ndarray, bits: int = 32) -> float:
    """Chi-square (df = bits) of the per-bit-position counts of ones against n/2."""
    w = words.astype(np.uint64)
    ones = np.array([int(np.sum((w >> np.uint64(b)) & np.uint64(1))) for b in range(bits)])
    n = w.size
    return float(np.sum((ones - n / 2) ** 2 / (n / 4)))


def byte_chi2(words: np.ndarray) -> float:
    """Chi-square (df = 255) of the byte histogram against uniform."""
    data = np.frombuffer(words.astype("<u4").tobytes(), dtype=np.uint8)
    counts = np.bincount(data, minlength=256)
    expected = data.size / 256
    return float(np.sum((counts - expected) ** 2 / expected))


# df = 32: mean 32, sd 8; df = 255: mean 255, sd 22.6. Bounds at ~ +6 sd (the seed is fixed,
# so the test is deterministic; a real bias gives values in the thousands, see the control).
BIT_CHI2_MAX, BYTE_CHI2_MAX = 32 + 6 * 8, 255 + 6 * 22.6


@pytest.mark.parametrize("graph", ["complete", "k_regular"])
def test_masked_vectors_look_uniform_even_for_zero_inputs(graph: str) -> None:
    n, size = 10, 256
    updates = {f"c{i}": {"w": np.zeros(size)} for i in range(n)}
    result, _, messages = run_round(updates, seed=5, graph=graph, drop={"c3": "masked_input"})
    assert np.all(result.sum["w"] == 0)
    masked = np.stack([ring_words(decode(m[3]).body) for m in messages
                       if m[0] == "masked_input" and m[2] == "reply"])
    assert masked.shape == (n - 1, size + 1)
    words = masked.reshape(-1)
    assert bit_chi2(words) < BIT_CHI2_MAX
    assert byte_chi2(words) < BYTE_CHI2_MAX
    x = words.astype(np.float64) / 2.0**32
    se = 1 / math.sqrt(12 * x.size)  # standard error of the mean of U(0, 1)
    assert abs(x.mean() - 0.5) < 6 * se
    assert abs(x.var() - 1 / 12) < 0.01
    # no two clients' masked vectors share structure, and none is the zero input
    for i in range(len(masked)):
        assert np.count_nonzero(masked[i]) > size - 4
        for j in range(i):
            assert np.count_nonzero(masked[i] == masked[j]) <= 2
    # the sum of all masked inputs (what the server has before unmasking) is still masked
    total = np.sum(masked, axis=0, dtype=np.uint32)
    assert np.count_nonzero(total) > size - 4
    assert bit_chi2(total) < BIT_CHI2_MAX


def test_uniformity_checks_detect_structure() -> None:
    """Control: the statistics reject the quantised inputs and a weakly biased source."""
    gen = np.random.default_rng(0)
    assert bit_chi2(np.zeros(2570, dtype=np.uint32)) > 1000
    spec = QuantizationSpec(4.0, 32, (1 << 31) // 10, 10)
    q = spec.quantize(gen.normal(0, 0.01, 2570), seeded(1))  # typical update magnitudes
    assert byte_chi2(q) > BYTE_CHI2_MAX
    biased = gen.integers(0, 2**32, 2570, dtype=np.uint64).astype(np.uint32) | np.uint32(1 << 7)
    assert bit_chi2(biased) > BIT_CHI2_MAX
    assert byte_chi2(biased) > BYTE_CHI2_MAX


# --- what the unmask replies reveal --------------------------------------------------------
@pytest.mark.parametrize("graph,n,drop", [
    ("complete", 7, {"c1": "share_keys", "c4": "masked_input", "c6": "unmask"}),
    ("k_regular", 12, {"c02": "share_keys", "c05": "masked_input", "c07": "masked_input",
                       "c09": "unmask"}),
])
def test_unmask_reveals_b_shares_of_survivors_and_s_shares_of_the_dropped(
        graph: str, n: int, drop: dict[str, str]) -> None:
    width = len(str(n - 1)) if graph == "k_regular" else 1
    updates = {f"c{i:0{width}d}": {"w": np.full(4, i / n)} for i in range(n)}
    assert set(drop) <= set(updates)
    result, server, messages = run_round(updates, seed=6, graph=graph, drop=drop)
    assert result.stats["params"]["graph"] == graph
    counted = {server.node_of[c] for c in result.survivors}
    not_counted = set(server.ids) - counted
    assert {server.node_of[c] for c, s in drop.items() if s != "unmask"} == not_counted
    b_revealed: set[int] = set()
    s_revealed: set[int] = set()
    replies = [m for m in messages if m[0] == "unmask" and m[2] == "reply"]
    assert {m[1] for m in replies} == set(result.survivors) - set(result.stats["late_dropouts"])
    for _, cid, _, data in replies:
        u = server.node_of[cid]
        env = decode(data)
        b = {int(k) for k in env.fields["b_shares"]}
        s = {int(k) for k in env.fields["s_shares"]}
        holders_of = server.peers[u] | {u}  # nodes whose shares u holds
        assert b == holders_of & counted, cid
        assert s == holders_of - counted, cid
        assert not b & s
        b_revealed |= b
        s_revealed |= s
    # across all replies: the server never obtains both kinds of share for one node
    assert not b_revealed & s_revealed
    assert b_revealed <= counted and s_revealed <= not_counted
    assert set(server.revealed_b) <= counted and set(server.revealed_s) <= not_counted
    # a node that dropped before sharing keys has no shares anywhere to reveal
    early = {server.node_of[c] for c, s in drop.items() if s == "share_keys"}
    assert not early & (b_revealed | s_revealed)
    expected = sum(updates[c]["w"] for c in result.survivors)
    np.testing.assert_allclose(result.sum["w"], expected,
                               atol=result.stats["params"]["error_bound"])


def test_server_state_never_holds_an_unmasked_input() -> None:
    """Everything the server keeps after a round (masked vectors, sealed shares, commitments,
    revealed shares) is free of every client's raw update."""
    updates = random_updates(5, 64, seed=7)
    _, server, _ = run_round(updates, seed=8, drop={"c2": "masked_input"})
    assert server.masked_sum is not None
    blobs = [server.masked_sum.tobytes()]  # the only vector state the server keeps
    blobs += [base64.b64decode(ct) for sealed in server.sealed.values()  # kept as base64
              for ct in sealed.values()]
    blobs += list(server.commits.values())
    blobs += [sh.to_bytes() for d in (*server.revealed_b.values(), *server.revealed_s.values())
              for sh in d.values()]
    state = b"".join(blobs)
    assert len(state) > 1000
    for update in updates.values():
        assert not leaks(update, state)
