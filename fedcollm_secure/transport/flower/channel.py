"""A :class:`~fedcollm_secure.transport.base.Channel` over a Flower ``Grid``.

Each protocol stage becomes one exchange: a ``query.<stage>`` message per client node
carrying the protocol's envelope bytes in a ``ConfigRecord``, and the replies that arrive
before the stage's deadline. A node that does not answer in time, whose reply is a Flower
error (e.g. its ``ClientApp`` crashed) or carries no payload, is absent from the replies:
the workflow sees a dropout, exactly as with the in-process channel.

The grid is polled every ``poll_interval`` seconds (``Grid.send_and_receive`` of the
deployment engine sleeps 3 s between polls, too coarse for several stages per round).
Other roles than clients (e.g. a key authority) are reached through :meth:`link`, a
bytes-in/bytes-out callable over the same grid.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from ...errors import TransportError, TransportTimeout
from ...wire import Message as WireMessage
from ..base import Channel

RECORD = "fedcollm"
# field names of the records exchanged with the ClientApp
F_ROUND = "round"
F_STAGE = "stage"
F_PAYLOAD = "payload"
F_SESSION = "session"
F_PROTOCOL_ROUND = "protocol_round"
F_MAX_WEIGHT = "max_weight"
F_ERROR = "error"
F_THETA = "theta"
F_CLIENT_ID = "client_id"
F_WEIGHT = "weight"
F_N_EXAMPLES = "n_examples"
F_LOSS = "loss"
F_STEPS = "steps"
F_CLIPPED = "clipped"
F_DP = "dp"  # train reply with DP-SGD: JSON {noise_multiplier, sample_rate, steps, epsilon, ...}
F_DDP = "ddp"  # train reply with distributed DP: JSON {clipped, norm, out_of_range, sigma, ...}
F_ROLE = "role"  # train reply of a node that is not a client (e.g. "key-authority")
F_AUTHORITY_KEY = "authority_key"  # the ckks key authority's Ed25519 public key, hex
F_IDENTITY_KEY = "identity_key"  # a ckks client's Ed25519 public key, hex (train reply)
F_CLIENT_KEYS = "client_keys"  # JSON {client id: public key hex}, relayed to the authority

TRAIN = "train"
QUERY = "query"
AUTHORITY_STAGE = "key_authority"  # aggregator <-> ckks key authority (open_round, decrypt)


def stage_message_type(stage: str) -> str:
    """``query.<stage>``: the ClientApp registers one handler per protocol stage."""
    return f"{QUERY}.{stage}"


def record_of(msg: Message) -> ConfigRecord | None:
    """The ``fedcollm`` record of a reply, or ``None`` for an error reply / no record."""
    if msg.has_error() or not msg.has_content():
        return None
    rec = msg.content.config_records.get(RECORD)
    return rec if isinstance(rec, ConfigRecord) else None


def collect(grid: Grid, messages: Mapping[int, Message], timeout: float,
            poll_interval: float = 0.2) -> tuple[dict[int, Message], dict[int, str]]:
    """Push ``messages`` (node id -> message); return the replies that arrive within
    ``timeout`` seconds (node id -> reply) and why the others are missing."""
    if not messages:
        return {}, {}
    ids = list(grid.push_messages(list(messages.values())))
    if len(ids) != len(messages):
        raise TransportError(f"the SuperLink accepted {len(ids)} of {len(messages)} messages")
    pending = {mid: node for mid, node in zip(ids, messages, strict=True) if mid}
    replies: dict[int, Message] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    while pending:
        for reply in grid.pull_messages(list(pending)):
            node = pending.pop(reply.metadata.reply_to_message_id, None)
            if node is None:
                continue  # not one of ours (or a second reply): ignored
            if reply.has_error():
                errors[node] = f"flower error {reply.error.code}: {reply.error.reason}"
            else:
                replies[node] = reply
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(min(poll_interval, max(0.0, deadline - time.monotonic())))
    for node in pending.values():
        errors[node] = f"no reply within {timeout:g} s"
    return replies, errors


class FlowerChannel(Channel):
    """Protocol stages over a Flower grid; ``nodes`` maps client id -> node id.

    ``fields`` are sent with every stage (round, session, ...); ``timeout(stage)`` gives each
    stage's deadline in seconds.
    """

    def __init__(self, grid: Grid, nodes: Mapping[str, int], *, round_: int,
                 timeout: Callable[[str], float], fields: Mapping[str, Any] | None = None,
                 poll_interval: float = 0.2) -> None:
        self.grid = grid
        self.nodes = dict(nodes)
        if len(set(self.nodes.values())) != len(self.nodes):
            raise TransportError("two clients map to the same node")
        self.round = round_
        self.timeout = timeout
        self.fields = dict(fields or {})
        self.poll_interval = poll_interval
        self.bytes_sent: dict[str, dict[str, int]] = {c: {} for c in self.nodes}
        self.bytes_received: dict[str, dict[str, int]] = {c: {} for c in self.nodes}
        self.missing: dict[str, dict[str, str]] = {}  # stage -> client id -> reason
        self.stage_wall: dict[str, float] = {}

    def _message(self, node: int, message_type: str, stage: str, payload: bytes,
                 extra: Mapping[str, Any] | None = None) -> Message:
        rec = ConfigRecord({F_ROUND: self.round, F_STAGE: stage, F_PAYLOAD: payload,
                            **self.fields, **(extra or {})})
        return Message(RecordDict({RECORD: rec}), dst_node_id=node, message_type=message_type,
                       group_id=str(self.round),
                       ttl=max(60.0, 2 * self.timeout(stage)))

    def exchange(self, stage: str, requests: Mapping[str, bytes]) -> dict[str, WireMessage]:
        start = time.perf_counter()
        messages = {self.nodes[cid]: self._message(self.nodes[cid], stage_message_type(stage),
                                                   stage, req)
                    for cid, req in requests.items() if cid in self.nodes}
        by_node = {node: cid for cid, node in self.nodes.items()}
        for cid, req in requests.items():
            if cid in self.nodes:
                self.bytes_received[cid][stage] = len(req)  # as counted by the client side
        got, errors = collect(self.grid, messages, self.timeout(stage), self.poll_interval)
        replies: dict[str, WireMessage] = {}
        missing = {by_node[n]: why for n, why in errors.items()}
        for node, msg in got.items():
            cid = by_node[node]
            rec = record_of(msg)
            payload = None if rec is None else rec.get(F_PAYLOAD)
            if not isinstance(payload, bytes):
                reason = None if rec is None else rec.get(F_ERROR)
                missing[cid] = f"refused: {reason!s}" if reason else "reply without payload"
                continue
            replies[cid] = payload
            self.bytes_sent[cid][stage] = len(payload)
        if missing:
            self.missing[stage] = missing
        self.stage_wall[stage] = time.perf_counter() - start
        return replies

    def link(self, node: int, message_type: str, stage: str,
             extra: Mapping[str, Any] | None = None) -> Callable[[bytes], bytes]:
        """A bytes-in/bytes-out link to another role on ``node`` (e.g. a key authority),
        with ``extra`` fields on every message; raises :class:`TransportTimeout` when no
        reply arrives in time and :class:`TransportError` when the node refuses."""

        def send(request: bytes) -> bytes:
            got, errors = collect(self.grid, {node: self._message(node, message_type, stage,
                                                                  request, extra)},
                                  self.timeout(stage), self.poll_interval)
            rec = record_of(got[node]) if node in got else None
            payload = None if rec is None else rec.get(F_PAYLOAD)
            if not isinstance(payload, bytes):
                reason = None if rec is None else rec.get(F_ERROR)
                if reason:
                    raise TransportError(f"{message_type} on node {node} refused: {reason!s}")
                raise TransportTimeout(f"{message_type} on node {node}: "
                                       f"{errors.get(node, 'reply without payload')}")
            return payload

        return send

    def stats(self) -> dict[str, Any]:
        return {"bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received,
                "missing": self.missing, "transport_stage_seconds": self.stage_wall,
                "transport": "flower"}
