"""Any other module with trainable parameters: per-sample gradients by recomputation.

During the recorded forward the observer keeps the module's inputs and puts a tensor hook
on every output that requires grad. After backward it has, for each sample i, its inputs
x_i and output gradients δ_i, and g_i = ∇_θ Σ_k ⟨f(x_i; θ)_k, δ_{i,k}⟩ is sample i's
gradient in back-propagated units. `torch.func` computes all of them at once (vmap over
samples of grad, via functional_call with cloned buffers); where vmap cannot (nn.LSTM's
fused kernel has no batching rule) a per-sample loop of torch.autograd.grad does.

Limits, by construction: samples must not interact inside the module (its forward on a
batch of one must equal its slice of the batch forward), tensor keyword arguments are
treated as batched when their first dimension is the batch size, and random layers
(dropout) draw new masks, so their norms match only in distribution.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.weight_norm import WeightNorm
from torch.utils._pytree import tree_flatten, tree_unflatten

from samplescope.recorder.distributed import full_value, functional_call
from samplescope.recorder.layers.base import Observer, Session, broadcast_over_batch, replaying
from samplescope.recorder.layers.shared import DenseUse

__all__ = ["FallbackObserver"]

logger = logging.getLogger(__name__)


@dataclass
class _Call:
    """One recorded call: its inputs as leaves (with batch dims), outputs' batch dims, grads."""

    leaves: list[Any]
    in_dims: list[int | None]
    spec: Any
    out_dims: list[int | None]
    grads: dict[int, Tensor] = field(default_factory=dict)


