"""Multiple-choice data: examples, loaders, causal-LM features, partitions, public split."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from fedcollm_secure.config import ConfigError
from fedcollm_secure.cotuning.models import tiny_word_tokenizer
from fedcollm_secure.cotuning.data import (
    BIGBENCH_MC_TASKS,
    DATA_DIR_ENV,
    IGNORE_INDEX,
    CausalLMCollator,
    DatasetError,
    MCExample,
    PartitionConfig,
    PromptConfig,
    client_test_splits,
    default_data_dir,
    encode_example,
    federated_split,
    format_choice,
    format_prompt,
    from_hf_dataset,
    generated_mc_dataset,
    load_bigbench_mc,
    load_jsonl,
    load_mc_dataset,
    pad_token_id_of,
    partition,
    partition_by_task,
    partition_dirichlet,
    partition_iid,
    split_public,
    task_counts,
    to_causal_lm_example,
    write_jsonl,
)
from fedcollm_secure.errors import FedCoLLMSecureError

# ---------------------------------------------------------------------------------------------
# offline fixtures: a word-level tokenizer over the generated data, a tiny random Llama
# ---------------------------------------------------------------------------------------------


def build_word_tokenizer(examples: list[MCExample]) -> Any:
    return tiny_word_tokenizer(text for ex in examples for text in
                               [format_prompt(ex), *(format_choice(c) for c in ex.choices)])


@pytest.fixture(scope="module")
def dataset() -> list[MCExample]:
    return generated_mc_dataset(400, seed=0)


@pytest.fixture(scope="module")
def tokenizer(dataset: list[MCExample]) -> Any:
    return build_word_tokenizer(dataset)


def ids_of(examples: list[MCExample]) -> list[str]:
    return [e.id for e in examples]


# ---------------------------------------------------------------------------------------------
# examples
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    {"choices": ("only",)},
    {"answer": 2},
    {"answer": -1},
    {"answer": True},
    {"answer": "0"},
    {"question": "   "},
    {"choices": ("a", " ")},
    {"choices": "ab"},
    {"task": ""},
])
def test_example_validation_rejects(kwargs: dict[str, Any]) -> None:
    base: dict[str, Any] = {"question": "q?", "choices": ("a", "b"), "answer": 1, "task": "t"}
    with pytest.raises(DatasetError) as info:
        MCExample(**{**base, **kwargs})
    assert isinstance(info.value, FedCoLLMSecureError) and isinstance(info.value, ValueError)


def test_example_ids_are_content_hashes_when_missing() -> None:
    a = MCExample("q?", ("x", "y"), 0, "t")
    b = MCExample("q?", ["x", "y"], 0, "t")  # type: ignore[arg-type]
    c = MCExample("q?", ("x", "z"), 0, "t")
    assert a.id == b.id and a.id.startswith("t-") and a.id != c.id
    assert b.choices == ("x", "y") and a.answer_text == "x"
    assert MCExample.from_dict(a.to_dict()) == a


def test_from_dict_reads_arc_style_records() -> None:
    record = {"id": "arc-1", "question": "Which is a gas?",
              "choices": {"text": ["ice", "steam", "rock"], "label": ["A", "B", "C"]},
              "answerKey": "B"}
    ex = MCExample.from_dict(record, task="arc")
    assert (ex.answer, ex.answer_text, ex.task, ex.id) == (1, "steam", "arc", "arc-1")
    obqa = {"question_stem": "Sun is a", "choices": {"text": ["star", "moon"],
                                                     "label": ["1", "2"]}, "answerKey": "1"}
    assert MCExample.from_dict(obqa).answer == 0
    with pytest.raises(DatasetError):
        MCExample.from_dict({**record, "answerKey": "Z"})
    with pytest.raises(DatasetError):
        MCExample.from_dict({"question": "q", "answer": 0})


# ---------------------------------------------------------------------------------------------
# loaders
# ---------------------------------------------------------------------------------------------
def test_jsonl_round_trip_limit_and_errors(tmp_path: Path, dataset: list[MCExample]) -> None:
    path = tmp_path / "train.jsonl"
    write_jsonl(dataset[:10], path)
    assert load_jsonl(path) == dataset[:10]
    assert load_jsonl([path, path], limit=15) == (dataset[:10] + dataset[:5])
    assert load_mc_dataset(tmp_path, "train") == dataset[:10]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(dataset[0].to_dict()) + "\n\n{not json\n")
    with pytest.raises(DatasetError, match=r"bad.jsonl:3"):
        load_jsonl(bad)
    bad.write_text(json.dumps({**dataset[0].to_dict(), "answer": 9}) + "\n")
    with pytest.raises(DatasetError, match=r"bad.jsonl:1: .*out of range"):
        load_jsonl(bad)
    with pytest.raises(DatasetError, match="no such file"):
        load_jsonl(tmp_path / "missing.jsonl")


def test_hf_dataset_objects_and_local_dataset_dirs(tmp_path: Path,
                                                   dataset: list[MCExample]) -> None:
    datasets = pytest.importorskip("datasets")
    rows = [e.to_dict() for e in dataset[:12]]
    ds = datasets.Dataset.from_list(rows)
    assert from_hf_dataset(ds) == dataset[:12]
    dd = datasets.DatasetDict({"train": ds, "test": datasets.Dataset.from_list(rows[:3])})
    with pytest.raises(DatasetError, match="split"):
        from_hf_dataset(dd)
    assert from_hf_dataset(dd, split="test", limit=2) == dataset[:2]
    dd.save_to_disk(str(tmp_path / "saved"))
    assert load_mc_dataset(tmp_path / "saved", "test") == dataset[:3]
    # a .json file goes through datasets' packaged "json" builder (offline)
    json_file = tmp_path / "data.json"
    json_file.write_text("\n".join(json.dumps(r) for r in rows[:4]))
    assert load_mc_dataset(json_file, cache_dir=str(tmp_path / "cache")) == dataset[:4]
    with pytest.raises(DatasetError, match="allow_hub"):
        load_mc_dataset("someone/some-hub-dataset")


def _bigbench_dir() -> Path | None:
    root = default_data_dir()
    if root is None:
        return None
    for candidate in (root / "bigbench-mc", root):
        if (candidate / "social_iqa" / "train.jsonl").is_file():
            return candidate
    return None


BIGBENCH_SIZES = {  # from the bigbench-mc README
    "social_iqa": (1155, 385, 385),
    "goal_step_wikihow.step_inference": (1350, 450, 449),
    "strategyqa": (1374, 458, 457),
    "unit_conversion.different_systems": (1800, 600, 600),
}


@pytest.mark.skipif(_bigbench_dir() is None, reason="bigbench-mc data not available")
def test_bigbench_loader_reads_the_real_files() -> None:
    assert sorted(BIGBENCH_SIZES) == sorted(BIGBENCH_MC_TASKS)
    for task, sizes in BIGBENCH_SIZES.items():
        for split, size in zip(("train", "validation", "test"), sizes, strict=True):
            examples = load_bigbench_mc(task, split)
            assert len(examples) == size, (task, split)
            assert {e.task for e in examples} == {task}
    sample = load_bigbench_mc(["unit_conversion/different_systems", "strategyqa"],
                              "validation", limit=3)
    assert [e.task for e in sample] == ["unit_conversion.different_systems"] * 3 + [
        "strategyqa"] * 3
    first = load_bigbench_mc("strategyqa", "train", limit=1)[0]
    assert first.id == "strategyqa-1" and first.choices == ("Yes", "No") and first.answer == 1
    assert task_counts(load_bigbench_mc(None, "test", limit=2)) == {t: 2 for t in BIGBENCH_SIZES}
    with pytest.raises(DatasetError, match="unknown bigbench-mc task"):
        load_bigbench_mc("no_such_task")


def test_bigbench_loader_honours_the_env_override(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  dataset: list[MCExample]) -> None:
    task_dir = tmp_path / "bigbench-mc" / "toy"
    task_dir.mkdir(parents=True)
    write_jsonl(dataset[:5], task_dir / "train.jsonl")
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert load_bigbench_mc("toy", "train") == dataset[:5]
    with pytest.raises(DatasetError, match="no split"):
        load_bigbench_mc("toy", "test")
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(DatasetError, match="not found"):
        load_bigbench_mc("toy", "train")


# ---------------------------------------------------------------------------------------------
# prompts and causal-LM features
# ---------------------------------------------------------------------------------------------
def test_prompt_config_is_strict() -> None:
    ex = MCExample("2+2?", ("4", "5"), 0, "math")
    assert format_prompt(ex) == "Question: 2+2?\nAnswer:" and format_choice("4") == " 4"
    custom = PromptConfig.from_dict({"template": "[{task}] Q: {question}\nA:"})
    assert format_prompt(ex, custom) == "[math] Q: 2+2?\nA:"
    with pytest.raises(ConfigError):
        PromptConfig.from_dict({"template": "no placeholder"})
    with pytest.raises(ConfigError):
        PromptConfig.from_dict({"templat": "{question}"})
    with pytest.raises(FedCoLLMSecureError):
        PromptConfig(template="{question} {other}")


def test_labels_cover_exactly_the_answer_tokens(dataset: list[MCExample], tokenizer: Any) -> None:
    multi_token = 0
    for ex in dataset[:120]:
        for k in range(ex.n_choices):
            f = to_causal_lm_example(ex, tokenizer, 64, choice=k)
            prompt_ids = tokenizer(format_prompt(ex))["input_ids"]
            answer_ids = tokenizer(format_choice(ex.choices[k]),
                                   add_special_tokens=False)["input_ids"]
            assert prompt_ids[0] == tokenizer.bos_token_id
            assert f["input_ids"] == prompt_ids + answer_ids
            assert f["attention_mask"] == [1] * len(f["input_ids"])
            assert f["labels"] == [IGNORE_INDEX] * len(prompt_ids) + answer_ids
            labelled = [i for i, t in enumerate(f["labels"]) if t != IGNORE_INDEX]
            assert f["answer_positions"] == [i - 1 for i in labelled]
            assert [f["input_ids"][p + 1] for p in f["answer_positions"]] == answer_ids
            assert tokenizer.decode(answer_ids) == ex.choices[k]
            multi_token += len(answer_ids) > 1
    assert multi_token > 0  # the check covered multi-token answers
    default = to_causal_lm_example(dataset[0], tokenizer)
    assert default == to_causal_lm_example(dataset[0], tokenizer, choice=dataset[0].answer)


def test_truncation_keeps_bos_and_the_whole_answer(dataset: list[MCExample],
                                                   tokenizer: Any) -> None:
    ex = next(e for e in dataset if len(e.answer_text.split()) == 2)  # a 2-token answer
    full = to_causal_lm_example(ex, tokenizer)
    cut = to_causal_lm_example(ex, tokenizer, max_length=6)
    assert len(cut["input_ids"]) == 6
    assert cut["input_ids"][0] == tokenizer.bos_token_id
    assert cut["input_ids"][1:] == full["input_ids"][-5:]
    assert [t for t in cut["labels"] if t != IGNORE_INDEX] == full["input_ids"][-2:]
    assert cut["answer_positions"] == [3, 4]
    with pytest.raises(DatasetError, match="no room"):
        to_causal_lm_example(ex, tokenizer, max_length=3)


class _MergingTokenizer:
    """Char tokenizer that fuses ':' with a following ' ' (joint != prompt + answer)."""

    bos_token_id = None
    pad_token_id = 0
    eos_token_id = 0

    def _encode(self, text: str) -> list[int]:
        out, i = [], 0
        while i < len(text):
            if text[i:i + 2] == ": ":
                out.append(1000)
                i += 2
            else:
                out.append(ord(text[i]))
                i += 1
        return out

    def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict[str, Any]:
        return {"input_ids": [self._encode(t) for t in texts]}


def test_encoding_falls_back_when_the_joint_encoding_merges_across_the_boundary() -> None:
    ex = MCExample("x", ("ab", "c"), 0, "t")
    enc = encode_example(ex, _MergingTokenizer(), PromptConfig(template="{question}:"))
    assert enc.prompt_ids == (ord("x"), ord(":"))
    assert enc.choice_ids == ((ord(" "), ord("a"), ord("b")), (ord(" "), ord("c")))
    enc2 = encode_example(ex, _MergingTokenizer(), PromptConfig(template="{question}"))
    assert enc2.choice_ids == ((ord(" "), ord("a"), ord("b")), (ord(" "), ord("c")))


def test_collator_batches_and_its_answer_mask_matches_the_hf_loss(
        dataset: list[MCExample], tokenizer: Any) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    feats = [to_causal_lm_example(e, tokenizer, 64) for e in dataset[:6]]
    batch = CausalLMCollator(pad_token_id_of(tokenizer), pad_to_multiple_of=8)(feats)
    longest = max(len(f["input_ids"]) for f in feats)
    assert batch["input_ids"].shape[1] == -(-longest // 8) * 8
    for i, f in enumerate(feats):
        n = len(f["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == f["input_ids"]
        assert (batch["input_ids"][i, n:] == tokenizer.pad_token_id).all()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1]
                                                                       - n)
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()
        assert batch["answer_mask"][i].nonzero().view(-1).tolist() == f["answer_positions"]
    expected_targets = [t for f in feats for t in f["labels"] if t != IGNORE_INDEX]
    assert batch["answer_targets"].tolist() == expected_targets

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)).eval()
    with torch.no_grad():
        hf_loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        labels=batch["labels"]).loss
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       logits_to_keep=batch["answer_mask"]).logits
    assert logits.shape == (len(expected_targets), len(tokenizer))
    ours = torch.nn.functional.cross_entropy(logits, batch["answer_targets"])
    torch.testing.assert_close(ours, hf_loss, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# partitions
# ---------------------------------------------------------------------------------------------
def assert_disjoint_cover(parts: list[list[MCExample]], examples: list[MCExample]) -> None:
    flat = [e.id for p in parts for e in p]
    assert len(flat) == len(set(flat)), "a client shares examples with another"
    assert Counter(flat) == Counter(ids_of(examples)), "the partition does not cover the data"


def concentration(parts: list[list[MCExample]], key: str = "task") -> float:
    """Mean over clients of the share of the client's most common class."""
    shares = []
    for p in parts:
        counts = Counter(getattr(e, key) for e in p)
        shares.append(max(counts.values()) / len(p))
    return sum(shares) / len(shares)


