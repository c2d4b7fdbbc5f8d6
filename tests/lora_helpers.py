"""Helpers shared by the LoRA training tests (plain and DP-SGD): a tiny llama with LoRA, and
its mean answer loss over a fixed batching."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fedcollm_secure.cotuning.data import CausalLMCollator
from fedcollm_secure.cotuning.lora import LoraSettings, attach_lora
from fedcollm_secure.cotuning.models import load_model, save_tiny_model
from fedcollm_secure.cotuning.trainer import answer_loss, batches


def save_tiny_llama(root: Path) -> Path:
    return save_tiny_model(root / "llama", "llama", seed=3, hidden=48, layers=2)


def peft_tiny(tiny_dir: Path) -> tuple[Any, Any]:
    model, tok = load_model(str(tiny_dir))
    return attach_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0)), tok


def mean_answer_loss(model: Any, features: list[Any], tok: Any) -> float:
    collate = CausalLMCollator(tok.pad_token_id)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        losses = [float(answer_loss(model, b)) for b in batches(features, 16, collate, gen)]
    return sum(losses) / len(losses)
