"""MaskingClient refusals, driven with real server messages edited by hand.

Every refusal must raise its specific typed error (checked with the exact type, since e.g.
ReplayError is a SessionMismatchError). Routing errors (another session or round, a
duplicated or out-of-order stage) leave the client able to finish the honest round; a
message of the right stage that breaks a rule aborts the client, which then reveals nothing.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from fedcollm_secure.errors import (
    DecryptionError,
    FedCoLLMSecureError,
    PartyError,
    ReplayError,
    SessionMismatchError,
    SignatureError,
    StageError,
    UnmaskRequestError,
    WireFormatError,
)
from fedcollm_secure.secagg.masking.client import ABORTED, DONE
from fedcollm_secure.secagg.masking.messages import SEALED_SHARE_SIZE
from fedcollm_secure.wire import MAGIC, PREFIX, WIRE_VERSION, Envelope, Limits, decode

Edit = Callable[[Envelope], None]


def refuse(client: Any, data: bytes, exc_type: type[BaseException]) -> BaseException:
    """``client.process(data)`` must raise exactly ``exc_type``."""
    with pytest.raises(FedCoLLMSecureError) as info:
        client.process(data)
    assert type(info.value) is exc_type, f"{type(info.value).__name__}: {info.value}"
    return info.value


def error_reply(client: Any, data: bytes) -> dict[str, Any]:
    """``client.handle(data)`` must answer with an error envelope (and no secrets)."""
    env = decode(client.handle(data))
    assert env.stage == "error" and env.body == b""
    assert set(env.fields) == {"code", "message"}
    return env.fields


def set_field(name: str, value: Any) -> Edit:
    def edit(env: Envelope) -> None:
        env.fields[name] = value
    return edit


def set_stage(stage: str) -> Edit:
    def edit(env: Envelope) -> None:
        env.stage = stage
    return edit


def flip_in_b64(field: str, key: str, byte: int, bit: int = 0) -> Edit:
    """Flip one bit of the decoded bytes of ``fields[field][key]`` (a base64 map entry)."""
    def edit(env: Envelope) -> None:
        raw = bytearray(base64.b64decode(env.fields[field][key]))
        raw[byte] ^= 1 << bit
        env.fields[field][key] = base64.b64encode(bytes(raw)).decode()
    return edit


def finish_round(r: Any, skip: set[str] = frozenset()) -> Any:
    """Complete the round honestly; return the server's result."""
    while r.server.stage_index < 4:
        r.step(skip=skip)
    return r.server.result()


def honest_sum(r: Any, survivors: list[str]) -> np.ndarray:
    return sum(np.clip(np.asarray(r.updates[c]["w"]), -4, 4) for c in survivors)


# --- stage order -------------------------------------------------------------------------
def test_out_of_order_stage_is_refused_and_harmless(masking_round: Any, edit_env: Any) -> None:
    r = masking_round(5)
    twin = masking_round(5)  # same seed: same session, same messages, further along
    _, reqs = r.requests()
    later = twin.advance_to("masked_input")
    c0 = r.clients["c0"]
    err = refuse(c0, later["c0"], StageError)
    assert "out-of-order" in str(err)
    for stage in ("share_keys", "masked_input", "unmask"):
        refuse(c0, edit_env(reqs["c0"], set_stage(stage)), StageError)
    assert c0.state == "advertise_keys" and c0.error is None
    result = finish_round(r)
    assert result.survivors == r.ids
    np.testing.assert_allclose(result.sum["w"], honest_sum(r, r.ids),
                               atol=result.stats["params"]["error_bound"])


def test_duplicated_stage_is_refused_and_harmless(masking_round: Any) -> None:
    r = masking_round(4)
    _, adv, _ = r.step()
    c1 = r.clients["c1"]
    assert c1.state == "share_keys"
    err = refuse(c1, adv["c1"], StageError)
    assert "duplicated" in str(err)
    _, share, _ = r.step()
    refuse(c1, share["c1"], StageError)
    refuse(c1, adv["c1"], StageError)
    result = finish_round(r)
    assert c1.state == DONE and result.survivors == r.ids
    # after the round everything is refused, including a second unmask request
    for msg in (adv["c1"], share["c1"]):
        refuse(c1, msg, StageError)


