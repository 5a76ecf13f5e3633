"""Beyond one machine: export a trace to Parquet, then run the same SQL on DuckDB and Spark.

Writes the synthetic trace of bench/analysis_speed.py (4 layers, batch 100), then, each step
in a fresh process so peak memory is its own:

  export:   `export_trace` (HDF5 → Hive-partitioned Parquet), time and peak RSS;
  trace:    the GROUP BY queries below through `Trace.sql` on the .h5 (cold, then warm);
  duckdb:   the same SQL text on DuckDB over the exported folder (`open_export`);
  spark:    the same SQL text on Spark (pyspark, local mode) with the exported views,
            its results checked against DuckDB's (relative 1e-12).

pyspark is optional (`pip install samplescope[bench]`, needs java); without it the Spark
step says so and the rest still runs.

    python bench/spark_export.py                        # 100,000 samples × 40 epochs
    python bench/spark_export.py --samples 20000 --epochs 10
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from analysis_speed import N_LAYERS, _peak_mb, write_synthetic

QUERIES = {
    "importance by layer × epoch": "SELECT layer, epoch, sum(importance) AS importance, "
    "count(*) AS n FROM importance GROUP BY layer, epoch ORDER BY layer, epoch",
    "top-100 samples, late epochs": "SELECT sample_id, sum(importance) AS importance "
    "FROM importance WHERE epoch >= {late} GROUP BY sample_id "
    "ORDER BY importance DESC, sample_id LIMIT 100",
    "loss by epoch (visits)": "SELECT epoch, avg(loss) AS loss, count(*) AS n FROM visits "
    "GROUP BY epoch ORDER BY epoch",
}


def _timed(results: dict, name: str, func) -> object:
    start = time.perf_counter()
    value = func()
    results[name] = {"seconds": time.perf_counter() - start, "peak_mb": _peak_mb()}
    return value


def child_export(trace: Path, folder: Path) -> dict:
    from samplescope.analysis.export import export_trace

    results: dict = {}
    _timed(results, "export", lambda: export_trace(trace, folder, threads=1))
    results["parquet_mb"] = sum(p.stat().st_size for p in folder.rglob("*.parquet")) / 1e6
    return results


def child_trace(trace: Path, late: int) -> dict:
    from samplescope.analysis import open_trace

    results: dict = {}
    t = _timed(results, "open", lambda: open_trace(trace))
    for name, query in QUERIES.items():
        sql = query.format(late=late)
        _timed(results, name, lambda sql=sql: t.sql(sql).fetchall())
        _timed(results, f"{name} (warm)", lambda sql=sql: t.sql(sql).fetchall())
    t.close()
    return results


def child_duckdb(folder: Path, late: int) -> dict:
    from samplescope.analysis.export import open_export

    results: dict = {}
    con = _timed(results, "open", lambda: open_export(folder))
    rows = {}
    for name, query in QUERIES.items():
        sql = query.format(late=late)
        rows[name] = _timed(results, name, lambda sql=sql: con.sql(sql).fetchall())
        _timed(results, f"{name} (warm)", lambda sql=sql: con.sql(sql).fetchall())
    results["_rows"] = {k: [list(r) for r in v] for k, v in rows.items()}
    return results


def child_spark(folder: Path, late: int, cores: int) -> dict:
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        return {"_error": "pyspark is not installed (pip install samplescope[bench])"}
    results: dict = {}

    def start() -> SparkSession:
        spark = (
            SparkSession.builder.master(f"local[{cores}]")
            .appName("samplescope-export")
            .config("spark.driver.memory", "2g")
            .config("spark.sql.shuffle.partitions", str(4 * cores))
            .config("spark.ui.enabled", "false")
            .getOrCreate()
        )
        spark.sparkContext.setLogLevel("ERROR")
        manifest = json.loads((folder / "manifest.json").read_text())
        # Each table from its folder or file; the views from the exported SQL text.
        for name, table in manifest["tables"].items():
            spark.read.parquet(str(folder / table["path"])).createOrReplaceTempView(name)
        for name, path in manifest["views"].items():
            if name not in manifest["tables"]:
                body = (folder / path).read_text()
                spark.sql(f"CREATE OR REPLACE TEMPORARY VIEW {name} AS {body}")
        return spark

    spark = _timed(results, "open", start)
    rows = {}
    for name, query in QUERIES.items():
        sql = query.format(late=late)
        got = _timed(results, name, lambda sql=sql: spark.sql(sql).collect())
        rows[name] = [list(r) for r in got]
        _timed(results, f"{name} (warm)", lambda sql=sql: spark.sql(sql).collect())
    spark.stop()
    results["_rows"] = rows
    return results


def _run_child(kind: str, args: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, *args],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def _max_difference(a: list[list], b: list[list]) -> float:
    """Largest relative difference between two result sets (inf if their shapes differ)."""
    if len(a) != len(b):
        return math.inf
    worst = 0.0
    for row_a, row_b in zip(a, b, strict=True):
        for x, y in zip(row_a, row_b, strict=True):
            if isinstance(x, float) or isinstance(y, float):
                worst = max(worst, abs(x - y) / max(abs(x), abs(y), 1e-300))
            elif x != y:
                return math.inf
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--cores", type=int, default=2, help="Spark local[N]")
    parser.add_argument(
        "--export-only", action="store_true", help="only the export's time and memory"
    )
    parser.add_argument("--keep", type=Path, default=None, help="folder to keep the files in")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--trace", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--late", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        runners = {
            "export": lambda: child_export(Path(args.trace), Path(args.folder)),
            "trace": lambda: child_trace(Path(args.trace), args.late),
            "duckdb": lambda: child_duckdb(Path(args.folder), args.late),
            "spark": lambda: child_spark(Path(args.folder), args.late, args.cores),
        }
        print(json.dumps(runners[args.child]()))
        return
    late = args.epochs - args.epochs // 10
    with tempfile.TemporaryDirectory() as tmp:
        base = args.keep or Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        trace, folder = base / "synthetic.h5", base / "export"
        start = time.perf_counter()
        write_synthetic(trace, args.samples, args.epochs)
        n_visits = args.samples * args.epochs
        print(
            f"trace: {args.samples:,} samples × {args.epochs} epochs × {N_LAYERS} layers = "
            f"{n_visits:,} visits, {trace.stat().st_size / 1e6:.0f} MB "
            f"(written in {time.perf_counter() - start:.0f} s)"
        )
        common = ["--trace", str(trace), "--folder", str(folder), "--late", str(late)]
        export = _run_child("export", common)
        print(
            f"export: {export['export']['seconds']:.1f} s, peak RSS "
            f"{export['export']['peak_mb']:.0f} MB, {export['parquet_mb']:.0f} MB of Parquet"
        )
        runs = {
            k: _run_child(k, [*common, "--cores", str(args.cores)]) for k in ("trace", "duckdb")
        }
        runs["spark"] = _run_child("spark", [*common, "--cores", str(args.cores)])
    _print(runs)


def _print(runs: dict) -> None:
    header = f"{'query':<40} {'Trace.sql s':>11} {'DuckDB s':>9} {'Spark s':>8} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    spark = runs["spark"]
    for name in ["open", *(n for q in QUERIES for n in (q, f"{q} (warm)"))]:
        ours, theirs = runs["trace"][name]["seconds"], runs["duckdb"][name]["seconds"]
        spark_s = spark[name]["seconds"] if name in spark else math.nan
        print(f"{name:<40} {ours:>11.3f} {theirs:>9.3f} {spark_s:>8.3f} {ours / theirs:>6.2f}")
    print(
        f"peak RSS MB: Trace.sql {_last_peak(runs['trace']):.0f}"
        f", DuckDB {_last_peak(runs['duckdb']):.0f}"
        + (f", Spark driver (Python) {_last_peak(spark):.0f}" if "_error" not in spark else "")
    )
    if "_error" in spark:
        print(f"spark: {spark['_error']}")
        return
    for name in QUERIES:
        worst = _max_difference(runs["duckdb"]["_rows"][name], spark["_rows"][name])
        print(f"Spark vs DuckDB, {name}: max relative difference {worst:.1e}")


def _last_peak(results: dict) -> float:
    return max(
        v["peak_mb"] for k, v in results.items() if not k.startswith("_") and isinstance(v, dict)
    )


if __name__ == "__main__":
    main()
