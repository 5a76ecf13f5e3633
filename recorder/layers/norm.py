"""LayerNorm, GroupNorm, BatchNorm, InstanceNorm and RMSNorm: the affine part.

Every one of them computes y = x̂ ⊙ w + b with a normalised x̂ that does not depend on w or
b, so sample i's gradients are Σ δ_i ⊙ x̂_i (weight) and Σ δ_i (bias), summed over the
positions that share one weight entry. We recompute x̂ without the affine part.

BatchNorm in training mode normalises with the batch's statistics; x̂ is then exactly the
one the batch used, and Σ_spatial δ_i ⊙ x̂_i is sample i's additive term in the batch
gradient (what docs/trace-format.md stores for interacting samples). In eval mode (running
statistics) x̂ is a per-sample function and the term is the ordinary per-sample gradient.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from samplescope.recorder.layers.linear import working_precision

__all__ = [
    "batch_norm_norms",
    "group_norm_norms",
    "instance_norm_norms",
    "layer_norm_norms",
    "rms_norm_norms",
]


def layer_norm_norms(
    module: nn.Module, activation: Tensor, grad_output: Tensor
) -> dict[str, Tensor]:
    """nn.LayerNorm: x̂ over the trailing ``normalized_shape`` dims; weight shared by the rest."""
    activation, grad_output = working_precision(activation, grad_output)
    x_hat = F.layer_norm(activation, module.normalized_shape, eps=module.eps)
    return _affine_sq(module, x_hat, grad_output, channel_dim=False)


def rms_norm_norms(module: nn.Module, activation: Tensor, grad_output: Tensor) -> dict[str, Tensor]:
    """nn.RMSNorm: x̂ = x / rms(x); eps None means the dtype's eps, as F.rms_norm does."""
    activation, grad_output = working_precision(activation, grad_output)
    x_hat = F.rms_norm(activation, module.normalized_shape, eps=module.eps)
    return _affine_sq(module, x_hat, grad_output, channel_dim=False)


def group_norm_norms(
    module: nn.Module, activation: Tensor, grad_output: Tensor
) -> dict[str, Tensor]:
    """nn.GroupNorm: per-sample group statistics; one weight entry per channel."""
    activation, grad_output = working_precision(activation, grad_output)
    x_hat = F.group_norm(activation, module.num_groups, eps=module.eps)
    return _affine_sq(module, x_hat, grad_output, channel_dim=True)


def batch_norm_norms(
    module: nn.Module, activation: Tensor, grad_output: Tensor
) -> dict[str, Tensor]:
    """nn.BatchNorm1d/2d/3d with the statistics its forward used.

    Batch statistics in training mode and whenever there are no running statistics
    (``track_running_stats=False``); running statistics otherwise — the same rule as
    ``_BatchNorm.forward``. Running buffers are never updated here.
    """
    activation, grad_output = working_precision(activation, grad_output)
    batch_stats = module.training or (module.running_mean is None and module.running_var is None)
    if batch_stats:
        x_hat = F.batch_norm(activation, None, None, training=True, eps=module.eps)
    else:
        x_hat = F.batch_norm(
            activation, module.running_mean, module.running_var, training=False, eps=module.eps
        )
    return _affine_sq(module, x_hat, grad_output, channel_dim=True)


def instance_norm_norms(
    module: nn.Module, activation: Tensor, grad_output: Tensor
) -> dict[str, Tensor]:
    """nn.InstanceNorm1d/2d/3d with ``affine=True`` (batched input only)."""
    activation, grad_output = working_precision(activation, grad_output)
    input_stats = module.training or not module.track_running_stats
    if input_stats:
        x_hat = F.instance_norm(activation, use_input_stats=True, eps=module.eps)
    else:
        x_hat = F.instance_norm(
            activation,
            module.running_mean,
            module.running_var,
            use_input_stats=False,
            eps=module.eps,
        )
    return _affine_sq(module, x_hat, grad_output, channel_dim=True)


def _affine_sq(
    module: nn.Module, x_hat: Tensor, grad_output: Tensor, *, channel_dim: bool
) -> dict[str, Tensor]:
    """Σ over shared positions of δ ⊙ x̂ (weight) and δ (bias), squared and summed."""
    n = grad_output.shape[0]

    def per_entry(t: Tensor) -> Tensor:
        # -> [N, entries]: add up every position that uses the same weight entry.
        if channel_dim:
            return t.reshape(n, t.shape[1], -1).sum(2)
        features = module.weight.numel() if module.weight is not None else module.bias.numel()
        return t.reshape(n, -1, features).sum(1)

    norms = {}
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    if weight is not None and weight.requires_grad:
        norms["weight"] = per_entry(grad_output * x_hat).square().sum(1)
    if bias is not None and bias.requires_grad:
        norms["bias"] = per_entry(grad_output).square().sum(1)
    return norms
