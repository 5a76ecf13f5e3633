"""The rank side of the distributed tests: ``python dist_worker.py JOB OUTDIR``.

Started twice by `dist_harness.run_ranks` with RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT set (gloo on loopback, CPU). Every job of a kind runs in one pair of processes
(importing torch twice per pair is most of a test's time on a small machine). Each rank
writes ``OUTDIR/<loop>.rank<r>.h5``; `run_reference` writes ``OUTDIR/<loop>.ref.h5`` from
one process on the concatenated batches, with the same seed, steps and optimizer.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F

from samplescope.recorder import Recorder, RecorderError

WORLD = 2
LOCAL_BATCH = 4
STEPS = 4
DDP_LOOPS = ("ddp", "ddp_keep_grads", "ddp_no_sync")
FSDP_LOOPS = ("fsdp", "fsdp_keep_grads")


class Scale(nn.Module):
    """A layer without a closed-form rule: the recorder measures it with the fallback."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, features, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), Scale(8), nn.Linear(8, 3)).double()


def global_batches() -> list[tuple[Tensor, Tensor, Tensor]]:
    """(x, y, ids) of every step's global batch: rank r's share is rows r·B .. (r+1)·B."""
    gen = torch.Generator().manual_seed(1)
    n = WORLD * LOCAL_BATCH
    out = []
    for step in range(STEPS):
        x = torch.randn(n, 5, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (n,), generator=gen)
        out.append((x, y, torch.arange(n) + 100 * step))
    return out


def shard(batch: tuple[Tensor, Tensor, Tensor], rank: int) -> tuple[Tensor, Tensor, Tensor]:
    lo, hi = rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH
    return tuple(t[lo:hi] for t in batch)  # type: ignore[return-value]


def _train(
    rec: Recorder,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    batches: list[tuple[Tensor, Tensor, Tensor]],
    loop: str,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> None:
    """Every loop shape: `ddp_no_sync` steps the optimizer every second backward."""
    for i, (x, y, ids) in enumerate(batches):
        accumulate = loop == "ddp_no_sync" and i % 2 == 0
        context = no_sync() if accumulate and no_sync is not None else contextlib.nullcontext()
        with context:
            logits = model(x)
            rec.backward(F.cross_entropy(logits, y, reduction="none"), ids, logits, y)
        if accumulate:
            continue
        opt.step()
        opt.zero_grad(set_to_none=not loop.endswith("keep_grads"))


def run_reference(loop: str, outdir: Path) -> Path:
    """One process, the concatenated batches: what every rank's shards must add up to."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    path = outdir / f"{loop}.ref.h5"
    with Recorder(path, model, opt, alignment=True, overwrite=True) as rec:
        _train(rec, model, opt, global_batches(), loop)
    return path


def _ddp(loop: str, rank: int, outdir: Path) -> None:
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(make_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    batches = [shard(b, rank) for b in global_batches()]
    path = outdir / f"{loop}.rank{rank}.h5"
    with Recorder(
        path, model, opt, alignment=True, rank=rank, world_size=WORLD, run_id=loop
    ) as rec:
        _train(rec, model, opt, batches, loop, model.no_sync)


def _fsdp(loop: str, rank: int, outdir: Path) -> None:
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    for layer in (model[0], model[3]):
        fully_shard(layer)
    fully_shard(model)  # the root group holds Scale's weight
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    batches = [shard(b, rank) for b in global_batches()]
    path = outdir / f"{loop}.rank{rank}.h5"
    with Recorder(
        path, model, opt, alignment=True, rank=rank, world_size=WORLD, run_id=loop
    ) as rec:
        _train(rec, model, opt, batches, loop)


def _tensor_parallel(rank: int, outdir: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    model = make_model()
    mesh = init_device_mesh("cpu", (WORLD,))
    parallelize_module(model, mesh, {"0": ColwiseParallel()})
    path = outdir / f"tp.rank{rank}.h5"
    try:
        with Recorder(path, model, rank=rank, world_size=WORLD, run_id="tp"):
            pass
    except RecorderError as error:
        message = str(error)
    else:
        message = "no error"
    (outdir / f"tp.rank{rank}.txt").write_text(message)


def _refusals(rank: int, outdir: Path) -> None:
    """What the recorder refuses at ``with`` in a group of two: the messages, one per line."""
    model = make_model()
    cases = {
        "bare_model": {"rank": rank, "world_size": WORLD},  # the DDP wrapper is not passed
        "wrong_rank": {"rank": 0, "world_size": 1},
    }
    lines = []
    for case, ranks in cases.items():
        try:
            with Recorder(outdir / f"{case}.rank{rank}.h5", model, overwrite=True, **ranks):
                pass
        except RecorderError as error:
            lines.append(f"{case}: {error}")
        else:
            lines.append(f"{case}: no error")
    (outdir / f"refusals.rank{rank}.txt").write_text("\n".join(lines))


@contextlib.contextmanager
def _process_group(rank: int) -> Iterator[None]:
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        yield
    finally:
        dist.destroy_process_group()


def main(job: str, outdir: Path) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    with _process_group(rank):
        if job == "ddp":
            for loop in DDP_LOOPS:
                _ddp(loop, rank, outdir)
            _refusals(rank, outdir)
        elif job == "fsdp":
            for loop in FSDP_LOOPS:
                _fsdp(loop, rank, outdir)
            _tensor_parallel(rank, outdir)
        else:
            msg = f"unknown job {job!r}"
            raise SystemExit(msg)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
