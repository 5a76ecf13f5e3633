"""samplescope: which training samples move which parameters, and when.

The recorder (torch) is imported lazily so that ``import samplescope.analysis`` never
pulls in torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from samplescope.errors import SamplescopeError

if TYPE_CHECKING:
    from samplescope.recorder import Recorder, with_sample_ids

__all__ = ["Recorder", "SamplescopeError", "__version__", "with_sample_ids"]
__version__ = "0.1.0"

_LAZY = {"Recorder", "with_sample_ids"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from samplescope import recorder

        return getattr(recorder, name)
    msg = f"module 'samplescope' has no attribute {name!r}"
    raise AttributeError(msg)
