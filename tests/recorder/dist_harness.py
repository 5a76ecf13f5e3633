"""Start a worker (`dist_worker.py`) as a 2-process gloo group on loopback and wait for it."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name("dist_worker.py")


def free_port() -> int:
    """A free port below the ephemeral range.

    A port the kernel hands out (bind to 0) lies in the ephemeral range, where a rank that
    keeps retrying to connect before rank 0 listens (a slow import) can be given that same
    port as its own source port: it connects to itself, and rank 0's listen then fails
    (EADDRINUSE) or the group hangs.
    """
    rng = random.Random()
    for _ in range(100):
        port = rng.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    msg = "no free port in 20000-32000"
    raise RuntimeError(msg)


def run_ranks(
    job: str,
    outdir: Path,
    world: int = 2,
    timeout: float = 600.0,
    worker: Path = WORKER,
    env: dict[str, str] | None = None,
) -> None:
    """Run ``worker job outdir`` (``dist_worker.py``) on ``world`` ranks, as torchrun would
    set them up on one node; raise with their stderr on failure."""
    port = free_port()
    procs = []
    for rank in range(world):
        variables = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world),
            "OMP_NUM_THREADS": "1",
            **(env or {}),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(worker), job, str(outdir)],
                env=variables,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    failures = []
    for rank, proc in enumerate(procs):
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            _, err = proc.communicate()
            failures.append(f"rank {rank} timed out:\n{err[-3000:]}")
            continue
        if proc.returncode:
            failures.append(f"rank {rank} exited {proc.returncode}:\n{err[-3000:]}")
    if failures:
        raise AssertionError("\n".join(failures))
