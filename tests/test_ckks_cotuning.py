"""Co-tuning with ``ckks``: the same adapters as ``plaintext``, within CKKS precision."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedcollm_secure.cotuning.engine import FedCoLLM, FedCoLLMConfig
from fedcollm_secure.cotuning.models import save_tiny_model
from fedcollm_secure.cotuning.server import aggregate_deltas
from fedcollm_secure.secagg.ckks import PRESETS

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LORA = {"r": 4, "alpha": 8, "dropout": 0.0}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ckks-engine")
    llm = save_tiny_model(root / "llm", "llama", seed=3, hidden=48, layers=2)
    slm = save_tiny_model(root / "slm", "llama", seed=4, hidden=32, layers=1)
    return llm, slm


def _config(dirs: tuple[Path, Path], aggregator: str, **options: Any) -> FedCoLLMConfig:
    return FedCoLLMConfig.from_dict({
        "llm": {"source": str(dirs[0])}, "slm": {"source": str(dirs[1])}, "lora": LORA,
        "train": {"batch_size": 8, "learning_rate": 1e-2, "schedule": "constant"},
        "distill_train": {"batch_size": 8, "learning_rate": 1e-2, "schedule": "constant"},
        "data": {"limit": 48, "eval_limit": 4, "max_length": 48},
        "partition": {"scheme": "iid"}, "n_clients": 3, "rounds": 2, "seed": 11,
        "aggregator": aggregator, "aggregator_options": options})


def test_aggregate_deltas_with_ckks_is_the_weighted_mean_within_its_bound() -> None:
    gen = torch.Generator().manual_seed(0)
    deltas = {f"c{i}": {"a.lora_A": torch.randn(8, 32, generator=gen) * 1e-2,
                        "a.lora_B": torch.randn(32, 8, generator=gen) * 1e-2} for i in range(3)}
    weights = {"c0": 40.0, "c1": 24.0, "c2": 64.0}
    mean, result = aggregate_deltas(deltas, weights, protocol="ckks")
    assert result.protocol == "ckks" and sorted(result.survivors) == ["c0", "c1", "c2"]
    total = sum(weights.values())
    bound = result.stats["params"]["error_bound"]
    assert abs(result.weight_total - total) <= bound
    for name, got in mean.items():
        want = sum(deltas[c][name].double() * w for c, w in weights.items()) / total
        # the sum's error divided by the weight total, plus float32 rounding of the mean
        err = float((got.double() - want).abs().max())
        assert err <= bound / (total - bound) + 1e-8, name


def _engine(dirs: tuple[Path, Path], aggregator: str, **options: Any) -> FedCoLLM:
    """The same LoRA initialisation for every run (peft draws it from torch's global RNG)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return FedCoLLM(_config(dirs, aggregator, **options))


def test_a_cotuning_run_with_ckks_gives_the_plaintext_adapters(dirs: tuple[Path, Path]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # plaintext warns that it is insecure
        plain = _engine(dirs, "plaintext")
        start = {n: v.clone() for n, v in plain.global_state.items()}
        plain_history = plain.run()
    ckks = _engine(dirs, "ckks", preset="n8192")
    assert all(torch.equal(start[n], v) for n, v in ckks.global_state.items())
    ckks_history = ckks.run()
    for h in ckks_history:
        assert h["aggregator"] == "ckks" and h["dropped"] == {}
        for cid in h["survivors"]:  # one ciphertext of two polynomials modulo a 60-bit prime
            assert h["bytes"][cid]["sent"] >= 2 * PRESETS["n8192"].poly_modulus_degree * 8
    a, b = plain.slm_state(), ckks.slm_state()
    assert set(a) == set(b)
    worst = max(float((a[n] - b[n]).abs().max()) for n in a)
    moved = max(float((a[n] - start[n]).abs().max()) for n in a)
    assert moved > 1e-3  # training and distillation changed the adapter
    # The aggregate differs from plaintext's by at most the CKKS bound (~1e-6 for 3 clients,
    # divided by the weight total); two rounds of training and distillation from that
    # starting point keep the adapters within 1e-4 (observed: about 1e-7).
    assert worst <= 1e-4, worst
    for x, y in zip(plain_history, ckks_history, strict=True):
        for model in ("llm", "slm"):
            px, py = (h["eval"][model]["per_client_mean"]["ppl"] for h in (x, y))
            assert np.isclose(px, py, rtol=1e-4), (model, px, py)
