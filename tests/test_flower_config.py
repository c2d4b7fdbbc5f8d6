"""Flower transport pieces that need no Flower process: run-config mapping and node-side replay.

(``flwr`` itself is not needed here; the loopback deployment is tested in
``test_flower_deployment.py``.)
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest

from fedcollm_secure.crypto import InsecureSeededRandomForTests
from fedcollm_secure.errors import ConfigError, WireFormatError
from fedcollm_secure.secagg import TensorSpec, get_aggregator
from fedcollm_secure.transport.base import Channel, drive
from fedcollm_secure.transport.flower.config import (
    flower_settings,
    node_aggregators,
    node_partition,
    split_run_config,
)
from fedcollm_secure.transport.flower.replay import (
    EndpointState,
    KeystreamRandom,
    update_from_bytes,
    update_to_bytes,
)

BASE = {"fedcollm.llm.source": "/models/llm", "fedcollm.slm.source": "/models/slm"}


# --------------------------------------------------------------------------------------------
# run config -> validated configs
# --------------------------------------------------------------------------------------------
def test_run_config_maps_onto_the_validated_fedcollm_config() -> None:
    from fedcollm_secure.transport.flower.config import fedcollm_config

    cfg = fedcollm_config({**BASE, "fedcollm.n-clients": 4, "fedcollm.rounds": 3,
                           "fedcollm.train.batch-size": 4, "fedcollm.aggregator": "masking",
                           "fedcollm.aggregator_options.clip": 0.5,
                           "fedcollm.aggregator_options.graph": "k_regular",
                           "fedcollm.data.tasks": '["a", "b"]', "flower.stage_timeout": 9.0})
    assert (cfg.n_clients, cfg.rounds, cfg.train.batch_size) == (4, 3, 4)
    assert cfg.llm.source == "/models/llm" and cfg.slm is not None
    assert cfg.aggregator_options == {"clip": 0.5, "graph": "k_regular"}
    assert cfg.data.tasks == ("a", "b")
    with pytest.raises(ConfigError, match="unknown key"):
        fedcollm_config({**BASE, "fedcollm.epochs": 3})
    with pytest.raises(ConfigError, match="unknown key"):
        fedcollm_config({**BASE, "fedcollm.train.epoch": 3})
    with pytest.raises(ConfigError, match="integer"):
        fedcollm_config({**BASE, "fedcollm.rounds": "3"})
    with pytest.raises(ConfigError, match="not valid JSON"):
        fedcollm_config({**BASE, "fedcollm.data.tasks": "[a"})


def test_run_config_refuses_unknown_sections_duplicates_and_values_used_as_tables() -> None:
    with pytest.raises(ConfigError, match="unknown section"):
        split_run_config({**BASE, "num-server-rounds": 3})
    with pytest.raises(ConfigError, match="given twice"):
        split_run_config({"fedcollm.n-clients": 3, "fedcollm.n_clients": 3})
    with pytest.raises(ConfigError, match="nests under a value"):
        split_run_config({"fedcollm.train": 1, "fedcollm.train.epochs": 2})
    with pytest.raises(ConfigError, match="empty part"):
        split_run_config({"fedcollm..rounds": 1})


def test_flower_settings_give_per_stage_deadlines_and_reject_bad_values() -> None:
    s = flower_settings({"flower.stage_timeout": 30.0, "flower.stage_timeouts.unmask": 5.0,
                         "flower.min-nodes": 3})
    assert s.min_nodes == 3 and s.timeout("unmask") == 5.0 and s.timeout("share_keys") == 30.0
    assert flower_settings({}).output_dir == ""
    for bad in ({"flower.stage_timeout": 0.0}, {"flower.stage_timeouts.unmask": -1.0},
                {"flower.poll_interval": float("nan")}, {"flower.min_nodes": 0}):
        with pytest.raises(ConfigError):
            flower_settings(bad)
    with pytest.raises(ConfigError, match="unknown key"):
        flower_settings({"flower.timeout": 3.0})


def test_nodes_accept_only_secure_aggregators_unless_their_operator_says_otherwise() -> None:
    assert "plaintext" not in node_aggregators({})
    assert node_aggregators({"fedcollm-aggregators": "masking, plaintext"}) == (
        "masking", "plaintext")
    with pytest.raises(ConfigError):
        node_aggregators({"fedcollm-aggregators": " , "})
    assert node_partition({"partition-id": 1, "num-partitions": 3}) == (1, 3)
    for bad in ({}, {"partition-id": 3, "num-partitions": 3},
                {"partition-id": True, "num-partitions": 3}):
        with pytest.raises(ConfigError):
            node_partition(bad)


# --------------------------------------------------------------------------------------------
# node-side replay: the endpoint rebuilt for every message gives the in-process result
# --------------------------------------------------------------------------------------------
CLIP, LEVELS = 4.0, 1 << 16
OPTIONS = {"clip": CLIP, "levels": LEVELS}


def grid_updates(ids: list[str]) -> dict[str, dict[str, np.ndarray]]:
    """Updates on the quantisation grid: the masked sum is then exact."""
    gen = np.random.default_rng(7)
    step = CLIP / LEVELS
    return {cid: {"a": (gen.integers(-LEVELS, LEVELS + 1, (3, 4)) * step).astype(np.float32),
                  "b": (gen.integers(-LEVELS, LEVELS + 1, 5) * step).astype(np.float32)}
            for cid in ids}


class PersistedChannel(Channel):
    """Every message reaches a freshly rebuilt endpoint whose state went through the plain
    record form (what a SuperNode keeps in ``Context.state``)."""

    def __init__(self, states: dict[str, EndpointState], drop: Mapping[str, str]) -> None:
        self.records = {cid: s.to_record() for cid, s in states.items()}
        self.drop = dict(drop)
        self.sent: dict[tuple[str, str], bytes] = {}

    def exchange(self, stage: str, requests: Mapping[str, bytes]) -> dict[str, bytes]:
        replies = {}
        for cid, req in requests.items():
            if self.drop.get(cid) == stage:
                continue
            state = EndpointState.from_record(self.records[cid])
            replies[cid] = state.answer(req)
            self.records[cid] = state.to_record()
            self.sent[(cid, stage)] = replies[cid]
        return replies


def test_replayed_endpoints_give_the_exact_sum_with_a_dropout_after_masking() -> None:
    ids = [f"c{i}" for i in range(4)]
    updates = grid_updates(ids)
    session = bytes(range(16))
    server = get_aggregator("masking", **OPTIONS).server(
        ids, TensorSpec.of(updates[ids[0]]), threshold=3, session=session, round_=5,
        rng=InsecureSeededRandomForTests("server", quiet=True))
    states = {cid: EndpointState(round=5, client_id=cid, aggregator="masking",
                                 options=dict(OPTIONS), update=update_to_bytes(updates[cid]),
                                 weight=1.0, key=KeystreamRandom.new_key(), session=session,
                                 protocol_round=5) for cid in ids}
    channel = PersistedChannel(states, {"c3": "unmask"})
    result = drive(server, channel)
    assert result.stats["late_dropouts"] == ["c3"] and sorted(result.survivors) == ids
    for name in ("a", "b"):
        exact = sum(updates[cid][name].astype(np.float64) for cid in ids)
        np.testing.assert_array_equal(result.sum[name], exact)

    # replay is deterministic: the rebuilt endpoint answers the last request byte for byte
    record = dict(channel.records["c0"])
    last = record["requests"][-1]
    record["requests"] = record["requests"][:-1]
    again = EndpointState.from_record(record).answer(last)
    assert again == channel.sent[("c0", "unmask")]
    # ... and only because the node's key is the same one
    record["key"] = KeystreamRandom.new_key()
    assert EndpointState.from_record(record).answer(last) != again


def test_node_state_and_keystream_refuse_malformed_input() -> None:
    with pytest.raises(ConfigError):
        KeystreamRandom(b"short")
    k = KeystreamRandom.new_key()
    assert KeystreamRandom(k).bytes(40) == KeystreamRandom(k).bytes(40)
    assert KeystreamRandom(k).bytes(40) != KeystreamRandom(KeystreamRandom.new_key()).bytes(40)
    with pytest.raises(WireFormatError):
        EndpointState.from_record({"round": 1})
    with pytest.raises(WireFormatError):
        update_from_bytes(b"not safetensors")
    update = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    back = update_from_bytes(update_to_bytes(update))
    np.testing.assert_array_equal(back["w"], update["w"])
