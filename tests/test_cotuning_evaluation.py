"""Multiple-choice scoring and perplexity against brute-force references on tiny models."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from fedcollm_secure.config import ConfigError
from fedcollm_secure.cotuning import evaluation
from fedcollm_secure.cotuning.models import tiny_word_tokenizer
from fedcollm_secure.cotuning.data import (
    CausalLMCollator,
    DatasetError,
    MCExample,
    PromptConfig,
    format_choice,
    format_prompt,
    generated_mc_dataset,
    pad_token_id_of,
    to_causal_lm_example,
)
from fedcollm_secure.cotuning.evaluation import (
    EvalConfig,
    accuracy_by_task,
    choose_prefix_sharing,
    evaluate_mc,
    perplexity,
    score_choices,
)

# ---------------------------------------------------------------------------------------------
# offline fixtures: a word-level tokenizer over the generated data, tiny random models
# ---------------------------------------------------------------------------------------------


def build_word_tokenizer(examples: list[MCExample]) -> Any:
    return tiny_word_tokenizer(text for ex in examples for text in
                               [format_prompt(ex), *(format_choice(c) for c in ex.choices)])


def tiny_llama(vocab_size: int, seed: int = 0, layers: int = 2) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, bos_token_id=2, eos_token_id=3,
                      pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(vocab_size: int, seed: int = 0) -> Any:
    """Absolute position embeddings: catches wrong position ids in the shared-prefix path."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                     bos_token_id=2, eos_token_id=3)
    return GPT2LMHeadModel(cfg).eval()


