"""Flower run config and node config, mapped onto the validated config dataclasses.

Flower hands an app a *flat* run config (``pyproject.toml`` ``[tool.flwr.app.config]``,
nested tables joined with dots, values bool/int/float/str). Two prefixes are accepted, and
any other key is refused:

* ``fedcollm.<field>[.<field>...]``: :class:`~fedcollm_secure.cotuning.engine.FedCoLLMConfig`
  (e.g. ``fedcollm.rounds``, ``fedcollm.train.batch_size``, ``fedcollm.llm.source``,
  ``fedcollm.aggregator_options.clip``); a string that starts with ``[`` or ``{`` is read as
  JSON (lists such as ``fedcollm.data.tasks``);
* ``flower.<field>``: :class:`FlowerSettings` (stage timeouts, output directory, ...).

Hyphens in key parts are read as underscores (Flower's own keys use hyphens). The nested
mapping goes through ``FedCoLLMConfig.from_dict``, which rejects unknown keys and bad types.

This module does not import ``flwr``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from ...config import ConfigBase, require
from ...errors import ConfigError

if TYPE_CHECKING:
    from ...cotuning.engine import FedCoLLMConfig

FEDCOLLM_PREFIX = "fedcollm"
FLOWER_PREFIX = "flower"

# node config keys (``flower-supernode --node-config "k=v ..."``; simulation sets the first two)
NODE_PARTITION_ID = "partition-id"
NODE_NUM_PARTITIONS = "num-partitions"
NODE_CLIENT_ID = "client-id"
NODE_DATA_PATH = "data-path"
NODE_AGGREGATORS = "fedcollm-aggregators"
DEFAULT_NODE_AGGREGATORS = ("masking", "ckks")
"""Aggregators a node accepts unless its operator names others: the secure ones only, so a
run config cannot quietly downgrade a node to ``plaintext``."""
NODE_ROLE = "fedcollm-role"
ROLE_CLIENT = "client"
ROLE_KEY_AUTHORITY = "key-authority"
ROLES = (ROLE_CLIENT, ROLE_KEY_AUTHORITY)
# ckks trust settings of a node (see key_authority.py and trust.py)
NODE_IDENTITY_FILE = "identity-file"  # this node's long-term Ed25519 key (identity.Identity)
NODE_ALLOW_LIST = "allow-list"  # identity.AllowList JSON: pinned keys of the other parties
NODE_AUTHORITY_KEY = "ckks-authority-key"  # client: the key authority's public key, hex
NODE_DECRYPTION_LOG = "ckks-decryption-log"  # key authority: JSONL file, one line per decryption
NODE_MIN_THRESHOLD = "ckks-min-threshold"  # key authority: its own floor on contributors
NODE_DP_STATE = "dp-state-file"  # client: its DP-SGD accountant (JSON), kept across runs


@dataclasses.dataclass(frozen=True)
class FlowerSettings(ConfigBase):
    """How the ServerApp drives a federation over Flower.

    ``min_nodes``: nodes to wait for (at most ``node_wait_timeout`` seconds) before round 1.
    ``train_timeout``: seconds the local-training exchange may take; ``stage_timeout`` the
    default for each protocol stage, ``stage_timeouts`` per-stage overrides (stage name ->
    seconds). A node that has not answered by then is a dropout of that stage.
    ``poll_interval``: seconds between polls of the SuperLink for replies.
    ``output_dir``: where the server writes ``rounds.json``, ``progress.jsonl`` and the
    per-round adapters (``""``: nothing is written).
    """

    section: ClassVar[str] = "flower"
    min_nodes: int = 2
    node_wait_timeout: float = 300.0
    train_timeout: float = 3600.0
    stage_timeout: float = 300.0
    stage_timeouts: dict[str, float] = dataclasses.field(default_factory=dict)
    poll_interval: float = 0.2
    output_dir: str = ""

    def validate(self) -> None:
        require(self.min_nodes >= 1, "flower.min_nodes must be >= 1")
        for name in ("node_wait_timeout", "train_timeout", "stage_timeout", "poll_interval"):
            value = getattr(self, name)
            require(math.isfinite(value) and value > 0, f"flower.{name} must be > 0")
        require(isinstance(self.stage_timeouts, dict) and all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v) and v > 0 for k, v in self.stage_timeouts.items()),
            "flower.stage_timeouts must map stage names to seconds > 0")

    def timeout(self, stage: str) -> float:
        """The deadline of ``stage`` in seconds."""
        return float(self.stage_timeouts.get(stage, self.stage_timeout))

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["stage_timeouts"] = dict(self.stage_timeouts)
        return out


def _value(key: str, value: Any) -> Any:
    if isinstance(value, str) and value.lstrip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"run config {key!r}: not valid JSON ({exc})") from None
    return value


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a.b-c": 1}`` -> ``{"a": {"b_c": 1}}``; a key may not be both a value and a table."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"run config keys must be non-empty strings, got {key!r}")
        parts = [p.replace("-", "_") for p in key.split(".")]
        if any(not p for p in parts):
            raise ConfigError(f"run config key {key!r} has an empty part")
        node = out
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"run config key {key!r} nests under a value")
            node = child
        if parts[-1] in node:
            raise ConfigError(f"run config key {key!r} is given twice")
        node[parts[-1]] = _value(key, value)
    return out


def split_run_config(run_config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The nested ``fedcollm`` and ``flower`` sections; any other top-level key is refused."""
    nested = nest(run_config)
    unknown = sorted(set(nested) - {FEDCOLLM_PREFIX, FLOWER_PREFIX})
    if unknown:
        raise ConfigError(f"run config: unknown section(s) {unknown}; keys must start with "
                          f"'{FEDCOLLM_PREFIX}.' or '{FLOWER_PREFIX}.'")
    fed, flower = nested.get(FEDCOLLM_PREFIX, {}), nested.get(FLOWER_PREFIX, {})
    if not isinstance(fed, dict) or not isinstance(flower, dict):
        raise ConfigError("run config: 'fedcollm' and 'flower' must be tables")
    return fed, flower


