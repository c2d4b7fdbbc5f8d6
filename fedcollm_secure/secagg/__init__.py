"""Secure-aggregation protocols built from ``fedcollm_secure.crypto``."""

from . import ckks, masking, plaintext  # noqa: F401  (registers the aggregators)
from .base import (
    Aggregator,
    ClientEndpoint,
    SecureSumResult,
    ServerWorkflow,
    StageRequests,
    available_aggregators,
    get_aggregator,
    register_aggregator,
)
from .tensors import TensorSpec

__all__ = ["Aggregator", "ClientEndpoint", "SecureSumResult", "ServerWorkflow", "StageRequests",
           "TensorSpec", "available_aggregators", "get_aggregator", "register_aggregator"]
