"""The key authority of ``ckks/v1``: holds the secret key, decrypts only aggregates.

Its interface is bytes in, bytes out (:meth:`KeyAuthority.handle`), like a client endpoint,
so it can run as its own process or node. Per (session, round) it generates a fresh key pair
and answers exactly two requests from the aggregator, in order:

* ``open_round``: returns the public context (public key only), signed by the authority;
* ``decrypt``: decrypts an aggregate only if it covers at least ``t`` distinct contributors
  (checked against signed contribution receipts when client keys are enrolled, and against
  the encrypted contributor count), once per round, and logs the decryption.

The secret key never leaves this object, and it never sees an individual ciphertext. A
node that rebuilds the authority for every message (e.g. a Flower SuperNode) keeps its
whole state with :meth:`KeyAuthority.to_state` / :meth:`KeyAuthority.from_state`, on its
own machine only.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tenseal as ts

from ...crypto.randomness import RandomSource, default_random
from ...crypto.signatures import SigningKey, VerifyKey, generate_signing_key
from ...errors import (
    CiphertextError,
    FedCoLLMSecureError,
    PartyError,
    StageError,
    ThresholdError,
    WireFormatError,
)
from ...wire import SERVER, Envelope, Fields, Limits, b64, decode, unb64
from . import he
from .messages import (
    AUTHORITY,
    DECRYPT,
    DIGEST_SIZE,
    ERROR,
    F_CLIENTS,
    F_CONTEXT_DIGEST,
    F_CONTRIBUTORS,
    F_COUNT,
    F_ERROR_BOUND,
    F_LENGTH,
    F_N_CLIENTS,
    F_PARAMS,
    F_RECEIPTS,
    F_THRESHOLD,
    MAX_NODES,
    OPEN_ROUND,
    PLAINTEXT_SUM,
    PUBLIC_CONTEXT,
    envelope,
    error_fields,
    receipt_bytes,
)
from .params import PROTOCOL, CKKSConfig

STATE_VERSION = 1
_STATE_META = "meta"
_STATE_SIGNING_KEY = "signing_key"
_STATE_CONTEXT = "context_"  # + index of the round in the meta's round list

logger = logging.getLogger("fedcollm_secure.ckks.authority")
HEADER_LIMIT = 16 << 20


@dataclass(frozen=True)
class DecryptionRecord:
    """One logged decryption: who asked, for which round, over how many contributors."""

    requester: int
    session: str
    round: int
    contributors: int
    contributor_ids: tuple[str, ...]
    threshold: int
    time: float

    def to_json(self) -> dict[str, Any]:
        return {"requester": self.requester, "session": self.session, "round": self.round,
                "contributors": self.contributors,
                "contributor_ids": list(self.contributor_ids), "threshold": self.threshold,
                "time": self.time}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DecryptionRecord:
        return cls(int(data["requester"]), str(data["session"]), int(data["round"]),
                   int(data["contributors"]), tuple(str(c) for c in data["contributor_ids"]),
                   int(data["threshold"]), float(data["time"]))


@dataclass
class _Round:
    ctx: ts.Context | None  # the secret context; discarded after the round's decryption
    context_digest: bytes
    clients: tuple[str, ...]
    threshold: int
    length: int | None = None
    decrypted: bool = False
    opened_at: float = field(default_factory=time.time)


class KeyAuthority:
    """Generates one CKKS key pair per round and decrypts aggregates of >= t contributors."""

    def __init__(self, config: CKKSConfig | None = None, *, signing_key: SigningKey | None = None,
                 rng: RandomSource | None = None) -> None:
        self.config = config or CKKSConfig()
        self.params = self.config.params()
        self.signer = signing_key or generate_signing_key(rng or default_random())
        self.client_keys: dict[str, VerifyKey] = {}
        self.rounds: dict[tuple[bytes, int], _Round] = {}
        self.decryptions: list[DecryptionRecord] = []
        self.seconds: dict[str, float] = {}

    @property
    def verify_key(self) -> VerifyKey:
        return self.signer.verify_key

    def enroll(self, client_id: str, key: VerifyKey) -> None:
        """Register a client's identity key (checked on its contribution receipts)."""
        if client_id in self.client_keys and self.client_keys[client_id].raw != key.raw:
            raise PartyError(f"client {client_id!r} is already enrolled with another key")
        self.client_keys[client_id] = key

    # --- state export / import --------------------------------------------------------------
    def to_state(self) -> dict[str, str | bytes]:
        """The whole state as plain data (JSON and TenSEAL's own serialization, no pickle):
        the signing key, enrolled client keys, every round (with its secret context until it
        is decrypted) and the decryption log. It holds secret keys: keep it like a key file,
        on the authority's machine only."""
        rounds: list[dict[str, Any]] = []
        out: dict[str, str | bytes] = {_STATE_SIGNING_KEY: self.signer.private_bytes()}
        for i, ((session, rnd), r) in enumerate(self.rounds.items()):
            rounds.append({"session": session.hex(), "round": rnd,
                           "context_digest": r.context_digest.hex(), "clients": list(r.clients),
                           "threshold": r.threshold, "length": r.length,
                           "decrypted": r.decrypted, "opened_at": r.opened_at})
            if r.ctx is not None:
                out[f"{_STATE_CONTEXT}{i}"] = bytes(r.ctx.serialize(
                    save_public_key=True, save_secret_key=True, save_galois_keys=False,
                    save_relin_keys=False))
        out[_STATE_META] = json.dumps({
            "version": STATE_VERSION, "params": self.params.to_json(),
            "client_keys": {c: k.raw.hex() for c, k in sorted(self.client_keys.items())},
            "rounds": rounds, "decryptions": [d.to_json() for d in self.decryptions]},
            sort_keys=True)
        return out

    @classmethod
    def from_state(cls, state: Mapping[str, Any], config: CKKSConfig | None = None,
                   ) -> KeyAuthority:
        """Rebuild an authority from :meth:`to_state`; its parameters must be ``config``'s."""
        config = config or CKKSConfig()
        try:
            meta = json.loads(str(state[_STATE_META]))
            if meta["version"] != STATE_VERSION:
                raise WireFormatError(f"key authority state version {meta['version']!r}")
            if meta["params"] != config.params().to_json():
                raise PartyError("the key authority's saved state has other parameters")
            auth = cls(config, signing_key=SigningKey(bytes(state[_STATE_SIGNING_KEY])))
            auth.client_keys = {str(c): VerifyKey(bytes.fromhex(k))
                                for c, k in meta["client_keys"].items()}
            for i, r in enumerate(meta["rounds"]):
                blob = state.get(f"{_STATE_CONTEXT}{i}")
                ctx = None if blob is None else cls._load_secret_context(bytes(blob), auth)
                digest = bytes.fromhex(r["context_digest"])
                if ctx is not None and he.context_digest(he.public_context_bytes(ctx)) != digest:
                    raise CiphertextError("a saved round context does not match its digest")
                length = r["length"]
                auth.rounds[(bytes.fromhex(r["session"]), int(r["round"]))] = _Round(
                    ctx, digest, tuple(str(c) for c in r["clients"]), int(r["threshold"]),
                    None if length is None else int(length), bool(r["decrypted"]),
                    float(r["opened_at"]))
            auth.decryptions = [DecryptionRecord.from_json(d) for d in meta["decryptions"]]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise WireFormatError(f"key authority state is unreadable: {exc!r}") from None
        return auth

    @staticmethod
    def _load_secret_context(blob: bytes, auth: KeyAuthority) -> ts.Context:
        try:
            ctx = ts.context_from(blob, n_threads=auth.config.n_threads)
        except Exception as exc:  # TenSEAL raises ValueError/RuntimeError from protobuf/SEAL
            raise WireFormatError(f"a saved round context is unreadable: "
                                  f"{type(exc).__name__}") from None
        he.check_context(ctx, auth.params, public=False)
        if not ctx.has_secret_key():
            raise WireFormatError("a saved round context has no secret key")
        return ctx

    # --- entry point ---------------------------------------------------------------------
    def handle(self, request: bytes) -> bytes:
        """Answer one request from the aggregator; a refusal is a signed ``error`` reply."""
        try:
            return self.process(request)
        except FedCoLLMSecureError as exc:
            logger.warning("refused a request: %s: %s", type(exc).__name__, exc)
            return envelope(ERROR, b"", 0, AUTHORITY, SERVER, error_fields(exc)).encode(
                self.signer)

    def process(self, request: bytes) -> bytes:
        env = decode(request, Limits(max_header=HEADER_LIMIT))
        if env.protocol != PROTOCOL:
            raise WireFormatError(f"protocol {env.protocol!r}, expected {PROTOCOL!r}")
        if env.src != SERVER or env.dst != AUTHORITY:
            raise PartyError("the key authority only answers the aggregator")
        start = time.perf_counter()
        if env.stage == OPEN_ROUND:
            reply = self._open_round(env)
        elif env.stage == DECRYPT:
            reply = self._decrypt(env)
        else:
            raise StageError(f"the key authority does not answer {env.stage!r}")
        self.seconds[env.stage] = time.perf_counter() - start
        return reply

    # --- open_round ----------------------------------------------------------------------
    def _open_round(self, env: Envelope) -> bytes:
        key = (env.session, env.round)
        if key in self.rounds:
            raise StageError("this round is already open")
        f = Fields(env, {F_N_CLIENTS, F_CLIENTS, F_THRESHOLD, F_PARAMS})
        n = f.uint(F_N_CLIENTS, MAX_NODES)
        clients = f.list_of(F_CLIENTS, MAX_NODES)
        if (len(clients) != n or not all(isinstance(c, str) and c for c in clients)
                or clients != sorted(set(clients))):
            raise PartyError("clients must be n distinct, sorted, non-empty ids")
        if not 2 <= n <= self.config.max_clients:
            raise PartyError(f"a round needs 2 to {self.config.max_clients} clients, got {n}")
        if f.f[F_PARAMS] != self.params.to_json():
            raise PartyError("the requested parameters differ from the authority's")
        t = max(f.uint(F_THRESHOLD, MAX_NODES), self.config.min_threshold)
        if t > n:
            raise ThresholdError(f"threshold {t} exceeds the {n} clients of the round")
        if self.config.sign:
            missing = [c for c in clients if c not in self.client_keys]
            if missing:
                raise PartyError(f"clients without an enrolled identity key: {missing[:5]}")
        ctx = he.new_secret_context(self.params, self.config.n_threads)
        public = he.public_context_bytes(ctx)
        digest = he.context_digest(public)
        self.rounds[key] = _Round(ctx, digest, tuple(clients), t)
        return envelope(PUBLIC_CONTEXT, env.session, env.round, AUTHORITY, SERVER,
                        {F_PARAMS: self.params.to_json(), F_THRESHOLD: t, F_N_CLIENTS: n,
                         F_CONTEXT_DIGEST: b64(digest)}, public).encode(self.signer)

    # --- decrypt -------------------------------------------------------------------------
    def _decrypt(self, env: Envelope) -> bytes:
        state = self.rounds.get((env.session, env.round))
        if state is None:
            raise StageError("no open round for this session and round")
        if state.decrypted or state.ctx is None:
            raise StageError("this round's aggregate was already decrypted; the authority "
                             "decrypts once per round")
        f = Fields(env, {F_CONTRIBUTORS, F_RECEIPTS, F_CONTEXT_DIGEST, F_LENGTH})
        if f.raw(F_CONTEXT_DIGEST, DIGEST_SIZE) != state.context_digest:
            raise CiphertextError("the aggregate was made for another context")
        nodes = f.uint_list(F_CONTRIBUTORS, MAX_NODES)
        n = len(state.clients)
        if len(set(nodes)) != len(nodes) or any(not 1 <= u <= n for u in nodes):
            raise PartyError("contributors must be distinct client indices of this round")
        if len(nodes) < state.threshold:
            raise ThresholdError(f"the aggregate covers {len(nodes)} contributors, below the "
                                 f"threshold {state.threshold}; not decrypted")
        length = f.uint(F_LENGTH, 1 << 40)
        if self.config.sign:
            self._check_receipts(env, f, nodes, state)
        vec = he.load_vector(state.ctx, self.params, env.body, length)
        values = he.decrypt(state.ctx, vec)
        if values.size != length or length < 2:
            raise CiphertextError("decrypted aggregate has the wrong length")
        count = float(values[-1])
        bound = self.params.error_bound(len(nodes))
        if not abs(count - len(nodes)) <= 0.25:
            raise CiphertextError(f"the aggregate holds {count:.3f} contributions but the "
                                  f"request claims {len(nodes)}; not released")
        if not np.isfinite(values).all() or np.abs(values).max() >= self.params.max_abs_sum:
            raise CiphertextError("the decrypted aggregate is out of range")
        state.decrypted, state.ctx = True, None  # the round's secret key is no longer kept
        ids = tuple(state.clients[u - 1] for u in sorted(nodes))
        record = DecryptionRecord(env.src, env.session.hex(), env.round, len(nodes), ids,
                                  state.threshold, time.time())
        self.decryptions.append(record)
        logger.info("decrypted round %d of session %s for party %d: %d contributors "
                    "(threshold %d)", env.round, env.session.hex(), env.src, len(nodes),
                    state.threshold)
        out = values.astype("<f8")
        return envelope(PLAINTEXT_SUM, env.session, env.round, AUTHORITY, SERVER,
                        {F_CONTRIBUTORS: sorted(nodes), F_LENGTH: length,
                         F_COUNT: round(count), F_ERROR_BOUND: bound},
                        out.tobytes()).encode(self.signer)

    def _check_receipts(self, env: Envelope, f: Fields, nodes: list[int],
                        state: _Round) -> None:
        receipts = f.f[F_RECEIPTS]
        if not isinstance(receipts, dict) or set(receipts) != {str(u) for u in nodes}:
            raise PartyError("a signed receipt is needed for exactly each contributor")
        for u in nodes:
            item = receipts[str(u)]
            if not (isinstance(item, list) and len(item) == 2):
                raise WireFormatError("a receipt is [ciphertext digest, signature]")
            ct_digest = unb64(item[0], "receipt digest", DIGEST_SIZE)
            sig = unb64(item[1], "receipt signature", 64)
            key = self.client_keys[state.clients[u - 1]]
            key.verify(sig, receipt_bytes(env.session, env.round, u, state.context_digest,
                                          ct_digest))
