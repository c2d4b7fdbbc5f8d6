"""The FedCoLLM server: secure aggregation of SLM adapter deltas and mutual distillation.

:func:`aggregate_deltas` forms the weighted mean of the clients' LoRA deltas through
:func:`fedcollm_secure.secure_sum`, so with ``masking`` the server only ever handles the
masked vectors and their unmasked *sum* (never an individual delta).

:func:`mutual_distill` trains the server's LLM adapter and the (aggregated) SLM adapter
against each other on public data (DESIGN.md section 1, step 4)::

    L_slm = CE(slm) + lambda * T^2 * KL(top-k(llm) || slm)
    L_llm = CE(llm) + lambda * T^2 * KL(top-k(slm) || llm)

over answer-token positions only (the LM heads run only there, :func:`models.logits_at`).
The teacher's logits come from a no-grad, eval-mode forward of the other model; the
student's logits carry the gradient of both the CE and the KL term into its LoRA weights.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from ..api import secure_sum
from ..errors import ConfigError, UpdateValidationError
from ..secagg import SecureSumResult
from .data import CausalLMCollator, pad_token_id_of
from .distill import DistillSettings, distillation_loss
from .lora import adapter_parameters, validate_state
from .models import logits_at, unwrap_causal_lm
from .trainer import TrainSettings, _schedule, batches

__all__ = ["DistillResult", "aggregate_deltas", "mutual_distill"]

Features = Sequence[Mapping[str, Sequence[int]]]


# --------------------------------------------------------------------------------------------
# aggregation
# --------------------------------------------------------------------------------------------
def aggregate_deltas(deltas: Mapping[str, Mapping[str, torch.Tensor]],
                     weights: Mapping[str, float] | None = None, protocol: str = "masking",
                     threshold: int | None = None, drop: Mapping[str, str] | None = None,
                     **options: Any) -> tuple[dict[str, torch.Tensor], SecureSumResult]:
    """The weighted mean of the surviving clients' deltas: ``(mean, secure-sum result)``.

    ``deltas`` maps client id -> adapter delta (named float32 tensors, all with the same
    names and shapes); ``weights`` (default 1 each) are e.g. the clients' example counts.
    The aggregation runs through :func:`fedcollm_secure.secure_sum` with ``protocol``
    (``masking`` by default: the caller learns only the sum); ``threshold``, ``drop`` and
    ``options`` (e.g. ``clip=1.0`` for masking, which clips every element of a delta to
    ``[-clip, clip]`` before quantising) go to it unchanged. The mean is ``sum /
    weight_total`` over the survivors, returned as float32 CPU tensors.
    """
    if not deltas:
        raise UpdateValidationError("no deltas to aggregate")
    ids = list(deltas)
    first = deltas[ids[0]]
    validate_state(first, what=f"delta of {ids[0]}")
    shapes = {n: tuple(t.shape) for n, t in first.items()}
    updates: dict[str, dict[str, np.ndarray]] = {}
    for cid in ids:
        validate_state(deltas[cid], shapes, what=f"delta of {cid}")
        updates[cid] = {n: deltas[cid][n].detach().numpy() for n in sorted(shapes)}
    result = secure_sum(updates, protocol=protocol, threshold=threshold,
                        weights=None if weights is None else dict(weights), drop=drop,
                        **options)
    if not result.weight_total > 0:
        raise UpdateValidationError("the surviving clients' weights sum to zero")
    mean = {n: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)).reshape(shapes[n])
            for n, v in result.mean().items()}
    validate_state(mean, shapes, what="aggregated mean delta")
    return mean, result


# --------------------------------------------------------------------------------------------
# mutual distillation
# --------------------------------------------------------------------------------------------
@dataclass
class DistillResult:
    """Per-step losses of one mutual-distillation call (CE + lambda * KL of each student)."""

    slm_losses: list[float] = field(default_factory=list)
    llm_losses: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0

    @property
    def mean_slm_loss(self) -> float:
        return sum(self.slm_losses) / len(self.slm_losses) if self.slm_losses else math.nan

    @property
    def mean_llm_loss(self) -> float:
        return sum(self.llm_losses) / len(self.llm_losses) if self.llm_losses else math.nan


def _trainable(model: Any, what: str) -> list[torch.nn.Parameter]:
    adapter_parameters(model)  # raises ConfigError unless a peft model with a LoRA adapter
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"the {what} has no trainable (LoRA) parameters")
    return params


def _answer_logits(model: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return logits_at(model, batch["input_ids"], batch["attention_mask"], batch["answer_mask"])


def _teacher_logits(model: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The teacher's answer-position logits: eval mode (no dropout), no graph."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return _answer_logits(model, batch)
    finally:
        model.train(was_training)


class _Student:
    """One side of the mutual distillation: its model, optimizer and schedule."""

    def __init__(self, model: Any, what: str, train: TrainSettings, total: int) -> None:
        self.model, self.what = model, what
        self.params = _trainable(model, what)
        self.optimizer = torch.optim.AdamW(self.params, lr=train.learning_rate,
                                           weight_decay=train.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           _schedule(train, total))
        self.max_grad_norm = train.max_grad_norm

    def step(self, batch: Mapping[str, torch.Tensor], teacher_logits: torch.Tensor,
             settings: DistillSettings, vocab: int) -> float:
        self.model.train()
        student = _answer_logits(self.model, batch)[:, :vocab]
        loss = distillation_loss(student, batch["answer_targets"], teacher_logits[:, :vocab],
                                 settings)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite {self.what} distillation loss")
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def _shared_vocab(llm: Any, slm: Any, tokenizer: Any) -> int:
    """Logit columns both models share (embedding matrices may be padded past the
    tokenizer)."""
    sizes = []
    for model in (llm, slm):
        emb = unwrap_causal_lm(model).get_output_embeddings()
        if emb is None or not hasattr(emb, "weight"):
            raise ConfigError(f"{type(model).__name__} has no output embedding matrix")
        sizes.append(int(emb.weight.shape[0]))
    vocab = min(sizes)
    if vocab < len(tokenizer):
        raise ConfigError(f"output vocabularies {sizes} are smaller than the tokenizer "
                          f"({len(tokenizer)} tokens)")
    return vocab


def mutual_distill(llm: Any, slm: Any, tokenizer: Any, public_features: Features,
                   settings: DistillSettings, train: TrainSettings, seed: int | None = None,
                   *, order: Literal["interleaved", "sequential"] | None = None,
                   progress: Callable[[str, int, float], None] | None = None) -> DistillResult:
    """Mutual distillation of the LLM and SLM LoRA adapters on ``public_features``, in place.

    Both models are peft models over the same tokenizer (the engine checks the pair with
    :func:`models.check_same_tokenizer`). ``train`` gives epochs (R), batch size, AdamW
    learning rate / weight decay, grad-norm clipping, schedule and ``max_steps`` (per model);
    ``settings`` gives lambda, temperature, top-k and the order (``order`` overrides it):

    * ``interleaved`` (paper, default): per batch one SLM step against the LLM's current
      logits, then one LLM step against the just-updated SLM's logits;
    * ``sequential``: every SLM step (the LLM is fixed meanwhile), then every LLM step
      against the updated SLM.

    Each model gets its own AdamW optimizer. ``seed`` fixes the batch order (both models see
    the same batches). Returns the per-step losses; the models are left in eval mode.
    """
    order = order or settings.order
    if order not in ("interleaved", "sequential"):
        raise ConfigError(f"distill.order must be interleaved or sequential, got {order!r}")
    result = DistillResult()
    if not public_features:
        return result
    vocab = _shared_vocab(llm, slm, tokenizer)
    generator = torch.Generator().manual_seed(seed if seed is not None else secrets.randbits(63))
    collate = CausalLMCollator(pad_token_id_of(tokenizer))
    plan = [batches(public_features, train.batch_size, collate, generator)
            for _ in range(train.epochs)]
    flat = [b for epoch in plan for b in epoch]
    if train.max_steps:
        flat = flat[:train.max_steps]
    slm_side = _Student(slm, "SLM", train, len(flat))
    llm_side = _Student(llm, "LLM", train, len(flat))
    start = time.perf_counter()
    try:
        if order == "interleaved":
            for batch in flat:
                loss = slm_side.step(batch, _teacher_logits(llm, batch), settings, vocab)
                result.slm_losses.append(loss)
                if progress is not None:
                    progress("slm", len(result.slm_losses), loss)
                loss = llm_side.step(batch, _teacher_logits(slm, batch), settings, vocab)
                result.llm_losses.append(loss)
                if progress is not None:
                    progress("llm", len(result.llm_losses), loss)
        else:
            for batch in flat:
                loss = slm_side.step(batch, _teacher_logits(llm, batch), settings, vocab)
                result.slm_losses.append(loss)
                if progress is not None:
                    progress("slm", len(result.slm_losses), loss)
            for batch in flat:
                loss = llm_side.step(batch, _teacher_logits(slm, batch), settings, vocab)
                result.llm_losses.append(loss)
                if progress is not None:
                    progress("llm", len(result.llm_losses), loss)
    finally:
        llm.eval()
        slm.eval()
    result.steps = len(flat)
    result.seconds = time.perf_counter() - start
    return result
