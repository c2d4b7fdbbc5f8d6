"""The two halves of :class:`~fedcollm_secure.cotuning.engine.FedCoLLM` for separate processes.

:class:`ServerParts` is a ``FedCoLLM`` without client data: the LLM, the server's SLM copy,
the public and evaluation data, and the engine's own model loading, data loading,
distillation inputs and evaluation (inherited, not copied). :func:`load_split` is the
engine's data loading for a client node. Both import torch.
"""

from __future__ import annotations

from typing import Any

from ...cotuning.data import MCExample
from ...cotuning.engine import FedCoLLM, FedCoLLMConfig, _seed
from ...cotuning.lora import adapter_state
from ...cotuning.server import DistillResult, mutual_distill

__all__ = ["ServerParts", "load_split"]


class _ConfigOnly(FedCoLLM):
    """A ``FedCoLLM`` that holds only its config: access to the engine's data loading."""

    def __init__(self, config: FedCoLLMConfig) -> None:  # noqa: D107 (no models, no data)
        self.config = config


def load_split(config: FedCoLLMConfig, split: str) -> list[MCExample]:
    """The examples of ``split`` as the in-process engine loads them (``data.source``)."""
    return _ConfigOnly(config)._load(split)


class ServerParts(FedCoLLM):
    """The server's side of a FedCoLLM run: models, public and evaluation data.

    The public split and the evaluation set are the ones the in-process engine would use
    (``data.source``, ``data.public_fraction``, ``partition.seed``); the client shards of
    that split are dropped: clients hold their own data.
    """

    def __init__(self, config: FedCoLLMConfig) -> None:  # noqa: D107
        self.config = config
        self.llm, self.slm, self.tokenizer, self.llm_tokenizer = self._models(
            None, None, None, None)
        _, self.public_data, self.eval_data = self._data(None, None, None)
        self.client_data, self.client_ids, self.client_eval_data = [], [], []
        self.client_features = []
        self.public_features, self.public_set = self._public_inputs()
        self.global_state = adapter_state(self.slm)
        self.history: list[dict[str, Any]] = []
        self.privacy = None
        self.stopped = None
        self._audit = None  # the engine's optional audit log (in-process runs)

    def distill(self, t: int) -> DistillResult:
        """Step 3 of round ``t`` (the SLM holds the aggregated adapter): mutual distillation,
        or nothing in ``fedavg`` mode; ``global_state`` becomes theta_{t+1}."""
        cfg = self.config
        if cfg.mode == "fedcollm":
            public = self.public_set if self.public_set is not None else self.public_features
            result = mutual_distill(self.llm, self.slm, self.tokenizer, public, cfg.distill,
                                    cfg.distill_train, seed=_seed(cfg.seed, t, -1))
        else:
            result = DistillResult()
        self.global_state = adapter_state(self.slm)
        return result
