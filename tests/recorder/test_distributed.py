"""DDP and FSDP2 on two CPU ranks (gloo on loopback) against one process in float64.

Each job (`dist_worker.py`) runs all its loops in one pair of processes; the reference is
the same model, seed, optimizer and steps in this process on the concatenated batches.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from dist_harness import run_ranks
from dist_worker import DDP_LOOPS, FSDP_LOOPS, WORLD, run_reference

from samplescope.analysis import open_trace

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("distributed")]


@pytest.fixture(scope="module")
def ddp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    run_ranks("ddp", out)
    for loop in DDP_LOOPS:
        run_reference(loop, out)
    return out


@pytest.fixture(scope="module")
def fsdp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    run_ranks("fsdp", out)
    for loop in FSDP_LOOPS:
        run_reference(loop, out)
    return out


def _read(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {
            "step": f["visits/step"][:],
            "sample_id": f["visits/sample_id"][:],
            "grad_sq": f["visits/grad_sq"][:],
            "alignment": f["visits/alignment"][:],
            "steps_grad_sq": f["steps/grad_sq"][:],
            "loss_mean": f["steps/loss_mean"][:],
        }


def _sharded(out: Path, loop: str) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """The reference, and every rank's visits sorted as the reference's (step, sample)."""
    ref = _read(out / f"{loop}.ref.h5")
    shards = [_read(out / f"{loop}.rank{r}.h5") for r in range(WORLD)]
    return ref, shards


def _visits_as_one(shards: list[dict[str, np.ndarray]], column: str) -> np.ndarray:
    step = np.concatenate([s["step"] for s in shards])
    ids = np.concatenate([s["sample_id"] for s in shards])
    values = np.concatenate([s[column] for s in shards])
    return values[np.lexsort((ids, step))]


def _ref_sorted(ref: dict[str, np.ndarray], column: str) -> np.ndarray:
    return ref[column][np.lexsort((ref["sample_id"], ref["step"]))]


@pytest.mark.parametrize("loop", DDP_LOOPS)
def test_ddp_per_sample_norms_equal_one_process(ddp_dir: Path, loop: str) -> None:
    ref, shards = _sharded(ddp_dir, loop)
    got = _visits_as_one(shards, "grad_sq")
    want = _ref_sorted(ref, "grad_sq")
    assert got.shape == want.shape == (4 * 8, 3)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("loop", DDP_LOOPS)
def test_ddp_batch_gradient_is_the_reduced_one(ddp_dir: Path, loop: str) -> None:
    """/steps/grad_sq and alignment use G averaged over ranks, in every loop shape
    (with zero_grad(set_to_none=False) and under no_sync too)."""
    ref, shards = _sharded(ddp_dir, loop)
    for shard in shards:
        np.testing.assert_allclose(shard["steps_grad_sq"], ref["steps_grad_sq"], rtol=1e-6)
    np.testing.assert_allclose(
        _visits_as_one(shards, "alignment"), _ref_sorted(ref, "alignment"), rtol=1e-6, atol=1e-9
    )


def test_ddp_shards_read_as_one_trace_with_global_steps(ddp_dir: Path) -> None:
    ref = _read(ddp_dir / "ddp.ref.h5")
    with open_trace(str(ddp_dir / "ddp.rank*.h5")) as trace:
        steps = trace.table("steps").collect().sort("step")
        samples = trace.samples().sort("sample_id")
    with open_trace(ddp_dir / "ddp.ref.h5") as trace:
        ref_samples = trace.samples().sort("sample_id")
    assert steps["batch_size"].to_list() == [8] * len(ref["loss_mean"])
    np.testing.assert_allclose(steps["loss_mean"].to_numpy(), ref["loss_mean"], rtol=1e-6)
    np.testing.assert_allclose(
        samples["importance"].to_numpy(), ref_samples["importance"].to_numpy(), rtol=1e-5
    )


@pytest.mark.parametrize("loop", FSDP_LOOPS)
def test_fsdp2_norms_alignment_and_batch_gradient_equal_one_process(
    fsdp_dir: Path, loop: str
) -> None:
    """Closed-form layers, a fallback layer (Scale), alignment and /steps/grad_sq."""
    ref, shards = _sharded(fsdp_dir, loop)
    np.testing.assert_array_equal(_visits_as_one(shards, "grad_sq"), _ref_sorted(ref, "grad_sq"))
    for column in ("grad_sq", "alignment"):
        np.testing.assert_allclose(
            _visits_as_one(shards, column), _ref_sorted(ref, column), rtol=1e-6, atol=1e-9
        )
    for shard in shards:
        assert (shard["steps_grad_sq"] > 0).all()
        np.testing.assert_allclose(shard["steps_grad_sq"], ref["steps_grad_sq"], rtol=1e-6)


def test_tensor_parallel_is_refused_at_entry(fsdp_dir: Path) -> None:
    for rank in range(WORLD):
        message = (fsdp_dir / f"tp.rank{rank}.txt").read_text()
        assert "parameter '0.weight' is a DTensor" in message
        assert "docs/recorder.md" in message
        assert "\n" not in message


def test_ddp_refuses_what_it_cannot_measure(ddp_dir: Path) -> None:
    """Under a group of two: the inner module instead of the DDP wrapper (G would silently
    be the rank's own), and rank/world_size that are not the group's."""
    for rank in range(WORLD):
        lines = (ddp_dir / f"refusals.rank{rank}.txt").read_text().splitlines()
        assert lines[0].startswith("bare_model: Sequential runs in a torch.distributed group")
        assert "pass the DDP wrapper itself as model" in lines[0]
        assert lines[1] == (
            f"wrong_rank: Recorder(rank=0, world_size=1) but this process is rank {rank} of 2: "
            "pass rank=dist.get_rank(), world_size=dist.get_world_size() (and one path per rank)"
        )
