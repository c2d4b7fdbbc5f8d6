"""Client DP-SGD on the SLM's LoRA parameters with Opacus (sample-level DP).

Each step draws a Poisson sample of the client's examples (each one independently with
probability ``q = batch_size / n``, from a CSPRNG by default), computes per-example
gradients of the LoRA weights with Opacus's hooks (``GradSampleModule``; the frozen base
model and LM head need none), clips each to ``max_grad_norm`` in L2 and adds Gaussian noise
of standard deviation ``noise_multiplier * max_grad_norm`` (``DPOptimizer``), then divides by
the expected batch size. An empty sample still takes a (noise-only) step, as the accounting
assumes.

The loss of one example is its mean answer-token cross-entropy, and the batch loss is the
*sum* over examples, so no example's gradient depends on another example (a per-batch token
mean would let one example rescale every other example's gradient, breaking the
sensitivity bound). The LM head runs only at answer positions (:func:`models.logits_at`).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from ..cotuning.data import CausalLMCollator, pad_token_id_of
from ..cotuning.models import logits_at
from ..cotuning.trainer import TrainResult, TrainSettings, _schedule
from ..crypto.prg import SEED_SIZE, KeystreamWords
from ..crypto.randomness import RandomSource, default_random
from ..errors import ConfigError

__all__ = ["CSPRNGNoiseDPOptimizer", "DPTrainResult", "gaussian_noise",
           "per_example_answer_loss", "planned_steps", "poisson_sample", "sample_rate",
           "train_lora_dp"]

Features = Sequence[Mapping[str, Sequence[int]]]


@dataclass
class DPTrainResult(TrainResult):
    """A :class:`TrainResult` plus what the accountant needs."""

    noise_multiplier: float = 0.0
    sample_rate: float = 0.0
    max_grad_norm: float = 0.0
    empty_steps: int = 0


def sample_rate(n_examples: int, settings: TrainSettings) -> float:
    """Poisson rate ``q = batch_size / n`` (at most 1)."""
    if n_examples < 1:
        raise ConfigError("DP-SGD needs at least one training example")
    return min(1.0, settings.batch_size / n_examples)


def planned_steps(n_examples: int, settings: TrainSettings) -> int:
    """Steps of one local training run: ``epochs * ceil(n / batch_size)`` (``max_steps``
    caps it)."""
    total = settings.epochs * math.ceil(n_examples / settings.batch_size)
    return min(total, settings.max_steps) if settings.max_steps else total


def poisson_sample(n: int, q: float, rng: RandomSource) -> list[int]:
    """Indices ``i < n`` each kept independently with probability ``q`` (32-bit uniforms)."""
    if n == 0:
        return []
    words = np.frombuffer(rng.bytes(4 * n), dtype="<u4")
    return [int(i) for i in np.flatnonzero(words < q * 4294967296.0)]


def per_example_answer_loss(model: Any, batch: Mapping[str, torch.Tensor]
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum over examples of each example's mean answer-token CE, per-example losses)``."""
    mask = batch["answer_mask"]
    logits = logits_at(model, batch["input_ids"], batch["attention_mask"], mask)
    token = F.cross_entropy(logits.float(), batch["answer_targets"], reduction="none")
    rows = mask.nonzero(as_tuple=True)[0]
    b = int(mask.shape[0])
    sums = torch.zeros(b, dtype=token.dtype).index_add(0, rows, token)
    counts = torch.zeros(b, dtype=token.dtype).index_add(0, rows, torch.ones_like(token))
    per_example = sums / counts.clamp(min=1.0)
    return per_example.sum(), per_example.detach()


