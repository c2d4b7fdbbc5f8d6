"""The FedCoLLM ``ClientApp``: local training, then the protocol stages of the aggregator.

Handlers (message types sent by :mod:`.server_app`):

* ``train``: load the broadcast SLM adapter ``theta_t``, train it on this node's data with
  :func:`~fedcollm_secure.cotuning.trainer.client_update` (the in-process trainer, the same
  per-client seed), keep the delta in the node's ``Context.state`` and report the weight.
  With DP-SGD the node first checks its own accountant (node config ``dp-state-file``, else
  ``Context.state``), trains with Opacus and reports what it spent; with distributed DP it
  clips, rounds and noises its delta itself and masking sums the integers;
* ``query.<stage>`` for every stage of every registered aggregator: hand the envelope bytes
  to this round's :class:`~fedcollm_secure.secagg.base.ClientEndpoint` (rebuilt by
  :mod:`.replay`) and return its reply bytes. For ``ckks`` the endpoint gets the node's
  identity key and the key authority's trusted key (:mod:`.trust`).

A node with node config ``fedcollm-role="key-authority"`` is the CKKS key authority of
``ckks`` runs instead (:mod:`.key_authority`): it answers ``train`` with its role and public
key only, and ``query.key_authority`` (the aggregator's relayed ``open_round`` / ``decrypt``)
with the in-process :class:`~fedcollm_secure.secagg.ckks.KeyAuthority`, rebuilt from the
node's ``Context.state``. Each role refuses the other role's messages.

The node's data is its shard of the run's training data (node config ``partition-id`` /
``num-partitions``, the split the in-process engine makes) or a local file (``data-path``,
with ``client-id``). The aggregator comes from the run config and must be one the node
accepts (node config ``fedcollm-aggregators``; default ``masking,ckks``). Protocol stages do
not import torch; only ``train`` does.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from ...errors import ConfigError, FedCoLLMSecureError, PartyError, ProtocolError
from ...secagg import available_aggregators
from ...secagg.base import _REGISTRY, ClientEndpoint
from ...secagg.ckks import CKKSClient, CKKSConfig
from .channel import (
    AUTHORITY_STAGE,
    F_AUTHORITY_KEY,
    F_CLIENT_ID,
    F_CLIENT_KEYS,
    F_CLIPPED,
    F_DDP,
    F_DP,
    F_ERROR,
    F_LOSS,
    F_MAX_WEIGHT,
    F_IDENTITY_KEY,
    F_N_EXAMPLES,
    F_PAYLOAD,
    F_PROTOCOL_ROUND,
    F_ROLE,
    F_ROUND,
    F_SESSION,
    F_STAGE,
    F_STEPS,
    F_THETA,
    F_WEIGHT,
    RECORD,
)
from .config import (
    NODE_CLIENT_ID,
    NODE_DATA_PATH,
    NODE_DP_STATE,
    NODE_IDENTITY_FILE,
    NODE_PARTITION_ID,
    ROLE_CLIENT,
    ROLE_KEY_AUTHORITY,
    aggregator_name,
    aggregator_options,
    fedcollm_config,
    node_aggregators,
    node_partition,
    node_role,
    node_string,
)
from .key_authority import STATE_RECORD as AUTHORITY_RECORD
from .key_authority import AuthorityNode
from .replay import EndpointState, KeystreamRandom, update_from_bytes, update_to_bytes
from .trust import (
    F_SIGNING_KEY,
    TRUST_RECORD,
    authority_key,
    client_identity,
    pinned_authority_key,
)

if TYPE_CHECKING:
    from ...cotuning.engine import FedCoLLMConfig

STATE_RECORD = "fedcollm.round"
DP_RECORD = "fedcollm.dpsgd"  # this node's DP-SGD accountant, when no dp-state-file is set

app = ClientApp()


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _reply(msg: Message, fields: Mapping[str, Any]) -> Message:
    return Message(RecordDict({RECORD: ConfigRecord(dict(fields))}), reply_to=msg)


def _refuse(msg: Message, exc: Exception) -> Message:
    return _reply(msg, {F_ERROR: f"{type(exc).__name__}: {exc}"})


def _incoming(msg: Message) -> ConfigRecord:
    rec = msg.content.config_records.get(RECORD)
    if not isinstance(rec, ConfigRecord):
        raise ProtocolError(f"message without a {RECORD!r} record")
    return rec


def _check_role(context: Context, role: str) -> None:
    mine = node_role(context.node_config)
    if mine != role:
        raise PartyError(f"this node is a {mine!r} node; it does not answer {role!r} messages")


def _check_aggregator(context: Context) -> str:
    _check_role(context, ROLE_CLIENT)
    name = aggregator_name(context.run_config)
    allowed = node_aggregators(context.node_config)
    if name not in allowed:
        raise ConfigError(f"this node accepts only {list(allowed)}; the run asks for {name!r}")
    return name


@dataclass
class _ClientParts:
    """A node's SLM (with LoRA), tokenizer and tokenized training data."""

    client_id: str
    index: int
    slm: Any
    tokenizer: Any
    features: Any
    n_examples: int


