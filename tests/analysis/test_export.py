"""`export_trace`: the Parquet folder, read by DuckDB with the exported views, answers the
same SQL as `Trace.sql` on the trace itself."""

from __future__ import annotations

import json
import math
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from tracefiles import write_tiny_trace, write_trace

from samplescope.analysis import TraceError, TraceFormatError, open_trace
from samplescope.analysis import export as export_module
from samplescope.analysis.export import ExportError, export_trace, open_export
from samplescope.cli import main

# Each query runs unchanged on the trace (Trace.sql) and on the export (open_export).
QUERIES = [
    "SELECT sample_id, epoch, layer_index, layer, sum(importance) AS imp, "
    "sum(importance_per_param) AS per_param, sum(grad_sq) AS g, count(*) AS n "
    "FROM importance GROUP BY ALL ORDER BY ALL",
    "SELECT layer, sum(importance) AS imp, avg(alignment) AS al FROM importance "
    "GROUP BY layer ORDER BY layer",
    "SELECT l.kind, l.n_params, i.epoch, sum(i.importance) AS imp FROM importance i "
    "JOIN layers l USING (layer_index) GROUP BY ALL ORDER BY ALL",
    "SELECT sample_id, sum(importance) AS imp FROM importance WHERE epoch >= 1 "
    "GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 5",
    "SELECT epoch, count(*) AS n, avg(loss) AS loss, count(target) AS with_outputs, "
    "sum(CAST(correct AS INTEGER)) AS n_correct, avg(p_target) AS p, avg(margin) AS m, "
    "sum(lr_scale) AS scale, min(step) AS first, max(sample_id) AS top "
    "FROM visits GROUP BY epoch ORDER BY epoch",
    "SELECT rank, count(*) AS n FROM visits GROUP BY rank ORDER BY rank",
    "SELECT epoch, count(*) AS n, sum(lr) AS lr, sum(loss_mean) AS loss FROM steps "
    "GROUP BY 1 ORDER BY 1",
    "SELECT split, epoch, loss, accuracy FROM evals ORDER BY ALL",
]


def _close(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-300)
    return a == b


def _assert_same(ours: list[tuple], theirs: list[tuple], query: str) -> None:
    assert len(ours) == len(theirs), query
    for row_a, row_b in zip(ours, theirs, strict=True):
        assert len(row_a) == len(row_b), query
        assert all(_close(a, b) for a, b in zip(row_a, row_b, strict=True)), (
            query,
            row_a,
            row_b,
        )


def _random_trace(path: Path, *, rank: int = 0, world_size: int = 1, seed: int = 0) -> Path:
    """3 layers, 20 samples, 3 epochs of 5 steps of batch 4 (the first step of epoch 2 without
    outputs), alignment, a learning rate that changes every step."""
    rng = np.random.default_rng(seed)
    n_steps, batch = 15, 4
    n = n_steps * batch
    target = rng.integers(0, 3, n)
    target[40:44] = -1  # format v2's missing outputs: one step that passed no logits
    return write_trace(
        path,
        layers={
            "name": ["conv", "fc1", "fc2"],
            "kind": ["Conv2d", "Linear", "Linear"],
            "n_params": [30, 120, 9],
        },
        steps={
            "step": np.arange(n_steps),
            "epoch": np.repeat([0, 1, 2], 5),
            "lr": 0.1 / (1 + np.arange(n_steps)),
            "batch_size": np.full(n_steps, batch),
        },
        visits={
            "step": np.repeat(np.arange(n_steps), batch),
            "sample_id": np.concatenate([rng.permutation(20) for _ in range(3)]) + 100 * rank,
            "loss": rng.lognormal(0, 1, n).astype(np.float32),
            "grad_sq": rng.lognormal(0, 2, (n, 3)).astype(np.float32),
            "alignment": rng.normal(0, 1, (n, 3)).astype(np.float32),
            "target": target,
            "pred": np.where(target < 0, -1, rng.integers(0, 3, n)),
            "p_target": np.where(target < 0, np.nan, rng.uniform(0, 1, n)).astype(np.float32),
            "margin": np.where(target < 0, np.nan, rng.normal(0, 1, n)).astype(np.float32),
        },
        evals={
            "step": [5, 10],
            "epoch": [0, 1],
            "split": ["test", "test"],
            "loss": [1.0, 0.5],
            "accuracy": [0.5, 0.7],
        },
        rank=rank,
        world_size=world_size,
        run_id="run1",
    )


def _compare(source: object, folder: Path) -> None:
    with open_trace(source) as trace:  # type: ignore[arg-type]
        expected = [trace.sql(q).fetchall() for q in QUERIES]
    con = open_export(folder, threads=1)
    try:
        for query, rows in zip(QUERIES, expected, strict=True):
            _assert_same(con.sql(query).fetchall(), rows, query)
    finally:
        con.close()


