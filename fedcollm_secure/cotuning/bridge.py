"""Vocabulary bridge: token-level distillation between models with different tokenizers.

FedCoLLM's KL compares two next-token distributions at the same position. When the LLM and
the SLM tokenize differently (e.g. Gemma-3's SentencePiece-style BPE, 262k tokens, and
SmolLM2's byte-level BPE, 49k tokens), two things must be bridged:

* **Positions.** Both tokenizers see the same text (prompt + answer); their fast tokenizers'
  offset mappings give each token's character span. A position ``i`` of a sequence has
  *consumed* the text up to ``c_i`` (the largest end offset of tokens ``0..i``) and sits at a
  *boundary* when the next token starts at or after ``c_i`` (byte-level tokens that split a
  multi-byte character do not). A student answer position ``p`` (whose logits predict answer
  token ``p + 1``) is matched to the teacher position ``q`` with the same consumed prefix
  ``c_q = c_p``, both at a boundary: there both models predict the text that follows the same
  prefix. Positions without such a teacher position are reported as unmatched (never
  guessed) and carry no KL term (their cross-entropy still counts).
* **Vocabularies.** Every teacher token is mapped to one student token
  (:func:`build_vocab_map`): tokens are compared as the *bytes* they stand for (SentencePiece
  ``▁`` and byte-level ``Ġ`` both become a space, byte-level characters and byte-fallback
  tokens such as ``<0x0A>`` become their byte), exact matches first (ties go to the token with
  the same raw string, then the lowest id); otherwise the student's first token of the teacher
  token's text when that token's bytes are a prefix of it, else the longest student token
  that is a byte prefix. Special tokens map by role (bos/eos/pad/unk) or identical string;
  others stay unmapped. The teacher's top-k probabilities are moved onto student ids and
  mass landing on the same student id is summed (:func:`bridge_topk`); unmapped mass is
  dropped, the rest renormalised, and the mapped share is reported. A position whose top-k
  has no mappable mass is left out of the KL; a batch where that holds for every matched
  position raises :class:`BridgeError`.

With two identical tokenizers every position matches itself and the map is the identity, so
the bridged KL equals the same-tokenizer :func:`distill.sparse_kl` (up to float summation
order; tested). Maps are computed once per (teacher, student) tokenizer pair and cached in
memory and on disk (``<cache>/bridge/*.safetensors``: the map as an int64 tensor plus JSON
metadata keyed by SHA-256 fingerprints of both tokenizers; no pickle).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import tempfile
import threading
import weakref
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import BridgeError, ConfigError
from .data import (
    DEFAULT_PROMPT,
    CausalLMCollator,
    MCExample,
    PromptConfig,
    format_choice,
    format_prompt,
    pad_token_id_of,
    to_causal_lm_example,
)
from .distill import TopK, sparse_kl, teacher_topk

__all__ = [
    "BridgedKL",
    "PairedBatch",
    "PairedCollator",
    "PairedFeature",
    "VocabBridge",
    "VocabMap",
    "align_positions",
    "bridge_topk",
    "bridged_kl",
    "build_vocab_map",
    "consumed_offsets",
    "coverage",
    "pair_features",
    "token_bytes",
    "tokenizer_fingerprint",
    "vocab_map",
]

_FORMAT = "fedcollm_secure.vocab-bridge"
_VERSION = 1
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_METASPACE = "\u2581"
_ROLES = ("bos", "eos", "pad", "unk")
_MEMORY: dict[tuple[str, str], VocabMap] = {}
_LOCK = threading.Lock()
_FINGERPRINTS: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


# --------------------------------------------------------------------------------------------
# tokens as bytes
# --------------------------------------------------------------------------------------------
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    table: dict[int, str] = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


def _backend(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not getattr(tokenizer, "is_fast", False) or backend is None:
        raise ConfigError(f"{type(tokenizer).__name__}: the vocabulary bridge needs a fast "
                          "(Rust-backed) tokenizer with an offset mapping")
    spec: dict[str, Any] = json.loads(backend.to_str())
    return spec


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 over the tokenizer's full definition (vocabulary, merges, normaliser,
    pre-tokenizer, decoder, added tokens) and its bos/eos/pad/unk tokens."""
    with contextlib.suppress(TypeError):
        cached = _FINGERPRINTS.get(tokenizer)
        if cached is not None:
            return cached
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not getattr(tokenizer, "is_fast", False) or backend is None:
        raise ConfigError(f"{type(tokenizer).__name__}: the vocabulary bridge needs a fast "
                          "tokenizer")
    digest = hashlib.sha256(backend.to_str().encode("utf-8"))
    roles = {r: [getattr(tokenizer, f"{r}_token", None), getattr(tokenizer, f"{r}_token_id",
                                                                  None)] for r in _ROLES}
    digest.update(json.dumps(roles, sort_keys=True).encode("utf-8"))
    value = digest.hexdigest()
    with contextlib.suppress(TypeError):
        _FINGERPRINTS[tokenizer] = value
    return value


