"""What every layer observer shares: the hook plumbing and the per-step state.

An observer watches one module for one recording session. During a recorded forward it
keeps what its norm function needs; when the module's output gradient arrives during
backward it computes the per-sample squared norms at once (so nothing extra is held
until the end of backward) and keeps only those N numbers per parameter.

Norms are returned in *back-propagated* units: the recorder divides by the reduction
scale. Nothing here raises inside autograd: an exception is kept and handed to the
recorder after backward, so a failing observer can never leave half-accumulated
gradients behind.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = [
    "HookObserver",
    "NormFn",
    "Observer",
    "Session",
    "StepResult",
    "directional_alignment",
    "norm_region",
    "replaying",
]

# (module, activation, grad_output) -> {param_name: squared norm per sample, shape [N]}.
# activation is the module's first positional input, detached; grad_output is the
# gradient of the back-propagated loss w.r.t. the module's output. Names are those of
# module.named_parameters(), restricted to trainable parameters.
NormFn = Callable[[nn.Module, Tensor, Tensor], dict[str, Tensor]]


# True while an observer re-runs a module itself (fallback gradients, alignment): those
# forwards must not be recorded, or the modules they call would count a second call.
_REPLAYING: ContextVar[bool] = ContextVar("samplescope_replaying", default=False)


@contextlib.contextmanager
def replaying() -> Iterator[None]:
    """Mark forwards run inside this block as recomputations that no observer records."""
    token = _REPLAYING.set(True)
    try:
        yield
    finally:
        _REPLAYING.reset(token)


@contextlib.contextmanager
def norm_region(device_type: str) -> Iterator[None]:
    """Where norms are computed: no autograd graph and autocast off.

    A backward called inside ``torch.autocast`` runs hooks with autocast still on, which
    would cast the norms' float32 matmuls back to bfloat16/float16.
    """
    with torch.no_grad(), _autocast_off(device_type):
        yield


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    try:
        return torch.autocast(device_type, enabled=False)
    except RuntimeError:  # a device type without autocast: nothing to turn off
        return contextlib.nullcontext()


class Session(Protocol):
    """What an observer asks of the recorder that owns it."""

    @property
    def active(self) -> bool:
        """True while forwards should be recorded (grad enabled, model in training mode)."""
        ...

    @property
    def alignment(self) -> bool:
        """True when observers must also keep what `Observer.alignment` needs."""
        ...


@dataclass
class StepResult:
    """One layer's outcome for one backward."""

    grad_sq: Tensor | None = None  # [N], summed over the layer's parameters
    batch_grad: dict[str, Tensor] = field(default_factory=dict)  # G per parameter
    error: BaseException | None = None


