"""``ckks``: the three roles, parameter validation, dropouts and every refusal.

The contract every aggregator meets (sums, dropouts, typed errors) is in
``test_aggregator_contract.py``; here are the checks specific to CKKS.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import tenseal as ts

from fedcollm_secure import secure_sum
from fedcollm_secure.crypto import InsecureSeededRandomForTests
from fedcollm_secure.errors import (
    CiphertextError,
    ConfigError,
    HEContextError,
    PartyError,
    SignatureError,
    StageError,
    ThresholdError,
    UpdateValidationError,
)
from fedcollm_secure.secagg import TensorSpec, get_aggregator
from fedcollm_secure.secagg.ckks import PRESETS, CKKSAggregator, CKKSConfig, CKKSParams, he
from fedcollm_secure.secagg.ckks.messages import (
    AUTHORITY,
    DECRYPT,
    ENCRYPTED_INPUT,
    F_CONTEXT_DIGEST,
    F_CONTRIBUTORS,
    F_LENGTH,
    F_RECEIPTS,
    OPEN_ROUND,
    envelope,
)
from fedcollm_secure.transport import FaultPlan, InProcessChannel, Tamper, drive, flip_bit
from fedcollm_secure.wire import SERVER, b64, decode

IDS = ["c1", "c2", "c3", "c4"]
P = PRESETS["n8192"]


def rng(seed: int = 0) -> InsecureSeededRandomForTests:
    return InsecureSeededRandomForTests(seed, quiet=True)


def updates(seed: int = 0, d: int = 10) -> dict[str, dict[str, np.ndarray]]:
    gen = np.random.default_rng(seed)
    return {c: {"w": gen.uniform(-1, 1, d)} for c in IDS}


def exact(ups: dict[str, dict[str, np.ndarray]], ids: list[str]) -> np.ndarray:
    out: np.ndarray = np.sum([ups[c]["w"] for c in ids], axis=0)
    return out


def run(ups: dict[str, Any] | None = None, **kw: Any) -> Any:
    return secure_sum(updates() if ups is None else ups, protocol="ckks", rng=rng(1), **kw)


# --- parameters ------------------------------------------------------------------------------
def test_presets_are_documented_and_within_the_he_standard() -> None:
    assert P.poly_modulus_degree == 8192 and P.coeff_mod_bit_sizes == (60, 40, 60)
    assert P.scale == 2.0 ** 40 and P.slots == 4096
    for p in PRESETS.values():
        d = p.describe()
        assert d["total_bits"] <= d["he_standard_max_bits"] and d["security_bits"] == 128
        assert d["error_per_contribution"] > 0 and d["headroom_bits"] >= 9
    assert PRESETS["n16384"].poly_modulus_degree == 16384


@pytest.mark.parametrize("options,match", [
    ({"coeff_mod_bit_sizes": [60, 40, 40, 60, 60]}, "exceed the HE-standard limit"),
    ({"poly_modulus_degree": 4096, "coeff_mod_bit_sizes": [60, 40, 60]}, "HE-standard"),
    ({"poly_modulus_degree": 2048}, "must be one of"),
    ({"scale_bits": 55}, "scale_bits"),
    ({"coeff_mod_bit_sizes": [45, 40, 60]}, "must exceed scale_bits"),
    ({"coeff_mod_bit_sizes": [60, 30, 60]}, "middle primes"),
    ({"coeff_mod_bit_sizes": [60, 40, 50]}, "special"),
    ({"coeff_mod_bit_sizes": [60, 40, 61]}, "20 to 60 bits"),
    ({"preset": "n4096"}, "not one of"),
    ({"min_threshold": 1}, "min_threshold"),
    ({"max_abs_value": float("inf")}, "max_abs_value"),
    ({"no_such_option": 1}, "unknown key"),
])
def test_unsafe_or_invalid_parameters_are_refused_at_config_time(options: dict[str, Any],
                                                                   match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        get_aggregator("ckks", **options)


def test_a_custom_valid_combination_and_the_larger_preset_work() -> None:
    ups = updates(3, d=5000)  # two chunks at N=8192, one at N=16384
    for options in ({"preset": "n16384"}, {"coeff_mod_bit_sizes": [60, 40, 40, 60]}):
        result = run(ups, **options)
        assert np.abs(result.sum["w"] - exact(ups, IDS)).max() <= \
            result.stats["params"]["error_bound"]


def test_max_abs_value_must_fit_the_headroom() -> None:
    with pytest.raises(ConfigError, match="overflow"):
        run(max_abs_value=2.0 ** 18)
    big = updates()
    big["c2"]["w"][0] = 100.0
    result = run(big, max_abs_value=10.0)
    assert "c2" not in result.survivors
    assert "UpdateValidationError" in result.stats["rejected"]["c2"]


# --- roles -----------------------------------------------------------------------------------
def round_parts(options: dict[str, Any] | None = None, ups: dict[str, Any] | None = None,
                threshold: int | None = None) -> tuple[CKKSAggregator, Any, dict[str, Any]]:
    agg = CKKSAggregator(**(options or {}))
    ups = ups or updates()
    session = rng(5).bytes(16)
    clients = {c: agg.client(c, ups[c], session=session, round_=3) for c in IDS}
    server = agg.server(IDS, TensorSpec.of(ups["c1"]), threshold=threshold, session=session,
                        round_=3)
    return agg, server, clients


def test_each_role_holds_only_its_keys_and_the_authority_logs_decryptions() -> None:
    agg, server, clients = round_parts()
    ups = updates()
    req = server.next_requests()
    assert req is not None
    (state,) = agg.authority.rounds.values()  # key authority: this round's secret key
    assert state.ctx is not None and state.ctx.has_secret_key()
    replies = {c: clients[c].handle(m) for c, m in req.messages.items() if c != "c4"}
    server.receive(req.stage, replies)
    result = server.result()
    assert result.dropped == {"c4": ENCRYPTED_INPUT}
    assert np.abs(result.sum["w"] - exact(ups, IDS[:3])).max() <= 3 * P.error_per_contribution
    assert state.decrypted and state.ctx is None  # the key is discarded after its one use
    # aggregator: public key only
    assert server.ctx is not None and not server.ctx.has_secret_key()
    assert not server.ctx.has_galois_keys() and not server.ctx.has_relin_keys()
    (record,) = agg.authority.decryptions
    assert record.requester == SERVER and record.round == 3
    assert record.contributors == 3 and record.contributor_ids == ("c1", "c2", "c3")
    assert record.session == server.session.hex()
    assert result.stats["decrypted_contributors"] == 3


def authority_request(stage: str, server: Any, fields: dict[str, Any], body: bytes = b"") -> bytes:
    return envelope(stage, server.session, server.round, SERVER, AUTHORITY, fields, body).encode()


def test_the_authority_decrypts_only_once_per_round_and_only_enough_contributors() -> None:
    agg, server, clients = round_parts()
    drive(server, InProcessChannel(clients))
    ka = agg.authority
    one = he.encrypt(server.ctx, P, np.r_[updates()["c1"]["w"], 1.0, 1.0])
    base = {F_CONTEXT_DIGEST: b64(server.context_digest), F_LENGTH: server.length,
            F_RECEIPTS: {}}
    with pytest.raises(StageError, match="once per round"):
        ka.process(authority_request(DECRYPT, server, {**base, F_CONTRIBUTORS: [1, 2, 3]}, one))
    # a fresh round: below t, unknown or duplicate contributors, missing receipts
    agg2, server2, _ = round_parts()
    server2.next_requests()
    ka2 = agg2.authority
    one = he.encrypt(server2.ctx, P, np.r_[updates()["c1"]["w"], 1.0, 1.0])
    base = {F_CONTEXT_DIGEST: b64(server2.context_digest), F_LENGTH: server2.length,
            F_RECEIPTS: {}}
    with pytest.raises(ThresholdError):
        ka2.process(authority_request(DECRYPT, server2, {**base, F_CONTRIBUTORS: [1, 2]}, one))
    with pytest.raises(PartyError):
        ka2.process(authority_request(DECRYPT, server2, {**base, F_CONTRIBUTORS: [1, 1, 2]}, one))
    with pytest.raises(PartyError):
        ka2.process(authority_request(DECRYPT, server2, {**base, F_CONTRIBUTORS: [1, 2, 9]}, one))
    with pytest.raises(PartyError, match="receipt"):
        ka2.process(authority_request(DECRYPT, server2, {**base, F_CONTRIBUTORS: [1, 2, 3]}, one))
    assert ka2.decryptions == [] and not next(iter(ka2.rounds.values())).decrypted


def test_the_authority_refuses_an_aggregate_that_does_not_cover_the_claimed_clients() -> None:
    """One client's ciphertext presented as the sum of three: the encrypted count is 1."""
    agg, server, _ = round_parts({"sign": False})
    server.next_requests()
    one = he.encrypt(server.ctx, P, np.r_[updates()["c1"]["w"], 1.0, 1.0])
    fields = {F_CONTEXT_DIGEST: b64(server.context_digest), F_LENGTH: server.length,
              F_RECEIPTS: {}, F_CONTRIBUTORS: [1, 2, 3]}
    with pytest.raises(CiphertextError, match="claims 3"):
        agg.authority.process(authority_request(DECRYPT, server, fields, one))
    assert agg.authority.decryptions == []


