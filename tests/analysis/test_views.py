"""SQL views and Polars tables against numbers computed independently with numpy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tracefiles import TINY_VISITS, write_trace

from samplescope.analysis import Trace, open_trace
from samplescope.analysis import _hdf5 as hdf5

LR_SCALE = np.array([0.25] * 4 + [0.125] * 4)
GRAD = np.array(TINY_VISITS["grad_sq"], dtype=np.float64)
EPOCH = np.array([0] * 4 + [1] * 4)
IMPORTANCE = LR_SCALE[:, None] ** 2 * GRAD  # [visits, layers]


def test_importance_view_by_layer(tiny: Trace) -> None:
    rows = tiny.sql(
        "SELECT layer_index, sum(importance), sum(grad_sq), "
        "sum(importance_per_param) FROM importance GROUP BY 1 ORDER BY 1"
    ).fetchall()
    np.testing.assert_allclose([r[1] for r in rows], IMPORTANCE.sum(axis=0))
    np.testing.assert_allclose([r[2] for r in rows], GRAD.sum(axis=0))
    np.testing.assert_allclose([r[3] for r in rows], IMPORTANCE.sum(axis=0) / [4, 2])


def test_importance_view_by_epoch_and_names(tiny: Trace) -> None:
    frame = tiny.query(
        "SELECT epoch, layer, sum(importance) AS imp FROM importance "
        "WHERE epoch = ? GROUP BY ALL ORDER BY layer",
        [1],
    )
    assert frame["layer"].to_list() == ["enc", "head"]
    np.testing.assert_allclose(frame["imp"].to_list(), IMPORTANCE[EPOCH == 1].sum(axis=0))
    assert tiny.sql("SELECT count(*) FROM importance").fetchall() == [(16,)]


def test_importance_polars_matches_sql(tiny: Trace) -> None:
    lazy = (
        tiny.table("importance")
        .group_by("sample_id")
        .agg(pl.col("importance").sum())
        .sort("sample_id")
        .collect()
    )
    sql = tiny.query(
        "SELECT sample_id, sum(importance) AS importance FROM importance GROUP BY 1 ORDER BY 1"
    )
    np.testing.assert_allclose(lazy["importance"].to_list(), sql["importance"].to_list())
    np.testing.assert_allclose(
        sql["importance"].to_list(), tiny.samples().sort("sample_id")["importance"].to_list()
    )


def test_visits_and_steps_views(tiny: Trace) -> None:
    visits = tiny.query("SELECT * FROM visits ORDER BY step, sample_id")
    assert visits.height == 8
    assert visits["correct"].to_list() == [False, True, True, False, True, True, False, True]
    np.testing.assert_allclose(sorted(visits["lr_scale"].to_list()), sorted(LR_SCALE))
    steps = tiny.query("SELECT step, epoch, lr, batch_size, loss_mean FROM steps ORDER BY 1")
    assert steps["epoch"].to_list() == [0, 0, 1, 1]
    np.testing.assert_allclose(steps["loss_mean"].to_list(), [1.5, 1.75, 2.0, 0.15])


def test_every_table_is_queryable(tiny: Trace) -> None:
    for name in tiny.table_names:
        assert tiny.query(f"SELECT count(*) AS n FROM {name}")["n"].item() > 0, name
        assert tiny.table(name).collect().height > 0, name


def test_derived_tables_agree_between_sql_and_polars(tiny: Trace) -> None:
    for name in ("samples", "sample_epochs", "groups", "clusters", "correlations"):
        sql = tiny.query(f"SELECT * FROM {name}")
        assert sql.shape == tiny.table(name).collect().shape, name


def test_sql_params_and_relation(tiny: Trace) -> None:
    relation = tiny.sql(
        "SELECT sample_id FROM samples WHERE importance > ? ORDER BY 1", params=[0.3]
    )
    assert relation.pl()["sample_id"].to_list() == [2, 3]


class _Reads:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, str, int, int | None]] = []
        original = hdf5.Shard.read

        def read(
            shard: hdf5.Shard, group: str, column: str, start: int = 0, stop: int | None = None
        ) -> np.ndarray:
            self.calls.append((group, column, start, stop))
            return original(shard, group, column, start, stop)

        monkeypatch.setattr(hdf5.Shard, "read", read)

    def visits(self) -> set[tuple[str, int, int | None]]:
        return {(c, a, b) for g, c, a, b in self.calls if g == "visits"}


def test_epoch_filter_reads_only_that_epochs_rows(
    tiny_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = _Reads(monkeypatch)
    with open_trace(tiny_path) as trace:
        frame = trace.table("visits").filter(pl.col("epoch") == 1).select("loss").collect()
    assert frame["loss"].to_list() == pytest.approx([2.5, 1.5, 0.2, 0.1])
    assert reads.visits() == {("loss", 4, 8)}


def test_sql_reads_only_named_columns(tiny_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads = _Reads(monkeypatch)
    with open_trace(tiny_path) as trace:
        reads.calls.clear()
        trace.query("SELECT avg(loss) FROM visits")
        assert {c for c, _, _ in reads.visits()} == {"step", "loss"}
        trace.query("SELECT layer, sum(importance) FROM importance GROUP BY 1")
        assert {c for c, _, _ in reads.visits()} == {"step", "loss", "grad_sq"}


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    n_layers=st.integers(1, 3),
    batches=st.lists(st.integers(1, 4), min_size=1, max_size=6),
    reduction=st.sampled_from(["mean", "sum"]),
    seed=st.integers(0, 2**16),
)
def test_random_traces_agree_with_numpy(
    tmp_path: Path, n_layers: int, batches: list[int], reduction: str, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    n_steps = len(batches)
    n_visits = sum(batches)
    epoch = np.sort(rng.integers(0, 3, n_steps))
    lr = rng.uniform(0.01, 1.0, n_steps)
    step_of_visit = np.repeat(np.arange(n_steps), batches)
    grad = rng.uniform(0, 10, (n_visits, n_layers)).astype(np.float32)
    sample_id = rng.integers(0, 5, n_visits)
    path = write_trace(
        tmp_path / f"r{seed}.h5",
        layers=[f"l{i}" for i in range(n_layers)],
        steps={"step": np.arange(n_steps), "epoch": epoch, "lr": lr, "batch_size": batches},
        visits={
            "step": step_of_visit,
            "sample_id": sample_id,
            "loss": rng.uniform(0, 3, n_visits),
            "grad_sq": grad,
        },
        reduction=reduction,
    )
    scale = lr if reduction == "sum" else lr / np.asarray(batches)
    importance = (scale[step_of_visit, None] ** 2) * grad.astype(np.float64)
    with open_trace(path) as trace:
        by_layer = trace.sql(
            "SELECT layer_index, sum(importance) FROM importance GROUP BY 1 ORDER BY 1"
        ).fetchall()
        np.testing.assert_allclose([r[1] for r in by_layer], importance.sum(axis=0), rtol=1e-6)
        samples = trace.samples().sort("sample_id")
        expected = [importance[sample_id == s].sum() for s in samples["sample_id"]]
        np.testing.assert_allclose(samples["importance"].to_list(), expected, rtol=1e-6)
        shares = samples.select(pl.sum_horizontal(pl.col("^share_.*$"))).to_series()
        assert all(abs(x - 1) < 1e-9 for x in shares.drop_nulls())
        by_epoch = trace.query(
            "SELECT epoch, sum(importance) AS s FROM importance GROUP BY 1 ORDER BY 1"
        )
        for e, s in by_epoch.iter_rows():
            assert s == pytest.approx(importance[epoch[step_of_visit] == e].sum(), rel=1e-6)


def test_long_traces_keep_step_epoch_and_sample_numbers(tmp_path: Path) -> None:
    """Steps, epochs and ids past every narrow integer type come back whole through SQL.

    40,000 steps of one visit each, 400 epochs and 40,000 sample ids: past int8 (a source
    once stored steps as TINYINT) and int16 (the narrowest type the source uses now).
    """
    n = 40_000
    steps = np.arange(n)
    epoch = steps // 100
    sample_id = (steps * 7919) % n  # every id once, not in step order
    grad = (1.0 + steps % 5).astype(np.float32)[:, None]
    path = write_trace(
        tmp_path / "long.h5",
        layers=["only"],
        steps={
            "step": steps,
            "epoch": epoch,
            "lr": np.full(n, 0.5),
            "batch_size": np.ones(n, np.int64),
        },
        visits={"step": steps, "sample_id": sample_id, "loss": np.ones(n), "grad_sq": grad},
    )
    with open_trace(path) as trace:
        for table in ("steps", "visits", "importance"):
            row = trace.sql(
                f"SELECT count(DISTINCT step), max(step), max(epoch), sum(step), "
                f"typeof(max(step)) FROM {table}"
            ).fetchall()
            assert row == [(n, n - 1, 399, n * (n - 1) // 2, "BIGINT")], table
        # A product that overflows a 16-bit column, were the view to expose one.
        assert trace.sql("SELECT max(step * step) FROM visits").fetchall() == [((n - 1) ** 2,)]
        ids = trace.sql(
            "SELECT sample_id, typeof(sample_id) FROM visits WHERE step = 300 OR step = 39999 "
            "ORDER BY step"
        ).fetchall()
        assert ids == [(300 * 7919 % n, "BIGINT"), (39999 * 7919 % n, "BIGINT")]
        by_epoch = trace.sql(
            "SELECT epoch, count(*), sum(grad_sq) FROM importance GROUP BY 1 ORDER BY 1"
        ).fetchall()
        assert [e for e, _, _ in by_epoch] == list(range(400))
        assert all(c == 100 and s == 300.0 for _, c, s in by_epoch)