def test_request_for_another_stage_reports_a_wrong_session_first(masking_round: Any,
                                                                  edit_env: Any) -> None:
    r = masking_round(4)
    _, reqs = r.requests()
    def edit(e: Envelope) -> None:
        e.stage, e.session = "masked_input", bytes(16)
    refuse(r.clients["c0"], edit_env(reqs["c0"], edit), SessionMismatchError)


# --- replay and session --------------------------------------------------------------------
@pytest.mark.parametrize("stage", ["advertise_keys", "share_keys", "masked_input", "unmask"])
def test_message_from_an_earlier_round_is_a_replay(masking_round: Any, stage: str) -> None:
    session = bytes(range(16))
    earlier = masking_round(4, seed=10, session=session, round_=6)
    now = masking_round(4, seed=11, session=session, round_=7)
    old = earlier.advance_to(stage)
    current = now.advance_to(stage)
    err = refuse(now.clients["c2"], old["c2"], ReplayError)
    assert "round 6" in str(err)
    assert error_reply(now.clients["c2"], old["c2"])["code"] == "ReplayError"
    # the replay did not derail the honest round
    assert now.clients["c2"].error is None
    now.server.receive(stage, {c: now.clients[c].process(m) for c, m in current.items()})
    result = finish_round(now)
    assert result.survivors == now.ids and result.stats["rejected"] == {}


@pytest.mark.parametrize("stage", ["advertise_keys", "share_keys", "unmask"])
def test_wrong_session_is_refused(masking_round: Any, edit_env: Any, stage: str) -> None:
    r = masking_round(4)
    reqs = r.advance_to(stage)
    def edit(e: Envelope) -> None:
        e.session = bytes(b ^ 1 for b in e.session)
    refuse(r.clients["c3"], edit_env(reqs["c3"], edit), SessionMismatchError)
    # the same session but another round of it is a replay, not a session mismatch
    refuse(r.clients["c3"], edit_env(reqs["c3"], lambda e: setattr(e, "round", 1)),
           ReplayError)
    assert r.clients["c3"].error is None


# --- unmask requests -----------------------------------------------------------------------
# Node 1 (client c0) of five; node 5 dropped before masked_input. Honest request:
# survivors [1, 2, 3, 4], dropped [5].
BAD_UNMASK = {
    "node both surviving and dropped": ([1, 2, 3, 4, 5], [5]),
    "survivor also listed as dropped": ([1, 2, 3, 4], [4, 5]),
    "client itself dropped": ([2, 3, 4], [1, 5]),
    "client itself omitted": ([2, 3, 4], [5]),
    "unknown survivor": ([1, 2, 3, 4, 6], [5]),
    "unknown dropped node": ([1, 2, 3, 4], [5, 6]),
    "node zero": ([0, 1, 2, 3, 4], [5]),
    "duplicate survivor": ([1, 2, 2, 3, 4], [5]),
    "duplicate dropped node": ([1, 2, 3, 4], [5, 5]),
    "a peer not classified": ([1, 2, 3], [5]),
    "dropped list emptied": ([1, 2, 3, 4], []),
    "fewer survivors than the share threshold": ([1, 2], [3, 4, 5]),
}


@pytest.mark.parametrize("case", sorted(BAD_UNMASK))
def test_inconsistent_unmask_request_is_refused_revealing_nothing(
        masking_round: Any, edit_env: Any, case: str) -> None:
    r = masking_round(5)
    reqs = r.advance_to("unmask", skip={"c4": "masked_input"})
    honest = decode(reqs["c0"]).fields
    assert (honest["survivors"], honest["dropped"]) == ([1, 2, 3, 4], [5])
    survivors, dropped = BAD_UNMASK[case]
    def edit(e: Envelope) -> None:
        e.fields["survivors"], e.fields["dropped"] = survivors, dropped
    c0 = r.clients["c0"]
    assert error_reply(c0, edit_env(reqs["c0"], edit))["code"] == "UnmaskRequestError"
    assert c0.state == ABORTED and type(c0.error) is UnmaskRequestError
    assert c0.revealed == {}
    # aborted for the round: even the honest request is refused now, with no shares
    refuse(c0, reqs["c0"], StageError)
    assert error_reply(c0, reqs["c0"])["code"] == "StageError"
    assert c0.revealed == {}