def test_partition_by_task_gives_each_client_whole_tasks(dataset: list[MCExample]) -> None:
    for n_clients in (1, 2, 3, 4):
        parts = partition_by_task(dataset, n_clients)
        assert_disjoint_cover(parts, dataset)
        assert parts == partition_by_task(dataset, n_clients)
        owners = Counter(t for p in parts for t in {e.task for e in p})
        assert all(v == 1 for v in owners.values())  # each task on exactly one client
        assert all(p for p in parts)
    assert all(len({e.task for e in p}) == 1 for p in partition_by_task(dataset, 4))
    assert concentration(partition_by_task(dataset, 4)) == 1.0


def test_partition_by_task_with_more_clients_than_tasks(dataset: list[MCExample]) -> None:
    parts = partition_by_task(dataset, 6)
    assert_disjoint_cover(parts, dataset)
    assert all(len({e.task for e in p}) == 1 for p in parts)
    assert sorted(len(p) for p in parts) == [50, 50, 50, 50, 100, 100]
    with pytest.raises(DatasetError):
        partition_by_task(dataset[:3], 4)


def test_dirichlet_partition_is_deterministic_disjoint_and_skewed(
        dataset: list[MCExample]) -> None:
    skewed = partition_dirichlet(dataset, 4, alpha=0.05, seed=1, min_size=5)
    assert_disjoint_cover(skewed, dataset)
    assert all(len(p) >= 5 for p in skewed)
    assert skewed == partition_dirichlet(dataset, 4, alpha=0.05, seed=1, min_size=5)
    assert skewed != partition_dirichlet(dataset, 4, alpha=0.05, seed=2, min_size=5)
    uniform = partition_dirichlet(dataset, 4, alpha=1000.0, seed=1)
    assert_disjoint_cover(uniform, dataset)
    # 4 balanced tasks: a uniform client's top task share is ~0.25; a skewed one's near 1
    assert concentration(skewed) > 0.8
    assert concentration(uniform) < 0.35
    assert max(len(p) for p in uniform) - min(len(p) for p in uniform) < 30
    by_label = partition_dirichlet(dataset, 3, alpha=0.05, seed=0, by="label")
    assert_disjoint_cover(by_label, dataset)
    assert concentration(by_label, "answer") > concentration(
        partition_dirichlet(dataset, 3, alpha=1000.0, seed=0, by="label"), "answer") + 0.3


