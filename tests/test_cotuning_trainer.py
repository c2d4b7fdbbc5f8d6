from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedcollm_secure.cotuning.data import generated_mc_dataset, tokenize_examples
from fedcollm_secure.cotuning.lora import adapter_state, apply_delta
from fedcollm_secure.cotuning.trainer import (
    TrainSettings, client_update, train_lora,
)
from fedcollm_secure.errors import ConfigError


from lora_helpers import mean_answer_loss, peft_tiny, save_tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"))


_peft, _mean_loss = peft_tiny, mean_answer_loss


def test_training_lowers_the_answer_loss_on_a_learnable_task(tiny_dir: Path) -> None:
    model, tok = _peft(tiny_dir)
    examples = generated_mc_dataset(64, seed=1, tasks=("opposite", "successor"))
    features = tokenize_examples(examples, tok, max_length=64)
    before = _mean_loss(model, features, tok)
    result = train_lora(model, tok, features,
                        TrainSettings(epochs=4, batch_size=8, learning_rate=5e-3,
                                      schedule="constant"), seed=0)
    after = _mean_loss(model, features, tok)
    assert result.steps == 4 * 8 and result.examples == 4 * 64
    assert after < 0.8 * before, (before, after)


def test_client_update_returns_the_delta_from_the_broadcast_adapter(tiny_dir: Path) -> None:
    model, tok = _peft(tiny_dir)
    global_state = adapter_state(model)
    features = tokenize_examples(generated_mc_dataset(16, seed=2), tok, max_length=64)
    delta, result = client_update(model, tok, global_state, features,
                                  TrainSettings(batch_size=8, learning_rate=1e-2), seed=1)
    assert set(delta) == set(global_state) and result.steps == 2
    assert any(float(d.abs().max()) > 0 for d in delta.values())
    trained = adapter_state(model)
    rebuilt = apply_delta(global_state, delta)
    for name in trained:
        torch.testing.assert_close(rebuilt[name], trained[name], rtol=0, atol=1e-7)


def test_only_lora_parameters_change(tiny_dir: Path) -> None:
    model, tok = _peft(tiny_dir)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()  # type: ignore[attr-defined]
              if not p.requires_grad}
    features = tokenize_examples(generated_mc_dataset(8, seed=3), tok, max_length=64)
    train_lora(model, tok, features, TrainSettings(batch_size=4, learning_rate=1e-2), seed=2)
    for n, p in model.named_parameters():  # type: ignore[attr-defined]
        if n in frozen:
            assert torch.equal(frozen[n], p), n


def test_max_steps_and_empty_data(tiny_dir: Path) -> None:
    model, tok = _peft(tiny_dir)
    features = tokenize_examples(generated_mc_dataset(20, seed=4), tok, max_length=64)
    r = train_lora(model, tok, features, TrainSettings(batch_size=2, max_steps=3), seed=0)
    assert r.steps == 3 and len(r.losses) == 3
    assert train_lora(model, tok, [], TrainSettings()).steps == 0


def test_settings_validation() -> None:
    for bad in ({"epochs": 0}, {"learning_rate": 0.0}, {"schedule": "step"}, {"lr": 1e-3}):
        with pytest.raises(ConfigError):
            TrainSettings.from_dict(bad)
