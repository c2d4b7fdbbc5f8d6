"""Knowledge-distillation losses for FedCoLLM's mutual distillation.

Both directions use ``CE(student) + lambda * T^2 * KL(teacher || student)`` over answer-token
positions. The teacher contributes only its top-k next-token probabilities (renormalised,
detached); the student contributes its full log-softmax (gradient flows through it). Logits
come in already gathered at the answer positions, shape ``(N, V)`` for ``N`` positions of a
batch, so no dense batch x length x vocab tensor is ever built, and the top-k teacher is a
``(N, k)`` pair of tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from ..config import ConfigBase, require


@dataclass(frozen=True)
class DistillSettings(ConfigBase):
    """lambda_kl weighs the KL term; temperature softens both distributions; top_k is the
    number of teacher tokens kept (0 = the whole vocabulary); order: ``interleaved`` updates
    SLM and LLM step by step (the paper), ``sequential`` runs the SLM first, then the LLM
    against the updated SLM. mode: ``token`` compares next-token distributions at answer
    positions (the paper; across different tokenizers through :mod:`.bridge`), ``choice``
    compares distributions over a question's answer choices (:mod:`.choice_distill`,
    tokenizer-free; ``top_k`` is unused there)."""

    section: ClassVar[str] = "distill"
    lambda_kl: float = 1.0
    temperature: float = 1.0
    top_k: int = 128
    order: Literal["interleaved", "sequential"] = "interleaved"
    mode: Literal["token", "choice"] = "token"

    def validate(self) -> None:
        require(self.lambda_kl >= 0 and self.lambda_kl == self.lambda_kl,
                "distill.lambda_kl must be >= 0")
        require(self.temperature > 0 and self.temperature != float("inf"),
                "distill.temperature must be finite and > 0")
        require(self.top_k >= 0, "distill.top_k must be >= 0 (0 = full vocabulary)")


@dataclass(frozen=True)
class TopK:
    """A teacher's renormalised top-k distribution at N positions (detached)."""

    probs: torch.Tensor  # (N, k), rows sum to 1
    indices: torch.Tensor  # (N, k), token ids in the teacher's (= student's) vocabulary


def teacher_topk(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0) -> TopK:
    """Top-k of ``softmax(logits / T)`` renormalised over the kept tokens; no gradient."""
    if teacher_logits.dim() != 2:
        raise ValueError("teacher logits must have shape (positions, vocab)")
    with torch.no_grad():
        vocab = teacher_logits.shape[-1]
        k = vocab if k <= 0 else min(k, vocab)
        if k == vocab:  # the whole distribution: no sort needed (a full topk is ~9x slower)
            values = teacher_logits.float()
            indices = torch.arange(vocab, device=values.device).expand(values.shape[0], vocab)
        else:
            values, indices = torch.topk(teacher_logits.float(), k, dim=-1)
        probs = torch.softmax(values / temperature, dim=-1)  # renormalised over the top-k
    return TopK(probs=probs, indices=indices)


def sparse_kl(student_logits: torch.Tensor, teacher: TopK, temperature: float = 1.0,
              reduction: Literal["mean", "sum", "none"] = "mean") -> torch.Tensor:
    """``T^2 * KL(p_teacher || p_student)`` with the teacher restricted to its top-k.

    ``sum_j p_j (log p_j - log q_{i_j})`` per position, where ``q`` is the student's full
    softmax at temperature T; positions are averaged for ``mean``.
    """
    if student_logits.dim() != 2 or student_logits.shape[0] != teacher.probs.shape[0]:
        raise ValueError("student logits must have shape (positions, vocab) matching the teacher")
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_q_k = torch.gather(log_q, -1, teacher.indices)
    p = teacher.probs
    per_position = (p * (torch.log(p.clamp_min(1e-30)) - log_q_k)).sum(-1) * temperature ** 2
    if reduction == "none":
        return per_position
    return per_position.sum() if reduction == "sum" else per_position.mean()


def dense_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
             temperature: float = 1.0) -> torch.Tensor:
    """Reference: ``T^2 * KL`` over the whole vocabulary, mean over positions."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean() * temperature ** 2


def answer_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy at the answer positions (logits (N, V), targets (N,))."""
    return F.cross_entropy(logits.float(), targets)


def distillation_loss(student_logits: torch.Tensor, targets: torch.Tensor,
                      teacher_logits: torch.Tensor, settings: DistillSettings) -> torch.Tensor:
    """``CE(student) + lambda * T^2 * KL(teacher top-k || student)`` at N answer positions."""
    teacher = teacher_topk(teacher_logits, settings.top_k, settings.temperature)
    loss = answer_cross_entropy(student_logits, targets)
    if settings.lambda_kl:
        loss = loss + settings.lambda_kl * sparse_kl(student_logits, teacher,
                                                     settings.temperature)
    return loss