def fedcollm_config(run_config: Mapping[str, Any]) -> FedCoLLMConfig:
    """The validated :class:`FedCoLLMConfig` of a Flower run config."""
    from ...cotuning.engine import FedCoLLMConfig  # torch only where a model is needed

    return FedCoLLMConfig.from_dict(split_run_config(run_config)[0])


def flower_settings(run_config: Mapping[str, Any]) -> FlowerSettings:
    """The validated :class:`FlowerSettings` of a Flower run config."""
    return FlowerSettings.from_dict(split_run_config(run_config)[1])


def aggregator_name(run_config: Mapping[str, Any]) -> str:
    """The run's aggregator without building the full config (no torch import)."""
    fed = split_run_config(run_config)[0]
    name = fed.get("aggregator", "masking")
    if not isinstance(name, str) or not name:
        raise ConfigError("fedcollm.aggregator must be a non-empty string")
    return name


def node_aggregators(node_config: Mapping[str, Any]) -> tuple[str, ...]:
    """The aggregators this node's operator accepts (node config ``fedcollm-aggregators``,
    comma-separated; default: the secure ones)."""
    raw = node_config.get(NODE_AGGREGATORS)
    if raw is None:
        return DEFAULT_NODE_AGGREGATORS
    if not isinstance(raw, str):
        raise ConfigError(f"node config {NODE_AGGREGATORS!r} must be a comma-separated string")
    names = tuple(n.strip() for n in raw.split(",") if n.strip())
    if not names:
        raise ConfigError(f"node config {NODE_AGGREGATORS!r} names no aggregator")
    return names


def node_role(node_config: Mapping[str, Any]) -> str:
    """This node's role (node config ``fedcollm-role``): ``client`` (default) or
    ``key-authority`` (the CKKS key authority of ``ckks`` runs; it trains nothing)."""
    role = node_config.get(NODE_ROLE, ROLE_CLIENT)
    if role not in ROLES:
        raise ConfigError(f"node config {NODE_ROLE!r} must be one of {list(ROLES)}, "
                          f"got {role!r}")
    return str(role)


def node_string(node_config: Mapping[str, Any], key: str) -> str | None:
    """An optional non-empty string of the node config."""
    value = node_config.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"node config {key!r} must be a non-empty string")
    return value


def aggregator_options(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """``fedcollm.aggregator_options.*`` as given (no torch import; the aggregator's own
    config class validates them)."""
    options = split_run_config(run_config)[0].get("aggregator_options", {})
    if not isinstance(options, dict):
        raise ConfigError("fedcollm.aggregator_options must be a table")
    return dict(options)


def node_partition(node_config: Mapping[str, Any]) -> tuple[int, int]:
    """``(partition-id, num-partitions)`` from the node config, checked."""
    try:
        k, n = node_config[NODE_PARTITION_ID], node_config[NODE_NUM_PARTITIONS]
    except KeyError as exc:
        raise ConfigError(f"node config lacks {exc.args[0]!r} (and no {NODE_DATA_PATH!r} "
                          "was given)") from None
    if isinstance(k, bool) or isinstance(n, bool) or not isinstance(k, int) or not isinstance(
            n, int) or not 0 <= k < n:
        raise ConfigError(f"node config: need 0 <= {NODE_PARTITION_ID} < {NODE_NUM_PARTITIONS}"
                          f", got {k!r}, {n!r}")
    return k, n
