"""Choice-level distillation for multiple-choice data (tokenizer-free).

Each model scores every answer choice of a question with its own tokenizer: the summed
log-probability of the choice's tokens after the prompt, exactly the tokens and truncation
:func:`evaluation.score_choices` uses, but with the gradient kept (:func:`choice_logprobs`).
A softmax over a question's choice scores is the model's distribution over the choices; the
student matches the teacher's::

    L = CE(student's correct choice tokens) + lambda * T^2 * KL(p_teacher || p_student)

with ``p = softmax(scores / T)`` per question. A summed log-probability is ``log p(choice
text | prompt)``, a quantity of the text, not of the tokenizer, so the two models' scores are
comparable even when their vocabularies differ. The cross-entropy term is the mean over the
correct choices' tokens (the same value :func:`distill.answer_cross_entropy` gives on the
training features, untruncated).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import DatasetError
from .data import DEFAULT_PROMPT, MCExample, PromptConfig, encode_example, pad_token_id_of
from .data import truncate_prompt
from .models import logits_at

__all__ = ["ChoiceLoss", "choice_distillation_loss", "choice_kl", "choice_logprobs"]


def choice_logprobs(model: Any, tokenizer: Any, examples: Sequence[MCExample], *,
                    prompt: PromptConfig = DEFAULT_PROMPT,
                    max_length: int | None = None) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Per question, the summed log-probability of each choice (a float32 tensor of shape
    ``(n_choices,)`` that carries the gradient) and each choice's token count.

    Every prompt + choice is one right-padded row; the LM head runs only at the choice
    positions (:func:`models.logits_at`). The model's train/eval mode is left as it is.
    """
    if not examples:
        raise DatasetError("no examples to score")
    bos = getattr(tokenizer, "bos_token_id", None)
    seqs: list[list[int]] = []
    spans: list[tuple[int, int]] = []  # (first scored position, number of choice tokens)
    counts: list[list[int]] = []
    for ex in examples:
        enc = encode_example(ex, tokenizer, prompt)
        longest = max(len(c) for c in enc.choice_ids)
        keep_first = isinstance(bos, int) and enc.prompt_ids[0] == bos
        ids = truncate_prompt(enc.prompt_ids, longest, max_length, keep_first)
        counts.append([len(c) for c in enc.choice_ids])
        for choice in enc.choice_ids:
            seqs.append(ids + list(choice))
            spans.append((len(ids) - 1, len(choice)))
    width = max(map(len, seqs))
    input_ids = torch.full((len(seqs), width), pad_token_id_of(tokenizer), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    keep = torch.zeros((len(seqs), width), dtype=torch.bool)
    targets: list[int] = []
    for r, (seq, (first, n)) in enumerate(zip(seqs, spans, strict=True)):
        input_ids[r, :len(seq)] = torch.tensor(seq)
        mask[r, :len(seq)] = 1
        keep[r, first:first + n] = True
        targets.extend(seq[first + 1:first + 1 + n])
    device = next(model.parameters()).device
    logits = logits_at(model, input_ids.to(device), mask.to(device), keep.to(device)).float()
    target = torch.tensor(targets, device=device)
    token_lp = logits.gather(1, target.view(-1, 1)).squeeze(1) - torch.logsumexp(logits, -1)
    row_of = keep.nonzero(as_tuple=True)[0].to(device)
    sums = torch.zeros(len(seqs), dtype=token_lp.dtype, device=device).index_add(
        0, row_of, token_lp)
    out: list[torch.Tensor] = []
    start = 0
    for c in counts:
        out.append(sums[start:start + len(c)])
        start += len(c)
    return out, counts


def _padded(scores: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(int(s.numel()) for s in scores)
    out = scores[0].new_full((len(scores), width), float("-inf"))
    valid = torch.zeros((len(scores), width), dtype=torch.bool, device=out.device)
    for i, s in enumerate(scores):
        out[i, :s.numel()] = s
        valid[i, :s.numel()] = True
    return out, valid


def choice_kl(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],
              temperature: float = 1.0) -> torch.Tensor:
    """Mean over questions of ``T^2 * KL(softmax(teacher/T) || softmax(student/T))``; the
    teacher's scores are detached."""
    if len(student) != len(teacher) or not student:
        raise ValueError("student and teacher need scores for the same, non-empty questions")
    for s, t in zip(student, teacher, strict=True):
        if s.shape != t.shape:
            raise ValueError("student and teacher score different numbers of choices")
    s_pad, valid = _padded(student)
    t_pad, _ = _padded([t.detach().to(s_pad.device, s_pad.dtype) for t in teacher])
    log_q = F.log_softmax(s_pad / temperature, dim=-1)
    log_p = F.log_softmax(t_pad / temperature, dim=-1)
    terms = torch.where(valid, log_p.exp() * (log_p - log_q), torch.zeros_like(log_q))
    return terms.sum(-1).mean() * temperature ** 2


@dataclass(frozen=True)
class ChoiceLoss:
    loss: torch.Tensor  # CE + lambda * KL (carries the gradient)
    ce: float
    kl: float


def choice_distillation_loss(student: Any, student_tokenizer: Any,
                             teacher_scores: Sequence[torch.Tensor],
                             examples: Sequence[MCExample], *, lambda_kl: float,
                             temperature: float, prompt: PromptConfig = DEFAULT_PROMPT,
                             max_length: int | None = None) -> ChoiceLoss:
    """``CE(correct choice tokens) + lambda * T^2 * KL(teacher choices || student choices)``.

    ``teacher_scores`` come from :func:`choice_logprobs` of the teacher (no gradient needed).
    """
    scores, counts = choice_logprobs(student, student_tokenizer, examples, prompt=prompt,
                                     max_length=max_length)
    correct = torch.stack([s[ex.answer] for s, ex in zip(scores, examples, strict=True)])
    tokens = sum(c[ex.answer] for c, ex in zip(counts, examples, strict=True))
    ce = -correct.sum() / tokens
    kl = choice_kl(scores, teacher_scores, temperature)
    loss = ce + lambda_kl * kl if lambda_kl else ce
    return ChoiceLoss(loss, float(ce.detach()), float(kl.detach()))
