"""Hugging Face `Trainer` with every training step recorded.

    from samplescope.recorder.integrations.transformers import RecordingTrainer

    trainer = RecordingTrainer(
        model=model, args=args, train_dataset=train,  # items carry a "sample_id"
        trace="runs/hf.h5", task="causal_lm",
    )
    trainer.train()

`RecordingTrainer` computes one loss per sample (`task`, or override `sample_losses`),
takes the ids from the ``sample_id`` column (kept through ``remove_unused_columns``) and
back-propagates ``mean(losses)`` through the recorder where `Trainer.training_step` would
call ``accelerator.backward(loss)``. See docs/integrations.md.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

from samplescope.recorder.integrations._common import (
    IntegrationError,
    check_accumulation,
    rank_path,
)
from samplescope.recorder.integrations.accelerate import backward as accelerate_backward
from samplescope.recorder.recorder import Recorder

__all__ = ["IGNORE_INDEX", "RecordingTrainer", "SampleLosses", "Task", "sequence_losses"]

Task = Literal["causal_lm", "token", "classification"]
IGNORE_INDEX = -100  # Hugging Face's label for tokens left out of the loss (padding, prompt)


class SampleLosses(NamedTuple):
    """One step's per-sample losses [N] and, for classification, logits [N, C] and targets [N]."""

    losses: Tensor
    logits: Tensor | None = None
    targets: Tensor | None = None


def sequence_losses(logits: Tensor, labels: Tensor, *, shift: bool) -> Tensor:
    """Each sequence's loss: the mean cross-entropy over its tokens whose label is not -100.

    Args:
        logits: [N, T, V] token scores.
        labels: [N, T] token labels, ``IGNORE_INDEX`` where a token is left out.
        shift: predict token t+1 from position t (causal language models, as Hugging Face
            shifts inside the model's loss); False for masked-LM and token classification.

    Returns:
        [N] losses; a sequence with no labelled token gets 0 (it contributes no gradient).
    """
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # as Hugging Face's own loss does
    n, t = labels.shape
    per_token = F.cross_entropy(
        logits.reshape(n * t, -1), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).reshape(n, t)
    counted = (labels != IGNORE_INDEX).sum(1).clamp(min=1)
    return per_token.sum(1) / counted


