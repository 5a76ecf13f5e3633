"""The in-memory Polars definitions of the per-sample tables as they stood before the one
streaming engine (`analysis/_streaming.py`) replaced them, kept here as an oracle.

They hold every visit at once, which is why the library no longer uses them; on small
traces they are the obvious reading of docs/analysis.md, and tests/analysis/test_engine_pins.py
checks the engine against them on traces that exercise every branch (revisits inside a chunk,
shards, epochs out of step order, missing outputs).
"""

from __future__ import annotations

import numpy as np
import polars as pl

from samplescope.analysis import Trace
from samplescope.analysis.clusters import difficulty_labels
from samplescope.analysis.scores import finish_sample_scores

SCORE_COLUMNS = (
    "step",
    "epoch",
    "sample_id",
    "loss",
    "target",
    "correct",
    "p_target",
    "margin",
    "el2n",
    "input_sq",
    "input_grad_sq",
    "lr_scale",
    "grad_sq",
)


def _imp(layer: int) -> str:
    return f"importance_{layer}"


def prepare_visits(trace: Trace, early_epochs: int = 1) -> pl.DataFrame:
    n_layers = trace.layers().height
    visits = trace.table("visits").select(SCORE_COLUMNS).collect()
    if not visits["step"].is_sorted():
        visits = visits.sort("step", maintain_order=True)
    epochs = visits["epoch"].unique().sort()
    early = epochs.head(max(early_epochs, 1)).to_list()
    grad = pl.col("grad_sq").cast(pl.Array(pl.Float64, n_layers))
    scale_sq = pl.col("lr_scale") * pl.col("lr_scale")
    return visits.select(
        pl.exclude("grad_sq"),
        *[(scale_sq * grad.arr.get(layer)).alias(_imp(layer)) for layer in range(n_layers)],
        *[grad.arr.get(layer).alias(f"grad_sq_{layer}") for layer in range(n_layers)],
        grad.arr.sum().alias("grad_sq_total"),
        pl.col("epoch").is_in(early).alias("early"),
        (pl.col("epoch") == (early[0] if early else 0)).alias("first_epoch"),
    ).with_columns(
        pl.sum_horizontal(_imp(layer) for layer in range(n_layers)).alias("importance"),
    )


def _aggregates(n_layers: int) -> list[pl.Expr]:
    early = pl.col("early")
    outputs = pl.col("correct").is_not_null().any()
    return [
        pl.len().cast(pl.Int64).alias("n_visits"),
        pl.col("target").last().alias("target"),
        pl.col("importance").sum().alias("importance"),
        *[pl.col(_imp(layer)).sum().alias(_imp(layer)) for layer in range(n_layers)],
        (pl.col("epoch") * pl.col("importance")).sum().alias("_when_num"),
        pl.col("loss").last().cast(pl.Float64).alias("final_loss"),
        pl.col("correct").last().alias("final_correct"),
        pl.when(outputs)
        .then(
            pl.when(pl.col("correct").any())
            .then((pl.col("correct").shift(1) & ~pl.col("correct")).sum())
            .otherwise(pl.len())
        )
        .cast(pl.Int64)
        .alias("forgetting_events"),
        pl.col("margin").cast(pl.Float64).mean().alias("aum"),
        pl.col("margin")
        .cast(pl.Float64)
        .filter(~pl.col("first_epoch"))
        .mean()
        .alias("aum_after_first"),
        pl.col("el2n").cast(pl.Float64).filter(early).mean().alias("el2n"),
        (1.0 - pl.col("p_target").cast(pl.Float64)).filter(early).mean().alias("el2n_proxy"),
        pl.col("grad_sq_total").sqrt().filter(early).mean().alias("grand"),
        (pl.col("lr_scale") * pl.col("grad_sq_total")).sum().alias("tracin_self"),
        pl.col("input_sq").cast(pl.Float64).mean().alias("input_sq"),
        pl.col("input_grad_sq").cast(pl.Float64).mean().alias("input_grad_sq"),
    ]


def sample_scores(trace: Trace, early_epochs: int = 1) -> pl.DataFrame:
    visits = prepare_visits(trace, early_epochs)
    n_layers = trace.layers().height
    per_epoch = visits.group_by("sample_id", "epoch").agg(
        pl.col("p_target").cast(pl.Float64).mean().alias("p"),
        pl.col("correct").cast(pl.Float64).mean().alias("c"),
    )
    cartography = per_epoch.group_by("sample_id").agg(
        pl.col("p").mean().alias("confidence"),
        pl.col("p").std(ddof=0).alias("variability"),
        pl.col("c").mean().alias("correctness"),
    )
    per_sample = (
        visits.group_by("sample_id")
        .agg(_aggregates(n_layers))
        .join(cartography, on="sample_id", how="left")
    )
    return finish_sample_scores(per_sample, n_layers, None)