def tiny_gemma3(vocab_size: int, seed: int = 0) -> Any:
    """Sliding-window attention (window 4 < prompt length) and final-logit soft-capping."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=8, max_position_embeddings=128, sliding_window=4,
                           layer_types=["sliding_attention", "full_attention"],
                           final_logit_softcapping=3.0, query_pre_attn_scalar=8,
                           bos_token_id=2, eos_token_id=3, pad_token_id=0)
    return Gemma3ForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def examples() -> list[MCExample]:
    return generated_mc_dataset(40, seed=11)


@pytest.fixture(scope="module")
def tokenizer(examples: list[MCExample]) -> Any:
    return build_word_tokenizer(generated_mc_dataset(400, seed=0) + examples)


@pytest.fixture(scope="module")
def llama(tokenizer: Any) -> Any:
    return tiny_llama(len(tokenizer))


@pytest.fixture(scope="module")
def gpt2(tokenizer: Any) -> Any:
    return tiny_gpt2(len(tokenizer))


@pytest.fixture(scope="module")
def gemma3(tokenizer: Any) -> Any:
    return tiny_gemma3(len(tokenizer))


@pytest.fixture(scope="module")
def peft_llama(tokenizer: Any) -> Any:
    peft = pytest.importorskip("peft")
    base = tiny_llama(len(tokenizer), seed=5)
    torch.manual_seed(6)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                          init_lora_weights=False)  # random B: the adapter changes outputs
    return peft.get_peft_model(base, cfg).eval()


# ---------------------------------------------------------------------------------------------
# brute-force references: one unpadded sequence per (question, choice), full logits
# ---------------------------------------------------------------------------------------------
def brute_force_scores(model: Any, tokenizer: Any, examples: list[MCExample],
                       max_length: int | None = None) -> list[list[tuple[float, int]]]:
    out = []
    with torch.no_grad():
        for ex in examples:
            prompt = tokenizer(format_prompt(ex))["input_ids"]
            row = []
            for choice in ex.choices:
                answer = tokenizer(format_choice(choice), add_special_tokens=False)["input_ids"]
                ctx = prompt
                longest = max(len(tokenizer(format_choice(c), add_special_tokens=False)
                                  ["input_ids"]) for c in ex.choices)
                if max_length is not None and len(prompt) + longest > max_length:
                    ctx = prompt[:1] + prompt[len(prompt) - (max_length - longest - 1):]
                ids = torch.tensor([ctx + answer])
                logp = model(input_ids=ids).logits[0].double().log_softmax(-1)
                total = sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(answer))
                row.append((total, len(answer)))
            out.append(row)
    return out


def argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def reference_accuracy(ref: list[list[tuple[float, int]]],
                       examples: list[MCExample]) -> tuple[float, float]:
    acc = sum(argmax([s for s, _ in r]) == e.answer for r, e in zip(ref, examples, strict=True))
    norm = sum(argmax([s / n for s, n in r]) == e.answer
               for r, e in zip(ref, examples, strict=True))
    return acc / len(examples), norm / len(examples)


def assert_scores_match(scores: list[evaluation.ChoiceScores],
                        ref: list[list[tuple[float, int]]]) -> None:
    assert len(scores) == len(ref)
    for s, r in zip(scores, ref, strict=True):
        assert s.n_tokens == tuple(n for _, n in r)
        assert s.logprobs == pytest.approx([x for x, _ in r], abs=2e-5)


def min_margin(ref: list[list[tuple[float, int]]]) -> float:
    """Smallest gap between the best two choices (summed and normalised)."""
    gaps = []
    for r in ref:
        for vals in ([s for s, _ in r], [s / n for s, n in r]):
            top = sorted(vals, reverse=True)
            gaps.append(top[0] - top[1])
    return min(gaps)


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------
_REFERENCE: dict[str, list[list[tuple[float, int]]]] = {}  # brute force per model, computed once


@pytest.mark.parametrize("model_name", ["llama", "gpt2", "gemma3", "peft_llama"])
@pytest.mark.parametrize("sharing", ["never", "always"])
def test_mc_scores_equal_brute_force(model_name: str, sharing: str, examples: list[MCExample],
                                     tokenizer: Any, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(model_name)
    if model_name not in _REFERENCE:
        _REFERENCE[model_name] = brute_force_scores(model, tokenizer, examples)
    ref = _REFERENCE[model_name]
    assert min_margin(ref) > 1e-4  # no near ties: predictions below are decided by the scores
    scores = score_choices(model, tokenizer, examples, batch_size=5, prefix_sharing=sharing)
    assert_scores_match(scores, ref)
    acc, acc_norm = reference_accuracy(ref, examples)
    result = evaluate_mc(model, tokenizer, examples, 5, prefix_sharing=sharing)
    assert result["acc"] == acc and result["acc_norm"] == acc_norm
    assert result["n"] == len(examples)
    assert result["seconds"] > 0
    assert result["seconds_per_question"] == pytest.approx(result["seconds"] / len(examples))


def test_summed_and_normalised_predictions_differ_somewhere(examples: list[MCExample],
                                                            tokenizer: Any, llama: Any) -> None:
    # guards the acc_norm comparison above: it must not coincide with acc by construction
    scores = score_choices(llama, tokenizer, examples)
    assert any(s.pred != s.pred_norm for s in scores)
    assert any(max(s.n_tokens) > 1 for s in scores)


def test_batch_size_and_sharing_do_not_change_scores(examples: list[MCExample], tokenizer: Any,
                                                     llama: Any) -> None:
    base = score_choices(llama, tokenizer, examples, batch_size=1, prefix_sharing="never")
    for bs in (3, 64):
        for sharing in ("never", "always", "auto"):
            other = score_choices(llama, tokenizer, examples, batch_size=bs,
                                  prefix_sharing=sharing)  # type: ignore[arg-type]
            for a, b in zip(base, other, strict=True):
                assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


def test_peft_adapter_is_used(examples: list[MCExample], tokenizer: Any,
                              peft_llama: Any) -> None:
    with_adapter = score_choices(peft_llama, tokenizer, examples[:8])
    with peft_llama.disable_adapter():
        without = score_choices(peft_llama, tokenizer, examples[:8])
    base_ref = brute_force_scores(peft_llama.get_base_model(), tokenizer, examples[:8])
    # get_base_model() still carries the LoRA layers, so compare against disable_adapter()
    assert_scores_match(with_adapter, base_ref)
    assert any(abs(a - b) > 1e-3 for x, y in zip(with_adapter, without, strict=True)
               for a, b in zip(x.logprobs, y.logprobs, strict=True))


def test_truncated_prompts_match_brute_force(examples: list[MCExample], tokenizer: Any,
                                             llama: Any) -> None:
    ref = brute_force_scores(llama, tokenizer, examples, max_length=7)
    for sharing in ("never", "always"):
        scores = score_choices(llama, tokenizer, examples, batch_size=4, max_length=7,
                               prefix_sharing=sharing)  # type: ignore[arg-type]
        assert_scores_match(scores, ref)


def test_lm_head_runs_only_at_scored_positions(examples: list[MCExample], tokenizer: Any,
                                               llama: Any) -> None:
    rows: list[int] = []
    hook = llama.lm_head.register_forward_hook(
        lambda _m, inputs, _o: rows.append(inputs[0].reshape(-1, inputs[0].shape[-1]).shape[0]))
    try:
        batch = examples[:6]
        lengths = [[len(tokenizer(format_choice(c), add_special_tokens=False)["input_ids"])
                    for c in e.choices] for e in batch]
        score_choices(llama, tokenizer, batch, batch_size=6, prefix_sharing="never")
        assert rows == [sum(map(sum, lengths))]
        rows.clear()
        score_choices(llama, tokenizer, batch, batch_size=6, prefix_sharing="always")
        later = sum(n - 1 for ls in lengths for n in ls)
        assert rows == ([6, later] if later else [6])
    finally:
        hook.remove()


def test_eval_mode_inference_and_training_flag_restored(examples: list[MCExample],
                                                        tokenizer: Any, llama: Any) -> None:
    seen: list[tuple[bool, bool]] = []
    hook = llama.lm_head.register_forward_hook(
        lambda m, _i, out: seen.append((m.training, out.requires_grad)))
    llama.train()
    try:
        evaluate_mc(llama, tokenizer, examples[:4], 2)
        perplexity(llama, tokenizer, examples[:4], 2)
    finally:
        hook.remove()
    assert llama.training
    llama.eval()
    assert seen and all(state == (False, False) for state in seen)


def test_auto_sharing_policy(examples: list[MCExample], tokenizer: Any, llama: Any,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    assert evaluation._ModelIO(llama).n_parameters == sum(
        p.numel() for n, p in llama.named_parameters() if "embed_tokens" not in n)
    assert not choose_prefix_sharing(llama, [30, 30], [[2, 2, 2], [1, 1]])  # tiny model
    assert choose_prefix_sharing(llama, [30], [[2, 2]], "always")
    assert not choose_prefix_sharing(llama, [30], [[2, 2]], "never")
    monkeypatch.setattr(evaluation, "AUTO_SHARING_MIN_PARAMETERS", 0)
    assert choose_prefix_sharing(llama, [30, 30], [[2, 2, 2], [1, 1]])
    assert not choose_prefix_sharing(llama, [2], [[6, 6]])  # short prompt, long choices
    with pytest.raises(DatasetError):
        choose_prefix_sharing(llama, [3], [[1, 1]], "sometimes")  # type: ignore[arg-type]


def test_perplexity_equals_exp_mean_nll(examples: list[MCExample], tokenizer: Any,
                                        llama: Any) -> None:
    subset = examples[:10]
    nll = {"answer": 0.0, "full": 0.0}
    count = {"answer": 0, "full": 0}
    with torch.no_grad():
        for ex in subset:
            f = to_causal_lm_example(ex, tokenizer)
            ids = torch.tensor([f["input_ids"]])
            logp = llama(input_ids=ids).logits[0].double().log_softmax(-1)
            for p in range(ids.shape[1] - 1):
                term = -float(logp[p, ids[0, p + 1]])
                nll["full"] += term
                count["full"] += 1
                if p in f["answer_positions"]:
                    nll["answer"] += term
                    count["answer"] += 1
    for on in ("answer", "full"):
        for bs in (1, 4):
            res = perplexity(llama, tokenizer, subset, bs, on=on)  # type: ignore[arg-type]
            assert res["tokens"] == count[on] and res["n"] == len(subset)
            assert res["nll"] == pytest.approx(nll[on] / count[on], rel=1e-5)
            assert res["ppl"] == pytest.approx(math.exp(nll[on] / count[on]), rel=1e-5)


def test_training_on_answers_raises_accuracy(tokenizer: Any) -> None:
    """End to end: the generated data is learnable through the collator's answer mask."""
    train = generated_mc_dataset(64, seed=3, tasks=("opposite", "next_word", "successor"))
    model = tiny_llama(len(tokenizer), seed=1)
    before = evaluate_mc(model, tokenizer, train, 16)["acc"]
    ppl_before = perplexity(model, tokenizer, train, 16)["ppl"]
    collate = CausalLMCollator(pad_token_id_of(tokenizer))
    feats = [to_causal_lm_example(e, tokenizer) for e in train]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    torch.manual_seed(0)
    for _ in range(150):
        batch = collate([feats[int(i)] for i in torch.randperm(len(feats))[:16]])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       logits_to_keep=batch["answer_mask"]).logits
        loss = torch.nn.functional.cross_entropy(logits, batch["answer_targets"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = evaluate_mc(model, tokenizer, train, 16)
    assert after["acc"] >= max(0.9, before + 0.3)
    assert perplexity(model, tokenizer, train, 16)["ppl"] < ppl_before / 5


def test_accuracy_by_task_and_config(examples: list[MCExample], tokenizer: Any,
                                     llama: Any) -> None:
    scores = score_choices(llama, tokenizer, examples)
    per_task = accuracy_by_task(scores)
    assert set(per_task) == {e.task for e in examples}
    assert sum(v["n"] for v in per_task.values()) == len(examples)
    overall = evaluate_mc(llama, tokenizer, examples)["acc"]
    weighted = sum(v["acc"] * v["n"] for v in per_task.values()) / len(examples)
    assert weighted == pytest.approx(overall)
    cfg = EvalConfig.from_dict({"batch_size": 4, "prefix_sharing": "never",
                                "prompt": {"template": "Q: {question}\nA:"}})
    assert cfg.prompt == PromptConfig(template="Q: {question}\nA:")
    with pytest.raises(ConfigError):
        EvalConfig.from_dict({"batch_size": 0})
    with pytest.raises(ConfigError):
        EvalConfig.from_dict({"prefix_sharing": "sometimes"})
    with pytest.raises(ConfigError):
        EvalConfig.from_dict({"batchsize": 4})
    with pytest.raises(DatasetError):
        evaluate_mc(llama, tokenizer, [])