class RecordingTrainer(transformers.Trainer):
    """A `transformers.Trainer` whose training steps are recorded by a samplescope `Recorder`.

    The loss trained on is ``mean(losses)`` over the batch's samples, where each sample's
    loss is set by ``task``:

    - ``"classification"``: cross-entropy of the sequence's (or image's) label; the logits
      and targets are recorded too (prediction, p_target, margin).
    - ``"causal_lm"``: the mean over the sequence's labelled tokens (label != -100) of the
      next-token cross-entropy; ``"token"`` the same without the shift (masked LM, token
      classification). This weighs every sequence equally, where Hugging Face's own loss
      takes the mean over all tokens of the batch: the two agree when every sequence has
      the same number of labelled tokens.

    For anything else override `sample_losses`. Evaluation losses use the same definition.

    Args:
        *args, **kwargs: as `transformers.Trainer`.
        trace: the trace to write (``{rank}`` in it becomes the process's rank: one trace
            per rank under DDP, with a shared ``run_id`` in ``recorder_options``); the
            recorder is opened at the first training step (the
            optimizer exists then) and closed when `train` returns or raises.
        recorder: instead of ``trace``, an entered `Recorder` of ``trainer.model`` you own
            (one process; under DDP the model to watch is the wrapper the Trainer builds in
            `train`, so use ``trace``).
        task: how per-sample losses are computed (above); None only with `sample_losses`
            overridden.
        sample_id_column: the dataset column of integer sample ids, unique per batch; kept
            through ``remove_unused_columns`` and never passed to the model.
        recorder_options: keyword arguments for `Recorder` (with ``trace``).

    Raises:
        IntegrationError: at the first training step, for settings the recorder cannot
            follow bit for bit: gradient accumulation (unless the Recorder accumulates over
            the same K), fp16 loss scaling, DeepSpeed, several GPUs in one process, label
            smoothing, or a ``compute_loss_func``.
    """

    def __init__(
        self,
        *args: Any,
        trace: str | Path | None = None,
        recorder: Recorder | None = None,
        task: Task | None = None,
        sample_id_column: str = "sample_id",
        recorder_options: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if (trace is None) == (recorder is None):
            msg = "pass RecordingTrainer either trace= (a path) or recorder= (an entered Recorder)"
            raise IntegrationError(msg)
        if recorder is not None and recorder_options:
            msg = "recorder_options apply to trace=; set them on the Recorder you pass instead"
            raise IntegrationError(msg)
        if task not in ("causal_lm", "token", "classification", None):
            msg = f"task must be 'causal_lm', 'token' or 'classification', not {task!r}"
            raise IntegrationError(msg)
        super().__init__(*args, **kwargs)
        self.trace = str(trace) if trace is not None else None
        self.task = task
        self.sample_id_column = sample_id_column
        self.recorder_options = dict(recorder_options or {})
        self.recorder: Recorder | None = recorder
        self._owns_recorder = recorder is None
        self._recording: contextlib.ExitStack | None = None

    # -- the columns: keep the ids through remove_unused_columns ------------------------

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self.sample_id_column not in self._signature_columns:
            self._signature_columns.append(self.sample_id_column)

    # -- the loss -------------------------------------------------------------------------

    def sample_losses(self, model: nn.Module, inputs: dict[str, Any]) -> SampleLosses:
        """Run the model on ``inputs`` (ids already removed) and return per-sample losses.

        Override for a loss ``task`` does not cover; keep it a pure function of the batch.
        """
        if self.task is None:
            msg = "RecordingTrainer needs task= ('causal_lm', 'token', 'classification') "
            msg += "or an overridden sample_losses"
            raise IntegrationError(msg)
        if "labels" not in inputs:
            msg = f"task={self.task!r} needs a 'labels' column in every batch"
            raise IntegrationError(msg)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
        if self.task == "classification":
            if logits.dim() != 2 or labels.dim() != 1:
                msg = (
                    f"task='classification' needs logits [N, C] and labels [N], got "
                    f"{tuple(logits.shape)} and {tuple(labels.shape)}"
                )
                raise IntegrationError(msg)
            losses = F.cross_entropy(logits, labels, reduction="none")
            return SampleLosses(losses, logits, labels)
        return SampleLosses(sequence_losses(logits, labels, shift=self.task == "causal_lm"))

    def _split_ids(self, inputs: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
        inputs = dict(inputs)
        if self.sample_id_column not in inputs:
            msg = (
                f"the batch has no {self.sample_id_column!r} column: give every training item "
                f"one (e.g. dataset.map(lambda _, i: {{{self.sample_id_column!r}: i}}, "
                "with_indices=True)) or set sample_id_column="
            )
            raise IntegrationError(msg)
        return inputs, inputs.pop(self.sample_id_column)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, Any]:
        """The mean of `sample_losses` (used for evaluation; training goes through the recorder)."""
        inputs = dict(inputs)
        inputs.pop(self.sample_id_column, None)
        result = self.sample_losses(model, inputs)
        loss = result.losses.mean()
        if return_outputs:
            return loss, {"logits": result.logits} if result.logits is not None else {}
        return loss

    # -- the step -------------------------------------------------------------------------

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """As `transformers.Trainer.train`; the recorder (with ``trace=``) closes at its end."""
        with contextlib.ExitStack() as stack:
            self._recording = stack
            try:
                return super().train(*args, **kwargs)
            finally:
                self._recording = None

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor:
        """One micro-batch: per-sample losses, backward through the recorder."""
        recorder = self._recorder(model)
        self._check_step(recorder, model)
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs, ids = self._split_ids(self._prepare_inputs(inputs))
        recorder.set_epoch(math.floor(self.state.epoch or 0))
        with self.compute_loss_context_manager():
            result = self.sample_losses(model, inputs)
        del inputs
        # What Trainer logs: the loss divided by the accumulation steps, as its own
        # training_step returns it; the recorder's back-propagated loss already is.
        return accelerate_backward(
            self.accelerator,
            recorder,
            result.losses,
            sample_ids=ids,
            logits=result.logits,
            targets=result.targets,
        )

    def _recorder(self, model: nn.Module) -> Recorder:
        if self.recorder is not None:
            return self.recorder
        if self._recording is None or self.trace is None:
            msg = "RecordingTrainer.training_step called outside train(): call trainer.train()"
            raise IntegrationError(msg)
        options = dict(self.recorder_options)
        k = self.args.gradient_accumulation_steps
        if k > 1:
            options.setdefault("accumulation_steps", k)
        options.setdefault("config", {"trainer": _trainer_config(self.args)})
        args = self.args
        options.setdefault("rank", args.process_index)
        options.setdefault("world_size", args.world_size)
        path = rank_path(self.trace, args.process_index, args.world_size)
        # Under DDP ``model`` is the Trainer's DistributedDataParallel wrapper: the recorder
        # reads the batch gradient from its reduction (it refuses the bare model there).
        self.recorder = self._recording.enter_context(
            Recorder(path, model, self.optimizer, **options)
        )
        return self.recorder

    def _check_step(self, recorder: Recorder, model: nn.Module) -> None:
        args = self.args
        if args.n_gpu > 1:
            msg = "Trainer runs several GPUs in one process (DataParallel); samplescope records "
            msg += "one device per process: launch with torchrun (DDP) instead"
            raise IntegrationError(msg)
        if transformers.trainer.is_sagemaker_mp_enabled():
            msg = "samplescope cannot record SageMaker model parallelism's own forward/backward"
            raise IntegrationError(msg)
        if args.label_smoothing_factor:
            msg = "label_smoothing_factor is not applied by RecordingTrainer's per-sample "
            msg += "losses; set it to 0 or override sample_losses"
            raise IntegrationError(msg)
        if self.compute_loss_func is not None:
            msg = "compute_loss_func returns one batch loss; override "
            msg += "RecordingTrainer.sample_losses to return per-sample losses instead"
            raise IntegrationError(msg)
        if recorder.model is not model:
            msg = "the Recorder must watch the model the Trainer trains: trainer.model in one "
            msg += "process; under DDP use trace= (the recorder then watches the DDP wrapper)"
            raise IntegrationError(msg)
        check_accumulation(recorder, args.gradient_accumulation_steps, "TrainingArguments")
        k = args.gradient_accumulation_steps
        if k > 1 and self.current_gradient_accumulation_steps != k:
            msg = (
                f"this optimizer step has {self.current_gradient_accumulation_steps} "
                f"micro-batches, not gradient_accumulation_steps={k} (the epoch's last): make "
                "the batches per epoch a multiple of it"
            )
            raise IntegrationError(msg)


def _trainer_config(args: transformers.TrainingArguments) -> dict[str, Any]:
    # A few settings worth keeping with the trace; JSON-serialisable by construction.
    return {
        "learning_rate": float(args.learning_rate),
        "per_device_train_batch_size": int(args.per_device_train_batch_size),
        "gradient_accumulation_steps": int(args.gradient_accumulation_steps),
        "seed": int(args.seed),
    }
