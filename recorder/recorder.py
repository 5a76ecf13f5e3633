"""The Recorder: a context manager that a training loop calls instead of loss.backward()."""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from samplescope.errors import SamplescopeError
from samplescope.recorder._columns import (
    StepFrame,
    StepRows,
    as_ids,
    check_choice,
    check_result,
    check_targets,
    checkpoint_rows,
    derive_outputs,
    jsonable,
    sample_info_arrays,
    stack_grad_sq,
)
from samplescope.recorder._reference import ReferenceBatch, ReferenceLoss
from samplescope.recorder._thumbnails import thumbnail_images, thumbnail_shape
from samplescope.recorder._transfer import DeferredRows, HostTransfer, NonfiniteCounter
from samplescope.recorder.accumulation import (
    AccumulatedStep,
    check_accumulation_steps,
    check_loss_scale,
    grad_norms,
)
from samplescope.recorder.distributed import BatchGradient, batch_gradient
from samplescope.recorder.errors import RecorderError
from samplescope.recorder.layers import LayerRegistry, Observer, OnUnsupported, default_registry
from samplescope.recorder.layers.base import is_replaying
from samplescope.recorder.layers.registry import known_batch_dims
from samplescope.recorder.sample_names import SampleNames, is_names, map_info_ids
from samplescope.recorder.writer import TraceWriteError, TraceWriter

__all__ = ["ROOT_LAYER", "OnError", "Recorder", "RecorderError"]


# The layer name of parameters the model itself owns (a ViT's cls_token, pos_embed):
# `named_modules()` calls the root "", which reads as nothing in a table or an error.
ROOT_LAYER = "<root>"

OnError = Literal["raise", "warn"]
Reduction = Literal["mean", "sum"]


