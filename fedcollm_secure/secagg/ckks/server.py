"""Aggregator side of ``ckks/v1``: holds the public context only and adds ciphertexts.

The workflow asks the key authority to open the round, refuses a context that carries a
secret, Galois or relinearisation key, forwards the authority's signed context to the
clients, checks every reply (routing, signature, context binding, digest, chunk layout)
before its ciphertext can touch the running sum, and finally asks the authority to decrypt
the sum of at least ``t`` contributors. It never holds a secret key.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import tenseal as ts

from ...config import require
from ...crypto.signatures import VerifyKey
from ...errors import (
    CiphertextError,
    FedCoLLMSecureError,
    PartyError,
    ProtocolError,
    ThresholdError,
    WireFormatError,
)
from ...wire import SERVER, Envelope, Fields, Limits, Message, b64, decode
from ..base import SecureSumResult, ServerWorkflow, StageRequests
from ..tensors import TensorSpec
from . import he
from .messages import (
    AUTHORITY,
    DECRYPT,
    DIGEST_SIZE,
    ENCRYPTED_INPUT,
    ERROR,
    F_CHUNKS,
    F_CLIENTS,
    F_CONTEXT_DIGEST,
    F_CONTRIBUTORS,
    F_COUNT,
    F_CT_DIGEST,
    F_ERROR_BOUND,
    F_LENGTH,
    F_MAX_ABS,
    F_N_CLIENTS,
    F_PARAMS,
    F_RECEIPT,
    F_RECEIPTS,
    F_SPEC,
    F_THRESHOLD,
    OPEN_ROUND,
    PLAINTEXT_SUM,
    PUBLIC_CONTEXT,
    envelope,
    raise_error,
)
from .params import PROTOCOL, PROTOCOL_NAME, CKKSConfig

AuthorityLink = Callable[[bytes], bytes]  # request bytes -> reply bytes
HEADER_LIMIT = 16 << 20


class CKKSServer(ServerWorkflow):
    def __init__(self, client_ids: Sequence[str], spec: TensorSpec, *, authority: AuthorityLink,
                 authority_key: VerifyKey, config: CKKSConfig | None = None,
                 threshold: int | None = None, client_keys: Mapping[str, VerifyKey] | None = None,
                 session: bytes, round_: int = 0) -> None:
        ids = sorted(client_ids)
        if len(set(ids)) != len(ids):
            raise PartyError("duplicate client ids")
        self.config = config or CKKSConfig()
        self.params = self.config.params()
        n = len(ids)
        require(2 <= n <= self.config.max_clients,
                f"ckks needs between 2 and {self.config.max_clients} clients, got {n}")
        t = threshold if threshold is not None else max(self.config.min_threshold, n // 2 + 1)
        require(self.config.min_threshold <= t <= n,
                f"threshold {t} must be in [{self.config.min_threshold}, {n}]")
        self.threshold = t
        self.max_abs = self.config.max_abs_for(n)
        self.ids = {i + 1: cid for i, cid in enumerate(ids)}
        self.client_keys = dict(client_keys or {})
        if self.config.sign:
            missing = [c for c in ids if c not in self.client_keys]
            if missing:
                raise PartyError(f"ckks.sign is on but clients have no identity key: "
                                 f"{missing[:5]}")
        self.authority, self.authority_key = authority, authority_key
        self.spec, self.session, self.round = spec, session, round_
        self.length = spec.size + 2  # [w * update, w, 1]
        self.chunks = he.chunks_for(self.length, self.params)
        self.ctx: ts.Context | None = None
        self.context_digest = b""
        self.dropped: dict[str, str] = {}
        self.rejected: dict[str, str] = {}
        self.seconds: dict[str, float] = {}
        self.authority_seconds: dict[str, float] = {}
        self._sent = False
        self._authority_reply = b""
        self._result: SecureSumResult | None = None

    # --- key authority ---------------------------------------------------------------------
    def _ask_authority(self, stage: str, fields: dict[str, object], body: bytes = b"") -> Envelope:
        start = time.perf_counter()
        reply = self.authority(envelope(stage, self.session, self.round, SERVER, AUTHORITY,
                                        fields, body).encode())
        self.authority_seconds[stage] = time.perf_counter() - start
        env = decode(reply, Limits(max_header=HEADER_LIMIT))
        env.verify(self.authority_key)
        self._authority_reply = reply
        if env.stage == ERROR:
            raise_error(env, "the key authority")
        return env

    def _open_round(self) -> bytes:
        """The authority's signed context message; the context itself is checked here."""
        reply = self._ask_authority(OPEN_ROUND, {
            F_N_CLIENTS: len(self.ids), F_CLIENTS: list(self.ids.values()),
            F_THRESHOLD: self.threshold, F_PARAMS: self.params.to_json()})
        reply.expect(protocol=PROTOCOL, stage=PUBLIC_CONTEXT, session=self.session,
                     round_=self.round, src=AUTHORITY, dst=SERVER)
        f = Fields(reply, {F_PARAMS, F_THRESHOLD, F_N_CLIENTS, F_CONTEXT_DIGEST})
        if f.f[F_PARAMS] != self.params.to_json():
            raise ProtocolError("the key authority answered with other parameters")
        self.threshold = max(self.threshold, f.uint(F_THRESHOLD, len(self.ids)))
        self.ctx = he.load_public_context(reply.body, self.params, self.config.n_threads)
        self.context_digest = he.context_digest(reply.body)
        if f.raw(F_CONTEXT_DIGEST, DIGEST_SIZE) != self.context_digest:
            raise ProtocolError("the public context does not match the authority's digest")
        return self._authority_reply

    # --- driving ---------------------------------------------------------------------------
    def next_requests(self) -> StageRequests | None:
        if self._sent:
            return None
        self._sent = True
        start = time.perf_counter()
        context_message = self._open_round()
        fields = {F_SPEC: self.spec.to_json(), F_N_CLIENTS: len(self.ids),
                  F_THRESHOLD: self.threshold, F_MAX_ABS: self.max_abs}
        messages = {cid: envelope(ENCRYPTED_INPUT, self.session, self.round, SERVER, u, fields,
                                  context_message).encode() for u, cid in self.ids.items()}
        self.seconds[ENCRYPTED_INPUT] = (time.perf_counter() - start
                                         - self.authority_seconds[OPEN_ROUND])
        return StageRequests(ENCRYPTED_INPUT, messages)

    def _accept(self, u: int, data: Message) -> tuple[ts.CKKSVector, list[str]]:
        env = decode(data, Limits(max_header=1 << 16,
                                  max_body=self.chunks * 4 * self.params.poly_modulus_degree * 8
                                  + (1 << 16)))
        if env.stage == ERROR:
            raise_error(env, f"client {self.ids[u]}")
        env.expect(protocol=PROTOCOL, stage=ENCRYPTED_INPUT, session=self.session,
                   round_=self.round, src=u, dst=SERVER)
        optional = frozenset({F_RECEIPT})
        f = Fields(env, {F_CONTEXT_DIGEST, F_LENGTH, F_CHUNKS, F_CT_DIGEST}, optional)
        if self.config.sign:
            env.verify(self.client_keys[self.ids[u]])
            if not f.has(F_RECEIPT):
                raise WireFormatError("a signed input needs a contribution receipt")
        if f.raw(F_CONTEXT_DIGEST, DIGEST_SIZE) != self.context_digest:
            raise CiphertextError("ciphertext made for another context")
        if f.uint(F_LENGTH) != self.length or f.uint(F_CHUNKS) != self.chunks:
            raise CiphertextError(f"ciphertext has length {f.f[F_LENGTH]} in {f.f[F_CHUNKS]} "
                                  f"chunks, expected {self.length} in {self.chunks}")
        ct_digest = f.raw(F_CT_DIGEST, DIGEST_SIZE)
        if he.ciphertext_digest(env.body) != ct_digest:
            raise CiphertextError("ciphertext does not match its digest (cut or corrupted)")
        if self.ctx is None:
            raise ProtocolError("the round has no public context yet")
        vec = he.load_vector(self.ctx, self.params, env.body, self.length)
        receipt = [b64(ct_digest), f.f[F_RECEIPT]] if f.has(F_RECEIPT) else []
        return vec, receipt

    def receive(self, stage: str, replies: Mapping[str, Message]) -> None:
        if stage != ENCRYPTED_INPUT or self.ctx is None or self._result is not None:
            raise ProtocolError(f"unexpected replies for stage {stage!r}")
        start = time.perf_counter()
        total: ts.CKKSVector | None = None
        contributors: list[int] = []
        receipts: dict[str, list[str]] = {}
        for u, cid in sorted(self.ids.items()):
            if cid not in replies:
                self.dropped[cid] = ENCRYPTED_INPUT
                continue
            try:
                vec, receipt = self._accept(u, replies[cid])
                total = he.add(total, vec)
            except FedCoLLMSecureError as exc:
                self.dropped[cid] = ENCRYPTED_INPUT
                self.rejected[cid] = f"{type(exc).__name__}: {exc}"
                continue
            contributors.append(u)
            if receipt:
                receipts[str(u)] = receipt
        if len(contributors) < self.threshold or total is None:
            raise ThresholdError(f"{len(contributors)} valid inputs, below the threshold "
                                 f"{self.threshold}; nothing is sent for decryption")
        aggregate = he.serialize(total)
        self.seconds[ENCRYPTED_INPUT] += time.perf_counter() - start
        reply = self._ask_authority(DECRYPT, {
            F_CONTRIBUTORS: contributors, F_RECEIPTS: receipts,
            F_CONTEXT_DIGEST: b64(self.context_digest), F_LENGTH: self.length}, aggregate)
        start = time.perf_counter()
        reply.expect(protocol=PROTOCOL, stage=PLAINTEXT_SUM, session=self.session,
                     round_=self.round, src=AUTHORITY, dst=SERVER)
        f = Fields(reply, {F_CONTRIBUTORS, F_LENGTH, F_COUNT, F_ERROR_BOUND})
        if f.uint_list(F_CONTRIBUTORS, len(self.ids)) != contributors:
            raise ProtocolError("the key authority decrypted another set of contributors")
        values = np.frombuffer(reply.body, dtype="<f8")
        if f.uint(F_LENGTH) != self.length or values.size != self.length:
            raise WireFormatError("the decrypted sum has the wrong length")
        survivors = [self.ids[u] for u in contributors]
        self.seconds[ENCRYPTED_INPUT] += time.perf_counter() - start
        params = {**self.params.describe(), "threshold": self.threshold,
                  "error_bound": self.params.error_bound(len(contributors)),
                  "max_abs_value": self.max_abs, "signed": self.config.sign}
        self._result = SecureSumResult(
            self.spec.unflatten(values[:-2].astype(np.float64)), survivors, dict(self.dropped),
            float(values[-2]),
            {"server_seconds": dict(self.seconds), "authority_seconds":
             dict(self.authority_seconds), "rejected": dict(self.rejected), "params": params,
             "aggregate_bytes": len(aggregate), "decrypted_contributors": f.uint(F_COUNT)},
            protocol=PROTOCOL_NAME)

    def result(self) -> SecureSumResult:
        if self._result is None:
            raise ProtocolError("the round has not completed")
        return self._result
