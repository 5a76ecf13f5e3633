"""The framework adapters under DDP: 2 gloo ranks on loopback, gradient accumulation K=2.

Each job (`dist_adapters_worker.py`) trains a tiny float64 model under DDP, unrecorded and
through the adapter, in one pair of processes launched as torchrun would (the framework
starts the process group). Checked here: the parameters are bit-identical to the
unrecorded DDP run's, the shards read as one trace of the global optimizer steps, and the
per-sample norms and the step's batch gradient equal a one-process run of the adapter over
the same samples per step.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from dist_harness import run_ranks

from samplescope.analysis import open_trace

pytest.importorskip("accelerate")

import dist_adapters_worker as worker

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("distributed")]

WORKER = Path(worker.__file__)
GLOBAL_BATCH = worker.WORLD * worker.BATCH * worker.K  # samples per optimizer step


def _read(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        out = {f"steps/{k}": f["steps"][k][:] for k in ("step", "grad_sq", "batch_size")}
        out.update({k: f["visits"][k][:] for k in ("step", "micro", "sample_id", "grad_sq")})
    return out


def _by_visit(parts: list[dict[str, np.ndarray]], column: str) -> np.ndarray:
    """A column of all visits, sorted by (step, sample id)."""
    step = np.concatenate([p["step"] for p in parts])
    ids = np.concatenate([p["sample_id"] for p in parts])
    values = np.concatenate([p[column] for p in parts])
    return values[np.lexsort((ids, step))]


def _run(job: str, tmp_path_factory: pytest.TempPathFactory, **env: str) -> Path:
    out = tmp_path_factory.mktemp(job)
    run_ranks(job, out, worker=WORKER, env=env)
    return out


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    out = _run("hf", tmp_path_factory)
    worker.hf_reference(out)
    return out


@pytest.fixture(scope="module")
def accelerate_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = _run("accelerate", tmp_path_factory)
    worker.accelerate_reference(out)
    return out


@pytest.fixture(scope="module")
def lightning_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("lightning.pytorch")
    # TORCHELASTIC_RUN_ID: Lightning then takes the processes as launched (torchrun's
    # variables) instead of starting its own.
    out = _run("lightning", tmp_path_factory, TORCHELASTIC_RUN_ID="samplescope-test")
    shards = [_read(out / f"lightning.rank{r}.h5") for r in range(worker.WORLD)]
    micro_batches = []
    for step in range(worker.STEPS):
        for micro in range(worker.K):
            rows = [
                s["sample_id"][(s["step"] == step) & (s["micro"] == micro)] - worker.ID_OFFSET
                for s in shards
            ]
            micro_batches.append(np.concatenate(rows).tolist())
    worker.lightning_reference(out, micro_batches)
    return out


@pytest.fixture
def run_dir(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(f"{request.param}_dir")


JOBS = pytest.mark.parametrize(
    ("job", "run_dir"), [(j, j) for j in worker.JOBS], indirect=["run_dir"]
)


@JOBS
def test_parameters_are_bit_identical_to_the_unrecorded_ddp_run(job: str, run_dir: Path) -> None:
    start = (worker.bert() if job == "hf" else worker.classifier()).state_dict()
    for rank in range(worker.WORLD):
        params = torch.load(run_dir / f"{job}.params{rank}.pt")
        plain, recorded = params["plain"], params["recorded"]
        assert plain.keys() == recorded.keys()
        for name, value in plain.items():
            assert torch.equal(value, recorded[name]), f"rank {rank}: {name} differs"
        assert any(not torch.equal(v, start[n]) for n, v in plain.items())  # it trained


@JOBS
def test_per_sample_norms_and_batch_gradient_equal_one_process(job: str, run_dir: Path) -> None:
    shards = [_read(run_dir / f"{job}.rank{r}.h5") for r in range(worker.WORLD)]
    ref = _read(run_dir / f"{job}.ref.h5")
    want_ids = _by_visit([ref], "sample_id")
    assert want_ids.size == worker.STEPS * GLOBAL_BATCH
    np.testing.assert_array_equal(_by_visit(shards, "sample_id"), want_ids)
    np.testing.assert_array_equal(_by_visit(shards, "step"), _by_visit([ref], "step"))
    np.testing.assert_array_equal(_by_visit(shards, "grad_sq"), _by_visit([ref], "grad_sq"))
    for shard in shards:
        # Each rank's /steps row: its own K·B samples, the all-reduced accumulated gradient.
        assert shard["steps/batch_size"].tolist() == [GLOBAL_BATCH // worker.WORLD] * worker.STEPS
        np.testing.assert_allclose(shard["steps/grad_sq"], ref["steps/grad_sq"], rtol=1e-6)


@JOBS
def test_shards_read_as_one_trace_of_the_global_steps(job: str, run_dir: Path) -> None:
    with open_trace(str(run_dir / f"{job}.rank*.h5")) as trace:
        assert trace.meta["n_steps"] == worker.STEPS
        steps = trace.table("steps").collect().sort("step")
        samples = trace.samples().sort("sample_id")
    with open_trace(run_dir / f"{job}.ref.h5") as trace:
        ref = trace.samples().sort("sample_id")
    assert steps["batch_size"].to_list() == [GLOBAL_BATCH] * worker.STEPS
    assert samples["sample_id"].to_list() == list(
        range(worker.ID_OFFSET, worker.ID_OFFSET + worker.N_SAMPLES)
    )
    for column in ("importance", "final_loss"):
        np.testing.assert_allclose(samples[column], ref[column], rtol=1e-5, err_msg=column)


def test_hf_trainer_logs_the_unrecorded_runs_training_loss(hf_dir: Path) -> None:
    """With accumulation the logged loss is divided by K once, as the stock Trainer does."""
    losses = torch.load(hf_dir / "hf.params0.pt")["train_loss"]
    assert losses["recorded"] == pytest.approx(losses["plain"], rel=1e-9)
