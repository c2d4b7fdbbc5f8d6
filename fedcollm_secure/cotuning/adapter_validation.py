"""Validation of adapters and adapter updates received from another party.

:func:`validate_adapter` is the one gate every received adapter state (or delta) passes
before it touches a model or an aggregate: a mapping of exactly the expected names, dense
CPU tensors (torch or numpy) of the expected dtype and shape, within size limits, with
finite values, and (optionally) a bounded global L2 norm. Anything else raises
:class:`~fedcollm_secure.errors.UpdateValidationError` naming the tensor and the rule.
Adapters travel as safetensors only (:func:`.lora.load_adapter`), never pickle.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import UpdateValidationError
from ..secagg.tensors import TensorSpec

__all__ = ["MAX_ADAPTER_ELEMENTS", "MAX_ADAPTER_TENSORS", "adapter_spec", "screen_updates",
           "validate_adapter"]

MAX_ADAPTER_TENSORS = 100_000
MAX_ADAPTER_ELEMENTS = 1 << 31
MAX_NAME_LENGTH = 512

AdapterSpec = Mapping[str, Sequence[int]] | TensorSpec


def adapter_spec(state: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Name -> shape of a (trusted) state, e.g. the global adapter a round starts from."""
    return {str(name): tuple(int(d) for d in value.shape) for name, value in state.items()}


def _as_numpy(name: str, value: Any, what: str) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach") and hasattr(value, "layout"):  # torch.Tensor
        import torch

        if value.layout != torch.strided:
            raise UpdateValidationError(f"{what}: {name} is not a dense tensor")
        if value.device.type != "cpu":
            raise UpdateValidationError(f"{what}: {name} is on {value.device}, expected cpu")
        if value.dtype == torch.bfloat16:
            raise UpdateValidationError(f"{what}: {name} has dtype bfloat16, expected float32")
        return np.asarray(value.detach().numpy())
    raise UpdateValidationError(f"{what}: {name} is a {type(value).__name__}, not a tensor")


def validate_adapter(state: Any, expected_spec: AdapterSpec, *, max_norm: float | None = None,
                     dtype: str = "float32", what: str = "adapter") -> float:
    """Check a received adapter state or delta; return its global L2 norm.

    ``expected_spec``: name -> shape (or a :class:`TensorSpec`) of what may arrive;
    ``dtype``: the one dtype every tensor must have; ``max_norm``: bound on the L2 norm over
    all tensors together. Raises :class:`UpdateValidationError` on the first violation.
    """
    if max_norm is not None and not (math.isfinite(max_norm) and max_norm > 0):
        raise UpdateValidationError(f"{what}: max_norm must be a finite positive number")
    expected = (dict(expected_spec.entries) if isinstance(expected_spec, TensorSpec)
                else {str(n): tuple(int(d) for d in s) for n, s in expected_spec.items()})
    if not isinstance(state, Mapping):
        raise UpdateValidationError(f"{what}: expected a mapping of tensors, got "
                                    f"{type(state).__name__}")
    if len(state) > MAX_ADAPTER_TENSORS:
        raise UpdateValidationError(f"{what}: {len(state)} tensors exceed the limit of "
                                    f"{MAX_ADAPTER_TENSORS}")
    for name in state:
        if not isinstance(name, str) or not name or len(name) > MAX_NAME_LENGTH:
            raise UpdateValidationError(f"{what}: tensor names must be strings of 1 to "
                                        f"{MAX_NAME_LENGTH} characters: {str(name)[:80]!r}")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UpdateValidationError(
            f"{what}: names differ from the expected adapter: {len(missing)} missing "
            f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}")
    total = sum(math.prod(shape) for shape in expected.values())
    if total > MAX_ADAPTER_ELEMENTS:
        raise UpdateValidationError(f"{what}: {total} elements exceed {MAX_ADAPTER_ELEMENTS}")
    want = np.dtype(dtype)
    squares = 0.0
    for name in sorted(expected):
        arr = _as_numpy(name, state[name], what)
        if arr.dtype != want:
            raise UpdateValidationError(f"{what}: {name} has dtype {arr.dtype}, expected {want}")
        if tuple(arr.shape) != expected[name]:
            raise UpdateValidationError(f"{what}: {name} has shape {tuple(arr.shape)}, "
                                        f"expected {expected[name]}")
        if not np.isfinite(arr).all():
            raise UpdateValidationError(f"{what}: {name} holds NaN or infinite values")
        flat = arr.reshape(-1).astype(np.float64, copy=False)
        squares += float(np.dot(flat, flat))
    norm = math.sqrt(squares)
    if max_norm is not None and not norm <= max_norm:
        raise UpdateValidationError(f"{what}: L2 norm {norm:.6g} exceeds the bound {max_norm}")
    return norm


def screen_updates(updates: Mapping[str, Any], expected_spec: AdapterSpec, *,
                   max_norm: float | None = None, dtype: str = "float32",
                   ) -> tuple[dict[str, Any], dict[str, str]]:
    """Split ``updates`` (client id -> state) into the valid ones and the refused ones
    (client id -> the typed error's message), so that one bad update cannot stop a round."""
    accepted: dict[str, Any] = {}
    refused: dict[str, str] = {}
    for cid, state in updates.items():
        try:
            validate_adapter(state, expected_spec, max_norm=max_norm, dtype=dtype,
                             what=f"update of {cid}")
        except UpdateValidationError as exc:
            refused[cid] = f"UpdateValidationError: {exc}"
            continue
        accepted[cid] = state
    return accepted, refused
