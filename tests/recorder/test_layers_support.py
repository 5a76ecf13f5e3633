"""Shared helpers for the layer tests (no tests here): a fake session, observed runs, oracles.

- `loop_oracle`: sample by sample, batch of one, plain autograd — the per-sample gradient.
- `additive_oracle`: for layers whose samples interact (BatchNorm in training mode, and
  every layer upstream of one): the layer's output for sample n is made the only path from
  its parameters to the loss (the other samples see a detached copy of the parameters), so
  autograd returns exactly sample n's additive term in the batch gradient.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from samplescope.recorder.layers import Observer, StepResult, default_registry


@dataclass
class FakeSession:
    active: bool = True
    alignment: bool = True


def reduce(losses: Tensor, reduction: str) -> Tensor:
    return losses.mean() if reduction == "mean" else losses.sum()


def scale(n: int, reduction: str) -> float:
    return 1.0 / n if reduction == "mean" else 1.0


class QuadraticLoss:
    """Per-sample losses Σ (out·r + out²/2) with a fixed random r per sample.

    Non-linear in the output, so output gradients differ from sample to sample; ``rows``
    picks the samples an output belongs to (the oracle feeds batches of one).
    """

    def __init__(self, shape: tuple[int, ...], seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.r = torch.randn(shape, generator=g, dtype=torch.float64)

    def __call__(self, out: Tensor, rows: slice = slice(None)) -> Tensor:
        return (out * self.r[rows] + 0.5 * out.square()).flatten(1).sum(1)


@contextmanager
def observed(
    model: nn.Module, session: FakeSession | None = None, **kwargs: Any
) -> Iterator[dict[str, Observer]]:
    session = session or FakeSession()
    observers = default_registry().observers(model, session, **kwargs)
    for o in observers:
        o.attach()
    try:
        yield {o.name: o for o in observers}
    finally:
        for o in observers:
            o.detach()


def params_of(model: nn.Module, observer: Observer) -> dict[str, nn.Parameter]:
    """The observer's parameters, found by name in ``model`` (e.g. a deep copy)."""
    prefix = observer.name + "." if observer.name else ""
    return {n: model.get_parameter(prefix + n) for n in observer.params}


def loop_oracle(
    model: nn.Module, inputs: tuple, losses: QuadraticLoss, names: dict[str, list[str]]
) -> dict[str, dict[str, Tensor]]:
    """Per-sample gradients {layer: {param: [N, ...]}} by a batch-of-one autograd loop.

    ``inputs`` are batched along dim 0 (None passes through); the model's output is batched
    along dim 0 too.
    """
    n = inputs[0].shape[0]
    found: dict[str, dict[str, list[Tensor]]] = {k: {p: [] for p in v} for k, v in names.items()}
    for i in range(n):
        rows = slice(i, i + 1)
        loss = losses(model(*(None if x is None else x[rows] for x in inputs)), rows)[0]
        for layer, pnames in names.items():
            prefix = layer + "." if layer else ""
            ps = [model.get_parameter(prefix + p) for p in pnames]
            grads = torch.autograd.grad(loss, ps, retain_graph=True, allow_unused=True)
            for p, g, param in zip(pnames, grads, ps, strict=True):
                found[layer][p].append(torch.zeros_like(param) if g is None else dense(g))
    return {k: {p: torch.stack(v) for p, v in d.items()} for k, d in found.items()}


def additive_oracle(
    model: nn.Module, run: Callable[[nn.Module], Tensor], layer: str, pnames: list[str], n: int
) -> dict[str, Tensor]:
    """Each sample's additive term in ``layer``'s gradient of ``run(model)`` (the reduced loss).

    ``pnames`` are relative to the layer and may name its children's parameters
    (attention's out_proj).
    """
    module = model.get_submodule(layer)
    params = {p: module.get_parameter(p) for p in pnames}
    rows: dict[str, list[Tensor]] = {p: [] for p in params}
    busy: list[bool] = []  # set while the hook runs the module itself
    for i in range(n):

        def keep_only(mod: nn.Module, args: tuple, kwargs: dict, out: Any, i: int = i) -> Any:
            if busy:
                return None
            busy.append(True)
            detached = {k: v.detach() for k, v in mod.named_parameters()}
            buffers = {k: v.clone() for k, v in mod.named_buffers()}
            other = torch.func.functional_call(mod, {**detached, **buffers}, args, kwargs)
            busy.clear()
            leaves, spec = tree_flatten(out)
            others, _ = tree_flatten(other)
            mixed = []
            for j, (a, b) in enumerate(zip(leaves, others, strict=True)):
                if not isinstance(a, Tensor):
                    mixed.append(a)
                    continue
                dim = 1 if isinstance(mod, nn.RNNBase) and j > 0 else 0
                mask = torch.zeros(a.shape[dim], dtype=torch.bool)
                mask[i] = True
                shape = [1] * a.dim()
                shape[dim] = -1
                mixed.append(torch.where(mask.reshape(shape), a, b))
            return tree_unflatten(mixed, spec)

        handle = module.register_forward_hook(keep_only, with_kwargs=True)
        try:
            loss = run(model)
        finally:
            handle.remove()
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (p, param), g in zip(params.items(), grads, strict=True):
            rows[p].append(torch.zeros_like(param) if g is None else g)
    return {p: torch.stack(v) for p, v in rows.items()}