def test_a_second_unmask_request_cannot_extract_the_other_share(masking_round: Any,
                                                                edit_env: Any) -> None:
    """Ask for b-shares (node 2 survives), then ask again calling node 2 dropped: the
    client must not hand out node 2's s-share as well."""
    r = masking_round(5)
    reqs = r.advance_to("unmask", skip={"c4": "masked_input"})
    c0 = r.clients["c0"]
    reply = decode(c0.process(reqs["c0"]))
    assert sorted(map(int, reply.fields["b_shares"])) == [1, 2, 3, 4]
    assert sorted(map(int, reply.fields["s_shares"])) == [5]
    def edit(e: Envelope) -> None:
        e.fields["survivors"], e.fields["dropped"] = [1, 3, 4], [2, 5]
    refuse(c0, edit_env(reqs["c0"], edit), StageError)
    assert error_reply(c0, edit_env(reqs["c0"], edit))["code"] == "StageError"
    assert c0.revealed == {"b": [1, 2, 3, 4], "s": [5]}


def test_revealed_shares_never_overlap_over_a_whole_round(masking_round: Any) -> None:
    r = masking_round(6, graph="k_regular", degree=4)
    result = None
    stage_skips = {"c5": "masked_input", "c2": "unmask"}
    reqs = r.advance_to("unmask", skip=stage_skips)
    replies = {}
    for cid, msg in reqs.items():
        if cid == "c2":
            continue
        replies[cid] = r.clients[cid].process(msg)
        b = set(r.clients[cid].revealed["b"])
        s = set(r.clients[cid].revealed["s"])
        assert not b & s
        env = decode(replies[cid])
        assert set(map(int, env.fields["b_shares"])) == b
        assert set(map(int, env.fields["s_shares"])) == s
        assert r.node("c5") not in b and r.node("c2") not in s
    r.server.receive("unmask", replies)
    result = r.server.result()
    assert result.stats["late_dropouts"] == ["c2"]
    np.testing.assert_allclose(result.sum["w"], honest_sum(r, result.survivors),
                               atol=result.stats["params"]["error_bound"])


# --- share_keys ----------------------------------------------------------------------------
# A bundle is cipher_pk (0:32) || mask_pk (32:64) || sig_pk (64:96) || signature (96:160).
BUNDLE_BYTES = [0, 31, 32, 63, 64, 95, 96, 159]


@pytest.mark.parametrize("byte", BUNDLE_BYTES)
def test_tampered_forwarded_key_bundle_fails_its_signature_in_checked_rounds(
        masking_round: Any, edit_env: Any, byte: int) -> None:
    r = masking_round(5, consistency_check=True)
    reqs = r.advance_to("share_keys")
    c0 = r.clients["c0"]
    refuse(c0, edit_env(reqs["c0"], flip_in_b64("bundles", "3", byte, 2)), SignatureError)
    assert c0.state == ABORTED
    refuse(c0, reqs["c0"], StageError)


@pytest.mark.parametrize("byte", BUNDLE_BYTES)
def test_tampered_forwarded_key_bundle_makes_both_ends_refuse_their_shares(
        masking_round: Any, edit_env: Any, byte: int) -> None:
    """Without the consistency check or identities the per-round signing keys are
    self-asserted and peers do not check bundle signatures; the shares' associated data binds
    both bundles instead. c0 takes node 3's changed bundle, but then neither c0 nor node 3
    can open the share the other sealed for it, so both refuse before masking anything."""
    r = masking_round(5)
    reqs = r.advance_to("share_keys")
    tampered = edit_env(reqs["c0"], flip_in_b64("bundles", "3", byte, 2))
    replies = {cid: r.clients[cid].process(tampered if cid == "c0" else msg)
               for cid, msg in reqs.items()}
    r.server.receive("share_keys", replies)
    stage, masked = r.requests()
    assert stage == "masked_input"
    for cid in ("c0", r.cid(3)):
        refuse(r.clients[cid], masked[cid], DecryptionError)
        assert r.clients[cid].state == ABORTED
    for cid in sorted(set(masked) - {"c0", r.cid(3)}):  # the others' shares all open
        r.clients[cid].process(masked[cid])