def test_duckdb_over_the_export_answers_as_trace_sql(tmp_path: Path) -> None:
    trace = _random_trace(tmp_path / "run.h5")
    # Small blocks and files: several row groups and part files per partition.
    result = export_trace(trace, tmp_path / "out", block_rows=6, file_rows=10)
    _compare(trace, tmp_path / "out")
    parts = sorted(
        p.relative_to(tmp_path / "out").as_posix()
        for p in (tmp_path / "out" / "visits").rglob("*.parquet")
    )
    assert parts[0] == "visits/epoch=0/rank=0/part-00000.parquet"
    assert {p.split("/")[1] for p in parts} == {"epoch=0", "epoch=1", "epoch=2"}
    assert len(parts) == 6  # 20 visits an epoch, 10 a file
    file = pq.ParquetFile(tmp_path / "out" / parts[0])
    assert file.metadata.num_row_groups == 3  # blocks of whole steps, at most 6 visits
    assert file.metadata.row_group(0).column(0).compression == "ZSTD"
    names = file.schema_arrow.names
    assert names[-6:] == [f"grad_sq_{i}" for i in range(3)] + [f"alignment_{i}" for i in range(3)]
    # Hive partitioning: epoch and rank come from the folder names.
    assert "epoch" not in names
    assert "rank" not in names
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest == result.manifest
    assert manifest["format"] == "samplescope-export"
    assert manifest["trace_format_version"] == 1
    assert manifest["tables"]["visits"]["rows"] == 60
    assert manifest["views"]["importance"] == "views/importance.sql"


def test_tiny_trace_export_matches_and_sample_info_is_kept(tiny_path: Path, tmp_path: Path) -> None:
    export_trace(tiny_path, tmp_path / "out")
    _compare(tiny_path, tmp_path / "out")
    con = open_export(tmp_path / "out")
    assert con.sql("SELECT sample_id, flipped FROM sample_info ORDER BY 1").fetchall() == [
        (0, 0),
        (1, 1),
        (2, 0),
        (3, 0),
    ]
    # Hand-computed (tests/analysis/test_views.py): lr·s = 0.25 then 0.125.
    assert con.sql("SELECT sum(importance) FROM importance WHERE sample_id = 0").fetchall() == [
        (0.0625 * 4 + 0.015625 * 0,)
    ]


def test_rollup_equals_importance_grouped_by_sample_and_epoch(tmp_path: Path) -> None:
    trace = _random_trace(tmp_path / "run.h5")
    export_trace(trace, tmp_path / "out")
    with open_trace(trace) as t:
        expected = t.sql(
            "SELECT sample_id, i.epoch, sum(importance) AS imp, "
            "sum(importance) FILTER (WHERE layer_index = 1) AS imp1, "
            "sum(i.grad_sq) FILTER (WHERE layer_index = 2) AS g2, count(*) / 3 AS n, "
            "avg(v.loss) AS loss FROM importance i JOIN visits v USING (step, sample_id) "
            "GROUP BY ALL ORDER BY ALL"
        ).fetchall()
    con = open_export(tmp_path / "out")
    rows = con.sql(
        "SELECT sample_id, epoch, importance, importance_1, grad_sq_2, n_visits, loss_mean "
        "FROM sample_epoch_totals ORDER BY ALL"
    ).fetchall()
    _assert_same(rows, [(*r[:5], float(r[5]), r[6]) for r in expected], "rollup")
    assert all(isinstance(r[5], int) for r in rows)


def test_views_sql_runs_from_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    export_trace(write_tiny_trace(tmp_path / "t.h5"), tmp_path / "out")
    monkeypatch.chdir(tmp_path / "out")
    con = duckdb.connect()
    con.execute(Path("views.sql").read_text())
    assert con.sql("SELECT count(*) FROM importance").fetchall() == [(16,)]
    # importance.sql alone is a plain SELECT over a table named visits.
    body = Path("views/importance.sql").read_text()
    assert con.sql(f"SELECT count(DISTINCT layer) FROM ({body})").fetchall() == [(2,)]


