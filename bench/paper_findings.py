"""The paper's findings on Fashion-MNIST (or any named dataset), with the recorder's cost.

Trains the paper's MLP (3x512 ReLU, Glorot, batch 100, SGD 0.1, weight decay 1e-5) with
recording, checks every claim through `samplescope.analysis.findings`, and prints the
verdicts, the headline sentences and the training time with and without recording, measured
side by side in one run.

    python bench/paper_findings.py                     # full 60k, 50 epochs (long)
    python bench/paper_findings.py --epochs 8 --subset 20000
    python bench/paper_findings.py --dataset digits --epochs 5   # seconds
"""

from __future__ import annotations

import argparse

import polars as pl

from samplescope.experiments.config import RunConfig
from samplescope.experiments.findings_run import run_findings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--subset", type=int, default=None)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out-dir", default="bench_out/paper_findings")
    args = parser.parse_args()
    setting = RunConfig.paper(
        dataset=args.dataset, epochs=args.epochs, subset=args.subset, data_dir=args.data_dir
    )
    run = run_findings(setting, args.out_dir, time_plain=True)
    print(setting.describe())
    with pl.Config(tbl_rows=20, fmt_str_lengths=200, tbl_width_chars=200):
        print(
            run.table.select(
                "claim",
                "verdict",
                "effect",
                "ci_low",
                "ci_high",
                "min_effect",
                "per_param",
                "same_period",
                "input_norm",
            )
        )
    for line in run.headlines:
        print("-", line)
    ratio = run.recorded_seconds / run.plain_seconds if run.plain_seconds else float("nan")
    print(f"test accuracy {run.test_accuracy:.4f}")
    print(
        f"training: {run.recorded_seconds:.1f} s recorded, {run.plain_seconds:.1f} s plain "
        f"(ratio {ratio:.2f})"
    )


if __name__ == "__main__":
    main()