class Observer:
    """Base class: parameter hooks for the batch gradient, state reset, hook removal.

    Subclasses install their forward-side hooks in `_attach` and call `_store_norms`
    (or `_store_error`) from the backward side.
    """

    method = "identity"

    def __init__(self, name: str, module: nn.Module, session: Session) -> None:
        self.name = name
        self.module = module
        self.session = session
        self.params = dict(_owned_parameters(module))
        self._handles: list[RemovableHandle] = []
        self._result = StepResult()
        self._calls = 0

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.params.values())

    def attach(self) -> None:
        """Register every hook this observer needs."""
        for pname, param in self.params.items():
            self._handles.append(param.register_hook(self._batch_grad_hook(pname)))
        self._attach()

    def detach(self) -> None:
        """Remove every hook and undo anything `attach` changed."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._detach()

    def begin_step(self) -> None:
        """Forget the previous step. Called by the recorder after each `backward`."""
        self._result = StepResult()
        self._calls = 0
        self._clear()

    def result(self) -> StepResult:
        """The norms of the last backward (or the error that prevented them)."""
        self._finish()
        return self._result

    def alignment(self, batch_grad: dict[str, Tensor]) -> Tensor:
        """Per-sample ⟨back-propagated contribution, batch_grad⟩, shape [N].

        Only called when `session.alignment` is true, after backward.
        """
        msg = f"{type(self).__name__} does not compute alignment"
        raise NotImplementedError(msg)

    # -- for subclasses -----------------------------------------------------------------

    def _attach(self) -> None:
        raise NotImplementedError

    def _detach(self) -> None:
        """Undo changes other than hooks (e.g. a re-expressed forward)."""

    def _clear(self) -> None:
        """Drop per-step tensors kept by the subclass."""

    def _finish(self) -> None:
        """Compute anything that had to wait for the end of backward."""

    def _recording(self) -> bool:
        """True when a forward running now belongs to the recorded step."""
        return self.session.active and not _REPLAYING.get()

    def _count_call(self) -> bool:
        """Count a recorded forward; False (and an error) if the module ran twice."""
        self._calls += 1
        if self._calls > 1:
            msg = (
                f"layer {self.name!r} ran {self._calls} times in one recorded step; "
                "samplescope records modules that run once per step (no weight sharing "
                "between calls): wrap repeated calls in distinct modules, or exclude it"
            )
            self._store_error(RuntimeError(msg))
            return False
        return True

    def _store_norms(self, norms: dict[str, Tensor]) -> None:
        total = None
        for value in norms.values():
            total = value if total is None else total + value
        self._result.grad_sq = total

    def _store_error(self, error: BaseException) -> None:
        if self._result.error is None:
            self._result.error = error

    def _batch_grad_hook(self, pname: str) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            # Backward runs with grad mode off, so ask whether the forward was recorded.
            if self._calls:
                self._result.batch_grad[pname] = grad.detach()

        return hook


class HookObserver(Observer):
    """For modules with one tensor input and one tensor output and a closed-form NormFn."""

    def __init__(self, name: str, module: nn.Module, session: Session, norm_fn: NormFn) -> None:
        super().__init__(name, module, session)
        self.norm_fn = norm_fn
        self._saved: tuple[Tensor, Tensor] | None = None

    def _attach(self) -> None:
        self._handles.append(self.module.register_forward_hook(self._on_forward))

    def _clear(self) -> None:
        self._saved = None

    def _on_forward(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if not self._recording() or not isinstance(output, Tensor):
            return
        if not output.requires_grad or not self._count_call():
            return
        # The hook lives as long as the graph; holding the activation in a list it empties
        # lets autograd free the tensor as soon as this layer's backward is done.
        held = [args[0].detach()]
        output.register_hook(lambda grad: self._on_grad(held.pop(), grad) if held else None)

    def _on_grad(self, activation: Tensor, grad: Tensor) -> None:
        try:
            with norm_region(grad.device.type):
                self._store_norms(self.norm_fn(self.module, activation, grad))
            if self.session.alignment:
                self._saved = (activation, grad.detach())
        except Exception as error:  # noqa: BLE001 - handed to the recorder after backward
            self._store_error(error)

    def alignment(self, batch_grad: dict[str, Tensor]) -> Tensor:
        if self._saved is None:
            msg = f"layer {self.name!r}: no saved forward for alignment"
            raise RuntimeError(msg)
        activation, grad = self._saved
        return directional_alignment(self.module, self.params, batch_grad, (activation,), grad)


def directional_alignment(
    module: nn.Module,
    params: dict[str, Tensor],
    batch_grad: dict[str, Tensor],
    args: tuple,
    grad_output: Tensor,
) -> Tensor:
    """⟨δ_i, J_θ f(x_i) · G⟩ per sample: the sample's contribution dotted with G.

    One forward-mode pass over the whole batch gives, for every sample at once, how its
    output moves along G; dotting with its output gradient gives ⟨g_i, G⟩ exactly.
    Buffers are cloned so BatchNorm's running statistics are not updated twice.
    """
    primals = {n: p.detach() for n, p in params.items()}
    tangents = {n: batch_grad.get(n, torch.zeros_like(p)) for n, p in primals.items()}

    def run(p: dict[str, Tensor]) -> Tensor:
        # Cloned inside the transform: jvp refuses in-place updates of captured tensors.
        buffers = {n: b.clone() for n, b in module.named_buffers()}
        out = torch.func.functional_call(module, {**p, **buffers}, args)
        return out[0] if isinstance(out, tuple) else out

    with torch.no_grad(), replaying():
        _, moved = torch.func.jvp(run, (primals,), (tangents,))
    return (grad_output * moved).flatten(1).sum(1)


def _owned_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
