"""The read side of the fault matrix: a corpus of corrupted and crafted traces, and a runner.

From two small valid traces written by the recorder (one closed, one whose writer was
SIGKILLed), `make_corpus` derives, with a fixed seed: byte flips, truncations, structural
mutations (unequal columns, corrupt offsets, bad attributes), objects that reach outside the
file (external storage, external and soft links, virtual datasets, storage on a FIFO) and
impossible sizes (10⁹ declared rows, a 2 GiB chunk). `run_matrix` runs `info`, `sql`,
`samples` and `report` on every case in a worker process, with a timeout per command.

Every outcome must be a result (exit 0) or one `Error: ...` line with exit status 2: never a
hang, a traceback, a crash, or a byte of the secret file beside the corpus in the output.

    python tests/faults/corpus.py [DIR]     # build the corpus in DIR, run it, print a summary
"""

from __future__ import annotations

import json
import os
import random
import select
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

__all__ = ["SEED", "Case", "Outcome", "make_corpus", "run_matrix"]

SEED = 20261201
SECRET = "secret-line:do-not-read-me"
TIMEOUT_S = 30.0
COMMANDS: dict[str, list[str]] = {
    "info": ["info", "{path}"],
    "sql": ["sql", "{path}", "SELECT count(*) AS n, sum(importance) AS s FROM importance"],
    "samples": ["samples", "{path}", "--top", "3"],
    "report": ["report", "{path}", "-o", "{out}", "-q", "--pages", "summary,heatmaps"],
}

_RECORD = textwrap.dedent(
    """
    import os, signal, sys, time
    import torch
    torch.set_num_threads(1)
    from samplescope.recorder import Recorder
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    path, crash = sys.argv[1], sys.argv[2] == "crash"
    rec = Recorder(path, model, opt, config={"seed": 0}, flush_seconds=0.2).__enter__()
    for epoch in range(2):
        rec.set_epoch(epoch)
        for b in range(8):
            ids = torch.arange(b * 8, b * 8 + 8)
            out = model(x[ids])
            loss = torch.nn.functional.cross_entropy(out, y[ids], reduction="none")
            opt.zero_grad()
            rec.backward(loss, sample_ids=ids, logits=out, targets=y[ids])
            opt.step()
    if crash:
        time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGKILL)
    rec.__exit__(None, None, None)
    """
)


@dataclass
class Case:
    """One trace of the corpus. `outside` cases reach outside the file and must be refused."""

    name: str
    path: Path
    outside: bool = False


@dataclass
class Outcome:
    case: str
    command: str
    status: str  # "ok", "error" (one line, exit 2), or what went wrong
    detail: str
    seconds: float


def _record(path: Path, mode: str) -> None:
    subprocess.run(
        [sys.executable, "-c", _RECORD, str(path), mode],
        check=mode != "crash",
        capture_output=True,
        timeout=300,
    )


