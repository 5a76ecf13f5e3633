"""nn.Linear, for inputs of any rank.

For one token the per-sample weight gradient is the outer product δ aᵀ, whose squared
norm is ‖a‖²‖δ‖². For T tokens it is Σ_t δ_t a_tᵀ: either materialise it (N·T·I·O work,
N·I·O memory) or use the Gram ("ghost norm") identity
‖Σ_t δ_t a_tᵀ‖² = Σ_{t,u} (a_t·a_u)(δ_t·δ_u) (N·T²·(I+O) work). We take the cheaper.

The same squared norm serves a layer that stores its weight transposed (``[in, out]``,
``y = x W + b``, e.g. Hugging Face's ``transformers.pytorch_utils.Conv1D``): the per-sample
gradient is then Σ_t a_t δ_tᵀ, the transpose of the above, with the same norm.

Under ``torch.autocast`` the input may be float32 while the output gradient is bfloat16 or
float16; `working_precision` casts both to float32 first, so the norms are float32 sums of
the low-precision tensors (and the matmuls never mix dtypes).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from samplescope.recorder.layers.base import HookObserver, Session, norm_region

__all__ = ["LinearObserver", "linear_norms", "token_outer_sq", "working_precision"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def linear_norms(module: nn.Module, activation: Tensor, grad_output: Tensor) -> dict[str, Tensor]:
    """Squared per-sample norms of an nn.Linear's (or a transposed Linear's) gradients.

    Every dimension between the batch and the features is a token (a sequence, or the
    pixels of a 1x1 convolution written as Linear); the weight uses `token_outer_sq` and
    the bias gradient is the sum of the tokens' output gradients.

    Args:
        module: the nn.Linear (or subclass), or any layer computing ``x Wᵀ + b`` or
            ``x W + b`` with parameters named ``weight`` and ``bias`` (bias may be None).
        activation: its input, [N, ..., in_features].
        grad_output: gradient w.r.t. its output, [N, ..., out_features].

    Returns:
        ``{"weight": [N], "bias": [N]}`` for the trainable ones.
    """
    activation, grad_output = working_precision(activation, grad_output)
    train_bias = module.bias is not None and module.bias.requires_grad
    if activation.dim() == 2 and grad_output.dim() == 2:
        # The common case (an MLP), without the views below: per-call overhead is what a
        # small layer's norms cost. ‖δ‖² serves both the weight and the bias.
        d_sq = _row_sq(grad_output)
        norms = {"weight": _row_sq(activation) * d_sq} if module.weight.requires_grad else {}
        if train_bias:
            norms["bias"] = d_sq
        return norms
    n = grad_output.shape[0]
    a = activation.reshape(n, -1, activation.shape[-1])
    d = grad_output.reshape(n, -1, grad_output.shape[-1])
    norms = {}
    if a.shape[1] == 1:
        # The common case (an MLP): ‖δ‖² serves both the weight and the bias.
        d_sq = _row_sq(d[:, 0])
        if module.weight.requires_grad:
            norms["weight"] = _row_sq(a[:, 0]) * d_sq
        if train_bias:
            norms["bias"] = d_sq
        return norms
    if module.weight.requires_grad:
        norms["weight"] = token_outer_sq(a, d)
    if train_bias:
        norms["bias"] = _row_sq(d.sum(1))
    return norms


class LinearObserver(HookObserver):
    """`linear_norms` for one layer, with the common case (2-D, weight and bias trained,
    one dtype) inlined: at MLP sizes the Python around three small kernels is what a
    layer's norms cost. The values are bit for bit those of `linear_norms`."""

    def __init__(self, name: str, module: nn.Module, session: Session) -> None:
        super().__init__(name, module, session, linear_norms)

    def _own_norms(self, activation: Tensor, grad: Tensor) -> None:
        module = self.module
        weight, bias = module.weight, module.bias
        if (
            activation.dim() == 2
            and grad.dim() == 2
            and activation.dtype == grad.dtype
            and activation.dtype not in _LOW_PRECISION
            and bias is not None
            and weight.requires_grad
            and bias.requires_grad
            and "weight" in self.params
            and "bias" in self.params
            and not self._booked
        ):
            d_sq = _row_sq(grad)
            total = _row_sq(activation) * d_sq  # the weight's, then the bias's added
            total += d_sq
            self._result.grad_sq = total
            return
        super()._own_norms(activation, grad)


def working_precision(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The tensors in one floating dtype: float32 if any is float16/bfloat16, else promoted.

    Autocast hands a layer float32 inputs and low-precision output gradients (or the
    reverse); squared norms summed in bfloat16 would also lose most of their digits.
    """
    first = tensors[0].dtype
    if first not in _LOW_PRECISION:
        for t in tensors:
            if t.dtype != first:
                break
        else:
            return tensors  # nothing to cast (the usual case): no dtype arithmetic
    dtypes = [t.dtype for t in tensors]
    if any(d in _LOW_PRECISION for d in dtypes):
        target = torch.promote_types(torch.float32, _widest(dtypes))
    else:
        target = _widest(dtypes)
    return tuple(t if t.dtype == target else t.to(target) for t in tensors)


def _widest(dtypes: list[torch.dtype]) -> torch.dtype:
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def _row_sq(x: Tensor) -> Tensor:
    """‖x_i‖² per row of a [N, F] tensor, in one kernel."""
    return torch.linalg.vecdot(x, x)


def token_outer_sq(a: Tensor, d: Tensor) -> Tensor:
    """‖Σ_t d_t a_tᵀ‖² per sample for a [N, T, I] and d [N, T, O].

    Picks by cost: the Gram identity costs T²(I+O) per sample, the materialised
    [O, I] matrix T·I·O, so the Gram form wins when T(I+O) < I·O.
    """
    with norm_region(a.device.type):
        return _token_outer_sq(*working_precision(a, d))


def _token_outer_sq(a: Tensor, d: Tensor) -> Tensor:
    _, t, i = a.shape
    o = d.shape[-1]
    if t == 1:
        return _row_sq(a[:, 0]) * _row_sq(d[:, 0])
    if t * (i + o) < i * o:
        return ((a @ a.transpose(1, 2)) * (d @ d.transpose(1, 2))).sum((1, 2))
    return (d.transpose(1, 2) @ a).square().sum((1, 2))
