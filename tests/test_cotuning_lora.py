"""LoRA adapters: target detection, trainable set, adapter state, validation, files, deltas."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from fedcollm_secure.cotuning.lora import (
    LoraSettings,
    adapter_delta,
    adapter_shapes,
    adapter_state,
    apply_delta,
    attach_lora,
    detect_target_modules,
    load_adapter,
    load_adapter_state,
    save_adapter,
)
from fedcollm_secure.cotuning.models import load_model, save_tiny_model, tiny_tokenizer
from fedcollm_secure.errors import ConfigError, UpdateValidationError


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok() -> Any:
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, tok: Any) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_lora")
    return {arch: save_tiny_model(root / arch, arch, seed=i, tokenizer=tok, layers=2)
            for i, arch in enumerate(("llama", "gemma3", "gpt2"))}


def lora_model(saved: dict[str, Path], arch: str = "llama", **settings: Any) -> Any:
    model, _ = load_model(str(saved[arch]))
    return attach_lora(model, LoraSettings(**settings))


def random_state(peft_model: Any, seed: int = 0, scale: float = 0.1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=gen) * scale for n, s in adapter_shapes(peft_model).items()}


def wrapped_modules(peft_model: Any) -> set[str]:
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {n[len(prefix):] for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


# --------------------------------------------------------------------------------------------
# settings and attaching
# --------------------------------------------------------------------------------------------
def test_settings_defaults_and_validation() -> None:
    s = LoraSettings()
    assert (s.r, s.alpha, s.dropout, s.target_modules, s.scaling) == (8, 16, 0.05, None, 2.0)
    assert LoraSettings.from_dict(s.to_dict()) == s
    custom = LoraSettings.from_dict({"r": 4, "target_modules": ["q_proj", "v_proj"]})
    assert custom.target_modules == ("q_proj", "v_proj")
    bad: dict[str, Any]
    for bad in ({"r": 0}, {"alpha": 0}, {"alpha": 16.5}, {"dropout": 1.0}, {"dropout": -0.1},
                {"dropout": float("nan")}, {"target_modules": []},
                {"target_modules": ["q_proj", "x;y"]}, {"rank": 8}):
        with pytest.raises(ConfigError):
            LoraSettings.from_dict(bad)


@pytest.mark.parametrize(("arch", "expected"), [
    ("llama", {f"model.layers.{i}.self_attn.{p}" for i in range(2)
               for p in ("q_proj", "k_proj", "v_proj", "o_proj")}),
    ("gemma3", {f"model.layers.{i}.self_attn.{p}" for i in range(2)
                for p in ("q_proj", "k_proj", "v_proj", "o_proj")}),
    ("gpt2", {f"transformer.h.{i}.attn.{p}" for i in range(2) for p in ("c_attn", "c_proj")}),
])
def test_lora_goes_on_the_attention_projections(saved: dict[str, Path], arch: str,
                                                expected: set[str]) -> None:
    peft_model = lora_model(saved, arch)
    assert wrapped_modules(peft_model) == expected  # gpt2: not mlp.c_proj
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * len(expected)
    frozen = [n for n, p in peft_model.named_parameters() if not p.requires_grad]
    assert not any(".lora_" in n for n in frozen)
    cfg = peft_model.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (8, 16, 0.05)


def test_fallback_detection_and_explicit_targets(saved: dict[str, Path]) -> None:
    model, _ = load_model(str(saved["llama"]))
    model.config.model_type = "unknown-arch"  # not in the table: scan attention modules
    assert detect_target_modules(model) == ("self_attn.k_proj", "self_attn.o_proj",
                                            "self_attn.q_proj", "self_attn.v_proj")
    peft_model = attach_lora(model, LoraSettings(r=4, target_modules=("q_proj", "v_proj")))
    assert wrapped_modules(peft_model) == {f"model.layers.{i}.self_attn.{p}"
                                           for i in range(2) for p in ("q_proj", "v_proj")}
    shapes = adapter_shapes(peft_model)
    assert shapes["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] == (4, 32)
    assert shapes["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"] == (16, 4)
    with pytest.raises(ConfigError, match="already has adapters"):
        attach_lora(peft_model, LoraSettings())
    other, _ = load_model(str(saved["llama"]))
    with pytest.raises(ConfigError, match="match no linear layer"):
        attach_lora(other, LoraSettings(target_modules=("q_proj", "c_attn")))


def test_fresh_adapter_is_the_identity_and_training_touches_only_lora(
        saved: dict[str, Path], tok: Any) -> None:
    base, _ = load_model(str(saved["llama"]))
    enc = tok(["Convert 2 hours to minutes: 120 minutes"], return_tensors="pt")
    with torch.no_grad():
        before = base(**enc).logits.clone()
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    peft_model = attach_lora(base, LoraSettings(dropout=0.0))
    with torch.no_grad():
        assert torch.equal(peft_model(**enc).logits, before)  # lora_B starts at zero
    theta0 = adapter_state(peft_model)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        out = peft_model(**enc, labels=enc["input_ids"])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < losses[0]
    delta = adapter_delta(adapter_state(peft_model), theta0)
    assert all(d.abs().max() > 0 for d in delta.values())
    base_now = peft_model.get_base_model().state_dict()
    for k, v in frozen.items():  # LoRA wrapping renames base weights to *.base_layer.*
        k2 = k if k in base_now else k.replace(".weight", ".base_layer.weight")
        assert torch.equal(base_now[k2], v), k


# --------------------------------------------------------------------------------------------
# adapter state
# --------------------------------------------------------------------------------------------
def test_adapter_state_names_and_copies(saved: dict[str, Path]) -> None:
    from peft import get_peft_model_state_dict

    peft_model = lora_model(saved, "gemma3")
    state = adapter_state(peft_model)
    assert list(state) == sorted(get_peft_model_state_dict(peft_model))  # peft's own names
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in state.values())
    name = "base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight"
    state[name].add_(1.0)  # a copy: the model is unchanged
    assert not torch.equal(adapter_state(peft_model)[name], state[name])
    # a bfloat16 model still yields float32 state, and takes float32 state
    half, _ = load_model(str(saved["llama"]))
    half_peft = attach_lora(half.to(torch.bfloat16), LoraSettings(r=2))
    half_state = adapter_state(half_peft)
    assert all(t.dtype == torch.float32 for t in half_state.values())
    load_adapter_state(half_peft, random_state(half_peft))


def test_load_adapter_state_round_trip_changes_the_model(saved: dict[str, Path],
                                                        tok: Any) -> None:
    peft_model = lora_model(saved, "llama", dropout=0.0)
    enc = tok(["If it rains, the ground gets wet"], return_tensors="pt")
    with torch.no_grad():
        before = peft_model(**enc).logits
    state = random_state(peft_model, seed=1)
    load_adapter_state(peft_model, state)
    got = adapter_state(peft_model)
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)
    with torch.no_grad():
        assert (peft_model(**enc).logits - before).abs().max() > 1e-3


def test_load_adapter_state_refuses_bad_states_and_writes_nothing(
        saved: dict[str, Path]) -> None:
    peft_model = lora_model(saved, "llama")
    good = random_state(peft_model, seed=2)
    load_adapter_state(peft_model, good)
    names = sorted(good)
    first, last = names[0], names[-1]

    def variant(**changes: Any) -> dict[str, Any]:
        out: dict[str, Any] = dict(good)
        for k, v in changes.items():
            if v is None:
                del out[k]
            else:
                out[k] = v
        return out

    nan = good[last].clone()
    nan.view(-1)[3] = float("nan")
    inf = good[last].clone()
    inf.view(-1)[0] = float("-inf")
    poisoned_first = {first: torch.full_like(good[first], 7.0)}
    bad_states: list[tuple[Any, str]] = [
        ({**variant(**{last: None}), **poisoned_first}, "missing"),
        ({**good, **poisoned_first, "base_model.model.lm_head.weight": torch.zeros(2)},
         "unexpected"),
        ({**good, **poisoned_first, last: good[last].T.contiguous()}, "shape"),
        ({**good, **poisoned_first, last: good[last].reshape(-1)}, "shape"),
        ({**good, **poisoned_first, last: good[last].double()}, "dtype"),
        ({**good, **poisoned_first, last: good[last].half()}, "dtype"),
        ({**good, **poisoned_first, last: nan}, "non-finite"),
        ({**good, **poisoned_first, last: inf}, "non-finite"),
        ({**good, **poisoned_first, last: good[last].numpy()}, "not a tensor"),
        ({**good, **poisoned_first, last: good[last].to_sparse()}, "dense"),
        ([(k, v) for k, v in good.items()], "mapping"),
    ]
    for bad, message in bad_states:
        with pytest.raises(UpdateValidationError, match=message):
            load_adapter_state(peft_model, bad)
        now = adapter_state(peft_model)
        assert all(torch.equal(now[k], good[k]) for k in good)  # nothing written


# --------------------------------------------------------------------------------------------
# deltas
# --------------------------------------------------------------------------------------------
def test_delta_and_apply_are_exact(saved: dict[str, Path]) -> None:
    peft_model = lora_model(saved, "llama")
    old, new = random_state(peft_model, seed=3), random_state(peft_model, seed=4)
    delta = adapter_delta(new, old)
    assert delta.keys() == old.keys()
    assert all(torch.equal(delta[k], new[k] - old[k]) for k in old)
    # on a dyadic grid float32 arithmetic is exact: apply(old, new - old) == new bitwise
    grid_old = {k: torch.round(v * 1024) / 1024 for k, v in old.items()}
    grid_new = {k: torch.round(v * 1024) / 1024 for k, v in new.items()}
    back = apply_delta(grid_old, adapter_delta(grid_new, grid_old))
    assert all(torch.equal(back[k], grid_new[k]) for k in grid_new)
    # FedAvg-style: theta + sum(w_k delta_k) / sum(w_k)
    d1, d2 = adapter_delta(grid_new, grid_old), adapter_delta(grid_old, grid_new)
    total = apply_delta(d1, d2, scale=3.0)  # d1 + 3 d2 = -2 d1
    avg = apply_delta(grid_old, total, scale=0.25)  # old - d1 / 2
    assert all(torch.equal(avg[k], grid_old[k] - 0.5 * d1[k]) for k in old)
    # inputs untouched
    snapshot = {k: v.clone() for k, v in grid_old.items()}
    apply_delta(grid_old, d1, scale=2.0)
    assert all(torch.equal(grid_old[k], snapshot[k]) for k in old)


def test_delta_refuses_mismatches(saved: dict[str, Path]) -> None:
    peft_model = lora_model(saved, "gpt2")
    a, b = random_state(peft_model, seed=5), random_state(peft_model, seed=6)
    k = sorted(a)[0]
    with pytest.raises(UpdateValidationError, match="missing"):
        adapter_delta(a, {n: v for n, v in b.items() if n != k})
    with pytest.raises(UpdateValidationError, match="unexpected"):
        apply_delta(a, {**b, "extra": torch.zeros(1)})
    with pytest.raises(UpdateValidationError, match="shape"):
        apply_delta(a, {**b, k: torch.zeros(1)})
    with pytest.raises(UpdateValidationError, match="non-finite"):
        apply_delta(a, {**b, k: torch.full_like(b[k], float("nan"))})
    for scale in (float("nan"), float("inf"), True, "1"):
        with pytest.raises(UpdateValidationError, match="scale"):
            apply_delta(a, b, scale=scale)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------
def test_adapter_file_round_trip(saved: dict[str, Path], tmp_path: Path) -> None:
    peft_model = lora_model(saved, "gemma3")
    state = random_state(peft_model, seed=7)
    path = save_adapter(tmp_path / "out" / "slm.safetensors", state,
                        {"round": "3", "role": "slm"})
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert raw[8:9] == b"{" and b"fedcollm_secure.lora-adapter" in raw[8:8 + header_len]
    loaded, meta = load_adapter(path, expected=adapter_shapes(peft_model))
    assert meta == {"round": "3", "role": "slm"}
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    load_adapter_state(peft_model, loaded)
    assert not list(path.parent.glob(".*.tmp"))
    with pytest.raises(ConfigError, match="reserved"):
        save_adapter(tmp_path / "x.safetensors", state, {"fedcollm_secure.version": "9"})
    with pytest.raises(ConfigError, match="str to str"):
        save_adapter(tmp_path / "x.safetensors", state, {"round": 3})  # type: ignore[dict-item]
    with pytest.raises(UpdateValidationError, match="non-finite"):
        save_adapter(tmp_path / "x.safetensors",
                     {**state, "z": torch.tensor([float("inf")])})


def test_adapter_file_refusals(saved: dict[str, Path], tmp_path: Path) -> None:
    peft_model = lora_model(saved, "llama", r=2)
    state = random_state(peft_model, seed=8)
    good = save_adapter(tmp_path / "good.safetensors", state)
    with pytest.raises(UpdateValidationError, match="exceeds"):
        load_adapter(good, max_bytes=100)
    # no format marker / another version
    save_file(state, str(tmp_path / "plain.safetensors"))
    with pytest.raises(UpdateValidationError, match="not a fedcollm_secure adapter"):
        load_adapter(tmp_path / "plain.safetensors")
    save_file(state, str(tmp_path / "v2.safetensors"),
              metadata={"fedcollm_secure.format": "fedcollm_secure.lora-adapter",
                        "fedcollm_secure.version": "2"})
    with pytest.raises(UpdateValidationError, match="version"):
        load_adapter(tmp_path / "v2.safetensors")
    # corrupt bytes
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:-10])
    with pytest.raises(UpdateValidationError, match="unreadable"):
        load_adapter(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x80\x04\x95 pickle? no thanks")
    with pytest.raises(UpdateValidationError):
        load_adapter(tmp_path / "junk.safetensors")
    # non-finite or wrong dtype inside a well-formed file
    marker = {"fedcollm_secure.format": "fedcollm_secure.lora-adapter",
              "fedcollm_secure.version": "1"}
    k = sorted(state)[0]
    save_file({**state, k: torch.full_like(state[k], float("nan"))},
              str(tmp_path / "nan.safetensors"), metadata=marker)
    with pytest.raises(UpdateValidationError, match="non-finite"):
        load_adapter(tmp_path / "nan.safetensors")
    save_file({**state, k: state[k].double()}, str(tmp_path / "f64.safetensors"),
              metadata=marker)
    with pytest.raises(UpdateValidationError, match="dtype"):
        load_adapter(tmp_path / "f64.safetensors")
    # a file for another model
    other = lora_model(saved, "llama", r=4)
    with pytest.raises(UpdateValidationError, match="shape"):
        load_adapter(good, expected=adapter_shapes(other))
    gpt = lora_model(saved, "gpt2")
    with pytest.raises(UpdateValidationError, match="missing"):
        load_adapter(good, expected=adapter_shapes(gpt))
