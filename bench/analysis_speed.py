"""How fast is `samplescope.analysis` on a trace the size of a real run?

Writes a synthetic trace with h5py (60,000 samples × 50 epochs × 4 layers, batch 100: 30,000
steps, 3M visits, 12M importance rows; chunks of 8192 rows, gzip 1 + shuffle like the
recorder), then, each in a fresh process, times

  samplescope: open_trace, t.samples(), three SQL queries on the trace's views (cold: the
               first query reads its columns from HDF5; warm: the same query again);
  parquet:     DuckDB on a Parquet copy of the same tables (written beforehand, not timed).

and prints one table with the ratios and the peak resident memory of each process.

    python bench/analysis_speed.py            # full size (a few minutes)
    python bench/analysis_speed.py --small    # 6,000 samples × 10 epochs
    python bench/analysis_speed.py --downstream            # + report, findings, flag, ...
    python bench/analysis_speed.py --size 40m --downstream # 2M × 20 × 20 layers, 40M visits
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

N_LAYERS = 4
BATCH = 100
CHUNK = 8192

QUERIES = {
    "by layer": "SELECT layer, sum(importance) AS importance FROM importance "
    "GROUP BY layer ORDER BY 2 DESC",
    "by epoch × decile": "SELECT i.epoch, s.difficulty_decile, sum(i.importance) AS importance "
    "FROM importance i JOIN samples s USING (sample_id) "
    "GROUP BY 1, 2 ORDER BY 1, 2",
    "top-100 late, layer 0": "SELECT sample_id, sum(importance) AS importance FROM importance "
    "WHERE layer_index = 0 AND epoch >= {late} "
    "GROUP BY 1 ORDER BY 2 DESC LIMIT 100",
}
# What t.samples() computes, as far as plain SQL on the Parquet copy goes (a subset).
PARQUET_SAMPLES = """
SELECT sample_id, count(*) AS n_visits, arg_max(target, step) AS target,
       sum(lr_scale * lr_scale * (grad_sq[1] + grad_sq[2] + grad_sq[3] + grad_sq[4]))
           AS importance,
       sum(lr_scale * lr_scale * grad_sq[1]) AS importance_0,
       sum(lr_scale * lr_scale * grad_sq[2]) AS importance_1,
       sum(lr_scale * lr_scale * grad_sq[3]) AS importance_2,
       sum(lr_scale * lr_scale * grad_sq[4]) AS importance_3,
       sum(epoch * lr_scale * lr_scale * (grad_sq[1] + grad_sq[2] + grad_sq[3] + grad_sq[4]))
           AS when_num,
       arg_max(loss, step) AS final_loss, arg_max(correct, step) AS final_correct,
       avg(margin) AS aum, avg(p_target) AS confidence, stddev_pop(p_target) AS variability,
       avg(correct::INT) AS correctness,
       sum(lr_scale * (grad_sq[1] + grad_sq[2] + grad_sq[3] + grad_sq[4])) AS tracin_self
