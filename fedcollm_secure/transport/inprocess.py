"""In-process transport with fault injection: drop, delay/time out, tamper, replay.

Clients are :class:`ClientEndpoint` objects in this process; every message still crosses as
bytes, so what the server sees is exactly what a network would carry.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ..secagg.base import ClientEndpoint
from ..wire import Message
from .base import Channel

Direction = Literal["request", "reply"]
Observer = Callable[[str, str, Direction, Message], None]  # stage, client id, direction, bytes


@dataclass
class Tamper:
    """Replace the bytes of one message (e.g. flip a bit, or substitute a recorded one)."""

    client_id: str
    stage: str
    direction: Direction
    edit: Callable[[bytes], bytes]


@dataclass
class FaultPlan:
    """Faults to inject. ``drop``: client id -> stage from which it sends nothing.
    ``delay``: (client id, stage) -> simulated seconds before its reply arrives; a reply later
    than ``stage_timeout`` is discarded as timed out."""

    drop: dict[str, str] = field(default_factory=dict)
    tamper: list[Tamper] = field(default_factory=list)
    delay: dict[tuple[str, str], float] = field(default_factory=dict)
    stage_timeout: float = 60.0


def flip_bit(offset: int, bit: int = 0) -> Callable[[bytes], bytes]:
    """An edit that flips one bit at ``offset`` (negative offsets count from the end)."""

    def edit(data: bytes) -> bytes:
        b = bytearray(data)
        b[offset] ^= 1 << bit
        return bytes(b)

    return edit


class InProcessChannel(Channel):
    def __init__(self, clients: Mapping[str, ClientEndpoint], faults: FaultPlan | None = None,
                 stage_order: tuple[str, ...] = ()) -> None:
        self.clients = dict(clients)
        self.faults = faults or FaultPlan()
        self.stage_order = stage_order
        self.observers: list[Observer] = []
        self.dropped_out: dict[str, str] = {}
        self.timed_out: dict[str, str] = {}
        self.bytes_sent: dict[str, dict[str, int]] = {c: {} for c in self.clients}
        self.bytes_received: dict[str, dict[str, int]] = {c: {} for c in self.clients}
        self.client_seconds: dict[str, dict[str, float]] = {c: {} for c in self.clients}

    def _is_dropped(self, cid: str, stage: str) -> bool:
        if cid in self.dropped_out:
            return True
        at = self.faults.drop.get(cid)
        if at is not None and at == stage:
            self.dropped_out[cid] = stage
            return True
        return False

    def _apply(self, cid: str, stage: str, direction: Direction, data: Message) -> Message:
        for t in self.faults.tamper:
            if t.client_id == cid and t.stage == stage and t.direction == direction:
                data = t.edit(bytes(data))
        for obs in self.observers:
            obs(stage, cid, direction, data)
        return data

    def exchange(self, stage: str, requests: Mapping[str, bytes]) -> dict[str, Message]:
        replies: dict[str, Message] = {}
        for cid, request in requests.items():
            if cid not in self.clients or self._is_dropped(cid, stage):
                continue
            request = bytes(self._apply(cid, stage, "request", request))  # no copy of bytes
            self.bytes_received[cid][stage] = len(request)
            start = time.perf_counter()
            reply = self.clients[cid].handle(request)
            self.client_seconds[cid][stage] = time.perf_counter() - start
            if self.faults.delay.get((cid, stage), 0.0) > self.faults.stage_timeout:
                self.timed_out[cid] = stage
                self.dropped_out[cid] = stage
                continue
            reply = self._apply(cid, stage, "reply", reply)
            self.bytes_sent[cid][stage] = len(reply)
            replies[cid] = reply
        return replies

    def stats(self) -> dict[str, Any]:
        return {"bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received,
                "client_seconds": self.client_seconds, "timed_out": dict(self.timed_out)}