class FallbackObserver(Observer):
    """Per-sample gradients of any module by torch.func (or a per-sample loop).

    Args:
        name: dotted module name.
        module: the module.
        session: the recorder.
        claims_children: also cover the children's parameters (used when a rule that
            claims its children, e.g. attention, declines the module, and for modules
            whose weights are parametrized: their trainable originals live in children).
    """

    method = "fallback"
    supports_reuse = True

    def __init__(
        self, name: str, module: nn.Module, session: Session, *, claims_children: bool = False
    ) -> None:
        super().__init__(name, module, session)
        if claims_children:
            self.params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        # nn.LSTM & co. run one fused kernel that vmap cannot batch: go straight to the loop.
        self._loop = isinstance(module, nn.RNNBase)
        # Replays draw new dropout masks: their batch sum cannot be checked against the step's.
        self._random = any(
            isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in module.modules()
        )
        self._recorded: list[_Call] = []
        self._done = False
        self._per_sample: dict[str, Tensor] | None = None

    def _attach(self) -> None:
        self._handles.append(self.module.register_forward_hook(self._on_forward, with_kwargs=True))
        if self.book is not None:
            self.book.add_collector(self.collect)

    def _clear(self) -> None:
        self._recorded = []
        self._done = False
        self._per_sample = None

    def _checking(self) -> bool:
        return super()._checking() and not (self._random and self.module.training)

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not self._recording():
            return None
        outputs, out_spec = tree_flatten(output)
        tracked = [i for i, o in enumerate(outputs) if isinstance(o, Tensor) and o.requires_grad]
        if not tracked or not self._count_call():
            return None
        try:
            leaves, in_dims, spec = _batched_inputs(module, args, kwargs, self.batch_dim)
            out_dims = _output_dims(module, outputs, self.batch_dim)
        except Exception as error:  # noqa: BLE001 - reported after backward
            self._store_error(error)
            return None
        replaced = False
        for i in tracked:
            dim = out_dims[i] or 0
            expanded, _, changed = broadcast_over_batch(outputs[i], outputs[i], self.session, dim)
            if changed:
                outputs[i] = expanded
                replaced = True
        if replaced:
            # A call evaluated once for the whole batch: its inputs are shared by every sample.
            n = self.session.batch_size
            in_dims = [
                None if d is not None and x.shape[d] == 1 and n != 1 else d
                for x, d in zip(leaves, in_dims, strict=True)
            ]
        call = _Call(leaves, in_dims, spec, out_dims)
        self._recorded.append(call)
        for i in tracked:
            outputs[i].register_hook(self._grad_hook(call, i))
        return tree_unflatten(outputs, out_spec) if replaced else None

    def _grad_hook(self, call: _Call, index: int) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            call.grads[index] = grad.detach()

        return hook

    def collect(self) -> None:
        """Compute this step's per-sample gradients (once) and hand the book its uses."""
        if self._done or self._result.error:
            return
        self._done = True
        calls = [c for c in self._recorded if c.grads]
        if not calls:
            return
        try:
            per_sample = None
            for call in calls:
                grads = self._per_sample_grads(call)
                per_sample = (
                    grads
                    if per_sample is None
                    else {k: per_sample[k] + v for k, v in grads.items()}
                )
        except Exception as error:  # noqa: BLE001 - handed to the recorder
            self._store_error(error)
            return
        own = {n: g for n, g in per_sample.items() if n in self.params}
        self._store_norms({n: g.flatten(1).square().sum(1) for n, g in own.items()})
        if self.book is not None:
            # All calls are summed already: only shared parameters (and, on the first step,
            # the check) need the book.
            self._booked.update(self.shared)
            names = (
                [*self.params, *self.borrowed]
                if self._checking()
                else [
                    *self.shared,
                    *self.borrowed,
                ]
            )
            for n in names:
                self.book.add(self._parameter(n), DenseUse(per_sample[n]))
        if self.session.alignment:
            self._per_sample = own
        self._recorded = []

    def _finish(self) -> None:
        self.collect()

    def alignment(self, batch_grad: dict[str, Tensor]) -> Tensor:
        """Σ_params ⟨g_i, G⟩ from the per-sample gradients kept by `_finish`."""
        self._finish()
        if self._per_sample is None:
            msg = f"layer {self.name!r}: no per-sample gradients kept for alignment"
            raise RuntimeError(msg)
        total = self._book_alignment(batch_grad)
        for pname, g in self._per_sample.items():
            if pname in batch_grad and pname not in self._booked:
                batch = batch_grad[pname]
                batch = batch.to_dense() if batch.is_sparse else batch
                value = (g.flatten(1) * batch.reshape(1, -1)).sum(1)
                total = value if total is None else total + value
        if total is None:
            total = next(iter(self._per_sample.values())).new_zeros(self._n)
        return total

    # -- the computation ------------------------------------------------------------------

    def _per_sample_grads(self, call: _Call) -> dict[str, Tensor]:
        in_dims, spec = call.in_dims, call.spec
        grads = sorted(call.grads.items())
        index, first = grads[0]
        self._n = first.shape[call.out_dims[index] or 0]
        wanted = {**self.params, **self.borrowed}
        # Under FSDP2 the parameters are shards again after backward: replay with whole
        # ones (all-gathered, as FSDP2's own forward did).
        named = [(n, full_value(p)) for n, p in self.module.named_parameters()]
        params = {n: p for n, p in named if n in wanted}
        # Everything else the module uses is held fixed: detached (no parameter hooks
        # fire) and buffers cloned (BatchNorm's running statistics stay untouched).
        frozen = {n: p for n, p in named if n not in params}
        buffers = dict(self.module.named_buffers())
        module = self.module
        out_dims = call.out_dims

        def sample_loss(p: dict[str, Tensor], xs: list[Any], ds: list[Tensor]) -> Tensor:
            # Put back a batch dimension of one, so the module sees the shapes it expects.
            full = [x if d is None else x.unsqueeze(d) for x, d in zip(xs, in_dims, strict=True)]
            bound = tree_unflatten(full, spec)
            # Cloned inside the transform, which refuses in-place updates of captured tensors.
            state = {**p, **frozen, **{n: b.clone() for n, b in buffers.items()}}
            out, _ = tree_flatten(functional_call(module, state, **bound))
            total = 0.0
            for (index, _), d in zip(grads, ds, strict=True):
                dim = out_dims[index]
                total = total + (out[index] * (d if dim is None else d.unsqueeze(dim))).sum()
            return total

        with replaying(), warnings.catch_warnings(), _derived_weights_as_evaluated(module):
            # functional_call on RNNs warns that weights are not one contiguous chunk.
            warnings.simplefilter("ignore", UserWarning)
            if not self._loop:
                try:
                    return self._vmapped(sample_loss, params, call, grads)
                except Exception as error:  # noqa: BLE001 - the loop handles what vmap cannot
                    logger.debug("layer %s: vmap failed (%s); per-sample loop", self.name, error)
                    self._loop = True
            return self._looped(sample_loss, params, call, grads)

    def _vmapped(
        self,
        sample_loss: Callable[..., Tensor],
        params: dict[str, Tensor],
        call: _Call,
        grads: list[tuple[int, Tensor]],
    ) -> dict[str, Tensor]:
        grad_dims = [call.out_dims[i] for i, _ in grads]
        vmapped = torch.func.vmap(
            torch.func.grad(sample_loss),
            in_dims=(None, call.in_dims, grad_dims),
            randomness="different",
        )
        return vmapped(params, call.leaves, [g for _, g in grads])

    def _looped(
        self,
        sample_loss: Callable[..., Tensor],
        params: dict[str, Tensor],
        call: _Call,
        grads: list[tuple[int, Tensor]],
    ) -> dict[str, Tensor]:
        rows: dict[str, list[Tensor]] = {n: [] for n in params}
        with torch.enable_grad():
            for i in range(self._n):
                xs = [
                    x if d is None else x.select(d, i)
                    for x, d in zip(call.leaves, call.in_dims, strict=True)
                ]
                ds = [g.select(call.out_dims[j] or 0, i) for j, g in grads]
                leaf_params = {n: p.clone().requires_grad_() for n, p in params.items()}
                loss = sample_loss(leaf_params, xs, ds)
                values = torch.autograd.grad(loss, list(leaf_params.values()), allow_unused=True)
                for (n, p), g in zip(leaf_params.items(), values, strict=True):
                    if g is not None and g.is_sparse:
                        g = g.to_dense()  # Embedding(sparse=True)
                    rows[n].append(torch.zeros_like(p) if g is None else g)
        return {n: torch.stack(r) for n, r in rows.items()}


