from __future__ import annotations

import pytest
import torch

from fedcollm_secure.cotuning.distill import (
    DistillSettings, dense_kl, distillation_loss, sparse_kl, teacher_topk,
)
from fedcollm_secure.errors import ConfigError


def _logits(n: int = 6, vocab: int = 50, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, vocab, generator=g) * scale


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_sparse_kl_equals_dense_when_k_is_the_vocabulary(temperature: float) -> None:
    s, t = _logits(seed=1), _logits(seed=2)
    sparse = sparse_kl(s, teacher_topk(t, k=50, temperature=temperature), temperature)
    assert torch.allclose(sparse, dense_kl(s, t, temperature), atol=1e-5)
    assert torch.allclose(sparse_kl(s, teacher_topk(t, k=0, temperature=temperature),
                                    temperature), sparse, atol=1e-6)


def test_sparse_kl_is_zero_for_identical_distributions_and_positive_otherwise() -> None:
    t = _logits(seed=3)
    assert sparse_kl(t.clone(), teacher_topk(t, k=50)).abs() < 1e-5
    assert sparse_kl(_logits(seed=4), teacher_topk(t, k=8)) > 0.1


def test_topk_is_renormalised_and_detached() -> None:
    t = _logits(seed=5).requires_grad_(True)
    top = teacher_topk(t, k=8, temperature=2.0)
    assert top.probs.shape == (6, 8) and not top.probs.requires_grad
    assert torch.allclose(top.probs.sum(-1), torch.ones(6))
    assert torch.equal(top.indices, torch.topk(t.detach(), 8).indices)


def test_kl_carries_gradient_to_the_student_only() -> None:
    """Fails if the student logits were detached or rebuilt from copies."""
    student = torch.nn.Linear(4, 50)
    teacher = torch.nn.Linear(4, 50)
    x = torch.randn(6, 4)
    loss = sparse_kl(student(x), teacher_topk(teacher(x), k=16))
    loss.backward()
    assert student.weight.grad is not None and student.weight.grad.abs().sum() > 0
    assert teacher.weight.grad is None
    # one gradient step on the KL alone moves the student towards the teacher
    with torch.no_grad():
        student.weight -= 0.5 * student.weight.grad
        student.bias -= 0.5 * student.bias.grad  # type: ignore[operator]
    assert sparse_kl(student(x), teacher_topk(teacher(x), k=16)) < loss


def test_distillation_loss_combines_ce_and_kl() -> None:
    s, t = _logits(seed=6), _logits(seed=7)
    targets = torch.tensor([1, 2, 3, 4, 5, 6])
    ce_only = distillation_loss(s, targets, t, DistillSettings(lambda_kl=0.0))
    both = distillation_loss(s, targets, t, DistillSettings(lambda_kl=0.5, top_k=10))
    kl = sparse_kl(s, teacher_topk(t, 10))
    assert torch.allclose(both, ce_only + 0.5 * kl, atol=1e-6)


def test_settings_validate() -> None:
    with pytest.raises(ConfigError):
        DistillSettings.from_dict({"temperature": 0.0})
    with pytest.raises(ConfigError):
        DistillSettings.from_dict({"order": "random"})
    with pytest.raises(ConfigError):
        DistillSettings.from_dict({"topk": 5})
    assert DistillSettings().top_k == 128 and DistillSettings().order == "interleaved"
