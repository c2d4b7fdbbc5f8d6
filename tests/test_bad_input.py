"""Bad input through ``secure_sum``, the in-process channel and the adapter gate.

Complements ``test_tamper_and_faults.py`` (bit flips in every region of every message,
replay across rounds and sessions, another client's reply, time-outs, thresholds, altered
parameters, MACs) and ``test_masking_refusals.py`` (the client side: malformed envelopes and
headers, out-of-order and duplicated stages, wrong session, unknown fields). Here: oversized
and malformed replies at the server, wrong wire version or protocol, a reply replayed into
another stage of the same round, duplicate client ids, clients holding NaN/Inf or
wrong-shaped updates, non-finite or wrong-length plaintext inputs, masked vectors of the
wrong length or outside the ring, and the validation of received adapters.

The rule is the same as there: the bad party is refused with its typed error, and the round
completes with the EXACT sum over the honest survivors when enough remain.
"""

from __future__ import annotations

import json
import struct
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedcollm_secure import errors, secure_sum
from fedcollm_secure.cotuning.adapter_validation import (
    adapter_spec,
    screen_updates,
    validate_adapter,
)
from fedcollm_secure.crypto import InsecureSeededRandomForTests
from fedcollm_secure.errors import (
    ConfigError,
    PartyError,
    UpdateValidationError,
    WireFormatError,
)
from fedcollm_secure.secagg import TensorSpec, get_aggregator
from fedcollm_secure.secagg.masking import STAGES
from fedcollm_secure.secagg.masking.server import HEADER_LIMIT
from fedcollm_secure.transport import FaultPlan, InProcessChannel, Tamper, drive
from fedcollm_secure.wire import MAGIC, PREFIX, decode

CLIP, LEVELS = 4.0, 1 << 16
OPTIONS = {"clip": CLIP, "levels": LEVELS}
IDS = [f"c{i}" for i in range(5)]
TYPED = {name for name in dir(errors) if name.endswith("Error")}


