"""Named-tensor updates: a spec both sides agree on, validation, flatten/unflatten."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import UpdateValidationError, WireFormatError

Update = Mapping[str, Any]  # name -> numpy array or torch tensor
MAX_TENSORS = 100_000
MAX_ELEMENTS = 1 << 31


def to_numpy(value: Any) -> np.ndarray:
    """A float64 numpy view/copy of a numpy array or torch tensor (no torch import needed)."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    arr = np.asarray(value)
    if arr.dtype.kind not in "fiu":
        raise UpdateValidationError(f"unsupported dtype {arr.dtype}; expected a real number type")
    return arr


@dataclass(frozen=True)
class TensorSpec:
    """Ordered names and shapes of the tensors in an update."""

    entries: tuple[tuple[str, tuple[int, ...]], ...]

    @classmethod
    def of(cls, update: Update) -> TensorSpec:
        if not update:
            raise UpdateValidationError("an update must contain at least one tensor")
        return cls(tuple((name, tuple(int(d) for d in to_numpy(update[name]).shape))
                         for name in sorted(update)))

    @property
    def size(self) -> int:
        return sum(math.prod(shape) for _, shape in self.entries)

    def to_json(self) -> list[list[Any]]:
        return [[name, list(shape)] for name, shape in self.entries]

    @classmethod
    def from_json(cls, value: Any) -> TensorSpec:
        if not isinstance(value, list) or not 0 < len(value) <= MAX_TENSORS:
            raise WireFormatError("tensor spec must be a non-empty list")
        entries = []
        for item in value:
            if (not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str)
                    or not isinstance(item[1], list) or len(item[1]) > 8
                    or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40
                               for d in item[1])):
                raise WireFormatError("tensor spec entries must be [name, [dims...]]")
            entries.append((item[0], tuple(item[1])))
        names = [n for n, _ in entries]
        if names != sorted(set(names)):
            raise WireFormatError("tensor spec names must be unique and sorted")
        spec = cls(tuple(entries))
        if spec.size > MAX_ELEMENTS:
            raise WireFormatError("tensor spec exceeds the element limit")
        return spec

    def flatten(self, update: Update, *, who: str = "update",
                keep_float32: bool = False) -> np.ndarray:
        """Validate ``update`` against the spec (names, shapes, finiteness); a float64 vector,
        or float32 when ``keep_float32`` and every tensor is float32 (values unchanged)."""
        parts = self.flat_parts(update, who=who, keep_float32=keep_float32)
        return np.concatenate(parts) if parts else np.zeros(0)

    def flat_parts(self, update: Update, *, who: str = "update",
                   keep_float32: bool = False) -> list[np.ndarray]:
        """:meth:`flatten` without the concatenation: validated 1-D views, in spec order."""
        names = set(update)
        expected = {n for n, _ in self.entries}
        if names != expected:
            raise UpdateValidationError(
                f"{who}: tensor names differ from the spec (missing {sorted(expected - names)}, "
                f"unexpected {sorted(names - expected)})")
        arrays = [to_numpy(update[name]) for name, _ in self.entries]
        dtype = np.float32 if keep_float32 and all(a.dtype == np.float32 for a in arrays) \
            else np.float64
        parts = []
        for (name, shape), arr in zip(self.entries, arrays, strict=True):
            if tuple(arr.shape) != shape:
                raise UpdateValidationError(
                    f"{who}: {name} has shape {arr.shape}, expected {shape}")
            flat = arr.astype(dtype, copy=False).reshape(-1)
            if not np.isfinite(flat).all():
                raise UpdateValidationError(f"{who}: {name} contains NaN or infinite values")
            parts.append(flat)
        return parts

    def unflatten(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        out, offset = {}, 0
        for name, shape in self.entries:
            n = math.prod(shape)
            out[name] = np.asarray(vector[offset:offset + n]).reshape(shape)
            offset += n
        return out
