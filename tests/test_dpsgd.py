"""Client DP-SGD with Opacus on LoRA parameters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedcollm_secure.cotuning.data import CausalLMCollator, generated_mc_dataset, tokenize_examples
from fedcollm_secure.cotuning.lora import adapter_state
from fedcollm_secure.cotuning.trainer import TrainSettings, client_update
from fedcollm_secure.crypto import InsecureSeededRandomForTests
from fedcollm_secure.privacy import compute_epsilon
from fedcollm_secure.privacy.dpsgd import (
    DPTrainResult, per_example_answer_loss, planned_steps, poisson_sample, sample_rate,
    train_lora_dp,
)

from lora_helpers import mean_answer_loss, peft_tiny, save_tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TEST_SEED = "dpsgd-tests"  # named test-mode randomness (Poisson sampling and noise seed)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"))


_peft, _mean_loss = peft_tiny, mean_answer_loss


def test_dp_training_at_a_large_epsilon_still_lowers_the_loss(tiny_dir: Path) -> None:
    model, tok = _peft(tiny_dir)
    features = tokenize_examples(generated_mc_dataset(64, seed=1, tasks=("opposite",
                                                                         "successor")),
                                 tok, max_length=64)
    settings = TrainSettings(epochs=4, batch_size=8, learning_rate=5e-3, schedule="constant")
    before = _mean_loss(model, features, tok)
    result = train_lora_dp(model, tok, features, settings, noise_multiplier=0.3,
                           max_grad_norm=1.0, rng=InsecureSeededRandomForTests(TEST_SEED,
                                                                               quiet=True))
    after = _mean_loss(model, features, tok)
    eps = compute_epsilon(noise_multiplier=0.3, sample_rate=result.sample_rate,
                          steps=result.steps, delta=1e-5)
    assert result.steps == planned_steps(64, settings) == 32 and result.sample_rate == 8 / 64
    assert eps > 50  # a large epsilon: the update must then behave like SGD
    assert after < 0.9 * before, (before, after)
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())  # hooks removed
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen  # the base model stayed frozen


def test_empty_poisson_samples_take_noise_only_steps(tiny_dir: Path) -> None:
    model, tok = _peft(tiny_dir)
    features = tokenize_examples(generated_mc_dataset(4, seed=2), tok, max_length=64)
    start = adapter_state(model)
    result = train_lora_dp(model, tok, features, TrainSettings(epochs=4, batch_size=1),
                           noise_multiplier=1.0, max_grad_norm=0.5,
                           rng=InsecureSeededRandomForTests(TEST_SEED, quiet=True))
    assert result.steps == 16 and 0 < result.empty_steps < 16
    end = adapter_state(model)
    assert any(float((end[n] - start[n]).abs().max()) > 0 for n in start)


def test_per_example_loss_does_not_depend_on_the_other_examples(tiny_dir: Path) -> None:
    model, tok = _peft(tiny_dir)
    features = tokenize_examples(generated_mc_dataset(3, seed=5), tok, max_length=64)
    collate = CausalLMCollator(tok.pad_token_id)  # type: ignore[attr-defined]
    with torch.no_grad():
        _, together = per_example_answer_loss(model, collate(features))
        alone = [float(per_example_answer_loss(model, collate([f]))[1][0]) for f in features]
    assert together.tolist() == pytest.approx(alone, rel=1e-4)


def test_poisson_sampling_rate_and_client_update_with_dp(tiny_dir: Path) -> None:
    rng = InsecureSeededRandomForTests(TEST_SEED, quiet=True)
    counts = [len(poisson_sample(1000, 0.1, rng)) for _ in range(50)]
    assert 95 < sum(counts) / 50 < 105  # mean 100, standard error ~1.3
    assert sample_rate(4, TrainSettings(batch_size=8)) == 1.0
    model, tok = _peft(tiny_dir)
    features = tokenize_examples(generated_mc_dataset(8, seed=3), tok, max_length=64)
    delta, result = client_update(model, tok, adapter_state(model), features,
                                  TrainSettings(batch_size=4), dp=(1.0, 1.0))
    assert isinstance(result, DPTrainResult)
    assert result.steps == 2 and result.noise_multiplier == 1.0
    assert any(float(v.abs().max()) > 0 for v in delta.values())


def test_dp_noise_comes_from_the_csprng_with_the_requested_std() -> None:
    """The DP-SGD noise is Gaussian with std noise_multiplier * max_grad_norm, and a function
    of the RandomSource only (a named test seed reproduces it; another seed does not)."""
    from scipy import stats

    from fedcollm_secure.privacy.dpsgd import gaussian_noise

    std, n = 0.7, 200_000
    z = gaussian_noise((n,), std, InsecureSeededRandomForTests(TEST_SEED, quiet=True)).numpy()
    assert abs(z.mean()) < 5 * std / n ** 0.5
    assert abs(z.std() / std - 1) < 0.01  # the estimate's s.e. is about 0.16 %
    assert abs(stats.kurtosis(z)) < 0.06  # Gaussian tails (s.e. about 0.011)
    assert stats.kstest(z / std, "norm").pvalue > 1e-4
    again = gaussian_noise((n,), std, InsecureSeededRandomForTests(TEST_SEED, quiet=True))
    other = gaussian_noise((n,), std, InsecureSeededRandomForTests("other", quiet=True))
    assert np.array_equal(again.numpy(), z) and not np.array_equal(other.numpy(), z)
    assert stats.kstest(z / (1.06 * std), "norm").pvalue < 1e-6  # a 6 % wrong std is seen