def grid_updates(ids: list[str], seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Updates on the quantisation grid: the masked sum is then exact."""
    gen = np.random.default_rng(seed)
    step = CLIP / LEVELS
    return {cid: {"a": gen.integers(-LEVELS, LEVELS + 1, (3, 4)) * step,
                  "b": gen.integers(-LEVELS, LEVELS + 1, 5) * step} for cid in ids}


UPDATES = grid_updates(IDS)


def rng(seed: int = 1) -> InsecureSeededRandomForTests:
    return InsecureSeededRandomForTests(seed, quiet=True)


def run(faults: FaultPlan | None = None, **kw: Any) -> Any:
    return secure_sum(UPDATES, rng=rng(), faults=faults, **{**OPTIONS, **kw})


def assert_exact(result: Any, updates: dict[str, dict[str, np.ndarray]] = UPDATES) -> None:
    """The sum over exactly the survivors, bit for bit: nothing of theirs was lost."""
    assert result.survivors
    for name, arr in updates[result.survivors[0]].items():
        expected = sum((updates[c][name] for c in result.survivors), np.zeros_like(arr))
        np.testing.assert_array_equal(result.sum[name], expected, strict=True)
    assert result.weight_total == len(result.survivors)


def refused(result: Any, cid: str, stage: str, error: str) -> str:
    """``cid`` was dropped at ``stage`` with the typed ``error`` recorded, the others kept."""
    reason = result.stats["rejected"][cid]
    assert reason.startswith(f"{stage}: "), reason
    assert error in reason and error in TYPED, reason
    assert result.dropped.get(cid) == stage and cid not in result.survivors
    assert set(result.survivors) == set(IDS) - set(result.dropped)
    return reason


def reply_edit(fn: Callable[[bytes], bytes], cid: str = "c1",
               stage: str = "masked_input") -> FaultPlan:
    return FaultPlan(tamper=[Tamper(cid, stage, "reply", fn)])


# --- size limits, checked before parsing ---------------------------------------------------
def test_oversized_body_is_refused_before_parsing() -> None:
    def grow(data: bytes) -> bytes:
        env = decode(data)
        env.body = bytes(env.body) + bytes(4096)
        return env.encode(mac_key=bytes(32))

    result = run(reply_edit(grow))
    assert "size limits" in refused(result, "c1", "masked_input", "WireFormatError")
    assert_exact(result)


@pytest.mark.parametrize("stage", ["advertise_keys", "unmask"])
def test_oversized_header_is_refused_before_parsing(stage: str) -> None:
    """Declared and actual header over the server's limit, filled with bytes that are not
    JSON: refused for its size, so the header was never parsed."""
    size = HEADER_LIMIT + 1
    huge = PREFIX.pack(MAGIC, 1, 0, size, 0) + b"\xff" * size
    result = run(reply_edit(lambda _b: huge, "c2", stage))
    if stage == "unmask":  # a late dropout: its input is still in the sum
        reason = result.stats["rejected"]["c2"]
        assert "c2" in result.stats["late_dropouts"] and "c2" in result.survivors
    else:
        reason = refused(result, "c2", stage, "WireFormatError")
    assert "size limits" in reason and "JSON" not in reason
    assert_exact(result)


@pytest.mark.parametrize("hlen,blen", [(1 << 31, 0), (0, 1 << 62), (2**32 - 1, 2**64 - 1)])
def test_absurd_declared_lengths_are_refused_without_allocating(hlen: int, blen: int) -> None:
    data = PREFIX.pack(MAGIC, 1, 0, hlen, blen) + b"{}"
    with pytest.raises(WireFormatError):
        decode(data)
    result = run(reply_edit(lambda _b: data, "c0", "share_keys"))
    refused(result, "c0", "share_keys", "WireFormatError")
    assert_exact(result)


# --- malformed replies -------------------------------------------------------------------
@pytest.mark.parametrize("stage", STAGES)
def test_wrong_wire_version_is_refused(stage: str) -> None:
    def version_2(data: bytes) -> bytes:
        return data[:3] + bytes([2]) + data[4:]

    result = run(reply_edit(version_2, "c3", stage))
    reason = result.stats["rejected"]["c3"]
    assert "WireFormatError" in reason and "unsupported wire version 2" in reason
    if stage != "unmask":
        refused(result, "c3", stage, "WireFormatError")
    assert_exact(result)


def test_reply_of_another_protocol_is_refused() -> None:
    def relabel(data: bytes) -> bytes:
        env = decode(data)
        env.protocol = "plaintext/v1"
        return env.encode()

    result = run(reply_edit(relabel, "c4", "share_keys"))
    assert "expected 'masking/v1'" in refused(result, "c4", "share_keys", "WireFormatError")
    assert_exact(result)


@pytest.mark.parametrize("header", [b"[]", b'{"protocol":1}', b"{\"a\":NaN}", b"{" * 5000,
                                    b'{"protocol":"masking/v1","protocol":"x"}'])
def test_malformed_reply_headers_are_refused(header: bytes) -> None:
    data = PREFIX.pack(MAGIC, 1, 0, len(header), 0) + header
    result = run(reply_edit(lambda _b: data, "c2", "advertise_keys"))
    refused(result, "c2", "advertise_keys", "WireFormatError")
    assert_exact(result)


def test_malformed_error_reply_is_refused() -> None:
    def bad_error(data: bytes) -> bytes:
        env = decode(data)
        env.stage, env.fields = "error", {"code": 5}
        return env.encode()

    result = run(reply_edit(bad_error, "c1", "advertise_keys"))
    refused(result, "c1", "advertise_keys", "WireFormatError")
    assert_exact(result)


# --- replay within a round ---------------------------------------------------------------
@pytest.mark.parametrize("earlier,later,error", [
    ("advertise_keys", "share_keys", "StageError"),
    ("share_keys", "masked_input", "StageError"),
    ("masked_input", "unmask", "WireFormatError"),  # a body where none may be: size limit
])
def test_reply_replayed_into_a_later_stage_is_refused(earlier: str, later: str,
                                                      error: str) -> None:
    """Same session and round, the client's own genuine reply of an earlier stage."""
    recorded: dict[str, bytes] = {}

    def keep(stage: str, cid: str, direction: str, data: bytes) -> None:
        if cid == "c2" and direction == "reply" and stage == earlier:
            recorded["reply"] = bytes(data)

    result = run(reply_edit(lambda _b: recorded["reply"], "c2", later), observers=(keep,))
    reason = result.stats["rejected"]["c2"]
    assert error in reason, reason
    if later != "unmask":
        refused(result, "c2", later, error)
    assert_exact(result)


# --- duplicate and unknown client ids ----------------------------------------------------
@pytest.mark.parametrize("protocol", ["masking", "ckks", "plaintext"])
def test_duplicate_client_ids_are_refused(protocol: str) -> None:
    spec = TensorSpec.of({"w": np.ones(2)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        aggregator = get_aggregator(protocol)
    with pytest.raises(PartyError, match="duplicate"):
        aggregator.server(["a", "b", "a"], spec, rng=rng())


def test_bad_client_ids_weights_and_drops_are_refused() -> None:
    with pytest.raises(ConfigError, match="non-empty strings"):
        secure_sum({"": {"w": np.ones(2)}, "b": {"w": np.ones(2)}})
    with pytest.raises(ConfigError, match="exactly the clients"):
        secure_sum(UPDATES, weights={"c0": 1.0, "zz": 1.0})
    with pytest.raises(ConfigError, match="unknown client"):
        secure_sum(UPDATES, drop={"zz": "unmask"})
    with pytest.raises(ConfigError, match="finite"):
        secure_sum(UPDATES, weights={c: float("nan") for c in IDS})


# --- non-finite and wrong-shaped updates -------------------------------------------------
@pytest.mark.parametrize("bad", ["nan", "inf", "shape", "name"])
def test_a_client_holding_a_bad_update_refuses_and_the_round_completes(bad: str) -> None:
    """The masking client validates its own update against the spec announced with the
    first request and refuses (an error reply) before sending any key; the server drops it
    and sums the others exactly."""
    updates = {c: dict(u) for c, u in UPDATES.items()}
    a = updates["c2"]["a"].copy()
    if bad == "nan":
        a[1, 1] = np.nan
        updates["c2"]["a"] = a
    elif bad == "inf":
        a[0, 3] = -np.inf
        updates["c2"]["a"] = a
    elif bad == "shape":
        updates["c2"]["a"] = a.reshape(4, 3)
    else:
        updates["c2"]["z"] = updates["c2"].pop("a")
    aggregator = get_aggregator("masking", **OPTIONS)
    r = rng(3)
    session = r.bytes(16)
    clients = {c: aggregator.client(c, updates[c], rng=r, session=session, round_=0)
               for c in IDS}
    server = aggregator.server(IDS, TensorSpec.of(UPDATES["c0"]), rng=r, session=session)
    result = drive(server, InProcessChannel(clients))
    reason = refused(result, "c2", "advertise_keys", "UpdateValidationError")
    assert "client refused" in reason
    assert_exact(result, updates)


def test_secure_sum_refuses_non_finite_updates_before_sending_anything() -> None:
    sent: list[str] = []
    bad = {**UPDATES, "c4": {"a": UPDATES["c4"]["a"] * np.inf, "b": UPDATES["c4"]["b"]}}
    with pytest.raises(UpdateValidationError, match="client c4"):
        secure_sum(bad, observers=(lambda s, c, d, b: sent.append(s),))
    assert sent == []


@pytest.mark.parametrize("edit", ["nan", "inf", "short", "long_length_field"])
def test_plaintext_server_refuses_bad_inputs(edit: str) -> None:
    def tamper(data: bytes) -> bytes:
        env = decode(data)
        vec = np.frombuffer(env.body, dtype="<f8").copy()
        if edit == "nan":
            vec[3] = np.nan
        elif edit == "inf":
            vec[0] = np.inf
        elif edit == "short":
            vec = vec[:-1]
        else:
            env.fields["length"] = vec.size + 1
        env.body = vec.astype("<f8").tobytes()
        return env.encode()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = secure_sum(UPDATES, protocol="plaintext",
                            faults=reply_edit(tamper, "c1", "input"))
    assert "WireFormatError" in result.stats["rejected"]["c1"]
    assert result.dropped == {"c1": "input"}
    assert_exact(result)


def test_masked_vector_of_the_wrong_length_is_refused() -> None:
    def shorten(data: bytes) -> bytes:
        env = decode(data)
        env.body = bytes(env.body)[:-4]
        return env.encode(mac_key=bytes(32))

    result = run(reply_edit(shorten))
    assert "elements" in refused(result, "c1", "masked_input", "WireFormatError")
    assert_exact(result)


def test_masked_vector_outside_the_ring_is_refused() -> None:
    """With a 40-bit ring in 64-bit words, a word >= 2^40 cannot come from an honest client."""
    def overflow(data: bytes) -> bytes:
        env = decode(data)
        body = bytearray(env.body)
        body[7] = 0xFF  # the high byte of the first little-endian 64-bit element
        env.body = bytes(body)
        return env.encode(mac_key=bytes(32))

    result = run(reply_edit(overflow, "c4"), ring_bits=40)
    assert "outside the ring" in refused(result, "c4", "masked_input", "WireFormatError")
    assert_exact(result)


# --- the adapter gate --------------------------------------------------------------------
SPEC = {"layer.lora_A": (2, 4), "layer.lora_B": (4, 2)}


def adapter(**changes: Any) -> dict[str, Any]:
    state: dict[str, Any] = {n: torch.full(s, 0.5) for n, s in SPEC.items()}
    state.update(changes)
    return state


@pytest.mark.parametrize("state,match", [
    (adapter(**{"layer.lora_A": torch.tensor([[float("nan")] * 4] * 2)}), "NaN or infinite"),
    (adapter(**{"layer.lora_B": torch.full((4, 2), float("inf"))}), "NaN or infinite"),
    (adapter(**{"layer.lora_A": torch.zeros(4, 2)}), "shape"),
    (adapter(**{"layer.lora_A": torch.zeros(2, 4, dtype=torch.float64)}), "dtype"),
    (adapter(**{"layer.lora_A": torch.zeros(2, 4, dtype=torch.bfloat16)}), "bfloat16"),
    (adapter(**{"layer.lora_A": torch.zeros(2, 4).to_sparse()}), "dense"),
    (adapter(**{"layer.lora_A": [[0.0] * 4] * 2}), "not a tensor"),
    (adapter(extra=torch.zeros(1)), "unexpected"),
    ({"layer.lora_A": torch.zeros(2, 4)}, "missing"),
    ([("layer.lora_A", torch.zeros(2, 4))], "mapping"),
    ({**adapter(), 7: torch.zeros(1)}, "names"),
    (adapter(**{"layer.lora_A": np.zeros((2, 4), dtype=np.float32)}) | {"x" * 600: 0}, "names"),
])
def test_validate_adapter_refuses(state: Any, match: str) -> None:
    with pytest.raises(UpdateValidationError, match=match):
        validate_adapter(state, SPEC)


def test_validate_adapter_accepts_and_bounds_the_norm() -> None:
    state = adapter()
    norm = validate_adapter(state, SPEC)
    assert norm == pytest.approx(0.5 * 16 ** 0.5)
    as_numpy = {n: t.numpy() for n, t in state.items()}
    assert validate_adapter(as_numpy, TensorSpec.of(as_numpy)) == pytest.approx(norm)
    validate_adapter(state, SPEC, max_norm=norm)
    with pytest.raises(UpdateValidationError, match="exceeds the bound"):
        validate_adapter(state, SPEC, max_norm=norm * 0.99)
    with pytest.raises(UpdateValidationError, match="max_norm"):
        validate_adapter(state, SPEC, max_norm=float("nan"))
    assert adapter_spec(state) == SPEC


def test_screen_updates_keeps_the_valid_and_names_the_refused() -> None:
    updates = {"a": adapter(), "b": adapter(**{"layer.lora_A": torch.full((2, 4), np.nan)}),
               "c": adapter(**{"layer.lora_B": torch.full((4, 2), 100.0)})}
    kept, refused_ = screen_updates(updates, SPEC, max_norm=10.0)
    assert list(kept) == ["a"] and kept["a"] is updates["a"]
    assert set(refused_) == {"b", "c"}
    assert all(r.startswith("UpdateValidationError") for r in refused_.values())


# --- a co-tuning round with a bad client update -----------------------------------------
@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from fedcollm_secure.cotuning.models import save_tiny_model

    root = tmp_path_factory.mktemp("bad_input")
    return (save_tiny_model(root / "llm", "llama", seed=3, hidden=32, layers=1),
            save_tiny_model(root / "slm", "llama", seed=4, hidden=32, layers=1))


@pytest.mark.usefixtures("one_torch_thread")
def test_a_client_with_a_non_finite_delta_is_refused_and_audited(
        tiny_dirs: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One client's training diverges (NaN delta): the engine refuses that update, the round
    aggregates the other two, and the audit log written next to the report records the
    refusal, the round, and the SHA-256 of the adapters written."""
    from fedcollm_secure.audit import AuditLog, verify_log
    from fedcollm_secure.cotuning import engine as engine_mod
    from fedcollm_secure.cotuning.engine import FedCoLLM, FedCoLLMConfig
    from fedcollm_secure.cotuning.report import write_report

    real_update = engine_mod.client_update

    def diverging(model: Any, tok: Any, state: Any, features: Any, *args: Any,
                  **kwargs: Any) -> Any:
        delta, result = real_update(model, tok, state, features, *args, **kwargs)
        if features is run.client_features[1]:
            delta = {n: torch.full_like(v, float("nan")) for n, v in delta.items()}
        return delta, result

    config = FedCoLLMConfig.from_dict({
        "llm": {"source": str(tiny_dirs[0])}, "slm": {"source": str(tiny_dirs[1])},
        "lora": {"r": 2, "alpha": 4, "dropout": 0.0}, "rounds": 1, "n_clients": 3,
        "mode": "fedavg", "train": {"batch_size": 8, "max_steps": 1},
        "data": {"limit": 24, "eval_limit": 0, "max_length": 32},
        "partition": {"scheme": "iid"}, "max_update_norm": 1e3})
    run = FedCoLLM(config)
    monkeypatch.setattr(engine_mod, "client_update", diverging)
    out = tmp_path / "report"
    with pytest.warns(UserWarning, match="updates refused"):
        with AuditLog(out / "audit.jsonl", fsync=False) as log:
            history = run.run(audit=log)
            files = write_report(out, config, history, slm_state=run.slm_state(), audit=log)
    (h,) = history
    assert h["survivors"] == ["client-0", "client-2"]
    assert "NaN" in h["refused_updates"]["client-1"]
    assert all(bool(torch.isfinite(v).all()) for v in run.global_state.values())
    summary = verify_log(out / "audit.jsonl")
    (audit_run,) = summary.runs
    assert audit_run.what == "fedcollm" and audit_run.rounds == [1]
    assert audit_run.participants == {"client-0", "client-2"}
    records = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    notes = {r["payload"]["event"]: r["payload"] for r in records if r["kind"] == "note"}
    assert "client-1" in notes["updates_refused"]["refused"]
    artifacts = {r["payload"]["role"]: r["payload"] for r in records if r["kind"] == "artifact"}
    import hashlib

    assert artifacts["slm_adapter"]["sha256"] == hashlib.sha256(
        files["slm_adapter"].read_bytes()).hexdigest()
    assert {"json", "markdown"} <= set(artifacts)


def test_struct_layout_of_the_prefix() -> None:
    """The size checks above rely on this layout (magic, version, flags, 4+8 length bytes)."""
    assert PREFIX.size == 17 and struct.calcsize(">3sBBIQ") == 17
