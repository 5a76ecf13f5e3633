"""Accelerate: `accelerator.backward(loss)` routed through the recorder.

    from samplescope.recorder.integrations.accelerate import backward

    model, opt, loader = accelerator.prepare(model, opt, loader)
    with Recorder("run.h5", accelerator.unwrap_model(model), opt) as rec:
        for x, y, ids in loader:
            logits = model(x)
            losses = F.cross_entropy(logits, y, reduction="none")
            backward(accelerator, rec, losses, sample_ids=ids, logits=logits, targets=y)
            opt.step()
            opt.zero_grad()

`accelerator.backward` divides the loss by the accumulation steps, scales it for fp16 or
hands it to DeepSpeed; `backward` here does what it would do for the set-ups whose
gradients the recorder reproduces bit for bit, and refuses the others in one line.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import Tensor

from samplescope.recorder.integrations._common import IntegrationError, check_accumulation
from samplescope.recorder.recorder import Recorder

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = ["backward", "check_accelerator"]

# Set-ups where `accelerator.backward` is not `loss.backward()` on the (accumulation-scaled)
# loss: DeepSpeed and Megatron-LM run their own backward; the recorder cannot follow them.
_REFUSED = {"DEEPSPEED": "DeepSpeed", "MEGATRON_LM": "Megatron-LM"}


def check_accelerator(accelerator: Accelerator, recorder: Recorder) -> None:
    """Refuse an Accelerate set-up whose backward the recorder would not reproduce.

    Raises:
        IntegrationError: DeepSpeed or Megatron-LM, tensor/context/sequence parallelism,
            an fp16 gradient scaler, or gradient
            accumulation the recorder does not divide by (see `check_accumulation`).
    """
    kind = getattr(accelerator.distributed_type, "name", str(accelerator.distributed_type))
    if kind in _REFUSED:
        msg = (
            f"samplescope cannot record through {_REFUSED[kind]}'s own backward; "
            "record with DDP or a single process"
        )
        raise IntegrationError(msg)
    config = getattr(accelerator, "parallelism_config", None)
    split = [name for name in ("tp", "cp", "sp") if getattr(config, f"{name}_enabled", False)]
    if split:
        # Tensor, context and sequence parallelism split a sample's computation across
        # ranks: each would see part of a per-sample norm.
        msg = (
            f"samplescope cannot record with {'/'.join(split).upper()} parallelism (a sample "
            "is split across ranks); record with data parallelism only"
        )
        raise IntegrationError(msg)
    if accelerator.scaler is not None:
        # The scaler multiplies the loss before backward: every per-sample norm would come
        # out scaled, and by a factor that changes from step to step.
        msg = (
            "mixed_precision='fp16' scales the loss before backward, which the recorder "
            "cannot undo; record with mixed_precision='bf16' or 'no'"
        )
        raise IntegrationError(msg)
    check_accumulation(recorder, accelerator.gradient_accumulation_steps, "the Accelerator")


def backward(
    accelerator: Accelerator,
    recorder: Recorder,
    losses: Tensor,
    sample_ids: Tensor | Sequence[int] | np.ndarray,
    logits: Tensor | None = None,
    targets: Tensor | None = None,
    **backward_kwargs: Any,
) -> Tensor:
    """Back-propagate through the recorder, as ``accelerator.backward(losses.mean())`` would.

    Args:
        accelerator: the run's `accelerate.Accelerator`.
        recorder: an entered `Recorder` watching ``accelerator.unwrap_model(model)``.
        losses, sample_ids, logits, targets, backward_kwargs: as `Recorder.backward`.

    Returns:
        The reduced loss that was back-propagated (detached).

    Raises:
        IntegrationError: a set-up the recorder cannot follow bit for bit
            (`check_accelerator`), before anything is back-propagated.
        RecorderError: as `Recorder.backward`.
    """
    check_accelerator(accelerator, recorder)
    if "learning_rate" in backward_kwargs:
        msg = "LOMO optimizers (backward with learning_rate=) fuse the update into backward; "
        msg += "samplescope cannot record them"
        raise IntegrationError(msg)
    return recorder.backward(
        losses, sample_ids=sample_ids, logits=logits, targets=targets, **backward_kwargs
    )
