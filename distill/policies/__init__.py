"""Weighting policies, one per file, registered by name in :data:`POLICIES`."""

from .base import POLICIES, Weights, WeightingPolicy, build_policy, register_policy, uniform_weights
from . import aver, camkd, ebkd, mtkd_rl, mixture  # noqa: F401  (registers)

__all__ = ["POLICIES", "Weights", "WeightingPolicy", "build_policy", "register_policy", "uniform_weights"]