class Recorder:
    """Records, for every sample at every step, its gradient's squared norm per layer.

    Use it as a context manager around the training loop and call `backward` instead of
    ``loss.backward()``; it back-propagates ``mean(losses)`` (or the sum), exactly as the
    loop would without it, and writes one row per sample to an HDF5 trace.

    Args:
        path: the trace file to create (see docs/trace-format.md).
        model: the model being trained; its layers with trainable parameters are recorded.
        optimizer: read for the learning rate of each step and stored hyper-parameters.
        config: anything JSON-serialisable to keep with the trace (e.g. the run's settings).
        reduction: ``"mean"`` or ``"sum"`` of the per-sample losses, as your loop would use.
        alignment: also record each sample's inner product with the layer's batch gradient.
        input_grad: also record the squared norm of each sample's loss gradient w.r.t. its
            model input (the model's first positional argument, when floating point).
        thumbnails: also store a small copy of each image-like input, once per sample.
        sample_info: per-sample columns known before training, e.g. ``{"sample_id": ids,
            "flipped": mask}``; stored under ``/sample_info``.
        on_error: ``"raise"`` stops training on a recorder failure; ``"warn"`` warns,
            counts it in the trace and goes on training (the step's rows are left out).
        on_unsupported: for layers with no closed-form rule: ``"fallback"`` (torch.func),
            ``"warn"`` (leave them out) or ``"error"``.
        registry: the layer rules to use; `default_registry()` when None.
        batch_dims: where the batch runs in a module's tensors, by module name (e.g.
            ``{"encoder.proj": 1}`` for a module fed [T, N, D]), where samplescope cannot
            know it; ``nn.Transformer*`` and ``nn.MultiheadAttention`` layouts are read
            from their ``batch_first``. ``""`` names the model's own input.
        flush_seconds: the longest time recorded rows wait before reaching the file.
        overwrite: replace an existing trace instead of refusing (never one that another
            live process is writing: that is refused, see docs/recorder.md).
        outputs: whether `/visits` has the output columns (target, pred, p_target, margin).
            ``True``: every recorded step must pass ``logits`` and ``targets``; ``False``:
            none may; ``None`` (default): steps may do either, and a step without them gets
            the missing values (target and pred -1, p_target and margin NaN); at close the
            columns are left out if no step filled them.
        rank, world_size, run_id: for data parallelism: one trace per rank, same run_id.
        checkpoints: declare the optional ``/checkpoints`` table, filled by
            `score_checkpoint` (EL2N and GraNd of every sample at a fixed checkpoint).
        accumulation_steps: gradient accumulation: each `backward` call is one of K
            micro-batches of an optimizer step and back-propagates ``reduce(losses) / K``;
            the trace holds one step per optimizer step, with unscaled losses and norms
            (docs/recorder.md, Gradient accumulation). Not with ``alignment=True``.
        reference: a fixed held-out batch ``(x_val, y_val)``: every ``reference_every``
            recorded steps, `backward` also computes its mean loss's gradient g_val (eval
            mode, at the step's parameters) and records ⟨g(i,l), g_val(l)⟩ per visit and
            layer in ``/visits/val_dot`` (NaN on the other steps); see docs/recorder.md.
        reference_loss: ``fn(model, x, y) -> losses [N]`` (or ``(losses, logits)``), as
            `score_checkpoint` takes; required with ``reference``.
        reference_every: measure g_val on every k-th recorded step (step % k == 0).

    Works on any torch device without reading tensor values on the training thread (see
    docs/recorder.md, Devices). A layer that gets no gradient in a step records 0 for it.
    Parameters owned by the model itself form a layer named ``"<root>"`` (`ROOT_LAYER`).

    Raises:
        RecorderError: on entering the block, for a ``torch.compile``'d model (or one with
            a compiled submodule): pass and call the uncompiled module instead.
    """

    _optimizer_hook: Any = None  # with accumulation: ends a short step at optimizer.step()
    # Per-session flags; immutable defaults, set on the instance once they change.
    _warned_inactive = False
    _warned_nonfinite = False
    _started = False
    _entered = False

    def __init__(
        self,
        path: str | Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        config: Mapping[str, Any] | None = None,
        reduction: Reduction = "mean",
        alignment: bool = False,
        input_grad: bool = False,
        thumbnails: bool = False,
        sample_info: Mapping[str, Any] | None = None,
        on_error: OnError = "raise",
        on_unsupported: OnUnsupported = "fallback",
        registry: LayerRegistry | None = None,
        batch_dims: Mapping[str, int] | None = None,
        flush_seconds: float = 2.0,
        overwrite: bool = False,
        outputs: bool | None = None,
        rank: int = 0,
        world_size: int = 1,
        run_id: str | None = None,
        checkpoints: bool = False,
        accumulation_steps: int = 1,
        reference: tuple[Any, Any] | None = None,
        reference_loss: ReferenceLoss | None = None,
        reference_every: int = 1,
    ) -> None:
        check_choice("reduction", reduction, ("mean", "sum"))
        check_choice("on_error", on_error, ("raise", "warn"))
        check_choice("on_unsupported", on_unsupported, ("error", "warn", "fallback"))
        if not isinstance(model, nn.Module):
            msg = f"model must be a torch.nn.Module, not {type(model).__name__}"
            raise RecorderError(msg)
        if not flush_seconds > 0:
            msg = f"flush_seconds must be positive, not {flush_seconds}"
            raise RecorderError(msg)
        if outputs not in (True, False, None):
            msg = f"outputs must be True, False or None, not {outputs!r}"
            raise RecorderError(msg)
        if not isinstance(checkpoints, bool):
            msg = f"checkpoints must be True or False, not {checkpoints!r}"
            raise RecorderError(msg)
        _check_config(config)
        # The micro-batches of the current optimizer step are collected in `_accumulated`.
        # String sample ids get integer ids and a /sample_names row (`_sample_names`).
        self.accumulation_steps, self._accumulated, self._sample_names, self._reference = (
            check_accumulation_steps(
                accumulation_steps, alignment=alignment, reference=reference is not None
            ),
            AccumulatedStep(),
            SampleNames(),
            ReferenceBatch.of(reference, reference_loss, reference_every),
        )
        self.path = Path(path)
        self.model = model
        self.optimizer = optimizer
        self.reduction = reduction
        self.on_error = on_error
        self.on_unsupported = on_unsupported
        self.outputs = outputs
        self.options = {
            "alignment": alignment,
            "input_grad": input_grad,
            "thumbnails": thumbnails,
            "flush_seconds": flush_seconds,
            "on_unsupported": on_unsupported,
            **({"accumulation_steps": accumulation_steps} if accumulation_steps > 1 else {}),
            **({} if self._reference is None else {"reference_every": self._reference.every}),
        }
        self._registry = registry or default_registry()
        self._batch_dims = {**known_batch_dims(model), **dict(batch_dims or {})}
        self._batch_size: int | None = None  # of the current step's model input
        self._ranks = (int(rank), int(world_size))  # checked against torch.distributed
        self._writer = TraceWriter(
            self.path,
            self._root_attrs(config, rank, world_size, run_id),
            sample_info=map_info_ids(sample_info_arrays(sample_info), self._sample_names),
            flush_seconds=flush_seconds,
            overwrite=overwrite,
            derive=derive_outputs,
            drop_unused_outputs=outputs is None,
        )
        self._observers: list[Observer] = []
        self._order: list[str] = []  # layer names in first-forward order
        self._order_handles: list[Any] = []
        self._root_handle: Any = None
        self._inputs: Tensor | None = None  # the model input of the current step
        self._input_grad: Tensor | None = None
        self._model_ran = False  # the model's own forward ran, recorded, in this step
        self._skipped: str | None = None  # why a forward of this step was not recorded
        self._nonfinite = NonfiniteCounter()
        self._thumbnailed: set[int] = set()
        self._thumb_shape: tuple[int, int] | None = None
        self.step = 0
        self.epoch = 0
        self.n_visits = 0
        self.checkpoints = checkpoints
        self.n_checkpoints = 0
        self._scoring = False  # inside score_checkpoint: eval-mode forwards are recorded

    @property
    def n_nonfinite(self) -> int:
        """Non-finite values recorded so far; counted as rows reach the file (exact after
        `flush` or the end of the block)."""
        return self._nonfinite.total

    # -- Session protocol (read by observers) ---------------------------------------------

    @property
    def active(self) -> bool:
        """True while forwards are recorded: inside the block, grad enabled, model training;
        or inside `score_checkpoint`, whose forwards run in eval mode and are recorded."""
        if not self._entered:
            return False
        return self._scoring or (self.model.training and torch.is_grad_enabled())

    @property
    def alignment(self) -> bool:
        # Observers keep what `Observer.alignment` needs also on reference steps: the
        # validation dot products reuse the same identities with g_val in place of G.
        return bool(self.options["alignment"]) or self._reference_due()

    def _reference_due(self) -> bool:
        return self._reference is not None and self._reference.due(self.step)

    @property
    def batch_size(self) -> int | None:
        return self._batch_size

    # -- context manager ------------------------------------------------------------------

    def __enter__(self) -> Recorder:
        _refuse_compiled(self.model)
        self._observers = self._registry.observers(
            self.model, self, self.on_unsupported, self._batch_dims
        )
        if not self._observers:
            msg = f"{type(self.model).__name__} has no layers with trainable parameters to record"
            raise RecorderError(msg)
        for observer in self._observers:
            if not observer.name:
                observer.name = ROOT_LAYER
        # How the batch gradient G is read: from the hooks, or reduced across ranks.
        self._batch_gradient: BatchGradient = batch_gradient(
            self.model,
            self._observers,
            *self._ranks,
            accumulation_steps=self.accumulation_steps,
            reference=self._reference is not None,
        )
        # The layout is fixed here, before any step: layers in registration order
        # (`model.named_modules()`), their forward order recorded at the first step.
        self._writer.open(self._layout())
        self._append_names()  # those of string ids in sample_info
        try:
            for observer in self._observers:
                observer.attach()
                self._order_handles.append(
                    observer.module.register_forward_pre_hook(self._order_hook(observer.name))
                )
            self._root_handle = self.model.register_forward_pre_hook(
                self._on_model_input, with_kwargs=True
            )
            if self.accumulation_steps > 1 and self.optimizer is not None:
                # An optimizer step after fewer than K micro-batches (an epoch's last,
                # short group) ends the step there.
                self._optimizer_hook = _inner_optimizer(self.optimizer).register_step_post_hook(
                    lambda *_: self._end_accumulated_step()
                )
        except BaseException:
            self._detach()
            self._writer.close()
            raise
        self._entered = True
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        interrupted = False
        while True:
            # A Ctrl-C during the close must not leave the writer thread running (the
            # interpreter would exit under it): close with SIGINT deferred, and start over
            # if one arrived before the deferral took effect (every step is idempotent).
            # Everything is inside the `try`: a second Ctrl-C right behind the first one
            # lands on the first statements of this method.
            try:
                self._entered = False
                with _deferred_sigint(self._writer.abort) as deferred:
                    error = self._close()
                break
            except KeyboardInterrupt:
                interrupted = True
        if interrupted or deferred:
            raise KeyboardInterrupt
        if error is not None:
            # Never mask the training loop's own exception with ours.
            if exc_type is not None or self.on_error == "warn":
                warnings.warn(f"samplescope: {error}", stacklevel=2)
            else:
                raise error

    def _close(self) -> TraceWriteError | None:
        self._detach()
        self._end_accumulated_step()
        try:
            self._writer.close()
        except TraceWriteError as error:
            return error
        finally:
            self._warn_nonfinite(stacklevel=4)
        return None

    def _detach(self) -> None:
        for observer in self._observers:
            observer.detach()
        for handle in self._order_handles:
            handle.remove()
        self._order_handles.clear()
        if self._root_handle is not None:
            self._root_handle.remove()
            self._root_handle = None
        if self._optimizer_hook is not None:
            self._optimizer_hook.remove()
            self._optimizer_hook = None

    # -- the training loop's calls --------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Label the following steps with ``epoch``; a new epoch ends a step still
        accumulating (`accumulation_steps`)."""
        if int(epoch) != self.epoch:
            self._end_accumulated_step()
        self.epoch = int(epoch)

    def backward(
        self,
        losses: Tensor,
        sample_ids: Tensor | Sequence[int] | Sequence[str] | np.ndarray,
        logits: Tensor | None = None,
        targets: Tensor | None = None,
        *,
        loss_scale: float | None = None,
        **backward_kwargs: Any,
    ) -> Tensor:
        """Back-propagate the reduced per-sample losses and record this step.

        Args:
            losses: per-sample losses, shape [N] (``reduction="none"``).
            sample_ids: one id per sample, unique within the batch: non-negative integers,
                or strings (e.g. a Hugging Face dataset's key column), stored as integer
                ids with a ``/sample_names`` table (docs/recorder.md, String sample ids).
            logits: the model's class scores [N, C]; with ``targets`` it adds the target,
                prediction, probability of the target and margin to each row.
            targets: class indices [N].
            loss_scale: the factor ``losses`` were already multiplied by (e.g. your loop's
                own ``1 / K``): ``reduce(losses)`` is back-propagated as given (no further
                ``1 / accumulation_steps``) and the trace stores ``losses / loss_scale`` and
                norms in the same unscaled units.
            **backward_kwargs: passed to ``Tensor.backward`` (e.g. ``retain_graph``).

        Returns:
            The reduced loss that was back-propagated (detached).

        Raises:
            RecorderError: bad arguments (always, before anything is back-propagated), or
                a recording failure with ``on_error="raise"`` (after backward, so the
                gradients are complete).
        """
        if not self._entered:
            msg = "Recorder.backward called outside the `with Recorder(...)` block"
            raise RecorderError(msg)
        ids, target_ids = self._check_batch(losses, sample_ids, logits, targets)
        self._append_names()
        k = self.accumulation_steps
        user_scale = check_loss_scale(loss_scale, k)
        self._warn_nonfinite(stacklevel=3)
        with torch.enable_grad():  # as `loss.backward()` would, even under no_grad
            loss = losses.mean() if self.reduction == "mean" else losses.sum()
            if k > 1 and user_scale is None:
                loss = loss / k  # the accumulation loop's own `loss / K`, bit for bit
        # The weight of each sample's loss in `loss` beyond the reduction's own.
        factor = user_scale if user_scale is not None else 1.0 / k
        # Whether this step is recorded is decided by how its forward ran, not by the grad
        # mode around this call: backward itself needs no grad mode.
        skipped = None if self.model.training else "eval"
        if skipped is None and not self._model_ran:
            skipped = self._skipped
        recording = losses.requires_grad and skipped is None
        try:
            if recording:
                self._batch_gradient.before_backward()
            loss.backward(**backward_kwargs)
            if recording:
                # The trace keeps unscaled losses (within rounding when the user scaled).
                own = losses if user_scale is None else losses.detach() / user_scale
                self._record(own, ids, logits, target_ids, factor)
            elif losses.requires_grad:
                self._warn_inactive(skipped)
        finally:
            if k > 1:
                self._accumulated.calls += 1
                if self._accumulated.calls >= k:
                    self._end_accumulated_step()
            for observer in self._observers:
                observer.begin_step()
            self._inputs = self._input_grad = None
            self._model_ran, self._skipped = False, None
            self._batch_size = None
        return loss.detach()

    def score_checkpoint(
        self,
        batches: Iterable[tuple[Any, Any, Any]],
        loss_fn: Callable[[nn.Module, Any, Any], tuple[Tensor, Tensor | None]],
    ) -> int:
        """Score every sample at the current parameters, as Data Diet does (EL2N, GraNd).

        Runs the model in eval mode over ``batches`` and writes, per sample, its loss, its
        per-layer ``grad_sq`` (measured by the same observers as training steps) and, where
        ``loss_fn`` returns logits, the output columns and EL2N, to ``/checkpoints``. It is
        not a training step: no ``/steps`` or ``/visits`` row, `step` unchanged, every
        parameter's ``.grad`` restored as it was (the same tensor objects), every module's
        training mode restored, and the optimizer untouched; training after it is bit for
        bit what it would have been without it.

        Args:
            batches: an iterable of ``(x, y, sample_ids)``, e.g. a DataLoader over the
                training set (without shuffling or augmentation, as Data Diet scores).
            loss_fn: ``loss_fn(model, x, y) -> (losses, logits)``: per-sample losses [N]
                and class scores [N, C] (or None); ``y`` then holds class indices [N].

        Returns:
            The checkpoint's index (0 for the first call).

        Raises:
            RecorderError: called outside the block, without ``checkpoints=True``, between a
                training forward and its backward, with bad batches or losses, or a layer
                failed (with ``on_error="warn"`` that warns instead and writes nothing).
        """
        if not self._entered:
            msg = "Recorder.score_checkpoint called outside the `with Recorder(...)` block"
            raise RecorderError(msg)
        if not self.checkpoints:
            msg = "score_checkpoint needs Recorder(..., checkpoints=True) (a /checkpoints table)"
            raise RecorderError(msg)
        if self._scoring:
            msg = "score_checkpoint called from inside score_checkpoint"
            raise RecorderError(msg)
        if self._model_ran:
            msg = (
                "score_checkpoint called between a training forward and its backward: "
                "call it after Recorder.backward (and the optimizer step)"
            )
            raise RecorderError(msg)
        index = self.n_checkpoints
        params = [p for p in self.model.parameters() if p.requires_grad]
        saved = [p.grad for p in params]
        modes = [(m, m.training) for m in self.model.modules()]
        parts: list[StepRows] = []
        self._scoring = True
        try:
            self.model.eval()
            for batch in batches:
                parts.append(self._score_batch(batch, loss_fn, params))
        except SamplescopeError as error:
            if self.on_error == "raise" or isinstance(error, _ScoringInputError):
                raise
            self._writer.count_error()
            warnings.warn(f"samplescope: checkpoint {index} not recorded: {error}", stacklevel=2)
            return index
        finally:
            self._scoring = False
            for p, grad in zip(params, saved, strict=True):
                p.grad = grad
            for module, training in modes:
                module.training = training
            for observer in self._observers:
                observer.begin_step()
            self._inputs = self._input_grad = None
            self._model_ran, self._skipped = False, None
            self._batch_size = None
        if not parts:
            msg = "score_checkpoint got no batches"
            raise RecorderError(msg)
        # One pending item for the whole checkpoint: it reaches the file in one flush, so a
        # reader never sees part of a checkpoint.
        step, epoch = self.step, self.epoch  # now, not when the writer thread reads them
        self._writer.append(
            "checkpoints", DeferredRows(lambda: checkpoint_rows(parts, index, step, epoch))
        )
        self.n_checkpoints += 1
        return index

    def _score_batch(
        self,
        batch: tuple[Any, Any, Any],
        loss_fn: Callable[[nn.Module, Any, Any], tuple[Tensor, Tensor | None]],
        params: list[nn.Parameter],
    ) -> StepRows:
        try:
            x, y, sample_ids = batch
        except (TypeError, ValueError):
            msg = "score_checkpoint batches must be (x, y, sample_ids) tuples"
            raise _ScoringInputError(msg) from None
        try:
            ids = self._as_ids(sample_ids)
            self._append_names()
        except RecorderError as error:
            raise _ScoringInputError(str(error)) from None
        for p in params:
            p.grad = None
        try:
            with torch.enable_grad():
                out = loss_fn(self.model, x, y)
                losses, logits = out if isinstance(out, tuple) else (out, None)
                try:
                    _, targets = self._check_batch(
                        losses, ids, logits, y if logits is not None else None, checkpoint=True
                    )
                except RecorderError as error:
                    raise _ScoringInputError(str(error)) from None
                if not losses.requires_grad:
                    msg = "score_checkpoint: the losses from loss_fn do not require grad"
                    raise _ScoringInputError(msg)
                # Summed, so every sample's back-propagated term is its own gradient (scale 1).
                losses.sum().backward()
            n = losses.shape[0]
            tensors, layer_sizes = self._layer_tensors(n, losses.device, batch_stats=False)
            with torch.no_grad():
                tensors["loss"] = losses.detach().to(torch.float32, copy=True)
                if logits is not None and targets is not None:
                    tensors["_logits"] = logits.detach().to(torch.float32, copy=True)
                    tensors["target"] = targets
        finally:
            for observer in self._observers:
                observer.begin_step()
            self._inputs = self._input_grad = None
            self._model_ran, self._skipped = False, None
            self._batch_size = None
        frame = StepFrame(
            step=self.step,
            epoch=self.epoch,
            sample_id=ids,
            scale=1.0,
            lr=math.nan,
            time=time.time(),
            layer_sizes=layer_sizes,
            input_sq=False,
            input_grad_sq=None,
            missing_outputs=logits is None,
        )
        return StepRows(HostTransfer(tensors), frame, NonfiniteCounter())

    def log_eval(
        self, split: str, *, loss: float | None = None, accuracy: float | None = None
    ) -> None:
        """Record an evaluation (e.g. test loss and accuracy after an epoch)."""
        self._writer.append(
            "evals",
            {
                "step": np.array([self.step], dtype=np.int64),
                "epoch": np.array([self.epoch], dtype=np.int64),
                "split": np.array([str(split)], dtype=object),
                "loss": np.array([math.nan if loss is None else float(loss)]),
                "accuracy": np.array([math.nan if accuracy is None else float(accuracy)]),
            },
        )

    def flush(self) -> None:
        """Block until every recorded step is in the file (with `accumulation_steps`, every
        optimizer step that is over: a step still accumulating is written when it ends)."""
        try:
            self._writer.flush()
        except TraceWriteError as error:
            self._fail(error, lost_step=False)
        self._warn_nonfinite(stacklevel=3)

    # -- one step -------------------------------------------------------------------------

    def _check_batch(
        self,
        losses: Tensor,
        sample_ids: Tensor | Sequence[int] | np.ndarray,
        logits: Tensor | None,
        targets: Tensor | None,
        *,
        checkpoint: bool = False,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        # A checkpoint's rows always have the output columns (`outputs` is about /visits).
        outputs = None if checkpoint else self.outputs
        if not isinstance(losses, Tensor) or losses.dim() != 1:
            shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
            msg = (
                f"losses must be a 1-D tensor of per-sample losses (reduction='none'), got {shape}"
            )
            raise RecorderError(msg)
        n = losses.shape[0]
        if n == 0:
            msg = "empty batch: losses has no samples; skip the step instead of recording it"
            raise RecorderError(msg)
        ids = as_ids(sample_ids) if checkpoint else self._as_ids(sample_ids)
        if ids.shape != (n,):
            msg = f"got {ids.size} sample ids for {n} losses; pass one id per sample"
            raise RecorderError(msg)
        unique, counts = np.unique(ids, return_counts=True)
        if unique.size != n:
            twice = unique[counts > 1][0]
            name = self._sample_names.name(twice)
            msg = (
                f"sample id {twice if name is None else repr(name)} appears more than once "
                "in one batch; "
                "ids must be unique per batch"
            )
            raise RecorderError(msg)
        if (logits is None) != (targets is None):
            msg = "pass logits and targets together (or neither)"
            raise RecorderError(msg)
        if logits is None or targets is None:
            if outputs:
                msg = "this Recorder has outputs=True: pass logits and targets at every step"
                raise RecorderError(msg)
            return ids, None
        if outputs is False:
            msg = "this Recorder has outputs=False: drop logits/targets or pass outputs=None"
            raise RecorderError(msg)
        if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != n:
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            msg = f"logits must have shape [{n}, classes], got {shape}"
            raise RecorderError(msg)
        if (
            not isinstance(targets, Tensor)
            or targets.shape != (n,)
            or targets.is_floating_point()
            or targets.dtype == torch.bool
        ):
            shape = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
            dtype = targets.dtype if isinstance(targets, Tensor) else ""
            msg = f"targets must be {n} integer class indices, got {shape} {dtype}"
            raise RecorderError(msg)
        return ids, check_targets(targets, logits.shape[1])

    def _record(
        self,
        losses: Tensor,
        ids: np.ndarray,
        logits: Tensor | None,
        targets: np.ndarray | None,
        factor: float = 1.0,
    ) -> None:
        # Nothing here reads a tensor's values on the host: on an accelerator that would
        # wait for the device once per step. The step's tensors are copied asynchronously
        # and the writer thread turns them into rows (`StepRows`), counting non-finite ones.
        n = losses.shape[0]
        scale = (1.0 / n if self.reduction == "mean" else 1.0) * factor
        try:
            # An earlier flush failed: its steps are lost (and listed); this one is not.
            self._writer.raise_error()
        except TraceWriteError as error:
            self._fail(error, lost_step=False)
        try:
            if not self._started:
                self._first_step()
            tensors, layer_sizes = self._layer_tensors(n, losses.device)
            if self.accumulation_steps > 1:  # the gradient accumulated so far (.grad)
                tensors["param_norms"], layer_sizes = grad_norms(o.params for o in self._observers)
        except SamplescopeError as error:
            self._accumulated.failed = self.accumulation_steps > 1
            self._fail(error)
            return
        with torch.no_grad():
            tensors["loss"] = losses.detach().to(torch.float32, copy=True)
            input_sq = self._input_sq(n)
            if input_sq is not None:
                tensors["input_sq"] = input_sq
            input_grad_sq = self._input_grad_sq(n) if self.options["input_grad"] else None
            if input_grad_sq is not None:
                tensors["input_grad_sq"] = input_grad_sq
            if logits is not None and targets is not None:
                tensors["_logits"] = logits.detach().to(torch.float32, copy=True)
                tensors["target"] = targets
            lr = self._lr()
            if isinstance(lr, Tensor):
                tensors["lr"] = lr
            if self.options["thumbnails"]:
                self._thumbnails(ids)
        frame = StepFrame(
            step=self.step,
            epoch=self.epoch,
            sample_id=ids,
            scale=scale,
            lr=math.nan if isinstance(lr, Tensor) else lr,
            time=time.time(),
            layer_sizes=layer_sizes,
            input_sq=input_sq is not None,
            input_grad_sq=(input_grad_sq is not None) if self.options["input_grad"] else None,
            missing_outputs=logits is None and self.outputs is None,
            reference=self._reference is not None,
        )
        transfer = HostTransfer(tensors)
        rows = StepRows(transfer, frame, self._nonfinite)
        self.n_visits += n
        if self.accumulation_steps > 1:  # written when the optimizer step is over
            self._accumulated.add(rows, frame)
            return
        # The writer assigns /steps/visit_start from the rows it actually writes; it makes
        # this wait when the queued steps hold too much memory (backpressure).
        self._writer.append_step(
            DeferredRows(rows.steps), DeferredRows(rows.visits), nbytes=transfer.nbytes
        )
        self.step += 1

    def _end_accumulated_step(self) -> None:
        """Write the micro-batches accumulated so far as one optimizer step."""
        done, self._accumulated = self._accumulated, AccumulatedStep()
        if done.failed:  # warned about (on_error="warn"): no partial step is written
            self.n_visits -= sum(frame.sample_id.size for _, frame in done.parts)
            return
        if done.parts:
            self._writer.append_step(DeferredRows(done.steps), DeferredRows(done.visits))
            self.step += 1

    def _layer_tensors(
        self, n: int, device: torch.device, *, batch_stats: bool = True
    ) -> tuple[dict[str, Tensor], tuple[int, ...]]:
        results = [observer.result() for observer in self._observers]
        ran = [check_result(o.name, r, n) for o, r in zip(self._observers, results, strict=True)]
        if not any(ran) and not self._model_ran:
            msg = (
                f"no forward of {type(self.model).__name__} was recorded before this backward: "
                "call the model itself inside the `with` block (a torch.compile'd wrapper "
                "of it bypasses samplescope's hooks: call the uncompiled model)"
            )
            raise RecorderError(msg)
        # A layer that got no gradient in this step (an auxiliary head left out of the
        # loss, a branch not taken) records 0: its gradient is zero for every sample.
        grad_sq = stack_grad_sq(
            [r.grad_sq if has else None for r, has in zip(results, ran, strict=True)], n, device
        )
        where = grad_sq.device
        if not batch_stats:  # a checkpoint: per-sample norms only (no /steps row)
            return {"grad_sq": grad_sq, "param_norms": torch.zeros(0)}, (0,) * len(results)
        # The batch gradient G as the optimizer gets it: reduced across ranks (DDP, FSDP2).
        reduced = self._batch_gradient.gradients(results)
        batch_grads = [list(g.values()) for g in reduced]
        tensors = {"grad_sq": grad_sq, "param_norms": self._batch_gradient.norms(batch_grads)}
        if self._reference_due():
            tensors["val_dot"] = self._val_dot(ran, n, where)
        if self.options["alignment"]:
            whole = self._batch_gradient.for_alignment(reduced)
            tensors["alignment"] = stack_grad_sq(
                [
                    o.alignment(g).to(where) if has else None
                    for o, g, has in zip(self._observers, whole, ran, strict=True)
                ],
                n,
                where,
            )
        return tensors, tuple(len(g) for g in batch_grads)

    def _val_dot(self, ran: list[bool], n: int, where: torch.device) -> Tensor:
        """[N, layers] ⟨contribution_i, g_val⟩ in back-propagated units (as alignment)."""
        reference = self._reference
        if reference is None:  # only called on reference steps
            msg = "no reference batch"
            raise RecorderError(msg)
        g_val = reference.gradients(self.model)
        columns = []
        for o, has in zip(self._observers, ran, strict=True):
            own = {name: g_val[id(p)] for name, p in o.params.items() if id(p) in g_val}
            columns.append(o.alignment(own).to(where) if has else None)
        return stack_grad_sq(columns, n, where)

    def _warn_inactive(self, reason: str | None) -> None:
        if self._warned_inactive:
            return
        self._warned_inactive = True
        if reason == "eval":
            msg = (
                f"samplescope: {type(self.model).__name__} is in eval mode (what from_pretrained "
                "and model.eval() leave), so its steps are not recorded; call model.train() "
                "before training"
            )
        else:
            msg = (
                "samplescope: the forward ran with grad disabled (torch.no_grad or "
                "inference_mode), so its steps are not recorded; run the forward with grad enabled"
            )
        warnings.warn(msg, stacklevel=4)

    def _warn_nonfinite(self, stacklevel: int) -> None:
        # The writer thread counts; the training thread tells the user, once.
        if self._warned_nonfinite or not self._nonfinite.total:
            return
        self._warned_nonfinite = True
        step = self._nonfinite.first_step
        warnings.warn(
            f"samplescope: non-finite losses or gradient norms at step {step}; "
            "they are recorded as they are and counted in /steps/n_nonfinite",
            stacklevel=stacklevel,
        )

    def _fail(self, error: SamplescopeError, *, lost_step: bool = True) -> None:
        if self.on_error == "raise":
            raise error
        self._writer.count_error()
        text = f"step {self.step} not recorded: {error}" if lost_step else str(error)
        warnings.warn(f"samplescope: {text}", stacklevel=4)

    def _lr(self) -> float | Tensor:
        if self.optimizer is None or not self.optimizer.param_groups:
            return math.nan
        lr = self.optimizer.param_groups[0].get("lr", math.nan)
        if isinstance(lr, Tensor):
            # A copy, read on the writer thread: `.item()` here would wait for the device,
            # and schedulers update tensor learning rates in place.
            return lr.detach().clone()
        return float(lr)

    # -- model input: input norm, input gradient, thumbnails ------------------------------

    def _on_model_input(
        self, module: nn.Module, args: tuple, kwargs: dict
    ) -> tuple[tuple, dict] | None:
        # Forwards that observers replay (the fallback recomputing a root-owned parameter's
        # gradient) are not the step's model input.
        if not self._entered or is_replaying():
            return None
        if not self.active:
            self._skipped = "eval" if not self.model.training else "no_grad"
            return None
        self._model_ran = True
        # The batch size, from the first tensor argument (``model(input_ids=...)`` too):
        # observers expand modules evaluated once for the whole batch to it.
        first = next((v for v in (*args, *kwargs.values()) if isinstance(v, Tensor)), None)
        dim = self._batch_dims.get("", 0)
        if first is not None and first.dim() > dim:
            self._batch_size = int(first.shape[dim])
        if not args or not isinstance(args[0], Tensor):
            return None
        x = args[0]
        self._inputs = x.detach()
        if self.options["input_grad"] and x.is_floating_point():
            if not x.requires_grad:
                x = x.detach().requires_grad_(True)
            x.register_hook(self._keep_input_grad)
            return (x, *args[1:]), kwargs
        return None

    def _keep_input_grad(self, grad: Tensor) -> None:
        self._input_grad = grad.detach()

    def _input_sq(self, n: int) -> Tensor | None:
        """‖x_i‖² of the model input, or None where it is not defined (NaN in the trace)."""
        x = self._inputs
        if x is None or not x.is_floating_point() or x.dim() == 0 or x.shape[0] != n:
            return None
        flat = x.reshape(n, -1)
        return torch.linalg.vecdot(flat, flat)

    def _input_grad_sq(self, n: int) -> Tensor | None:
        """‖∂L/∂x_i‖² in back-propagated units, or None where there is no such gradient."""
        g = self._input_grad
        if g is None or g.dim() == 0 or g.shape[0] != n:
            return None
        flat = g.reshape(n, -1)
        return torch.linalg.vecdot(flat, flat)

    def _thumbnails(self, ids: np.ndarray) -> None:
        x = self._inputs
        if x is None or self._thumb_shape is None or x.shape[0] != ids.size:
            return
        new = [i for i, sid in enumerate(ids.tolist()) if sid not in self._thumbnailed]
        if not new:
            return
        # The whole batch, and the new rows picked on the writer thread: choosing them on
        # the device would need the indices there, a copy from host memory every step.
        images = HostTransfer({"image": thumbnail_images(x, self._thumb_shape)})
        self._thumbnailed.update(int(ids[i]) for i in new)
        self._writer.append(
            "thumbnails",
            DeferredRows(lambda: {"sample_id": ids[new], "image": images.arrays()["image"][new]}),
        )

    # -- sample ids -----------------------------------------------------------------------

    def _as_ids(
        self, sample_ids: Tensor | Sequence[int] | Sequence[str] | np.ndarray
    ) -> np.ndarray:
        """Integer ids, or for string ids their `sample_id_of` hashes (see sample_names.py)."""
        names = is_names(sample_ids)
        self._sample_names.check_kind(names)
        return self._sample_names.ids(sample_ids) if names else as_ids(sample_ids)

    def _append_names(self) -> None:
        rows = self._sample_names.take_new()
        if rows is not None:
            self._writer.append("sample_names", rows)

    # -- the file's structure -------------------------------------------------------------

    def _layout(self) -> dict[str, Any]:
        return {
            "layers": {
                "name": [o.name for o in self._observers],
                "kind": [type(o.module).__name__ for o in self._observers],
                "n_params": [o.n_params for o in self._observers],
                "method": [o.method for o in self._observers],
            },
            "outputs": self.outputs is not False,
            "alignment": bool(self.options["alignment"]),
            "reference": self._reference is not None,
            "input_grad": self.options["input_grad"],
            "thumbnails": self.options["thumbnails"],
            "checkpoints": self.checkpoints,
            "accumulation": self.accumulation_steps > 1,
        }

    def _first_step(self) -> None:
        position = {name: i for i, name in enumerate(self._order)}
        self._writer.set_forward_order([position.get(o.name, -1) for o in self._observers])
        for handle in self._order_handles:
            handle.remove()
        self._order_handles.clear()
        if self.options["thumbnails"]:
            self._thumb_shape = thumbnail_shape(self._inputs)
            if self._thumb_shape is None:
                shape = None if self._inputs is None else tuple(self._inputs.shape)
                warnings.warn(
                    f"samplescope: inputs of shape {shape} do not look like images; "
                    "no thumbnails are stored",
                    stacklevel=4,
                )
        self._started = True

    def _order_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple) -> None:
            if self.active and name not in self._order:
                self._order.append(name)

        return hook

    def _root_attrs(
        self, config: Mapping[str, Any] | None, rank: int, world_size: int, run_id: str | None
    ) -> dict[str, Any]:
        hparams = {}
        if self.optimizer is not None and self.optimizer.param_groups:
            hparams = {
                k: jsonable(v) for k, v in self.optimizer.param_groups[0].items() if k != "params"
            }
        attrs = {
            "torch_version": torch.__version__,
            "rank": int(rank),
            "world_size": int(world_size),
            "reduction": self.reduction,
            "optimizer": type(self.optimizer).__name__ if self.optimizer is not None else "",
            "optimizer_hparams": hparams,
            "config": dict(config or {}),
            "model": type(self.model).__name__,
            "options": self.options,
        }
        if run_id is not None:
            attrs["run_id"] = str(run_id)
        return attrs


class _ScoringInputError(RecorderError):
    """Bad arguments to score_checkpoint: raised whatever ``on_error`` says."""


def _inner_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside a wrapper (Accelerate's ``AcceleratedOptimizer``, which
    skips ``Optimizer.__init__`` and so has no hook tables of its own)."""
    while not hasattr(optimizer, "_optimizer_step_post_hooks") and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def _refuse_compiled(model: nn.Module) -> None:
    """Stop at entry rather than fail inside dynamo mid-training (or record nothing)."""
    # An OptimizedModule exists only once torch._dynamo is imported; importing it here
    # would cost every user a second.
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    optimized = getattr(eval_frame, "OptimizedModule", None)
    for name, module in model.named_modules():
        wrapped = optimized is not None and isinstance(module, optimized)
        in_place = getattr(module, "_compiled_call_impl", None) is not None
        if wrapped or in_place:
            inner = getattr(module, "_orig_mod", module) if wrapped else module
            what = f"module {name!r}" if name else type(inner).__name__
            how = "torch.compile(model)" if wrapped else "model.compile()"
            msg = (
                f"{what} is compiled ({how}); samplescope's hooks cannot run inside a compiled "
                "graph: pass and call the uncompiled module while recording"
            )
            raise RecorderError(msg)


def _check_config(config: Mapping[str, Any] | None) -> None:
    """Refuse, before any file exists, a config the trace could not store as JSON."""
    if config is None:
        return
    if not isinstance(config, Mapping):
        msg = f"config must be a mapping (e.g. a dict), not {type(config).__name__}"
        raise RecorderError(msg)
    try:
        json.dumps(dict(config))
    except (TypeError, ValueError) as error:
        msg = f"config must be JSON-serialisable: {error}"
        raise RecorderError(msg) from None


@contextlib.contextmanager
def _deferred_sigint(on_signal: Callable[[], None]) -> Iterator[list[int]]:
    """Hold back SIGINT in the block (calling `on_signal` instead); yields a list that is
    non-empty if one arrived."""
    arrived: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield arrived
        return

    def handler(signum: int, frame: object) -> None:
        arrived.append(signum)
        on_signal()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield arrived
    finally:
        signal.signal(signal.SIGINT, previous)