def _scheme(spec: Mapping[str, Any]) -> str:
    decoder = json.dumps(spec.get("decoder"), ensure_ascii=False)
    pre = json.dumps(spec.get("pre_tokenizer"), ensure_ascii=False)
    if '"ByteLevel"' in decoder or (spec.get("decoder") is None and '"ByteLevel"' in pre):
        return "byte_level"
    if _METASPACE in decoder or '"Metaspace"' in decoder or '"Metaspace"' in pre:
        return "metaspace"
    return "plain"


def _special_ids(tokenizer: Any, spec: Mapping[str, Any]) -> set[int]:
    ids = {int(a["id"]) for a in spec.get("added_tokens", []) if a.get("special")}
    ids.update(int(i) for i in getattr(tokenizer, "all_special_ids", []) if i is not None)
    return ids


def token_bytes(tokenizer: Any) -> list[bytes | None]:
    """The bytes each token id stands for (``None`` for special tokens and empty tokens).

    SentencePiece-style ``▁`` becomes a space, byte-level characters their byte, byte-fallback
    tokens (``<0x0A>``) their byte; non-special added tokens stand for their literal text.
    """
    spec = _backend(tokenizer)
    scheme = _scheme(spec)
    specials = _special_ids(tokenizer, spec)
    literal = {int(a["id"]): str(a["content"]) for a in spec.get("added_tokens", [])
               if not a.get("special")}
    out: list[bytes | None] = [None] * len(tokenizer)
    for token, i in tokenizer.get_vocab().items():
        if not 0 <= i < len(out) or i in specials:
            continue
        if i in literal:
            raw = literal[i].encode("utf-8")
        elif scheme == "byte_level" and all(c in _UNICODE_TO_BYTE for c in token):
            raw = bytes(_UNICODE_TO_BYTE[c] for c in token)
        else:
            fallback = _BYTE_FALLBACK.match(token)
            if fallback is not None:
                raw = bytes([int(fallback.group(1), 16)])
            elif scheme == "metaspace":
                raw = token.replace(_METASPACE, " ").encode("utf-8")
            else:
                raw = token.encode("utf-8")
        out[i] = raw or None
    return out


# --------------------------------------------------------------------------------------------
# vocabulary maps
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class VocabMap:
    """Teacher token id -> student token id (``-1``: unmapped) for one tokenizer pair.

    ``counts`` tallies how each teacher id was mapped: ``exact``, ``fallback``, ``special``,
    ``unmapped``.
    """

    teacher: str  # fingerprint
    student: str
    ids: torch.Tensor  # (teacher vocab,) int64
    student_vocab: int
    counts: Mapping[str, int]

    def __post_init__(self) -> None:
        ids = self.ids
        if ids.dtype != torch.int64 or ids.dim() != 1:
            raise BridgeError("a vocabulary map is a 1-D int64 tensor")
        if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= self.student_vocab):
            raise BridgeError("a vocabulary map holds ids outside the student vocabulary")

    @property
    def teacher_vocab(self) -> int:
        return int(self.ids.numel())


