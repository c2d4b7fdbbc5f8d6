"""Differential privacy: DP-SGD accounting (Opacus), per-client budgets, distributed DP on
top of masking, and the privacy ledger.

:mod:`.dpsgd` (Opacus training) is imported on use, not here, so that importing the
accountants does not pull in the co-tuning stack.
"""

from .accountant import ClientAccountant, compute_epsilon, epsilon_of_history, noise_for_epsilon
from .config import DDPSettings, DPSGDSettings, PrivacySettings
from .ledger import PrivacyLedger, read_ledger

__all__ = ["ClientAccountant", "DDPSettings", "DPSGDSettings", "PrivacyLedger",
           "PrivacySettings", "compute_epsilon", "epsilon_of_history", "noise_for_epsilon",
           "read_ledger"]
