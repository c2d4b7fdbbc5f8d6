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

Given plain token features, both models share one tokenizer (the paper's setting; this path
is exact). Given a :class:`PublicSet` (:func:`prepare_public`), the pair may use different
tokenizers: ``distill.mode = "token"`` then runs through the vocabulary bridge
(:mod:`.bridge`: each model's CE on its own answer tokens, the KL at the answer positions
aligned by character offsets, the teacher's top-k mapped onto the student's vocabulary), and
``distill.mode = "choice"`` compares distributions over the answer choices
(:mod:`.choice_distill`) whatever the tokenizers.
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
from ..errors import BridgeError, ConfigError, UpdateValidationError
from ..secagg import SecureSumResult
from .bridge import PairedBatch, PairedCollator, PairedFeature, VocabBridge, VocabMap
from .bridge import bridged_kl, coverage, pair_features
from .choice_distill import choice_distillation_loss, choice_logprobs
from .data import (
    DEFAULT_PROMPT,
    CausalLMCollator,
    MCExample,
    PromptConfig,
    pad_token_id_of,
    tokenize_examples,
)
from .distill import DistillSettings, answer_cross_entropy, distillation_loss
from .lora import adapter_parameters, validate_state
from .models import logits_at, same_tokenizer, unwrap_causal_lm
from .trainer import TrainSettings, _schedule, batches

__all__ = ["DistillResult", "PublicSet", "aggregate_deltas", "mutual_distill", "prepare_public"]

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
    mode: str = "token"
    #: cross-tokenizer token mode: per student side, positions with a KL term, matched
    #: positions without mappable teacher mass, and the mean mapped share of the top-k mass
    bridge: dict[str, dict[str, float]] = field(default_factory=dict)

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


def _teacher_logits(model: Any, batch: Mapping[str, torch.Tensor],
                    positions: torch.Tensor | None = None) -> torch.Tensor:
    """The teacher's logits at the answer positions (or at ``positions``, ``(n, 2)`` pairs):
    eval mode (no dropout), no graph."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if positions is None:
                return _answer_logits(model, batch)
            return logits_at(model, batch["input_ids"], batch["attention_mask"], positions)
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
        return self.update(loss)

    def update(self, loss: torch.Tensor) -> float:
        """One optimizer step on ``loss`` (backward, grad-norm clip, AdamW, schedule)."""
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


# --------------------------------------------------------------------------------------------
# public data for any pair
# --------------------------------------------------------------------------------------------
@dataclass
class PublicSet:
    """The server's public data prepared once for :func:`mutual_distill`.

    ``slm_features``/``llm_features`` are each model's training features (the same list when
    the tokenizers match); ``pairs`` and ``bridge`` are set for the cross-tokenizer token mode
    (:func:`bridge.pair_features`, :class:`bridge.VocabBridge`), ``coverage`` is the share of
    answer positions aligned in each direction (:func:`bridge.coverage`).
    """

    examples: list[MCExample]
    mode: Literal["token", "choice"]
    llm_tokenizer: Any
    slm_tokenizer: Any
    slm_features: list[dict[str, list[int]]]
    llm_features: list[dict[str, list[int]]]
    pairs: list[PairedFeature] | None = None
    bridge: VocabBridge | None = None
    coverage: dict[str, Any] | None = None
    prompt: PromptConfig = DEFAULT_PROMPT
    max_length: int | None = None

    @property
    def cross_tokenizer(self) -> bool:
        return self.llm_tokenizer is not self.slm_tokenizer


def prepare_public(examples: Sequence[MCExample], llm_tokenizer: Any, slm_tokenizer: Any,
                   settings: DistillSettings, *, max_length: int | None = None,
                   prompt: PromptConfig = DEFAULT_PROMPT,
                   cache_dir: str | None | bool = None) -> PublicSet:
    """Tokenise the public examples for both models and, for the token mode across two
    different tokenizers, align their answer positions and build (or load) the vocabulary
    maps (``cache_dir`` as in :func:`bridge.vocab_map`).

    Raises :class:`BridgeError` when not a single answer position aligns in a direction.
    """
    examples = list(examples)
    if not examples:
        raise ConfigError("the server needs public data for mutual distillation")
    if same_tokenizer(llm_tokenizer, slm_tokenizer):
        llm_tokenizer = slm_tokenizer
    slm_features = tokenize_examples(examples, slm_tokenizer, max_length, prompt=prompt)
    public = PublicSet(examples, settings.mode, llm_tokenizer, slm_tokenizer, slm_features,
                       slm_features, prompt=prompt, max_length=max_length)
    if not public.cross_tokenizer:
        return public
    public.llm_features = tokenize_examples(examples, llm_tokenizer, max_length, prompt=prompt)
    if settings.mode == "token":
        public.pairs = pair_features(examples, llm_tokenizer, slm_tokenizer, max_length,
                                     prompt=prompt)
        public.coverage = coverage(public.pairs)
        for side in ("slm", "llm"):
            if not public.coverage[side]["matched"]:
                raise BridgeError(f"no {side.upper()} answer position of the public data "
                                  "aligns with a position of the other tokenizer")
        public.bridge = VocabBridge.build(llm_tokenizer, slm_tokenizer, cache_dir=cache_dir)
    return public


class _BridgeStats:
    def __init__(self) -> None:
        self.positions = 0
        self.dropped = 0
        self.mass: list[float] = []

    def as_dict(self) -> dict[str, float]:
        return {"kl_positions": float(self.positions), "dropped_positions": float(self.dropped),
                "mapped_mass": sum(self.mass) / len(self.mass) if self.mass else math.nan}


def _bridged_step(side: _Student, teacher: Any, s_batch: Mapping[str, torch.Tensor],
                  t_batch: Mapping[str, torch.Tensor], rows: torch.Tensor, pairs: torch.Tensor,
                  vmap: VocabMap, settings: DistillSettings, stats: _BridgeStats) -> float:
    """CE on the student's answer tokens + lambda * bridged KL at its aligned positions."""
    side.model.train()
    student = _answer_logits(side.model, s_batch)
    loss = answer_cross_entropy(student, s_batch["answer_targets"])
    if settings.lambda_kl and rows.numel():
        teacher_logits = _teacher_logits(teacher, t_batch, pairs)
        kl = bridged_kl(student[rows], teacher_logits, vmap, settings.top_k,
                        settings.temperature)
        loss = loss + settings.lambda_kl * kl.loss
        stats.positions += kl.positions
        stats.dropped += kl.dropped_positions
        stats.mass.append(kl.mapped_mass)
    return side.update(loss)


