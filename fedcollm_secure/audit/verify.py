"""Verification of an audit log, and the summary of what it records.

:func:`verify_log` checks every line (canonical form, hash), the chain (``seq`` counts
lines from 0, ``prev`` is the previous line's hash, the first record chains to the genesis
value), the run structure (``start`` ... ``end`` with the right record count), every
signature (against the key named in the run's ``start`` record, or against ``key`` when
given, which then must be that key), and optionally that the last hash equals an anchor the
caller kept (``expect_head``). The first failure raises a typed error naming the line and
``seq``; a log whose last run has no ``end`` record raises :class:`AuditIncompleteError`
unless ``allow_open``.

What the chain alone cannot show: a log rewritten from the edited record to the end (all
hashes recomputed) verifies unless its records are signed by a key the verifier pins
(``key``) or its head is compared with one kept elsewhere (``expect_head``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..crypto.signatures import VerifyKey
from ..errors import (
    AuditChainError,
    AuditIncompleteError,
    AuditLogError,
    FedCoLLMSecureError,
    KeyFormatError,
    SignatureError,
)
from .records import (
    ARTIFACT,
    DECRYPTION,
    END,
    FORMAT,
    GENESIS,
    MAX_LINE,
    MESSAGES,
    PRIVACY,
    ROUND,
    START,
    VERSION,
    parse_record,
    verify_hash_signature,
)

__all__ = ["AuditSummary", "LogVerifier", "RunSummary", "load_verify_key", "verify_log"]

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


@dataclass
class RunSummary:
    """What one run of the log records."""

    run_id: str
    first_line: int
    signer: str | None
    what: str | None = None
    status: str | None = None  # the end record's status; None while the run is open
    records: int = 0
    rounds: list[int] = field(default_factory=list)
    participants: set[str] = field(default_factory=set)
    dropouts: list[tuple[Any, str, str]] = field(default_factory=list)  # round, client, stage
    rejected: int = 0
    messages: int = 0
    artifacts: int = 0
    decryptions: int = 0
    epsilon: dict[str, Any] = field(default_factory=dict)  # mechanism -> last cumulative

    @property
    def closed(self) -> bool:
        return self.status is not None

    def to_json(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "first_line": self.first_line, "signer": self.signer,
                "what": self.what, "status": self.status, "records": self.records,
                "rounds": len(self.rounds), "participants": sorted(self.participants),
                "dropouts": [list(d) for d in self.dropouts], "rejected": self.rejected,
                "messages": self.messages, "artifacts": self.artifacts,
                "decryptions": self.decryptions, "epsilon": dict(self.epsilon)}


@dataclass
class AuditSummary:
    path: str
    records: int = 0
    head: str | None = None
    runs: list[RunSummary] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def open_runs(self) -> list[RunSummary]:
        return [r for r in self.runs if not r.closed]

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "records": self.records, "head": self.head,
                "runs": [r.to_json() for r in self.runs], "notes": list(self.notes)}

    def render(self) -> str:
        lines = [f"{self.path}: {self.records} records in {len(self.runs)} run(s); "
                 f"head {self.head}"]
        for r in self.runs:
            state = f"closed ({r.status})" if r.closed else "OPEN (no end record)"
            signer = f"signed by {r.signer}" if r.signer else "unsigned"
            lines.append(f"  run {r.run_id} [{r.what or '?'}] from line {r.first_line}: "
                         f"{r.records} records, {state}, {signer}")
            drops = ", ".join(f"{c}@{s} (round {t})" for t, c, s in r.dropouts) or "none"
            lines.append(f"    rounds {len(r.rounds)}; participants {len(r.participants)} "
                         f"{sorted(r.participants)[:8]}{' ...' if len(r.participants) > 8 else ''}"
                         f"; dropouts {len(r.dropouts)}: {drops}")
            eps = ", ".join(f"{m} {v}" for m, v in sorted(r.epsilon.items())) or "none recorded"
            lines.append(f"    rejected {r.rejected}; message digests {r.messages}; "
                         f"artifacts {r.artifacts}; decryptions {r.decryptions}; "
                         f"epsilon: {eps}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def load_verify_key(spec: str | bytes | VerifyKey) -> VerifyKey:
    """An Ed25519 public key from 64 hex digits, or a file holding hex, 32 raw bytes, a PEM
    public key or an OpenSSH ``ssh-ed25519`` line."""
    if isinstance(spec, VerifyKey):
        return spec
    if isinstance(spec, bytes):
        return VerifyKey(spec)
    if _HEX64.fullmatch(spec.strip()):
        return VerifyKey(bytes.fromhex(spec.strip()))
    path = Path(spec)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFormatError(f"--key is neither 64 hex digits nor a readable file: {exc}") \
            from None
    if len(data) == 32:
        return VerifyKey(data)
    text = data.decode("ascii", "replace").strip()
    if _HEX64.fullmatch(text):
        return VerifyKey(bytes.fromhex(text))
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        if text.startswith("-----BEGIN"):
            key: Any = serialization.load_pem_public_key(data)
        elif text.startswith("ssh-ed25519"):
            key = serialization.load_ssh_public_key(data)
        else:
            raise ValueError("unknown key format")
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyFormatError(f"{path}: not an Ed25519 public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFormatError(f"{path}: not an Ed25519 public key")
    return VerifyKey(key.public_bytes_raw())


def _lines(path: Path) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, bytes without newline, complete?) of every line; size-checked."""
    try:
        with path.open("rb") as fh:
            number = 0
            while raw := fh.readline(MAX_LINE + 2):
                number += 1
                complete = raw.endswith(b"\n")
                if not complete and len(raw) > MAX_LINE:
                    raise AuditChainError(f"record line exceeds {MAX_LINE} bytes", line=number)
                yield number, raw[:-1] if complete else raw, complete
    except OSError as exc:
        raise AuditLogError(f"cannot read {path}: {exc}") from None


