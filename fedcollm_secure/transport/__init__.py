"""Transports that carry protocol bytes between the server workflow and client endpoints."""

from .base import Channel, drive
from .inprocess import FaultPlan, InProcessChannel, Tamper, flip_bit

__all__ = ["Channel", "FaultPlan", "InProcessChannel", "Tamper", "drive", "flip_bit"]