def sample_epochs(trace: Trace) -> pl.DataFrame:
    visits = prepare_visits(trace)
    layers = trace.layers()
    n_layers = layers.height
    per_epoch = (
        visits.group_by("sample_id", "epoch")
        .agg(
            *[pl.col(_imp(layer)).sum() for layer in range(n_layers)],
            *[pl.col(f"grad_sq_{layer}").sum() for layer in range(n_layers)],
        )
        .sort("epoch", "sample_id")
    )
    long = pl.concat(
        [
            per_epoch.select(
                "sample_id",
                "epoch",
                pl.lit(layer, dtype=pl.Int64).alias("layer_index"),
                pl.col(_imp(layer)).alias("importance"),
                pl.col(f"grad_sq_{layer}").alias("grad_sq"),
            )
            for layer in range(n_layers)
        ]
    )
    window = ("epoch", "layer_index")
    std = pl.col("importance").std(ddof=0).over(window)
    long = long.with_columns(
        (pl.col("importance").rank("ordinal", descending=True).over(window) - 1)
        .cast(pl.Int64)
        .alias("importance_rank"),
        pl.when(std > 0)
        .then((pl.col("importance") - pl.col("importance").mean().over(window)) / std)
        .alias("importance_z"),
    )
    return (
        long.join(layers.select("layer_index", "layer"), on="layer_index", how="left")
        .select(
            "sample_id",
            "epoch",
            "layer",
            "layer_index",
            "importance",
            "grad_sq",
            "importance_rank",
            "importance_z",
        )
        .sort("epoch", "layer_index", "sample_id")
    )


def epoch_loss(trace: Trace) -> pl.DataFrame:
    """sample_id, epoch, loss: the mean training loss of each sample in each epoch."""
    visits = trace.table("visits").select("sample_id", "epoch", "loss").collect()
    return visits.group_by("sample_id", "epoch").agg(pl.col("loss").cast(pl.Float64).mean())


def findings_arrays(trace: Trace, period_fraction: float) -> dict[str, np.ndarray]:
    """What `findings` folded the visits into: imp [n, layers, epochs], visit counts
    [n, epochs] and the importance of the first and last `period_fraction` of the steps."""
    columns = ["step", "epoch", "sample_id", "lr_scale", "grad_sq"]
    visits = trace.table("visits").select(columns).collect()
    n_layers = trace.layers().height
    ids, s_idx = np.unique(visits["sample_id"].to_numpy(), return_inverse=True)
    epochs, e_idx = np.unique(visits["epoch"].to_numpy(), return_inverse=True)
    n, n_epochs = len(ids), len(epochs)
    scale = visits["lr_scale"].to_numpy().astype(np.float64)
    grad = visits["grad_sq"].to_numpy().reshape(-1, n_layers).astype(np.float64)
    per_visit = grad * (scale * scale)[:, None]
    cell = s_idx * n_epochs + e_idx
    imp = np.stack(
        [np.bincount(cell, per_visit[:, i], minlength=n * n_epochs) for i in range(n_layers)],
        axis=1,
    ).reshape(n, n_epochs, n_layers)
    counts = np.bincount(cell, minlength=n * n_epochs).reshape(n, n_epochs)
    steps, pos = np.unique(visits["step"].to_numpy(), return_inverse=True)
    n_steps = max(len(steps), 1)
    which = np.where(
        pos < period_fraction * n_steps,
        0,
        np.where(pos >= (1 - period_fraction) * n_steps, 1, -1),
    )
    period = np.zeros((n, n_layers, 2))
    for p in (0, 1):
        rows = which == p
        for layer in range(n_layers):
            period[:, layer, p] = np.bincount(s_idx[rows], per_visit[rows, layer], minlength=n)
    return {
        "sample_ids": ids,
        "imp": np.ascontiguousarray(imp.transpose(0, 2, 1)),
        "visits": counts,
        "period": period,
        "epochs": epochs,
    }


def _spearman(frame: pl.DataFrame, by: list[str]) -> pl.DataFrame:
    return frame.group_by(by).agg(
        pl.len().cast(pl.Int64).alias("n_samples"),
        pl.corr("importance", "final_loss", method="spearman").alias("spearman"),
    )


def correlations(per_epoch: pl.DataFrame, samples: pl.DataFrame) -> pl.DataFrame:
    """Spearman(importance, final loss) per epoch and layer; NULL epoch/layer = all of them.

    Args:
        per_epoch: the `sample_epochs` table.
        samples: the `samples` table (for final_loss and total importance per layer).
    """
    loss = samples.select("sample_id", "final_loss")
    frame = per_epoch.join(loss, on="sample_id")
    by_layer = _spearman(frame, ["epoch", "layer_index"])
    all_layers = _spearman(
        frame.group_by("sample_id", "epoch").agg(
            pl.col("importance").sum(), pl.col("final_loss").first()
        ),
        ["epoch"],
    ).with_columns(pl.lit(None, dtype=pl.Int64).alias("layer_index"))
    overall_layer = _spearman(
        frame.group_by("sample_id", "layer_index").agg(
            pl.col("importance").sum(), pl.col("final_loss").first()
        ),
        ["layer_index"],
    ).with_columns(pl.lit(None, dtype=pl.Int64).alias("epoch"))
    overall = (
        _spearman(
            samples.select("importance", "final_loss").with_columns(pl.lit(0).alias("_")), ["_"]
        )
        .drop("_")
        .with_columns(
            pl.lit(None, dtype=pl.Int64).alias("epoch"),
            pl.lit(None, dtype=pl.Int64).alias("layer_index"),
        )
    )
    cols = ["epoch", "layer_index", "n_samples", "spearman"]
    names = per_epoch.select("layer_index", "layer").unique()
    return (
        pl.concat([t.select(cols) for t in (by_layer, all_layers, overall_layer, overall)])
        .join(names, on="layer_index", how="left")
        .select("epoch", "layer", "layer_index", "n_samples", "spearman")
        .sort("epoch", "layer_index", nulls_last=True)
    )