@contextlib.contextmanager
def _derived_weights_as_evaluated(module: nn.Module) -> Iterator[None]:
    """Replay parametrizations as the recorded forward evaluated them, and leave no trace.

    A parametrization's training-mode side effects belong to the real forward: spectral
    norm's power iteration has already updated its vectors, and the weight it used is the
    one its evaluation mode computes from them. Old-style ``weight_norm`` writes the derived
    weight onto the module in a pre-hook; the replay's (transformed) tensor is put back.
    """
    parametrizations = [
        m for m in module.modules() if isinstance(m, torch.nn.utils.parametrize.ParametrizationList)
    ]
    modes = [m.training for m in parametrizations]
    derived = {
        h.name: module.__dict__.get(h.name)
        for h in module._forward_pre_hooks.values()
        if isinstance(h, WeightNorm)
    }
    for m in parametrizations:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(parametrizations, modes, strict=True):
            m.train(mode)
        for name, value in derived.items():
            setattr(module, name, value)


def _batched_inputs(
    module: nn.Module, args: tuple, kwargs: dict, batch_dim: int = 0
) -> tuple[list[Any], list[int | None], Any]:
    """The forward's arguments as leaves, each leaf's batch dimension (None: shared), spec.

    The spec rebuilds ``{"args": ..., "kwargs": ...}`` for functional_call.
    """
    if any(isinstance(a, nn.utils.rnn.PackedSequence) for a in (*args, *kwargs.values())):
        msg = "PackedSequence inputs are not supported by the fallback; pass padded tensors"
        raise NotImplementedError(msg)
    names = _argument_names(module, args)
    dims: list[int | None] = []
    leaves: list[Any] = []
    batch = None
    named = [*zip(names, args, strict=True), *kwargs.items()]
    for name, value in named:
        for leaf in tree_flatten(value)[0]:
            dim = _input_dim(module, name, leaf, batch, batch_dim)
            if dim is not None and batch is None:
                batch = leaf.shape[dim]
            dims.append(dim)
            leaves.append(leaf.detach() if isinstance(leaf, Tensor) else leaf)
    _, spec = tree_flatten({"args": tuple(args), "kwargs": dict(kwargs)})
    return leaves, dims, spec


def _argument_names(module: nn.Module, args: tuple) -> list[str]:
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return [names[i] if i < len(names) else f"arg{i}" for i in range(len(args))]


def _input_dim(
    module: nn.Module, name: str, leaf: Any, batch: int | None, batch_dim: int = 0
) -> int | None:
    """Where the batch runs in one input tensor; None for shared (unbatched) values."""
    if not isinstance(leaf, Tensor) or leaf.dim() == 0:
        return None
    if batch_dim:
        # A layout the registry knows (sequence-first) or the user gave: no guessing.
        return batch_dim if leaf.dim() > batch_dim else None
    if isinstance(module, nn.RNNBase):
        # Hidden states (h0, c0) are [layers, N, H] whatever batch_first says.
        return (0 if module.batch_first else 1) if name == "input" else 1
    if isinstance(module, nn.MultiheadAttention):
        if name in ("query", "key", "value"):
            return 0 if module.batch_first else 1
        if name == "attn_mask" and leaf.dim() == 3:
            msg = "a 3-D attn_mask ([N·heads, L, S]) is not supported by the fallback"
            raise NotImplementedError(msg)
        return 0 if name == "key_padding_mask" else None
    if batch is None or leaf.shape[0] == batch:
        return 0
    return None


def _output_dims(module: nn.Module, outputs: list[Any], batch_dim: int = 0) -> list[int | None]:
    """Where the batch runs in each output leaf, in tree_flatten order."""
    dims: list[int | None] = []
    for i, out in enumerate(outputs):
        if not isinstance(out, Tensor) or out.dim() == 0:
            dims.append(None)
        elif isinstance(module, nn.RNNBase):
            dims.append((0 if module.batch_first else 1) if i == 0 else 1)
        elif isinstance(module, nn.MultiheadAttention):
            dims.append((0 if module.batch_first else 1) if i == 0 else 0)
        else:
            dims.append(batch_dim if out.dim() > batch_dim else 0)
    return dims
