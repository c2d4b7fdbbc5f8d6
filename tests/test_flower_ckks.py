"""``ckks`` on Flower: the key authority as its own SuperNode.

Unit part (no Flower process): the authority rebuilt from its saved state for every message
keeps the in-process refusals; the node-side trust rules for the authority's key and the
clients' identity keys. Deployment part: a real SuperLink, three client SuperNodes and one
key-authority SuperNode on loopback run one ckks co-tuning round; its aggregate is checked
against the in-process ckks and plaintext sums of the same inputs, and the aggregator is
checked to have held a public context only.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedcollm_secure.crypto import InsecureSeededRandomForTests
from fedcollm_secure.errors import (
    CiphertextError,
    ConfigError,
    HEContextError,
    PartyError,
    SignatureError,
    StageError,
    WireFormatError,
)
from fedcollm_secure.identity import KEY_AUTHORITY_NAME, AllowList, Identity
from fedcollm_secure.secagg import TensorSpec
from fedcollm_secure.secagg.ckks import CKKSClient, CKKSConfig, CKKSServer, KeyAuthority
from fedcollm_secure.transport.base import Channel, drive
from fedcollm_secure.transport.flower.key_authority import AuthorityNode
from fedcollm_secure.transport.flower.trust import (
    F_AUTHORITY_KEY,
    authority_key,
    client_identity,
)

IDS = ["a", "b", "c"]


def rng(seed: str) -> InsecureSeededRandomForTests:
    return InsecureSeededRandomForTests(seed, quiet=True)


def updates(n: int = 3) -> dict[str, dict[str, np.ndarray]]:
    g = np.random.default_rng(7)
    return {cid: {"w": g.normal(size=(3, 5)), "b": g.normal(size=7)} for cid in IDS[:n]}


class Direct(Channel):
    def __init__(self, clients: dict[str, CKKSClient], skip: set[str] | None = None) -> None:
        self.clients, self.skip = clients, skip or set()

    def exchange(self, stage: str, requests: Any) -> dict[str, bytes]:
        return {c: self.clients[c].handle(r) for c, r in requests.items() if c not in self.skip}


class StatefulNode:
    """The key-authority node as Flower runs it: rebuilt from its saved state per message."""

    def __init__(self, node_config: dict[str, Any] | None = None,
                 options: dict[str, Any] | None = None) -> None:
        self.node_config, self.options = node_config or {}, options or {}
        self.saved = dict(AuthorityNode.load(None, self.node_config, self.options).state())
        self.verify_key = KeyAuthority.from_state(
            self.saved, CKKSConfig.from_dict(self.options)).verify_key
        self.client_keys: str | None = None

    def __call__(self, request: bytes) -> bytes:
        node = AuthorityNode.load(self.saved, self.node_config, self.options)
        reply = node.answer(request, self.client_keys)
        self.saved = dict(node.state())
        return reply


def ckks_round(node: StatefulNode, skip: set[str] | None = None,
               threshold: int = 2) -> tuple[CKKSServer, dict[str, dict[str, np.ndarray]]]:
    ups = updates()
    spec = TensorSpec.of(ups["a"])
    idents = {c: Identity.generate(c, rng(f"id-{c}")).key for c in IDS}
    node.client_keys = json.dumps({c: k.verify_key.raw.hex() for c, k in idents.items()})
    session = b"s" * 16
    clients = {c: CKKSClient(c, ups[c], weight=1.0 + i, authority_key=node.verify_key,
                             identity=idents[c], session=session, round_=1)
               for i, c in enumerate(IDS)}
    server = CKKSServer(IDS, spec, authority=node, authority_key=node.verify_key,
                        threshold=threshold,
                        client_keys={c: k.verify_key for c, k in idents.items()},
                        session=session, round_=1)
    drive(server, Direct(clients, skip))
    return server, ups


# --------------------------------------------------------------------------------------------
# the authority rebuilt per message
# --------------------------------------------------------------------------------------------
def test_authority_rebuilt_from_saved_state_per_message_decrypts_the_weighted_sum() -> None:
    node = StatefulNode()
    server, ups = ckks_round(node)
    result = server.result()
    expected = {n: sum((1.0 + i) * ups[c][n] for i, c in enumerate(IDS)) for n in ups["a"]}
    bound = result.stats["params"]["error_bound"]
    for n in expected:
        assert np.max(np.abs(result.sum[n] - expected[n])) <= bound
    assert result.weight_total == pytest.approx(6.0, abs=bound)
    # the aggregator's context is public; the saved state no longer holds the round's secret
    assert server.ctx is not None and not server.ctx.has_secret_key()
    assert not any(k.startswith("context_") for k in node.saved)
    again = KeyAuthority.from_state(node.saved)
    assert [d.contributors for d in again.decryptions] == [3]
    assert again.verify_key.raw == node.verify_key.raw


def test_saved_state_holds_the_secret_context_only_between_open_round_and_decrypt() -> None:
    node = StatefulNode(options={"sign": False})
    server = CKKSServer(IDS, TensorSpec.of(updates()["a"]), authority=node,
                        authority_key=node.verify_key, config=CKKSConfig(sign=False),
                        session=b"t" * 16, round_=2)
    server.next_requests()  # open_round
    assert sorted(k for k in node.saved if k.startswith("context_")) == ["context_0"]
    restored = KeyAuthority.from_state(node.saved, CKKSConfig(sign=False))
    (r,) = restored.rounds.values()
    assert r.ctx is not None and r.ctx.has_secret_key() and not r.decrypted


def test_rebuilt_authority_keeps_the_in_process_refusals(tmp_path: Path) -> None:
    log = tmp_path / "decryptions.jsonl"
    node = StatefulNode({"ckks-decryption-log": str(log)})
    server, _ = ckks_round(node)
    first_decrypt = server._authority_reply  # the authority's last signed reply
    assert first_decrypt
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(lines) == 1 and lines[0]["contributors"] == 3
    assert lines[0]["authority_key"] == node.verify_key.raw.hex()
    # once per round: a second decrypt of the same round is refused after a rebuild
    with pytest.raises(StageError, match="once per round"):
        server._ask_authority("decrypt", {
            "contributors": [1, 2, 3], "receipts": {}, "context_digest": "", "length": 1})
    assert len(log.read_text().splitlines()) == 1  # the refusal decrypted nothing


def test_rebuilt_authority_refuses_a_decrypt_below_threshold() -> None:
    from fedcollm_secure.secagg.ckks import he
    from fedcollm_secure.secagg.ckks.messages import envelope
    from fedcollm_secure.wire import SERVER, b64, decode

    node = StatefulNode(options={"sign": False})
    cfg = CKKSConfig(sign=False)
    session = b"u" * 16
    params = cfg.params().to_json()
    reply = decode(node(envelope("open_round", session, 1, SERVER, (1 << 63) - 1, {
        "n_clients": 3, "clients": IDS, "threshold": 3, "params": params}).encode()))
    assert reply.stage == "public_context"
    ctx = he.load_public_context(reply.body, cfg.params())
    body = he.encrypt(ctx, cfg.params(), np.array([1.0, 1.0, 1.0]))
    refused = decode(node(envelope("decrypt", session, 1, SERVER, (1 << 63) - 1, {
        "contributors": [1, 2], "receipts": {}, "length": 3,
        "context_digest": b64(he.context_digest(reply.body))}, body).encode()))
    assert refused.stage == "error" and refused.fields["code"] == "ThresholdError"
    # and the secret context at the aggregator is refused by its own loader
    saved = KeyAuthority.from_state(node.saved, cfg)
    (r,) = saved.rounds.values()
    assert r.ctx is not None
    secret = r.ctx.serialize(save_secret_key=True)
    with pytest.raises(HEContextError, match="secret key"):
        he.load_public_context(secret, cfg.params())


def test_state_from_another_parameter_set_or_corrupted_is_refused() -> None:
    node = StatefulNode()
    ckks_round(node)
    with pytest.raises(PartyError, match="other parameters"):
        KeyAuthority.from_state(node.saved, CKKSConfig(preset="n16384"))
    with pytest.raises(WireFormatError):
        KeyAuthority.from_state({"meta": "{"})
    node3 = StatefulNode(options={"sign": False})
    cfg = CKKSConfig(sign=False)
    server = CKKSServer(IDS, TensorSpec.of(updates()["a"]), authority=node3,
                        authority_key=node3.verify_key, config=cfg, session=b"v" * 16)
    server.next_requests()
    bad = dict(node3.saved)
    bad["context_0"] = bytes(bad["context_0"])[:-40]
    with pytest.raises((WireFormatError, HEContextError, CiphertextError)):
        KeyAuthority.from_state(bad, cfg)


# --------------------------------------------------------------------------------------------
# keys: allow-list at the authority, pinned / first-use authority key at the clients
# --------------------------------------------------------------------------------------------
def test_authority_with_an_allow_list_refuses_unlisted_relayed_client_keys(
        tmp_path: Path) -> None:
    listed = {c: Identity.generate(c, rng(f"id-{c}")) for c in IDS}
    allow = tmp_path / "allow.json"
    AllowList.of(listed.values()).save(allow)
    node = AuthorityNode.load(None, {"allow-list": str(allow)}, {})
    node.enroll({c: i.key.verify_key for c, i in listed.items()})
    intruder = Identity.generate("a", rng("other")).key.verify_key
    with pytest.raises(SignatureError):
        node.enroll({"a": intruder})
    with pytest.raises(SignatureError, match="unknown signer"):
        node.enroll({"zed": intruder})
    reply = node.answer(b"ignored", json.dumps({"a": intruder.raw.hex()}))
    from fedcollm_secure.wire import decode

    env = decode(reply)
    env.verify(node.authority.verify_key)  # a signed refusal
    assert env.stage == "error" and env.fields["code"] == "SignatureError"


def test_first_use_enrolment_refuses_a_changed_client_key() -> None:
    node = AuthorityNode.load(None, {}, {})
    a1 = Identity.generate("a", rng("1")).key.verify_key
    node.enroll({"a": a1})
    node2 = AuthorityNode.load(node.state(), {}, {})
    with pytest.raises(PartyError, match="already enrolled"):
        node2.enroll({"a": Identity.generate("a", rng("2")).key.verify_key})


def test_authority_identity_file_is_its_signing_key(tmp_path: Path) -> None:
    ident = Identity.generate(KEY_AUTHORITY_NAME, rng("ka"))
    ident.save(tmp_path / "ka.key")
    node = AuthorityNode.load(None, {"identity-file": str(tmp_path / "ka.key")}, {})
    assert node.public_key_hex == ident.public_key.hex()
    other = Identity.generate(KEY_AUTHORITY_NAME, rng("kb"))
    other.save(tmp_path / "kb.key")
    with pytest.raises(ConfigError, match="changed"):
        AuthorityNode.load(node.state(), {"identity-file": str(tmp_path / "kb.key")}, {})


def test_client_pins_or_trusts_the_authority_key_on_first_use(tmp_path: Path) -> None:
    real = Identity.generate(KEY_AUTHORITY_NAME, rng("real")).public_key.hex()
    fake = Identity.generate(KEY_AUTHORITY_NAME, rng("fake")).public_key.hex()
    pinned = {"ckks-authority-key": real}
    assert authority_key(pinned, real, None).raw.hex() == real
    assert authority_key(pinned, None, None).raw.hex() == real
    with pytest.raises(PartyError, match="trusts"):
        authority_key(pinned, fake, None)
    allow = tmp_path / "allow.json"
    AllowList({KEY_AUTHORITY_NAME: bytes.fromhex(real)}).save(allow)
    with pytest.raises(PartyError):
        authority_key({"allow-list": str(allow)}, fake, None)
    with pytest.raises(ConfigError, match="different key authorities"):
        authority_key({"allow-list": str(allow), "ckks-authority-key": fake}, real, None)
    # first use: the announced key, then no other within the run
    assert authority_key({}, fake, None).raw.hex() == fake
    with pytest.raises(PartyError, match="changed"):
        authority_key({}, real, {F_AUTHORITY_KEY: fake})
    with pytest.raises(PartyError, match="nor announced"):
        authority_key({}, None, None)
    with pytest.raises(ConfigError, match="64 hex"):
        authority_key({"ckks-authority-key": "00"}, None, None)


def test_client_identity_from_file_must_carry_the_client_id(tmp_path: Path) -> None:
    Identity.generate("client-0", rng("c0")).save(tmp_path / "c0.key")
    key = client_identity(None, {"identity-file": str(tmp_path / "c0.key")}, "client-0")
    assert key.verify_key.raw == Identity.load(tmp_path / "c0.key").public_key
    with pytest.raises(ConfigError, match="client-1"):
        client_identity(None, {"identity-file": str(tmp_path / "c0.key")}, "client-1")
    saved = {"signing_key": key.private_bytes()}
    assert client_identity(saved, {}, "x").verify_key.raw == key.verify_key.raw


# --------------------------------------------------------------------------------------------
# a real loopback deployment: SuperLink + 3 client SuperNodes + 1 key-authority SuperNode
# --------------------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "flower" / "pyproject.toml"
BIN = Path(sys.executable).parent
TEST_BUDGET_S = 120.0  # watchdog: the whole deployment test, processes included


def _deployment_run_config(models: Path, out: Path) -> dict[str, Any]:
    from fedcollm_secure.transport.flower.loopback import tiny_run_config

    return tiny_run_config(models, out, aggregator="ckks", overrides={
        "flower.node_wait_timeout": 60.0, "flower.train_timeout": 90.0,
        "flower.stage_timeout": 40.0})


def _reference(run_config: dict[str, Any], theta: dict[str, np.ndarray],
               ) -> tuple[dict[str, np.ndarray], Any]:
    """The same round in process: the engine's shards, trainer and seeds; the exact weighted
    sum (float64) and the in-process ckks result."""
    import torch

    from fedcollm_secure.cotuning import engine as engine_mod
    from fedcollm_secure.cotuning.server import aggregate_deltas
    from fedcollm_secure.cotuning.trainer import client_update
    from fedcollm_secure.transport.flower.config import fedcollm_config

    cfg = fedcollm_config(run_config)
    eng = engine_mod.FedCoLLM(cfg)
    theta_t = {n: torch.from_numpy(v.copy()) for n, v in theta.items()}
    deltas = {}
    for k, (cid, features) in enumerate(zip(eng.client_ids, eng.client_features, strict=True)):
        deltas[cid], _ = client_update(eng.slm, eng.tokenizer, theta_t, features, cfg.train,
                                       seed=engine_mod._seed(cfg.seed, 1, k))
    weights = eng._weights() or {cid: 1.0 for cid in deltas}
    exact = {n: sum(weights[c] * deltas[c][n].double().numpy() for c in deltas)
             for n in theta}
    _, result = aggregate_deltas(deltas, weights, protocol="ckks", threshold=cfg.threshold)
    return exact, result


@pytest.mark.skipif(not (BIN / "flower-superlink").exists(),
                    reason="flower-superlink is not next to the Python executable")
def test_ckks_round_on_a_loopback_deployment_with_a_key_authority_node(tmp_path: Path) -> None:
    pytest.importorskip("flwr", reason="flwr is not installed (the 'flower' extra)")
    tomli_w = pytest.importorskip("tomli_w", reason="tomli_w (a flwr dependency) is missing")
    import tenseal as ts

    from fedcollm_secure.cotuning.models import save_tiny_model
    from fedcollm_secure.transport.flower.loopback import LoopbackFederation
    from fedcollm_secure.transport.flower.replay import update_from_bytes
    from fedcollm_secure.wire import decode

    started = time.monotonic()
    models = tmp_path / "models"
    save_tiny_model(models / "llm", "llama", seed=3, hidden=48, layers=2)
    save_tiny_model(models / "slm", "llama", seed=4, hidden=32, layers=1)
    out = tmp_path / "out"
    run_config = _deployment_run_config(models, out)
    project = tomllib.loads(EXAMPLE.read_text())
    project["tool"]["flwr"]["app"]["config"] = run_config
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "pyproject.toml").write_text(tomli_w.dumps(project))

    # the authority's long-term key on its machine; the clients pin its public key
    authority = Identity.generate(KEY_AUTHORITY_NAME)
    authority.save(tmp_path / "authority.key")
    log = tmp_path / "decryptions.jsonl"
    nodes: list[dict[str, Any]] = [
        {"partition-id": k, "num-partitions": 3, "ckks-authority-key": authority.public_key.hex()}
        for k in range(3)]
    nodes.append({"fedcollm-role": "key-authority", "identity-file": str(tmp_path /
                  "authority.key"), "ckks-decryption-log": str(log)})

    theta_file = out / "round-1" / "theta.safetensors"
    reference: dict[str, Any] = {}

    def compute_reference() -> None:  # while the federation waits on its pollers
        try:
            reference["exact"], reference["result"] = _reference(
                run_config, update_from_bytes(theta_file.read_bytes()))
        except Exception as exc:  # reported by the main thread
            reference["error"] = exc

    worker = threading.Thread(target=compute_reference, daemon=True)
    fed = LoopbackFederation(4, tmp_path / "fed", node_configs=nodes, bin_dir=BIN)
    events: list[dict[str, Any]] = []
    try:
        fed.start()
        submitted = fed.run_app(tmp_path / "app")
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        while True:
            if worker.ident is None and theta_file.exists():
                worker.start()
            path = out / "progress.jsonl"
            events = [json.loads(x) for x in path.read_text().splitlines()
                      if x.strip()] if path.exists() else []
            if any(e.get("event") == "done" for e in events):
                break
            if time.monotonic() - started > TEST_BUDGET_S:
                pytest.fail(f"no result within {TEST_BUDGET_S:g} s; events: {events}; "
                            f"logs in {fed.logs}")
            if fed.superlink is not None and fed.superlink.poll() is not None:
                pytest.fail(f"the SuperLink exited; logs in {fed.logs}")
            time.sleep(0.05)
    finally:
        fed.stop()
    wall = time.monotonic() - started
    assert all(p is not None and p.poll() is not None for p in [*fed.nodes, fed.superlink])

    worker.join(timeout=max(1.0, TEST_BUDGET_S + 30 - (time.monotonic() - started)))
    assert "error" not in reference, reference.get("error")
    assert "result" in reference, "the in-process reference did not finish in time"
    (record,) = json.loads((out / "rounds.json").read_text())
    assert record["aggregator"] == "ckks"
    assert sorted(record["survivors"]) == ["client-0", "client-1", "client-2"]
    assert record["dropped"] == {} and record["missing"] == {}
    # the key authority took part as its own node and logged one decryption of 3 inputs
    ckks = record["ckks"]
    assert ckks["authority_key"] == authority.public_key.hex()
    assert ckks["authority_node"] not in record["nodes"].values()
    (logged,) = [json.loads(x) for x in log.read_text().splitlines()]
    assert logged["contributors"] == 3 and logged["round"] == 1
    assert logged["contributor_ids"] == ["client-0", "client-1", "client-2"]
    # the aggregator held the public context only: as it reported, and as it received it
    assert ckks["aggregator_context"] == {"has_secret_key": False, "is_private": False,
                                          "has_galois_keys": False}
    msg = decode((out / "round-1" / "ckks_context.msg").read_bytes(),)
    msg.verify(authority.key.verify_key)
    received = ts.context_from(bytes(msg.body))
    assert not received.has_secret_key() and not received.is_private()

    flower_sum = update_from_bytes((out / "round-1" / "sum.safetensors").read_bytes())
    exact, ref = reference["exact"], reference["result"]
    bound = record["error_bound"]
    assert bound == pytest.approx(ref.stats["params"]["error_bound"]) and 0 < bound < 1e-4
    assert record["weight_total"] == pytest.approx(ref.weight_total, abs=bound)
    scale = max(float(np.max(np.abs(exact[n]))) for n in exact)
    assert scale > 1000 * bound  # the clients really trained: the sum is far from zero
    f32 = 4 * float(np.finfo(np.float32).eps) * scale  # sum.safetensors is float32
    assert set(flower_sum) == set(exact)
    worst = 0.0
    for n in exact:
        assert np.max(np.abs(ref.sum[n] - exact[n])) <= bound
        diff = float(np.max(np.abs(flower_sum[n].astype(np.float64) - exact[n])))
        assert diff <= bound + f32, (n, diff, bound, f32)
        worst = max(worst, diff)
    print(f"loopback ckks round: {wall:.1f} s wall (test total); max |diff| {worst:.3g}, "
          f"bound {bound:.3g} + float32 {f32:.3g}; "
          f"stage seconds {record['stage_seconds']}; authority {ckks['authority_seconds']}")
