"""LoRA adapters (peft) and adapter state as named float32 tensors.

The adapter state is what FedCoLLM moves around: the SLM adapter theta is broadcast, each
client returns ``delta_k = theta_k - theta_t``, the aggregator sums the deltas. Here it is a
plain ``dict[str, torch.Tensor]`` of float32 CPU tensors with stable names (peft's own naming,
``base_model.model.<module>.lora_A.weight``, without the adapter name), saved and loaded as
safetensors only. Every state that comes from outside is validated (exact names, shapes,
dtype, finite values, size) before it touches a model.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import ConfigBase, require
from ..errors import ConfigError, UpdateValidationError

__all__ = [
    "ADAPTER_FORMAT",
    "ADAPTER_VERSION",
    "ATTENTION_TARGETS",
    "LoraSettings",
    "adapter_delta",
    "adapter_parameters",
    "adapter_shapes",
    "adapter_state",
    "apply_delta",
    "attach_lora",
    "detect_target_modules",
    "load_adapter",
    "load_adapter_state",
    "save_adapter",
    "validate_state",
]

ADAPTER_FORMAT = "fedcollm_secure.lora-adapter"
ADAPTER_VERSION = "1"
_RESERVED_PREFIX = "fedcollm_secure."
_META_FORMAT = "fedcollm_secure.format"
_META_VERSION = "fedcollm_secure.version"
DEFAULT_MAX_ADAPTER_BYTES = 512 * 1024 * 1024

_QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")

#: Attention projections per ``config.model_type``. Entries are peft suffixes: a module
#: matches when its qualified name ends with ``.<entry>``, so ``attn.c_proj`` picks GPT-2's
#: attention output projection and not ``mlp.c_proj``.
ATTENTION_TARGETS: dict[str, tuple[str, ...]] = {
    **{name: _QKVO for name in (
        "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma",
        "gemma2", "gemma3", "gemma3_text", "smollm3", "olmo", "olmo2", "granite", "cohere",
        "starcoder2", "stablelm", "phi")},
    "gpt2": ("attn.c_attn", "attn.c_proj"),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "gpt_neox": ("query_key_value", "attention.dense"),
    "phi3": ("qkv_proj", "o_proj"),
    "falcon": ("query_key_value", "self_attention.dense"),
    "bloom": ("query_key_value", "self_attention.dense"),
}


@dataclasses.dataclass(frozen=True)
class LoraSettings(ConfigBase):
    """LoRA hyper-parameters (FedCoLLM defaults: r=8, alpha=16, dropout 0.05).

    ``target_modules`` ``None`` means every attention projection of the architecture
    (:func:`detect_target_modules`); otherwise peft suffixes such as ``["q_proj", "v_proj"]``.
    """

    section: ClassVar[str] = "lora"

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] | None = None

    def validate(self) -> None:
        require(self.r >= 1, "lora.r must be at least 1")
        require(self.alpha > 0, "lora.alpha must be positive")
        require(math.isfinite(self.dropout) and 0.0 <= self.dropout < 1.0,
                "lora.dropout must be in [0, 1)")
        if self.target_modules is not None:
            require(len(self.target_modules) > 0, "lora.target_modules must not be empty")
            for name in self.target_modules:
                require(bool(re.fullmatch(r"[A-Za-z0-9_.]+", name)),
                        f"lora.target_modules: {name!r} is not a module name suffix")

    @property
    def scaling(self) -> float:
        """``alpha / r``, the factor peft applies to ``B @ A``."""
        return self.alpha / self.r


# --------------------------------------------------------------------------------------------
# attaching adapters
# --------------------------------------------------------------------------------------------
def _is_projection(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return type(module).__name__ == "Conv1D"  # transformers' GPT-2 style linear layer


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith(f".{target}")


def detect_target_modules(model: nn.Module) -> tuple[str, ...]:
    """The attention projections of ``model`` as peft target suffixes.

    Known architectures use :data:`ATTENTION_TARGETS`; otherwise every linear layer inside a
    module whose name contains ``attn``/``attention`` is taken (named from that component on).
    Raises :class:`ConfigError` if nothing matches.
    """
    projections = [name for name, mod in model.named_modules() if _is_projection(mod)]
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    known = ATTENTION_TARGETS.get(str(model_type))
    if known is not None and all(any(_matches(n, t) for n in projections) for t in known):
        return known
    found: set[str] = set()
    for name in projections:
        parts = name.split(".")
        attn = [i for i, part in enumerate(parts[:-1]) if "attn" in part or "attention" in part]
        if attn:
            found.add(".".join(parts[attn[-1]:]))
    if not found:
        raise ConfigError(f"no attention projections found in {type(model).__name__} "
                          f"(model_type {model_type!r}); set lora.target_modules")
    return tuple(sorted(found))


def attach_lora(model: Any, settings: LoraSettings | None = None) -> Any:
    """Wrap ``model`` in a peft ``PeftModel`` with a LoRA adapter named ``default``.

    peft injects the LoRA layers into ``model`` in place (keep using the returned wrapper).
    Base weights are frozen; only LoRA parameters are trainable. ``lora_B`` starts at zero, so
    the wrapped model computes exactly what ``model`` did.
    """
    from peft import LoraConfig, TaskType, get_peft_model

    settings = settings or LoraSettings()
    if hasattr(model, "peft_config") or any(".lora_" in n for n, _ in model.named_parameters()):
        raise ConfigError("model already has adapters; attach_lora needs a plain model")
    targets = settings.target_modules or detect_target_modules(model)
    matched = {t: [n for n, mod in model.named_modules() if _matches(n, t) and
                   _is_projection(mod)] for t in targets}
    missing = sorted(t for t, names in matched.items() if not names)
    if missing:
        raise ConfigError(f"lora.target_modules {missing} match no linear layer of "
                          f"{type(model).__name__}")
    conv1d = any(type(model.get_submodule(n)).__name__ == "Conv1D"
                 for names in matched.values() for n in names)
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(targets), bias="none",
                        task_type=TaskType.CAUSAL_LM, fan_in_fan_out=conv1d)
    return get_peft_model(model, config)


# --------------------------------------------------------------------------------------------
# adapter state
# --------------------------------------------------------------------------------------------
def adapter_parameters(peft_model: Any) -> dict[str, nn.Parameter]:
    """The active adapter's LoRA parameters by stable name (the live tensors, not copies)."""
    adapter = getattr(peft_model, "active_adapter", None)
    if not isinstance(adapter, str) or not hasattr(peft_model, "peft_config"):
        raise ConfigError("expected a peft model with one active adapter (see attach_lora)")
    segment = re.compile(rf"\.(lora_[A-Za-z_]+)\.{re.escape(adapter)}(?=\.|$)")
    out: dict[str, nn.Parameter] = {}
    for name, param in peft_model.named_parameters():
        if ".lora_" not in name:
            continue
        stable, n = segment.subn(r".\1", name)
        if n == 1:
            out[stable] = param
    if not out:
        raise ConfigError(f"the peft model has no LoRA parameters for adapter {adapter!r}")
    return out


