"""Multiple-choice QA data: examples, loaders, prompts, causal-LM features, partitions.

The unit of data is :class:`MCExample` (question, choices, index of the correct choice, task,
id). From there:

* **Loaders** read JSONL files (stdlib only), ``datasets`` objects, local dataset
  directories (``save_to_disk`` output, or a folder of ``{split}.jsonl`` / ``.json`` /
  ``.parquet`` / ``.csv`` files) and the bundled BIG-bench subsets (:func:`load_bigbench_mc`).
  Nothing is downloaded unless ``allow_hub=True`` is passed explicitly.
* **Prompt**: ``"Question: {question}\\nAnswer:"`` followed by ``" " + choice``
  (:class:`PromptConfig`; the same template the bigbench-mc README's zero-shot numbers use).
  The prompt is tokenised with the tokenizer's special tokens (e.g. BOS); the answer tokens are
  the tokens of ``prompt + " " + choice`` beyond the prompt's tokens (the lm-eval-harness
  rule, so the answer is tokenised as it reads in running text), or the choice tokenised alone
  when the joint tokenisation does not start with the prompt's tokens. Training
  (:func:`to_causal_lm_example`) and scoring (``evaluation``) use the same token ids.
* **Features**: ``input_ids``, ``attention_mask``, ``labels`` (the answer tokens, ``-100``
  elsewhere, aligned with ``input_ids`` as in HF: the model shifts internally) and
  ``answer_positions`` (positions whose logits predict an answer token, i.e. each answer
  token's index minus one). :class:`CausalLMCollator` right-pads a batch and adds
  ``answer_mask`` (bool, ``(batch, length)``, true at answer positions: pass it as a model's
  ``logits_to_keep`` to run the LM head only there) and ``answer_targets`` (the tokens those
  positions predict, in the row-major order of ``answer_mask``).
* **Partitions** across clients, non-IID: :func:`partition_by_task`,
  :func:`partition_dirichlet` (over tasks or answer labels), :func:`partition_iid`, and the
  server's public split :func:`split_public` (disjoint by question text from the private
  part); :func:`federated_split` does both, :func:`client_test_splits` gives each client a
  test set with its own task mix. Randomness comes from ``numpy.random.default_rng(seed)``
  with an explicit seed: this is experiment data splitting, not key material.
* **Generated data** for tests: :func:`generated_mc_dataset` (arithmetic, next word in a
  pattern, number successor, opposites), deterministic given a seed, learnable by tiny models.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from ..config import ConfigBase, require
from ..errors import DatasetError

__all__ = [
    "BIGBENCH_MC_TASKS",
    "DATA_DIR_ENV",
    "IGNORE_INDEX",
    "CausalLMCollator",
    "DatasetError",
    "EncodedExample",
    "MCExample",
    "PartitionConfig",
    "PromptConfig",
    "bigbench_mc_dir",
    "client_test_splits",
    "default_data_dir",
    "encode_example",
    "examples_from_records",
    "federated_split",
    "format_choice",
    "format_prompt",
    "from_hf_dataset",
    "generated_mc_dataset",
    "load_bigbench_mc",
    "load_jsonl",
    "load_mc_dataset",
    "pad_token_id_of",
    "partition",
    "partition_by_task",
    "partition_dirichlet",
    "partition_iid",
    "split_public",
    "task_counts",
    "to_causal_lm_example",
    "tokenize_examples",
    "write_jsonl",
]

IGNORE_INDEX = -100
"""Label value ignored by the cross-entropy loss (HF / PyTorch convention)."""

DATA_DIR_ENV = "FEDCOLLM_DATA_DIR"
"""Environment variable naming the data root (the folder that holds ``bigbench-mc/``)."""

BIGBENCH_MC_TASKS = (
    "goal_step_wikihow.step_inference",
    "social_iqa",
    "strategyqa",
    "unit_conversion.different_systems",
)



# ----------------------------------------------------------------------------------------------
# examples
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MCExample:
    """One multiple-choice question with exactly one correct choice.

    ``answer`` is the 0-based index of the correct choice. An empty ``id`` is replaced by a
    content hash (``task`` + question + choices), so ids are stable across runs.
    """

    question: str
    choices: tuple[str, ...]
    answer: int
    task: str = "default"
    id: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.question, str) or not self.question.strip():
            raise DatasetError(f"example {self.id!r}: question must be a non-empty string")
        if isinstance(self.choices, (str, bytes)) or not isinstance(self.choices, Sequence):
            raise DatasetError(f"example {self.id!r}: choices must be a sequence of strings")
        choices = tuple(self.choices)
        object.__setattr__(self, "choices", choices)
        if len(choices) < 2:
            raise DatasetError(f"example {self.id!r}: needs at least 2 choices, got {len(choices)}")
        for i, choice in enumerate(choices):
            if not isinstance(choice, str) or not choice.strip():
                raise DatasetError(f"example {self.id!r}: choice {i} must be a non-empty string")
        if isinstance(self.answer, bool) or not isinstance(self.answer, (int, np.integer)):
            raise DatasetError(f"example {self.id!r}: answer must be an integer index")
        object.__setattr__(self, "answer", int(self.answer))
        if not 0 <= self.answer < len(choices):
            raise DatasetError(
                f"example {self.id!r}: answer {self.answer} out of range for {len(choices)} choices"
            )
        if not isinstance(self.task, str) or not self.task.strip():
            raise DatasetError(f"example {self.id!r}: task must be a non-empty string")
        if not isinstance(self.id, str):
            raise DatasetError(f"example id must be a string, got {type(self.id).__name__}")
        if not self.id:
            digest = hashlib.sha256(
                json.dumps([self.task, self.question, list(choices)]).encode("utf-8")
            ).hexdigest()[:16]
            object.__setattr__(self, "id", f"{self.task}-{digest}")

    @property
    def answer_text(self) -> str:
        return self.choices[self.answer]

    @property
    def n_choices(self) -> int:
        return len(self.choices)

    def to_dict(self) -> dict[str, Any]:
        """The bigbench-mc JSONL schema: id, question, choices, answer, task."""
        return {"id": self.id, "question": self.question, "choices": list(self.choices),
                "answer": self.answer, "task": self.task}

    @classmethod
    def from_dict(cls, record: Mapping[str, Any], *, task: str | None = None,
                  id: str | None = None) -> MCExample:
        """Build from a record; extra keys are ignored.

        Accepted schemas: ours (``question``, ``choices`` list, ``answer`` index, optional
        ``task`` and ``id``) and the ARC / OpenBookQA / CommonsenseQA style (``question`` or
        ``question_stem``, ``choices = {"text": [...], "label": [...]}``, ``answerKey``).
        ``task`` / ``id`` fill in when the record has none.
        """
        if not isinstance(record, Mapping):
            raise DatasetError(f"expected a mapping, got {type(record).__name__}")
        rid = record.get("id", id)
        rid = "" if rid is None else str(rid)
        question = record.get("question", record.get("question_stem"))
        if isinstance(question, Mapping):  # CommonsenseQA-like nesting {"stem": ...}
            question = question.get("stem")
        choices: Any = record.get("choices")
        labels: list[Any] | None = None
        if isinstance(choices, Mapping):
            labels = list(choices.get("label", []))
            choices = choices.get("text")
        if choices is None or isinstance(choices, (str, bytes)):
            raise DatasetError(f"record {rid!r}: missing or invalid 'choices'")
        choices = [str(c).strip() if isinstance(c, str) else c for c in choices]
        answer: Any = record.get("answer", record.get("answerKey", record.get("label")))
        if isinstance(answer, str):
            key = answer.strip()
            if labels and key in [str(lb) for lb in labels]:
                answer = [str(lb) for lb in labels].index(key)
            elif key.lstrip("-").isdigit():
                answer = int(key)
            else:
                raise DatasetError(f"record {rid!r}: cannot resolve answer {answer!r}")
        if answer is None:
            raise DatasetError(f"record {rid!r}: missing 'answer'")
        rtask = record.get("task") or task or "default"
        return cls(question=question, choices=tuple(choices), answer=answer, task=str(rtask),
                   id=rid)


def examples_from_records(records: Iterable[Mapping[str, Any]], *, task: str | None = None,
                          limit: int | None = None, source: str = "records") -> list[MCExample]:
    """Convert records to examples; an unnamed record gets ``{task}-{n}`` as its id."""
    out: list[MCExample] = []
    for n, record in enumerate(records):
        if limit is not None and len(out) >= limit:
            break
        try:
            default_id = None if task is None else f"{task}-{n}"
            out.append(MCExample.from_dict(record, task=task, id=default_id))
        except DatasetError as exc:
            raise DatasetError(f"{source}, record {n}: {exc}") from None
    return out


def task_counts(examples: Iterable[MCExample]) -> dict[str, int]:
    """Number of examples per task, sorted by task name."""
    return dict(sorted(Counter(e.task for e in examples).items()))


# ----------------------------------------------------------------------------------------------
# loaders
# ----------------------------------------------------------------------------------------------
def load_jsonl(paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *,
               task: str | None = None, limit: int | None = None) -> list[MCExample]:
    """Read examples from one or more JSONL files (blank lines skipped), in file order.

    ``limit`` caps the total. Errors name the file and line.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[MCExample] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise DatasetError(f"no such file: {path}")
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if limit is not None and len(out) >= limit:
                    return out
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    default_id = None if task is None else f"{task}-{lineno}"
                    out.append(MCExample.from_dict(record, task=task, id=default_id))
                except json.JSONDecodeError as exc:
                    raise DatasetError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
                except DatasetError as exc:
                    raise DatasetError(f"{path}:{lineno}: {exc}") from None
    return out


