"""The channel interface a server drives stage by stage, and the loop that drives it."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any

from ..secagg.base import SecureSumResult, ServerWorkflow
from ..wire import Message


class Channel(ABC):
    """Delivers one stage's requests and collects the replies that arrive in time.

    A client that does not answer (dropped, timed out, or its reply was lost) is simply
    absent from the returned mapping.
    """

    @abstractmethod
    def exchange(self, stage: str, requests: Mapping[str, bytes]) -> dict[str, Message]:
        """Send ``requests`` (client id -> bytes); return the replies (client id -> bytes)."""

    def stats(self) -> dict[str, Any]:
        """Transport statistics (bytes and seconds per client and stage)."""
        return {}


Progress = Callable[[str, int, int], None]  # stage, requests sent, replies received


RepliesHook = Callable[[str, Mapping[str, Message]], None]  # stage, client id -> reply bytes


def drive(workflow: ServerWorkflow, channel: Channel, progress: Progress | None = None,
          on_replies: RepliesHook | None = None) -> SecureSumResult:
    """Run ``workflow`` to completion over ``channel``; merge transport stats into the result.

    ``on_replies`` sees each stage's replies exactly as the server receives them, before it
    processes them (the audit log records their digests there).
    """
    seconds: dict[str, float] = {}
    while (req := workflow.next_requests()) is not None:
        start = time.perf_counter()
        replies = channel.exchange(req.stage, req.messages)
        if on_replies is not None:
            on_replies(req.stage, replies)
        if progress is not None:
            progress(req.stage, len(req.messages), len(replies))
        workflow.receive(req.stage, replies)
        seconds[req.stage] = time.perf_counter() - start
    result = workflow.result()
    result.stats.update(channel.stats())
    result.stats["stage_seconds"] = seconds
    return result
