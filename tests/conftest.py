"""Shared fixtures for the secure-aggregation tests.

Only fixtures live here (no global settings), so other test modules are unaffected. Every
fixture is session-scoped and returns a stateless helper, which keeps them usable from
hypothesis tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import pytest

from fedcollm_secure.crypto import InsecureSeededRandomForTests
from fedcollm_secure.secagg import TensorSpec
from fedcollm_secure.secagg.masking import MaskingAggregator, MaskingClient, MaskingServer
from fedcollm_secure.wire import Envelope, decode


def seeded(seed: int | str | bytes) -> InsecureSeededRandomForTests:
    """A quiet, deterministic random source (tests only)."""
    return InsecureSeededRandomForTests(seed, quiet=True)


class Recorder:
    """A channel observer that keeps every message: (stage, client id, direction, bytes)."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, str, str, bytes]] = []

    def __call__(self, stage: str, client_id: str, direction: str, data: bytes) -> None:
        self.messages.append((stage, client_id, direction, bytes(data)))

    def select(self, stage: str | None = None, client_id: str | None = None,
               direction: str | None = None) -> list[tuple[str, str, str, bytes]]:
        return [m for m in self.messages
                if (stage is None or m[0] == stage) and (client_id is None or m[1] == client_id)
                and (direction is None or m[2] == direction)]

    def one(self, stage: str, client_id: str, direction: str) -> bytes:
        found = self.select(stage, client_id, direction)
        assert len(found) == 1, f"expected one {direction} of {stage} for {client_id}: {found}"
        return found[0][3]

    def stages_requested(self) -> set[str]:
        return {m[0] for m in self.messages if m[2] == "request"}


def expected_sum(updates: Mapping[str, Mapping[str, Any]], survivors: Iterable[str], *,
                 clip: float | None = None,
                 weights: Mapping[str, float] | None = None) -> dict[str, np.ndarray]:
    """sum over ``survivors`` of weight * clip(update), computed with exactly rounded sums."""
    survivors = list(survivors)
    first = next(iter(updates.values()))
    out = {}
    for name in first:
        terms = []
        for cid in survivors:
            arr = np.asarray(updates[cid][name], dtype=np.float64)
            if clip is not None:
                arr = np.clip(arr, -clip, clip)
            w = 1.0 if weights is None else float(weights[cid])
            terms.append((arr * w).reshape(-1))
        shape = np.asarray(first[name]).shape
        if not terms:
            out[name] = np.zeros(shape)
            continue
        stacked = np.stack(terms)
        out[name] = np.array([math.fsum(stacked[:, i]) for i in range(stacked.shape[1])],
                             dtype=np.float64).reshape(shape)
    return out


def max_abs_diff(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> float:
    assert set(a) == set(b), (sorted(a), sorted(b))
    worst = 0.0
    for name in a:
        x, y = np.asarray(a[name], dtype=np.float64), np.asarray(b[name], dtype=np.float64)
        assert x.shape == y.shape, (name, x.shape, y.shape)
        if x.size:
            worst = max(worst, float(np.max(np.abs(x - y))))
    return worst


def edit_envelope(data: bytes, edit: Callable[[Envelope], None]) -> bytes:
    """Decode ``data``, let ``edit`` change the envelope in place, re-encode (unsigned)."""
    env = decode(data)
    edit(env)
    env.signature = None
    return env.encode()


class MaskingRound:
    """A masking round driven by hand: one server and its clients, all seeded.

    ``step()`` runs one stage honestly (every active client answers unless it is listed in
    ``skip``); ``requests()`` returns the next stage's requests without delivering them, so a
    test can edit one before handing it to a client.
    """

    def __init__(self, n: int = 5, *, seed: int = 0, threshold: int | None = None,
                 session: bytes | None = None, round_: int = 0,
                 updates: Mapping[str, Mapping[str, Any]] | None = None,
                 client_options: Mapping[str, Any] | None = None, **options: Any) -> None:
        self.rng = seeded(seed)
        self.aggregator = MaskingAggregator(**options)
        self.session = session if session is not None else self.rng.bytes(16)
        self.round = round_
        self.ids = sorted(updates) if updates is not None else [f"c{i}" for i in range(n)]
        assert len(self.ids) == n
        if updates is None:
            updates = {cid: {"w": np.linspace(-1.0, 1.0, 6).reshape(2, 3) * (i + 1) / n}
                       for i, cid in enumerate(self.ids)}
        self.updates = updates
        self.spec = TensorSpec.of(updates[self.ids[0]])
        client_aggregator = (MaskingAggregator(**client_options) if client_options is not None
                             else self.aggregator)
        self.clients: dict[str, MaskingClient] = {
            cid: client_aggregator.client(cid, updates[cid], rng=self.rng, session=self.session,
                                          round_=round_) for cid in self.ids}
        self.server: MaskingServer = self.aggregator.server(
            self.ids, self.spec, threshold=threshold, rng=self.rng, session=self.session,
            round_=round_)

    def node(self, cid: str) -> int:
        return self.server.node_of[cid]

    def cid(self, node: int) -> str:
        return self.server.ids[node]

    def requests(self) -> tuple[str, dict[str, bytes]]:
        req = self.server.next_requests()
        assert req is not None, "the round has no further stage"
        return req.stage, dict(req.messages)

    def step(self, skip: Iterable[str] = ()) -> tuple[str, dict[str, bytes], dict[str, bytes]]:
        stage, messages = self.requests()
        skip = set(skip)
        replies = {cid: self.clients[cid].process(msg) for cid, msg in messages.items()
                   if cid not in skip}
        self.server.receive(stage, replies)
        return stage, messages, replies

    def advance_to(self, stage: str, skip: Mapping[str, str] | None = None) -> dict[str, bytes]:
        """Run honest stages until ``stage`` is next; return that stage's requests.

        ``skip`` maps a client to the stage from which it stops answering.
        """
        from fedcollm_secure.secagg.masking import STAGES

        skip = dict(skip or {})
        gone: set[str] = set()
        while True:
            next_stage = STAGES[self.server.stage_index]
            gone |= {c for c, s in skip.items() if s == next_stage}
            if next_stage == stage:
                return self.requests()[1]
            self.step(skip=gone)


@pytest.fixture(scope="session")
def make_rng() -> Callable[[int | str | bytes], InsecureSeededRandomForTests]:
    return seeded


@pytest.fixture(scope="session")
def masking_round() -> type[MaskingRound]:
    return MaskingRound


@pytest.fixture(scope="session")
def recorder() -> type[Recorder]:
    return Recorder


@pytest.fixture(scope="session")
def sums() -> Any:
    """Reference sums: ``sums.expected(...)`` and ``sums.max_abs_diff(...)``."""

    class _Sums:
        expected = staticmethod(expected_sum)
        diff = staticmethod(max_abs_diff)

    return _Sums


@pytest.fixture(scope="session")
def edit_env() -> Callable[[bytes, Callable[[Envelope], None]], bytes]:
    return edit_envelope


@pytest.fixture(scope="module")
def one_torch_thread() -> Any:
    """Tiny models gain nothing from threads and lose a lot on a busy 2-core machine; modules
    that train or run them use one torch thread and restore the setting afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