def build_vocab_map(teacher: Any, student: Any) -> VocabMap:
    """Map every teacher token onto the student vocabulary (see the module docstring)."""
    t_bytes, s_bytes = token_bytes(teacher), token_bytes(student)
    t_raw = teacher.convert_ids_to_tokens(list(range(len(teacher))))
    s_vocab: dict[str, int] = student.get_vocab()
    by_bytes: dict[bytes, list[int]] = {}
    for i, b in enumerate(s_bytes):
        if b is not None:
            by_bytes.setdefault(b, []).append(i)
    longest = max((len(b) for b in by_bytes), default=0)
    ids = torch.full((len(teacher),), -1, dtype=torch.int64)
    counts = {"exact": 0, "fallback": 0, "special": 0, "unmapped": 0}
    s_specials = _special_ids(student, _backend(student))
    for role in _ROLES:
        t_id = getattr(teacher, f"{role}_token_id", None)
        s_id = getattr(student, f"{role}_token_id", None)
        if isinstance(t_id, int) and isinstance(s_id, int) and 0 <= t_id < len(ids) \
                and int(ids[t_id]) < 0:
            ids[t_id] = s_id
            counts["special"] += 1
    pending: list[int] = []
    for t, b in enumerate(t_bytes):
        if int(ids[t]) >= 0:
            continue
        if b is None:  # a special token: only an identical special string maps
            s_id = s_vocab.get(str(t_raw[t]))
            if s_id is not None and s_id in s_specials:
                ids[t] = s_id
                counts["special"] += 1
            continue
        candidates = by_bytes.get(b)
        if candidates:
            same = s_vocab.get(str(t_raw[t]))
            ids[t] = same if same in candidates else candidates[0]
            counts["exact"] += 1
        else:
            pending.append(t)
    texts: list[str] = []
    decodable: list[int] = []
    for t in pending:
        raw = t_bytes[t]
        with contextlib.suppress(UnicodeDecodeError):
            if raw is not None:
                texts.append(raw.decode("utf-8"))
                decodable.append(t)
    first: dict[int, int] = {}
    if texts:
        encoded = student(texts, add_special_tokens=False)["input_ids"]
        first = {t: int(e[0]) for t, e in zip(decodable, encoded, strict=True) if e}
    for t in pending:
        raw = t_bytes[t]
        if raw is None:
            continue
        pick = first.get(t)
        if pick is not None:
            s_raw = s_bytes[pick] if 0 <= pick < len(s_bytes) else None
            if s_raw is None or not raw.startswith(s_raw):
                pick = None
        if pick is None:
            for length in range(min(len(raw), longest), 0, -1):
                hit = by_bytes.get(raw[:length])
                if hit:
                    pick = hit[0]
                    break
        if pick is None:
            continue
        ids[t] = pick
        counts["fallback"] += 1
    counts["unmapped"] = int((ids < 0).sum())
    return VocabMap(tokenizer_fingerprint(teacher), tokenizer_fingerprint(student), ids,
                    len(student), counts)


def _cache_file(root: Path, teacher: str, student: str) -> Path:
    return root / "bridge" / f"v{_VERSION}-{teacher[:32]}-{student[:32]}.safetensors"


def _read_cached(path: Path, teacher: str, student: str, sizes: tuple[int, int],
                 ) -> VocabMap | None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            ids = fh.get_tensor("ids")
        info = json.loads(meta.get("bridge", "{}"))
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError):
        return None
    if not (isinstance(info, dict) and info.get("format") == _FORMAT
            and info.get("version") == _VERSION and info.get("teacher") == teacher
            and info.get("student") == student and isinstance(info.get("counts"), dict)
            and info.get("student_vocab") == sizes[1] and ids.dtype == torch.int64
            and tuple(ids.shape) == (sizes[0],)):
        return None
    try:
        return VocabMap(teacher, student, ids, sizes[1],
                        {str(k): int(v) for k, v in info["counts"].items()})
    except BridgeError:
        return None


def _write_cached(path: Path, vmap: VocabMap) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    info = {"format": _FORMAT, "version": _VERSION, "teacher": vmap.teacher,
            "student": vmap.student, "student_vocab": vmap.student_vocab,
            "counts": dict(vmap.counts)}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({"ids": vmap.ids.contiguous()}, tmp, metadata={"bridge": json.dumps(info)})
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def vocab_map(teacher: Any, student: Any, *,
              cache_dir: str | os.PathLike[str] | None | bool = None) -> VocabMap:
    """:func:`build_vocab_map`, cached in memory and on disk.

    ``cache_dir``: ``None`` uses :func:`models.default_cache_dir`, ``False`` keeps the map in
    memory only. A cache file whose metadata does not name both fingerprints and sizes is
    ignored and rewritten.
    """
    key = (tokenizer_fingerprint(teacher), tokenizer_fingerprint(student))
    with _LOCK:
        hit = _MEMORY.get(key)
        if hit is not None:
            return hit
        path: Path | None = None
        if cache_dir is not False:
            from .models import default_cache_dir

            root = default_cache_dir() if cache_dir is None or cache_dir is True else Path(
                cache_dir).expanduser()
            path = _cache_file(root, *key)
            loaded = _read_cached(path, *key, (len(teacher), len(student))) \
                if path.is_file() else None
            if loaded is not None:
                _MEMORY[key] = loaded
                return loaded
        vmap = build_vocab_map(teacher, student)
        if path is not None:
            with contextlib.suppress(OSError):
                _write_cached(path, vmap)
        _MEMORY[key] = vmap
        return vmap


