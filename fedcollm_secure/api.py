"""Python API for secure rounds on arbitrary named tensors."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from .audit.rounds import AuditTarget, audited_round
from .crypto.randomness import RandomSource, default_random
from .errors import ConfigError, UpdateValidationError
from .identity import Identities
from .secagg import SecureSumResult, TensorSpec, get_aggregator
from .secagg.authenticated import SignedClientEndpoint, SignedServerWorkflow
from .secagg.base import ClientEndpoint, ServerWorkflow
from .secagg.tensors import Update
from .transport import FaultPlan, InProcessChannel, drive
from .transport.base import Progress
from .transport.inprocess import Observer


def secure_sum(updates: Mapping[str, Update], *, protocol: str = "masking",
               threshold: int | None = None, weights: Mapping[str, float] | None = None,
               drop: Mapping[str, str] | None = None, rng: RandomSource | None = None,
               faults: FaultPlan | None = None, observers: tuple[Observer, ...] = (),
               round_: int = 0, progress: Progress | None = None,
               identities: Identities | None = None, audit_log: AuditTarget | None = None,
               **options: Any) -> SecureSumResult:
    """Aggregate ``updates`` (client id -> {name: array}) with ``protocol``, in process.

    Returns the (weighted) sum of the surviving clients' updates; ``weights`` multiply each
    update and their total comes back as ``result.weight_total``. ``drop`` (simulation only)
    maps a client id to the stage at which it vanishes. Below ``threshold`` survivors a
    :class:`~fedcollm_secure.errors.ThresholdError` is raised. ``options`` go to the
    aggregator's config (e.g. ``graph="k_regular"``, ``clip=1.0``, ``ring_bits=32``).

    With ``identities`` (long-term keys of every client and the server, and the allow-list),
    every message is signed and checked against the allow-list, and ``masking`` binds its
    per-round keys to the identities and runs its consistency check.

    With ``audit_log`` (a path, or an open :class:`~fedcollm_secure.audit.AuditLog`) the
    round is recorded there: configuration, the SHA-256 of every reply the server received,
    participants, dropouts and their stages, parameters, key-authority decryptions.
    """
    if not updates:
        raise UpdateValidationError("no updates to aggregate")
    ids = list(updates)
    if any(not isinstance(c, str) or not c for c in ids):
        raise ConfigError("client ids must be non-empty strings")
    spec = TensorSpec.of(updates[ids[0]])
    for cid in ids:  # every client's update must match the common spec (checked, no copy)
        spec.flat_parts(updates[cid], who=f"client {cid}", keep_float32=True)
    w = {cid: 1.0 for cid in ids}
    if weights is not None:
        if set(weights) != set(ids):
            raise ConfigError("weights must name exactly the clients of updates")
        w = {cid: float(weights[cid]) for cid in ids}
        if any(not math.isfinite(v) or v < 0 for v in w.values()):
            raise ConfigError("weights must be finite and non-negative")
        if protocol == "masking" and "max_weight" not in options:
            options["max_weight"] = max(max(w.values()), 1e-12)
    aggregator = get_aggregator(protocol, **options)
    plan = dataclasses.replace(faults or FaultPlan())  # the caller's plan is left unchanged
    plan.drop = dict(plan.drop)
    for cid, stage in (drop or {}).items():
        if cid not in updates:
            raise ConfigError(f"drop names unknown client {cid!r}")
        stages = aggregator.active_stages(identities is not None)
        if stage not in stages:
            raise ConfigError(f"unknown stage {stage!r} for {protocol}; stages: {list(stages)}")
        plan.drop[cid] = stage
    rng = rng or default_random()
    session = rng.bytes(16)
    bound: dict[str, Any] = {}
    if identities is not None:
        missing = set(ids) - set(identities.clients)
        if missing:
            raise ConfigError(f"no identity for clients {sorted(missing)}")
        aggregator.adopt_identities(identities)
        if aggregator.supports_identities:
            bound = {"allow_list": identities.allow_list}
    clients: dict[str, ClientEndpoint] = {
        cid: aggregator.client(cid, updates[cid], weight=w[cid], rng=rng, session=session,
                               round_=round_, **({**bound, "identity": identities.clients[cid]}
                                                 if bound and identities else {}))
        for cid in ids}
    server: ServerWorkflow = aggregator.server(ids, spec, threshold=threshold,
                                               weighted=weights is not None, rng=rng,
                                               session=session, round_=round_, **bound)
    if identities is not None:  # every message signed by a listed long-term key
        clients = {cid: SignedClientEndpoint(c, identities.clients[cid], identities.allow_list,
                                             identities.server.name)
                   for cid, c in clients.items()}
        server = SignedServerWorkflow(server, identities.server, identities.allow_list)
    channel = InProcessChannel(clients, plan)
    channel.observers.extend(observers)
    if audit_log is None:
        return drive(server, channel, progress)
    config = {"protocol": protocol, "threshold": threshold, "weighted": weights is not None,
              "options": options, "clients": sorted(ids), "tensor_spec": spec.to_json(),
              "round": round_, "session": session.hex(), "identities": identities is not None,
              "simulated_drops": dict(drop or {}), "fault_injection": faults is not None}
    return audited_round(audit_log, lambda hook: drive(server, channel, progress, hook),
                         round_=round_, participants=ids, config=config,
                         authority=getattr(aggregator, "authority", None))
