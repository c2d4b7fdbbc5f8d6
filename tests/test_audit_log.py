"""The audit log: a clean run verifies; every kind of tampering is detected and located.

Tampering is done the way an attacker with write access to the file would: editing bytes,
recomputing hashes, deleting, duplicating, reordering or truncating lines, forging
signatures. Each case names the line where verification must break.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedcollm_secure import secure_sum
from fedcollm_secure.audit import AuditLog, GENESIS, canonical_json, record_hash, verify_log
from fedcollm_secure.audit.cotuning import record_privacy_from
from fedcollm_secure.audit.records import sign_hash
from fedcollm_secure.cli import main
from fedcollm_secure.crypto import InsecureSeededRandomForTests
from fedcollm_secure.crypto.signatures import SigningKey, generate_signing_key
from fedcollm_secure.errors import (
    AuditChainError,
    AuditIncompleteError,
    AuditLogError,
    FedCoLLMSecureError,
)
from fedcollm_secure.transport import FaultPlan, Tamper, flip_bit


def key(seed: int) -> SigningKey:
    return generate_signing_key(InsecureSeededRandomForTests(seed, quiet=True))


SERVER_KEY, OTHER_KEY = key(1), key(2)


def write_run(path: Path, signer: SigningKey | None = None, *, close: bool = True) -> AuditLog:
    """A run with one record of every kind (8 lines when closed)."""
    log = AuditLog(path, signer=signer, fsync=False)
    log.record_config("test", {"clip": 1.0, "weights": [1, 2]})
    log.record_messages(1, "advertise_keys", {"a": b"x" * 10, "b": b"y", "c": b""})
    log.record_round(1, participants=["a", "b", "c"], status="completed")
    artifact = path.parent / "adapter.safetensors"
    artifact.write_bytes(b"\x00" * 100)
    log.record_artifact(artifact, round_=1)
    log.record_decryption(1, contributors=["a", "b"], threshold=2, authority="ff" * 32)
    log.record_privacy(1, mechanism="dpsgd", epsilon=2.5, delta=1e-5, epsilon_round=1.0)
    if close:
        log.close()
    return log


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def put(path: Path, rows: list[bytes]) -> None:
    path.write_bytes(b"".join(rows))


def rewrite(row: bytes, signer: SigningKey | None = None, **changes: Any) -> bytes:
    """A record line with ``changes`` applied and its hash (and signature) recomputed."""
    rec = json.loads(row)
    rec.update(changes)
    rec["hash"] = record_hash(rec)
    rec.pop("sig", None)
    if signer is not None:
        rec["sig"] = sign_hash(signer, rec["hash"])
    return canonical_json(rec) + b"\n"


def breaks_at(path: Path, line: int, match: str | None = None, **kw: Any) -> AuditChainError:
    with pytest.raises(AuditChainError, match=match) as info:
        verify_log(path, **kw)
    assert info.value.line == line, str(info.value)
    assert f"line {line}" in str(info.value)
    return info.value


@pytest.fixture(params=["unsigned", "signed"])
def signer(request: pytest.FixtureRequest) -> SigningKey | None:
    return SERVER_KEY if request.param == "signed" else None


@pytest.fixture
def log_path(tmp_path: Path, signer: SigningKey | None) -> Path:
    path = tmp_path / "audit.jsonl"
    write_run(path, signer)
    return path


# --- a clean log ---------------------------------------------------------------------------------
def test_clean_log_verifies_with_its_summary(log_path: Path, signer: SigningKey | None) -> None:
    summary = verify_log(log_path, key=SERVER_KEY.verify_key if signer else None)
    assert summary.records == 8 and len(summary.runs) == 1
    run = summary.runs[0]
    assert run.closed and run.status == "ok" and run.what == "test"
    assert run.signer == (SERVER_KEY.verify_key.raw.hex() if signer else None)
    assert run.rounds == [1] and run.participants == {"a", "b", "c"}
    assert (run.messages, run.artifacts, run.decryptions) == (3, 1, 1)
    assert run.epsilon == {"dpsgd": 2.5}
    assert summary.head == json.loads(lines(log_path)[-1])["hash"]
    assert json.loads(lines(log_path)[0])["prev"] == GENESIS
    assert "closed (ok)" in summary.render()


def test_each_line_is_canonical_and_chained(log_path: Path) -> None:
    prev = GENESIS
    for i, row in enumerate(lines(log_path)):
        rec = json.loads(row)
        assert row == canonical_json(rec) + b"\n"
        assert rec["seq"] == i and rec["prev"] == prev
        body = {k: rec[k] for k in ("seq", "time", "kind", "payload", "prev")}
        assert rec["hash"] == hashlib.sha256(canonical_json(body)).hexdigest()
        prev = rec["hash"]


def test_artifact_digest_is_the_files_sha256(log_path: Path) -> None:
    artifact = next(json.loads(r) for r in lines(log_path) if b'"artifact"' in r)
    data = (log_path.parent / "adapter.safetensors").read_bytes()
    assert artifact["payload"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert artifact["payload"]["bytes"] == 100


def test_non_finite_numbers_are_written_as_strings(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    with AuditLog(path, fsync=False) as log:
        log.note(values=[float("nan"), float("inf"), -float("inf"), 1.5], raw=b"\x01\xff")
    note = json.loads(lines(path)[1])["payload"]
    assert note == {"values": ["NaN", "Infinity", "-Infinity", 1.5], "raw": "01ff"}
    verify_log(path)


# --- tampering -------------------------------------------------------------------------------
@pytest.mark.parametrize("at", [1, 3, 5, 8])
def test_edited_record_is_located(log_path: Path, at: int) -> None:
    rows = lines(log_path)
    rows[at - 1] = rows[at - 1].replace(b'"seq":', b'"seq": ', 1)  # not canonical any more
    put(log_path, rows)
    breaks_at(log_path, at, "canonical")


@pytest.mark.parametrize("at", [2, 3, 6])
def test_edited_payload_fails_its_hash(log_path: Path, at: int) -> None:
    rows = lines(log_path)
    rec = json.loads(rows[at - 1])
    rec["payload"]["forged"] = True
    rows[at - 1] = canonical_json(rec) + b"\n"
    put(log_path, rows)
    breaks_at(log_path, at, "hash does not match")


@pytest.mark.parametrize("at", [2, 4, 7])
def test_edit_with_recomputed_hash_breaks_the_chain_or_the_signature(
        log_path: Path, signer: SigningKey | None, at: int) -> None:
    rows = lines(log_path)
    payload = json.loads(rows[at - 1])["payload"]
    rows[at - 1] = rewrite(rows[at - 1], payload={**payload, "forged": True})
    put(log_path, rows)
    if signer is None:  # the next record's prev no longer matches
        breaks_at(log_path, at + 1, "prev does not match")
    else:  # the record itself carries no valid signature any more
        breaks_at(log_path, at, "no signature")


def test_edit_with_the_whole_tail_rewritten_needs_a_pinned_key_or_head(tmp_path: Path) -> None:
    """An unsigned log rewritten from the edit to the end is self-consistent: only a head
    kept elsewhere shows it; a signed one needs the pinned key."""
    path = tmp_path / "a.jsonl"
    write_run(path)
    head = verify_log(path).head
    rows, prev = lines(path), None
    for i in range(2, len(rows)):
        rec = json.loads(rows[i])
        if i == 2:
            rec["payload"]["status"] = "forged"
        changes = {"payload": rec["payload"]} | ({"prev": prev} if prev else {})
        rows[i] = rewrite(rows[i], **changes)
        prev = json.loads(rows[i])["hash"]
    put(path, rows)
    verify_log(path)  # the chain alone cannot tell
    assert head is not None
    breaks_at(path, len(rows), "expected head", expect_head=head)
    signed = tmp_path / "s.jsonl"
    write_run(signed, SERVER_KEY)
    rows, prev = lines(signed), None
    rows[0] = rewrite(rows[0], OTHER_KEY, payload={**json.loads(rows[0])["payload"],
                                                   "signer": OTHER_KEY.verify_key.raw.hex()})
    prev = json.loads(rows[0])["hash"]
    for i in range(1, len(rows)):
        rows[i] = rewrite(rows[i], OTHER_KEY, prev=prev)
        prev = json.loads(rows[i])["hash"]
    put(signed, rows)
    verify_log(signed)  # signed by the key it names ...
    breaks_at(signed, 1, "not by the given key", key=SERVER_KEY.verify_key)  # ... not ours


@pytest.mark.parametrize("at", [2, 4, 7])
def test_deleted_record_is_located(log_path: Path, at: int) -> None:
    rows = lines(log_path)
    del rows[at - 1]
    put(log_path, rows)
    breaks_at(log_path, at, "deleted, inserted or reordered")


def test_deleted_first_record_is_located(log_path: Path) -> None:
    put(log_path, lines(log_path)[1:])
    breaks_at(log_path, 1)


@pytest.mark.parametrize("at", [1, 3, 7])
def test_reordered_records_are_located(log_path: Path, at: int) -> None:
    rows = lines(log_path)
    rows[at - 1], rows[at] = rows[at], rows[at - 1]
    put(log_path, rows)
    breaks_at(log_path, at)


def test_duplicated_record_is_located(log_path: Path) -> None:
    rows = lines(log_path)
    rows.insert(4, rows[3])
    put(log_path, rows)
    breaks_at(log_path, 5, "deleted, inserted or reordered")


def test_inserted_record_with_a_valid_hash_is_located(log_path: Path,
                                                      signer: SigningKey | None) -> None:
    rows = lines(log_path)
    forged = rewrite(rows[3], signer, payload={"round": 9, "participants": ["mallory"],
                                               "status": "completed"})
    rows.insert(4, forged)
    put(log_path, rows)
    breaks_at(log_path, 5)


@pytest.mark.parametrize("cut", [1, 2, 5])
def test_truncated_log_is_incomplete(log_path: Path, cut: int) -> None:
    rows = lines(log_path)
    put(log_path, rows[:-cut])
    with pytest.raises(AuditIncompleteError, match="incomplete") as info:
        verify_log(log_path)
    assert info.value.line == len(rows) - cut
    summary = verify_log(log_path, allow_open=True)  # "still running" is accepted on request
    assert summary.open_runs and summary.records == len(rows) - cut


def test_log_cut_inside_a_line_is_incomplete(log_path: Path) -> None:
    data = log_path.read_bytes()
    log_path.write_bytes(data[:-40])
    with pytest.raises(AuditIncompleteError, match="cut off") as info:
        verify_log(log_path)
    assert info.value.line == 8
    assert verify_log(log_path, allow_open=True).records == 7


def test_end_record_with_a_wrong_count_is_caught(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    write_run(path)
    rows = lines(path)
    del rows[3:5]  # two records gone, and the tail re-chained by someone who forgot the count
    prev = json.loads(rows[2])["hash"]
    for i in range(3, len(rows)):
        rows[i] = rewrite(rows[i], prev=prev, seq=i)
        prev = json.loads(rows[i])["hash"]
    put(path, rows)
    breaks_at(path, len(rows), "counts 8 records")


def test_forged_signature_is_located(tmp_path: Path) -> None:
    log_path = tmp_path / "a.jsonl"
    write_run(log_path, SERVER_KEY)
    rows = lines(log_path)
    rec = json.loads(rows[4])
    rec["sig"] = sign_hash(OTHER_KEY, rec["hash"])
    rows[4] = canonical_json(rec) + b"\n"
    put(log_path, rows)
    breaks_at(log_path, 5, "signature does not verify")


def test_stripped_signature_is_located(tmp_path: Path) -> None:
    log_path = tmp_path / "a.jsonl"
    write_run(log_path, SERVER_KEY)
    rows = lines(log_path)
    rec = json.loads(rows[2])
    del rec["sig"]
    rows[2] = canonical_json(rec) + b"\n"
    put(log_path, rows)
    breaks_at(log_path, 3, "no signature")


def test_unsigned_log_fails_when_a_key_is_required(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    write_run(path)
    breaks_at(path, 1, "not signed", key=SERVER_KEY.verify_key)


def test_record_after_the_end_must_start_a_new_run(log_path: Path,
                                                   signer: SigningKey | None) -> None:
    rows = lines(log_path)
    last = json.loads(rows[-1])
    rows.append(rewrite(rows[-2], signer, seq=8, prev=last["hash"]))
    put(log_path, rows)
    breaks_at(log_path, 9, "outside any run")


# --- the writer --------------------------------------------------------------------------------
def test_runs_append_and_never_rewrite(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    write_run(path, SERVER_KEY)
    first = path.read_bytes()
    with AuditLog(path, fsync=False) as log:  # a second, unsigned run
        log.note(hello=1)
    assert path.read_bytes().startswith(first)
    summary = verify_log(path)
    assert [r.records for r in summary.runs] == [8, 3]
    assert [bool(r.signer) for r in summary.runs] == [True, False]
    second_start = json.loads(lines(path)[8])
    assert second_start["prev"] == json.loads(lines(path)[7])["hash"]
    assert second_start["payload"]["previous_run_closed"] is True


def test_a_crashed_run_is_reported_even_when_another_follows(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    write_run(path)
    put(path, lines(path)[:-1])  # the process died before the end record
    with AuditLog(path, fsync=False):
        pass
    with pytest.raises(AuditIncompleteError):
        verify_log(path)
    summary = verify_log(path, allow_open=True)
    assert [r.closed for r in summary.runs] == [False, True]
    assert any("no end record" in n for n in summary.notes)


def test_writer_refuses_a_log_ending_in_a_partial_record(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    write_run(path)
    before = path.read_bytes()[:-10]
    path.write_bytes(before)
    with pytest.raises(AuditLogError, match="partial record"):
        AuditLog(path)
    assert path.read_bytes() == before


def test_writer_refuses_a_tampered_last_record(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    write_run(path)
    rows = lines(path)
    rows[-1] = rows[-1].replace(b'"status":"ok"', b'"status":"OK"')
    put(path, rows)
    with pytest.raises(AuditChainError):
        AuditLog(path)


def test_second_writer_is_locked_out(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    with AuditLog(path, fsync=False):
        with pytest.raises(AuditLogError, match="another process"):
            AuditLog(path)
    verify_log(path)


def test_anchor_chains_a_new_log(tmp_path: Path) -> None:
    path, anchor = tmp_path / "a.jsonl", bytes(range(32))
    with AuditLog(path, anchor=anchor, fsync=False):
        pass
    assert json.loads(lines(path)[0])["prev"] == anchor.hex()
    verify_log(path, expect_genesis=anchor.hex())
    breaks_at(path, 1, "expected anchor", expect_genesis="11" * 32)
    with pytest.raises(AuditLogError, match="new log only"):
        AuditLog(path, anchor=anchor)


def test_closing_with_an_error_records_it(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    with pytest.raises(FedCoLLMSecureError):
        with AuditLog(path, fsync=False):
            raise FedCoLLMSecureError("boom")
    run = verify_log(path).runs[0]
    assert run.status == "aborted"
    assert json.loads(lines(path)[-1])["payload"]["error"] == "FedCoLLMSecureError: boom"


def test_start_and_end_are_reserved(tmp_path: Path) -> None:
    with AuditLog(tmp_path / "a.jsonl", fsync=False) as log:
        with pytest.raises(AuditLogError):
            log.append("end", {})
    with pytest.raises(AuditLogError, match="closed"):
        log.note(x=1)


def test_privacy_is_taken_from_a_ledger_record(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    ledger_record = {
        "round": 2,
        "dpsgd": {"delta": 1e-5, "accountant": "rdp", "privacy_unit": "example",
                  "clients": {"c0": {"epsilon_round": 0.5, "epsilon_cumulative": 1.0},
                              "c1": {"epsilon_round": 0.7, "epsilon_cumulative": 1.4}},
                  "aggregate": {"epsilon_cumulative": 1.4}},
        "ddp": {"epsilon_round": 2.0, "epsilon_cumulative": 3.0, "delta": 1e-6,
                "privacy_unit": "client", "releases": 2}}
    with AuditLog(path, fsync=False) as log:
        record_privacy_from(log, 2, ledger_record)
    assert verify_log(path).runs[0].epsilon == {"dpsgd": 1.4, "ddp": 3.0}
    dp = json.loads(lines(path)[1])["payload"]
    assert dp["per_client"] == {"c0": 1.0, "c1": 1.4} and dp["epsilon_round"] == 0.7


# --- secure_sum(..., audit_log=PATH) --------------------------------------------------------
def test_secure_sum_writes_a_verifiable_log_with_every_reply_digest(tmp_path: Path) -> None:
    ids = [f"c{i}" for i in range(5)]
    updates = {c: {"w": np.arange(6.0).reshape(2, 3) * (i + 1) / 8} for i, c in enumerate(ids)}
    seen: dict[tuple[str, str], str] = {}

    def observe(stage: str, cid: str, direction: str, data: bytes) -> None:
        if direction == "reply":
            seen[(stage, cid)] = hashlib.sha256(data).hexdigest()

    plan = FaultPlan(tamper=[Tamper("c3", "share_keys", "reply", flip_bit(-1))])
    path = tmp_path / "sum.jsonl"
    result = secure_sum(updates, audit_log=path, drop={"c1": "masked_input"}, faults=plan,
                        observers=(observe,), round_=7,
                        rng=InsecureSeededRandomForTests(4, quiet=True))
    summary = verify_log(path)
    run = summary.runs[0]
    assert run.what == "secure_sum" and run.status == "ok" and run.rounds == [7]
    assert run.participants == set(ids)
    records = [json.loads(r) for r in lines(path)]
    digests = {(r["payload"]["stage"], c): d for r in records if r["kind"] == "messages"
               for c, d in r["payload"]["digests"].items()}
    assert digests == seen  # every reply the server received, as it received it
    (round_rec,) = [r["payload"] for r in records if r["kind"] == "round"]
    assert round_rec["survivors"] == sorted(result.survivors)
    assert round_rec["dropped"] == result.dropped == {"c1": "masked_input", "c3": "share_keys"}
    assert "MacError" in round_rec["rejected"]["c3"]
    assert round_rec["params"]["threshold"] == result.stats["params"]["threshold"]
    config = next(r["payload"] for r in records if r["kind"] == "config")
    assert config["config"]["protocol"] == "masking"
    assert {"torch", "cryptography", "tenseal", "fedcollm_secure"} <= set(config["libraries"])


def test_an_aborted_secure_sum_is_recorded_and_closed(tmp_path: Path) -> None:
    path = tmp_path / "sum.jsonl"
    updates = {c: {"w": np.ones(3)} for c in ("a", "b", "c")}
    with pytest.raises(FedCoLLMSecureError):
        secure_sum(updates, threshold=3, drop={"a": "share_keys"}, audit_log=path)
    run = verify_log(path).runs[0]
    assert run.status == "aborted"
    rnd = next(json.loads(r)["payload"] for r in lines(path) if b'"kind":"round"' in r)
    assert rnd["status"] == "aborted" and "ThresholdError" in rnd["error"]


def test_secure_sum_appends_to_an_open_log(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    updates = {c: {"w": np.ones(3)} for c in ("a", "b", "c")}
    with AuditLog(path, signer=SERVER_KEY, fsync=False) as log:
        for t in (1, 2):
            secure_sum(updates, audit_log=log, round_=t)
    summary = verify_log(path, key=SERVER_KEY.verify_key)
    assert len(summary.runs) == 1 and summary.runs[0].rounds == [1, 2]


# --- the command line ---------------------------------------------------------------------
def test_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "a.jsonl"
    write_run(path, SERVER_KEY)
    pub = SERVER_KEY.verify_key.raw.hex()
    assert main(["audit", "verify", str(path)]) == 0
    assert "OK: 8 records" in capsys.readouterr().out
    keyfile = tmp_path / "server.pub"
    keyfile.write_text(pub + "\n")
    assert main(["audit", "verify", str(path), "--key", str(keyfile)]) == 0
    assert main(["audit", "verify", str(path), "--key", OTHER_KEY.verify_key.raw.hex()]) == 1
    head = json.loads(lines(path)[-1])["hash"]
    assert main(["audit", "verify", str(path), "--expect-head", head]) == 0
    assert main(["audit", "verify", str(path), "--expect-head", "ab" * 32]) == 1
    capsys.readouterr()
    rows = lines(path)
    put(path, rows[:-2])
    assert main(["audit", "verify", str(path)]) == 3
    assert "incomplete (truncated or still running)" in capsys.readouterr().err
    assert main(["audit", "verify", str(path), "--allow-open"]) == 0
    capsys.readouterr()
    rows[3] = rows[3].replace(b'"round":1', b'"round":2')
    put(path, rows)
    assert main(["audit", "verify", str(path), "--json"]) == 1
    out = capsys.readouterr()
    report = json.loads(out.out)
    assert report["ok"] is False and report["line"] == 4 and report["seq"] == 3
    assert "line 4, seq 3" in out.err
    assert main(["audit", "verify", str(tmp_path / "missing.jsonl")]) == 2
    assert main(["audit", "verify", str(path), "--key", "not-a-key"]) == 2
