"""nn.Conv1d, nn.Conv2d and nn.Conv3d, with the fastest exact method chosen per input shape.

A convolution is a Linear applied to every patch of its input: sample i's weight gradient
(per group) is Σ_p δ_p patch_pᵀ over output positions p. Four exact ways to get its squared
norm (`CONV_METHODS`), whose costs cross over with channels, kernel and image size:

- ``ghost``: the Gram identity on unfolded patches, ‖Σ_p δ_p a_pᵀ‖² = Σ_{p,q} (a_p·a_q)(δ_p·δ_q),
  N·L²·(CK+O) work — cheap for small images with many channels;
- ``unfold``: materialise Σ_p δ_p a_pᵀ with one batched matmul, N·L·CK·O work;
- ``grouped``: the per-sample weight gradients as one convolution-weight backward in which
  every sample is its own group (samples stacked along channels), no patch copy at all;
- ``shifted``: one kernel offset at a time, W[:, :, offset] gets Σ_p δ_p x_{p+offset}ᵀ from a
  strided view of the input, so the K-times larger patch matrix is never built.

None is best everywhere, so the candidates are timed once per shape (input, output gradient,
kernel, stride, dilation, groups, dtype, device) on a few samples of the first batch of that
shape, and the choice is kept for the process: identical layers get the same method, and a
ResNet's twenty convolutions probe only their few distinct shapes. Candidates that a cost
model puts far behind (the Gram form on large images) are not timed. Every method runs under
a memory budget: its largest intermediate may hold no more elements than the layer's input
and output gradient together (which backward holds anyway), so a method that needs more
runs over slices of the batch (per-sample norms are independent). The choice is logged at
DEBUG. All methods are exact, so the choice changes speed only.

Under ``torch.autocast`` the input arrives in float32 and the output gradient in bfloat16 or
float16 (or the reverse); both are cast to float32 first (`working_precision`), so every
method runs in one dtype and sums in float32.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samplescope.recorder.layers.linear import working_precision

__all__ = ["CONV_METHODS", "ConvNorms", "conv_weight_sq"]

logger = logging.getLogger(__name__)

# Methods within this factor of the fastest count as equally fast (see _time_candidates).
_NEAR_TIE = 1.25
# Candidates whose estimated work is more than this factor of the cheapest are not timed.
_HOPELESS = 4.0
# Samples the candidates are timed on: enough that per-call overhead does not decide.
_PROBE_SAMPLES = 16
# The memory budget of an intermediate, in elements, is the layer's input and output
# gradient together, but never below this (small layers are not sliced for nothing).
_MIN_BUDGET = 1 << 20

_ConvMethod = Callable[[nn.Module, Tensor, Tensor], Tensor]


class _Choices:
    """Which method each convolution shape uses, shared by every layer of the process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_key: dict[tuple, str] = {}

    def get(self, key: tuple) -> str | None:
        with self._lock:
            return self._by_key.get(key)

    def put(self, key: tuple, name: str) -> str:
        """Keep ``name`` unless another layer chose first (then return that one)."""
        with self._lock:
            return self._by_key.setdefault(key, name)


_CHOICES = _Choices()


class ConvNorms:
    """NormFn for one convolution layer; uses the process-wide method choice per shape.

    ``choice`` lists the shapes this layer has seen and the method each used.
    """

    def __init__(self) -> None:
        self.choice: dict[tuple, str] = {}

    def __call__(
        self, module: nn.Module, activation: Tensor, grad_output: Tensor
    ) -> dict[str, Tensor]:
        """Squared per-sample norms of a convolution's weight and bias gradients.

        Args:
            module: an nn.Conv1d/2d/3d (any stride, padding, dilation, groups, padding_mode).
            activation: its input [N, C, *S].
            grad_output: gradient w.r.t. its output [N, O, *S'].

        Returns:
            ``{"weight": [N], "bias": [N]}`` for the trainable ones.
        """
        activation, grad_output = working_precision(activation, grad_output)
        norms = {}
        if module.weight.requires_grad:
            norms["weight"] = self._weight_sq(module, activation, grad_output)
        if module.bias is not None and module.bias.requires_grad:
            # The bias sees every output position: its gradient is Σ_p δ_p.
            norms["bias"] = grad_output.flatten(2).sum(2).square().sum(1)
        return norms

    def _weight_sq(self, module: nn.Module, activation: Tensor, grad_output: Tensor) -> Tensor:
        x = pad_input(module, activation)
        key = (
            tuple(x.shape),
            tuple(grad_output.shape),
            tuple(module.kernel_size),
            tuple(module.stride),
            tuple(module.dilation),
            module.groups,
            x.dtype,
            x.device.type,
        )
        name = self.choice.get(key)
        if name is None:
            name = _CHOICES.get(key)
            if name is None:
                name = _CHOICES.put(key, _time_candidates(module, x, grad_output))
            else:
                logger.debug(
                    "conv %s input %s: chose %s (as for an identical layer)",
                    type(module).__name__,
                    tuple(x.shape),
                    name,
                )
            self.choice[key] = name
        return _budgeted(name, module, x, grad_output)


