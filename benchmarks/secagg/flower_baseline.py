"""Baseline: time Flower's own SecAgg+ (flwr 1.42) in one process, without network.

What runs is Flower's real code, unmodified:

* server side: ``flwr.server.workflow.SecAggPlusWorkflow.__call__`` (all four
  stages: setup, share keys, collect masked vectors, unmask), with a
  ``LegacyContext``, a ``SimpleClientManager`` holding ``GridClientProxy``
  objects and a ``FedAvg``-derived strategy;
* client side: a real ``flwr.clientapp.ClientApp(client_fn, mods=[secaggplus_mod])``
  wrapping a ``NumPyClient`` whose ``fit`` returns the given vector.

Only the transport is replaced: ``_InProcessGrid`` is a ``Grid`` that, like
Flower's ``InMemoryGrid``, stamps a message ID on every instruction, and then,
instead of going through a SuperLink/SuperNode, serialises the message with
Flower's own serde (``message_to_proto`` -> bytes -> ``message_from_proto``),
calls the ClientApp of the destination node with that node's ``Context``, and
serialises the reply back the same way.  Serialising is needed anyway: the
workflow sends one shared ``RecordDict`` to all nodes in the setup stage and
``secaggplus_mod`` mutates the incoming ConfigRecord (``configs.pop(stage)``),
so in-process delivery must copy, as a real transport does.  Serde time is
counted separately (``transport_seconds``), never as client or server time.

``Message`` objects cannot be built before the runtime has set
``flwr.supercore.task_identity.TaskIdentity`` (run_id/node_id/task_id); we set
it exactly as ``flwr.server.compat.app.start_grid`` does (task_id=1,
node_id=SUPERLINK_NODE_ID).

Dropouts (Flower semantics):

* ``drop_after_masked_input=k``: k clients answer the first three stages (their
  masked vectors reach the server) but never answer the unmask stage.  Flower
  keeps their input in the aggregate (the server reconstructs their private-mask
  seed from their neighbours' shares), so the expected result is the sum over
  *all* clients whose masked input arrived.
* ``drop_before_masked_input=k`` (extra): k clients answer setup and share-keys
  but not collect-masked-vectors.  Their input is excluded and the server
  reconstructs their sk1 to cancel the pairwise masks (the expensive recovery
  path of SecAgg+).

Flower's workflow outputs the *weighted mean* ``sum_i w_i x_i / sum_i w_i``; each
client reports ``num_examples=1`` and the workflow runs with ``max_weight=1.0``
so every weight is exactly 1 and ``sum = mean * n_contributors``.  Both are
returned.

Run ``.venv/bin/python benchmarks/secagg/flower_baseline.py`` for a correctness
self-check and two timings.
"""

from __future__ import annotations

import importlib.metadata
import logging
import random
import time
import uuid
from collections import defaultdict
from typing import Any

import flwr
import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import parameters_to_ndarrays
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    Key,
    Stage,
)
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.compat.common import recorddict_compat as compat
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611
from flwr.server import ServerConfig, SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp.grid import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

FLWR_VERSION: str = getattr(flwr, "__version__", None) or importlib.metadata.version("flwr")

_RUN_ID = 4242
_STAGES = (
    Stage.SETUP,
    Stage.SHARE_KEYS,
    Stage.COLLECT_MASKED_VECTORS,
    Stage.UNMASK,
)


# --------------------------------------------------------------------------- #
# Client side: a plain NumPyClient whose fit() returns the node's vector.      #
# --------------------------------------------------------------------------- #
class _VectorClient(NumPyClient):
    def __init__(self, vector: np.ndarray) -> None:
        self._vector = vector

    def fit(self, parameters, config):
        # num_examples=1 together with max_weight=1.0 gives every client weight 1.
        return [self._vector], 1, {}