def test_bundle_of_another_node_under_a_peer_index_is_refused(
        masking_round: Any, edit_env: Any) -> None:
    """Checked rounds: its signature binds the node index. Other rounds: the same keys under
    two indices are refused as reused keys."""
    def edit(e: Envelope) -> None:
        e.fields["bundles"]["2"] = e.fields["bundles"]["3"]
    for options, error in (({"consistency_check": True}, SignatureError), ({}, PartyError)):
        r = masking_round(5, **options)
        reqs = r.advance_to("share_keys")
        refuse(r.clients["c0"], edit_env(reqs["c0"], edit), error)


@pytest.mark.parametrize("how", ["flipped", "removed", "replaced by a peer's"])
def test_own_keys_must_come_back_unchanged(masking_round: Any, edit_env: Any, how: str) -> None:
    r = masking_round(5)
    reqs = r.advance_to("share_keys")
    def edit(e: Envelope) -> None:
        if how == "flipped":
            flip_in_b64("bundles", "1", 40)(e)
        elif how == "removed":
            del e.fields["bundles"]["1"]
        else:
            e.fields["bundles"]["1"] = e.fields["bundles"]["2"]
    err = refuse(r.clients["c0"], edit_env(reqs["c0"], edit), PartyError)
    assert "own keys" in str(err)


def test_too_few_bundles_are_refused(masking_round: Any, edit_env: Any) -> None:
    r = masking_round(5)  # threshold (= share threshold on the complete graph) 3
    reqs = r.advance_to("share_keys")
    def edit(e: Envelope) -> None:
        e.fields["bundles"] = {k: v for k, v in e.fields["bundles"].items() if k in ("1", "2")}
    err = refuse(r.clients["c0"], edit_env(reqs["c0"], edit), PartyError)
    assert "share threshold" in str(err)


def test_bundles_of_non_neighbours_are_refused(masking_round: Any, edit_env: Any) -> None:
    r = masking_round(8, graph="k_regular", degree=4)
    reqs = r.advance_to("share_keys")
    neighbours = r.server.graph[1]
    assert len(neighbours) == 4
    outsider = min(set(range(2, 9)) - neighbours)
    outsider_bundle = decode(reqs[r.cid(outsider)]).fields["bundles"][str(outsider)]
    def edit(e: Envelope) -> None:
        e.fields["bundles"][str(outsider)] = outsider_bundle
    err = refuse(r.clients["c0"], edit_env(reqs["c0"], edit), PartyError)
    assert "not neighbours" in str(err)


def test_bundle_for_a_node_outside_the_round_is_refused(masking_round: Any,
                                                        edit_env: Any) -> None:
    r = masking_round(5)
    reqs = r.advance_to("share_keys")
    def edit(e: Envelope) -> None:
        e.fields["bundles"]["9"] = e.fields["bundles"]["2"]
    refuse(r.clients["c0"], edit_env(reqs["c0"], edit), PartyError)


# --- masked_input --------------------------------------------------------------------------
# A sealed share is nonce (12) || ciphertext || tag (16).
@pytest.mark.parametrize("byte", [0, 11, 12, 70, SEALED_SHARE_SIZE - 17, SEALED_SHARE_SIZE - 16,
                                  SEALED_SHARE_SIZE - 1])
def test_flipped_bit_in_a_forwarded_share_fails_decryption(masking_round: Any, edit_env: Any,
                                                           byte: int) -> None:
    r = masking_round(5)
    reqs = r.advance_to("masked_input")
    c0 = r.clients["c0"]
    assert len(base64.b64decode(decode(reqs["c0"]).fields["shares"]["4"])) == SEALED_SHARE_SIZE
    refuse(c0, edit_env(reqs["c0"], flip_in_b64("shares", "4", byte, 7)), DecryptionError)
    assert c0.state == ABORTED and not hasattr(c0, "peers")
    refuse(c0, reqs["c0"], StageError)