def _choice_scores(model: Any, tokenizer: Any, examples: Sequence[MCExample],
                   public: PublicSet) -> list[torch.Tensor]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return choice_logprobs(model, tokenizer, examples, prompt=public.prompt,
                                   max_length=public.max_length)[0]
    finally:
        model.train(was_training)


def _choice_step(side: _Student, tokenizer: Any, teacher: Any, teacher_tokenizer: Any,
                 examples: Sequence[MCExample], public: PublicSet,
                 settings: DistillSettings) -> float:
    """CE on the correct choice + lambda * KL over the answer choices (tokenizer-free)."""
    teacher_scores = (_choice_scores(teacher, teacher_tokenizer, examples, public)
                      if settings.lambda_kl else [torch.zeros(ex.n_choices) for ex in examples])
    side.model.train()
    result = choice_distillation_loss(
        side.model, tokenizer, teacher_scores, examples, lambda_kl=settings.lambda_kl,
        temperature=settings.temperature, prompt=public.prompt, max_length=public.max_length)
    return side.update(result.loss)


def _run_order(flat: Sequence[Any], order: str, slm_step: Callable[[Any], float],
               llm_step: Callable[[Any], float], result: DistillResult,
               progress: Callable[[str, int, float], None] | None) -> None:
    def run(which: str, step: Callable[[Any], float], batch: Any) -> None:
        loss = step(batch)
        losses = result.slm_losses if which == "slm" else result.llm_losses
        losses.append(loss)
        if progress is not None:
            progress(which, len(losses), loss)

    if order == "interleaved":
        for batch in flat:
            run("slm", slm_step, batch)
            run("llm", llm_step, batch)
    else:
        for batch in flat:
            run("slm", slm_step, batch)
        for batch in flat:
            run("llm", llm_step, batch)


def _plan(n: int, train: TrainSettings, generator: torch.Generator) -> list[list[int]]:
    """Index batches: ``train.epochs`` shuffles (the order :func:`trainer.batches` draws),
    capped at ``train.max_steps``."""
    flat: list[list[int]] = []
    for _ in range(train.epochs):
        order = torch.randperm(n, generator=generator).tolist()
        flat.extend(order[s:s + train.batch_size] for s in range(0, n, train.batch_size))
    return flat[:train.max_steps] if train.max_steps else flat


