"""``masking``: pairwise-masking secure aggregation (SecAgg, and SecAgg+ on k-regular graphs).

Spec: ``protocols/masking/v1/SPEC.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from ...crypto.randomness import RandomSource
from ...identity import AllowList, Identity
from ..base import Aggregator, register_aggregator
from ..tensors import TensorSpec, Update
from .client import MaskingClient
from .config import PROTOCOL, MaskingConfig, RoundParams
from .messages import CHECKED_STAGES, STAGES
from .server import MaskingServer


@register_aggregator
class MaskingAggregator(Aggregator):
    name: ClassVar[str] = "masking"
    secure: ClassVar[bool] = True
    stages: ClassVar[tuple[str, ...]] = CHECKED_STAGES  # consistency_check only when enabled
    supports_identities: ClassVar[bool] = True

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.config = MaskingConfig.from_dict(options)

    def active_stages(self, identities: bool = False) -> tuple[str, ...]:
        return CHECKED_STAGES if self.config.consistency_check or identities else STAGES

    def default_threshold(self, n_clients: int) -> int:
        return max(self.config.min_threshold, n_clients // 2 + 1)

    def client(self, client_id: str, update: Update, *, weight: float = 1.0,
               rng: RandomSource | None = None, session: bytes | None = None,
               round_: int | None = None, identity: Identity | None = None,
               allow_list: AllowList | None = None) -> MaskingClient:
        return MaskingClient(client_id, update, weight=weight, config=self.config, rng=rng,
                             session=session, round_=round_, identity=identity,
                             allow_list=allow_list)

    def server(self, client_ids: Sequence[str], spec: TensorSpec, *, threshold: int | None = None,
               weighted: bool = False, rng: RandomSource | None = None,
               session: bytes | None = None, round_: int = 0,
               allow_list: AllowList | None = None) -> MaskingServer:
        return MaskingServer(client_ids, spec, config=self.config, threshold=threshold, rng=rng,
                             session=session, round_=round_, allow_list=allow_list)


__all__ = [
    "PROTOCOL",
    "CHECKED_STAGES",
    "STAGES",
    "MaskingAggregator",
    "MaskingClient",
    "MaskingConfig",
    "MaskingServer",
    "RoundParams",
]
