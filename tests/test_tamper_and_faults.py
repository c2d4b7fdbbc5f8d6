"""Tampering, replay, time-outs and dropouts through ``secure_sum`` and the in-process channel.

The rule: a round either completes with the EXACT sum over the clients whose input it
counted (a tampered client is treated as dropped, with its typed error recorded in
``stats["rejected"]``), or raises a typed error. Never a silently wrong sum.

Inputs lie on the quantisation grid of a power-of-two ``levels``, so the expected sum is
exact and any stray mask, sign or share error shows as a mismatch.
"""

from __future__ import annotations

import base64
import functools
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from fedcollm_secure import errors, secure_sum
from fedcollm_secure.crypto import InsecureSeededRandomForTests
from fedcollm_secure.errors import FedCoLLMSecureError, ThresholdError
from fedcollm_secure.secagg.masking import STAGES
from fedcollm_secure.transport import FaultPlan, InProcessChannel, Tamper, drive, flip_bit
from fedcollm_secure.wire import PREFIX, decode

CLIP, LEVELS = 4.0, 1 << 16
OPTIONS = {"clip": CLIP, "levels": LEVELS}
TYPED = {name for name in dir(errors) if name.endswith("Error")}
IDS = [f"c{i}" for i in range(5)]


def grid_updates(ids: list[str], seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    gen = np.random.default_rng(seed)
    step = CLIP / LEVELS
    return {cid: {"a": gen.integers(-LEVELS, LEVELS + 1, (3, 4)) * step,
                  "b": gen.integers(-LEVELS, LEVELS + 1, 5) * step} for cid in ids}


UPDATES = grid_updates(IDS)


def exact(updates: dict[str, dict[str, np.ndarray]], survivors: list[str]) -> dict[str, Any]:
    return {name: sum((updates[c][name] for c in survivors), np.zeros_like(arr))
            for name, arr in updates[survivors[0]].items()}


def assert_exact(result: Any, updates: dict[str, dict[str, np.ndarray]] = UPDATES) -> None:
    expected = exact(updates, result.survivors)
    for name, arr in expected.items():
        np.testing.assert_array_equal(result.sum[name], arr, strict=True)
    assert result.weight_total == len(result.survivors)


def run(faults: FaultPlan | None = None, *, seed: int = 1, observers: tuple[Any, ...] = (),
        updates: dict[str, dict[str, np.ndarray]] = UPDATES, **kw: Any) -> Any:
    options = {**OPTIONS, **kw}
    return secure_sum(updates, rng=InsecureSeededRandomForTests(seed, quiet=True), faults=faults,
                      observers=observers, **options)


def rejected_as(result: Any, cid: str, stage: str) -> str:
    """``cid`` was rejected at ``stage`` with a typed error; return the error names recorded."""
    reason = result.stats["rejected"][cid]
    assert reason.startswith(f"{stage}: "), reason
    named = {w.strip(":,") for w in reason.split()} & TYPED
    assert named, f"no typed error named in {reason!r}"
    if stage == "unmask":
        assert cid in result.survivors and cid in result.stats["late_dropouts"]
        assert cid not in result.dropped
    else:
        assert result.dropped.get(cid) == stage and cid not in result.survivors
    return reason


def completes_exactly_or_raises_typed(faults: FaultPlan, **kw: Any) -> Any:
    try:
        result = run(faults, **kw)
    except FedCoLLMSecureError:
        return None
    assert_exact(result)
    return result


@functools.cache
def baseline() -> dict[tuple[str, str, str], bytes]:
    """Every message of an untampered round: (stage, client, direction) -> bytes."""
    seen: dict[tuple[str, str, str], bytes] = {}
    run(observers=(lambda s, c, d, b: seen.__setitem__((s, c, d), bytes(b)),))
    return seen


def _region_offset(data: bytes, region: str) -> int:
    hlen = int.from_bytes(data[5:9], "big")
    blen = int.from_bytes(data[9:17], "big")
    body = PREFIX.size + hlen
    return {"magic": 0, "version": 3, "flags": 4, "header length": 8, "body length": 16,
            "header start": PREFIX.size, "header middle": PREFIX.size + hlen // 2,
            "header end": body - 1, "body start": body if blen else body - 2,
            "body end": body + blen - 1 if blen else body - 3, "signature start": len(data) - 64,
            "signature end": len(data) - 1}[region]


REGIONS = ["magic", "version", "flags", "header length", "body length", "header start",
           "header middle", "header end", "body start", "body end", "signature start",
           "signature end"]


# --- bit flips in replies ------------------------------------------------------------------
@pytest.mark.parametrize("region", REGIONS)
@pytest.mark.parametrize("stage", STAGES)
def test_bit_flip_in_a_reply_rejects_that_client(stage: str, region: str) -> None:
    reply = baseline()[(stage, "c1", "reply")]
    offset = _region_offset(reply, region)
    for bit in (0, 6):
        plan = FaultPlan(tamper=[Tamper("c1", stage, "reply", flip_bit(offset, bit))])
        result = completes_exactly_or_raises_typed(plan)
        assert result is not None, "one rejected client of five must not stop the round"
        rejected_as(result, "c1", stage)
        assert set(result.stats["rejected"]) == {"c1"}


@pytest.mark.parametrize("stage", STAGES)
def test_random_bit_flips_in_replies_never_give_a_wrong_sum(stage: str) -> None:
    gen = random.Random(f"reply-{stage}")
    size = len(baseline()[(stage, "c3", "reply")])
    for _ in range(25):
        offset, bit = gen.randrange(size), gen.randrange(8)
        plan = FaultPlan(tamper=[Tamper("c3", stage, "reply", flip_bit(offset, bit))])
        result = completes_exactly_or_raises_typed(plan)
        assert result is not None
        rejected_as(result, "c3", stage)


# --- bit flips in forwarded shares (request direction) -------------------------------------
def flip_share(sender: int, byte: int, bit: int = 0) -> Callable[[bytes], bytes]:
    def edit(data: bytes) -> bytes:
        env = decode(data)
        raw = bytearray(base64.b64decode(env.fields["shares"][str(sender)]))
        raw[byte] ^= 1 << bit
        env.fields["shares"][str(sender)] = base64.b64encode(bytes(raw)).decode()
        return env.encode()
    return edit


@pytest.mark.parametrize("byte", [0, 20, 100, -1])
def test_bit_flip_in_a_forwarded_share_drops_the_receiver(byte: int) -> None:
    # c1 is node 2; the share node 4 sealed for it is altered on the way
    plan = FaultPlan(tamper=[Tamper("c1", "masked_input", "request", flip_share(4, byte, 3))])
    result = completes_exactly_or_raises_typed(plan)
    assert result is not None
    assert "DecryptionError" in rejected_as(result, "c1", "masked_input")


@pytest.mark.parametrize("stage", ["share_keys", "masked_input", "unmask"])
def test_random_bit_flips_in_requests_never_give_a_wrong_sum(stage: str) -> None:
    """Requests are unsigned: a flipped bit must still end in a refusal, a harmless change
    (e.g. hex case in the session) or a typed error."""
    gen = random.Random(f"request-{stage}")
    size = len(baseline()[(stage, "c2", "request")])
    for _ in range(25):
        offset, bit = gen.randrange(size), gen.randrange(8)
        plan = FaultPlan(tamper=[Tamper("c2", stage, "request", flip_bit(offset, bit))])
        completes_exactly_or_raises_typed(plan)


def test_flip_turning_a_share_map_key_into_another_peers_key() -> None:
    """``{"1": s1, "3": s3}`` with one bit flipped reads ``{"3": s1, "3": s3}``: a decoder
    that kept the last duplicate would make c1 mask without node 1 while the server assumes
    it did, and the round would end with a wrong sum (the header must refuse duplicate keys,
    SPEC section 5)."""
    request = baseline()[("masked_input", "c1", "request")]
    key = b'"shares":{"1":'
    offset = request.index(key) + len(key) - 3  # the digit "1" (0x31 -> 0x33 is "3")
    plan = FaultPlan(tamper=[Tamper("c1", "masked_input", "request", flip_bit(offset, 1))])
    result = completes_exactly_or_raises_typed(plan)
    if result is not None:
        assert "c1" in result.stats["rejected"]


# --- bit flips in the advertise reply ------------------------------------------------------
@pytest.mark.parametrize("field", ["cipher_pk", "mask_pk", "sig_pk", "bundle_sig"])
def test_bit_flip_in_an_advertised_key_is_rejected(field: str) -> None:
    """One bit flipped inside the base64 text of a key, keeping it valid base64 (bit 5 swaps
    a letter's case, bit 0 swaps two digits), so the decoded key itself changes."""
    reply = baseline()[("advertise_keys", "c4", "reply")]
    start = reply.index(f'"{field}":"'.encode()) + len(field) + 4
    offset = next(i for i in range(start + 1, start + 40) if chr(reply[i]).isalnum())
    bit = 5 if chr(reply[offset]).isalpha() else 0
    plan = FaultPlan(tamper=[Tamper("c4", "advertise_keys", "reply", flip_bit(offset, bit))])
    result = completes_exactly_or_raises_typed(plan)
    assert result is not None
    assert "MacError" in rejected_as(result, "c4", "advertise_keys")


@pytest.mark.parametrize("byte", [5, 40, 70, 130])  # cipher_pk, mask_pk, sig_pk, signature
def test_bit_flip_in_a_forwarded_bundle_drops_both_ends_and_the_sum_stays_exact(
        byte: int) -> None:
    """The server forwards node 3's bundle to c1 with one bit flipped. Peers check bundles
    through the shares' associated data (no signature check without the consistency check):
    c1 and node 3 cannot open each other's shares, both refuse masked_input, and the others'
    sum is exact."""
    def edit(data: bytes) -> bytes:
        env = decode(data)
        raw = bytearray(base64.b64decode(env.fields["bundles"]["3"]))
        raw[byte] ^= 0x04
        env.fields = {**env.fields, "bundles": {**env.fields["bundles"],
                                                "3": base64.b64encode(bytes(raw)).decode()}}
        return env.encode()
    plan = FaultPlan(tamper=[Tamper("c1", "share_keys", "request", edit)])
    result = run(plan, threshold=3)
    for cid in ("c1", "c2"):  # node 3 is c2
        assert "DecryptionError" in rejected_as(result, cid, "masked_input")
    assert sorted(result.survivors) == ["c0", "c3", "c4"]
    assert_exact(result)


# --- replay across rounds --------------------------------------------------------------------
@pytest.mark.parametrize("direction", ["reply", "request"])
@pytest.mark.parametrize("stage", STAGES)
def test_message_recorded_in_an_earlier_round_is_rejected(recorder: Any, stage: str,
                                                           direction: str) -> None:
    """Same seed, so the same session id; only the round number differs."""
    earlier = recorder()
    run(seed=5, round_=3, observers=(earlier,))
    recorded = earlier.one(stage, "c2", direction)
    assert decode(recorded).round == 3
    plan = FaultPlan(tamper=[Tamper("c2", stage, direction, lambda _b, r=recorded: r)])
    result = run(plan, seed=5, round_=4)
    assert_exact(result)
    assert "ReplayError" in rejected_as(result, "c2", stage)


def test_message_from_another_session_is_rejected(recorder: Any) -> None:
    other = recorder()
    run(seed=6, observers=(other,))
    recorded = other.one("share_keys", "c0", "reply")
    plan = FaultPlan(tamper=[Tamper("c0", "share_keys", "reply", lambda _b: recorded)])
    result = run(plan, seed=7)
    assert_exact(result)
    assert "SessionMismatchError" in rejected_as(result, "c0", "share_keys")


def test_reply_of_another_client_is_rejected(recorder: Any) -> None:
    rec = recorder()
    run(seed=8, observers=(rec,))
    stolen = rec.one("masked_input", "c3", "reply")
    plan = FaultPlan(tamper=[Tamper("c4", "masked_input", "reply", lambda _b: stolen)])
    result = run(plan, seed=8)
    assert_exact(result)
    assert "PartyError" in rejected_as(result, "c4", "masked_input")


# --- time-outs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", STAGES)
def test_timeout_is_a_dropout(stage: str) -> None:
    plan = FaultPlan(delay={("c2", stage): 5.0}, stage_timeout=2.0)
    result = run(plan)
    assert result.stats["timed_out"] == {"c2": stage}
    assert result.stats["rejected"] == {}
    if stage == "unmask":
        assert "c2" in result.survivors and result.stats["late_dropouts"] == ["c2"]
    else:
        assert result.dropped == {"c2": stage} and "c2" not in result.survivors
    assert_exact(result)


def test_delay_within_the_timeout_is_not_a_dropout() -> None:
    plan = FaultPlan(delay={("c2", s): 1.9 for s in STAGES}, stage_timeout=2.0)
    result = run(plan)
    assert result.survivors == IDS and result.stats["timed_out"] == {}
    assert_exact(result)


# --- dropouts and the threshold ----------------------------------------------------------------
@pytest.mark.parametrize("graph", ["complete", "k_regular"])
def test_dropouts_during_setup_still_complete(graph: str) -> None:
    ids = [f"c{i:02d}" for i in range(12)]
    updates = grid_updates(ids, seed=3)
    # 12 nodes, t = 7; k-regular degree 8, share threshold 5: four dropouts are always safe
    drop = {"c00": "advertise_keys", "c05": "advertise_keys", "c07": "share_keys",
            "c11": "share_keys"}
    result = run(updates=updates, drop=drop, graph=graph)
    assert result.stats["params"]["graph"] == graph
    assert result.dropped == drop
    assert sorted(result.survivors) == sorted(set(ids) - set(drop))
    assert_exact(result, updates)


def test_dropouts_at_every_stage_together_complete() -> None:
    drop = {"c0": "advertise_keys", "c1": "share_keys", "c2": "masked_input", "c3": "unmask"}
    ids = [f"c{i}" for i in range(9)]
    updates = grid_updates(ids, seed=4)
    result = run(updates=updates, drop=drop, threshold=5)
    assert result.dropped == {c: s for c, s in drop.items() if s != "unmask"}
    assert result.stats["late_dropouts"] == ["c3"]
    assert_exact(result, updates)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("how", ["drop", "timeout", "tamper"])
def test_below_threshold_aborts_before_revealing(recorder: Any, stage: str, how: str) -> None:
    """Five clients, t = 4: losing two at ``stage`` aborts with ThresholdError; if that
    happens before unmask, no unmask request (and no later request) was ever sent."""
    rec = recorder()
    lost = ["c1", "c3"]
    if how == "drop":
        plan = FaultPlan(drop={c: stage for c in lost})
    elif how == "timeout":
        plan = FaultPlan(delay={(c, stage): 9.0 for c in lost}, stage_timeout=1.0)
    else:
        plan = FaultPlan(tamper=[Tamper(c, stage, "reply", flip_bit(-1)) for c in lost])
    with pytest.raises(ThresholdError):
        run(plan, threshold=4, observers=(rec,))
    index = STAGES.index(stage)
    assert rec.stages_requested() == set(STAGES[:index + 1])
    if stage != "unmask":
        assert not rec.select("unmask")  # neither a request nor a reply with shares


def test_exactly_threshold_survivors_complete(recorder: Any) -> None:
    result = run(FaultPlan(drop={"c1": "masked_input"}), threshold=4)
    assert len(result.survivors) == 4
    assert_exact(result)


# --- k-regular neighbourhoods ------------------------------------------------------------------
def test_unrecoverable_neighbourhood_aborts_before_unmask(masking_round: Any,
                                                          recorder: Any) -> None:
    """Nine of twelve clients send masked inputs (t = 7), but three of node 1's four
    neighbours are among the three lost: node 1's self-mask could not be recovered, so the
    round must abort before any unmask request is sent."""
    ids = [f"c{i:02d}" for i in range(12)]
    r = masking_round(12, updates=grid_updates(ids, seed=9), graph="k_regular", degree=4,
                      **OPTIONS)
    assert r.server.params.graph == "k_regular" and r.server.params.share_threshold == 3
    lost = sorted(r.server.graph[1])[:3]
    drop = {r.cid(v): "masked_input" for v in lost}
    rec = recorder()
    channel = InProcessChannel(r.clients, FaultPlan(drop=drop))
    channel.observers.append(rec)
    with pytest.raises(ThresholdError):
        drive(r.server, channel)
    assert rec.stages_requested() == set(STAGES[:3])
    assert not rec.select("unmask")
    assert len(r.server.contributors) == 9 >= r.server.params.threshold


def test_isolated_node_is_pruned_and_the_round_completes(masking_round: Any) -> None:
    """Three of node 1's four neighbours never advertise keys: node 1 could never have its
    secrets recovered, so it is pruned (reported dropped at share_keys) and the others
    complete the round exactly."""
    ids = [f"c{i:02d}" for i in range(12)]
    updates = grid_updates(ids, seed=10)
    r = masking_round(12, updates=updates, graph="k_regular", degree=4, **OPTIONS)
    lost = sorted(r.server.graph[1])[:3]
    drop = {r.cid(v): "advertise_keys" for v in lost}
    result = drive(r.server, InProcessChannel(r.clients, FaultPlan(drop=drop)))
    assert result.dropped[r.cid(1)] == "share_keys"
    assert "too few live neighbours" in result.stats["rejected"][r.cid(1)]
    assert all(result.dropped[c] == "advertise_keys" for c in drop)
    assert set(result.survivors) == set(ids) - set(result.dropped)
    assert len(result.survivors) >= r.server.params.threshold
    assert_exact(result, updates)


def test_secure_sum_leaves_the_callers_fault_plan_unchanged() -> None:
    plan = FaultPlan(delay={("c4", "unmask"): 0.5})
    first = run(plan, drop={"c1": "share_keys"})
    assert first.dropped == {"c1": "share_keys"}
    assert plan.drop == {}
    second = run(plan, drop={"c2": "share_keys"})
    assert second.dropped == {"c2": "share_keys"}


def _edit_advertised(field: str, value: Any) -> Callable[[bytes], bytes]:
    """Re-encode an advertise_keys request with one announced parameter changed (as a network
    attacker, or a server announcing different parameters to different clients, would)."""
    def edit(data: bytes) -> bytes:
        env = decode(data)
        env.fields = {**env.fields, field: value}
        return env.encode()
    return edit


@pytest.mark.parametrize("field,value", [("clip", 2.0), ("levels", LEVELS // 2),
                                         ("max_weight", 2.0), ("ring_bits", 31),
                                         ("threshold", 4)])
def test_altered_round_parameters_are_caught_not_summed(field: str, value: Any) -> None:
    """Parameters are unauthenticated in the request, but each client returns the digest of
    what it was told in its MACed advertise reply (and signs it into its key bundle for its
    peers): a client that was told other parameters is rejected, and the sum stays exact."""
    plan = FaultPlan(tamper=[Tamper("c2", "advertise_keys", "request",
                                    _edit_advertised(field, value))])
    result = run(plan, threshold=3)
    reason = rejected_as(result, "c2", "advertise_keys")
    assert "PartyError" in reason and "other round parameters" in reason
    assert_exact(result)


# --- the MAC on masked inputs ----------------------------------------------------------------
def test_masked_vector_is_macd_and_a_flipped_body_bit_is_a_mac_error() -> None:
    reply = baseline()[("masked_input", "c1", "reply")]
    env = decode(reply)
    assert env.mac is not None and env.signature is None
    body_start = len(reply) - 16 - len(env.body)
    plan = FaultPlan(tamper=[Tamper("c1", "masked_input", "reply",
                                    flip_bit(body_start + len(env.body) // 2, 3))])
    result = run(plan)
    assert "MacError" in rejected_as(result, "c1", "masked_input")
    assert_exact(result)


def test_masked_input_signed_instead_of_macd_is_rejected() -> None:
    """A masked vector re-wrapped under another authenticator (here an Ed25519 signature by a
    stranger) is refused: only the MAC under the client's own round key is accepted."""
    from fedcollm_secure.crypto import generate_signing_key

    stranger = generate_signing_key(InsecureSeededRandomForTests(3, quiet=True))
    plan = FaultPlan(tamper=[Tamper("c2", "masked_input", "reply",
                                    lambda b: decode(b).encode(stranger))])
    result = run(plan)
    assert "MacError" in rejected_as(result, "c2", "masked_input")
    assert_exact(result)


def test_server_round_key_swapped_in_transit_is_caught_at_advertise() -> None:
    other = base64.b64encode(bytes(range(1, 33))).decode()
    plan = FaultPlan(tamper=[Tamper("c3", "advertise_keys", "request",
                                    _edit_advertised("server_pk", other))])
    result = run(plan, threshold=3)
    assert "MacError" in rejected_as(result, "c3", "advertise_keys")
    assert_exact(result)