_PARTS: dict[tuple[int, int], _ClientParts] = {}  # (run id, node id): reused in one process


def _client_parts(cfg: FedCoLLMConfig, node_config: Mapping[str, Any],
                  key: tuple[int, int]) -> _ClientParts:
    if key in _PARTS:
        return _PARTS[key]
    from ...cotuning.data import federated_split, load_mc_dataset, tokenize_examples
    from ...cotuning.lora import attach_lora
    from ...cotuning.models import derive_slm_by_pruning, load_model
    from .parts import load_split

    path = node_config.get(NODE_DATA_PATH)
    if path is not None:
        cid = node_config.get(NODE_CLIENT_ID)
        if not isinstance(path, str) or not isinstance(cid, str) or not cid:
            raise ConfigError(f"node config {NODE_DATA_PATH!r} needs a string "
                              f"{NODE_CLIENT_ID!r}")
        examples = load_mc_dataset(path, "train", limit=cfg.data.limit)
        pid = node_config.get(NODE_PARTITION_ID)
        index = pid if isinstance(pid, int) else zlib.crc32(cid.encode())
    else:
        index, n = node_partition(node_config)
        if n != cfg.n_clients:
            raise ConfigError(f"node config num-partitions={n}, run config n_clients="
                              f"{cfg.n_clients}")
        clients, _ = federated_split(load_split(cfg, "train"), cfg.n_clients,
                                     public_fraction=cfg.data.public_fraction,
                                     config=cfg.partition)
        examples = clients[index]
        given = node_config.get(NODE_CLIENT_ID)
        cid = given if isinstance(given, str) and given else f"client-{index}"
    if cfg.slm is not None:
        slm, tok = load_model(cfg.slm)
    else:
        llm, tok = load_model(cfg.llm)
        slm = derive_slm_by_pruning(llm, cfg.slm_prune_layers or 1)
        del llm
    slm = attach_lora(slm, cfg.lora)
    slm.eval()
    features = tokenize_examples(examples, tok, cfg.data.max_length, prompt=cfg.eval.prompt)
    parts = _ClientParts(cid, index, slm, tok, features, len(examples))
    _PARTS.clear()  # one run per process at a time
    _PARTS[key] = parts
    return parts


