"""Record per-sample, per-layer gradient contributions of a PyTorch training run."""

from __future__ import annotations

from samplescope.recorder.data import IndexedDataset, with_sample_ids
from samplescope.recorder.errors import RecorderError
from samplescope.recorder.layers import (
    LayerRegistry,
    NormFn,
    Rule,
    UnsupportedLayerError,
    default_registry,
)
from samplescope.recorder.recorder import Recorder
from samplescope.recorder.sample_names import sample_id_of
from samplescope.recorder.writer import FORMAT_VERSION, TraceWriteError

__all__ = [
    "FORMAT_VERSION",
    "IndexedDataset",
    "LayerRegistry",
    "NormFn",
    "Recorder",
    "RecorderError",
    "Rule",
    "TraceWriteError",
    "UnsupportedLayerError",
    "default_registry",
    "sample_id_of",
    "with_sample_ids",
]