def test_shards_export_to_rank_partitions(tmp_path: Path) -> None:
    shards = [
        _random_trace(tmp_path / f"run.rank{r}.h5", rank=r, world_size=2, seed=r) for r in (0, 1)
    ]
    export_trace(str(tmp_path / "run.rank*.h5"), tmp_path / "out")
    ranks = sorted(p.name for p in (tmp_path / "out" / "visits").glob("epoch=*/rank=*"))
    assert ranks == ["rank=0"] * 3 + ["rank=1"] * 3
    _compare(shards, tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["ranks"] == [0, 1]
    assert manifest["warnings"] == []


def test_partial_run_keeps_the_warning(tmp_path: Path) -> None:
    shard = _random_trace(tmp_path / "run.rank1.h5", rank=1, world_size=2)
    manifest = export_trace(shard, tmp_path / "out").manifest
    assert [p.name for p in (tmp_path / "out" / "visits").glob("*/*")] == ["rank=1"] * 3
    assert "partial run" in manifest["warnings"][0]


def test_a_trace_without_visits_exports_empty_tables(tmp_path: Path) -> None:
    trace = write_trace(
        tmp_path / "empty.h5",
        layers=["a", "b"],
        steps={"step": [], "epoch": [], "lr": [], "batch_size": np.zeros(0, np.int64)},
        visits={
            "step": np.zeros(0, np.int64),
            "sample_id": np.zeros(0, np.int64),
            "loss": np.zeros(0, np.float32),
            "grad_sq": np.zeros((0, 2), np.float32),
        },
    )
    export_trace(trace, tmp_path / "out")
    con = open_export(tmp_path / "out")
    for table in ("visits", "importance", "sample_epoch_totals", "steps"):
        assert con.sql(f"SELECT count(*) FROM {table}").fetchall() == [(0,)], table


def test_existing_folder_is_refused_and_kept(tmp_path: Path) -> None:
    trace = write_tiny_trace(tmp_path / "t.h5")
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(ExportError, match="exists and is not empty; pass --overwrite"):
        export_trace(trace, out)
    with pytest.raises(ExportError, match="is not a samplescope export"):
        export_trace(trace, out, overwrite=True)
    assert (out / "mine.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "t.h5"]
    with pytest.raises(ExportError, match="is not a folder"):
        export_trace(trace, trace)
    with pytest.raises(ExportError, match="does not exist"):
        export_trace(trace, tmp_path / "no" / "out")


def test_overwrite_replaces_an_export(tmp_path: Path) -> None:
    out = tmp_path / "out"
    export_trace(write_tiny_trace(tmp_path / "t.h5"), out)
    export_trace(_random_trace(tmp_path / "r.h5"), out, overwrite=True)
    _compare(tmp_path / "r.h5", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "r.h5", "t.h5"]


def test_an_interrupted_export_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trace = write_tiny_trace(tmp_path / "t.h5")

    def stop(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(export_module, "_write_rollup", stop)
    with pytest.raises(KeyboardInterrupt):
        export_trace(trace, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.h5"]


def test_bad_traces_are_refused_before_writing(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="no such trace file"):
        export_trace(tmp_path / "missing.h5", tmp_path / "out")
    (tmp_path / "notes.h5").write_text("not hdf5")
    with pytest.raises(TraceFormatError, match="not an HDF5 file"):
        export_trace(tmp_path / "notes.h5", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.h5"]
    with pytest.raises(ExportError, match="holds no samplescope export"):
        open_export(tmp_path)


def test_cli_export_and_errors(tmp_path: Path) -> None:
    trace = str(write_tiny_trace(tmp_path / "t.h5"))
    out = str(tmp_path / "out")
    runner = CliRunner()
    result = runner.invoke(main, ["export", trace, out])
    assert result.exit_code == 0, result.output
    assert result.output == (
        f"wrote {out}: 8 visits in 2 files, 4 other tables, views in {out}/views.sql\n"
    )
    again = runner.invoke(main, ["export", trace, out])
    assert again.exit_code == 2
    assert again.output == (
        f"Error: {out} exists and is not empty; pass --overwrite to replace an export\n"
    )
    assert runner.invoke(main, ["export", trace, out, "--overwrite"]).exit_code == 0
    missing = runner.invoke(main, ["export", str(tmp_path / "nope.h5"), str(tmp_path / "o2")])
    assert missing.exit_code == 2
    assert missing.output == f"Error: no such trace file: {tmp_path / 'nope.h5'}\n"


def test_checkpoints_export_with_one_column_per_layer(tmp_path: Path) -> None:
    from test_checkpoint_scores import CKPT, _with_checkpoints

    trace = _with_checkpoints(tmp_path / "t.h5")
    export_trace(trace, tmp_path / "out")
    con = open_export(tmp_path / "out")
    rows = con.sql(
        "SELECT grad_sq_0, grad_sq_1, target FROM checkpoints ORDER BY checkpoint, sample_id"
    ).fetchall()
    assert [r[:2] for r in rows] == [tuple(float(v) for v in g) for g in CKPT["grad_sq"]]
    assert rows[-1][2] is None  # the missing output stays missing
    query = (
        "SELECT checkpoint, sum(grand) AS g, count(el2n) AS n FROM checkpoints "
        "GROUP BY 1 ORDER BY 1"
    )
    with open_trace(trace) as t:
        _assert_same(con.sql(query).fetchall(), t.sql(query).fetchall(), query)


def test_cli_help_has_an_example() -> None:
    result = CliRunner().invoke(main, ["export", "--help"])
    assert result.exit_code == 0
    assert "Example: samplescope export runs/exp1.h5 exp1-parquet/" in result.output
