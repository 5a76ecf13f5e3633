"""Start `dist_worker.py` as a 2-process gloo group on loopback and wait for it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name("dist_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_ranks(job: str, outdir: Path, world: int = 2, timeout: float = 600.0) -> None:
    """Run ``dist_worker.py job outdir`` on ``world`` ranks; raise with their stderr on failure."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), job, str(outdir)],
                env=env,
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
