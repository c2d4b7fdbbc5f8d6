"""FedCoLLM co-tuning: models, LoRA, data, distillation, training and evaluation."""

from .lora import (
    LoraSettings,
    adapter_delta,
    adapter_shapes,
    adapter_state,
    apply_delta,
    attach_lora,
    load_adapter,
    load_adapter_state,
    save_adapter,
)
from .models import (
    ModelSpec,
    check_same_tokenizer,
    derive_slm_by_pruning,
    load_model,
    logits_at,
)

__all__ = [
    "LoraSettings",
    "ModelSpec",
    "adapter_delta",
    "adapter_shapes",
    "adapter_state",
    "apply_delta",
    "attach_lora",
    "check_same_tokenizer",
    "derive_slm_by_pruning",
    "load_adapter",
    "load_adapter_state",
    "load_model",
    "logits_at",
    "save_adapter",
]