def make_corpus(folder: Path, *, flips: int = 40, cuts: int = 10) -> list[Case]:
    """Write the corpus into `folder` (deterministic given SEED) and return its cases."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    closed, crashed = folder / "base-closed.h5", folder / "base-crashed.h5"
    _record(closed, "close")
    _record(crashed, "crash")
    secret = folder / "secret.txt"
    secret.write_text((SECRET + "\n") * 64)
    cases = [Case("base-closed", closed), Case("base-crashed", crashed)]
    for base in (closed, crashed):
        data = base.read_bytes()
        for i in range(flips if base == closed else flips // 2):
            mutated = bytearray(data)
            for _ in range(rng.randint(1, 4)):
                mutated[rng.randrange(len(mutated))] ^= 1 << rng.randrange(8)
            cases.append(_bytes(folder, f"flip-{base.stem}-{i:02d}", bytes(mutated)))
        for i in range(cuts):
            cut = rng.randrange(48, len(data))
            cases.append(_bytes(folder, f"cut-{base.stem}-{i:02d}", data[:cut]))
    for name, mutate in _MUTATIONS.items():
        path = folder / f"mut-{name}.h5"
        shutil.copyfile(closed, path)
        with h5py.File(path, "a") as f:
            mutate(f, folder)
        cases.append(Case(f"mut-{name}", path, outside=name.startswith("outside")))
    return cases


def _bytes(folder: Path, name: str, data: bytes) -> Case:
    path = folder / f"{name}.h5"
    path.write_bytes(data)
    return Case(name, path)


def _replace(f: h5py.File, name: str, **kwargs: object) -> None:
    parent, _, leaf = name.rpartition("/")
    del f[name]
    f[parent].create_dataset(leaf, **kwargs)


def _outside_external_storage(f: h5py.File, folder: Path) -> None:
    _replace(
        f,
        "layers/n_params",
        shape=(2,),
        dtype="int64",
        external=[(str(folder / "secret.txt"), 0, 16)],
    )


def _outside_external_strings(f: h5py.File, folder: Path) -> None:
    # The /etc/shadow attack: fixed-length strings read from another file as layer names.
    _replace(
        f, "layers/kind", shape=(2,), dtype="S26", external=[(str(folder / "secret.txt"), 0, 52)]
    )


def _outside_fifo(f: h5py.File, folder: Path) -> None:
    fifo = folder / "pipe"
    if not fifo.exists():
        os.mkfifo(fifo)
    _replace(f, "visits/loss", shape=(128,), dtype="float32", external=[(str(fifo), 0, 512)])


def _outside_external_link(f: h5py.File, folder: Path) -> None:
    other = folder / "other.h5"
    if not other.exists():
        with h5py.File(other, "w") as o:
            o["name"] = np.array([SECRET.encode()] * 2)
    del f["evals"]
    f["evals"] = h5py.ExternalLink(str(other), "/")


def _outside_soft_link(f: h5py.File, folder: Path) -> None:
    del f["evals"]
    f["evals"] = h5py.SoftLink("/steps")


def _outside_virtual(f: h5py.File, folder: Path) -> None:
    other = folder / "other-visits.h5"
    if not other.exists():
        with h5py.File(other, "w") as o:
            o["loss"] = np.zeros(128, dtype="float32")
    layout = h5py.VirtualLayout(shape=(128,), dtype="float32")
    layout[:] = h5py.VirtualSource(str(other), "loss", shape=(128,))
    del f["visits/loss"]
    f["visits"].create_virtual_dataset("loss", layout)


def _huge_rows(f: h5py.File, folder: Path) -> None:
    loss = f["visits/loss"][:]
    _replace(f, "visits/loss", shape=(10**9,), maxshape=(None,), chunks=(8192,), dtype="f4")
    f["visits/loss"][: len(loss)] = loss


def _huge_chunk(f: h5py.File, folder: Path) -> None:
    _replace(f, "visits/margin", shape=(128,), maxshape=(None,), chunks=(1 << 29,), dtype="f4")


def _huge_contiguous(f: h5py.File, folder: Path) -> None:
    _replace(f, "layers/n_params", shape=(10**9,), dtype="int64")


def _unequal_layers(f: h5py.File, folder: Path) -> None:
    _replace(f, "layers/kind", data=np.array(["Linear"], dtype=object), dtype=h5py.string_dtype())


def _unequal_visits(f: h5py.File, folder: Path) -> None:
    f["visits/loss"].resize((100,))


def _batch_size(f: h5py.File, folder: Path) -> None:
    f["steps/batch_size"][2] = 1 << 40


def _negative_offset(f: h5py.File, folder: Path) -> None:
    f["steps/visit_start"][0] = -5


def _steps_repeat(f: h5py.File, folder: Path) -> None:
    f["steps/step"][3] = 2


def _duplicate_ids(f: h5py.File, folder: Path) -> None:
    info = f.create_group("sample_info")
    info["sample_id"] = np.array([0, 1, 1, 3])
    info["flipped"] = np.array([0, 1, 0, 0], dtype=np.int8)


def _duplicate_layer(f: h5py.File, folder: Path) -> None:
    _replace(f, "layers/name", data=np.array(["0", "0"], dtype=object), dtype=h5py.string_dtype())


def _grad_width(f: h5py.File, folder: Path) -> None:
    _replace(f, "visits/grad_sq", data=np.ones((128, 5), dtype=np.float32), maxshape=(None, 5))


def _missing_column(f: h5py.File, folder: Path) -> None:
    del f["visits/sample_id"]


def _dollar_names(f: h5py.File, folder: Path) -> None:
    names = np.array(["a$b$c", "$\\frac{1}{$"], dtype=object)
    _replace(f, "layers/name", data=names, dtype=h5py.string_dtype())
    f.attrs["config"] = json.dumps({"note": "$$\\sqrt{", "big": float("inf")})


def _bad_json(f: h5py.File, folder: Path) -> None:
    f.attrs["optimizer_hparams"] = "not json {"
    f.attrs["config"] = "[1, 2"
    f.attrs["options"] = "Infinity"


def _inf_hparams(f: h5py.File, folder: Path) -> None:
    f.attrs["optimizer_hparams"] = json.dumps({"lr": float("inf"), "momentum": float("nan")})
    f["steps/lr"][:] = np.inf


def _newer_version(f: h5py.File, folder: Path) -> None:
    f.attrs["format_version"] = 99


def _wrong_types(f: h5py.File, folder: Path) -> None:
    f.attrs["format_version"] = "one"
    f.attrs["world_size"] = "many"


def _no_status(f: h5py.File, folder: Path) -> None:
    del f["status"]


def _partial_rank(f: h5py.File, folder: Path) -> None:
    f.attrs["world_size"] = 4
    f.attrs["rank"] = 2


_MUTATIONS: dict[str, Callable[[h5py.File, Path], None]] = {
    "outside-external-storage": _outside_external_storage,
    "outside-external-strings": _outside_external_strings,
    "outside-fifo": _outside_fifo,
    "outside-external-link": _outside_external_link,
    "outside-soft-link": _outside_soft_link,
    "outside-virtual": _outside_virtual,
    "huge-rows": _huge_rows,
    "huge-chunk": _huge_chunk,
    "huge-contiguous": _huge_contiguous,
    "unequal-layers": _unequal_layers,
    "unequal-visits": _unequal_visits,
    "batch-size": _batch_size,
    "negative-offset": _negative_offset,
    "steps-repeat": _steps_repeat,
    "duplicate-ids": _duplicate_ids,
    "duplicate-layer": _duplicate_layer,
    "grad-width": _grad_width,
    "missing-column": _missing_column,
    "dollar-names": _dollar_names,
    "bad-json": _bad_json,
    "inf-hparams": _inf_hparams,
    "newer-version": _newer_version,
    "wrong-types": _wrong_types,
    "no-status": _no_status,
    "partial-rank": _partial_rank,
}


# -- the runner ------------------------------------------------------------------------
_WORKER = textwrap.dedent(
    """
    import json, sys, traceback
    from click.testing import CliRunner
    from samplescope.cli import main
    print("ready", flush=True)
    for line in sys.stdin:
        args = json.loads(line)
        result = CliRunner().invoke(main, args)
        exc = result.exception
        tb = ""
        if exc is not None and not isinstance(exc, SystemExit):
            tb = "".join(traceback.format_exception(exc))[-600:]
        reply = {"code": result.exit_code, "output": result.output[-4000:], "traceback": tb}
        print(json.dumps(reply), flush=True)
    """
)


class _Worker:
    """A Python process running CLI commands in turn: imports paid once, killable on a hang."""

    def __init__(self) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", POLARS_MAX_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        if self._line(120.0) != "ready":
            msg = "the fault-matrix worker did not start"
            raise RuntimeError(msg)

    def _line(self, timeout: float) -> str | None:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        return self.proc.stdout.readline().strip()

    def run(self, args: list[str], timeout: float) -> dict[str, object] | str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(args) + "\n")
        self.proc.stdin.flush()
        line = self._line(timeout)
        if line is None:
            return "hang"
        if not line:
            return f"crash (exit {self.proc.wait()})"
        return json.loads(line)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _judge(case: Case, reply: dict[str, object]) -> tuple[str, str]:
    output = str(reply["output"])
    lines = [line for line in output.splitlines() if not line.startswith("Warning: ")]
    if SECRET in output:
        return "read outside the file", output[:200]
    if reply["traceback"]:
        return "traceback", str(reply["traceback"])
    if reply["code"] == 0:
        if case.outside:
            return "outside object accepted", output[:200]
        return "ok", ""
    if reply["code"] == 2 and len(lines) == 1 and lines[0].startswith("Error: "):
        return "error", lines[0]
    return f"exit {reply['code']}", output[-300:]


def run_matrix(
    cases: list[Case], out_dir: Path, *, report_for: Callable[[Case], bool] | None = None
) -> list[Outcome]:
    """Run every command on every case; `report_for` picks the cases `report` also runs on."""
    outcomes: list[Outcome] = []
    worker = _Worker()
    try:
        for case in cases:
            for command, template in COMMANDS.items():
                if command == "report" and report_for is not None and not report_for(case):
                    continue
                out = out_dir / f"{case.name}.pdf"
                args = [a.format(path=case.path, out=out) for a in template]
                start = time.monotonic()
                reply = worker.run(args, TIMEOUT_S)
                seconds = time.monotonic() - start
                if isinstance(reply, str):
                    status, detail = reply, ""
                    worker.close()
                    worker = _Worker()
                else:
                    status, detail = _judge(case, reply)
                outcomes.append(Outcome(case.name, command, status, detail, seconds))
    finally:
        worker.close()
    return outcomes


def summary(outcomes: list[Outcome]) -> str:
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome.status] = counts.get(outcome.status, 0) + 1
    slowest = max(outcomes, key=lambda o: o.seconds)
    return (
        f"{len(outcomes)} runs: "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        + f"; slowest {slowest.seconds:.1f} s ({slowest.case} {slowest.command})"
    )


def main() -> int:
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("fault-corpus")
    cases = make_corpus(folder)
    outcomes = run_matrix(cases, folder)
    for outcome in outcomes:
        if outcome.status not in ("ok", "error"):
            print(f"{outcome.case} {outcome.command}: {outcome.status} {outcome.detail}")
    print(summary(outcomes))
    return 0 if all(o.status in ("ok", "error") for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