def test_the_authority_checks_signed_receipts() -> None:
    """A receipt the client did not sign (here: forwarded altered by the aggregator) makes
    the authority refuse the whole decryption."""
    agg, server, clients = round_parts()
    req = server.next_requests()
    replies = {c: clients[c].process(m) for c, m in req.messages.items()}
    env = decode(replies["c2"])
    env.fields["receipt"] = b64(bytes(64))
    env.signature = None
    replies["c2"] = env.encode(agg.identities["c2"])  # envelope still validly signed
    with pytest.raises(SignatureError, match="key authority refused"):
        server.receive(ENCRYPTED_INPUT, replies)
    assert agg.authority.decryptions == []


# --- contexts --------------------------------------------------------------------------------
def secret_context() -> ts.Context:
    return he.new_secret_context(P)


@pytest.mark.parametrize("what", ["secret", "galois", "relin"])
def test_the_aggregator_refuses_a_context_with_keys_it_must_not_hold(what: str) -> None:
    ctx = secret_context()
    if what == "galois":
        ctx.generate_galois_keys()
    data = ctx.serialize(save_public_key=True, save_secret_key=what == "secret",
                         save_galois_keys=what == "galois", save_relin_keys=what == "relin")
    with pytest.raises(HEContextError, match="refused"):
        he.load_public_context(data, P)
    he.load_public_context(he.public_context_bytes(ctx), P)  # the public part is accepted


