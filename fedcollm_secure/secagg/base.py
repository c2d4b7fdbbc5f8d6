"""The aggregator interface, its sans-IO halves, and the registry.

An aggregator has two halves that only exchange encoded messages
(:data:`~fedcollm_secure.wire.Message`: bytes, or a read-only view of a buffer the sender
built in place and no longer writes):

* a :class:`ClientEndpoint` per client, which answers one request with one reply;
* a :class:`ServerWorkflow`, which emits the requests of one stage at a time and consumes
  the replies (a missing reply means that client dropped out).

A transport (in-process, Flower, ...) moves the bytes; see ``fedcollm_secure.transport``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np

from ..crypto.randomness import RandomSource
from ..errors import AggregatorNotFoundError, ConfigError
from ..wire import Message
from .tensors import TensorSpec, Update

if TYPE_CHECKING:
    from ..identity import Identities


@dataclass(frozen=True)
class StageRequests:
    stage: str
    messages: dict[str, bytes]  # client id -> request bytes


@dataclass
class SecureSumResult:
    """What the server learns: the (weighted) sum of the survivors' updates, and metadata."""

    sum: dict[str, np.ndarray]
    survivors: list[str]
    dropped: dict[str, str]  # client id -> stage at which it dropped (or was rejected)
    weight_total: float
    stats: dict[str, Any] = field(default_factory=dict)
    protocol: str = ""

    def mean(self) -> dict[str, np.ndarray]:
        """The weighted mean: sum / weight_total."""
        if self.weight_total <= 0:
            raise ZeroDivisionError("weight total is zero")
        return {k: v / self.weight_total for k, v in self.sum.items()}


class ClientEndpoint(ABC):
    """One client's side of an aggregation round: request bytes in, one message out."""

    client_id: str

    @abstractmethod
    def handle(self, request: bytes) -> Message:
        """Answer one request. Refusals come back as an error message, never as silence."""


class ServerWorkflow(ABC):
    """The server's side of one round, driven stage by stage by a transport."""

    @abstractmethod
    def next_requests(self) -> StageRequests | None:
        """Requests for the next stage, or ``None`` once the round is complete."""

    @abstractmethod
    def receive(self, stage: str, replies: Mapping[str, Message]) -> None:
        """Consume the replies of ``stage``; clients absent from ``replies`` dropped out."""

    @abstractmethod
    def result(self) -> SecureSumResult:
        """The aggregate; raises :class:`ThresholdError` if the round aborted."""


class Aggregator(ABC):
    """A secure-aggregation protocol. Subclasses register with :func:`register_aggregator`."""

    name: ClassVar[str]
    secure: ClassVar[bool] = True
    stages: ClassVar[tuple[str, ...]]

    def __init__(self, **options: Any) -> None:
        self.options = options

    @abstractmethod
    def client(self, client_id: str, update: Update, *, weight: float = 1.0,
               rng: RandomSource | None = None, session: bytes | None = None,
               round_: int | None = None) -> ClientEndpoint:
        """The endpoint of one client holding ``update``."""

    @abstractmethod
    def server(self, client_ids: Sequence[str], spec: TensorSpec, *, threshold: int | None = None,
               weighted: bool = False, rng: RandomSource | None = None,
               session: bytes | None = None, round_: int = 0) -> ServerWorkflow:
        """The server workflow for one round over ``client_ids``."""

    supports_identities: ClassVar[bool] = False  # client()/server() take identity arguments

    def adopt_identities(self, identities: Identities) -> None:
        """Hand long-term identities to parties the aggregator creates itself (e.g. a key
        authority). Called before any client or server is built; nothing to do by default."""
        return None

    def active_stages(self, identities: bool = False) -> tuple[str, ...]:
        """The stages a round runs (with long-term identities configured, if ``identities``)."""
        return self.stages

    def default_threshold(self, n_clients: int) -> int:
        return max(1, n_clients // 2 + 1)


A = TypeVar("A", bound=type[Aggregator])
_REGISTRY: dict[str, type[Aggregator]] = {}


def register_aggregator(cls: A) -> A:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ConfigError("an aggregator needs a non-empty class attribute 'name'")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ConfigError(f"an aggregator named {name!r} is already registered")
    _REGISTRY[name] = cls
    return cls


def available_aggregators() -> list[str]:
    return sorted(_REGISTRY)


def get_aggregator(name: str, **options: Any) -> Aggregator:
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise AggregatorNotFoundError(
            f"unknown aggregator {name!r}; available: {available_aggregators()}") from None
    return cls(**options)

