"""What every adapter checks the same way: gradient accumulation and loss scaling."""

from __future__ import annotations

from samplescope.recorder.errors import RecorderError
from samplescope.recorder.recorder import Recorder

__all__ = [
    "IntegrationError",
    "check_accumulation",
    "rank_path",
]


class IntegrationError(RecorderError):
    """A framework setting the recorder cannot follow bit for bit (say which, and what to do)."""


def check_accumulation(recorder: Recorder, steps: int, where: str) -> None:
    """Refuse accumulation the recorder would not reproduce.

    With ``K > 1`` micro-batches per optimizer step the framework divides the loss by K
    before backward. The recorder back-propagates the reduced loss itself, so the run stays
    bit-identical only if the recorder divides by the same K: that is
    ``Recorder(..., accumulation_steps=K)``.

    Raises:
        IntegrationError: K > 1 and the recorder does not accumulate over exactly K calls.
    """
    if steps <= 1:
        return
    recorded = getattr(recorder, "accumulation_steps", None)
    if recorded == steps:
        return
    msg = (
        f"{where} accumulates gradients over {steps} micro-batches but the Recorder has "
        f"accumulation_steps={recorded}: pass Recorder(..., accumulation_steps={steps})"
    )
    raise IntegrationError(msg)


def rank_path(path: str, rank: int, world_size: int) -> str:
    """The trace of one rank: ``{rank}`` in ``path`` replaced by the rank's number.

    Raises:
        IntegrationError: several processes and no ``{rank}`` in the path (they would all
            write one file).
    """
    if world_size > 1 and "{rank}" not in path:
        msg = (
            f"{world_size} processes would all write {path}: put {{rank}} in the trace path "
            "(e.g. runs/exp-{rank}.h5), one trace per rank"
        )
        raise IntegrationError(msg)
    return path.replace("{rank}", str(rank))