FROM visits GROUP BY sample_id
"""


def _dataset(group: h5py.Group, name: str, data: np.ndarray) -> None:
    group.create_dataset(
        name,
        data=data,
        maxshape=(None, *data.shape[1:]),
        chunks=(min(CHUNK, max(len(data), 1)), *data.shape[1:]),
        compression="gzip",
        compression_opts=1,
        shuffle=True,
    )


def _append(group: h5py.Group, name: str, data: np.ndarray) -> None:
    if name not in group:
        _dataset(group, name, data)
        return
    dataset = group[name]
    start = dataset.shape[0]
    dataset.resize(start + len(data), axis=0)
    dataset[start:] = data


def write_synthetic(
    path: Path, n_samples: int, n_epochs: int, n_layers: int = N_LAYERS, seed: int = 0
) -> int:
    """Write the synthetic trace one epoch at a time (so 40M visits fit in memory); return
    the uncompressed size of its datasets in bytes."""
    rng = np.random.default_rng(seed)
    steps_per_epoch = n_samples // BATCH
    difficulty = rng.gamma(2.0, 0.5, n_samples)  # per-sample hardness
    target_of = rng.integers(0, 10, n_samples)
    layer_scale = (2.0 ** np.linspace(-1, 2, n_layers)).astype(np.float32)
    size = 0
    with h5py.File(path, "w", libver="latest") as f:
        attrs = {
            "format": "samplescope-trace",
            "format_version": 1,
            "run_id": "bench",
            "rank": 0,
            "world_size": 1,
            "reduction": "mean",
            "optimizer": "SGD",
            "optimizer_hparams": '{"lr": 0.1}',
            "config": "{}",
            "model": "Synthetic",
            "options": "{}",
            "created": "",
            "samplescope_version": "bench",
            "torch_version": "",
        }
        f.attrs.update(attrs)
        f["status/closed"] = np.array([1], np.int8)
        f["status/n_errors"] = np.array([0], np.int64)
        layers = f.create_group("layers")
        strings = h5py.string_dtype()
        layers["name"] = np.array([f"layer{i}" for i in range(n_layers)], dtype=object).astype(
            strings
        )
        layers["kind"] = np.array(["Linear"] * n_layers, dtype=object).astype(strings)
        widths = [784, *np.linspace(256, 10, n_layers).astype(int).tolist()]
        layers["n_params"] = np.array(
            [widths[i] * widths[i + 1] for i in range(n_layers)], np.int64
        )
        layers["method"] = np.array(["identity"] * n_layers, dtype=object).astype(strings)
        steps_group, visits_group = f.create_group("steps"), f.create_group("visits")
        for epoch in range(n_epochs):
            n = steps_per_epoch * BATCH
            first_step = epoch * steps_per_epoch
            sample_id = rng.permutation(n_samples)[:n]
            decay = np.exp(-epoch / (0.3 * n_epochs))
            loss = (difficulty[sample_id] * decay * rng.lognormal(0, 0.3, n)).astype(np.float32)
            grad_sq = (loss[:, None] * layer_scale * rng.lognormal(0, 0.5, (n, n_layers))).astype(
                np.float32
            )
            p_target = np.exp(-loss).astype(np.float32)
            target = target_of[sample_id]
            pred = np.where(p_target > 0.4, target, (target + 1) % 10)
            step = np.arange(first_step, first_step + steps_per_epoch)
            visits = {
                "step": np.repeat(step, BATCH),
                "sample_id": sample_id,
                "loss": loss,
                "grad_sq": grad_sq,
                "target": target,
                "pred": pred,
                "p_target": p_target,
                "margin": (np.log(p_target + 1e-6) + 2).astype(np.float32),
                "input_sq": rng.uniform(50, 150, n).astype(np.float32),
            }
            steps = {
                "step": step,
                "epoch": np.full(steps_per_epoch, epoch),
                "lr": np.full(steps_per_epoch, 0.1),
                "batch_size": np.full(steps_per_epoch, BATCH),
                "loss_mean": loss.reshape(steps_per_epoch, BATCH).mean(axis=1).astype(np.float64),
                "time": 1.7e9 + step.astype(np.float64),
                "visit_start": step * BATCH,
                "n_nonfinite": np.zeros(steps_per_epoch, np.int64),
                "grad_sq": grad_sq.reshape(steps_per_epoch, BATCH, n_layers).sum(axis=1) / BATCH**2,
            }
            for group, columns in ((steps_group, steps), (visits_group, visits)):
                for column, data in columns.items():
                    _append(group, column, np.ascontiguousarray(data))
                    size += data.nbytes
    return size


def _peak_mb() -> float:
    """Peak resident memory of this process (VmHWM; ru_maxrss survives exec on Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mb() -> float:
    """Current resident memory of this process (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return _peak_mb()


def _import_all() -> float:
    """Import every library either side uses; return the resident memory after that.

    Peak memory is reported above this baseline: what the work itself costs, not the
    ~120 MB that Python, numpy, polars, pyarrow, duckdb and h5py take once loaded.
    """
    import duckdb  # noqa: F401
    import polars  # noqa: F401
    import pyarrow  # noqa: F401

    import samplescope.analysis  # noqa: F401

    return _rss_mb()


def _timed(results: dict[str, dict[str, float]], name: str, func) -> object:
    start = time.perf_counter()
    value = func()
    results[name] = {"seconds": time.perf_counter() - start, "peak_mb": _peak_mb()}
    return value


def run_samplescope(trace: Path, late: int) -> dict[str, dict[str, float]]:
    from samplescope.analysis import open_trace

    results: dict[str, dict[str, float]] = {}
    t = _timed(results, "open", lambda: open_trace(trace))
    _timed(results, "samples", t.samples)
    for name, query in QUERIES.items():
        sql = query.format(late=late)
        _timed(results, name, lambda sql=sql: t.query(sql))
        _timed(results, f"{name} (warm)", lambda sql=sql: t.query(sql))
    t.close()
    return results


def run_parquet(folder: Path, late: int) -> dict[str, dict[str, float]]:
    import duckdb

    results: dict[str, dict[str, float]] = {}

    def connect() -> duckdb.DuckDBPyConnection:
        con = duckdb.connect()
        for table in ("importance", "samples", "visits"):
            con.execute(
                f"CREATE VIEW {table} AS SELECT * FROM "
                f"read_parquet('{folder / (table + '.parquet')}')"
            ).fetchall()
        return con

    con = _timed(results, "open", connect)
    _timed(results, "samples", lambda: con.sql(PARQUET_SAMPLES).pl())
    for name, query in QUERIES.items():
        sql = query.format(late=late)
        _timed(results, name, lambda sql=sql: con.sql(sql).pl())
        _timed(results, f"{name} (warm)", lambda sql=sql: con.sql(sql).pl())
    con.close()
    return results


def write_parquet(trace: Path, folder: Path) -> None:
    import pyarrow.parquet as pq

    from samplescope.analysis import open_trace

    with open_trace(trace) as t:
        t.samples().write_parquet(folder / "samples.parquet")
        for table in ("importance", "visits"):
            # The trace's SQL cannot write files (COPY is refused): stream its rows out.
            reader = t.sql(f"SELECT * FROM {table}").to_arrow_reader(1 << 18)
            with pq.ParquetWriter(folder / f"{table}.parquet", reader.schema) as writer:
                for batch in reader:
                    writer.write_batch(batch)


# The commands built on the per-sample tables, each timed in a fresh process (its peak
# memory is its own): what `samplescope report`, `findings`, `flag`, `compare` run.
def _downstream(trace: Path, step: str) -> None:
    from samplescope.analysis import compare_traces, open_trace
    from samplescope.analysis.findings import findings
    from samplescope.analysis.flags import flag
    from samplescope.reports import render_report

    if step == "compare":
        compare_traces([trace, trace])
        return
    if step == "report":
        render_report(trace, trace.with_suffix(".pdf"), progress=False)
        return
    with open_trace(trace) as t:
        {
            "samples": t.samples,
            "sample_epochs": t.sample_epochs,
            "correlations": t.correlations,
            "groups": t.groups,
            "clusters": t.clusters,
            "flag": lambda: flag(t),
            "findings": lambda: findings(t, n_boot=200),
        }[step]()


DOWNSTREAM = (
    "samples",
    "sample_epochs",
    "correlations",
    "clusters",
    "flag",
    "findings",
    "compare",
    "report",
)


def _child(args: argparse.Namespace) -> None:
    if args.child == "downstream":
        base = _import_all()
        start = time.perf_counter()
        _downstream(Path(args.trace), args.step)
        seconds = time.perf_counter() - start
        print(json.dumps({"seconds": seconds, "peak_mb": _peak_mb(), "base_mb": base}))
        return
    runner = run_samplescope if args.child == "samplescope" else run_parquet
    target = Path(args.trace) if args.child == "samplescope" else Path(args.folder)
    base = _import_all()
    results = runner(target, args.late)
    for row in results.values():
        row["peak_mb"] -= base
    results["_baseline"] = {"seconds": 0.0, "peak_mb": base}
    print(json.dumps(results))


def _run_child(*argv: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, *argv], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


SIZES = {
    "small": (6_000, 10, N_LAYERS),
    "paper": (60_000, 50, N_LAYERS),  # 3M visits
    "40m": (2_000_000, 20, 20),  # 40M visits, ~3.3 GB: run it on a machine with room
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="6,000 samples × 10 epochs")
    parser.add_argument("--size", choices=list(SIZES), default=None, help="a preset size")
    parser.add_argument("--samples", type=int, default=None, help="number of samples")
    parser.add_argument("--epochs", type=int, default=None, help="number of epochs")
    parser.add_argument("--layers", type=int, default=None, help="number of layers")
    parser.add_argument("--keep", type=Path, default=None, help="folder to keep the files in")
    parser.add_argument(
        "--downstream",
        action="store_true",
        help="also time each command built on the per-sample tables (report, findings, "
        "flag, compare, clusters, ...) in its own process, with its peak memory",
    )
    parser.add_argument(
        "--no-parquet",
        action="store_true",
        help="skip the side-by-side DuckDB-on-Parquet run (implied for more than 4 layers)",
    )
    parser.add_argument(
        "--child", choices=["samplescope", "parquet", "downstream"], help=argparse.SUPPRESS
    )
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--trace", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--late", type=int, default=45, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    size = args.size or ("small" if args.small else "paper")
    n_samples, n_epochs, n_layers = SIZES[size]
    n_samples, n_epochs = args.samples or n_samples, args.epochs or n_epochs
    n_layers = args.layers or n_layers
    late = n_epochs - n_epochs // 10
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        trace = folder / "synthetic.h5"
        start = time.perf_counter()
        raw = write_synthetic(trace, n_samples, n_epochs, n_layers)
        print(
            f"wrote {trace.name}: {n_samples:,} samples × {n_epochs} epochs × {n_layers} "
            f"layers, {n_samples * n_epochs:,} visits, {trace.stat().st_size / 1e6:.0f} MB "
            f"on disk, {raw / 1e6:.0f} MB uncompressed "
            f"({time.perf_counter() - start:.1f} s)",
            flush=True,
        )
        if not args.no_parquet and n_layers == N_LAYERS:
            write_parquet(trace, folder)
            parquet_mb = sum(p.stat().st_size for p in folder.glob("*.parquet")) / 1e6
            print(f"wrote the Parquet copy: {parquet_mb:.0f} MB", flush=True)
            runs = {}
            for child in ("samplescope", "parquet"):
                runs[child] = _run_child(
                    "--child",
                    child,
                    "--trace",
                    str(trace),
                    "--folder",
                    str(folder),
                    "--late",
                    str(late),
                )
            _print_table(runs, raw)
        if args.downstream:
            print(f"{'command (fresh process)':<30} {'seconds':>9} {'peak MB':>9}")
            for step in DOWNSTREAM:
                row = _run_child("--child", "downstream", "--step", step, "--trace", str(trace))
                print(
                    f"{step:<30} {row['seconds']:>9.2f} {row['peak_mb']:>9.0f}  "
                    f"(imports {row['base_mb']:.0f} MB)",
                    flush=True,
                )
            print("peak MB = the process's peak resident memory (VmHWM), imports included")


def _print_table(runs: dict[str, dict[str, dict[str, float]]], raw: int) -> None:
    ours, theirs = runs["samplescope"], runs["parquet"]
    bases = ours.pop("_baseline")["peak_mb"], theirs.pop("_baseline")["peak_mb"]
    header = (
        f"{'step':<30} {'samplescope s':>13} {'parquet s':>10} {'ratio':>7} "
        f"{'peak MB':>8} {'parquet MB':>11}"
    )
    print(header)
    print("-" * len(header))
    for name in ours:
        a, b = ours[name]["seconds"], theirs[name]["seconds"]
        ratio = a / b if b > 0 else float("inf")
        print(
            f"{name:<30} {a:>13.3f} {b:>10.3f} {ratio:>6.1f}× "
            f"{ours[name]['peak_mb']:>8.0f} {theirs[name]['peak_mb']:>11.0f}"
        )
    print(
        f"peak MB = peak resident memory (VmHWM) so far, minus the process's resident memory "
        f"after importing every library (samplescope {bases[0]:.0f} MB, parquet "
        f"{bases[1]:.0f} MB)"
    )
    print(
        f"uncompressed trace data: {raw / 1e6:.0f} MB; peak of the samplescope process above "
        f"its imports: {max(r['peak_mb'] for r in ours.values()):.0f} MB "
        f"(target: under {raw / 1e6:.0f} MB)"
    )
    print(
        "samples on the parquet side is a SQL subset of t.samples() (no ranks, cartography "
        "per epoch, forgetting, GraNd/EL2N windows, sample_info)."
    )


if __name__ == "__main__":
    main()
