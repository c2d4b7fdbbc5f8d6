"""What a FedCoLLM run (:class:`fedcollm_secure.cotuning.engine.FedCoLLM`) records.

The engine calls :func:`record_run` once and :func:`record_engine_round` after each round;
the secure-aggregation round itself (reply digests, survivors, dropouts, parameters) is
recorded by :func:`fedcollm_secure.secure_sum` into the same log.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .log import AuditLog
from .records import state_digest

__all__ = ["record_engine_round", "record_privacy_from", "record_run"]


def record_run(log: AuditLog, config: Any, *, client_ids: Sequence[str],
               examples: Mapping[str, int], global_state: Mapping[str, Any]) -> None:
    """The run's configuration, its clients and the initial global adapter's digest."""
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    log.record_config("fedcollm", cfg, clients=list(client_ids), examples=dict(examples),
                      global_adapter_sha256=state_digest(global_state))


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        return float(value)
    except ValueError:
        return None


def record_privacy_from(log: AuditLog, t: int, record: Mapping[str, Any]) -> None:
    """Epsilon spent, from a privacy-ledger round record (``dpsgd`` and/or ``ddp``)."""
    dp = record.get("dpsgd")
    if isinstance(dp, Mapping):
        raw = dp.get("clients")
        clients: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
        per_client: dict[str, float] = {}
        rounds: list[float] = []
        for cid, c in clients.items():
            if isinstance(c, Mapping):
                cum, now = _number(c.get("epsilon_cumulative")), _number(c.get("epsilon_round"))
                if cum is not None:
                    per_client[str(cid)] = cum
                if now is not None:
                    rounds.append(now)
        agg = dp.get("aggregate")
        eps = _number(agg.get("epsilon_cumulative")) if isinstance(agg, Mapping) else None
        if eps is not None:
            log.record_privacy(t, mechanism="dpsgd", epsilon=eps,
                               delta=_number(dp.get("delta")),
                               epsilon_round=max(rounds) if rounds else None,
                               per_client=per_client, privacy_unit=dp.get("privacy_unit"),
                               accountant=dp.get("accountant"))
    ddp = record.get("ddp")
    if isinstance(ddp, Mapping):
        eps = _number(ddp.get("epsilon_cumulative"))
        if eps is not None:
            log.record_privacy(t, mechanism="ddp", epsilon=eps, delta=_number(ddp.get("delta")),
                               epsilon_round=_number(ddp.get("epsilon_round")),
                               privacy_unit=ddp.get("privacy_unit"),
                               releases=ddp.get("releases"))


def record_engine_round(log: AuditLog, t: int, entry: Mapping[str, Any],
                        global_state: Mapping[str, Any], *,
                        refused: Mapping[str, str] | None = None) -> None:
    """After round ``t``: updates refused by validation, the digest of the adapter the next
    round broadcasts, and the privacy spent (when the run has a privacy ledger)."""
    if refused:
        log.note(round=t, event="updates_refused", refused=dict(refused))
    log.note(round=t, event="global_adapter", sha256=state_digest(global_state),
             survivors=list(entry.get("survivors", [])))
    privacy = entry.get("privacy")
    if isinstance(privacy, Mapping):
        record_privacy_from(log, t, privacy)
