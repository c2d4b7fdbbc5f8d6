"""Tamper-evident audit log: append-only, hash-chained, optionally signed JSONL.

The server writes one per run (:class:`AuditLog`): configuration and library versions, per
round the participants, dropouts (with their stage) and protocol parameters, the SHA-256 of
every message it received, of every artifact written, CKKS decryptions and privacy spent.
:func:`verify_log` (``fedcollm-secure audit verify LOG``) checks the chain and signatures and
says where it breaks. Format: :mod:`.records`.
"""

from .log import AuditLog, RepliesHook
from .records import (
    FORMAT,
    GENESIS,
    KINDS,
    VERSION,
    canonical_json,
    library_versions,
    parse_record,
    record_hash,
    sha256_file,
    state_digest,
)
from .verify import AuditSummary, LogVerifier, RunSummary, load_verify_key, verify_log

__all__ = ["FORMAT", "GENESIS", "KINDS", "VERSION", "AuditLog", "AuditSummary", "LogVerifier",
           "RepliesHook", "RunSummary", "canonical_json", "library_versions",
           "load_verify_key", "parse_record", "record_hash", "sha256_file", "state_digest",
           "verify_log"]
