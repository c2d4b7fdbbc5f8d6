"""``masking``: pairwise-masking secure aggregation (SecAgg, and SecAgg+ on k-regular graphs).

Spec: ``protocols/masking/v1/SPEC.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from ...crypto.randomness import RandomSource
from ..base import Aggregator, register_aggregator
from ..tensors import TensorSpec, Update
from .client import MaskingClient
from .config import PROTOCOL, MaskingConfig, RoundParams
from .messages import STAGES
from .server import MaskingServer


@register_aggregator
class MaskingAggregator(Aggregator):
    name: ClassVar[str] = "masking"
    secure: ClassVar[bool] = True
    stages: ClassVar[tuple[str, ...]] = STAGES

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.config = MaskingConfig.from_dict(options)

    def default_threshold(self, n_clients: int) -> int:
        return max(self.config.min_threshold, n_clients // 2 + 1)

    def client(self, client_id: str, update: Update, *, weight: float = 1.0,
               rng: RandomSource | None = None, session: bytes | None = None,
               round_: int | None = None) -> MaskingClient:
        return MaskingClient(client_id, update, weight=weight, config=self.config, rng=rng,
                             session=session, round_=round_)

    def server(self, client_ids: Sequence[str], spec: TensorSpec, *, threshold: int | None = None,
               weighted: bool = False, rng: RandomSource | None = None,
               session: bytes | None = None, round_: int = 0) -> MaskingServer:
        return MaskingServer(client_ids, spec, config=self.config, threshold=threshold, rng=rng,
                             session=session, round_=round_)


__all__ = [
    "PROTOCOL",
    "STAGES",
    "MaskingAggregator",
    "MaskingClient",
    "MaskingConfig",
    "MaskingServer",
    "RoundParams",
]