# --------------------------------------------------------------------------- #
# Server side helpers                                                          #
# --------------------------------------------------------------------------- #
class _AllClientsStrategy(FedAvg):
    """FedAvg sampling every client; aggregate_fit passes the SecAgg+ output through.

    SecAggPlusWorkflow overwrites every FitRes.parameters with the (already
    averaged) unmasked aggregate before calling ``aggregate_fit``; FedAvg would
    just re-average n identical vectors, which is not part of SecAgg+, so we
    return the first one unchanged (and keep the result for the caller).
    """

    def __init__(self, n: int) -> None:
        super().__init__(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=n,
            min_evaluate_clients=0,
            min_available_clients=n,
            accept_failures=True,
        )
        self.aggregated = None

    def aggregate_fit(self, server_round, results, failures):
        if not results:
            return None, {}
        self.aggregated = results[0][1].parameters
        return self.aggregated, {}


def _stage_of(msg: Message) -> str:
    return str(msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE])


def _payload_bytes(content: RecordDict) -> int:
    """Approximate application payload of a RecordDict (bytes, ints as 8, ...)."""
    total = 0
    for rec in content.config_records.values():
        for val in rec.values():
            vals = val if isinstance(val, list) else [val]
            for v in vals:
                if isinstance(v, (bytes, str)):
                    total += len(v)
                else:  # int / float / bool
                    total += 8
    for rec in content.array_records.values():
        for arr in rec.values():
            total += len(arr.data)
    for rec in content.metric_records.values():
        for val in rec.values():
            total += 8 * (len(val) if isinstance(val, list) else 1)
    return total


class _InProcessGrid(Grid):
    """In-process ``Grid``: routes each instruction to the node's ClientApp."""

    def __init__(
        self,
        app: ClientApp,
        contexts: dict[int, Context],
        drop_at_stage: dict[int, str],
    ) -> None:
        self._app = app
        self._contexts = contexts
        self._drop_at_stage = drop_at_stage  # node_id -> first stage it ignores
        self._run = Run.create_empty(run_id=_RUN_ID)
        # accounting
        self.grid_seconds = 0.0
        self.transport_seconds = 0.0
        self.client_seconds: dict[int, dict[str, float]] = defaultdict(dict)
        self.up_wire: dict[int, dict[str, int]] = defaultdict(dict)
        self.up_payload: dict[int, dict[str, int]] = defaultdict(dict)
        self.down_wire: dict[int, dict[str, int]] = defaultdict(dict)
        self.call_marks: list[tuple[str, float, float]] = []  # (stage, t_in, t_out)
        self._dropped: set[int] = set()

    # --- Grid API ---------------------------------------------------------- #
    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self):
        return list(self._contexts)

    def push_messages(self, messages):
        raise NotImplementedError("use send_and_receive")

    def pull_messages(self, message_ids):
        raise NotImplementedError("use send_and_receive")

    def send_and_receive(self, messages, *, timeout=None):
        t_in = time.perf_counter()
        replies: list[Message] = []
        stage = None
        for msg in messages:
            # As InMemoryGrid.push_messages: populate the message ID.
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            nid = msg.metadata.dst_node_id
            stage = _stage_of(msg)
            drop_stage = self._drop_at_stage.get(nid)
            if nid in self._dropped or (
                drop_stage is not None and _STAGES.index(stage) >= _STAGES.index(drop_stage)
            ):
                self._dropped.add(nid)
                continue  # node is gone: no reply (the workflow has timeout=None)

            # server -> node, through Flower's serde
            t0 = time.perf_counter()
            wire = message_to_proto(msg).SerializeToString()
            delivered = message_from_proto(ProtoMessage.FromString(wire))
            self.transport_seconds += time.perf_counter() - t0
            self.down_wire[nid][stage] = len(wire)

            # the node's ClientApp (secaggplus_mod + NumPyClient)
            t0 = time.perf_counter()
            reply = self._app(delivered, self._contexts[nid])
            self.client_seconds[nid][stage] = time.perf_counter() - t0

            # node -> server, through Flower's serde
            t0 = time.perf_counter()
            self.up_payload[nid][stage] = _payload_bytes(reply.content)
            wire = message_to_proto(reply).SerializeToString()
            received = message_from_proto(ProtoMessage.FromString(wire))
            self.transport_seconds += time.perf_counter() - t0
            self.up_wire[nid][stage] = len(wire)
            replies.append(received)
        t_out = time.perf_counter()
        self.grid_seconds += t_out - t_in
        self.call_marks.append((str(stage), t_in, t_out))
        return replies