@dataclasses.dataclass(frozen=True)
class VocabBridge:
    """Both directions between an LLM tokenizer and an SLM tokenizer."""

    llm_to_slm: VocabMap
    slm_to_llm: VocabMap

    @classmethod
    def build(cls, llm_tokenizer: Any, slm_tokenizer: Any, *,
              cache_dir: str | os.PathLike[str] | None | bool = None) -> VocabBridge:
        return cls(vocab_map(llm_tokenizer, slm_tokenizer, cache_dir=cache_dir),
                   vocab_map(slm_tokenizer, llm_tokenizer, cache_dir=cache_dir))


# --------------------------------------------------------------------------------------------
# distributions across vocabularies
# --------------------------------------------------------------------------------------------
def bridge_topk(teacher_logits: torch.Tensor, vmap: VocabMap, k: int, temperature: float = 1.0,
                student_vocab: int | None = None) -> tuple[TopK, torch.Tensor]:
    """The teacher's renormalised top-k moved onto student ids: ``(TopK, mapped_mass)``.

    Probability that lands on the same student id is summed; unmapped tokens (and teacher
    logit columns beyond the map, e.g. padded embeddings) are dropped and each row is
    renormalised over its mapped mass, which is returned per row (``0`` = nothing mapped;
    such a row is all zeros). No gradient.
    """
    top = teacher_topk(teacher_logits, k, temperature)
    n = top.probs.shape[0]
    vocab = int(student_vocab if student_vocab is not None else vmap.student_vocab)
    with torch.no_grad():
        table = vmap.ids.to(top.indices.device)
        inside = top.indices < table.numel()
        mapped = torch.where(inside, table[top.indices.clamp(max=max(0, table.numel() - 1))],
                             torch.full_like(top.indices, -1))
        mapped = torch.where(mapped < vocab, mapped, torch.full_like(mapped, -1))
        valid = mapped >= 0
        mass = (top.probs * valid).sum(-1)
        rows = torch.arange(n, device=mapped.device).unsqueeze(1).expand_as(mapped)
        keys = (rows * vocab + mapped)[valid]
        unique, inverse = torch.unique(keys, return_inverse=True)
        summed = torch.zeros(unique.numel(), dtype=top.probs.dtype, device=mapped.device)
        summed.index_add_(0, inverse, top.probs[valid])
        row_of, col_of = unique // vocab, unique % vocab
        per_row = torch.bincount(row_of, minlength=n)
        width = max(1, int(per_row.max())) if n else 1
        start = torch.cumsum(per_row, 0) - per_row
        slot = torch.arange(unique.numel(), device=mapped.device) - start[row_of]
        probs = torch.zeros((n, width), dtype=top.probs.dtype, device=mapped.device)
        indices = torch.zeros((n, width), dtype=torch.int64, device=mapped.device)
        probs[row_of, slot] = summed
        indices[row_of, slot] = col_of
        probs = probs / mass.clamp_min(torch.finfo(probs.dtype).tiny).unsqueeze(1)
    return TopK(probs=probs, indices=indices), mass


@dataclasses.dataclass(frozen=True)
class BridgedKL:
    """A bridged KL term and how much of the teacher it used."""

    loss: torch.Tensor  # scalar, mean over the positions with mapped mass
    positions: int  # positions that carried a KL term
    dropped_positions: int  # matched positions whose top-k had no mappable mass
    mapped_mass: float  # mean share of the teacher's top-k mass that mapped


