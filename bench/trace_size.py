"""Trace size: bytes per visit, live and after close, against h5repack of the same file.

HDF5 in SWMR mode never reuses the space of a chunk it rewrote, and every flush rewrites
the last, partial chunk of each column, so a live trace grows with the number of flushes.
This prints, for several flush sizes (rows reaching the file per flush), the live file's
bytes per visit, the closed (compacted) file's, and `h5repack` of each as the compact
reference. Rows per flush stand for the flush interval: at 0.5 s and a few hundred steps
per second of a small model, a flush carries thousands of visits; a large model, tens.

    python bench/trace_size.py [--steps 500] [--batch 64]

Needs `h5repack` and `h5clear` (Debian package hdf5-tools).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from samplescope.recorder import Recorder


def _repacked_size(path: Path, *, live: bool = False) -> int:
    out = path.with_suffix(".repacked.h5")
    if live:  # a copy of a file still open for writing: clear the writer's status flags
        subprocess.run(["h5clear", "-s", str(path)], check=True)
    subprocess.run(["h5repack", str(path), str(out)], check=True)
    return out.stat().st_size


def measure(folder: Path, steps: int, batch: int, steps_per_flush: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(4096, 32), torch.randint(0, 10, (4096,))
    path = folder / f"trace-{steps_per_flush}.h5"
    live = folder / f"live-{steps_per_flush}.h5"
    # flush_seconds is long: only the explicit flushes below reach the file.
    with Recorder(path, model, opt, flush_seconds=3600) as rec:
        for step in range(steps):
            ids = torch.randint(0, 4096, (batch,)).unique()
            logits = model(x[ids])
            rec.backward(F.cross_entropy(logits, y[ids], reduction="none"), ids, logits, y[ids])
            opt.step()
            opt.zero_grad()
            if (step + 1) % steps_per_flush == 0:
                rec.flush()
        rec.flush()
        shutil.copy(path, live)  # the file as a crash would leave it
        n_visits = rec.n_visits
    sizes = {
        "live": live.stat().st_size,  # before h5clear, which rewrites only the superblock
        "live_repacked": _repacked_size(live, live=True),
        "closed": path.stat().st_size,
        "closed_repacked": _repacked_size(path),
    }
    return {k: v / n_visits for k, v in sizes.items()} | {"visits": n_visits}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    if shutil.which("h5repack") is None:
        sys.exit("h5repack not found; install Debian's hdf5-tools")
    torch.set_num_threads(1)
    print(
        f"{'rows/flush':>10} {'live B/v':>9} {'repack':>7} {'ratio':>6} "
        f"{'closed B/v':>10} {'repack':>7} {'ratio':>6}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for steps_per_flush in (1, 4, 16, 64, 256):
            m = measure(Path(tmp), args.steps, args.batch, steps_per_flush)
            print(
                f"{steps_per_flush * args.batch:>10} {m['live']:>9.1f} {m['live_repacked']:>7.1f} "
                f"{m['live'] / m['live_repacked']:>6.2f} {m['closed']:>10.1f} "
                f"{m['closed_repacked']:>7.1f} {m['closed'] / m['closed_repacked']:>6.2f}"
            )


if __name__ == "__main__":
    main()