def conv_weight_sq(
    module: nn.Module, activation: Tensor, grad_output: Tensor, method: str
) -> Tensor:
    """Squared per-sample weight-gradient norm of a convolution with a named method [N]."""
    activation, grad_output = working_precision(activation, grad_output)
    return _budgeted(method, module, pad_input(module, activation), grad_output)


def _budgeted(name: str, module: nn.Module, x: Tensor, grad_output: Tensor) -> Tensor:
    """Method ``name`` over slices of the batch small enough for the memory budget."""
    n = x.shape[0]
    per_sample = max(1, _footprint(module, x, grad_output)[name] // n)
    budget = max(_MIN_BUDGET, x.numel() + grad_output.numel())
    size = max(1, budget // per_sample)
    method = CONV_METHODS[name]
    if size >= n:
        return method(module, x, grad_output)
    return torch.cat(
        [method(module, x[i : i + size], grad_output[i : i + size]) for i in range(0, n, size)]
    )


def pad_input(module: nn.Module, x: Tensor) -> Tensor:
    """The input padded exactly as the convolution pads it, so every method uses padding 0.

    'same' puts the odd extra element on the right, as PyTorch does; padding modes other
    than zeros are applied by F.pad in the module's forward too.
    """
    amounts: list[int] = []
    spatial = len(module.kernel_size)
    for i in reversed(range(spatial)):
        if module.padding == "valid":
            left = right = 0
        elif module.padding == "same":
            total = module.dilation[i] * (module.kernel_size[i] - 1)
            left, right = total // 2, total - total // 2
        else:
            left = right = module.padding[i]
        amounts += [left, right]
    if not any(amounts):
        return x
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(x, amounts, mode=mode)


def _patches(module: nn.Module, x: Tensor) -> Tensor:
    """Unfolded patches of a padded input, [N·G, L, C/G·K] in the weight's layout."""
    n, c = x.shape[:2]
    g = module.groups
    spatial = len(module.kernel_size)
    if spatial == 2:
        # F.unfold is im2col: faster than the strided-view copy below.
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, stride=module.stride)
        return cols.reshape(n * g, -1, cols.shape[-1]).transpose(1, 2)
    for i, (k, s, d) in enumerate(
        zip(module.kernel_size, module.stride, module.dilation, strict=True)
    ):
        # A window of the dilated kernel's extent, then every d-th element of it.
        x = x.unfold(2 + i, d * (k - 1) + 1, s)
    x = x[(..., *[slice(None, None, d) for d in module.dilation])]
    # [N, C, L..., K...] -> [N, G, L..., C/G, K...]
    x = x.reshape(n, g, c // g, *x.shape[2:])
    positions = list(range(3, 3 + spatial))
    kernel = list(range(3 + spatial, 3 + 2 * spatial))
    x = x.permute(0, 1, *positions, 2, *kernel)
    n_pos = x.shape[2 : 2 + spatial].numel()
    return x.reshape(n * g, n_pos, -1)


def _grads(module: nn.Module, grad_output: Tensor) -> Tensor:
    """Output gradients as [N·G, L, O/G], matching `_patches`."""
    n, o = grad_output.shape[:2]
    g = module.groups
    return grad_output.reshape(n * g, o // g, -1).transpose(1, 2)


def _ghost(module: nn.Module, x: Tensor, grad_output: Tensor) -> Tensor:
    a = _patches(module, x)
    d = _grads(module, grad_output)
    per_group = ((a @ a.transpose(1, 2)) * (d @ d.transpose(1, 2))).sum((1, 2))
    return per_group.reshape(x.shape[0], -1).sum(1)


def _unfold(module: nn.Module, x: Tensor, grad_output: Tensor) -> Tensor:
    a = _patches(module, x)
    d = _grads(module, grad_output)
    per_group = (d.transpose(1, 2) @ a).square().sum((1, 2))
    return per_group.reshape(x.shape[0], -1).sum(1)


_WEIGHT_BACKWARD = {
    1: torch.nn.grad.conv1d_weight,
    2: torch.nn.grad.conv2d_weight,
    3: torch.nn.grad.conv3d_weight,
}


def _grouped(module: nn.Module, x: Tensor, grad_output: Tensor) -> Tensor:
    # Stacking the samples along channels and giving each its own group makes the
    # ordinary weight backward return one weight gradient per (sample, group).
    n, c = x.shape[:2]
    o = grad_output.shape[1]
    weight_shape = (n * o, c // module.groups, *module.kernel_size)
    per_sample = _WEIGHT_BACKWARD[len(module.kernel_size)](
        x.reshape(1, n * c, *x.shape[2:]),
        weight_shape,
        grad_output.reshape(1, n * o, *grad_output.shape[2:]),
        stride=module.stride,
        padding=0,
        dilation=module.dilation,
        groups=n * module.groups,
    )
    return per_sample.reshape(n, -1).square().sum(1)


def _shifted(module: nn.Module, x: Tensor, grad_output: Tensor) -> Tensor:
    # One kernel offset at a time: the weight slice W[:, :, offset] gets Σ_p δ_p x_{p+offset}ᵀ,
    # a batched [O, L] @ [L, C] product over a strided view of the input. Summing the squared
    # norms of the slices gives ‖W_i‖² without building the K-times larger patch matrix.
    n, c = x.shape[:2]
    groups = module.groups
    out_sizes = grad_output.shape[2:]
    d = grad_output.reshape(n * groups, grad_output.shape[1] // groups, -1)
    total = x.new_zeros(n)
    for offset in itertools.product(*(range(k) for k in module.kernel_size)):
        window = tuple(
            slice(o * dil, o * dil + st * (size - 1) + 1, st)
            for o, dil, st, size in zip(
                offset, module.dilation, module.stride, out_sizes, strict=True
            )
        )
        shifted = x[(slice(None), slice(None), *window)].reshape(n * groups, c // groups, -1)
        total += (d @ shifted.transpose(1, 2)).square().reshape(n, -1).sum(1)
    return total


CONV_METHODS: dict[str, _ConvMethod] = {
    "ghost": _ghost,
    "unfold": _unfold,
    "grouped": _grouped,
    "shifted": _shifted,
}


def _footprint(module: nn.Module, x: Tensor, grad_output: Tensor) -> dict[str, int]:
    """Elements of each method's largest intermediate, for the whole batch.

    The grouped weight backward unfolds its input like ``unfold`` does on the CPU
    (im2col), so it counts the patches too.
    """
    n, c = x.shape[:2]
    o = grad_output.shape[1]
    g = module.groups
    k = 1
    for size in module.kernel_size:
        k *= size
    positions = grad_output[0, 0].numel()
    patches = n * c * k * positions
    weights = n * o * (c // g) * k
    return {
        "ghost": max(patches, n * g * positions * positions),
        "unfold": max(patches, weights),
        "grouped": max(patches, weights) if x.device.type == "cpu" else weights,
        "shifted": max(n * c * positions, n * o * (c // g)),
    }


def _work(module: nn.Module, x: Tensor, grad_output: Tensor) -> dict[str, int]:
    """Multiply-adds of each method (the Gram form grows with the positions squared)."""
    n, c = x.shape[:2]
    o = grad_output.shape[1]
    k = 1
    for size in module.kernel_size:
        k *= size
    positions = grad_output[0, 0].numel()
    direct = n * positions * c * k * o // module.groups
    return {
        "ghost": n * positions * positions * (c * k + o),
        "unfold": direct,
        "grouped": direct,
        "shifted": direct,
    }


def _time_candidates(module: nn.Module, x: Tensor, grad_output: Tensor) -> str:
    """The fastest method on a few samples; near-ties go to the smaller intermediate."""
    sizes = _footprint(module, x, grad_output)
    work = _work(module, x, grad_output)
    cheapest = min(work.values())
    names = [name for name in CONV_METHODS if work[name] <= _HOPELESS * cheapest]
    probe_x, probe_d = x[:_PROBE_SAMPLES], grad_output[:_PROBE_SAMPLES]
    timings: dict[str, float] = {}
    for name in names:
        _sync(x)
        start = time.perf_counter()
        _budgeted(name, module, probe_x, probe_d)
        _sync(x)
        timings[name] = time.perf_counter() - start
    # Timing once is noisy, so near-ties go to the method with the smaller intermediate:
    # the same speed for less peak memory.
    fastest = min(timings.values())
    near = [name for name, seconds in timings.items() if seconds <= _NEAR_TIE * fastest]
    best = min(near, key=sizes.__getitem__)
    logger.debug(
        "conv %s input %s: chose %s (%s)",
        type(module).__name__,
        tuple(x.shape),
        best,
        ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in timings.items()),
    )
    return best


def _sync(x: Tensor) -> None:
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
