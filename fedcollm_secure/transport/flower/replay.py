"""A client endpoint that survives between Flower messages by deterministic replay.

On the deployment engine every message a SuperNode receives runs in a fresh ``ClientApp``
process; only ``Context.state`` (a ``RecordDict`` kept by the SuperNode, on the node's own
machine, never sent to the SuperLink) persists between the stages of a round. Rather than
serialising a protocol's private state (keys, shares, masks) in a protocol-specific way,
the node keeps what *determines* it:

* the round's update and weight (training ran once, in the ``train`` message);
* a fresh 32-byte secret from the OS CSPRNG, the key of the endpoint's randomness
  (:class:`KeystreamRandom`, a ChaCha20 keystream: a CSPRNG, unlike the seeded test source);
* the requests the endpoint has answered so far, in order.

For each new request the ``ClientApp`` rebuilds the *same* endpoint object from the
aggregator registry, replays the earlier requests (discarding the replies it already sent),
then answers the new one. Endpoints are deterministic given their randomness and inputs, so
the rebuilt state is the state that sent those replies; no protocol logic is involved.

Limit: an endpoint whose randomness does not come from the ``rng`` it is given (e.g. a
library that draws its own) cannot be replayed across a stage that uses it; ``ckks`` clients
have a single stage, so nothing of theirs is replayed. The ``ckks`` key authority, whose
TenSEAL keys cannot be replayed, saves its state instead (:mod:`.key_authority`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from ...errors import ConfigError, WireFormatError
from ...secagg.base import ClientEndpoint, get_aggregator

SEED_SIZE = 32
Builder = Callable[["EndpointState", "KeystreamRandom"], ClientEndpoint]
MAX_REPLAYED = 64  # requests per round; every registered protocol has far fewer stages


class KeystreamRandom:
    """Random bytes from a ChaCha20 keystream under a 256-bit key drawn from the OS CSPRNG.

    A :class:`~fedcollm_secure.crypto.randomness.RandomSource`: given the same key it
    returns the same stream, which is what lets an endpoint be rebuilt on a later message.
    The key must stay on the node (it determines every secret of the round).
    """

    def __init__(self, key: bytes) -> None:
        if len(key) != SEED_SIZE:
            raise ConfigError(f"keystream key must be {SEED_SIZE} bytes")
        self._enc = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()

    @staticmethod
    def new_key() -> bytes:
        return os.urandom(SEED_SIZE)

    def bytes(self, n: int) -> bytes:
        return self._enc.update(bytes(n))


def update_to_bytes(update: Mapping[str, np.ndarray]) -> bytes:
    """Named arrays as safetensors bytes (no pickle): float32, or int64 for integer arrays
    (distributed DP's integer vectors must stay exact)."""
    return st_save({k: np.ascontiguousarray(
        v, dtype=np.int64 if np.asarray(v).dtype.kind in "iu" else np.float32)
        for k, v in update.items()})


def update_from_bytes(data: bytes) -> dict[str, np.ndarray]:
    try:
        out = st_load(data)
    except Exception as exc:  # safetensors raises its own error types
        raise WireFormatError(f"not a safetensors update: {exc}") from None
    return {k: out[k] for k in sorted(out)}


@dataclass
class EndpointState:
    """Everything a node keeps between the stages of one round (all plain data)."""

    round: int
    client_id: str
    aggregator: str
    options: dict[str, Any]
    update: bytes
    weight: float
    key: bytes
    session: bytes = b""
    protocol_round: int = 0
    requests: list[bytes] = field(default_factory=list)

    def endpoint(self, build: Builder | None = None) -> ClientEndpoint:
        """The endpoint, rebuilt and brought up to date by replaying ``requests``;
        ``build`` makes it instead of the aggregator registry (e.g. with the node's keys)."""
        if len(self.requests) > MAX_REPLAYED:
            raise ConfigError(f"more than {MAX_REPLAYED} requests in one round")
        rng = KeystreamRandom(self.key)
        if build is not None:
            ep = build(self, rng)
        else:
            aggregator = get_aggregator(self.aggregator, **self.options)
            ep = aggregator.client(self.client_id, update_from_bytes(self.update),
                                   weight=self.weight, rng=rng, session=self.session or None,
                                   round_=self.protocol_round)
        for request in self.requests:
            ep.handle(request)
        return ep

    def answer(self, request: bytes, build: Builder | None = None) -> bytes:
        """Answer ``request`` with the endpoint of this round; remember it for the next."""
        reply = self.endpoint(build).handle(request)
        self.requests.append(bytes(request))
        return bytes(reply)  # Flower's records hold bytes

    # --- plain-data form, for Flower's ConfigRecord ------------------------------------------
    def to_record(self) -> dict[str, Any]:
        return {"round": self.round, "client_id": self.client_id, "aggregator": self.aggregator,
                "options": json.dumps(self.options, sort_keys=True), "update": self.update,
                "weight": self.weight, "key": self.key, "session": self.session,
                "protocol_round": self.protocol_round, "requests": list(self.requests)}

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> EndpointState:
        try:
            options = json.loads(str(rec["options"]))
            requests = [bytes(r) for r in rec.get("requests", [])]
            return cls(round=int(rec["round"]), client_id=str(rec["client_id"]),
                       aggregator=str(rec["aggregator"]), options=dict(options),
                       update=bytes(rec["update"]), weight=float(rec["weight"]),
                       key=bytes(rec["key"]), session=bytes(rec["session"]),
                       protocol_round=int(rec["protocol_round"]), requests=requests)
        except (KeyError, TypeError, ValueError) as exc:
            raise WireFormatError(f"node state of the round is unreadable: {exc}") from None
