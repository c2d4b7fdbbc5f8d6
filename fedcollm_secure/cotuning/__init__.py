"""FedCoLLM co-tuning: models, LoRA, data, distillation, training and evaluation."""

from .baselines import BASELINES, run_all, run_baseline
from .bridge import VocabBridge, bridged_kl, pair_features
from .choice_distill import choice_distillation_loss, choice_logprobs
from .data import (
    CausalLMCollator,
    MCExample,
    generated_mc_dataset,
    load_bigbench_mc,
    load_mc_dataset,
    partition_by_task,
    partition_dirichlet,
    split_public,
    to_causal_lm_example,
)
from .distill import DistillSettings, distillation_loss, sparse_kl, teacher_topk
from .engine import FedCoLLM, FedCoLLMConfig
from .evaluation import EvalConfig, evaluate_mc, perplexity
from .lora import (
    LoraSettings,
    adapter_delta,
    adapter_shapes,
    adapter_state,
    apply_delta,
    attach_lora,
    load_adapter,
    load_adapter_state,
    save_adapter,
)
from .server import PublicSet, aggregate_deltas, mutual_distill, prepare_public
from .trainer import TrainSettings, client_update, train_lora
from .models import (
    ModelSpec,
    check_same_tokenizer,
    derive_slm_by_pruning,
    load_model,
    logits_at,
)

__all__ = [
    "BASELINES", "run_all", "run_baseline",
    "PublicSet", "VocabBridge", "bridged_kl", "choice_distillation_loss", "choice_logprobs",
    "pair_features", "prepare_public",
    "FedCoLLM", "FedCoLLMConfig", "aggregate_deltas", "mutual_distill",
    "CausalLMCollator", "DistillSettings", "EvalConfig", "MCExample", "TrainSettings",
    "client_update", "distillation_loss", "evaluate_mc", "generated_mc_dataset",
    "load_bigbench_mc", "load_mc_dataset", "partition_by_task", "partition_dirichlet",
    "perplexity", "sparse_kl", "split_public", "teacher_topk", "to_causal_lm_example",
    "train_lora",
    "LoraSettings",
    "ModelSpec",
    "adapter_delta",
    "adapter_shapes",
    "adapter_state",
    "apply_delta",
    "attach_lora",
    "check_same_tokenizer",
    "derive_slm_by_pruning",
    "load_adapter",
    "load_adapter_state",
    "load_model",
    "logits_at",
    "save_adapter",
]
