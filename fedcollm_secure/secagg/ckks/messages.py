"""Stages, field names and signed byte strings of ``ckks/v1``.

Parties: the aggregator is party 0 (:data:`~fedcollm_secure.wire.SERVER`), clients are
1..n in sorted id order, the key authority is :data:`AUTHORITY`.
"""

from __future__ import annotations

import struct
from typing import Any

from ...crypto.kdf import encode_fields
from ...errors import FedCoLLMSecureError, WireFormatError
from ...wire import Envelope, Fields
from .params import PROTOCOL

AUTHORITY = (1 << 63) - 1  # party index of the key authority

# the one client stage
ENCRYPTED_INPUT = "encrypted_input"
STAGES = (ENCRYPTED_INPUT,)
# aggregator <-> key authority
OPEN_ROUND = "open_round"
PUBLIC_CONTEXT = "public_context"
DECRYPT = "decrypt"
PLAINTEXT_SUM = "plaintext_sum"
ERROR = "error"

# field names
F_PARAMS = "params"
F_N_CLIENTS = "n_clients"
F_CLIENTS = "clients"
F_THRESHOLD = "threshold"
F_SPEC = "tensor_spec"
F_MAX_ABS = "max_abs"
F_CONTEXT_DIGEST = "context_digest"
F_LENGTH = "length"
F_CHUNKS = "chunks"
F_CT_DIGEST = "ciphertext_digest"
F_RECEIPT = "receipt"
F_CONTRIBUTORS = "contributors"
F_RECEIPTS = "receipts"
F_COUNT = "count"
F_ERROR_BOUND = "error_bound"
F_CODE = "code"
F_MESSAGE = "message"

MAX_NODES = 1 << 20
DIGEST_SIZE = 32
RECEIPT_LABEL = b"ckks/v1/contribution-receipt"


def envelope(stage: str, session: bytes, round_: int, src: int, dst: int,
             fields: dict[str, Any], body: bytes | memoryview = b"") -> Envelope:
    return Envelope(protocol=PROTOCOL, stage=stage, session=session, round=round_, src=src,
                    dst=dst, fields=dict(fields), body=body)


def receipt_bytes(session: bytes, round_: int, node: int, context_digest: bytes,
                  ciphertext_digest: bytes) -> bytes:
    """What a client's contribution receipt signs: it sent this ciphertext, under this
    context, in this round. The key authority checks receipts without seeing ciphertexts."""
    if len(context_digest) != DIGEST_SIZE or len(ciphertext_digest) != DIGEST_SIZE:
        raise WireFormatError("digests must be 32 bytes")
    return encode_fields(RECEIPT_LABEL, session, struct.pack(">QQ", round_, node),
                         context_digest, ciphertext_digest)


def error_fields(exc: BaseException) -> dict[str, Any]:
    return {F_CODE: type(exc).__name__, F_MESSAGE: str(exc)[:500]}


def raise_error(env: Envelope, who: str) -> None:
    """Re-raise an ``error`` reply as the typed error it names (ProtocolError otherwise)."""
    from ... import errors

    f = Fields(env, {F_CODE, F_MESSAGE})
    code, message = f.string(F_CODE, 64), f.string(F_MESSAGE, 500)
    cls = getattr(errors, code, None)
    if not (isinstance(cls, type) and issubclass(cls, FedCoLLMSecureError)):
        cls = errors.ProtocolError
    raise cls(f"{who} refused: {code}: {message}")