def test_shares_swapped_between_senders_fail_decryption(masking_round: Any,
                                                        edit_env: Any) -> None:
    r = masking_round(5)
    reqs = r.advance_to("masked_input")
    def edit(e: Envelope) -> None:
        s = e.fields["shares"]
        s["2"], s["3"] = s["3"], s["2"]
    refuse(r.clients["c0"], edit_env(reqs["c0"], edit), DecryptionError)


def test_share_from_a_node_without_accepted_keys_is_refused(masking_round: Any,
                                                            edit_env: Any) -> None:
    r = masking_round(5)
    reqs = r.advance_to("masked_input")
    def edit(e: Envelope) -> None:
        e.fields["shares"]["7"] = e.fields["shares"]["2"]
    refuse(r.clients["c0"], edit_env(reqs["c0"], edit), PartyError)


def test_share_addressed_to_another_node_is_refused(masking_round: Any, edit_env: Any) -> None:
    """Node 2's share for node 3, forwarded to node 1 as if it were node 2's share for it."""
    r = masking_round(5)
    reqs = r.advance_to("masked_input")
    for_node3 = decode(reqs["c2"]).fields["shares"]["2"]
    def edit(e: Envelope) -> None:
        e.fields["shares"]["2"] = for_node3
    refuse(r.clients["c0"], edit_env(reqs["c0"], edit), DecryptionError)


# --- advertise_keys: parameters ------------------------------------------------------------
@pytest.mark.parametrize("threshold", [0, 1, 6])
def test_threshold_out_of_range_is_refused(masking_round: Any, edit_env: Any,
                                           threshold: int) -> None:
    r = masking_round(5)
    _, reqs = r.requests()
    refuse(r.clients["c0"], edit_env(reqs["c0"], set_field("threshold", threshold)), PartyError)


def test_threshold_below_the_clients_own_minimum_is_refused(masking_round: Any) -> None:
    r = masking_round(5, client_options={"min_threshold": 4})  # the server announces t = 3
    _, reqs = r.requests()
    assert decode(reqs["c0"]).fields["threshold"] == 3
    err = refuse(r.clients["c0"], reqs["c0"], PartyError)
    assert "minimum" in str(err)
    ok = masking_round(5, threshold=4, client_options={"min_threshold": 4})
    assert finish_round(ok).stats["params"]["threshold"] == 4


@pytest.mark.parametrize("field,value", [
    ("share_threshold", 1), ("share_threshold", 5), ("neighbours", [2, 3, 4]),
    ("neighbours", [1, 2, 3, 4]), ("neighbours", [2, 2, 3, 4]), ("neighbours", [2, 3, 4, 6]),
    ("n_nodes", 1), ("graph", "star")])
def test_inconsistent_round_parameters_are_refused(masking_round: Any, edit_env: Any,
                                                   field: str, value: Any) -> None:
    r = masking_round(5)
    _, reqs = r.requests()
    refuse(r.clients["c0"], edit_env(reqs["c0"], set_field(field, value)), PartyError)


# --- malformed envelopes -------------------------------------------------------------------
def _patch(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new):]


def _raw_envelope(header: dict[str, Any], body: bytes = b"") -> bytes:
    h = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return PREFIX.pack(MAGIC, WIRE_VERSION, 0, len(h), len(body)) + h + body


