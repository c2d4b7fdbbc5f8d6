"""``plaintext``: NO protection. The server sees every individual update.

A baseline for measuring what protection costs, and for debugging. Creating it warns.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from ..crypto.randomness import RandomSource
from ..errors import (
    ConfigError,
    FedCoLLMSecureError,
    PartyError,
    ProtocolError,
    ThresholdError,
    WireFormatError,
)
from ..wire import SERVER, Envelope, Fields, Limits, Message, decode
from .base import (
    Aggregator,
    ClientEndpoint,
    SecureSumResult,
    ServerWorkflow,
    StageRequests,
    register_aggregator,
)
from .tensors import TensorSpec, Update

PROTOCOL = "plaintext/v1"
INPUT = "input"
ERROR = "error"
F_SPEC, F_WEIGHT, F_LENGTH = "tensor_spec", "weight", "length"


class InsecureAggregationWarning(UserWarning):
    """The selected aggregator does not protect individual updates."""


class PlaintextClient(ClientEndpoint):
    def __init__(self, client_id: str, update: Update, weight: float,
                 session: bytes | None, round_: int | None) -> None:
        self.client_id, self.update, self.weight = client_id, update, float(weight)
        self.session, self.round = session, round_
        self.done = False

    def handle(self, request: bytes) -> bytes:
        try:
            return self.process(request)
        except FedCoLLMSecureError as exc:
            return Envelope(PROTOCOL, ERROR, self.session or b"", self.round or 0, 0, SERVER,
                            {"code": type(exc).__name__, "message": str(exc)[:500]}).encode()

    def process(self, request: bytes) -> bytes:
        env = decode(request)
        env.expect(protocol=PROTOCOL, stage=INPUT, session=self.session or env.session,
                   round_=self.round if self.round is not None else env.round, src=SERVER)
        if self.done:
            raise ProtocolError("duplicated input request")
        spec = TensorSpec.from_json(Fields(env, {F_SPEC}).list_of(F_SPEC, 100_000))
        vec = spec.flatten(self.update, who=f"client {self.client_id}") * self.weight
        self.done = True
        return Envelope(PROTOCOL, INPUT, env.session, env.round, env.dst, SERVER,
                        {F_WEIGHT: self.weight, F_LENGTH: int(vec.size)},
                        vec.astype("<f8").tobytes()).encode()


class PlaintextServer(ServerWorkflow):
    def __init__(self, client_ids: Sequence[str], spec: TensorSpec, threshold: int,
                 session: bytes, round_: int) -> None:
        if len(set(client_ids)) != len(client_ids):
            raise PartyError("duplicate client ids")
        self.ids = {i + 1: cid for i, cid in enumerate(sorted(client_ids))}
        self.spec, self.threshold = spec, threshold
        self.session, self.round = session, round_
        self._result: SecureSumResult | None = None
        self._sent = False
        self.seconds: dict[str, float] = {}

    def next_requests(self) -> StageRequests | None:
        if self._sent:
            return None
        self._sent = True
        return StageRequests(INPUT, {cid: Envelope(PROTOCOL, INPUT, self.session, self.round,
                                                   SERVER, u, {F_SPEC: self.spec.to_json()}
                                                   ).encode() for u, cid in self.ids.items()})

    def receive(self, stage: str, replies: Mapping[str, Message]) -> None:
        start = time.perf_counter()
        total = np.zeros(self.spec.size)
        weight, survivors, dropped, rejected = 0.0, [], {}, {}
        for u, cid in sorted(self.ids.items()):
            if cid not in replies:
                dropped[cid] = INPUT
                continue
            try:
                env = decode(replies[cid], Limits(max_body=self.spec.size * 8))
                if env.stage == ERROR:
                    raise ProtocolError(f"client refused: {env.fields}")
                env.expect(protocol=PROTOCOL, stage=INPUT, session=self.session,
                           round_=self.round, src=u, dst=SERVER)
                f = Fields(env, {F_WEIGHT, F_LENGTH})
                vec = np.frombuffer(env.body, dtype="<f8")
                if f.uint(F_LENGTH) != self.spec.size or vec.size != self.spec.size:
                    raise WireFormatError("input has the wrong length")
                w = f.number(F_WEIGHT)
                if not (np.isfinite(vec).all() and np.isfinite(w)):
                    raise WireFormatError("input contains non-finite values")
            except FedCoLLMSecureError as exc:
                dropped[cid], rejected[cid] = INPUT, f"{type(exc).__name__}: {exc}"
                continue
            total += vec
            weight += w
            survivors.append(cid)
        if len(survivors) < self.threshold:
            raise ThresholdError(f"{len(survivors)} inputs, below the threshold {self.threshold}")
        self.seconds[INPUT] = time.perf_counter() - start
        self._result = SecureSumResult(self.spec.unflatten(total), survivors, dropped, weight,
                                       {"server_seconds": self.seconds, "rejected": rejected},
                                       protocol="plaintext")

    def result(self) -> SecureSumResult:
        if self._result is None:
            raise ProtocolError("the round has not completed")
        return self._result


@register_aggregator
class PlaintextAggregator(Aggregator):
    """Sums updates in the clear. INSECURE: baseline and debugging only."""

    name: ClassVar[str] = "plaintext"
    secure: ClassVar[bool] = False
    stages: ClassVar[tuple[str, ...]] = (INPUT,)

    def __init__(self, **options: Any) -> None:
        if options:
            raise ProtocolError(f"plaintext takes no options, got {sorted(options)}")
        super().__init__()
        warnings.warn("aggregator 'plaintext' is INSECURE: the server sees every client's "
                      "update; use 'masking' to protect them", InsecureAggregationWarning,
                      stacklevel=2)

    def default_threshold(self, n_clients: int) -> int:
        return 1

    def client(self, client_id: str, update: Update, *, weight: float = 1.0,
               rng: RandomSource | None = None, session: bytes | None = None,
               round_: int | None = None) -> PlaintextClient:
        return PlaintextClient(client_id, update, weight, session, round_)

    def server(self, client_ids: Sequence[str], spec: TensorSpec, *, threshold: int | None = None,
               weighted: bool = False, rng: RandomSource | None = None,
               session: bytes | None = None, round_: int = 0) -> PlaintextServer:
        t = threshold if threshold is not None else 1
        if not 1 <= t <= len(client_ids):
            raise ConfigError(f"threshold {t} not in [1, {len(client_ids)}]")
        return PlaintextServer(client_ids, spec, t, session or b"\x00" * 16, round_)