def _get(payload: dict[str, Any], key: str, types: type | tuple[type, ...], line: int,
         seq: int, default: Any = ...) -> Any:
    value = payload.get(key, default)
    if value is ...:
        raise AuditChainError(f"payload lacks {key!r}", line=line, seq=seq)
    if value is not default and not isinstance(value, types):
        raise AuditChainError(f"payload field {key!r} has the wrong type", line=line, seq=seq)
    return value


class LogVerifier:
    """Checks a log line by line; :attr:`summary` holds what was verified so far, also
    after a failure."""

    def __init__(self, path: str | os.PathLike[str], *, key: str | bytes | VerifyKey | None = None,
                 expect_head: str | None = None, expect_genesis: str | None = None,
                 allow_open: bool = False) -> None:
        self.path = Path(path)
        self.key = load_verify_key(key) if key is not None else None
        for name, value in (("expect_head", expect_head), ("expect_genesis", expect_genesis)):
            if value is not None and not _HEX64.fullmatch(value):
                raise AuditLogError(f"{name} must be 64 hex digits")
        self.expect_head = expect_head.lower() if expect_head else None
        self.expect_genesis = expect_genesis.lower() if expect_genesis else None
        self.allow_open = allow_open
        self.summary = AuditSummary(str(self.path))

    def run(self) -> AuditSummary:
        s = self.summary
        prev: str | None = None
        current: RunSummary | None = None
        signer: VerifyKey | None = None
        for number, raw, complete in _lines(self.path):
            if not complete:
                if self.allow_open:
                    s.notes.append(f"line {number} is a partial record (being written?); "
                                   "ignored")
                    break
                raise AuditIncompleteError("the last line is cut off (no newline): the log "
                                           "was truncated, or a write is in progress",
                                           line=number)
            rec = parse_record(raw, number)
            seq, kind, payload = rec["seq"], rec["kind"], rec["payload"]
            if seq != number - 1:
                raise AuditChainError(f"seq {seq} found where {number - 1} belongs: records "
                                      "were deleted, inserted or reordered", line=number, seq=seq)
            if prev is None:
                self._check_genesis(rec, number)
            elif rec["prev"] != prev:
                raise AuditChainError("prev does not match the hash of the line before: a record "
                                      "was deleted, inserted, reordered or rewritten",
                                      line=number, seq=seq)
            if kind == START:
                if current is not None and not current.closed:
                    s.notes.append(f"run {current.run_id} (from line {current.first_line}) has no "
                                   "end record: the process stopped during the run")
                    if payload.get("previous_run_closed") is not False:
                        raise AuditChainError("start record claims the previous run was closed",
                                              line=number, seq=seq)
                current, signer = self._start(rec, number), None
                if current.signer is not None:
                    signer = VerifyKey(bytes.fromhex(current.signer))
                s.runs.append(current)
            elif current is None or current.closed:
                raise AuditChainError(f"a {kind!r} record outside any run (after an end record "
                                      "and without a start record)", line=number, seq=seq)
            if signer is not None:
                if "sig" not in rec:
                    raise AuditChainError("record of a signed run carries no signature",
                                          line=number, seq=seq)
                try:
                    verify_hash_signature(signer, rec["hash"], rec["sig"])
                except SignatureError:
                    raise AuditChainError("signature does not verify (forged or edited record)",
                                          line=number, seq=seq) from None
            elif "sig" in rec:
                raise AuditChainError("record of an unsigned run carries a signature",
                                      line=number, seq=seq)
            current.records += 1
            self._tally(current, kind, payload, number, seq)
            prev = rec["hash"]
            s.records, s.head = number, prev
        if s.records == 0:
            raise AuditIncompleteError(f"{self.path} holds no records")
        if self.expect_head is not None and s.head != self.expect_head:
            raise AuditChainError(f"the last record's hash {s.head} is not the expected head "
                                  f"{self.expect_head}: records were removed or rewritten",
                                  line=s.records, seq=s.records - 1)
        if s.open_runs and not self.allow_open:
            last = s.open_runs[-1]
            raise AuditIncompleteError(
                f"incomplete (truncated or still running): run {last.run_id} from line "
                f"{last.first_line} has no end record; the log ends at line {s.records}",
                line=s.records, seq=s.records - 1)
        return s

    def _check_genesis(self, rec: dict[str, Any], number: int) -> None:
        seq, payload = rec["seq"], rec["payload"]
        if rec["kind"] != START:
            raise AuditChainError("the first record is not a start record: the beginning of the "
                                  "log is missing", line=number, seq=seq)
        anchor = payload.get("anchor", GENESIS)
        if rec["prev"] != anchor:
            raise AuditChainError("the first record does not chain to the genesis value",
                                  line=number, seq=seq)
        if self.expect_genesis is not None and rec["prev"] != self.expect_genesis:
            raise AuditChainError(f"the log chains to {rec['prev']}, not to the expected "
                                  f"anchor {self.expect_genesis}", line=number, seq=seq)

    def _start(self, rec: dict[str, Any], number: int) -> RunSummary:
        seq, payload = rec["seq"], rec["payload"]
        if payload.get("format") != FORMAT or payload.get("version") != VERSION:
            raise AuditChainError(f"not a {FORMAT} v{VERSION} run", line=number, seq=seq)
        run_id = _get(payload, "run_id", str, number, seq)
        signer = _get(payload, "signer", (str, type(None)), number, seq)
        if signer is not None:
            if not _HEX64.fullmatch(signer):
                raise AuditChainError("signer must be 64 hex digits", line=number, seq=seq)
            try:
                VerifyKey(bytes.fromhex(signer))
            except FedCoLLMSecureError:
                raise AuditChainError("signer is not an Ed25519 public key",
                                      line=number, seq=seq) from None
        if self.key is not None:
            if signer is None:
                raise AuditChainError(f"run {run_id} is not signed, but a key was given",
                                      line=number, seq=seq)
            if bytes.fromhex(signer) != self.key.raw:
                raise AuditChainError(f"run {run_id} is signed by {signer}, not by the given "
                                      "key", line=number, seq=seq)
        return RunSummary(run_id=run_id, first_line=number, signer=signer)

    def _tally(self, run: RunSummary, kind: str, payload: dict[str, Any], number: int,
               seq: int) -> None:
        if kind == END:
            if _get(payload, "run_id", str, number, seq) != run.run_id:
                raise AuditChainError("end record names another run", line=number, seq=seq)
            count = _get(payload, "records", int, number, seq)
            if count != run.records:
                raise AuditChainError(f"end record counts {count} records, the run has "
                                      f"{run.records}", line=number, seq=seq)
            run.status = str(_get(payload, "status", str, number, seq))
        elif kind == "config":
            run.what = str(payload.get("what"))
        elif kind == ROUND:
            t = payload.get("round")
            run.rounds.append(t if isinstance(t, int) else -1)
            run.participants.update(str(c) for c in
                                    _get(payload, "participants", list, number, seq))
            dropped = _get(payload, "dropped", dict, number, seq, {})
            run.dropouts += [(t, str(c), str(stage)) for c, stage in dropped.items()]
            run.dropouts += [(t, str(c), "unmask (late)") for c in
                             _get(payload, "late_dropouts", list, number, seq, [])]
            run.rejected += len(_get(payload, "rejected", dict, number, seq, {}))
        elif kind == MESSAGES:
            run.messages += len(_get(payload, "digests", dict, number, seq))
        elif kind == ARTIFACT:
            run.artifacts += 1
        elif kind == DECRYPTION:
            run.decryptions += 1
        elif kind == PRIVACY:
            mechanism = str(_get(payload, "mechanism", str, number, seq))
            run.epsilon[mechanism] = payload.get("epsilon")


def verify_log(path: str | os.PathLike[str], *, key: str | bytes | VerifyKey | None = None,
               expect_head: str | None = None, expect_genesis: str | None = None,
               allow_open: bool = False) -> AuditSummary:
    """Verify the log at ``path`` (see the module docstring); returns its summary."""
    return LogVerifier(path, key=key, expect_head=expect_head, expect_genesis=expect_genesis,
                       allow_open=allow_open).run()
