"""Client side of ``ckks/v1``: one stage, ``encrypted_input``.

The request carries the round's public context as the key authority's signed message. The
client checks that signature (the aggregator cannot substitute a context whose secret key it
knows), the parameters (it refuses weaker ones) and that the context is public, then
encrypts ``[w * update, w, 1]``: the pre-weighted update, its weight and a contributor
count, in chunks of the slot count. Its reply binds the ciphertext to the session, round,
sender and context digest, and is signed with its identity key when one is enrolled.
"""

from __future__ import annotations

import numpy as np

from ...crypto.signatures import SigningKey, VerifyKey
from ...errors import (
    FedCoLLMSecureError,
    HEContextError,
    PartyError,
    StageError,
    UpdateValidationError,
)
from ...wire import SERVER, Envelope, Fields, Limits, b64, decode
from ..base import ClientEndpoint
from ..tensors import TensorSpec, Update
from . import he
from .messages import (
    AUTHORITY,
    DIGEST_SIZE,
    ENCRYPTED_INPUT,
    ERROR,
    F_CHUNKS,
    F_CONTEXT_DIGEST,
    F_CT_DIGEST,
    F_LENGTH,
    F_MAX_ABS,
    F_N_CLIENTS,
    F_PARAMS,
    F_RECEIPT,
    F_SPEC,
    F_THRESHOLD,
    MAX_NODES,
    PUBLIC_CONTEXT,
    envelope,
    error_fields,
    receipt_bytes,
)
from .params import PROTOCOL, CKKSConfig

HEADER_LIMIT = 16 << 20
CONTEXT_LIMIT = 64 << 20


class CKKSClient(ClientEndpoint):
    def __init__(self, client_id: str, update: Update, *, weight: float = 1.0,
                 config: CKKSConfig | None = None, authority_key: VerifyKey,
                 identity: SigningKey | None = None, session: bytes | None = None,
                 round_: int | None = None) -> None:
        self.client_id = client_id
        self.config = config or CKKSConfig()
        self.params = self.config.params()
        if not (np.isfinite(weight) and weight >= 0):
            raise UpdateValidationError(f"weight {weight} must be finite and non-negative")
        if self.config.sign and identity is None:
            raise PartyError("ckks.sign is on but the client has no identity key")
        self.update, self.weight = update, float(weight)
        self.authority_key, self.identity = authority_key, identity
        self.session, self.round = session, round_
        self.node = 0
        self.done = False

    def handle(self, request: bytes) -> bytes:
        try:
            return self.process(request)
        except FedCoLLMSecureError as exc:
            return envelope(ERROR, self.session or b"", self.round or 0, self.node, SERVER,
                            error_fields(exc)).encode(self.identity)

    def process(self, request: bytes) -> bytes:
        env = decode(request, Limits(max_header=HEADER_LIMIT, max_body=CONTEXT_LIMIT))
        session = self.session if self.session is not None else env.session
        round_ = self.round if self.round is not None else env.round
        env.expect(protocol=PROTOCOL, stage=ENCRYPTED_INPUT, session=session, round_=round_,
                   src=SERVER)
        if env.dst < 1:
            raise PartyError("requests must be addressed to a client index >= 1")
        if self.done:
            raise StageError("duplicated encrypted_input request")
        self.session, self.round, self.node = session, round_, env.dst
        f = Fields(env, {F_SPEC, F_N_CLIENTS, F_THRESHOLD, F_MAX_ABS})
        n, t = f.uint(F_N_CLIENTS, MAX_NODES), f.uint(F_THRESHOLD, MAX_NODES)
        if not 2 <= n <= self.config.max_clients or not 1 <= self.node <= n:
            raise PartyError(f"node {self.node} of {n} is out of range")
        if not self.config.min_threshold <= t <= n:
            raise PartyError(f"threshold {t} is below this client's minimum "
                             f"{self.config.min_threshold} or above {n}")
        ctx_env = self._authority_message(env)
        if ctx_env.fields.get(F_THRESHOLD) != t:
            raise PartyError("the aggregator and the key authority announce different thresholds")
        ctx = he.load_public_context(ctx_env.body, self.params, self.config.n_threads)
        context_digest = he.context_digest(ctx_env.body)
        max_abs = min(f.number(F_MAX_ABS), self.config.max_abs_for(n))
        spec = TensorSpec.from_json(f.list_of(F_SPEC, 100_000))
        flat = spec.flatten(self.update, who=f"client {self.client_id}")
        values = np.empty(flat.size + 2)
        np.multiply(flat, self.weight, out=values[:-2])
        values[-2], values[-1] = self.weight, 1.0
        if values.size and float(np.max(np.abs(values))) > max_abs:
            raise UpdateValidationError(
                f"client {self.client_id}: a weighted value exceeds the round's bound {max_abs:g}"
                " (it could overflow the CKKS headroom)")
        body = he.encrypt(ctx, self.params, values)
        ct_digest = he.ciphertext_digest(body)
        fields: dict[str, object] = {F_CONTEXT_DIGEST: b64(context_digest),
                                     F_LENGTH: int(values.size),
                                     F_CHUNKS: he.chunks_for(values.size, self.params),
                                     F_CT_DIGEST: b64(ct_digest)}
        if self.identity is not None:
            fields[F_RECEIPT] = b64(self.identity.sign(receipt_bytes(
                session, round_, self.node, context_digest, ct_digest)))
        self.done = True
        return envelope(ENCRYPTED_INPUT, session, round_, self.node, SERVER, fields,
                        body).encode(self.identity)

    def _authority_message(self, env: Envelope) -> Envelope:
        """The key authority's signed public-context message, carried in the request body."""
        inner = decode(bytes(env.body), Limits(max_header=HEADER_LIMIT, max_body=CONTEXT_LIMIT))
        inner.expect(protocol=PROTOCOL, stage=PUBLIC_CONTEXT, session=env.session,
                     round_=env.round, src=AUTHORITY, dst=SERVER)
        inner.verify(self.authority_key)
        f = Fields(inner, {F_PARAMS, F_THRESHOLD, F_N_CLIENTS, F_CONTEXT_DIGEST})
        if f.f[F_PARAMS] != self.params.to_json():
            raise HEContextError(f"the round's parameters {f.f[F_PARAMS]} differ from this "
                                 f"client's {self.params.to_json()}")
        if f.raw(F_CONTEXT_DIGEST, DIGEST_SIZE) != he.context_digest(inner.body):
            raise HEContextError("the public context does not match its signed digest")
        return inner