def test_dirichlet_partition_refuses_impossible_requests(dataset: list[MCExample]) -> None:
    with pytest.raises(DatasetError, match="min_size"):
        partition_dirichlet(dataset[:40], 4, alpha=0.01, seed=0, min_size=10, max_tries=20)
    with pytest.raises(DatasetError):
        partition_dirichlet(dataset, 4, alpha=0.0, seed=0)
    with pytest.raises(DatasetError):
        partition_dirichlet(dataset[:3], 4, alpha=1.0, seed=0)


def test_iid_partition_and_config_dispatch(dataset: list[MCExample]) -> None:
    parts = partition_iid(dataset, 3, seed=0)
    assert_disjoint_cover(parts, dataset)
    assert concentration(parts) < 0.4
    cfg = PartitionConfig.from_dict({"scheme": "task"})
    assert partition(dataset, 4, cfg) == partition_by_task(dataset, 4)
    cfg = PartitionConfig.from_dict({"scheme": "dirichlet", "alpha": 0.3, "seed": 5})
    assert partition(dataset, 4, cfg) == partition_dirichlet(dataset, 4, 0.3, 5)
    with pytest.raises(ConfigError):
        PartitionConfig.from_dict({"scheme": "dirichlet", "alpah": 0.3})
    with pytest.raises(ConfigError):
        PartitionConfig.from_dict({"alpha": -1.0})


