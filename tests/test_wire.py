from __future__ import annotations

import json
import struct

import pytest

from fedcollm_secure.crypto import generate_signing_key
from fedcollm_secure.errors import (
    FedCoLLMSecureError, PartyError, ReplayError, SessionMismatchError, SignatureError,
    StageError, WireFormatError,
)
from fedcollm_secure.wire import PREFIX, Envelope, Fields, Limits, b64, decode

SESSION = b"\x01" * 16


def make(**overrides: object) -> Envelope:
    base: dict[str, object] = dict(protocol="masking/v1", stage="share_keys", session=SESSION,
                                   round=2, src=3, dst=0, fields={"x": 1}, body=b"\x00\x01")
    base.update(overrides)
    return Envelope(**base)  # type: ignore[arg-type]


def test_round_trip_and_signature() -> None:
    key = generate_signing_key()
    data = make().encode(key)
    assert data[:4] == b"FCS\x01"
    env = decode(data)
    assert (env.protocol, env.stage, env.session, env.round, env.src, env.dst) == (
        "masking/v1", "share_keys", SESSION, 2, 3, 0)
    assert env.body == b"\x00\x01" and env.fields == {"x": 1}
    env.verify(key.verify_key)
    with pytest.raises(SignatureError):
        env.verify(generate_signing_key().verify_key)
    with pytest.raises(SignatureError):
        decode(make().encode()).verify(key.verify_key)  # unsigned
    tampered = bytearray(data)
    tampered[-65] ^= 1  # the last body byte (the 64-byte signature follows)
    with pytest.raises(SignatureError):
        decode(bytes(tampered)).verify(key.verify_key)


@pytest.mark.parametrize("edit", [
    lambda d: b"XYZ" + d[3:],                      # magic
    lambda d: d[:3] + b"\x02" + d[4:],             # version
    lambda d: d[:4] + b"\x80" + d[5:],             # unknown flag
    lambda d: d[:-1],                              # truncated
    lambda d: d + b"\x00",                         # trailing bytes
    lambda d: d[:10],                              # shorter than prefix + header
    lambda d: b"",
])
def test_malformed_envelopes(edit) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(WireFormatError):
        decode(edit(make().encode()))


def test_size_limits_checked_before_parsing() -> None:
    data = make(body=b"\x00" * 100).encode()
    with pytest.raises(WireFormatError, match="size limits"):
        decode(data, Limits(max_body=99))
    # a declared header length far beyond the data is refused without allocation
    forged = PREFIX.pack(b"FCS", 1, 0, 1 << 30, 0)
    with pytest.raises(WireFormatError):
        decode(forged)


def _raw(header: object) -> bytes:
    h = json.dumps(header).encode()
    return PREFIX.pack(b"FCS", 1, 0, len(h), 0) + h


def test_header_schema() -> None:
    good = json.loads(make(body=b"").header_json())
    decode(_raw(good))
    for key, value in [("round", -1), ("round", "2"), ("src", True), ("session", "zz"),
                       ("fields", []), ("protocol", 5)]:
        bad = dict(good)
        bad[key] = value
        with pytest.raises(WireFormatError):
            decode(_raw(bad))
    extra = dict(good, extra=1)
    with pytest.raises(WireFormatError):
        decode(_raw(extra))
    with pytest.raises(WireFormatError):
        decode(PREFIX.pack(b"FCS", 1, 0, 3, 0) + b"\xff\xfe{")
    with pytest.raises(WireFormatError):
        decode(_raw([1, 2]))


def test_expect_gives_specific_errors() -> None:
    env = make()
    kw = dict(protocol="masking/v1", stage="share_keys", session=SESSION, round_=2, src=3, dst=0)
    env.expect(**kw)  # type: ignore[arg-type]
    for change, err in [({"session": b"\x02" * 16}, SessionMismatchError),
                        ({"round_": 3}, ReplayError), ({"stage": "unmask"}, StageError),
                        ({"src": 4}, PartyError), ({"dst": 1}, PartyError),
                        ({"protocol": "ckks/v1"}, WireFormatError)]:
        with pytest.raises(err):
            env.expect(**{**kw, **change})  # type: ignore[arg-type]


