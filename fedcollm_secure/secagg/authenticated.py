"""Signed channels for any aggregator: every message signed by a long-term identity.

When identities are configured, each message of any protocol travels inside an outer
``auth/v1`` envelope signed with the sender's long-term Ed25519 key (see
:mod:`fedcollm_secure.identity`); the receiver checks the signer against the allow-list
*before* the inner message is parsed. Server requests are signed by the server; client
replies by the client. A reply that fails this check is treated as that client's dropout
and its reason recorded in ``stats["rejected"]``; a request that fails it is refused with a
signed ``error`` reply. The outer header names sender and receiver (``from``/``to``); the
inner message carries its own session, round and stage bindings.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import FedCoLLMSecureError, PartyError, ProtocolError, StageError, WireFormatError
from ..identity import SERVER_NAME, AllowList, Identity
from ..wire import DEFAULT_MAX_HEADER, Envelope, Fields, Limits, Message, decode
from .base import ClientEndpoint, SecureSumResult, ServerWorkflow, StageRequests

PROTOCOL = "auth/v1"
ERROR = "error"
F_FROM, F_TO = "from", "to"
F_CODE, F_MESSAGE = "code", "message"
_LIMITS = Limits(max_header=DEFAULT_MAX_HEADER, max_body=1 << 33)


def seal_message(stage: str, sender: Identity, receiver: str, inner: Message,
                 fields: Mapping[str, object] | None = None) -> bytes:
    """``inner`` wrapped in an ``auth/v1`` envelope signed by ``sender``."""
    env = Envelope(protocol=PROTOCOL, stage=stage, session=b"", round=0, src=0, dst=0,
                   fields={F_FROM: sender.name, F_TO: receiver, **(fields or {})}, body=inner)
    return env.encode(sender.key)


def open_message(data: Message, *, sender: str, receiver: str, allow_list: AllowList,
                 stage: str | None = None) -> Envelope:
    """Check the outer envelope: signed by ``sender``'s listed key, addressed to ``receiver``
    (and for ``stage`` if given). Raises a typed error; returns the envelope (body = inner)."""
    env = decode(data, _LIMITS)
    if env.protocol != PROTOCOL:
        raise WireFormatError(f"expected an {PROTOCOL} envelope, got {env.protocol!r}")
    optional = frozenset({F_CODE, F_MESSAGE}) if env.stage == ERROR else frozenset()
    f = Fields(env, {F_FROM, F_TO}, optional)
    claimed, to = f.string(F_FROM, 128), f.string(F_TO, 128)
    if claimed != sender:
        raise PartyError(f"message claims to come from {claimed!r}, expected {sender!r}")
    env.verify(allow_list.verify_key(claimed))  # unknown signer / bad signature: SignatureError
    if to != receiver:
        raise PartyError(f"message is addressed to {to!r}, not {receiver!r}")
    if stage is not None and env.stage not in (stage, ERROR):
        raise StageError(f"signed message is for stage {env.stage!r}, expected {stage!r}")
    return env


class SignedClientEndpoint(ClientEndpoint):
    """A client endpoint whose requests must be signed by the server and whose replies are
    signed with the client's identity."""

    def __init__(self, inner: ClientEndpoint, identity: Identity, allow_list: AllowList,
                 server: str = SERVER_NAME) -> None:
        if identity.name != inner.client_id:
            raise PartyError(f"identity {identity.name!r} does not belong to client "
                             f"{inner.client_id!r}")
        allow_list.require(identity.name, identity.public_key)
        self.inner, self.identity, self.allow_list, self.server = (
            inner, identity, allow_list, server)
        self.client_id = inner.client_id

    def handle(self, request: bytes) -> bytes:
        try:
            env = open_message(request, sender=self.server, receiver=self.client_id,
                               allow_list=self.allow_list)
        except FedCoLLMSecureError as exc:
            return seal_message(ERROR, self.identity, self.server, b"",
                                {F_CODE: type(exc).__name__, F_MESSAGE: str(exc)[:500]})
        return seal_message(env.stage, self.identity, self.server,
                            self.inner.handle(bytes(env.body)))


class SignedServerWorkflow(ServerWorkflow):
    """A server workflow whose requests are signed with the server's identity and whose
    replies must be signed by the listed key of the client they come from."""

    def __init__(self, inner: ServerWorkflow, identity: Identity, allow_list: AllowList) -> None:
        allow_list.require(identity.name, identity.public_key)
        self.inner, self.identity, self.allow_list = inner, identity, allow_list
        self.rejected: dict[str, str] = {}

    def next_requests(self) -> StageRequests | None:
        req = self.inner.next_requests()
        if req is None:
            return None
        return StageRequests(req.stage, {
            cid: seal_message(req.stage, self.identity, cid, msg)
            for cid, msg in req.messages.items()})

    def receive(self, stage: str, replies: Mapping[str, Message]) -> None:
        opened: dict[str, Message] = {}
        for cid, data in replies.items():
            try:
                env = open_message(data, sender=cid, receiver=self.identity.name,
                                   allow_list=self.allow_list, stage=stage)
                if env.stage == ERROR:
                    f = Fields(env, {F_FROM, F_TO, F_CODE, F_MESSAGE})
                    raise ProtocolError(f"client refused: {f.string(F_CODE, 64)}: "
                                        f"{f.string(F_MESSAGE, 500)}")
                opened[cid] = env.body  # a read-only view of the checked message
            except FedCoLLMSecureError as exc:
                self.rejected[cid] = f"{stage}: {type(exc).__name__}: {exc}"
        self.inner.receive(stage, opened)

    def result(self) -> SecureSumResult:
        result = self.inner.result()
        rejected = dict(result.stats.get("rejected", {}))
        rejected.update(self.rejected)
        result.stats["rejected"] = rejected
        return result