# --------------------------------------------------------------------------------------------
# handlers
# --------------------------------------------------------------------------------------------
@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local training of round ``t``; the delta stays on the node for the protocol stages.
    A key-authority node answers with its role and public key (it trains nothing)."""
    if node_role(context.node_config) == ROLE_KEY_AUTHORITY:
        return _authority_hello(msg, context)
    try:
        aggregator = _check_aggregator(context)
        cfg = fedcollm_config(context.run_config)
        if cfg.privacy.ddp_on and aggregator != "masking":
            raise ConfigError("distributed DP runs on top of the masking aggregator")
        rec = _incoming(msg)
        t = int(rec[F_ROUND])  # type: ignore[arg-type]
        theta_bytes = rec[F_THETA]
        if not isinstance(theta_bytes, bytes):
            raise ProtocolError("train message without the adapter")
        import torch

        from ...cotuning.engine import _seed
        from ...cotuning.trainer import client_update

        parts = _client_parts(cfg, context.node_config, (context.run_id, context.node_id))
        theta = {n: torch.from_numpy(v.copy()) for n, v in update_from_bytes(theta_bytes).items()}
        dp = _DPSGD(cfg, context, parts) if cfg.privacy.dpsgd_on else None
        if dp is not None:
            dp.admit()  # PrivacyBudgetError before any training: the node sits the round out
        delta, result = client_update(parts.slm, parts.tokenizer, theta, parts.features,
                                      cfg.train, seed=_seed(cfg.seed, t, parts.index),
                                      dp=None if dp is None else dp.args)
        options = cfg.resolved_aggregator_options()
        update = {n: delta[n].numpy() for n in sorted(delta)}
        ddp: dict[str, Any] | None = None
        if cfg.privacy.ddp_on:  # clip, scale, round and noise here; masking sums integers
            update, ddp_options, ddp = _ddp_encode(cfg, update)
            options.update(ddp_options)
        clip = options.get("clip") if aggregator == "masking" and ddp is None else None
        clipped = 0.0
        if isinstance(clip, (int, float)):
            over = sum(int((v.abs() > clip).sum()) for v in delta.values())
            clipped = over / max(1, sum(v.numel() for v in delta.values()))
        weight = float(parts.n_examples) if cfg.weighting == "examples" and ddp is None else 1.0
        state = EndpointState(
            round=t, client_id=parts.client_id, aggregator=aggregator, options=options,
            update=update_to_bytes(update), weight=weight, key=KeystreamRandom.new_key())
        context.state.config_records[STATE_RECORD] = ConfigRecord(state.to_record())
        fields: dict[str, Any] = {F_CLIENT_ID: parts.client_id, F_WEIGHT: weight,
                                  F_N_EXAMPLES: parts.n_examples,
                                  F_LOSS: float(result.mean_loss), F_STEPS: int(result.steps),
                                  F_CLIPPED: float(clipped)}
        if aggregator == "ckks" and CKKSConfig.from_dict(options).sign:
            fields[F_IDENTITY_KEY] = _ckks_identity(context, parts.client_id).verify_key.raw.hex()
        if dp is not None:
            fields[F_DP] = json.dumps(dp.record(t, result), sort_keys=True)
        if ddp is not None:
            fields[F_DDP] = json.dumps(ddp, sort_keys=True)
        return _reply(msg, fields)
    except FedCoLLMSecureError as exc:
        return _refuse(msg, exc)


def _ddp_encode(cfg: FedCoLLMConfig, update: dict[str, Any],
                ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Distributed DP on this node: the run's parameters, resolved here from the run config
    exactly as the server resolves them; this node's delta clipped, scaled, rounded and
    noised with its own CSPRNG. Returns (integer update, masking options, report)."""
    from ...privacy.ddp import encode_update
    from ...privacy.federation import ddp_masking_options, ddp_params
    from ...secagg import TensorSpec

    if cfg.privacy.ddp is None:
        raise ConfigError("privacy.ddp is not configured")
    spec = TensorSpec.of(update)
    params = ddp_params(cfg.privacy.ddp, dim=spec.size, n_clients=cfg.n_clients,
                        threshold=cfg.threshold, rounds=cfg.rounds)
    encoded = encode_update(update, params, spec)
    return ({"ddp": encoded.vector}, ddp_masking_options(params),
            {"clipped": bool(encoded.clipped), "norm": float(encoded.norm),
             "out_of_range": int(encoded.out_of_range), "sigma": params.sigma,
             "noise_multiplier": params.noise_multiplier})