def bridged_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, vmap: VocabMap,
               k: int, temperature: float = 1.0) -> BridgedKL:
    """``T^2 * KL(bridged teacher top-k || student)`` at N already-matched positions.

    ``student_logits`` ``(N, V_student)`` carries the gradient; ``teacher_logits``
    ``(N, V_teacher)`` is detached. Raises :class:`BridgeError` when ``N > 0`` and no
    position has any mappable teacher mass.
    """
    if student_logits.dim() != 2 or teacher_logits.dim() != 2 or \
            student_logits.shape[0] != teacher_logits.shape[0]:
        raise ValueError("student and teacher logits must be (positions, vocab) with equal N")
    n = int(student_logits.shape[0])
    if n == 0:
        return BridgedKL(student_logits.sum() * 0.0, 0, 0, float("nan"))
    top, mass = bridge_topk(teacher_logits, vmap, k, temperature, int(student_logits.shape[1]))
    keep = mass > 0
    used = int(keep.sum())
    if used == 0:
        raise BridgeError(f"none of the teacher's top-{k} tokens at {n} position(s) maps onto "
                          "the student vocabulary; the KL term would silently be zero")
    kept = TopK(probs=top.probs[keep], indices=top.indices[keep])
    loss = sparse_kl(student_logits[keep], kept, temperature)
    return BridgedKL(loss, used, n - used, float(mass.mean()))


# --------------------------------------------------------------------------------------------
# positions
# --------------------------------------------------------------------------------------------
def consumed_offsets(offsets: Sequence[tuple[int, int]]) -> tuple[list[int], list[bool]]:
    """Per position: the text consumed so far (running max of end offsets) and whether the
    position is at a boundary (the next token starts at or after it; the last one is)."""
    consumed: list[int] = []
    high = 0
    for _, end in offsets:
        high = max(high, int(end))
        consumed.append(high)
    boundary = [i + 1 == len(offsets) or int(offsets[i + 1][0]) >= consumed[i]
                for i in range(len(offsets))]
    return consumed, boundary


def align_positions(student_offsets: Sequence[tuple[int, int]], student_positions: Sequence[int],
                    teacher_offsets: Sequence[tuple[int, int]]) -> list[int]:
    """For each student position, the teacher position that consumed exactly the same text
    at a boundary (the last such one), or ``-1`` (unmatched)."""
    t_consumed, t_boundary = consumed_offsets(teacher_offsets)
    at: dict[int, int] = {}
    for q, (c, ok) in enumerate(zip(t_consumed, t_boundary, strict=True)):
        if ok:
            at[c] = q
    s_consumed, s_boundary = consumed_offsets(student_offsets)
    return [at.get(s_consumed[p], -1) if s_boundary[p] else -1 for p in student_positions]


def _kept_indices(full: Sequence[int], kept: Sequence[int]) -> list[int] | None:
    """Indices of ``full`` that a left-truncated ``kept`` holds (a first token may stay)."""
    n, m = len(full), len(kept)
    if m > n or m == 0:
        return None
    if list(full[n - m:]) == list(kept):
        return list(range(n - m, n))
    if full[0] == kept[0] and list(full[n - m + 1:]) == list(kept[1:]):
        return [0, *range(n - m + 1, n)]
    return None


def _feature_offsets(example: MCExample, tokenizer: Any, feature_ids: Sequence[int],
                     prompt: PromptConfig) -> list[tuple[int, int]]:
    """Character offsets (in ``prompt + choice`` text) of each token of a feature."""
    prompt_text = format_prompt(example, prompt)
    cont = format_choice(example.choices[example.answer], prompt)
    joint = tokenizer(prompt_text + cont, add_special_tokens=True, return_offsets_mapping=True)
    candidates = [(list(joint["input_ids"]), [tuple(o) for o in joint["offset_mapping"]])]
    head = tokenizer(prompt_text, add_special_tokens=True, return_offsets_mapping=True)
    tail = tokenizer(cont, add_special_tokens=False, return_offsets_mapping=True)
    shift = len(prompt_text)
    candidates.append((list(head["input_ids"]) + list(tail["input_ids"]),
                       [tuple(o) for o in head["offset_mapping"]]
                       + [(s + shift, e + shift) for s, e in tail["offset_mapping"]]))
    for ids, offsets in candidates:
        kept = _kept_indices(ids, feature_ids)
        if kept is not None:
            return [(int(offsets[i][0]), int(offsets[i][1])) for i in kept]
    raise BridgeError(f"example {example.id!r}: cannot recover character offsets for its "
                      "token ids (was it tokenised with another prompt or tokenizer?)")


