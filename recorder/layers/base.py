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
import math
import warnings
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from samplescope.recorder.distributed import full_value, functional_call

if TYPE_CHECKING:
    from samplescope.recorder.layers.shared import UseBook

__all__ = [
    "BatchLayoutError",
    "HookObserver",
    "NormFn",
    "Observer",
    "ReexpressedObserver",
    "Session",
    "StepResult",
    "broadcast_over_batch",
    "check_batch_dim",
    "directional_alignment",
    "is_replaying",
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


def is_replaying() -> bool:
    """True inside `replaying`: the forward running now is an observer's recomputation."""
    return _REPLAYING.get()


@contextlib.contextmanager
def norm_region(device_type: str) -> Iterator[None]:
    """Where norms are computed: no autograd graph and autocast off.

    A backward called inside ``torch.autocast`` runs hooks with autocast still on, which
    would cast the norms' float32 matmuls back to bfloat16/float16.
    """
    # Hooks run inside backward, where grad mode is already off and autocast usually is:
    # entering torch.autocast costs more Python than a norm's arithmetic on a small layer,
    # so each context is entered only when it changes something.
    grad = torch.is_grad_enabled()
    autocast = _autocast_enabled(device_type)
    if not grad and not autocast:
        yield
        return
    with (
        torch.no_grad() if grad else contextlib.nullcontext(),
        _autocast_off(device_type) if autocast else contextlib.nullcontext(),
    ):
        yield


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except (RuntimeError, TypeError, ValueError):  # a device type without autocast
        return False


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    try:
        return torch.autocast(device_type, enabled=False)
    except RuntimeError:  # a device type without autocast: nothing to turn off
        return contextlib.nullcontext()


_DEFERRED_CHECK = (
    "samplescope: under autocast the first-step check that every use of a parameter is seen "
    "cannot run (low-precision rounding hides a missed use); record a first step without "
    "autocast to check a model that may use parameters outside their modules"
)


class Session(Protocol):
    """What an observer asks of the recorder that owns it."""

    @property
    def active(self) -> bool:
        """True while forwards should be recorded (grad enabled, model in training mode),
        or while the recorder scores a checkpoint (`Recorder.score_checkpoint`, eval mode)."""
        ...

    @property
    def alignment(self) -> bool:
        """True when observers must also keep what `Observer.alignment` needs."""
        ...

    @property
    def batch_size(self) -> int | None:
        """The batch size of the model input of the step being recorded, when known.

        An observed module whose output has a batch of one while the step's is larger
        (position embeddings of ``position_ids`` [1, T]) is broadcast over the batch.
        """
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
    # Whether the observer can hand its parameters' uses to a UseBook (tied parameters,
    # modules called more than once). Observers that cannot refuse such models up front.
    supports_reuse = False

    def __init__(self, name: str, module: nn.Module, session: Session) -> None:
        self.name = name
        self.module = module
        self.session = session
        self.params = dict(_owned_parameters(module))
        # Set by the registry once every observer exists (see registry.share_parameters):
        # the book of multi-use parameters, this layer's shared parameters (in params), the
        # shared parameters it uses but another layer owns, observers with nothing of their
        # own that ride along with this one, and where the batch runs in its tensors.
        self.book: UseBook | None = None
        self.shared: dict[str, nn.Parameter] = {}
        self.borrowed: dict[str, nn.Parameter] = {}
        self.partners: list[Observer] = []
        self.batch_dim = 0
        self._handles: list[RemovableHandle] = []
        self._result = StepResult()
        self._calls = 0
        self._booked: set[str] = set()  # own parameters whose norms come from the book
        self._book_done = False
        self._checked = False  # the first recorded step's check that every use was seen
        self._hidden: str | None = None  # its refusal, repeated every step once found
        self._low_precision = False  # this step saw bfloat16/float16 tensors (autocast)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.params.values())

    def attach(self) -> None:
        """Register every hook this observer needs."""
        for pname, param in self.params.items():
            self._handles.append(param.register_hook(self._batch_grad_hook(pname)))
        self._attach()
        for partner in self.partners:
            partner.attach()

    def detach(self) -> None:
        """Remove every hook and undo anything `attach` changed."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._detach()
        for partner in self.partners:
            partner.detach()

    def begin_step(self) -> None:
        """Forget the previous step. Called by the recorder after each `backward`."""
        if self._calls:
            self._checked = True
        self._low_precision = False
        self._result = StepResult()
        self._calls = 0
        self._booked = set()
        self._book_done = False
        self._clear()
        if self.book is not None:
            self.book.clear()
        for partner in self.partners:
            partner.begin_step()

    def result(self) -> StepResult:
        """The norms of the last backward (or the error that prevented them)."""
        self._finish()
        self._finish_book()
        return self._result

    def collect(self) -> None:
        """Hand the book any uses that are only known at the end of backward."""

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
        if self.book is not None:
            self.book.recording = True
        if self._calls > 1 and not self.supports_reuse:
            msg = (
                f"layer {self.name!r} ran {self._calls} times in one recorded step; "
                f"{type(self).__name__} records modules that run once per step: wrap "
                "repeated calls in distinct modules, or exclude it"
            )
            self._store_error(RuntimeError(msg))
            return False
        return True

    def _store_norms(self, norms: dict[str, Tensor]) -> None:
        total = None
        for name, value in norms.items():
            if name in self.params and name not in self._booked:
                total = value if total is None else total + value
        self._result.grad_sq = total

    # -- parameters with several uses -------------------------------------------------------

    def _checking(self) -> bool:
        """True on this layer's first recorded step: every use goes to the book's check."""
        return self.supports_reuse and not self._checked and self.book is not None

    def _book_names(self) -> tuple[list[str], frozenset[str]]:
        """(parameter names whose uses go to the book, those needing only a batch sum).

        Shared and borrowed parameters always go through the book; all of them do when the
        module ran more than once; on the first step the rest go too, for the check alone.
        """
        if self.book is None:
            return [], frozenset()
        every = [*self.params, *self.borrowed]
        if self._calls > 1:
            self._booked.update(self.params)
            return every, frozenset()
        self._booked.update(self.shared)
        full = [*self.shared, *self.borrowed]
        if not self._checking():
            return full, frozenset()
        return every, frozenset(n for n in self.params if n not in self.shared)

    def _book_alignment(self, batch_grad: dict[str, Tensor]) -> Tensor | None:
        """Σ over this layer's booked parameters of ⟨Σ_uses g_i, G⟩, or None if none."""
        total = None
        for name in self._booked:
            if name not in batch_grad or self.book is None:
                continue
            value = self.book.inner(self.params[name], batch_grad[name])
            if value is not None:
                total = value if total is None else total + value
        return total

    def _unbooked(self, batch_grad: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: v for k, v in batch_grad.items() if k not in self._booked}

    def _parameter(self, name: str) -> nn.Parameter:
        return self.params[name] if name in self.params else self.borrowed[name]

    def _finish_book(self) -> None:
        """Add the book's norms of this layer's multi-use parameters; check on step one."""
        if self.book is None or self._book_done or self._result.error is not None:
            return
        self._book_done = True
        try:
            total = self._result.grad_sq
            for name in self._booked:
                value = self.book.sq(self.params[name])
                if value is not None:
                    total = value if total is None else total + value
            self._result.grad_sq = total
            if not self._calls:
                self._check_uses()
            elif self._checking():
                if self._low_precision:
                    # An autocast step's batch gradient is summed from bfloat16/float16
                    # products: it matches the uses' float32 sum only to a few percent, too
                    # loosely to tell a hidden use from rounding. Say so rather than guess.
                    warnings.warn(_DEFERRED_CHECK, stacklevel=2)
                else:
                    self._check_uses()
            if self._hidden is not None:
                self._store_error(RuntimeError(self._hidden))
        except Exception as error:  # noqa: BLE001 - handed to the recorder
            self._store_error(error)

    def _check_uses(self) -> None:
        from samplescope.recorder.layers.shared import hidden_use_message

        grads = self._result.batch_grad
        layer_norm = math.sqrt(sum(float(g.double().square().sum()) for g in grads.values()))
        for name, param in self.params.items():
            actual = grads.get(name)
            if actual is None:
                continue
            observed = self.book.batch_sum(param)
            message = hidden_use_message(self.book.names[id(param)], observed, actual, layer_norm)
            if message is not None:
                # Sticky: with on_error="warn" later steps must not record the same wrong sum.
                self._hidden = message
                return

    def _store_error(self, error: BaseException) -> None:
        if self._result.error is None:
            self._result.error = error

    def _batch_grad_hook(self, pname: str) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            # Backward runs with grad mode off, so ask whether the forward was recorded. Kept
            # even when this module did not run in a recorded step: a gradient that arrives
            # anyway comes from a use no hook saw, which the book's check refuses.
            if self._calls or (self.book is not None and self.book.recording):
                # The first step's check needs this rank's own gradient: under DDP the
                # tensor may become .grad and be averaged across ranks in place.
                own = grad.detach()
                self._result.batch_grad[pname] = own.clone() if self._checking() else own

        return hook


_MISSING = object()
_LOW_PRECISION = (torch.bfloat16, torch.float16)


class ReexpressedObserver(Observer):
    """For modules whose forward is replaced, while recording, by an equivalent one whose
    pieces hooks can see (attention, recurrent layers). Subclasses define `_forward` and
    call `_original` for forwards they leave to PyTorch."""

    method = "reexpressed"

    def __init__(self, name: str, module: nn.Module, session: Session) -> None:
        super().__init__(name, module, session)
        self._previous_forward: Any = _MISSING

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def _attach(self) -> None:
        self._previous_forward = self.module.__dict__.get("forward", _MISSING)
        # An instance attribute shadows the class's forward in nn.Module.__call__, so module
        # hooks (the recorder's included) still run around it.
        self.module.forward = self._forward

    def _detach(self) -> None:
        if self._previous_forward is _MISSING:
            self.module.__dict__.pop("forward", None)
        else:
            self.module.forward = self._previous_forward
        self._previous_forward = _MISSING

    def _original(self, *args: Any, **kwargs: Any) -> Any:
        if self._previous_forward is not _MISSING:
            return self._previous_forward(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)


class HookObserver(Observer):
    """For modules with one tensor input and one tensor output and a closed-form NormFn."""

    supports_reuse = True

    def __init__(self, name: str, module: nn.Module, session: Session, norm_fn: NormFn) -> None:
        super().__init__(name, module, session)
        self.norm_fn = norm_fn
        self._saved: tuple[Tensor, Tensor] | None = None

    def _attach(self) -> None:
        self._handles.append(self.module.register_forward_hook(self._on_forward))

    def _clear(self) -> None:
        self._saved = None

    def _on_forward(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        if not self._recording() or not isinstance(output, Tensor):
            return None
        if not output.requires_grad or not self._count_call():
            return None
        activation = args[0].detach()
        output, activation, replaced = broadcast_over_batch(
            output, activation, self.session, self.batch_dim
        )
        # The hook lives as long as the graph; holding the activation in a list it empties
        # lets autograd free the tensor as soon as this layer's backward is done.
        held = [activation]
        node = output.grad_fn
        if node is None:  # an output that is a leaf: only a tensor hook sees its gradient
            output.register_hook(lambda grad: self._on_grad(held.pop(), grad) if held else None)
            return output if replaced else None
        # A pre-hook on the node that made the output sees the same gradient as a tensor
        # hook (tensor hooks are pre-hooks of that node), at half the dispatch cost.
        index = output.output_nr

        def on_grads(grads: tuple[Tensor | None, ...]) -> None:
            grad = grads[index]
            if held and grad is not None:
                self._on_grad(held.pop(), grad)

        node.register_prehook(on_grads)
        return output if replaced else None

    def _on_grad(self, activation: Tensor, grad: Tensor) -> None:
        try:
            # Backward usually runs with grad mode and autocast off: then no context (whose
            # entering costs more than a small layer's norms) is needed.
            device = grad.device.type
            if torch.is_grad_enabled() or _autocast_enabled(device):
                with norm_region(device):
                    self._grad_norms(activation, grad)
            else:
                self._grad_norms(activation, grad)
        except Exception as error:  # noqa: BLE001 - handed to the recorder after backward
            self._store_error(error)

    def _grad_norms(self, activation: Tensor, grad: Tensor) -> None:
        if activation.dtype in _LOW_PRECISION or grad.dtype in _LOW_PRECISION:
            self._low_precision = True
        check_batch_dim(self.name, grad, self.batch_dim, self.session)
        if self.batch_dim:
            activation = activation.movedim(self.batch_dim, 0)
            grad = grad.movedim(self.batch_dim, 0)
        names, batch_only = self._book_names()
        if self._calls == 1:
            self._own_norms(activation, grad)
        if names:
            from samplescope.recorder.layers.uses import module_uses

            uses = module_uses(self.module, activation, grad.detach(), names, batch_only=batch_only)
            for pname, use in uses.items():
                self.book.add(self._parameter(pname), use)
        if self.session.alignment:
            self._saved = (activation, grad.detach())

    def _own_norms(self, activation: Tensor, grad: Tensor) -> None:
        """This step's norms of the parameters that are not booked, from the NormFn."""
        self._store_norms(self.norm_fn(self.module, activation, grad))

    def alignment(self, batch_grad: dict[str, Tensor]) -> Tensor:
        if self._saved is None:
            msg = f"layer {self.name!r}: no saved forward for alignment"
            raise RuntimeError(msg)
        activation, grad = self._saved
        booked = self._book_alignment(batch_grad)
        if self._calls > 1:
            # Every parameter's uses are in the book; the saved call is only the last one.
            return booked if booked is not None else grad.new_zeros(grad.shape[0])
        own = directional_alignment(
            self.module, self.params, self._unbooked(batch_grad), (activation,), grad
        )
        return own if booked is None else own + booked


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
    # Under FSDP2 the parameters are shards again after backward: replay with whole ones.
    primals = {n: full_value(p) for n, p in params.items()}
    tangents = {n: batch_grad.get(n, torch.zeros_like(p)) for n, p in primals.items()}

    def run(p: dict[str, Tensor]) -> Tensor:
        # Cloned inside the transform: jvp refuses in-place updates of captured tensors.
        buffers = {n: b.clone() for n, b in module.named_buffers()}
        out = functional_call(module, {**p, **buffers}, args)
        return out[0] if isinstance(out, tuple) else out

    with torch.no_grad(), replaying():
        _, moved = torch.func.jvp(run, (primals,), (tangents,))
    return (grad_output * moved).flatten(1).sum(1)


class BatchLayoutError(ValueError):
    """A layer's tensors do not have the step's batch where the recorder expects it."""


def check_batch_dim(name: str, grad: Tensor, batch_dim: int, session: Session) -> None:
    """Refuse, naming the layer and the option, when ``batch_dim`` is not the batch.

    The batch is the size of the model input's batch dimension; a layer whose tensor has
    another size there (a sequence-first module samplescope does not know) cannot be
    recorded by guessing which other dimension might be the batch.
    """
    n = getattr(session, "batch_size", None)
    if n is None or (grad.dim() > batch_dim and grad.shape[batch_dim] == n):
        return
    candidates = [d for d, size in enumerate(grad.shape) if size == n and d != batch_dim]
    hint = candidates[0] if candidates else 1
    msg = (
        f"layer {name!r} has tensors of shape {tuple(grad.shape)} whose dimension {batch_dim} "
        f"is not the batch of {n}; if its batch runs along another dimension, pass "
        f"Recorder(..., batch_dims={{{name!r}: {hint}}}) (batch_dims={{'': d}} for the "
        "model input)"
    )
    raise BatchLayoutError(msg)


def broadcast_over_batch(
    output: Tensor, activation: Tensor, session: Session, batch_dim: int = 0
) -> tuple[Tensor, Tensor, bool]:
    """(output, activation, replaced): a batch-of-one call expanded to the step's batch.

    A module evaluated once for the whole batch (position embeddings of ``position_ids``
    [1, T]) gets back only the sum of the samples' output gradients, which has no
    per-sample norms. Expanding its output to the batch before anything uses it changes
    no value downstream (the broadcast would have expanded it anyway) and makes each
    sample's output gradient visible; the expand's backward sums them as the broadcast's
    did, so the parameter gradients are the same.
    """
    n = getattr(session, "batch_size", None)
    if n is None or n <= 1 or output.dim() <= batch_dim or output.shape[batch_dim] != 1:
        return output, activation, False
    shape = list(output.shape)
    shape[batch_dim] = n
    output = output.expand(shape)
    if activation.dim() > batch_dim and activation.shape[batch_dim] == 1:
        a_shape = list(activation.shape)
        a_shape[batch_dim] = n
        activation = activation.expand(a_shape)
    return output, activation, True


def _owned_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
