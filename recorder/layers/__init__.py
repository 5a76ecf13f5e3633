"""Per-sample gradient norms, one file per layer family, and the registry that maps them."""

from __future__ import annotations

from torch import nn

from samplescope.recorder.layers.base import HookObserver, NormFn, Observer, Session, StepResult
from samplescope.recorder.layers.linear import linear_norms
from samplescope.recorder.layers.registry import (
    LayerRegistry,
    OnUnsupported,
    Rule,
    UnsupportedLayerError,
)

__all__ = [
    "HookObserver",
    "LayerRegistry",
    "NormFn",
    "Observer",
    "OnUnsupported",
    "Rule",
    "Session",
    "StepResult",
    "UnsupportedLayerError",
    "default_registry",
]


def default_registry() -> LayerRegistry:
    """A fresh registry with every layer family samplescope knows."""
    registry = LayerRegistry()
    registry.register(nn.Linear, linear_norms)
    return registry