# --------------------------------------------------------------------------- #
# Public entry point                                                           #
# --------------------------------------------------------------------------- #
def run_flower_secaggplus(
    vectors: list[np.ndarray],
    *,
    num_shares: int,
    reconstruction_threshold: int,
    clipping_range: float = 8.0,
    quantization_range: int = 2**22,
    modulus_range: int = 2**32,
    drop_after_masked_input: int = 0,
    drop_before_masked_input: int = 0,
    seed: int | None = None,
    quiet: bool = True,
) -> dict[str, Any]:
    """Run one round of Flower's SecAgg+ (workflow + secaggplus_mod) in-process.

    ``vectors[i]`` is client i's 1-D float vector (float32 is fine).  Returns a
    dict with the aggregate (``sum``, ``mean``), timings and traffic; see the
    module docstring for the dropout semantics.  ``num_shares`` and
    ``reconstruction_threshold`` are passed to ``SecAggPlusWorkflow`` unchanged
    (ints; ``num_shares == len(vectors)`` gives the complete graph).
    """
    n = len(vectors)
    if drop_after_masked_input + drop_before_masked_input >= n:
        raise ValueError("too many dropouts")
    if isinstance(num_shares, int) and num_shares != n and num_shares % 2 == 0:
        # Flower 1.42 sends the even value to the clients but bumps its own copy
        # to num_shares+1 when building neighbourhoods, so the clients then index
        # past their share list (IndexError in secaggplus_mod._share_keys).
        raise ValueError("Flower 1.42 SecAgg+ needs an odd num_shares (or num_shares == n)")
    rng = random.Random(seed)
    if seed is not None:  # the workflow shuffles with `random`, quantisation uses np.random
        random.seed(seed)
        np.random.seed(seed % 2**32)

    flwr_logger = logging.getLogger("flwr")
    old_level = flwr_logger.level
    if quiet:
        flwr_logger.setLevel(logging.WARNING)

    # The runtime normally sets this before any Message can be built
    # (same values as flwr.server.compat.app.start_grid).
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = _RUN_ID
    TaskIdentity.node_id = SUPERLINK_NODE_ID

    try:
        # Node IDs: random 63-bit like the SuperLink assigns.
        node_ids: list[int] = []
        while len(node_ids) < n:
            nid = rng.randrange(2, 2**63)
            if nid not in node_ids:
                node_ids.append(nid)
        vec_of = {nid: np.asarray(v) for nid, v in zip(node_ids, vectors, strict=True)}

        shuffled = node_ids[:]
        rng.shuffle(shuffled)
        drop_before = shuffled[:drop_before_masked_input]
        drop_after = shuffled[
            drop_before_masked_input : drop_before_masked_input + drop_after_masked_input
        ]
        drop_at_stage = {nid: Stage.COLLECT_MASKED_VECTORS for nid in drop_before}
        drop_at_stage.update({nid: Stage.UNMASK for nid in drop_after})

        def client_fn(context: Context):
            return _VectorClient(vec_of[context.node_id]).to_client()

        app = ClientApp(client_fn=client_fn, mods=[secaggplus_mod])
        contexts = {
            nid: Context(
                run_id=_RUN_ID, node_id=nid, node_config={}, state=RecordDict(), run_config={}
            )
            for nid in node_ids
        }
        grid = _InProcessGrid(app, contexts, drop_at_stage)

        # Server: LegacyContext + ClientManager with one GridClientProxy per node.
        strategy = _AllClientsStrategy(n)
        client_manager = SimpleClientManager()
        for nid in node_ids:
            client_manager.register(GridClientProxy(nid, grid, _RUN_ID))
        server_ctx = LegacyContext(
            Context(
                run_id=_RUN_ID,
                node_id=SUPERLINK_NODE_ID,
                node_config={},
                state=RecordDict(),
                run_config={},
            ),
            config=ServerConfig(num_rounds=1),
            strategy=strategy,
            client_manager=client_manager,
        )
        server_ctx.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {WorkflowKey.CURRENT_ROUND: 1, WorkflowKey.START_TIME: time.time()}
        )
        # No global model is sent to the clients: only SecAgg+ traffic is measured.
        server_ctx.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()

        workflow = SecAggPlusWorkflow(
            num_shares=num_shares,
            reconstruction_threshold=reconstruction_threshold,
            max_weight=1.0,
            clipping_range=float(clipping_range),
            quantization_range=int(quantization_range),
            modulus_range=int(modulus_range),
            timeout=None,
        )

        t_start = time.perf_counter()
        workflow(grid, server_ctx)
        t_end = time.perf_counter()
    finally:
        flwr_logger.setLevel(old_level)

    if strategy.aggregated is None:
        raise RuntimeError("Flower SecAgg+ halted (not enough shares / neighbours)")
    mean = parameters_to_ndarrays(strategy.aggregated)
    # The workflow also stores the result in its context, as in a real run.
    stored = parameters_to_ndarrays(
        compat.arrayrecord_to_parameters(
            server_ctx.state.array_records[MAIN_PARAMS_RECORD], keep_input=True
        )
    )
    assert len(mean) == 1 and np.array_equal(mean[0], stored[0])
    mean_vec = mean[0]
    contributors = [nid for nid in node_ids if nid not in drop_before]
    n_contrib = len(contributors)

    total = t_end - t_start
    server_seconds = total - grid.grid_seconds
    # Server time split at the grid calls: segment i ends at call i's send.
    marks = grid.call_marks
    server_segments = []
    prev = t_start
    for _stage, t_in, t_out in marks:
        server_segments.append(t_in - prev)
        prev = t_out
    server_segments.append(t_end - prev)  # after the last reply: unmask + aggregate

    full = [nid for nid in node_ids if nid not in drop_at_stage]
    per_client_total = {nid: sum(grid.client_seconds[nid].values()) for nid in node_ids}
    per_client_up = {nid: sum(grid.up_wire[nid].values()) for nid in node_ids}
    per_client_payload = {nid: sum(grid.up_payload[nid].values()) for nid in node_ids}
    per_client_down = {nid: sum(grid.down_wire[nid].values()) for nid in node_ids}

    def _mean(xs):
        xs = list(xs)
        return float(np.mean(xs)) if xs else 0.0

    return {
        "sum": mean_vec * n_contrib,
        "mean": mean_vec,
        "n_contributors": n_contrib,
        "contributor_index": [node_ids.index(nid) for nid in contributors],
        "dropped_after_masked_input_index": [node_ids.index(nid) for nid in drop_after],
        "dropped_before_masked_input_index": [node_ids.index(nid) for nid in drop_before],
        # timings
        "client_seconds": _mean(per_client_total[nid] for nid in full),
        "client_seconds_max": max(per_client_total[nid] for nid in full),
        "client_seconds_by_stage": {
            s: _mean(grid.client_seconds[nid].get(s, 0.0) for nid in full) for s in _STAGES
        },
        "server_seconds": server_seconds,
        "server_seconds_by_segment": {
            "setup_send": server_segments[0],
            "setup_recv+share_keys_send": server_segments[1],
            "share_keys_recv+collect_send": server_segments[2],
            "collect_recv(sum masked)+unmask_send": server_segments[3],
            "unmask_recv(reconstruct+remove masks)": server_segments[4],
        }
        if len(server_segments) == 5
        else server_segments,
        "clients_seconds_total": float(sum(per_client_total.values())),
        "transport_seconds": grid.transport_seconds,
        "total_seconds": total,
        # traffic (bytes), per fully participating client
        "bytes_per_client": _mean(per_client_up[nid] for nid in full),
        "bytes_per_client_payload": _mean(per_client_payload[nid] for nid in full),
        "bytes_per_client_by_stage": {
            s: _mean(grid.up_wire[nid].get(s, 0) for nid in full) for s in _STAGES
        },
        "bytes_to_client": _mean(per_client_down[nid] for nid in full),
        "params": {
            "n": n,
            "d": int(np.asarray(vectors[0]).size),
            "num_shares": num_shares,
            "reconstruction_threshold": reconstruction_threshold,
            "clipping_range": clipping_range,
            "quantization_range": quantization_range,
            "modulus_range": modulus_range,
            "drop_after_masked_input": drop_after_masked_input,
            "drop_before_masked_input": drop_before_masked_input,
        },
        "flwr_version": FLWR_VERSION,
    }