def adapter_shapes(peft_model: Any) -> dict[str, tuple[int, ...]]:
    """Stable name -> shape of every LoRA parameter (the schema of an adapter state)."""
    return {name: tuple(p.shape) for name, p in adapter_parameters(peft_model).items()}


def adapter_state(peft_model: Any) -> dict[str, torch.Tensor]:
    """Float32 CPU copies of the active adapter's LoRA parameters, by stable name."""
    return {name: p.detach().to(device="cpu", dtype=torch.float32, copy=True).contiguous()
            for name, p in sorted(adapter_parameters(peft_model).items())}


def validate_state(state: Any, expected: Mapping[str, tuple[int, ...]] | None = None, *,
                   what: str = "adapter state") -> None:
    """Raise :class:`UpdateValidationError` unless ``state`` is a clean adapter state.

    A clean state maps ``str`` names to float32 CPU tensors with finite values; with
    ``expected`` its names must be exactly those and shapes must match.
    """
    if not isinstance(state, Mapping):
        raise UpdateValidationError(f"{what}: expected a mapping, got {type(state).__name__}")
    for name, value in state.items():
        if not isinstance(name, str) or not name:
            raise UpdateValidationError(f"{what}: names must be non-empty strings: {name!r}")
        if not isinstance(value, torch.Tensor):
            raise UpdateValidationError(f"{what}: {name} is a {type(value).__name__}, "
                                        "not a tensor")
    if expected is not None:
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise UpdateValidationError(
                f"{what}: names differ from the adapter's: {len(missing)} missing "
                f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}")
    for name, value in state.items():
        if value.layout != torch.strided:
            raise UpdateValidationError(f"{what}: {name} is not a dense tensor")
        if value.dtype != torch.float32:
            raise UpdateValidationError(f"{what}: {name} has dtype {value.dtype}, "
                                        "expected torch.float32")
        if value.device.type != "cpu":
            raise UpdateValidationError(f"{what}: {name} is on {value.device}, expected cpu")
        if expected is not None and tuple(value.shape) != tuple(expected[name]):
            raise UpdateValidationError(f"{what}: {name} has shape {tuple(value.shape)}, "
                                        f"expected {tuple(expected[name])}")
        if not bool(torch.isfinite(value).all()):
            raise UpdateValidationError(f"{what}: {name} holds non-finite values")


