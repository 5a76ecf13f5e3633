"""nn.PReLU: y = max(0, x) + w · min(0, x), one slope per channel (dim 1) or one for all.

∂y/∂w = min(0, x), so sample i's gradient of slope c is Σ over the positions that share it of
δ ⊙ min(0, x): a sum over every element for a single slope, over all dims but the channel
otherwise.
"""

from __future__ import annotations

from torch import Tensor, nn

from samplescope.recorder.layers.linear import working_precision

__all__ = ["prelu_norms"]


def prelu_norms(module: nn.Module, activation: Tensor, grad_output: Tensor) -> dict[str, Tensor]:
    """Squared per-sample norm of an nn.PReLU's slope gradient.

    Args:
        module: the nn.PReLU.
        activation: its input [N, C, ...] (or [N] with a single slope).
        grad_output: gradient w.r.t. its output, the input's shape.

    Returns:
        ``{"weight": [N]}`` when the slopes are trainable.
    """
    if not module.weight.requires_grad:
        return {}
    x, d = working_precision(activation, grad_output)
    n = x.shape[0]
    term = d * x.clamp(max=0)
    if module.weight.numel() == 1:
        return {"weight": term.reshape(n, -1).sum(1).square()}
    return {"weight": term.reshape(n, term.shape[1], -1).sum(2).square().sum(1)}