class _DPSGD:
    """This node's DP-SGD: its plan for the round and its own accountant, which persists in
    the node's ``dp-state-file`` (across runs) or else in ``Context.state`` (this run). The
    client, not the server, decides whether a round fits its budget."""

    def __init__(self, cfg: FedCoLLMConfig, context: Context, parts: _ClientParts) -> None:
        from ...privacy.accountant import ClientAccountant
        from ...privacy.federation import load_accountant, plan_dpsgd

        dp = cfg.privacy.dpsgd
        if dp is None:
            raise ConfigError("privacy.dpsgd is not configured")
        self.context, self.settings = context, dp
        path = node_string(context.node_config, NODE_DP_STATE)
        self.path = Path(path) if path else None
        saved = context.state.config_records.get(DP_RECORD)
        if self.path is None and saved is not None:
            self.accountant = ClientAccountant.from_json(json.loads(str(saved["accountant"])))
            if self.accountant.client_id != parts.client_id:
                raise ConfigError("the saved DP-SGD accountant belongs to another client")
        else:
            self.accountant = load_accountant(dp, parts.client_id, self.path)
        self.plan = plan_dpsgd(dp, n_examples=parts.n_examples,
                               batch_size=cfg.train.batch_size, epochs=cfg.train.epochs,
                               max_steps=cfg.train.max_steps, rounds=cfg.rounds)
        self.args = (self.plan[0], dp.max_grad_norm)

    def admit(self) -> None:
        sigma, q, steps = self.plan
        self.accountant.check(sigma, q, steps)

    def record(self, t: int, result: Any) -> dict[str, Any]:
        """Step the accountant by what round ``t`` ran; save it; the report for the server."""
        sigma = float(getattr(result, "noise_multiplier", self.plan[0]))
        q = float(getattr(result, "sample_rate", self.plan[1]))
        self.accountant.record(sigma, q, int(result.steps), round_=t)
        state = self.accountant.to_json()
        if self.path is not None:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(state, indent=1) + "\n")
            tmp.replace(self.path)
        else:
            self.context.state.config_records[DP_RECORD] = ConfigRecord(
                {"accountant": json.dumps(state, sort_keys=True)})
        return {"noise_multiplier": sigma, "sample_rate": q, "steps": int(result.steps),
                "max_grad_norm": self.settings.max_grad_norm, "delta": self.settings.delta,
                "accountant": self.settings.accountant,
                "epsilon": self.accountant.epsilon(), "budget": self.accountant.budget}


def _trust(context: Context) -> dict[str, Any]:
    rec = context.state.config_records.get(TRUST_RECORD)
    return dict(rec) if rec is not None else {}


def _ckks_identity(context: Context, client_id: str) -> Any:
    """This client's identity key for the run (saved in ``Context.state`` unless it comes
    from an identity file)."""
    trust = _trust(context)
    key = client_identity(trust, context.node_config, client_id)
    if context.node_config.get(NODE_IDENTITY_FILE) is None:
        trust[F_SIGNING_KEY] = key.private_bytes()
        context.state.config_records[TRUST_RECORD] = ConfigRecord(trust)
    return key


def _ckks_builder(context: Context, rec: ConfigRecord, state: EndpointState) -> Any:
    """A builder of this round's :class:`CKKSClient` with the node's keys."""
    config = CKKSConfig.from_dict(state.options)
    trust = _trust(context)
    key = authority_key(context.node_config, rec.get(F_AUTHORITY_KEY), trust)
    if pinned_authority_key(context.node_config) is None and F_AUTHORITY_KEY not in trust:
        trust[F_AUTHORITY_KEY] = key.raw.hex()  # trusted on first use, for this run
        context.state.config_records[TRUST_RECORD] = ConfigRecord(trust)
    identity = None
    if config.sign:
        if context.node_config.get(NODE_IDENTITY_FILE) is None and not isinstance(
                trust.get(F_SIGNING_KEY), bytes):
            raise ProtocolError("no identity key for this run (train first)")
        identity = client_identity(trust, context.node_config, state.client_id)

    def build(st: EndpointState, _rng: KeystreamRandom) -> ClientEndpoint:
        return CKKSClient(st.client_id, update_from_bytes(st.update), weight=st.weight,
                          config=config, authority_key=key, identity=identity,
                          session=st.session or None, round_=st.protocol_round)

    return build