# The clustering as it stood (profiles pivoted from the long sample_epochs, epoch losses
# from the visits).
def _profiles(per_epoch: pl.DataFrame, ids: pl.Series) -> np.ndarray:
    """Matrix samples × (epoch, layer) of importance, 0 where a sample was not visited."""
    wide = (
        per_epoch.filter(pl.col("sample_id").is_in(ids.implode()))
        .with_columns(
            (pl.col("epoch").cast(pl.String) + "_" + pl.col("layer_index").cast(pl.String)).alias(
                "cell"
            )
        )
        .pivot("cell", index="sample_id", values="importance", aggregate_function="sum")
    )
    wide = pl.DataFrame({"sample_id": ids}).join(wide, on="sample_id", how="left")
    matrix = np.nan_to_num(wide.drop("sample_id").to_numpy().astype(np.float64), nan=0.0)
    # Standardise each cell: importance shrinks over training and would let early epochs
    # dominate the distances otherwise.
    std = matrix.std(axis=0)
    return (matrix - matrix.mean(axis=0)) / np.where(std > 0, std, 1.0)


def cluster_samples(
    per_epoch: pl.DataFrame, visits: pl.DataFrame, samples: pl.DataFrame, *, k: int, seed: int
) -> pl.DataFrame:
    """One row per sample: target (class), cluster (per class, 0-based), label, cluster_size,
    cluster_loss_auc (mean over epochs of the cluster's mean training loss).

    Args:
        per_epoch: the `sample_epochs` table.
        visits: prepared visits (sample_id, epoch, loss).
        samples: the `samples` table (sample_id, target).
        k: clusters per class, capped by the number of distinct profiles in the class.
        seed: k-means random state.
    """
    from sklearn.cluster import KMeans

    loss = visits.group_by("sample_id", "epoch").agg(pl.col("loss").cast(pl.Float64).mean())
    parts = []
    classes = samples.select("sample_id", "target").sort("sample_id")
    for (target,), members in classes.group_by("target", maintain_order=True):
        ids = members["sample_id"]
        profiles = _profiles(per_epoch, ids)
        n_distinct = len(np.unique(profiles.round(12), axis=0))
        n_clusters = max(1, min(k, n_distinct))
        if n_clusters == 1:
            assignment = np.zeros(len(ids), dtype=np.int64)
        else:
            model = KMeans(n_clusters=n_clusters, random_state=seed, n_init=4)
            assignment = model.fit_predict(profiles).astype(np.int64)
        frame = pl.DataFrame({"sample_id": ids, "cluster": assignment})
        curve = (
            loss.join(frame, on="sample_id")
            .group_by("cluster", "epoch")
            .agg(pl.col("loss").mean())
            .group_by("cluster")
            .agg(pl.col("loss").mean().alias("cluster_loss_auc"))
            .sort("cluster")
        )
        labels = difficulty_labels(curve["cluster_loss_auc"].to_numpy())
        curve = curve.with_columns(pl.Series("label", labels, dtype=pl.String))
        sizes = frame.group_by("cluster").agg(pl.len().cast(pl.Int64).alias("cluster_size"))
        parts.append(
            frame.join(curve, on="cluster")
            .join(sizes, on="cluster")
            .with_columns(pl.lit(target, dtype=pl.Int64).alias("target"))
        )
    return (
        pl.concat(parts)
        .select("sample_id", "target", "cluster", "label", "cluster_size", "cluster_loss_auc")
        .sort("sample_id")
    )


def epoch_scores(per_epoch: pl.DataFrame, late_fraction: float) -> pl.DataFrame:
    """flags' importance_late and importance_rank, from the long sample_epochs."""
    import math

    epochs = sorted(per_epoch["epoch"].unique().to_list())
    late = epochs[-max(1, math.ceil(late_fraction * len(epochs))) :] if epochs else []
    n = per_epoch.group_by("epoch", "layer_index").agg(pl.len().alias("_n"))
    ranked = per_epoch.join(n, on=["epoch", "layer_index"]).with_columns(
        (1.0 - pl.col("importance_rank") / pl.max_horizontal(pl.col("_n") - 1, 1)).alias("_pct")
    )
    return ranked.group_by("sample_id").agg(
        pl.col("importance")
        .filter(pl.col("epoch").is_in(late))
        .sum()
        .cast(pl.Float64)
        .alias("importance_late"),
        pl.col("_pct").mean().alias("importance_rank"),
    )
