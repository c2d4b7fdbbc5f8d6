"""Choice-level distillation: differentiable choice scores, the choice KL, and distillation
that moves a student's distribution over answer choices toward a teacher's (tiny models with
different tokenizers)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from fedcollm_secure.cotuning import server
from fedcollm_secure.cotuning.choice_distill import (
    choice_distillation_loss,
    choice_kl,
    choice_logprobs,
)
from fedcollm_secure.cotuning.data import generated_mc_dataset
from fedcollm_secure.cotuning.distill import DistillSettings
from fedcollm_secure.cotuning.evaluation import score_choices
from fedcollm_secure.cotuning.lora import (
    LoraSettings,
    adapter_state,
    attach_lora,
    load_adapter_state,
)
from fedcollm_secure.cotuning.models import (
    load_model,
    save_tiny_model,
    tiny_sentencepiece_tokenizer,
    tiny_tokenizer,
)
from fedcollm_secure.cotuning.trainer import TrainSettings
from fedcollm_secure.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Any, Any]:
    """(teacher, teacher tokenizer, student, student tokenizer): peft models, different
    tokenizers; the teacher's LoRA is randomised so it has opinions of its own."""
    root = tmp_path_factory.mktemp("choice")
    t_dir = save_tiny_model(root / "t", "gemma3", seed=5, hidden=48, layers=2,
                            tokenizer=tiny_sentencepiece_tokenizer())
    s_dir = save_tiny_model(root / "s", "llama", seed=6, hidden=32, layers=1,
                            tokenizer=tiny_tokenizer())
    (teacher, t_tok), (student, s_tok) = load_model(str(t_dir)), load_model(str(s_dir))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        teacher = attach_lora(teacher, LoraSettings(r=4, alpha=8, dropout=0.0))
        student = attach_lora(student, LoraSettings(r=4, alpha=8, dropout=0.0))
        load_adapter_state(teacher, {n: torch.randn_like(v) * 0.3
                                     for n, v in adapter_state(teacher).items()})
    return teacher, t_tok, student, s_tok


def test_choice_scores_equal_the_evaluation_scores_and_carry_gradient(
        pair: tuple[Any, Any, Any, Any]) -> None:
    _, _, student, tok = pair
    examples = generated_mc_dataset(12, seed=1)
    student.eval()
    scores, counts = choice_logprobs(student, tok, examples, max_length=24)
    reference = score_choices(student, tok, examples, max_length=24, prefix_sharing="never")
    for got, n, ref in zip(scores, counts, reference, strict=True):
        torch.testing.assert_close(got.detach().double(),
                                   torch.tensor(ref.logprobs, dtype=torch.float64),
                                   rtol=1e-5, atol=1e-5)
        assert tuple(n) == ref.n_tokens
    total = torch.stack([s.sum() for s in scores]).sum()
    total.backward()  # type: ignore[no-untyped-call]
    grads = [p.grad for p in student.parameters() if p.requires_grad]
    assert any(g is not None and float(g.abs().sum()) > 0 for g in grads)
    student.zero_grad(set_to_none=True)


def test_choice_kl_is_zero_for_equal_scores_and_detaches_the_teacher() -> None:
    a = [torch.tensor([0.0, -1.0, -3.0]), torch.tensor([-2.0, -0.5])]
    assert float(choice_kl(a, a)) == pytest.approx(0.0, abs=1e-7)
    student = [torch.tensor([-1.0, -1.0, -1.0], requires_grad=True),
               torch.tensor([0.0, 0.0], requires_grad=True)]
    teacher = [t.clone().requires_grad_(True) for t in a]
    kl = choice_kl(student, teacher, temperature=2.0)
    assert float(kl) > 0
    kl.backward()  # type: ignore[no-untyped-call]
    assert all(t.grad is None for t in teacher) and student[0].grad is not None
    p = torch.softmax(a[1] / 2, 0)
    expected_second = float((p * (p.log() - torch.log_softmax(torch.zeros(2), 0))).sum()) * 4
    first = float(choice_kl(student[:1], teacher[:1], temperature=2.0))
    assert float(kl) == pytest.approx((first + expected_second) / 2, rel=1e-5)
    with pytest.raises(ValueError):
        choice_kl(student, [a[1], a[0]])


def _student_teacher_kl(pair: tuple[Any, Any, Any, Any], examples: list[Any]) -> float:
    teacher, t_tok, student, s_tok = pair
    teacher.eval()
    student.eval()
    with torch.no_grad():
        t_scores, _ = choice_logprobs(teacher, t_tok, examples)
        s_scores, _ = choice_logprobs(student, s_tok, examples)
    return float(choice_kl(s_scores, t_scores))


def test_choice_distillation_moves_the_students_choices_toward_the_teachers(
        pair: tuple[Any, Any, Any, Any]) -> None:
    teacher, t_tok, student, s_tok = pair
    examples = generated_mc_dataset(16, seed=2)
    start = adapter_state(student)
    with torch.no_grad():
        teacher.eval()
        t_scores, _ = choice_logprobs(teacher, t_tok, examples)

    def train(lambda_kl: float) -> float:
        load_adapter_state(student, start)
        params = [p for p in student.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=2e-2)
        student.train()
        for _ in range(15):
            out = choice_distillation_loss(student, s_tok, t_scores, examples,
                                           lambda_kl=lambda_kl, temperature=1.0)
            out.loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            opt.zero_grad(set_to_none=True)
        return _student_teacher_kl(pair, examples)

    before = _student_teacher_kl(pair, examples)
    distilled, ce_only = train(5.0), train(0.0)
    load_adapter_state(student, start)
    assert distilled < 0.5 * before and distilled < ce_only


def test_mutual_distill_in_choice_mode_trains_both_sides(pair: tuple[Any, Any, Any, Any]
                                                        ) -> None:
    teacher, t_tok, student, s_tok = pair
    examples = generated_mc_dataset(12, seed=3)
    settings = DistillSettings(mode="choice", lambda_kl=1.0)
    public = server.prepare_public(examples, t_tok, s_tok, settings, max_length=64)
    assert public.cross_tokenizer and public.pairs is None
    before = {"llm": adapter_state(teacher), "slm": adapter_state(student)}
    train = TrainSettings(batch_size=4, learning_rate=1e-2, schedule="constant")
    try:
        result = server.mutual_distill(teacher, student, s_tok, public, settings, train, seed=0)
        assert result.mode == "choice" and result.steps == 3
        assert len(result.slm_losses) == len(result.llm_losses) == 3
        for name, model in (("llm", teacher), ("slm", student)):
            after = adapter_state(model)
            assert any(float((after[n] - before[name][n]).abs().max()) > 0 for n in after)
        with pytest.raises(ConfigError, match="mode"):
            server.mutual_distill(teacher, student, s_tok, public, DistillSettings(), train)
        with pytest.raises(ConfigError, match="PublicSet"):
            server.mutual_distill(teacher, student, s_tok, public.slm_features, settings, train)
    finally:
        load_adapter_state(teacher, before["llm"])
        load_adapter_state(student, before["slm"])


def test_bad_inputs_are_refused(pair: tuple[Any, Any, Any, Any]) -> None:
    _, _, student, tok = pair
    with pytest.raises(Exception, match="no examples"):
        choice_logprobs(student, tok, [])