def stage(msg: Message, context: Context) -> Message:
    """One protocol stage: the round's endpoint answers the envelope bytes."""
    try:
        _check_aggregator(context)
        rec = _incoming(msg)
        payload = rec.get(F_PAYLOAD)
        if not isinstance(payload, bytes):
            raise ProtocolError("stage message without a payload")
        stored = context.state.config_records.get(STATE_RECORD)
        if stored is None:
            raise ProtocolError("no local update for this round (train first)")
        state = EndpointState.from_record(stored)
        if int(rec.get(F_ROUND, -1)) != state.round:  # type: ignore[arg-type]
            raise ProtocolError(f"stage {rec.get(F_STAGE)!r} of round {rec.get(F_ROUND)!r}; "
                                f"this node trained round {state.round}")
        session, protocol_round = rec.get(F_SESSION), rec.get(F_PROTOCOL_ROUND)
        if not isinstance(session, bytes) or not isinstance(protocol_round, int):
            raise ProtocolError("stage message without session and protocol round")
        if not state.requests:  # the round's first stage fixes them
            state.session, state.protocol_round = session, protocol_round
            max_weight = rec.get(F_MAX_WEIGHT)
            if isinstance(max_weight, float) and state.aggregator == "masking":
                state.options["max_weight"] = max_weight
        elif (session, protocol_round) != (state.session, state.protocol_round):
            raise ProtocolError("session or protocol round changed within a round")
        build = _ckks_builder(context, rec, state) if state.aggregator == "ckks" else None
        reply = state.answer(payload, build)
        context.state.config_records[STATE_RECORD] = ConfigRecord(state.to_record())
        return _reply(msg, {F_PAYLOAD: reply})
    except FedCoLLMSecureError as exc:
        return _refuse(msg, exc)


# --------------------------------------------------------------------------------------------
# the key authority role
# --------------------------------------------------------------------------------------------
def _authority(context: Context) -> AuthorityNode:
    _check_role(context, ROLE_KEY_AUTHORITY)
    if aggregator_name(context.run_config) != "ckks":
        raise ConfigError("a key-authority node takes part in ckks runs only")
    saved = context.state.config_records.get(AUTHORITY_RECORD)
    return AuthorityNode.load(saved, context.node_config, aggregator_options(context.run_config))


def _save_authority(context: Context, node: AuthorityNode) -> None:
    state: dict[str, Any] = dict(node.state())
    context.state.config_records[AUTHORITY_RECORD] = ConfigRecord(state)


def _authority_hello(msg: Message, context: Context) -> Message:
    """``train`` on the key-authority node: its role and public key (nothing is trained)."""
    try:
        node = _authority(context)
        _save_authority(context, node)
        return _reply(msg, {F_ROLE: ROLE_KEY_AUTHORITY, F_AUTHORITY_KEY: node.public_key_hex})
    except FedCoLLMSecureError as exc:
        return _refuse(msg, exc)


@app.query(AUTHORITY_STAGE)
def key_authority(msg: Message, context: Context) -> Message:
    """One relayed request of the aggregator to the key authority (``open_round`` or
    ``decrypt``); the authority's state is saved in ``Context.state`` for the next."""
    try:
        node = _authority(context)
        rec = _incoming(msg)
        payload = rec.get(F_PAYLOAD)
        if not isinstance(payload, bytes):
            raise ProtocolError("key authority message without a payload")
        reply = node.answer(payload, rec.get(F_CLIENT_KEYS))
        _save_authority(context, node)
        return _reply(msg, {F_PAYLOAD: reply})
    except FedCoLLMSecureError as exc:
        return _refuse(msg, exc)


def _register_stages() -> None:
    seen: set[str] = set()
    for name in available_aggregators():
        for s in _REGISTRY[name].stages:
            if s not in seen:
                seen.add(s)
                app.query(s)(stage)


_register_stages()

__all__ = ["app", "key_authority", "stage", "train"]
