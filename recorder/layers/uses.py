"""One call's contribution to each parameter of a module, as a `Use` for the `UseBook`.

nn.Linear and nn.Embedding weights get factored uses (their pairs have closed forms);
biases and every other module's parameters get their per-sample gradients materialised
with torch.func (vmap of grad of ⟨f(x_i; θ), δ_i⟩), for the parameters asked for only.
When only the batch sum is needed (the first step's check that every use was seen) one
vector-Jacobian product over the whole batch gives it, without per-sample gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from samplescope.recorder.distributed import functional_call
from samplescope.recorder.layers.base import replaying
from samplescope.recorder.layers.embedding import _token_terms
from samplescope.recorder.layers.linear import working_precision
from samplescope.recorder.layers.shared import BatchUse, DenseUse, EmbeddingUse, LinearUse, Use

__all__ = ["module_uses"]


def module_uses(
    module: nn.Module,
    activation: Tensor,
    grad: Tensor,
    names: list[str],
    *,
    batch_only: frozenset[str] = frozenset(),
) -> dict[str, Use]:
    """Uses of ``module``'s parameters ``names`` by one call (batch dimension first).

    Args:
        module: the called module (one tensor input, one tensor output).
        activation: its input, [N, ...].
        grad: the gradient w.r.t. its output, [N, ...].
        names: parameter names (``module.named_parameters(recurse=False)``) to return.
        batch_only: names for which only the batch sum is needed.
    """
    # One floating dtype for the call's tensors and the parameters replayed with them: under
    # autocast the activation or gradient is bfloat16/float16 while parameters are float32.
    own = [p.detach() for p in module.parameters(recurse=False)]
    if activation.is_floating_point():
        activation, grad, *_ = working_precision(activation, grad, *own)
    else:  # token ids stay integers
        grad, *_ = working_precision(grad, *own)
    n = grad.shape[0]
    uses: dict[str, Use] = {}
    rest = []
    for name in names:
        if isinstance(module, nn.Linear) and name == "weight":
            a = activation.reshape(n, -1, activation.shape[-1])
            uses[name] = LinearUse(a, grad.reshape(n, -1, grad.shape[-1]))
        elif isinstance(module, nn.Linear) and name == "bias":
            uses[name] = DenseUse(grad.reshape(n, -1, grad.shape[-1]).sum(1))
        elif isinstance(module, nn.Embedding) and name == "weight":
            sample, ids, d = _token_terms(module, activation, grad)
            uses[name] = EmbeddingUse(sample, ids, d, n, module.num_embeddings)
        else:
            rest.append(name)
            continue
        if name in batch_only:
            # Only the check reads it: keep the parameter-sized sum, not the activations.
            uses[name] = BatchUse(uses[name].batch_sum())
    if rest:
        batch = [r for r in rest if r in batch_only]
        dense = [r for r in rest if r not in batch_only]
        if batch:
            uses.update(
                {k: BatchUse(v) for k, v in _batch_grads(module, activation, grad, batch).items()}
            )
        if dense:
            uses.update(
                {k: DenseUse(v) for k, v in _per_sample(module, activation, grad, dense).items()}
            )
    return uses


def _state(
    module: nn.Module, names: list[str], dtype: torch.dtype
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    params = {k: _like(p.detach(), dtype) for k, p in module.named_parameters(recurse=False)}
    chosen = {k: params[k] for k in names}
    frozen = {k: p for k, p in params.items() if k not in chosen}
    return chosen, frozen


def _like(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t


def _call(module: nn.Module, p: dict, frozen: dict, x: Tensor) -> Tensor:
    # Buffers cloned inside the transform: BatchNorm's running statistics stay untouched.
    buffers = {k: b.clone() for k, b in module.named_buffers()}
    return functional_call(module, {**p, **frozen, **buffers}, (x,))


def _batch_grads(
    module: nn.Module, activation: Tensor, grad: Tensor, names: list[str]
) -> dict[str, Tensor]:
    chosen, frozen = _state(module, names, grad.dtype)
    with torch.no_grad(), replaying():
        _, vjp = torch.func.vjp(lambda p: _call(module, p, frozen, activation), chosen)
        return vjp(grad)[0]


def _per_sample(
    module: nn.Module, activation: Tensor, grad: Tensor, names: list[str]
) -> dict[str, Tensor]:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
        msg = (
            "a training-mode BatchNorm with a shared parameter or called twice has no "
            "per-sample gradients (its samples interact); give each call its own BatchNorm"
        )
        raise NotImplementedError(msg)
    chosen, frozen = _state(module, names, grad.dtype)

    def one(p: dict, x: Tensor, d: Tensor) -> Tensor:
        return (_call(module, p, frozen, x.unsqueeze(0)) * d.unsqueeze(0)).sum()

    with replaying():
        return torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))(chosen, activation, grad)
