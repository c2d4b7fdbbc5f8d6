"""FedCoLLM co-tuning: models, LoRA, data, distillation, training and evaluation."""