MALFORMED: dict[str, Callable[[bytes], bytes]] = {
    "bad magic": lambda d: _patch(d, 0, b"XCS"),
    "version 0": lambda d: _patch(d, 3, bytes([0])),
    "version 2": lambda d: _patch(d, 3, bytes([WIRE_VERSION + 1])),
    "unknown flag": lambda d: _patch(d, 4, bytes([2])),
    "signed flag without signature": lambda d: _patch(d, 4, bytes([1])),
    "truncated by one byte": lambda d: d[:-1],
    "truncated prefix": lambda d: d[:PREFIX.size - 1],
    "empty": lambda d: b"",
    "trailing byte": lambda d: d + b"\x00",
    "header length beyond the limit": lambda d: _patch(d, 5, struct.pack(">I", 5 << 20)),
    "body length beyond the limit": lambda d: _patch(d, 9, struct.pack(">Q", 1 << 40)),
    "header not JSON": lambda d: _patch(d, PREFIX.size, b"\xff"),
    "header is a list": lambda d: _raw_envelope_list(),
}


def _raw_envelope_list() -> bytes:
    h = b"[1,2,3]"
    return PREFIX.pack(MAGIC, WIRE_VERSION, 0, len(h), 0) + h


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_envelopes_raise_wire_format_error(masking_round: Any, case: str) -> None:
    r = masking_round(4)
    _, reqs = r.requests()
    c0 = r.clients["c0"]
    bad = MALFORMED[case](reqs["c0"])
    refuse(c0, bad, WireFormatError)
    assert error_reply(c0, bad)["code"] == "WireFormatError"


def test_oversized_header_is_refused_before_parsing(masking_round: Any) -> None:
    from fedcollm_secure.secagg.masking import MaskingClient

    r = masking_round(4)
    _, reqs = r.requests()
    small = MaskingClient("c0", r.updates["c0"], session=r.session, round_=0,
                          limits=Limits(max_header=64))
    err = refuse(small, reqs["c0"], WireFormatError)
    assert "size limits" in str(err)


def _header_of(data: bytes) -> dict[str, Any]:
    env = decode(data)
    return {"protocol": env.protocol, "stage": env.stage, "session": env.session.hex(),
            "round": env.round, "src": env.src, "dst": env.dst, "fields": env.fields}


@pytest.mark.parametrize("case", ["extra header key", "missing header key", "round negative",
                                  "round a string", "dst a bool", "session not hex",
                                  "fields not an object"])
def test_malformed_headers_raise_wire_format_error(masking_round: Any, case: str) -> None:
    r = masking_round(4)
    _, reqs = r.requests()
    h = _header_of(reqs["c0"])
    if case == "extra header key":
        h["extra"] = 1
    elif case == "missing header key":
        del h["dst"]
    elif case == "round negative":
        h["round"] = -1
    elif case == "round a string":
        h["round"] = "0"
    elif case == "dst a bool":
        h["dst"] = True
    elif case == "session not hex":
        h["session"] = "zz" * 16
    else:
        h["fields"] = []
    refuse(r.clients["c0"], _raw_envelope(h), WireFormatError)


@pytest.mark.parametrize("stage", ["advertise_keys", "share_keys", "masked_input", "unmask"])
@pytest.mark.parametrize("how", ["unknown field", "missing field", "wrong type"])
def test_unknown_missing_or_mistyped_fields_raise_wire_format_error(
        masking_round: Any, edit_env: Any, stage: str, how: str) -> None:
    r = masking_round(4)
    reqs = r.advance_to(stage)
    def edit(e: Envelope) -> None:
        if how == "unknown field":
            e.fields["extra"] = 1
        elif how == "missing field":
            del e.fields[sorted(e.fields)[0]]
        else:
            e.fields[sorted(e.fields)[-1]] = "not the right type"
    c0 = r.clients["c0"]
    refuse(c0, edit_env(reqs["c0"], edit), WireFormatError)
    assert c0.state == ABORTED
    refuse(c0, reqs["c0"], StageError)


def test_non_bytes_input_raises_wire_format_error(masking_round: Any) -> None:
    r = masking_round(4)
    refuse(r.clients["c0"], "not bytes", WireFormatError)  # type: ignore[arg-type]


def test_error_replies_are_signed_by_the_client_key(masking_round: Any) -> None:
    """A refusal is an authenticated error message, never silence."""
    r = masking_round(4)
    r.step()
    c1 = r.clients["c1"]
    env = decode(c1.handle(b"garbage"))
    assert env.stage == "error" and env.fields["code"] == "WireFormatError"
    env.verify(c1.signer.verify_key)