def load_adapter_state(peft_model: Any, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into the active adapter, after validating all of it.

    Nothing is written unless the whole state passes :func:`validate_state` against the
    adapter's own names and shapes.
    """
    params = adapter_parameters(peft_model)
    validate_state(state, {n: tuple(p.shape) for n, p in params.items()})
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name].to(device=param.device, dtype=param.dtype))


def _check_pair(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
                what: str) -> None:
    validate_state(a, what=f"{what} (first)")
    validate_state(b, {n: tuple(t.shape) for n, t in a.items()}, what=f"{what} (second)")


def adapter_delta(new: Mapping[str, torch.Tensor],
                  old: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``new - old`` per tensor (float32; names and shapes must agree)."""
    _check_pair(new, old, "adapter_delta")
    return {name: new[name] - old[name] for name in sorted(new)}


def apply_delta(state: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor],
                scale: float = 1.0) -> dict[str, torch.Tensor]:
    """``state + scale * delta`` per tensor, as a new state (inputs are not modified)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise UpdateValidationError(f"apply_delta: scale must be a finite number, got {scale!r}")
    _check_pair(state, delta, "apply_delta")
    if scale == 1.0:
        return {name: state[name] + delta[name] for name in sorted(state)}
    return {name: torch.add(state[name], delta[name], alpha=float(scale))
            for name in sorted(state)}


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------
def save_adapter(path: str | os.PathLike[str], state: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``state`` as a safetensors file with string ``metadata`` in its header.

    The header also carries the format marker and version (keys under ``fedcollm_secure.``,
    reserved). Written to a temporary file and renamed into place.
    """
    from safetensors.torch import save_file

    validate_state(state)
    header = {_META_FORMAT: ADAPTER_FORMAT, _META_VERSION: ADAPTER_VERSION}
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ConfigError(f"adapter metadata must map str to str: {key!r}: {value!r}")
        if key.startswith(_RESERVED_PREFIX):
            raise ConfigError(f"adapter metadata key {key!r} uses the reserved prefix "
                              f"{_RESERVED_PREFIX!r}")
        header[key] = value
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({n: t.contiguous() for n, t in state.items()}, tmp, metadata=header)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def load_adapter(path: str | os.PathLike[str], *,
                 expected: Mapping[str, tuple[int, ...]] | None = None,
                 max_bytes: int = DEFAULT_MAX_ADAPTER_BYTES,
                 ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read an adapter file written by :func:`save_adapter`: ``(state, metadata)``.

    Refuses files over ``max_bytes``, without the format marker or of another version, and
    states that fail :func:`validate_state` (against ``expected`` names/shapes if given, e.g.
    :func:`adapter_shapes` of the receiving model). Returns the caller's metadata only.
    """
    from safetensors import safe_open

    file = Path(path)
    size = file.stat().st_size
    if size > max_bytes:
        raise UpdateValidationError(f"{file}: {size} bytes exceeds the limit of {max_bytes}")
    try:
        with safe_open(str(file), framework="pt", device="cpu") as fh:
            header = dict(fh.metadata() or {})
            if header.get(_META_FORMAT) != ADAPTER_FORMAT:
                raise UpdateValidationError(f"{file}: not a fedcollm_secure adapter file")
            if header.get(_META_VERSION) != ADAPTER_VERSION:
                raise UpdateValidationError(
                    f"{file}: adapter format version {header.get(_META_VERSION)!r}, "
                    f"expected {ADAPTER_VERSION!r}")
            state = {name: fh.get_tensor(name) for name in sorted(fh.keys())}
    except UpdateValidationError:
        raise
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise UpdateValidationError(f"{file}: unreadable safetensors file: {exc}") from exc
    validate_state(state, expected, what=str(file))
    metadata = {k: v for k, v in header.items() if not k.startswith(_RESERVED_PREFIX)}
    return state, metadata

