"""Configuration of the masking protocol and the parameters resolved for one round."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

from ...config import ConfigBase, require, require_finite_positive
from ...crypto.quantization import QuantizationSpec

PROTOCOL = "masking/v1"
PROTOCOL_NAME = "masking"
VERSION = 1


def default_degree(n: int) -> int:
    """SecAgg+ neighbourhood size: 2*ceil(log2 n) (even), capped at n-1."""
    return min(n - 1, 2 * math.ceil(math.log2(max(n, 2))))


@dataclass(frozen=True)
class MaskingConfig(ConfigBase):
    """User-facing options of ``masking`` (all optional).

    graph: ``complete`` (SecAgg) or ``k_regular`` (SecAgg+, random Harary graph of even degree).
    share_threshold: shares needed to recover a secret inside a neighbourhood (k_regular only;
    the complete graph uses the global threshold).
    clip: inputs are clipped elementwise to [-clip, clip] before quantisation.
    ring_bits / levels: ring Z_{2^ring_bits}; ``levels`` quantisation levels per unit of clip
    (default: the most that fit the number of clients).
    max_weight: the largest client weight accepted; weights travel inside the masked vector.
    min_threshold: clients refuse a round whose announced threshold is below this.
    consistency_check: run the consistency stage (survivors sign the set of masked-input
    senders before anyone reveals a share); a client with it on refuses rounds without it.
    On by default when identities are configured.
    """

    section: ClassVar[str] = "masking"
    graph: Literal["complete", "k_regular"] = "complete"
    degree: int | None = None
    share_threshold: int | None = None
    clip: float = 4.0
    ring_bits: int = 32
    levels: int | None = None
    max_weight: float = 1.0
    min_threshold: int = 2
    max_clients: int = 10_000
    consistency_check: bool = False

    def validate(self) -> None:
        require_finite_positive("masking.clip", self.clip)
        require_finite_positive("masking.max_weight", self.max_weight)
        require(8 <= self.ring_bits <= 64, "masking.ring_bits must be in [8, 64]")
        require(self.min_threshold >= 2, "masking.min_threshold must be >= 2 (a sum of one "
                "client is that client's update)")
        require(self.max_clients >= 2, "masking.max_clients must be >= 2")
        require(isinstance(self.consistency_check, bool),
                "masking.consistency_check must be true or false")
        if self.degree is not None:
            require(self.degree >= 2 and self.degree % 2 == 0,
                    "masking.degree must be an even number >= 2")
        if self.share_threshold is not None:
            require(self.share_threshold >= 2, "masking.share_threshold must be >= 2")
        if self.levels is not None:
            require(self.levels >= 1, "masking.levels must be >= 1")


@dataclass(frozen=True)
class RoundParams:
    """Concrete parameters of one round, as announced to every client."""

    n_nodes: int
    threshold: int
    share_threshold: int
    graph: str
    degree: int
    values: QuantizationSpec
    weight: QuantizationSpec

    @classmethod
    def resolve(cls, config: MaskingConfig, n_nodes: int, threshold: int | None) -> RoundParams:
        require(2 <= n_nodes <= config.max_clients,
                f"masking needs between 2 and {config.max_clients} clients, got {n_nodes}")
        t = threshold if threshold is not None else max(config.min_threshold, n_nodes // 2 + 1)
        require(config.min_threshold <= t <= n_nodes,
                f"threshold {t} must be in [{config.min_threshold}, {n_nodes}]")
        if config.graph == "complete" or n_nodes <= 3:
            degree, share_t, graph = n_nodes - 1, t, "complete"
            if config.graph == "k_regular":
                graph = "complete"  # a regular graph on <= 3 nodes is complete
        else:
            degree = config.degree if config.degree is not None else default_degree(n_nodes)
            degree = min(degree, n_nodes - 1)
            graph = "complete" if degree == n_nodes - 1 else "k_regular"
            # default: a majority of the degree+1 holders, never above the global threshold
            share_t = config.share_threshold or min(degree // 2 + 1, t)
            if graph == "complete":
                share_t = t
        require(2 <= share_t <= degree + 1,
                f"share_threshold {share_t} must be in [2, degree+1={degree + 1}]")
        require(share_t <= t, f"share_threshold {share_t} exceeds the threshold {t}")
        values = QuantizationSpec.fit(config.clip * config.max_weight, config.ring_bits, n_nodes,
                                      config.levels)
        weight = QuantizationSpec(config.max_weight, config.ring_bits, values.levels, n_nodes)
        return cls(n_nodes, t, share_t, graph, degree, values, weight)