def test_public_split_is_disjoint_stratified_and_deterministic(
        dataset: list[MCExample]) -> None:
    private, public = split_public(dataset, count=80, seed=3)
    assert len(public) == 80 and len(private) == len(dataset) - 80
    assert not set(ids_of(private)) & set(ids_of(public))
    assert Counter(ids_of(private) + ids_of(public)) == Counter(ids_of(dataset))
    # no question text (within a task) is on both sides, even where the generator repeats one
    key = lambda e: (e.task, e.question.lower())  # noqa: E731
    assert not {key(e) for e in private} & {key(e) for e in public}
    assert len({key(e) for e in dataset}) < len(dataset)  # duplicates exist, so this mattered
    assert (private, public) == split_public(dataset, count=80, seed=3)
    assert public != split_public(dataset, count=80, seed=4)[1]
    counts = task_counts(public)
    assert set(counts) == {e.task for e in dataset}
    assert all(abs(c - 20) <= 4 for c in counts.values())
    _, by_fraction = split_public(dataset, 0.25, seed=0)
    assert abs(len(by_fraction) - 100) <= 3
    # the clients' shards of the private part never touch the public part
    for parts in (partition_by_task(private, 4), partition_dirichlet(private, 4, 0.1, seed=0)):
        assert not {e.id for p in parts for e in p} & set(ids_of(public))
    with pytest.raises(DatasetError):
        split_public(dataset, 0.2, count=10, seed=0)
    with pytest.raises(DatasetError):
        split_public(dataset, count=len(dataset), seed=0)