def write_jsonl(examples: Iterable[MCExample], path: str | os.PathLike[str]) -> None:
    """Write examples in the bigbench-mc schema, one JSON object per line."""
    with Path(path).open("w", encoding="utf-8") as fh:
        for ex in examples:
            fh.write(json.dumps(ex.to_dict(), ensure_ascii=False) + "\n")


def from_hf_dataset(dataset: Any, *, split: str | None = None, task: str | None = None,
                    limit: int | None = None) -> list[MCExample]:
    """Examples from a ``datasets.Dataset`` (or a ``DatasetDict`` plus ``split``).

    Any iterable of mappings works too (e.g. a list of dicts or an ``IterableDataset``).
    """
    import datasets

    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split is None:
            raise DatasetError(f"a DatasetDict needs split=, one of {sorted(dataset.keys())}")
        if split not in dataset:
            raise DatasetError(f"split {split!r} not in {sorted(dataset.keys())}")
        dataset = dataset[split]
    return examples_from_records(dataset, task=task, limit=limit, source="dataset")


_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_mc_dataset(source: str | os.PathLike[str], split: str = "train", *,
                    task: str | None = None, limit: int | None = None,
                    name: str | None = None, allow_hub: bool = False,
                    cache_dir: str | None = None) -> list[MCExample]:
    """Load examples from a local file or directory, or (opt-in) a dataset hub name.

    * ``*.jsonl`` file: read directly (no ``datasets`` cache involved).
    * ``*.json`` / ``*.parquet`` / ``*.csv`` file: ``datasets.load_dataset(<builder>,
      data_files=...)`` (offline; packaged builders need no download).
    * a directory written by ``save_to_disk``: ``datasets.load_from_disk`` (+ ``split``).
    * a directory with ``{split}.jsonl`` (or ``.json`` / ``.parquet`` / ``.csv``): that file.
    * anything else is a hub name, loaded with ``datasets.load_dataset(source, name,
      split=split)`` only when ``allow_hub=True`` (this may download); refused otherwise.
    """
    path = Path(source)
    if path.is_file():
        if path.suffix == ".jsonl":
            return load_jsonl(path, task=task, limit=limit)
        builder = _FILE_BUILDERS.get(path.suffix)
        if builder is None:
            raise DatasetError(f"unsupported file type {path.suffix!r}: {path}")
        import datasets

        ds = datasets.load_dataset(builder, data_files=str(path), split="train",
                                   cache_dir=cache_dir)
        return from_hf_dataset(ds, task=task, limit=limit)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            import datasets

            loaded = datasets.load_from_disk(str(path))
            return from_hf_dataset(loaded, split=split, task=task, limit=limit)
        for suffix in (".jsonl", ".json", ".parquet", ".csv"):
            candidate = path / f"{split}{suffix}"
            if candidate.is_file():
                return load_mc_dataset(candidate, split, task=task, limit=limit,
                                       cache_dir=cache_dir)
        raise DatasetError(f"{path}: no saved dataset and no {split}.jsonl/.json/.parquet/.csv")
    if not allow_hub:
        raise DatasetError(
            f"{str(source)!r} is not a local file or directory; loading a dataset by hub name "
            "may download it, pass allow_hub=True to allow that")
    import datasets

    try:
        ds = datasets.load_dataset(str(source), name, split=split, cache_dir=cache_dir)
    except Exception as exc:  # network/hub errors come in many types
        raise DatasetError(f"could not load dataset {str(source)!r}: {exc}") from exc
    return from_hf_dataset(ds, task=task, limit=limit)


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def default_data_dir() -> Path | None:
    """The data root (the folder holding ``bigbench-mc/``), or None when none is found.

    ``$FEDCOLLM_DATA_DIR`` wins when set (it may also point at ``bigbench-mc`` itself);
    otherwise ``<repo>/../shared/data`` (the CI layout), then ``<repo>/shared/data``.
    """
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    root = _repo_root()
    for candidate in (root.parent / "shared" / "data", root / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    return None


def bigbench_mc_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Locate the bigbench-mc folder (``data_dir`` may be the data root or the folder)."""
    base = Path(data_dir) if data_dir is not None else default_data_dir()
    if base is None:
        raise DatasetError(
            f"bigbench-mc data not found: set {DATA_DIR_ENV} or place it at ../shared/data")
    for candidate in (base / "bigbench-mc", base):
        if candidate.is_dir() and any(
                (candidate / t / "train.jsonl").is_file() for t in BIGBENCH_MC_TASKS):
            return candidate
        if candidate.is_dir() and any(p.is_dir() and (p / "train.jsonl").is_file()
                                      for p in candidate.iterdir()):
            return candidate
    raise DatasetError(f"bigbench-mc data not found under {base}")


def load_bigbench_mc(tasks: str | Sequence[str] | None = None, split: str = "train",
                     data_dir: str | os.PathLike[str] | None = None,
                     limit: int | None = None) -> list[MCExample]:
    """Load the bundled BIG-bench multiple-choice subsets.

    ``tasks``: one name, several, or None for every task present; a BIG-bench path
    (``unit_conversion/different_systems``) works as well as its directory name. ``split`` is
    ``train``, ``validation`` or ``test``. ``limit`` caps the examples *per task* (the first
    ones in file order). Tasks are concatenated in the order given.
    """
    root = bigbench_mc_dir(data_dir)
    available = sorted(p.name for p in root.iterdir()
                       if p.is_dir() and (p / "train.jsonl").is_file())
    if tasks is None:
        names = available
    else:
        names = [tasks] if isinstance(tasks, str) else list(tasks)
        names = [t.replace("/", ".") for t in names]
    if not names:
        raise DatasetError("no tasks selected")
    out: list[MCExample] = []
    for name in names:
        if name not in available:
            raise DatasetError(f"unknown bigbench-mc task {name!r}; available: {available}")
        path = root / name / f"{split}.jsonl"
        if not path.is_file():
            raise DatasetError(f"task {name!r} has no split {split!r} ({path})")
        out.extend(load_jsonl(path, task=name, limit=limit))
    return out


# ----------------------------------------------------------------------------------------------
# prompts and tokenisation
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptConfig(ConfigBase):
    """How a question and a choice become text.

    ``template`` must contain ``{question}`` (``{task}`` is optional); the choice follows as
    ``choice_prefix + choice``. Default: ``"Question: {question}\\nAnswer:"`` + ``" choice"``.
    """

    section: ClassVar[str] = "data.prompt"
    template: str = "Question: {question}\nAnswer:"
    choice_prefix: str = " "

    def validate(self) -> None:
        require("{question}" in self.template, f"{self.section}.template needs {{question}}")
        try:
            self.template.format(question="q", task="t")
        except (KeyError, IndexError, ValueError) as exc:
            raise DatasetError(f"{self.section}.template: bad placeholder ({exc})") from None


DEFAULT_PROMPT = PromptConfig()


def format_prompt(example: MCExample, prompt: PromptConfig = DEFAULT_PROMPT) -> str:
    return prompt.template.format(question=example.question, task=example.task)


def format_choice(choice: str, prompt: PromptConfig = DEFAULT_PROMPT) -> str:
    return prompt.choice_prefix + choice


def pad_token_id_of(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its EOS id (the usual choice for causal LMs)."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    raise DatasetError("the tokenizer has neither a pad nor an EOS token")


def _ids(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    encoded = tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
    return [list(map(int, ids)) for ids in encoded]


@dataclass(frozen=True)
class EncodedExample:
    """Token ids of a question's prompt and of each of its choices (not truncated)."""

    prompt_ids: tuple[int, ...]
    choice_ids: tuple[tuple[int, ...], ...]
    answer: int


def encode_example(example: MCExample, tokenizer: Any,
                   prompt: PromptConfig = DEFAULT_PROMPT) -> EncodedExample:
    """Tokenise the prompt (with special tokens) and each choice continuation.

    A choice's ids are those of ``prompt + choice_prefix + choice`` beyond the prompt's ids
    when that joint encoding starts with the prompt's ids, else the continuation encoded alone
    without special tokens. Either way ``prompt_ids + choice_ids[i]`` is the scored sequence.
    """
    prompt_text = format_prompt(example, prompt)
    conts = [format_choice(c, prompt) for c in example.choices]
    prompt_ids = _ids(tokenizer, [prompt_text], True)[0]
    joint = _ids(tokenizer, [prompt_text + c for c in conts], True)
    n = len(prompt_ids)
    choice_ids: list[tuple[int, ...]] = []
    alone: list[list[int]] | None = None
    for i, ids in enumerate(joint):
        if len(ids) > n and ids[:n] == prompt_ids:
            choice_ids.append(tuple(ids[n:]))
            continue
        if alone is None:
            alone = _ids(tokenizer, conts, False)
        if not alone[i]:
            raise DatasetError(f"example {example.id!r}: choice {i} encodes to no tokens")
        choice_ids.append(tuple(alone[i]))
    if not prompt_ids:
        raise DatasetError(f"example {example.id!r}: the prompt encodes to no tokens")
    return EncodedExample(tuple(prompt_ids), tuple(choice_ids), example.answer)


def truncate_prompt(prompt_ids: Sequence[int], n_answer: int, max_length: int | None,
                    keep_first: bool) -> list[int]:
    """Drop prompt tokens from the left so prompt + answer fits ``max_length``.

    ``keep_first`` keeps the first token (a BOS). At least one prompt token must remain.
    """
    ids = list(prompt_ids)
    if max_length is None or len(ids) + n_answer <= max_length:
        return ids
    room = max_length - n_answer
    if room < (2 if keep_first and len(ids) > 1 else 1):
        raise DatasetError(
            f"max_length={max_length} leaves no room for a prompt before {n_answer} answer "
            "tokens")
    if keep_first and len(ids) > 1:
        return ids[:1] + ids[len(ids) - (room - 1):]
    return ids[len(ids) - room:]


def _starts_with_bos(tokenizer: Any, ids: Sequence[int]) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    return bool(ids) and isinstance(bos, int) and ids[0] == bos


def to_causal_lm_example(example: MCExample, tokenizer: Any, max_length: int | None = None, *,
                         prompt: PromptConfig = DEFAULT_PROMPT,
                         choice: int | None = None) -> dict[str, list[int]]:
    """Features for causal-LM training on the answer only.

    Returns ``input_ids`` (prompt then answer), ``attention_mask`` (all ones), ``labels``
    (the answer tokens, :data:`IGNORE_INDEX` elsewhere; aligned with ``input_ids``) and
    ``answer_positions`` (``[i - 1 for each answer token index i]``: the positions whose
    next-token logits produce the answer). ``choice`` selects another choice than the correct
    one (e.g. for contrastive use). Over-long prompts lose tokens from the left (a leading
    BOS is kept); the answer is never truncated.
    """
    enc = encode_example(example, tokenizer, prompt)
    k = example.answer if choice is None else choice
    if not 0 <= k < example.n_choices:
        raise DatasetError(f"choice {k} out of range for example {example.id!r}")
    answer_ids = list(enc.choice_ids[k])
    prompt_ids = truncate_prompt(enc.prompt_ids, len(answer_ids), max_length,
                                 _starts_with_bos(tokenizer, enc.prompt_ids))
    input_ids = prompt_ids + answer_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    start = len(prompt_ids)
    return {
        "input_ids": input_ids,
        "attention_mask": [1] * len(input_ids),
        "labels": labels,
        "answer_positions": list(range(start - 1, start - 1 + len(answer_ids))),
    }


def tokenize_examples(examples: Iterable[MCExample], tokenizer: Any,
                      max_length: int | None = None, *,
                      prompt: PromptConfig = DEFAULT_PROMPT) -> list[dict[str, list[int]]]:
    """:func:`to_causal_lm_example` over a dataset (a list usable with a DataLoader)."""
    return [to_causal_lm_example(e, tokenizer, max_length, prompt=prompt) for e in examples]


class CausalLMCollator:
    """Right-pads features from :func:`to_causal_lm_example` into a batch of tensors.

    Output: ``input_ids`` (pad id), ``attention_mask`` (0 on padding), ``labels``
    (:data:`IGNORE_INDEX` on padding), ``answer_mask`` (bool, true at answer positions) and
    ``answer_targets`` (``input_ids[b, p + 1]`` for each true ``answer_mask[b, p]`` in
    row-major order), so that ``cross_entropy(model(..., logits_to_keep=answer_mask).logits,
    answer_targets)`` is the answer-token loss with the LM head run only where it is needed.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise DatasetError("pad_to_multiple_of must be positive")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
        if not features:
            raise DatasetError("cannot collate an empty batch")
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = math.ceil(length / self.pad_to_multiple_of) * self.pad_to_multiple_of
        b = len(features)
        input_ids = torch.full((b, length), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((b, length), dtype=torch.long)
        labels = torch.full((b, length), IGNORE_INDEX, dtype=torch.long)
        answer_mask = torch.zeros((b, length), dtype=torch.bool)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[i, :n] = torch.tensor(list(f["input_ids"]), dtype=torch.long)
            attention[i, :n] = torch.tensor(list(f.get("attention_mask", [1] * n)),
                                            dtype=torch.long)
            if "labels" in f:
                labels[i, :n] = torch.tensor(list(f["labels"]), dtype=torch.long)
            positions = f.get("answer_positions")
            if positions is None:
                positions = [j - 1 for j, t in enumerate(f["labels"]) if t != IGNORE_INDEX]
            if positions:
                answer_mask[i, torch.tensor(list(positions), dtype=torch.long)] = True
        rows, cols = answer_mask.nonzero(as_tuple=True)
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels,
                "answer_mask": answer_mask, "answer_targets": input_ids[rows, cols + 1]}


# ----------------------------------------------------------------------------------------------
# partitions
# ----------------------------------------------------------------------------------------------
def _check_clients(n_examples: int, n_clients: int, min_size: int = 1) -> None:
    if isinstance(n_clients, bool) or not isinstance(n_clients, int) or n_clients < 1:
        raise DatasetError(f"n_clients must be a positive integer, got {n_clients!r}")
    if n_examples < n_clients * min_size:
        raise DatasetError(
            f"{n_examples} examples cannot give {n_clients} clients {min_size} example(s) each")


def partition_iid(examples: Sequence[MCExample], n_clients: int,
                  seed: int) -> list[list[MCExample]]:
    """Shuffle and deal out evenly (the IID reference)."""
    _check_clients(len(examples), n_clients)
    order = np.random.default_rng(seed).permutation(len(examples))
    return [[examples[int(i)] for i in part] for part in np.array_split(order, n_clients)]


def partition_by_task(examples: Sequence[MCExample],
                      n_clients: int) -> list[list[MCExample]]:
    """Give each client whole tasks (pathological non-IID; deterministic, no randomness).

    With at least as many tasks as clients, tasks go largest first to the client with the
    fewest examples so far (ties to the lowest client index), so each client holds one or
    more whole tasks. With fewer tasks than clients, clients are dealt to tasks round-robin
    (client ``k`` to task ``k mod n_tasks``, tasks sorted by name) and each task's examples
    are split into contiguous, near-equal shares among its clients: each client still sees
    one task only. Example order within a task is preserved.
    """
    _check_clients(len(examples), n_clients)
    by_task: dict[str, list[MCExample]] = defaultdict(list)
    for ex in examples:
        by_task[ex.task].append(ex)
    tasks = sorted(by_task)
    parts: list[list[MCExample]] = [[] for _ in range(n_clients)]
    if len(tasks) >= n_clients:
        for task in sorted(tasks, key=lambda t: (-len(by_task[t]), t)):
            k = min(range(n_clients), key=lambda c: (len(parts[c]), c))
            parts[k].extend(by_task[task])
        return parts
    owners: dict[str, list[int]] = defaultdict(list)
    for k in range(n_clients):
        owners[tasks[k % len(tasks)]].append(k)
    for task, clients in owners.items():
        items = by_task[task]
        if len(items) < len(clients):
            raise DatasetError(f"task {task!r} has {len(items)} examples for {len(clients)} "
                               "clients")
        bounds = np.linspace(0, len(items), len(clients) + 1).round().astype(int)
        for j, k in enumerate(clients):
            parts[k] = list(items[bounds[j]:bounds[j + 1]])
    return parts


def partition_dirichlet(examples: Sequence[MCExample], n_clients: int, alpha: float,
                        seed: int, *, by: Literal["task", "label"] = "task",
                        min_size: int = 1, max_tries: int = 1000) -> list[list[MCExample]]:
    """Label-skewed split: for each class, client shares ~ Dirichlet(alpha, ..., alpha).

    Classes are tasks (``by="task"``) or answer indices (``by="label"``). Small ``alpha``
    concentrates each class on few clients; large ``alpha`` approaches an even split. Draws
    are repeated (from the same generator) until every client holds at least ``min_size``
    examples; after ``max_tries`` draws a :class:`DatasetError` is raised. Deterministic given
    ``seed``; the examples of each client keep the input order.
    """
    _check_clients(len(examples), n_clients, min_size)
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise DatasetError(f"alpha must be a finite positive number, got {alpha!r}")
    if by not in ("task", "label"):
        raise DatasetError(f"by must be 'task' or 'label', got {by!r}")
    classes: dict[Any, list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        classes[ex.task if by == "task" else ex.answer].append(i)
    keys = sorted(classes, key=str)
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        assignment = np.empty(len(examples), dtype=np.int64)
        for key in keys:
            idx = np.asarray(classes[key])
            shares = rng.dirichlet(np.full(n_clients, float(alpha)))
            perm = rng.permutation(idx)
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(perm, cuts)):
                assignment[chunk] = k
        sizes = np.bincount(assignment, minlength=n_clients)
        if sizes.min() >= min_size:
            return [[examples[int(i)] for i in np.flatnonzero(assignment == k)]
                    for k in range(n_clients)]
    raise DatasetError(f"no Dirichlet(alpha={alpha}) draw in {max_tries} gave every one of "
                       f"{n_clients} clients >= {min_size} examples; raise alpha or lower "
                       "min_size")


def _question_key(ex: MCExample) -> tuple[str, str]:
    return ex.task, " ".join(ex.question.lower().split())


def split_public(examples: Sequence[MCExample], fraction: float | None = None, *,
                 count: int | None = None, seed: int,
                 stratify: bool = True) -> tuple[list[MCExample], list[MCExample]]:
    """Split off the server's public data; returns ``(private, public)``.

    Give exactly one of ``fraction`` (of the examples) or ``count``. Examples sharing a
    question (same task, same text up to case and whitespace) stay on one side, so no
    question the server sees is also a client's private question. With ``stratify`` the
    public part draws from each task in proportion to its size (largest remainders), topped
    up from other tasks when repeated questions leave a task short. The public part has
    exactly the requested size unless repeated questions make that impossible (then fewer,
    never more). Both sides keep the input order.
    """
    if (fraction is None) == (count is None):
        raise DatasetError("give exactly one of fraction= or count=")
    n = len(examples)
    if fraction is not None:
        if not (isinstance(fraction, (int, float)) and 0 < fraction < 1):
            raise DatasetError(f"fraction must be in (0, 1), got {fraction!r}")
        target = round(fraction * n)
    elif count is not None:
        if isinstance(count, bool) or not isinstance(count, int) or not 0 < count < n:
            raise DatasetError(f"count must be an integer in (0, {n}), got {count!r}")
        target = count
    if target < 1 or target >= n:
        raise DatasetError(f"a public split of {target} from {n} examples leaves a side empty")
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        groups[_question_key(ex)].append(i)
    rng = np.random.default_rng(seed)
    strata: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for key in groups:
        strata[key[0] if stratify else ""].append(key)
    names = sorted(strata)
    sizes = {s: sum(len(groups[k]) for k in strata[s]) for s in names}
    quotas = {s: target * sizes[s] / n for s in names}
    floor = {s: int(quotas[s]) for s in names}
    left = target - sum(floor.values())
    for s in sorted(names, key=lambda s: (-(quotas[s] - floor[s]), s))[:left]:
        floor[s] += 1
    public: set[int] = set()
    unused: list[tuple[str, str]] = []
    for s in names:
        keys = strata[s]
        for j in rng.permutation(len(keys)):
            members = groups[keys[int(j)]]
            if 0 < len(members) <= floor[s]:
                public.update(members)
                floor[s] -= len(members)
            else:
                unused.append(keys[int(j)])
    for key in unused:  # top up across strata when repeated questions left a stratum short
        members = groups[key]
        if len(members) <= target - len(public):
            public.update(members)
    if not public or len(public) == n:
        raise DatasetError("the public split came out empty or took everything")
    private = [ex for i, ex in enumerate(examples) if i not in public]
    return private, [ex for i, ex in enumerate(examples) if i in public]


@dataclass(frozen=True)
class PartitionConfig(ConfigBase):
    """How private data is spread over clients (see :func:`partition`)."""

    section: ClassVar[str] = "data.partition"
    scheme: Literal["task", "dirichlet", "iid"] = "dirichlet"
    alpha: float = 0.5
    by: Literal["task", "label"] = "task"
    min_size: int = 1
    seed: int = 0

    def validate(self) -> None:
        require(math.isfinite(self.alpha) and self.alpha > 0,
                f"{self.section}.alpha must be a finite positive number")
        require(self.min_size >= 1, f"{self.section}.min_size must be >= 1")


def partition(examples: Sequence[MCExample], n_clients: int,
              config: PartitionConfig | None = None) -> list[list[MCExample]]:
    """Dispatch to the partitioner that ``config.scheme`` names."""
    cfg = config or PartitionConfig()
    if cfg.scheme == "task":
        return partition_by_task(examples, n_clients)
    if cfg.scheme == "iid":
        return partition_iid(examples, n_clients, cfg.seed)
    return partition_dirichlet(examples, n_clients, cfg.alpha, cfg.seed, by=cfg.by,
                               min_size=cfg.min_size)


def federated_split(examples: Sequence[MCExample], n_clients: int, *,
                    public_fraction: float | None = None, public_count: int | None = None,
                    config: PartitionConfig | None = None,
                    ) -> tuple[list[list[MCExample]], list[MCExample]]:
    """:func:`split_public` then :func:`partition` of the private rest: ``(clients, public)``.

    The public split uses ``config.seed``; clients never hold a public question.
    """
    cfg = config or PartitionConfig()
    private, public = split_public(examples, public_fraction, count=public_count, seed=cfg.seed)
    return partition(private, n_clients, cfg), public


def client_test_splits(test: Sequence[MCExample], clients: Sequence[Sequence[MCExample]], *,
                       n_per_client: int | None = None,
                       seed: int = 0) -> list[list[MCExample]]:
    """A test set per client with the task mix of that client's training shard.

    Each client gets ``n_per_client`` test questions (default: as many as its tasks have in
    ``test``), allotted to tasks in proportion to the client's training examples (largest
    remainders) and drawn without replacement from that task's test questions (fewer when a
    task runs out). Different clients may share test questions (test data is not private).
    Deterministic given ``seed``; each result keeps the order of ``test``.
    """
    by_task: dict[str, list[int]] = defaultdict(list)
    for i, ex in enumerate(test):
        by_task[ex.task].append(i)
    rng = np.random.default_rng(seed)
    out: list[list[MCExample]] = []
    for shard in clients:
        mix = Counter(e.task for e in shard)
        if not mix:
            raise DatasetError("a client has no training examples")
        missing = sorted(t for t in mix if t not in by_task)
        if missing:
            raise DatasetError(f"no test examples for task(s) {missing}")
        total = sum(mix.values())
        n = n_per_client if n_per_client is not None else sum(len(by_task[t]) for t in mix)
        quotas = {t: n * c / total for t, c in mix.items()}
        alloc = {t: int(q) for t, q in quotas.items()}
        for t in sorted(mix, key=lambda t: (-(quotas[t] - alloc[t]), t))[:n - sum(
                alloc.values())]:
            alloc[t] += 1
        chosen: list[int] = []
        for t in sorted(mix):
            pool = by_task[t]
            take = rng.permutation(len(pool))[:min(alloc[t], len(pool))]
            chosen.extend(pool[int(j)] for j in take)
        out.append([test[i] for i in sorted(chosen)])
    return out


# ----------------------------------------------------------------------------------------------
# generated data (tests)
# ----------------------------------------------------------------------------------------------
_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                 "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
                 "seventeen", "eighteen", "nineteen"]
_TENS = {20: "twenty", 30: "thirty"}
_PATTERNS = (("red", "green", "blue"), ("sun", "moon", "star", "sky"), ("cat", "dog"),
             ("up", "down", "left", "right"))
_OPPOSITES = (("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"),
              ("light", "dark"), ("high", "low"), ("open", "closed"), ("early", "late"))

GENERATED_TASKS = ("arithmetic", "next_word", "successor", "opposite")
"""Tasks of :func:`generated_mc_dataset`: 4, 3, 4 and 2 choices respectively; successor's
choices are number words of one or two words ("twenty one"), so summed and length-normalised
scores can disagree."""


def _number_word(n: int) -> str:
    if n < 20:
        return _NUMBER_WORDS[n]
    tens, unit = divmod(n, 10)
    word = _TENS[tens * 10]
    return word if unit == 0 else f"{word} {_NUMBER_WORDS[unit]}"


def _generate_one(task: str, rng: np.random.Generator) -> tuple[str, list[str], str]:
    if task == "arithmetic":
        a, b = (int(x) for x in rng.integers(0, 10, size=2))
        right = a + b
        wrong = [int(x) for x in rng.permutation([v for v in range(19) if v != right])[:3]]
        return f"What is {a} plus {b} ?", [str(v) for v in [right, *wrong]], str(right)
    if task == "next_word":
        pattern = _PATTERNS[int(rng.integers(len(_PATTERNS)))]
        start = int(rng.integers(len(pattern)))
        length = int(rng.integers(3, 7))
        seq = [pattern[(start + i) % len(pattern)] for i in range(length)]
        right_word = pattern[(start + length) % len(pattern)]
        pool = [w for p in _PATTERNS for w in p if w != right_word]
        others = [w for w in pattern if w != right_word]
        distractors = list(dict.fromkeys(others + [pool[int(i)] for i in
                                                   rng.permutation(len(pool))]))[:2]
        return ("Which word comes next : " + " ".join(seq) + " ?",
                [right_word, *distractors], right_word)
    if task == "successor":
        n = int(rng.integers(0, 30))
        right_n = n + 1
        wrong = [int(x) for x in rng.permutation([v for v in range(32) if v != right_n])[:3]]
        return (f"Which number comes after {_number_word(n)} ?",
                [_number_word(v) for v in [right_n, *wrong]], _number_word(right_n))
    if task == "opposite":
        pair = _OPPOSITES[int(rng.integers(len(_OPPOSITES)))]
        flip = int(rng.integers(2))
        word, right_word = pair[flip], pair[1 - flip]
        other = _OPPOSITES[int(rng.integers(len(_OPPOSITES)))]
        wrong_word = word if other == pair else other[int(rng.integers(2))]
        return f"What is the opposite of {word} ?", [right_word, wrong_word], right_word
    raise DatasetError(f"unknown generated task {task!r}; known: {list(GENERATED_TASKS)}")


def generated_mc_dataset(n: int, seed: int = 0,
                         tasks: Sequence[str] = GENERATED_TASKS) -> list[MCExample]:
    """``n`` generated questions, tasks dealt round-robin, choices shuffled.

    Deterministic given ``seed`` and ``tasks``. Questions are whitespace-separated words and
    punctuation (easy to build a word-level test tokenizer for).
    """
    if n < 1:
        raise DatasetError("n must be positive")
    if not tasks:
        raise DatasetError("no tasks given")
    rng = np.random.default_rng(seed)
    out: list[MCExample] = []
    for i in range(n):
        task = tasks[i % len(tasks)]
        question, choices, right = _generate_one(task, rng)
        order = [int(j) for j in rng.permutation(len(choices))]
        shuffled = tuple(choices[j] for j in order)
        out.append(MCExample(question=question, choices=shuffled,
                             answer=shuffled.index(right), task=task, id=f"{task}-{i}"))
    return out


def iter_batches(items: Sequence[Any], batch_size: int) -> Iterator[Sequence[Any]]:
    """Consecutive slices of ``items`` of at most ``batch_size``."""
    if batch_size < 1:
        raise DatasetError("batch_size must be positive")
    for start in range(0, len(items), batch_size):
        yield items[start:start + batch_size]

