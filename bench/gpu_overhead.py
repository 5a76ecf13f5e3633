"""Recording overhead on a CUDA device: plain training step vs recorded step, side by side.

    python bench/gpu_overhead.py                 # MLP, CNN, transformer layer; 200 steps
    python bench/gpu_overhead.py --steps 50 --models mlp,cnn
    python bench/gpu_overhead.py --sync-debug    # also: fail on any host sync in a step

The models and batches are those of bench/recorder_overhead.py, moved to the device. For
each one, plain steps (forward, loss, backward, SGD step) and recorded steps alternate in
blocks of ten; a block's time is taken with CUDA events, so the figure includes any stall
the recorder causes on the training thread (a host synchronisation shows up as the device
queue running dry). The table gives the median per-step time of each and the ratio.

With ``--sync-debug`` the recorded steps also run under
``torch.cuda.set_sync_debug_mode("error")``: any call that waits for the device on the
training thread (``.item()``, ``.cpu()``, ``.numpy()``, a data-dependent shape) raises.
Layer rules whose arithmetic needs one (``torch.unique`` in the embedding rule, the
fallback's per-sample loop) are reported as such.

Exits with status 1 and a one-line message when no CUDA device is present.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from samplescope import Recorder

sys.path.insert(0, str(Path(__file__).parent))
import recorder_overhead

warnings.filterwarnings("ignore")

Batch = tuple[torch.Tensor, torch.Tensor]
_BLOCK = 10
_IDS = torch.arange(1024)  # on the CPU, as a DataLoader yields them


# The same models and batches as the CPU benchmark (the docstring's promise), not copies.
MODELS: dict[str, Callable[[], tuple[nn.Module, Batch]]] = {
    name: recorder_overhead.MODELS[name] for name in ("mlp", "cnn", "transformer")
}


def _step(model: nn.Module, opt: torch.optim.Optimizer, batch: Batch, rec: Recorder | None) -> None:
    x, y = batch
    logits = model(x)
    losses = F.cross_entropy(logits, y, reduction="none")
    if rec is None:
        losses.mean().backward()
    else:
        rec.backward(losses, sample_ids=_IDS[: len(y)], logits=logits, targets=y)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _block_ms(run: Callable[[], None]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(_BLOCK):
        run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / _BLOCK


def measure(name: str, steps: int, sync_debug: bool, device: torch.device) -> tuple[float, float]:
    torch.manual_seed(0)
    model, batch = MODELS[name]()
    plain = model.to(device)
    recorded = copy.deepcopy(plain)
    batch = (batch[0].to(device), batch[1].to(device))
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.01)
    opt_rec = torch.optim.SGD(recorded.parameters(), lr=0.01)
    plain_ms: list[float] = []
    rec_ms: list[float] = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        rec = stack.enter_context(Recorder(Path(tmp) / "t.h5", recorded, opt_rec))
        for _ in range(3):  # warm-up: cuBLAS handles, the convolutions' method choice
            _step(plain, opt_plain, batch, None)
            _step(recorded, opt_rec, batch, rec)
        torch.cuda.synchronize()
        for _ in range(max(1, steps // _BLOCK)):
            plain_ms.append(_block_ms(lambda: _step(plain, opt_plain, batch, None)))
            if sync_debug:
                torch.cuda.set_sync_debug_mode("error")
            try:
                rec_ms.append(_block_ms(lambda: _step(recorded, opt_rec, batch, rec)))
            finally:
                torch.cuda.set_sync_debug_mode("default")
    return statistics.median(plain_ms), statistics.median(rec_ms)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--models", default="mlp,cnn,transformer")
    parser.add_argument("--sync-debug", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_overhead: no CUDA device here; run it on a machine with one", file=sys.stderr)
        return 1
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    print(f"{'model':<12} {'plain ms':>9} {'recorded ms':>12} {'ratio':>6}")
    for name in args.models.split(","):
        try:
            plain, recorded = measure(name, args.steps, args.sync_debug, device)
        except RuntimeError as error:  # a host sync under --sync-debug
            reason = " ".join(str(error).split())[:160]
            print(f"{name:<12} fails: {reason}")
            continue
        print(f"{name:<12} {plain:>9.3f} {recorded:>12.3f} {recorded / plain:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
