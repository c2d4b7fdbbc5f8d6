"""Client-side LoRA training: E local epochs of answer-token cross-entropy with AdamW.

The LM head runs only at answer positions (``logits_at``): for SmolLM2 it costs as much as
8 decoder layers, and a multiple-choice answer is a few tokens of a ~40-token example.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from ..config import ConfigBase, require
from .data import CausalLMCollator, pad_token_id_of
from .lora import adapter_delta, adapter_state, load_adapter_state
from .models import logits_at

Features = Sequence[Mapping[str, Sequence[int]]]


@dataclass(frozen=True)
class TrainSettings(ConfigBase):
    """Local training of the LoRA adapter. ``max_steps`` 0 means no cap."""

    section: ClassVar[str] = "train"
    epochs: int = 1
    batch_size: int = 8
    learning_rate: float = 3e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    schedule: Literal["constant", "linear", "cosine"] = "linear"
    warmup_steps: int = 0
    max_length: int = 256
    max_steps: int = 0

    def validate(self) -> None:
        require(self.epochs >= 1, "train.epochs must be >= 1")
        require(self.batch_size >= 1, "train.batch_size must be >= 1")
        require(0 < self.learning_rate < 1, "train.learning_rate must be in (0, 1)")
        require(self.weight_decay >= 0, "train.weight_decay must be >= 0")
        require(self.max_grad_norm > 0, "train.max_grad_norm must be > 0")
        require(self.warmup_steps >= 0 and self.max_steps >= 0,
                "train.warmup_steps and train.max_steps must be >= 0")
        require(self.max_length >= 2, "train.max_length must be >= 2")


@dataclass
class TrainResult:
    steps: int = 0
    examples: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def mean_loss(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else float("nan")


def answer_loss(model: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens, with the head only at answer positions."""
    logits = logits_at(model, batch["input_ids"], batch["attention_mask"], batch["answer_mask"])
    return F.cross_entropy(logits.float(), batch["answer_targets"])


def _schedule(settings: TrainSettings, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < settings.warmup_steps:
            return (step + 1) / (settings.warmup_steps + 1)
        if settings.schedule == "constant" or total <= settings.warmup_steps:
            return 1.0
        progress = (step - settings.warmup_steps) / max(1, total - settings.warmup_steps)
        if settings.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def batches(features: Features, batch_size: int, collate: CausalLMCollator,
            generator: torch.Generator) -> list[dict[str, torch.Tensor]]:
    order = torch.randperm(len(features), generator=generator).tolist()
    return [collate([features[i] for i in order[s:s + batch_size]])
            for s in range(0, len(order), batch_size)]


def train_lora(model: Any, tokenizer: Any, features: Features, settings: TrainSettings, *,
               seed: int | None = None,
               progress: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train the trainable (LoRA) parameters of ``model`` in place.

    ``seed`` fixes the example order (experiments); by default it is drawn from the OS CSPRNG.
    """
    if not features:
        return TrainResult()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; attach a LoRA adapter first")
    generator = torch.Generator().manual_seed(seed if seed is not None else secrets.randbits(63))
    collate = CausalLMCollator(pad_token_id_of(tokenizer))
    per_epoch = math.ceil(len(features) / settings.batch_size)
    total = per_epoch * settings.epochs
    if settings.max_steps:
        total = min(total, settings.max_steps)
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate,
                                  weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(settings, total))
    result = TrainResult()
    start = time.perf_counter()
    model.train()
    for _ in range(settings.epochs):
        for batch in batches(features, settings.batch_size, collate, generator):
            if result.steps >= total:
                break
            loss = answer_loss(model, batch)
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            result.steps += 1
            result.examples += int(batch["input_ids"].shape[0])
            result.losses.append(float(loss.detach()))
            if progress is not None:
                progress(result.steps, result.losses[-1])
    model.eval()
    result.seconds = time.perf_counter() - start
    return result


def client_update(model: Any, tokenizer: Any, global_state: Mapping[str, torch.Tensor],
                  features: Features, settings: TrainSettings, *, seed: int | None = None,
                  dp: tuple[float, float] | None = None,
                  ) -> tuple[dict[str, torch.Tensor], TrainResult]:
    """Load the broadcast adapter, train locally, return ``(delta, result)``:
    ``delta = theta_k - theta_t`` as named float32 tensors.

    ``dp = (noise_multiplier, max_grad_norm)`` trains with DP-SGD instead
    (:func:`fedcollm_secure.privacy.dpsgd.train_lora_dp`: Poisson sampling from the OS
    CSPRNG, so ``seed`` does not apply); the result is then a ``DPTrainResult``.
    """
    load_adapter_state(model, global_state)
    if dp is not None:
        from ..privacy.dpsgd import train_lora_dp  # Opacus only when DP-SGD is on
        result: TrainResult = train_lora_dp(model, tokenizer, features, settings,
                                            noise_multiplier=dp[0], max_grad_norm=dp[1])
    else:
        result = train_lora(model, tokenizer, features, settings, seed=seed)
    return adapter_delta(adapter_state(model), global_state), result