# --------------------------------------------------------------------------- #
def _report(label: str, vectors: list[np.ndarray], res: dict[str, Any]) -> float:
    true_sum = np.sum(
        [np.asarray(vectors[i], dtype=np.float64) for i in res["contributor_index"]], axis=0
    )
    err = float(np.max(np.abs(res["sum"] - true_sum)))
    p = res["params"]
    print(
        f"== {label}: n={p['n']} d={p['d']} shares={p['num_shares']} "
        f"t={p['reconstruction_threshold']} drop_after={p['drop_after_masked_input']} "
        f"drop_before={p['drop_before_masked_input']} (flwr {res['flwr_version']})"
    )
    print(f"   max |sum - true_sum| = {err:.3e}  (contributors={res['n_contributors']})")
    print(
        f"   total {res['total_seconds']:.3f}s | server {res['server_seconds']:.3f}s | "
        f"client mean {res['client_seconds']:.3f}s (max {res['client_seconds_max']:.3f}s) | "
        f"serde {res['transport_seconds']:.3f}s"
    )
    print(
        "   client by stage: "
        + ", ".join(f"{k}={v * 1e3:.1f}ms" for k, v in res["client_seconds_by_stage"].items())
    )
    seg = res["server_seconds_by_segment"]
    if isinstance(seg, dict):
        print("   server by segment: " + ", ".join(f"{k}={v * 1e3:.1f}ms" for k, v in seg.items()))
    print(
        f"   bytes/client up: {res['bytes_per_client']:.0f} wire "
        f"({res['bytes_per_client_payload']:.0f} payload); by stage "
        + ", ".join(f"{k}={v:.0f}" for k, v in res["bytes_per_client_by_stage"].items())
        + f"; down {res['bytes_to_client']:.0f}"
    )
    return err