def test_public_split_of_unique_questions_is_exact() -> None:
    unique = [MCExample(f"question {i}", ("a", "b"), i % 2, f"t{i % 3}") for i in range(90)]
    private, public = split_public(unique, count=30, seed=0)
    assert len(public) == 30 and task_counts(public) == {"t0": 10, "t1": 10, "t2": 10}
    assert [e for e in unique if e in private] == private  # input order kept


def test_federated_split_and_client_test_sets(dataset: list[MCExample]) -> None:
    cfg = PartitionConfig(scheme="dirichlet", alpha=0.2, seed=4)
    clients, public = federated_split(dataset, 3, public_count=40, config=cfg)
    assert len(public) == 40
    assert_disjoint_cover([*clients, public], dataset)
    assert (clients, public) == federated_split(dataset, 3, public_count=40, config=cfg)
    test = generated_mc_dataset(200, seed=99)
    tests = client_test_splits(test, clients, n_per_client=60, seed=0)
    for shard, tset in zip(clients, tests, strict=True):
        assert len(tset) == 60 and {e.task for e in tset} <= {e.task for e in shard}
        train_mix, test_mix = Counter(e.task for e in shard), Counter(e.task for e in tset)
        for task, count in train_mix.items():
            assert abs(test_mix[task] / 60 - count / len(shard)) <= 1 / 60 + 1e-9
    assert tests == client_test_splits(test, clients, n_per_client=60, seed=0)
    shards = partition_by_task(dataset, 4)
    for shard, tset in zip(shards, client_test_splits(test, shards), strict=True):
        assert task_counts(tset) == {shard[0].task: 50}  # all 50 test questions of its task
    with pytest.raises(DatasetError, match="no test examples"):
        client_test_splits(generated_mc_dataset(8, tasks=("opposite",)), clients)


# ---------------------------------------------------------------------------------------------
# generated dataset
# ---------------------------------------------------------------------------------------------
def test_generated_dataset_is_deterministic_and_correct() -> None:
    a = generated_mc_dataset(200, seed=7)
    assert a == generated_mc_dataset(200, seed=7)
    assert a != generated_mc_dataset(200, seed=8)
    assert task_counts(a) == {"arithmetic": 50, "next_word": 50, "opposite": 50,
                              "successor": 50}
    n_choices = {e.task: e.n_choices for e in a}
    assert n_choices == {"arithmetic": 4, "next_word": 3, "successor": 4, "opposite": 2}
    assert len(Counter(e.answer for e in a if e.task == "arithmetic")) == 4  # shuffled
    for e in a:
        assert len(set(e.choices)) == e.n_choices
        if e.task == "arithmetic":
            words = e.question.split()
            assert int(e.answer_text) == int(words[2]) + int(words[4])
    only = generated_mc_dataset(10, seed=0, tasks=("opposite",))
    assert {e.task for e in only} == {"opposite"}
    with pytest.raises(DatasetError):
        generated_mc_dataset(5, tasks=("nope",))