def gaussian_noise(shape: tuple[int, ...], std: float, rng: RandomSource) -> torch.Tensor:
    """Gaussian noise of standard deviation ``std`` driven by the CSPRNG ``rng``.

    Uniforms with 53 random bits come from the ChaCha20 keystream of a fresh 32-byte seed
    drawn from ``rng``; Box-Muller turns pairs into normals (radius in float64, angle in
    float32: the noise is added to float32 gradients). As Opacus's ``secure_mode`` does
    against floating-point attacks (Holohan and Braghin 2021), each value is the sum of 4
    normals divided by 2 (same variance)."""
    n = math.prod(shape)
    if std == 0 or n == 0:
        return torch.zeros(shape)
    pairs = 2 * n  # 4 normals per value
    words = KeystreamWords(rng.bytes(SEED_SIZE)).next(4 * pairs)
    u = (words.view("<u8") >> np.uint64(11)).astype(np.float64)
    u *= 2.0 ** -53  # uniform on [0, 1) in steps of 2^-53
    radius = np.log1p(-u[:pairs])  # log(u1) with u1 = 1 - u in (0, 1]
    radius *= -2.0
    np.sqrt(radius, out=radius)
    angle = (u[pairs:] * (2 * np.pi)).astype(np.float32)
    normals = np.empty(2 * pairs)
    np.multiply(radius, np.cos(angle), out=normals[:pairs])
    np.multiply(radius, np.sin(angle), out=normals[pairs:])
    noise = normals.reshape(4, n).sum(axis=0)
    noise *= std / 2.0
    return torch.from_numpy(noise.reshape(shape))


class CSPRNGNoiseDPOptimizer(DPOptimizer):  # type: ignore[misc]
    """Opacus's DP optimizer with its Gaussian noise drawn from our CSPRNG
    (:func:`gaussian_noise`) instead of torch's pseudo-random generator."""

    def __init__(self, *args: Any, rng: RandomSource, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.noise_rng = rng

    def add_noise(self) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            noise = gaussian_noise(tuple(p.summed_grad.shape), std, self.noise_rng)
            p.grad = (p.summed_grad + noise.to(p.summed_grad.dtype)).view_as(p)
            _mark_as_processed(p.summed_grad)


def train_lora_dp(model: Any, tokenizer: Any, features: Features, settings: TrainSettings, *,
                  noise_multiplier: float, max_grad_norm: float, steps: int | None = None,
                  rng: RandomSource | None = None,
                  progress: Callable[[int, float], None] | None = None) -> DPTrainResult:
    """DP-SGD on the trainable (LoRA) parameters of ``model``, in place.

    ``steps`` defaults to :func:`planned_steps`; the caller accounts ``steps`` steps at
    :func:`sample_rate` with ``noise_multiplier`` (returned in the result). ``rng`` drives
    the Poisson sampling and seeds the noise generator (OS CSPRNG by default).
    """
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ConfigError("noise_multiplier must be finite and positive")
    if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise ConfigError("max_grad_norm must be finite and positive")
    n = len(features)
    q = sample_rate(n, settings)
    total = planned_steps(n, settings) if steps is None else steps
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters; attach a LoRA adapter first")
    rng = rng or default_random()
    collate = CausalLMCollator(pad_token_id_of(tokenizer))
    base = torch.optim.AdamW(params, lr=settings.learning_rate,
                             weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(base, _schedule(settings, total))
    expected = max(1, round(q * n))
    result = DPTrainResult(noise_multiplier=noise_multiplier, sample_rate=q,
                           max_grad_norm=max_grad_norm)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=True)
    try:
        optimizer = CSPRNGNoiseDPOptimizer(base, noise_multiplier=noise_multiplier,
                                           max_grad_norm=max_grad_norm,
                                           expected_batch_size=expected,
                                           loss_reduction="mean", rng=rng)
        start = time.perf_counter()
        model.train()
        with warnings.catch_warnings():  # LoRA inputs need no gradient: harmless
            warnings.filterwarnings("ignore", message="Full backward hook is firing",
                                    category=UserWarning)
            for _ in range(total):
                chosen = poisson_sample(n, q, rng)
                if chosen:
                    batch = collate([features[i] for i in chosen])
                    loss, per_example = per_example_answer_loss(model, batch)
                    loss.backward()  # type: ignore[no-untyped-call]
                    result.losses.append(float(per_example.mean()))
                else:  # noise-only step: an empty per-example gradient for every parameter
                    for p in params:
                        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
                    result.empty_steps += 1
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                result.steps += 1
                result.examples += len(chosen)
                if progress is not None and result.losses:
                    progress(result.steps, result.losses[-1])
        result.seconds = time.perf_counter() - start
    finally:
        model.eval()
        gsm._close()
    return result