@dataclasses.dataclass(frozen=True)
class PairedFeature:
    """One public example tokenised for both models, with the position alignment.

    ``slm_from_llm[i]`` is the LLM position aligned with the SLM's ``i``-th answer position
    (``-1``: unmatched); ``llm_from_slm`` the other way round.
    """

    slm: Mapping[str, Sequence[int]]
    llm: Mapping[str, Sequence[int]]
    slm_from_llm: tuple[int, ...]
    llm_from_slm: tuple[int, ...]


def pair_features(examples: Iterable[MCExample], llm_tokenizer: Any, slm_tokenizer: Any,
                  max_length: int | None = None, *,
                  prompt: PromptConfig = DEFAULT_PROMPT) -> list[PairedFeature]:
    """Features of each example for both tokenizers (:func:`data.to_causal_lm_example`) and
    the alignment of their answer positions by character offsets."""
    out: list[PairedFeature] = []
    for ex in examples:
        slm = to_causal_lm_example(ex, slm_tokenizer, max_length, prompt=prompt)
        llm = to_causal_lm_example(ex, llm_tokenizer, max_length, prompt=prompt)
        s_off = _feature_offsets(ex, slm_tokenizer, slm["input_ids"], prompt)
        l_off = _feature_offsets(ex, llm_tokenizer, llm["input_ids"], prompt)
        out.append(PairedFeature(
            slm, llm, tuple(align_positions(s_off, slm["answer_positions"], l_off)),
            tuple(align_positions(l_off, llm["answer_positions"], s_off))))
    return out


def coverage(pairs: Sequence[PairedFeature]) -> dict[str, Any]:
    """Share of answer positions matched in each direction (``slm``: SLM answer positions
    with an LLM teacher position; ``llm``: the reverse), with counts."""
    out: dict[str, Any] = {}
    for side, attr in (("slm", "slm_from_llm"), ("llm", "llm_from_slm")):
        links = [q for p in pairs for q in getattr(p, attr)]
        matched = sum(q >= 0 for q in links)
        out[side] = {"positions": len(links), "matched": matched,
                     "coverage": matched / len(links) if links else float("nan")}
    return out


@dataclasses.dataclass(frozen=True)
class PairedBatch:
    """Collated :class:`PairedFeature`\\ s.

    ``slm_rows`` index the SLM's answer rows (row-major order of its ``answer_mask``) that
    have an LLM teacher position; ``llm_pairs`` are those ``(batch row, position)`` pairs in
    the LLM batch, in the same order. ``llm_rows``/``slm_pairs`` likewise the other way.
    """

    slm: dict[str, torch.Tensor]
    llm: dict[str, torch.Tensor]
    slm_rows: torch.Tensor
    llm_pairs: torch.Tensor
    llm_rows: torch.Tensor
    slm_pairs: torch.Tensor


class PairedCollator:
    """Collates :class:`PairedFeature`\\ s with one :class:`CausalLMCollator` per model."""

    def __init__(self, llm_tokenizer: Any, slm_tokenizer: Any) -> None:
        self.llm = CausalLMCollator(pad_token_id_of(llm_tokenizer))
        self.slm = CausalLMCollator(pad_token_id_of(slm_tokenizer))

    @staticmethod
    def _links(links: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        rows: list[int] = []
        pairs: list[tuple[int, int]] = []
        offset = 0
        for b, per_example in enumerate(links):
            for i, q in enumerate(per_example):
                if q >= 0:
                    rows.append(offset + i)
                    pairs.append((b, q))
            offset += len(per_example)
        return (torch.tensor(rows, dtype=torch.long),
                torch.tensor(pairs, dtype=torch.long).reshape(-1, 2))

    def __call__(self, features: Sequence[PairedFeature]) -> PairedBatch:
        slm_rows, llm_pairs = self._links([f.slm_from_llm for f in features])
        llm_rows, slm_pairs = self._links([f.llm_from_slm for f in features])
        return PairedBatch(self.slm([f.slm for f in features]),
                           self.llm([f.llm for f in features]),
                           slm_rows, llm_pairs, llm_rows, slm_pairs)