def dense(t: Tensor) -> Tensor:
    """Embedding(sparse=True) gradients are sparse; compare them densely."""
    return t.to_dense() if t.is_sparse else t


def sq_norms(grads: dict[str, Tensor]) -> Tensor:
    return sum(g.flatten(1).square().sum(1) for g in grads.values())


def dots(grads: dict[str, Tensor], batch_grad: dict[str, Tensor]) -> Tensor:
    return sum(
        (g.flatten(1) * dense(batch_grad[p]).reshape(1, -1)).sum(1) for p, g in grads.items()
    )


def assert_close(actual: Tensor, expected: Tensor, rtol: float = 1e-5) -> None:
    torch.testing.assert_close(
        actual, expected, rtol=rtol, atol=1e-12 * float(expected.abs().max() + 1)
    )


def hooks_left(model: nn.Module) -> list[str]:
    """Every hook still registered on ``model``'s modules and parameters."""
    left = []
    for name, m in model.named_modules():
        for attr in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_backward_hooks",
            "_backward_pre_hooks",
            "_forward_hooks_with_kwargs",
            "_forward_pre_hooks_with_kwargs",
        ):
            if getattr(m, attr, None):
                left.append(f"{name}.{attr}")
        if "forward" in m.__dict__:
            left.append(f"{name}.forward")
    for name, p in model.named_parameters():
        if p._backward_hooks:
            left.append(f"{name}._backward_hooks")
    return left


def deepcopy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


@dataclass
class Run:
    observers: dict[str, Observer]
    results: dict[str, StepResult]
    aligned: dict[str, Tensor]
    output: Any


def run_observed(
    model: nn.Module,
    inputs: tuple,
    losses: QuadraticLoss,
    reduction: str,
    session: FakeSession | None = None,
    **kwargs: Any,
) -> Run:
    """Forward and backward of reduce(losses) with observers attached; results read inside."""
    with observed(model, session, **kwargs) as obs:
        out = model(*inputs)
        reduce(losses(out), reduction).backward()
        results = {k: o.result() for k, o in obs.items()}
        aligned = {}
        if session is None or session.alignment:
            aligned = {k: o.alignment(results[k].batch_grad) for k, o in obs.items()}
    return Run(obs, results, aligned, out)


def output_shape(model: nn.Module, inputs: tuple) -> tuple[int, ...]:
    with torch.no_grad():
        return tuple(copy.deepcopy(model)(*inputs).shape)


def check_layers(
    model: nn.Module, inputs: tuple, reduction: str, *, interacting: bool = False
) -> Run:
    """Every observed layer's norms and alignments against an oracle, to 1e-5 relative.

    ``interacting``: samples interact (BatchNorm with batch statistics), so the oracle is
    each sample's additive term; otherwise the batch-of-one loop.
    """
    reference = copy.deepcopy(model)
    losses = QuadraticLoss(output_shape(model, inputs))
    run = run_observed(model, inputs, losses, reduction)
    n = inputs[0].shape[0]
    s = scale(n, reduction)
    assert run.observers
    if interacting:

        def loss_of(m: nn.Module) -> Tensor:
            return reduce(losses(m(*inputs)), reduction)

        oracle = {
            k: additive_oracle(reference, loss_of, k, list(o.params), n)
            for k, o in run.observers.items()
        }
        s = 1.0  # the additive terms are already in back-propagated units
    else:
        names = {k: list(o.params) for k, o in run.observers.items()}
        oracle = loop_oracle(reference, inputs, losses, names)
    for name, observer in run.observers.items():
        result = run.results[name]
        assert result.error is None, (name, result.error)
        assert_close(result.grad_sq, s * s * sq_norms(oracle[name]))
        params = params_of(model, observer)
        assert set(result.batch_grad) == set(params)
        for pname, g in result.batch_grad.items():
            assert torch.equal(dense(g), dense(params[pname].grad))
        assert_close(run.aligned[name], s * dots(oracle[name], result.batch_grad))
    return run
