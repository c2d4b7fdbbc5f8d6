"""The audit-log writer: append-only, hash-chained, optionally signed JSONL.

A file holds one or more runs. A run opens with a ``start`` record (format, run id, the
signer's public key) and closes with an ``end`` record (status and the run's record count);
a run that appends to an existing file chains its ``start`` record to the file's last record,
so the whole file is one chain. The writer opens the file in append mode, takes an exclusive
advisory lock for its lifetime, writes each record with one ``write`` call and (by default)
``fsync``s it, and never rewrites a byte. See :mod:`.records` for the record format.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from ..crypto.randomness import default_random
from ..crypto.signatures import SigningKey
from ..errors import AuditLogError, FedCoLLMSecureError
from ..wire import Message
from .records import (
    ARTIFACT,
    CONFIG,
    DECRYPTION,
    END,
    FORMAT,
    GENESIS,
    MAX_LINE,
    MESSAGES,
    NOTE,
    PRIVACY,
    ROUND,
    START,
    VERSION,
    canonical_json,
    library_versions,
    now,
    parse_record,
    plain,
    record_hash,
    sha256_file,
    sign_hash,
)

try:  # POSIX advisory locks; elsewhere the single-writer rule is the caller's
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = ["AuditLog", "RepliesHook"]

RepliesHook = Callable[[str, Mapping[str, Message]], None]  # stage, client id -> reply bytes


def _read_tail(path: Path) -> dict[str, Any] | None:
    """The last record of an existing log (checked), or None for an empty/new file."""
    try:
        with path.open("rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            if size == 0:
                return None
            window = 1 << 16
            while True:
                start = max(0, size - window)
                fh.seek(start)
                tail = fh.read(size - start)
                if not tail.endswith(b"\n"):
                    raise AuditLogError(f"{path} ends in a partial record (a crash during a "
                                        "write?); refusing to append to it")
                cut = tail.rfind(b"\n", 0, len(tail) - 1)
                if cut >= 0 or start == 0:
                    line = tail[cut + 1:-1]
                    break
                if window > MAX_LINE:
                    raise AuditLogError(f"{path}: last record exceeds {MAX_LINE} bytes")
                window *= 4
    except OSError as exc:
        raise AuditLogError(f"cannot read {path}: {exc}") from None
    record = parse_record(line)
    return record


class AuditLog:
    """Writes one run into the audit log at ``path`` (created if missing, else appended to).

    ``signer``: the server's long-term Ed25519 key; when given, every record's hash is
    signed and the public key is written in the run's ``start`` record. ``fsync``: flush each
    record to stable storage before returning (default). ``anchor``: 32 bytes the first record
    of a *new* file chains to instead of the zero genesis (e.g. the head of another log, or a
    value published before the run). Use as a context manager, or call :meth:`close`; a run
    left without :meth:`close` has no ``end`` record and verifies as incomplete.
    """

    def __init__(self, path: str | os.PathLike[str], *, signer: SigningKey | None = None,
                 fsync: bool = True, anchor: bytes | None = None,
                 run_id: str | None = None) -> None:
        self.path = Path(path)
        self.signer = signer
        self.fsync = fsync
        self.run_id = run_id or default_random().bytes(16).hex()
        self.count = 0  # records written by this run
        self.closed = False
        self._lock = threading.Lock()
        if anchor is not None and (not isinstance(anchor, bytes) or len(anchor) != 32):
            raise AuditLogError("anchor must be 32 bytes")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise AuditLogError(f"cannot open {self.path} for appending: {exc}") from None
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    raise AuditLogError(f"{self.path} is being written by another "
                                        "process") from None
            last = _read_tail(self.path)
            start: dict[str, Any] = {"format": FORMAT, "version": VERSION, "run_id": self.run_id,
                                     "signer": signer.verify_key.raw.hex() if signer else None}
            if last is None:
                self.head, self.seq = (anchor.hex() if anchor is not None else GENESIS), 0
                if anchor is not None:
                    start["anchor"] = self.head
            else:
                if anchor is not None:
                    raise AuditLogError("an anchor applies to a new log only; this one "
                                        "continues the chain of the records already there")
                self.head, self.seq = last["hash"], last["seq"] + 1
                start["previous_run_closed"] = last["kind"] == END
            self._append(START, start)
        except BaseException:
            os.close(self._fd)
            raise

    # --- writing ---------------------------------------------------------------------------
    def _append(self, kind: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        body = {"seq": self.seq, "time": now(), "kind": kind, "payload": plain(payload),
                "prev": self.head}
        record = {**body, "hash": record_hash(body)}
        if self.signer is not None:
            record["sig"] = sign_hash(self.signer, record["hash"])
        line = canonical_json(record) + b"\n"
        if len(line) > MAX_LINE:
            raise AuditLogError(f"{kind} record of {len(line)} bytes exceeds {MAX_LINE}")
        try:
            view = memoryview(line)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            if self.fsync:
                os.fsync(self._fd)
        except OSError as exc:
            raise AuditLogError(f"cannot write to {self.path}: {exc}") from None
        self.head, self.seq = record["hash"], self.seq + 1
        self.count += 1
        return record

    def append(self, kind: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Write one record of ``kind`` (see :data:`.records.KINDS`); returns it."""
        if kind in (START, END):
            raise AuditLogError(f"{kind!r} records are written by the log itself")
        with self._lock:
            if self.closed:
                raise AuditLogError("the audit log is closed")
            return self._append(kind, payload)

    def close(self, status: str = "ok", error: str | None = None) -> None:
        """Write the ``end`` record (``records``: this run's record count, itself included)
        and release the file. Closing twice does nothing."""
        with self._lock:
            if self.closed:
                return
            try:
                payload: dict[str, Any] = {"run_id": self.run_id, "records": self.count + 1,
                                           "status": status}
                if error is not None:
                    payload["error"] = error[:1000]
                self._append(END, payload)
            finally:
                self.closed = True
                os.close(self._fd)

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is None:
            self.close()
        else:
            status = "aborted" if isinstance(exc, FedCoLLMSecureError) else "failed"
            self.close(status, f"{type(exc).__name__}: {exc}")

    # --- what a run records ----------------------------------------------------------------
    def record_config(self, what: str, config: Mapping[str, Any],
                      **extra: Any) -> dict[str, Any]:
        """The run's configuration (``what``: e.g. ``secure_sum`` or ``fedcollm``) and the
        versions of the libraries it runs on."""
        return self.append(CONFIG, {"what": what, "config": config,
                                    "libraries": library_versions(), **extra})

    def record_messages(self, round_: int, stage: str,
                        replies: Mapping[str, Message]) -> dict[str, Any]:
        """SHA-256 and size of every reply the server received in ``stage``."""
        digests, sizes = {}, {}
        for cid in sorted(replies):
            data = memoryview(replies[cid]).cast("B")
            digests[cid] = hashlib.sha256(data).hexdigest()
            sizes[cid] = data.nbytes
        return self.append(MESSAGES, {"round": round_, "stage": stage, "digests": digests,
                                      "bytes": sizes})

    def replies_hook(self, round_: int) -> RepliesHook:
        """A callback for :func:`fedcollm_secure.transport.drive` that records each stage's
        replies with :meth:`record_messages`."""
        def hook(stage: str, replies: Mapping[str, Message]) -> None:
            self.record_messages(round_, stage, replies)

        return hook

    def record_round(self, round_: int, *, participants: Sequence[str], result: Any = None,
                     status: str = "completed", error: str | None = None,
                     **extra: Any) -> dict[str, Any]:
        """One aggregation round: the clients asked to take part, and, from a
        :class:`~fedcollm_secure.secagg.SecureSumResult`, the survivors (inputs in the sum),
        the dropouts with the stage they dropped in, late dropouts, rejections with their
        typed errors, and the protocol parameters."""
        payload: dict[str, Any] = {"round": round_, "status": status,
                                   "participants": sorted(participants)}
        if result is not None:
            stats = getattr(result, "stats", {}) or {}
            payload.update(
                protocol=result.protocol, survivors=sorted(result.survivors),
                dropped=dict(sorted(result.dropped.items())),
                late_dropouts=sorted(stats.get("late_dropouts", [])),
                rejected=dict(sorted(stats.get("rejected", {}).items())),
                timed_out=dict(sorted(stats.get("timed_out", {}).items())),
                params=stats.get("params", {}), weight_total=result.weight_total)
        if error is not None:
            payload["error"] = error[:1000]
        payload.update(extra)
        return self.append(ROUND, payload)

    def record_artifact(self, path: str | os.PathLike[str], *, role: str = "adapter",
                        round_: int | None = None, name: str | None = None) -> dict[str, Any]:
        """SHA-256 and size of a file the run wrote (``role``: adapter, report, ...)."""
        digest, size = sha256_file(path)
        return self.append(ARTIFACT, {"path": os.fspath(path), "name": name or Path(path).name,
                                      "role": role, "round": round_, "sha256": digest,
                                      "bytes": size})

    def record_decryption(self, round_: int, *, contributors: Sequence[str], threshold: int,
                          authority: str | None = None, session: bytes | str | None = None,
                          **details: Any) -> dict[str, Any]:
        """A decryption performed by the CKKS key authority: of the aggregate of which
        ``contributors``, under which ``threshold``, by which authority (its public key)."""
        return self.append(DECRYPTION, {"round": round_, "contributors": sorted(contributors),
                                        "count": len(contributors), "threshold": threshold,
                                        "authority": authority, "session": session,
                                        **details})

    def record_privacy(self, round_: int | None, *, mechanism: str, epsilon: float,
                       delta: float | None, epsilon_round: float | None = None,
                       per_client: Mapping[str, float] | None = None,
                       **details: Any) -> dict[str, Any]:
        """Privacy spent after ``round_``: cumulative ``epsilon`` at ``delta`` for
        ``mechanism`` (e.g. ``dpsgd``, ``ddp``), optionally this round's share and the
        per-client values."""
        payload: dict[str, Any] = {"round": round_, "mechanism": mechanism, "epsilon": epsilon,
                                   "delta": delta, **details}
        if epsilon_round is not None:
            payload["epsilon_round"] = epsilon_round
        if per_client is not None:
            payload["per_client"] = dict(per_client)
        return self.append(PRIVACY, payload)

    def note(self, **payload: Any) -> dict[str, Any]:
        return self.append(NOTE, payload)
