"""How fast the trace writer runs: its headroom over a training run's visits per second."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from samplescope.recorder._columns import StepFrame, StepRows, derive_outputs
from samplescope.recorder._transfer import DeferredRows, HostTransfer, NonfiniteCounter
from samplescope.recorder.writer import TraceWriter

__all__ = ["writer_headroom"]


def writer_headroom(n_layers: int, batch: int = 128, seconds: float = 3.0) -> float:
    """Visits per second the trace writer sustains for a model with ``n_layers`` layers.

    Steps of ready tensors (as the recorder hands them over: loss, grad_sq, 10 logits,
    target, input norm, parameter norms) are queued as fast as possible; backpressure
    makes the producer wait for the writer, so the rate is the writer's, HDF5 included.
    Compare it with a run's visits per second to see how far the writer is from the limit.
    """
    layers = {
        "name": [f"l{i}" for i in range(n_layers)],
        "kind": ["Linear"] * n_layers,
        "n_params": [1] * n_layers,
        "method": ["identity"] * n_layers,
    }
    layout = {"layers": layers, "outputs": True, "alignment": False}
    counter = NonfiniteCounter()
    with tempfile.TemporaryDirectory() as tmp:
        writer = TraceWriter(Path(tmp) / "w.h5", {}, flush_seconds=0.5, derive=derive_outputs)
        writer.max_pending_bytes = 8 << 20  # fills within a second at any layer count
        writer.open(layout)
        g = torch.Generator().manual_seed(0)
        tensors = {
            "loss": torch.rand(batch, generator=g),
            "grad_sq": torch.rand(batch, n_layers, generator=g),
            "param_norms": torch.rand(2 * n_layers, generator=g),
            "input_sq": torch.rand(batch, generator=g),
            "_logits": torch.randn(batch, 10, generator=g),
            "target": torch.randint(0, 10, (batch,), generator=g),
        }
        start, step = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            frame = StepFrame(
                step=step,
                epoch=0,
                sample_id=np.arange(step * batch, (step + 1) * batch),
                scale=1.0 / batch,
                lr=0.1,
                time=time.time(),
                layer_sizes=(2,) * n_layers,
                input_sq=True,
                input_grad_sq=None,
            )
            transfer = HostTransfer(tensors)
            rows = StepRows(transfer, frame, counter)
            writer.append_step(
                DeferredRows(rows.steps), DeferredRows(rows.visits), nbytes=transfer.nbytes
            )
            step += 1
        writer.flush()
        elapsed = time.perf_counter() - start
        writer.abort()  # skip the compaction: not part of the steady state
        writer.close()
    return step * batch / elapsed
