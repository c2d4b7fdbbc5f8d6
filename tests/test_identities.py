"""Long-term identities: key files, the allow-list, signed channels for every aggregator, and
the masking consistency check (a server cannot show different survivor sets to clients)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedcollm_secure import secure_sum
from fedcollm_secure.crypto import InsecureSeededRandomForTests
from fedcollm_secure.errors import ConfigError, KeyFormatError, SignatureError
from fedcollm_secure.identity import AllowList, Identities, Identity
from fedcollm_secure.secagg.authenticated import open_message, seal_message
from fedcollm_secure.secagg.masking import CHECKED_STAGES
from fedcollm_secure.transport import FaultPlan, Tamper, flip_bit
from fedcollm_secure.wire import Envelope, decode

CLIP, LEVELS = 4.0, 1 << 16
IDS = [f"c{i}" for i in range(5)]
GEN = np.random.default_rng(11)
UPDATES = {c: {"w": GEN.integers(-LEVELS, LEVELS + 1, 6) * (CLIP / LEVELS)} for c in IDS}
IDENTITIES = Identities.generate(IDS, InsecureSeededRandomForTests(1, quiet=True))


def rng(seed: int = 2) -> InsecureSeededRandomForTests:
    return InsecureSeededRandomForTests(seed, quiet=True)


def run(faults: FaultPlan | None = None, identities: Identities | None = IDENTITIES,
        **kw: Any) -> Any:
    return secure_sum(UPDATES, rng=rng(), faults=faults, identities=identities, clip=CLIP,
                      levels=LEVELS, **kw)


def assert_exact(result: Any) -> None:
    expected = sum(UPDATES[c]["w"] for c in result.survivors)
    np.testing.assert_array_equal(result.sum["w"], expected)


# --- key files and the allow-list ------------------------------------------------------------
def test_identity_file_round_trip_and_permissions(tmp_path: Path) -> None:
    ident = Identity.generate("client-7")
    path = tmp_path / "client-7.key"
    ident.save(path)
    assert (path.stat().st_mode & 0o777) == 0o600
    loaded = Identity.load(path)
    assert loaded.name == "client-7" and loaded.public_key == ident.public_key
    with pytest.raises(ConfigError):
        ident.save(path)  # never overwritten
    os.chmod(path, 0o644)
    with pytest.raises(KeyFormatError, match="chmod 600"):
        Identity.load(path)
    bad = tmp_path / "bad.key"
    bad.write_text("not a key")
    bad.chmod(0o600)
    with pytest.raises(KeyFormatError):
        Identity.load(bad)


def test_allow_list_round_trip_and_refusals(tmp_path: Path) -> None:
    path = tmp_path / "allow.json"
    IDENTITIES.allow_list.save(path)
    assert AllowList.load(path) == IDENTITIES.allow_list
    good = json.loads(path.read_text())
    for bad in [{**good, "version": 2}, {"parties": good["parties"]},
                {**good, "parties": {"c0": "zz" * 32}},
                {**good, "parties": {"c0": good["parties"]["c0"], "c1": good["parties"]["c0"]}},
                {**good, "parties": {"bad name": good["parties"]["c0"]}}]:
        with pytest.raises(ConfigError):
            AllowList.from_json(json.dumps(bad))
    with pytest.raises(SignatureError, match="unknown signer"):
        IDENTITIES.allow_list.verify_key("stranger")
    with pytest.raises(ConfigError):
        Identity.generate("")


def test_signed_message_checks_signer_receiver_and_signature() -> None:
    al, c0 = IDENTITIES.allow_list, IDENTITIES.clients["c0"]
    data = seal_message("masked_input", c0, "server", b"inner")
    assert bytes(open_message(data, sender="c0", receiver="server", allow_list=al).body) == b"inner"
    with pytest.raises(SignatureError):  # c1's name, c0's key
        open_message(seal_message("x", Identity("c1", c0.key), "server", b""), sender="c1",
                     receiver="server", allow_list=al)
    with pytest.raises(SignatureError, match="unknown signer"):
        open_message(seal_message("x", Identity.generate("mallory"), "server", b""),
                     sender="mallory", receiver="server", allow_list=al)
    flipped = bytearray(data)
    flipped[-1] ^= 1
    with pytest.raises(SignatureError):
        open_message(bytes(flipped), sender="c0", receiver="server", allow_list=al)


# --- every aggregator over signed channels ----------------------------------------------------
@pytest.mark.parametrize("protocol", ["masking", "plaintext"])
def test_secure_sum_with_identities_is_exact(protocol: str) -> None:
    with pytest.warns(UserWarning) if protocol == "plaintext" else _nothing():
        result = secure_sum(UPDATES, protocol=protocol, rng=rng(), identities=IDENTITIES,
                            **({"clip": CLIP, "levels": LEVELS} if protocol == "masking" else {}))
    assert result.survivors == IDS
    assert_exact(result)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@pytest.mark.parametrize("stage", CHECKED_STAGES)
def test_dropouts_at_every_stage_with_identities(stage: str) -> None:
    result = run(drop={"c1": stage})
    assert_exact(result)
    assert ("c1" in result.survivors) == (stage in ("consistency_check", "unmask"))


def _resealed_by(ident: Identity) -> Any:
    def edit(data: bytes) -> bytes:
        env = decode(data)
        return seal_message(env.stage, ident, env.fields["to"], bytes(env.body))
    return edit


def test_reply_signed_by_an_unknown_key_is_rejected_and_the_sum_stays_exact() -> None:
    impostor = Identity.generate("c2")  # the right name, a key not on the allow-list
    plan = FaultPlan(tamper=[Tamper("c2", "masked_input", "reply", _resealed_by(impostor))])
    result = run(plan)
    assert "SignatureError" in result.stats["rejected"]["c2"]
    assert "c2" not in result.survivors
    assert_exact(result)


def test_bad_signature_on_a_reply_is_rejected() -> None:
    plan = FaultPlan(tamper=[Tamper("c3", "share_keys", "reply", flip_bit(-1))])
    result = run(plan)
    assert "SignatureError" in result.stats["rejected"]["c3"]
    assert_exact(result)


def test_request_not_signed_by_the_server_is_refused_by_the_client() -> None:
    fake_server = Identity("server", IDENTITIES.clients["c0"].key)
    plan = FaultPlan(tamper=[Tamper("c4", "share_keys", "request", _resealed_by(fake_server))])
    result = run(plan)
    assert "SignatureError" in result.stats["rejected"]["c4"]
    assert_exact(result)


def test_clients_not_on_the_allow_list_cannot_join() -> None:
    others = Identities.generate(IDS[:4], rng(5))
    with pytest.raises(ConfigError, match="no identity"):
        run(identities=others)


def test_a_peer_bundle_not_signed_by_its_listed_key_is_refused() -> None:
    """A malicious server substituting node 2's key bundle (here by node 3's) in the request
    it signs: the client checks each bundle's signer against the allow-list entry of the
    roster name and reveals nothing."""
    def substitute(data: bytes) -> bytes:
        outer = decode(data)
        inner = decode(bytes(outer.body))
        bundles = dict(inner.fields["bundles"])
        bundles["2"] = bundles["3"]
        forged = Envelope(inner.protocol, inner.stage, inner.session, inner.round, inner.src,
                          inner.dst, {**inner.fields, "bundles": bundles}).encode()
        return seal_message(outer.stage, IDENTITIES.server, outer.fields["to"], forged)
    plan = FaultPlan(tamper=[Tamper("c0", "share_keys", "request", substitute)])
    result = run(plan)
    assert "SignatureError" in result.stats["rejected"]["c0"]
    assert_exact(result)


# --- the consistency check (masking) ----------------------------------------------------------
def _edit_fields(change: Any) -> Any:
    def edit(data: bytes) -> bytes:
        env = decode(data)
        fields = dict(env.fields)
        change(fields)
        return Envelope(env.protocol, env.stage, env.session, env.round, env.src, env.dst,
                        fields, bytes(env.body)).encode()
    return edit


def run_checked(plan: FaultPlan, **kw: Any) -> Any:
    return secure_sum(UPDATES, rng=rng(), faults=plan, clip=CLIP, levels=LEVELS,
                      consistency_check=True, **kw)


def test_consistency_check_without_identities_is_exact() -> None:
    result = run_checked(FaultPlan(), drop={"c0": "masked_input", "c2": "consistency_check"})
    assert result.dropped == {"c0": "masked_input"} and "c2" in result.survivors
    assert_exact(result)


def test_unmask_request_contradicting_the_signed_survivor_set_is_refused() -> None:
    """The attack the check stops: c4 is told a surviving peer dropped (to get that peer's
    mask-key share while others reveal its self-mask share)."""
    def move_c1_to_dropped(f: dict[str, Any]) -> None:
        f["survivors"] = [v for v in f["survivors"] if v != 2]
        f["dropped"] = sorted([*f["dropped"], 2])
    plan = FaultPlan(tamper=[Tamper("c4", "unmask", "request",
                                    _edit_fields(move_c1_to_dropped))])
    result = run_checked(plan)
    assert "UnmaskRequestError" in result.stats["rejected"]["c4"]
    assert_exact(result)


def test_unmask_without_enough_confirmations_is_refused() -> None:
    plan = FaultPlan(tamper=[Tamper("c3", "unmask", "request",
                                    _edit_fields(lambda f: f.update(signatures={})))])
    result = run_checked(plan)
    assert "UnmaskRequestError" in result.stats["rejected"]["c3"]
    assert_exact(result)


def test_forged_confirmation_is_refused() -> None:
    def forge(f: dict[str, Any]) -> None:
        sigs = dict(f["signatures"])
        victim = next(k for k in sigs if k != "4")
        sigs[victim] = sigs["4"]  # node 4's signature presented as another node's
        f["signatures"] = sigs
    plan = FaultPlan(tamper=[Tamper("c3", "unmask", "request", _edit_fields(forge))])
    result = run_checked(plan)
    assert "SignatureError" in result.stats["rejected"]["c3"]
    assert_exact(result)


def test_different_survivor_sets_shown_to_different_clients_yield_no_shares() -> None:
    """c0 is shown a survivor set without node 2: its signature over that set does not verify
    at the server, and no client that signed the true set accepts it as a confirmation."""
    plan = FaultPlan(tamper=[Tamper("c0", "consistency_check", "request", _edit_fields(
        lambda f: f.update(survivors=[v for v in f["survivors"] if v != 2])))])
    result = run_checked(plan)
    assert "SignatureError" in result.stats["rejected"]["c0"]
    assert_exact(result)


# --- ckks with long-term identities -------------------------------------------------------------
def test_ckks_with_identities_uses_the_listed_key_authority() -> None:
    idn = Identities.generate(IDS, rng(7), key_authority=True)
    result = secure_sum(UPDATES, protocol="ckks", rng=rng(), identities=idn)
    expected = sum(UPDATES[c]["w"] for c in IDS)
    bound = result.stats["params"]["error_bound"]
    np.testing.assert_allclose(result.sum["w"], expected, atol=bound)
    assert result.survivors == IDS


def test_ckks_refuses_a_key_authority_that_is_not_the_listed_one() -> None:
    from fedcollm_secure.secagg import get_aggregator
    from fedcollm_secure.secagg.tensors import TensorSpec

    idn = Identities.generate(IDS, rng(7), key_authority=True)
    aggregator = get_aggregator("ckks")  # its own authority key, not the listed one
    with pytest.raises(SignatureError):
        aggregator.server(IDS, TensorSpec.of(UPDATES["c0"]), rng=rng(),
                          allow_list=idn.allow_list)
