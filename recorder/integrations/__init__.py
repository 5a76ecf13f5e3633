"""Adapters for training frameworks: Hugging Face `Trainer`, PyTorch Lightning, Accelerate.

Each lives in its own module and imports its framework only when that module is imported,
so ``import samplescope.recorder`` (and this package) never needs transformers, lightning or
accelerate. Import the one you use:

    from samplescope.recorder.integrations.transformers import RecordingTrainer
    from samplescope.recorder.integrations.lightning import RecorderCallback, RecordedModule
    from samplescope.recorder.integrations.accelerate import backward

See docs/integrations.md.
"""

from __future__ import annotations

from samplescope.recorder.integrations._common import IntegrationError

__all__ = ["IntegrationError"]