def test_contexts_with_other_parameters_or_garbage_are_refused() -> None:
    other = he.new_secret_context(CKKSParams("x", 8192, (60, 40, 40, 60), 40))
    with pytest.raises(HEContextError, match="parameters differ"):
        he.load_public_context(he.public_context_bytes(other), P)
    rescaled = secret_context()
    rescaled.global_scale = 2.0 ** 30
    with pytest.raises(HEContextError, match="scale"):
        he.load_public_context(he.public_context_bytes(rescaled), P)
    data = he.public_context_bytes(secret_context())
    for bad in (b"", data[: len(data) // 2], b"\x00" * 100):
        with pytest.raises(HEContextError):
            he.load_public_context(bad, P)


def test_a_malicious_key_authority_that_ships_its_secret_key_is_refused() -> None:
    agg, server, _ = round_parts()
    real = agg.authority._open_round

    def leaky(env: Any) -> bytes:
        reply = decode(real(env))
        state = agg.authority.rounds[(env.session, env.round)]
        reply.body = state.ctx.serialize(save_secret_key=True, save_galois_keys=False,
                                         save_relin_keys=False)
        reply.fields[F_CONTEXT_DIGEST] = b64(he.context_digest(reply.body))
        reply.signature = None
        return reply.encode(agg.authority.signer)

    agg.authority._open_round = leaky  # type: ignore[method-assign]
    with pytest.raises(HEContextError, match="secret key"):
        server.next_requests()


def test_clients_refuse_a_context_not_signed_by_the_key_authority() -> None:
    """An aggregator that substitutes its own key pair (so it could decrypt each input)."""
    agg, _, clients = round_parts()
    rogue = CKKSAggregator()
    for cid, key in agg.client_keys.items():
        rogue.enroll(cid, key)
    server = rogue.server(IDS, TensorSpec.of(updates()["c1"]), session=clients["c1"].session,
                          round_=3)
    req = server.next_requests()
    assert req is not None
    for cid, msg in req.messages.items():
        with pytest.raises(SignatureError):
            clients[cid].process(msg)
    assert all(not c.done for c in clients.values())


def test_clients_refuse_weaker_parameters() -> None:
    agg, server, _ = round_parts({"preset": "n16384"})
    req = server.next_requests()
    client = CKKSAggregator().client("c1", updates()["c1"], session=server.session, round_=3)
    client.authority_key = agg.authority.verify_key
    with pytest.raises(HEContextError, match="differ"):
        client.process(req.messages["c1"])


# --- integrity -------------------------------------------------------------------------------
def cut_body(data: bytes) -> bytes:
    env = decode(data)
    env.body = bytes(env.body)[:-1000]
    env.signature = None
    return env.encode()


def rebind(session: bytes | None = None, round_: int | None = None) -> Any:
    def edit(data: bytes) -> bytes:
        env = decode(data)
        env.session = session if session is not None else env.session
        env.round = round_ if round_ is not None else env.round
        env.signature = None
        return env.encode()
    return edit


@pytest.mark.parametrize("sign", [True, False])
@pytest.mark.parametrize("case,expected", [
    ("truncated message", "WireFormatError"),
    ("bit flip in the ciphertext", None),
    ("cut ciphertext, envelope re-encoded", None),
    ("another session", "SessionMismatchError"),
    ("another round", "ReplayError"),
])
def test_cut_corrupted_or_misbound_ciphertexts_are_rejected_before_the_sum(
        sign: bool, case: str, expected: str | None) -> None:
    edits = {"truncated message": lambda b: b[:-100],
             "bit flip in the ciphertext": flip_bit(-5000, 3),
             "cut ciphertext, envelope re-encoded": cut_body,
             "another session": rebind(session=b"\x01" * 16),
             "another round": rebind(round_=4)}
    if expected is None:  # signed: the signature fails; unsigned: the digest
        expected = "SignatureError" if sign else "CiphertextError"
    ups = updates(7)
    plan = FaultPlan(tamper=[Tamper("c2", ENCRYPTED_INPUT, "reply", edits[case])])
    result = run(ups, faults=plan, sign=sign)
    assert "c2" not in result.survivors and result.dropped["c2"] == ENCRYPTED_INPUT
    assert result.stats["rejected"]["c2"].startswith(expected), result.stats["rejected"]
    assert np.abs(result.sum["w"] - exact(ups, ["c1", "c3", "c4"])).max() <= \
        result.stats["params"]["error_bound"]


def test_a_ciphertext_made_for_another_context_is_rejected() -> None:
    """A genuine ciphertext of another round (other key pair) presented with this round's
    routing and digests: the context binding (and, when signed, the signature) catch it."""
    for sign in (False, True):
        agg, server, clients = round_parts({"sign": sign})
        other_ctx = he.load_public_context(he.public_context_bytes(secret_context()), P)
        foreign = he.encrypt(other_ctx, P, np.r_[updates()["c2"]["w"], 1.0, 1.0])
        req = server.next_requests()
        replies = {c: clients[c].process(m) for c, m in req.messages.items()}
        env = decode(replies["c2"])
        env.body = foreign
        env.fields["ciphertext_digest"] = b64(he.ciphertext_digest(foreign))
        env.fields["context_digest"] = b64(he.context_digest(b"another context"))
        env.signature = None
        replies["c2"] = env.encode(agg.identities.get("c2"))
        server.receive(ENCRYPTED_INPUT, replies)
        assert "CiphertextError" in server.rejected["c2"] and "another context" in \
            server.rejected["c2"]


def test_below_threshold_after_rejections_raises_and_nothing_is_decrypted() -> None:
    agg, server, clients = round_parts(threshold=4)
    plan = FaultPlan(tamper=[Tamper("c1", ENCRYPTED_INPUT, "reply", flip_bit(-300))])
    with pytest.raises(ThresholdError):
        drive(server, InProcessChannel(clients, plan))
    assert agg.authority.decryptions == []


def test_repeated_or_out_of_order_requests_are_refused() -> None:
    agg, server, clients = round_parts()
    req = server.next_requests()
    clients["c1"].process(req.messages["c1"])
    with pytest.raises(StageError):
        clients["c1"].process(req.messages["c1"])
    with pytest.raises(StageError):
        agg.authority.process(authority_request(OPEN_ROUND, server, {}))
    wrong_party = envelope(DECRYPT, server.session, server.round, 1, AUTHORITY, {}).encode()
    with pytest.raises(PartyError):
        agg.authority.process(wrong_party)


def test_client_refuses_a_weight_or_update_out_of_range() -> None:
    with pytest.raises(UpdateValidationError):
        CKKSAggregator().client("c1", updates()["c1"], weight=float("nan"))
    assert CKKSConfig().max_abs_for(4) == P.max_abs_sum / 8


@pytest.mark.parametrize("preset", ["n8192", "n8192-sum"])
def test_clients_encrypt_at_the_lowest_level_in_tenseals_own_format(preset: str) -> None:
    params = PRESETS[preset]
    ctx = he.new_secret_context(params)
    public = he.load_public_context(he.public_context_bytes(ctx), params)
    values = np.random.default_rng(3).uniform(-1, 1, params.slots + 5)
    values[:3] = [0.0, 1.0, -1.0]
    body = he.encrypt(public, params, values)
    vec = he.load_vector(public, params, body, values.size)  # checks level, size, scale
    low = ctx.seal_context().data.last_parms_id()
    assert all(tuple(ct.parms_id()) == tuple(low) for ct in vec.ciphertext())
    assert vec.serialize() == body  # what TenSEAL itself writes for these ciphertexts
    decrypted = he.decrypt(ctx, ts.ckks_vector_from(ctx, body))
    assert decrypted.shape == values.shape
    assert np.max(np.abs(decrypted - values)) < params.error_per_contribution
    assert he.encrypt(public, params, values) != body  # fresh randomness every time


def test_encryption_works_without_anonymous_memory_files(monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    monkeypatch.delattr(os, "memfd_create", raising=False)
    params = PRESETS["n8192"]
    ctx = he.new_secret_context(params)
    values = np.linspace(-1, 1, 100)
    body = he.encrypt(ctx, params, values)
    out = he.decrypt(ctx, he.load_vector(ctx, params, body, values.size))
    assert np.max(np.abs(out - values)) < params.error_per_contribution