def _distill_public(llm: Any, slm: Any, public: PublicSet, settings: DistillSettings,
                    train: TrainSettings, generator: torch.Generator, order: str,
                    progress: Callable[[str, int, float], None] | None) -> DistillResult:
    result = DistillResult(mode=settings.mode)
    plan = _plan(len(public.examples), train, generator)
    slm_side = _Student(slm, "SLM", train, len(plan))
    llm_side = _Student(llm, "LLM", train, len(plan))
    slm_tok, llm_tok = public.slm_tokenizer, public.llm_tokenizer
    if settings.mode == "choice":
        batches_: list[Any] = [[public.examples[i] for i in idx] for idx in plan]

        def slm_step(b: Any) -> float:
            return _choice_step(slm_side, slm_tok, llm, llm_tok, b, public, settings)

        def llm_step(b: Any) -> float:
            return _choice_step(llm_side, llm_tok, slm, slm_tok, b, public, settings)

        _run_order(batches_, order, slm_step, llm_step, result, progress)
        return result
    if public.pairs is None or public.bridge is None:
        raise ConfigError("this public set has no vocabulary bridge; pass plain features for a "
                          "pair that shares a tokenizer")
    collate = PairedCollator(llm_tok, slm_tok)
    paired = [collate([public.pairs[i] for i in idx]) for idx in plan]
    bridge = public.bridge
    stats = {"slm": _BridgeStats(), "llm": _BridgeStats()}

    def slm_bridged(b: PairedBatch) -> float:
        return _bridged_step(slm_side, llm, b.slm, b.llm, b.slm_rows, b.llm_pairs,
                             bridge.llm_to_slm, settings, stats["slm"])

    def llm_bridged(b: PairedBatch) -> float:
        return _bridged_step(llm_side, slm, b.llm, b.slm, b.llm_rows, b.slm_pairs,
                             bridge.slm_to_llm, settings, stats["llm"])

    _run_order(paired, order, slm_bridged, llm_bridged, result, progress)
    result.bridge = {side: st.as_dict() for side, st in stats.items()}
    if public.coverage is not None:
        for side in ("slm", "llm"):
            result.bridge[side]["coverage"] = float(public.coverage[side]["coverage"])
    return result


def mutual_distill(llm: Any, slm: Any, tokenizer: Any, public_features: Features | PublicSet,
                   settings: DistillSettings, train: TrainSettings, seed: int | None = None,
                   *, order: Literal["interleaved", "sequential"] | None = None,
                   progress: Callable[[str, int, float], None] | None = None) -> DistillResult:
    """Mutual distillation of the LLM and SLM LoRA adapters on the public data, in place.

    ``public_features`` is either plain token features (both models share ``tokenizer``;
    ``distill.mode`` must be ``token``: the paper's path) or a :class:`PublicSet` from
    :func:`prepare_public` (any pair; cross-tokenizer token mode through the vocabulary
    bridge, or the choice mode). ``train`` gives epochs (R), batch size, AdamW
    learning rate / weight decay, grad-norm clipping, schedule and ``max_steps`` (per model);
    ``settings`` gives lambda, temperature, top-k, mode and the order (``order`` overrides it):

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
    generator = torch.Generator().manual_seed(seed if seed is not None else secrets.randbits(63))
    if isinstance(public_features, PublicSet):
        if public_features.mode != settings.mode:
            raise ConfigError(f"the public set was prepared for distill.mode = "
                              f"{public_features.mode!r}, settings say {settings.mode!r}")
        if public_features.slm_tokenizer is not tokenizer:
            raise ConfigError("the public set was prepared with another SLM tokenizer")
        start = time.perf_counter()
        try:
            result = _distill_public(llm, slm, public_features, settings, train, generator,
                                     order, progress)
        finally:
            llm.eval()
            slm.eval()
        result.steps = len(result.slm_losses)
        result.seconds = time.perf_counter() - start
        return result
    if settings.mode != "token":
        raise ConfigError("distill.mode = 'choice' needs a PublicSet (prepare_public) with the "
                          "examples' answer choices")
    result = DistillResult()
    if not public_features:
        return result
    vocab = _shared_vocab(llm, slm, tokenizer)
    collate = CausalLMCollator(pad_token_id_of(tokenizer))
    plan = [batches(public_features, train.batch_size, collate, generator)
            for _ in range(train.epochs)]
    flat = [b for epoch in plan for b in epoch]
    if train.max_steps:
        flat = flat[:train.max_steps]
    slm_side = _Student(slm, "SLM", train, len(flat))
    llm_side = _Student(llm, "LLM", train, len(flat))
    start = time.perf_counter()

    def slm_step(batch: Mapping[str, torch.Tensor]) -> float:
        return slm_side.step(batch, _teacher_logits(llm, batch), settings, vocab)

    def llm_step(batch: Mapping[str, torch.Tensor]) -> float:
        return llm_side.step(batch, _teacher_logits(slm, batch), settings, vocab)

    try:
        _run_order(flat, order, slm_step, llm_step, result, progress)
    finally:
        llm.eval()
        slm.eval()
    result.steps = len(flat)
    result.seconds = time.perf_counter() - start
    return result
