"""nn.Linear, for inputs of any rank.

For one token the per-sample weight gradient is the outer product δ aᵀ, whose squared
norm is ‖a‖²‖δ‖². For T tokens it is Σ_t δ_t a_tᵀ: either materialise it (N·T·I·O work,
N·I·O memory) or use the Gram ("ghost norm") identity
‖Σ_t δ_t a_tᵀ‖² = Σ_{t,u} (a_t·a_u)(δ_t·δ_u) (N·T²·(I+O) work). We take the cheaper.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["linear_norms", "token_outer_sq"]


def linear_norms(module: nn.Module, activation: Tensor, grad_output: Tensor) -> dict[str, Tensor]:
    n = grad_output.shape[0]
    a = activation.reshape(n, -1, activation.shape[-1])
    d = grad_output.reshape(n, -1, grad_output.shape[-1])
    norms = {}
    if module.weight.requires_grad:
        norms["weight"] = token_outer_sq(a, d)
    if module.bias is not None and module.bias.requires_grad:
        norms["bias"] = d.sum(1).square().sum(1)
    return norms


def token_outer_sq(a: Tensor, d: Tensor) -> Tensor:
    """‖Σ_t d_t a_tᵀ‖² per sample for a [N, T, I] and d [N, T, O]."""
    n, t, i = a.shape
    o = d.shape[-1]
    if t == 1:
        return a[:, 0].square().sum(1) * d[:, 0].square().sum(1)
    if t * (i + o) < i * o:
        return ((a @ a.transpose(1, 2)) * (d @ d.transpose(1, 2))).sum((1, 2))
    return (d.transpose(1, 2) @ a).square().sum((1, 2))
