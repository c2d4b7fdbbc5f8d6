"""fedcollm_secure: privacy-preserving federated co-tuning of LLMs and SLMs (FedCoLLM)."""

from . import errors
from .api import secure_sum
from .secagg import available_aggregators, get_aggregator, register_aggregator

__version__ = "0.1.0"

__all__ = [
           "__version__",
           "available_aggregators",
           "errors",
           "get_aggregator",
           "register_aggregator",
           "secure_sum",
]
