"""Auditing one secure-aggregation round (used by :func:`fedcollm_secure.secure_sum`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from ..errors import FedCoLLMSecureError
from .log import AuditLog, RepliesHook

__all__ = ["AuditTarget", "audited_round"]

AuditTarget = str | os.PathLike[str] | AuditLog
R = TypeVar("R")


def _record_decryptions(log: AuditLog, round_: int, authority: Any, before: int) -> None:
    """Decryptions the CKKS key authority logged during this round."""
    records = getattr(authority, "decryptions", None)
    if not isinstance(records, list):
        return
    key = getattr(getattr(authority, "verify_key", None), "raw", None)
    for rec in records[before:]:
        data = rec.to_json() if hasattr(rec, "to_json") else dict(rec)
        ids = data.pop("contributor_ids", None) or []
        log.record_decryption(round_, contributors=[str(c) for c in ids],
                              threshold=int(data.pop("threshold", 0)),
                              authority=key.hex() if isinstance(key, bytes) else None,
                              session=data.pop("session", None), authority_record=data)


def audited_round(target: AuditTarget, drive: Callable[[RepliesHook], R], *, round_: int,
                  participants: Sequence[str], config: Mapping[str, Any] | None = None,
                  authority: Any = None) -> R:
    """Run ``drive(hook)`` (one round over a transport) with its replies, outcome and any
    key-authority decryptions recorded in the audit log ``target``.

    ``target`` is a path (a run is opened for this round, with ``config``, and closed) or an
    open :class:`AuditLog` (the caller's run; only the round's records are added). An aborted
    round is recorded with its typed error before the error propagates.
    """
    own = not isinstance(target, AuditLog)
    log = AuditLog(target) if not isinstance(target, AuditLog) else target
    try:
        if own:
            log.record_config("secure_sum", config or {})
        authority_before = len(getattr(authority, "decryptions", []) or [])
        try:
            result = drive(log.replies_hook(round_))
        except FedCoLLMSecureError as exc:
            log.record_round(round_, participants=participants, status="aborted",
                             error=f"{type(exc).__name__}: {exc}")
            raise
        finally:
            if authority is not None:
                _record_decryptions(log, round_, authority, authority_before)
        log.record_round(round_, participants=participants, result=result)
    except BaseException as exc:
        if own:
            status = "aborted" if isinstance(exc, FedCoLLMSecureError) else "failed"
            log.close(status, f"{type(exc).__name__}: {exc}")
        raise
    if own:
        log.close()
    return result
