"""Fuzz tests over every decoder of untrusted bytes or data: only typed errors, no crash, no
hang.

Each decoder gets random inputs and mutations of valid inputs (bit flips, byte
substitutions, insertions, deletions, truncations). The contract: it returns normally or
raises a subclass of :class:`FedCoLLMSecureError`; never another exception, and every example
finishes within the deadline. Examples are bounded so the module stays fast; the optional
atheris harness (``tests/fuzz/``) runs the same targets for as long as one likes.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedcollm_secure.audit import AuditLog, parse_record, verify_log
from fedcollm_secure.config import ConfigBase
from fedcollm_secure.crypto import InsecureSeededRandomForTests
from fedcollm_secure.crypto.shamir import SHARE_SIZE, Share, split_secret
from fedcollm_secure.crypto.signatures import generate_signing_key
from fedcollm_secure.errors import AuditLogError, FedCoLLMSecureError
from fedcollm_secure.secagg import TensorSpec
from fedcollm_secure.secagg.masking import MaskingAggregator
from fedcollm_secure.secagg.masking.config import MaskingConfig
from fedcollm_secure.secagg.masking.messages import (
    BUNDLE_SIZE,
    KeyBundle,
    parse_error,
    parse_share_plaintext,
    share_plaintext,
)
from fedcollm_secure.wire import SERVER, Envelope, Fields, Limits, decode

FUZZ = settings(max_examples=80, deadline=2000, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
FEW = settings(FUZZ, max_examples=25)


def typed_only(fn: Callable[[], Any]) -> Any:
    """Run ``fn``; a typed error is fine, any other exception fails the test."""
    try:
        return fn()
    except FedCoLLMSecureError as exc:
        return exc


# --- strategies ------------------------------------------------------------------------------
def _mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    b = bytearray(data)
    for kind, pos, value in edits:
        if not b and kind != 2:
            continue
        i = pos % max(1, len(b))
        if kind == 0:
            b[i] ^= 1 << (value % 8)
        elif kind == 1:
            b[i] = value
        elif kind == 2:
            b.insert(i, value)
        elif kind == 3:
            del b[i]
        else:
            del b[i:]
    return bytes(b)


EDITS = st.lists(st.tuples(st.integers(0, 4), st.integers(0, 1 << 30), st.integers(0, 255)),
                 min_size=1, max_size=4)


def mutations(valid: list[bytes]) -> st.SearchStrategy[bytes]:
    """Random bytes, or one of ``valid`` with a few edits."""
    return st.one_of(st.binary(max_size=512),
                     st.builds(_mutate, st.sampled_from(valid), EDITS))


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12)


# --- the envelope ----------------------------------------------------------------------------
SIGNER = generate_signing_key(InsecureSeededRandomForTests(1, quiet=True))


def _envelopes() -> list[bytes]:
    env = Envelope("masking/v1", "share_keys", bytes(16), 3, 2, SERVER,
                   {"shares": {"1": base64.b64encode(b"x" * 8).decode()}, "n": 5}, b"\x01" * 24)
    return [env.encode(), env.encode(SIGNER), env.encode(mac_key=bytes(range(32))),
            Envelope("p", "s", b"", 0, 0, 0).encode()]


ENVELOPES = _envelopes()


@FUZZ
@given(data=mutations(ENVELOPES))
def test_decode_raises_only_typed_errors(data: bytes) -> None:
    typed_only(lambda: decode(data))
    typed_only(lambda: decode(data, Limits(max_header=64, max_body=8)))


@FUZZ
@given(data=mutations(ENVELOPES))
def test_decoded_envelopes_check_and_verify_with_typed_errors(data: bytes) -> None:
    env = typed_only(lambda: decode(data))
    if isinstance(env, Envelope):
        typed_only(lambda: env.expect(protocol="masking/v1", stage="share_keys",
                                      session=bytes(16), round_=3, src=2, dst=SERVER))
        typed_only(lambda: env.verify(SIGNER.verify_key))
        typed_only(lambda: env.verify_mac(bytes(range(32))))


@FUZZ
@given(fields=st.dictionaries(st.text(max_size=6), JSON, max_size=5),
       required=st.sets(st.text(max_size=6), max_size=3))
def test_fields_accessors_raise_only_typed_errors(fields: dict[str, Any],
                                                  required: set[str]) -> None:
    env = decode(Envelope("p", "s", b"", 0, 0, 0, fields).encode())
    typed_only(lambda: Fields(env, required))
    f = Fields(env, set(env.fields))
    calls: list[tuple[Callable[..., Any], dict[str, Any]]] = [
        (f.uint, {}), (f.number, {}), (f.string, {"max_len": 8}), (f.raw, {}),
        (f.raw, {"size": 4}), (f.raw, {"max_size": 2}), (f.uint_list, {"max_len": 3}),
        (f.bytes_map, {"max_len": 3}), (f.bytes_map, {"max_len": 3, "size": 2}),
        (f.list_of, {"max_len": 2})]
    for name in env.fields:
        for method, kwargs in calls:
            typed_only(lambda m=method, k=kwargs, n=name: m(n, **k))


# --- masking messages ------------------------------------------------------------------------
SHARE = Share(5, 12345).to_bytes()
PLAIN = share_plaintext(1, 2, SHARE, Share(5, 99).to_bytes())


@FUZZ
@given(raw=mutations([bytes(BUNDLE_SIZE), PLAIN, SHARE]), node=st.integers(0, 1 << 64))
def test_masking_parsers_raise_only_typed_errors(raw: bytes, node: int) -> None:
    bundle = typed_only(lambda: KeyBundle.from_bytes(node, raw))
    if isinstance(bundle, KeyBundle):
        assert bundle.to_bytes() == raw
    parsed = typed_only(lambda: parse_share_plaintext(raw))
    if isinstance(parsed, tuple):
        assert share_plaintext(*parsed) == raw
    share = typed_only(lambda: Share.from_bytes(raw))
    if isinstance(share, Share):
        assert len(raw) == SHARE_SIZE and share.to_bytes() == raw


@FUZZ
@given(fields=st.dictionaries(st.sampled_from(["code", "message", "x"]), JSON, max_size=3))
def test_parse_error_raises_only_typed_errors(fields: dict[str, Any]) -> None:
    env = decode(Envelope("masking/v1", "error", b"", 0, 1, 0, fields).encode())
    typed_only(lambda: parse_error(env))


@FUZZ
@given(shares=st.lists(st.binary(min_size=SHARE_SIZE, max_size=SHARE_SIZE), max_size=3))
def test_share_bytes_of_the_right_size_parse_or_refuse(shares: list[bytes]) -> None:
    for raw in shares:
        typed_only(lambda raw=raw: Share.from_bytes(raw))  # type: ignore[misc]


def test_valid_shares_round_trip() -> None:
    shares = split_secret(bytes(32), 2, [1, 2, 3], InsecureSeededRandomForTests(0, quiet=True))
    for share in shares.values():
        assert Share.from_bytes(share.to_bytes()) == share


# --- tensor specs and configs ----------------------------------------------------------------
SPEC_LIKE = st.lists(st.one_of(st.tuples(st.text(max_size=5),
                                         st.lists(st.integers(-2, 1 << 41), max_size=9))
                               .map(lambda t: [t[0], t[1]]), JSON), max_size=4)


@FUZZ
@given(value=st.one_of(JSON, SPEC_LIKE))
def test_tensor_spec_from_json_raises_only_typed_errors(value: Any) -> None:
    spec = typed_only(lambda: TensorSpec.from_json(value))
    if isinstance(spec, TensorSpec):
        assert TensorSpec.from_json(spec.to_json()) == spec


def _config_classes() -> list[type[ConfigBase]]:
    from fedcollm_secure.cotuning.engine import FedCoLLMConfig
    from fedcollm_secure.privacy.config import PrivacySettings
    from fedcollm_secure.secagg.ckks import CKKSConfig

    return [MaskingConfig, CKKSConfig, PrivacySettings, FedCoLLMConfig]


CONFIGS = _config_classes()


def _config_data(cls: type[ConfigBase]) -> st.SearchStrategy[dict[str, Any]]:
    import dataclasses

    names = [f.name for f in dataclasses.fields(cls)]
    return st.dictionaries(st.one_of(st.sampled_from(names), st.text(max_size=6)), JSON,
                           max_size=6)


@FUZZ
@given(data=st.data())
def test_config_from_dict_raises_only_config_errors(data: st.DataObject) -> None:
    cls = data.draw(st.sampled_from(CONFIGS))
    value = data.draw(st.one_of(_config_data(cls), JSON))
    typed_only(lambda: cls.from_dict(value))


def test_config_from_dict_with_keys_that_are_not_strings() -> None:
    with pytest.raises(FedCoLLMSecureError):
        MaskingConfig.from_dict({1: 2, "x": 3})


# --- the audit log ---------------------------------------------------------------------------
def _audit_lines(tmp: Path) -> list[bytes]:
    path = tmp / "a.jsonl"
    with AuditLog(path, signer=SIGNER, fsync=False) as log:
        log.record_round(1, participants=["a", "b"], status="completed")
        log.note(values=[1.5, "x", None], nested={"k": [1, 2]})
    return path.read_bytes().splitlines()


AUDIT_LINES: list[bytes] = []


@pytest.fixture(scope="module")
def audit_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("audit")
    AUDIT_LINES[:] = _audit_lines(tmp)
    return tmp / "a.jsonl"


@FUZZ
@given(data=st.data())
def test_audit_record_parser_raises_only_typed_errors(audit_file: Path,
                                                      data: st.DataObject) -> None:
    line = data.draw(mutations(AUDIT_LINES))
    try:
        rec = parse_record(line, 1)
    except AuditLogError:
        return
    # an edited line fails its hash or canonical form; only the signature is left to the
    # verifier, which knows the key (test_every_changed_byte_of_a_signed_log_is_detected)
    rec.pop("sig", None)
    originals = [json.loads(original) for original in AUDIT_LINES]
    assert rec in [{k: v for k, v in o.items() if k != "sig"} for o in originals]


@FEW
@given(data=st.data())
def test_every_changed_byte_of_a_signed_log_is_detected(audit_file: Path, tmp_path: Path,
                                                        data: st.DataObject) -> None:
    original = audit_file.read_bytes()
    pos = data.draw(st.integers(0, len(original) - 1))
    value = data.draw(st.integers(0, 255).filter(lambda v: v != original[pos]))
    edited = bytearray(original)
    edited[pos] = value
    path = tmp_path / "edited.jsonl"
    path.write_bytes(bytes(edited))
    with pytest.raises(AuditLogError):
        verify_log(path, key=SIGNER.verify_key)


@FEW
@given(data=st.data())
def test_verify_log_raises_only_typed_errors_on_mutated_files(audit_file: Path, tmp_path: Path,
                                                              data: st.DataObject) -> None:
    text = data.draw(st.builds(_mutate, st.just(audit_file.read_bytes()), EDITS))
    path = tmp_path / "mutated.jsonl"
    path.write_bytes(text)
    typed_only(lambda: verify_log(path))
    typed_only(lambda: verify_log(path, allow_open=True))


# --- protocol endpoints fed garbage ----------------------------------------------------------
@FEW
@given(data=mutations(ENVELOPES))
def test_masking_client_answers_garbage_with_an_error_message(data: bytes) -> None:
    agg = MaskingAggregator()
    client = agg.client("c0", {"w": np.ones(3)}, rng=InsecureSeededRandomForTests(0, quiet=True),
                        session=bytes(16), round_=0)
    reply = client.handle(data)
    assert decode(reply).stage == "error"


@FEW
@given(replies=st.lists(mutations(ENVELOPES), min_size=3, max_size=3))
def test_masking_server_rejects_garbage_replies_with_typed_errors(replies: list[bytes]) -> None:
    from fedcollm_secure.errors import ThresholdError

    rng = InsecureSeededRandomForTests(0, quiet=True)
    ids = ["a", "b", "c"]
    server = MaskingAggregator().server(ids, TensorSpec.of({"w": np.ones(3)}), rng=rng,
                                        session=bytes(16))
    req = server.next_requests()
    assert req is not None
    with pytest.raises(ThresholdError):  # nobody gave valid keys: the round cannot go on
        server.receive(req.stage, dict(zip(ids, replies, strict=True)))
    assert set(server.rejected) == set(ids)


# --- ckks decoders ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckks() -> dict[str, Any]:
    from fedcollm_secure.secagg.ckks import CKKSConfig, he

    params = CKKSConfig().params()
    secret = he.new_secret_context(params)
    public = he.public_context_bytes(secret)
    ctx = he.load_public_context(public, params)
    return {"he": he, "params": params, "public": public, "ctx": ctx,
            "ct": he.encrypt(ctx, params, np.arange(10.0))}


@FEW
@given(data=st.data())
def test_ckks_ciphertext_loader_raises_only_typed_errors(ckks: dict[str, Any],
                                                         data: st.DataObject) -> None:
    he, params, ctx = ckks["he"], ckks["params"], ckks["ctx"]
    raw = data.draw(mutations([ckks["ct"]]))
    typed_only(lambda: he.load_vector(ctx, params, raw, 10))


@settings(FEW, max_examples=15)
@given(data=st.data())
def test_ckks_context_loader_raises_only_typed_errors(ckks: dict[str, Any],
                                                      data: st.DataObject) -> None:
    he, params = ckks["he"], ckks["params"]
    raw = data.draw(st.one_of(st.binary(max_size=256),
                              st.builds(_mutate, st.just(ckks["public"]), EDITS)))
    typed_only(lambda: he.load_public_context(raw, params))


@FUZZ
@given(fields=st.dictionaries(st.sampled_from(["code", "message", "x"]), JSON, max_size=3))
def test_ckks_error_messages_raise_only_typed_errors(fields: dict[str, Any]) -> None:
    from fedcollm_secure.secagg.ckks.messages import raise_error

    env = decode(Envelope("ckks/v1", "error", b"", 0, 1, 0, fields).encode())
    with pytest.raises(FedCoLLMSecureError):
        raise_error(env, "peer")


def test_json_strategy_reaches_nested_values() -> None:
    """The JSON strategy must produce nesting, or the fuzzers above would be shallow."""
    found = []

    @settings(max_examples=60, database=None)
    @given(JSON)
    def collect(value: Any) -> None:
        found.append(json.dumps(value))

    collect()
    assert any(s.startswith("[") or s.startswith("{") for s in found)
