"""Noisy labels: flip a fraction of training labels, record a run, and score every detector.

The flipped mask and the original labels are stored in the trace's /sample_info, so the
truth travels with the run. Every score of `samplescope.analysis.flags.score_table`
(importance-based: whole run, late epochs, within-epoch rank, per layer; baselines: final
loss, AUM, forgetting events, confidence, variability, EL2N, GraNd, TracIn self-influence)
is oriented so that higher = more suspect and judged by AUROC and average precision.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from samplescope.experiments.config import ExperimentError, RunConfig
from samplescope.experiments.train import early_checkpoint, train_run

__all__ = ["flip_labels", "run_noise"]


def flip_labels(
    targets: np.ndarray, ids: np.ndarray, fraction: float, n_classes: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Flip ``fraction`` of the labels at ``ids`` to a different class chosen uniformly.

    Returns:
        (noisy targets for the whole training set, boolean flipped mask over ``ids``).
    """
    if not 0 <= fraction < 1:
        msg = f"noise fractions must be in [0, 1), not {fraction}"
        raise ExperimentError(msg)
    rng = np.random.default_rng(seed)
    flipped = np.zeros(len(ids), dtype=bool)
    flipped[rng.choice(len(ids), size=round(fraction * len(ids)), replace=False)] = True
    noisy = targets.copy()
    chosen = ids[flipped]
    shift = rng.integers(1, n_classes, size=chosen.size)
    noisy[chosen] = (targets[chosen] + shift) % n_classes
    return noisy, flipped


def run_noise(
    config: RunConfig,
    out_dir: str | Path,
    fractions: Sequence[float] = (0.1, 0.2),
    recorder_options: dict | None = None,
) -> pl.DataFrame:
    """For each noise fraction (and seed), train with recording and score every detector.

    ``recorder_options`` go to every run's Recorder (e.g. ``reference=`` for val_effect).

    Returns:
        One row per (noise, score): AUROC and average precision (mean and std over seeds),
        with the base rate (fraction flipped) beside them. Also written to ``noise.csv``.
    """
    from samplescope.analysis import open_trace
    from samplescope.analysis.flags import score_table

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = config.load()
    ids = config.train_ids(data)
    clean = data.y_train.numpy()
    rows = []
    for fraction in fractions:
        for seed in range(config.seeds):
            noisy, flipped = flip_labels(clean, ids, fraction, data.n_classes, seed=seed)
            info = {"sample_id": ids, "flipped": flipped, "original_target": clean[ids]}
            path = out / f"noise{fraction:g}_seed{seed}.h5"
            train_run(
                config.with_seed(seed),
                path,
                data=data,
                train_indices=ids,
                train_targets=torch.as_tensor(noisy),
                sample_info=info,
                thumbnails=False,
                overwrite=True,
                progress=False,
                recorder_options=recorder_options,
                checkpoint_epochs=early_checkpoint(config.epochs),
            )
            with open_trace(path) as trace:
                table = score_table(trace)
            truth = table["info_flipped"].cast(pl.Boolean).to_numpy()
            names = [
                c
                for c in table.columns
                if c not in ("sample_id", "target") and not c.startswith("info_")
            ]
            for name in names:
                score = table[name].fill_null(np.nan).to_numpy().astype(np.float64)
                score = np.nan_to_num(
                    score, nan=np.nanmin(score) if np.isfinite(score).any() else 0.0
                )
                rows.append(
                    {
                        "noise": fraction,
                        "seed": seed,
                        "score": name,
                        "auroc": _metric(roc_auc_score, truth, score),
                        "ap": _metric(average_precision_score, truth, score),
                        "base_rate": float(truth.mean()),
                    }
                )
    frame = pl.DataFrame(rows)
    summary = (
        frame.group_by("noise", "score", maintain_order=True)
        .agg(
            pl.col("auroc").mean(),
            pl.col("auroc").std(ddof=1).fill_null(0.0).alias("auroc_std"),
            pl.col("ap").mean(),
            pl.col("ap").std(ddof=1).fill_null(0.0).alias("ap_std"),
            pl.col("base_rate").mean(),
            pl.len().alias("seeds"),
        )
        .sort(["noise", "auroc"], descending=[False, True])
    )
    summary.write_csv(out / "noise.csv")
    return summary


def _metric(metric: object, truth: np.ndarray, score: np.ndarray) -> float:
    if truth.all() or not truth.any():
        return float("nan")
    return float(metric(truth, score))  # type: ignore[operator]