if __name__ == "__main__":
    rs = np.random.default_rng(0)

    # 1) correctness self-check: n=5, d=1000, one dropout after masked input.
    vecs = [rs.uniform(-1, 1, 1000).astype(np.float32) for _ in range(5)]
    res = run_flower_secaggplus(
        vecs, num_shares=5, reconstruction_threshold=3, drop_after_masked_input=1, seed=1
    )
    err = _report("self-check (drop after masked input)", vecs, res)
    assert err < 5 * 16 / 2**22 + 1e-9, err
    res = run_flower_secaggplus(
        vecs, num_shares=5, reconstruction_threshold=3, drop_before_masked_input=1, seed=2
    )
    err = _report("self-check (drop before masked input)", vecs, res)
    assert err < 5 * 16 / 2**22 + 1e-9, err

    # 2) n=10, d=2**20, complete graph, 2 clients drop after sending masked input.
    vecs = [rs.uniform(-1, 1, 2**20).astype(np.float32) for _ in range(10)]
    res = run_flower_secaggplus(
        vecs, num_shares=10, reconstruction_threshold=6, drop_after_masked_input=2, seed=3
    )
    _report("n=10 d=2^20", vecs, res)

    # 3) n=50, d=2**16, 13 neighbours (Flower needs an odd count), 2 drop after masked input.
    vecs = [rs.uniform(-1, 1, 2**16).astype(np.float32) for _ in range(50)]
    res = run_flower_secaggplus(
        vecs, num_shares=13, reconstruction_threshold=7, drop_after_masked_input=2, seed=4
    )
    _report("n=50 d=2^16", vecs, res)