def test_fields_typed_access() -> None:
    env = make(fields={"n": 3, "k": b64(b"\x00" * 32), "m": {"1": b64(b"ab"), "02": b64(b"c")},
                       "l": [1, 2]})
    with pytest.raises(WireFormatError, match="missing"):
        Fields(env, {"n", "k", "m", "l", "z"})
    with pytest.raises(WireFormatError, match="unknown"):
        Fields(env, {"n", "k", "m"})
    f = Fields(env, {"n", "k", "m", "l"})
    assert f.uint("n") == 3 and f.raw("k", 32) == b"\x00" * 32
    with pytest.raises(WireFormatError):
        f.raw("k", 31)
    with pytest.raises(WireFormatError, match="canonical"):
        f.bytes_map("m", 10)
    with pytest.raises(WireFormatError):
        f.uint_list("l", 1)
    assert struct.calcsize(">3sBBIQ") == PREFIX.size == 17


def test_mac_envelope_round_trip_and_refusals() -> None:
    from fedcollm_secure.errors import MacError
    from fedcollm_secure.wire import FLAG_MAC

    key, other = bytes(range(32)), bytes(range(1, 33))
    env = Envelope(protocol="p", stage="s", session=b"\x01" * 16, round=2, src=1, dst=0,
                   fields={"length": 3}, body=b"abc")
    data = env.encode(mac_key=key)
    hlen = len(env.header_json()) + (-(PREFIX.size + len(env.header_json())) % 16)
    assert data[4] == FLAG_MAC and len(data) == PREFIX.size + hlen + 3 + 16
    assert (PREFIX.size + hlen) % 16 == 0  # the body is 16-byte aligned in the message
    got = decode(data)
    got.verify_mac(key)
    with pytest.raises(MacError):
        got.verify_mac(other)
    with pytest.raises(SignatureError):  # a MACed envelope is not a signed one
        got.verify(generate_signing_key().verify_key)
    for i in range(len(data)):
        tampered = bytearray(data)
        tampered[i] ^= 1
        try:
            decode(bytes(tampered)).verify_mac(key)
        except FedCoLLMSecureError:
            continue
        raise AssertionError(f"flipped byte {i} was accepted")
    with pytest.raises(MacError):
        decode(env.encode()).verify_mac(key)
    both = bytearray(data)
    both[4] = 3
    with pytest.raises(WireFormatError):
        decode(bytes(both))
    with pytest.raises(ValueError):
        env.encode(generate_signing_key(), mac_key=key)


def test_in_place_encoding_equals_encode_and_is_read_only() -> None:
    key = bytes(range(32))
    env = Envelope(protocol="p", stage="s", session=b"\x01" * 16, round=2, src=1, dst=0,
                   fields={"length": 5}, body=b"hello")

    def fill(body: memoryview) -> None:
        assert body.nbytes == 5 and not body.readonly
        body[:] = b"hello"

    view = env.encode_in_place(5, fill, mac_key=key)
    assert isinstance(view, memoryview) and view.readonly
    assert bytes(view) == env.encode(mac_key=key)
    got = decode(view)
    got.verify_mac(key)
    assert bytes(got.body) == b"hello"


def test_decode_reads_views_in_place_and_copies_mutable_buffers() -> None:
    key = bytes(range(32))
    data = make().encode(mac_key=key)
    ro = decode(memoryview(data))
    assert isinstance(ro.body, memoryview) and ro.body.obj is data  # no copy
    buf = bytearray(data)
    got = decode(memoryview(buf))  # a writable view: copied, so later edits cannot reach it
    buf[-20] ^= 1
    got.verify_mac(key)
    assert bytes(got.body) == b"\x00\x01"
    with pytest.raises(WireFormatError):
        decode(memoryview(data)[:10])
