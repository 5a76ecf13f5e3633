"""Synthetic runs for `findings`: a world where every claim holds, and its permuted null.

The positive world: 200 samples of hidden difficulty d in [0, 1] (sample ids shuffled, so id
says nothing), 6 epochs of 4 steps of 50, three linear layers. A visit's grad_sq is

    (0.2 + d) · exp(e · (1.2 d − 0.9)) · layer factor · lognormal noise (σ 0.5)

with layer factors (0.5 + d) · (‖x‖² + 1) / 101 for the input layer, 1 for the middle and
1.5 − d for the output: importance rises with difficulty, easy samples' decays fast and
sits in the output layer, hard samples' grows and sits in the input layer, and every
sample's importance shrinks on average, as real gradients do. Losses fall over training and
end ordered by d.

The null world is the same run with each step's grad_sq rows shuffled among its batch-mates:
the step's values are unchanged, but which sample got which is random, so importance is
unrelated to difficulty while the layer and time structure of the run stays.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tracefiles import write_trace

__all__ = ["N_SAMPLES", "write_world"]

N_SAMPLES = 200
EPOCHS = 6
BATCH = 50


def write_world(
    path: Path,
    seed: int,
    *,
    null: bool = False,
    epochs: int = EPOCHS,
    sample_offset: int = 0,
    flat_loss: bool = False,
    data_seed: int | None = None,
    **kwargs: Any,
) -> Path:
    """Write one synthetic run (positive, or its permuted null) and return its path.

    Args:
        path: the trace to write.
        seed: draws the noise, the difficulty order and the batches.
        null: shuffle each step's grad_sq among its batch-mates.
        epochs: epochs to record.
        sample_offset: added to every sample id (a run of other data).
        flat_loss: the loss never falls (a run that learns nothing).
        data_seed: draws the samples' difficulty and input norms (default ``seed``): two
            runs with one data_seed and different seeds are two seeds on the same data.
        kwargs: passed to `write_trace` (closed, evals, run_id, ...).
    """
    data_rng = np.random.default_rng(seed if data_seed is None else data_seed)
    n = N_SAMPLES
    difficulty = data_rng.permutation(n) / (n - 1)  # sample i's difficulty
    input_sq = data_rng.lognormal(np.log(100.0), 0.3, size=n)
    rng = np.random.default_rng(seed if data_seed is None else seed + 10_000)
    steps: dict[str, list[Any]] = {"step": [], "epoch": [], "lr": [], "batch_size": []}
    sample_ids, losses, grads, norms = [], [], [], []
    step = 0
    for epoch in range(epochs):
        order = rng.permutation(n)
        for start in range(0, n, BATCH):
            batch = order[start : start + BATCH]
            d = difficulty[batch]
            base = (0.2 + d) * np.exp(epoch * (1.2 * d - 0.9))
            factors = np.stack(
                [(0.5 + d) * (input_sq[batch] + 1) / 101, np.ones_like(d), 1.5 - d], axis=1
            )
            grad = base[:, None] * factors * rng.lognormal(0.0, 0.5, size=(len(batch), 3))
            if null:
                grad = grad[rng.permutation(len(batch))]
            fall = 1.0 if flat_loss else 1.0 + 1.0 / (epoch + 1)
            loss = (0.2 + 2.0 * d) * fall * rng.lognormal(0.0, 0.05, size=len(batch))
            steps["step"].append(step)
            steps["epoch"].append(epoch)
            steps["lr"].append(0.1)
            steps["batch_size"].append(len(batch))
            sample_ids.append(batch + sample_offset)
            losses.append(loss)
            grads.append(grad)
            norms.append(input_sq[batch])
            step += 1
    kwargs.setdefault("run_id", f"world{seed}{'null' if null else ''}")
    return write_trace(
        path,
        layers={"name": ["fc1", "fc2", "fc3"], "n_params": [400, 200, 30]},
        steps=steps,
        visits={
            "step": np.repeat(np.arange(step), BATCH),
            "sample_id": np.concatenate(sample_ids),
            "loss": np.concatenate(losses),
            "grad_sq": np.concatenate(grads),
            "input_sq": np.concatenate(norms),
        },
        **kwargs,
    )
