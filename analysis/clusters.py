"""Per-class k-means on importance profiles, clusters labelled by how fast their loss falls."""

from __future__ import annotations

import numpy as np
import polars as pl

__all__ = ["cluster_samples", "difficulty_labels"]

_LABELS = ("easy", "medium", "hard")


def difficulty_labels(loss_auc: np.ndarray) -> list[str]:
    """Label clusters by their mean training loss over epochs (lower = falls faster = easier).

    Clusters are ranked by `loss_auc`; with m clusters the i-th (0-based) gets
    label index round(2·i/(m−1)): the lowest third easy, the middle medium, the top hard.
    A single cluster is `medium`.
    """
    m = len(loss_auc)
    if m == 1:
        return ["medium"]
    order = np.argsort(loss_auc, kind="stable")
    labels = [""] * m
    for position, cluster in enumerate(order):
        labels[cluster] = _LABELS[round(2 * position / (m - 1))]
    return labels


def _profiles(rollup: pl.DataFrame, ids: pl.Series, n_layers: int) -> np.ndarray:
    """Matrix samples × (epoch, layer) of importance, 0 where a sample was not visited;
    cells are the epochs some sample of `ids` was visited in, epoch-major."""
    part = rollup.filter(pl.col("sample_id").is_in(ids.implode()))
    epochs, column = np.unique(part["epoch"].to_numpy(), return_inverse=True)
    row = np.searchsorted(ids.to_numpy(), part["sample_id"].to_numpy())
    matrix = np.zeros((len(ids), len(epochs) * n_layers))
    for layer in range(n_layers):
        matrix[row, column * n_layers + layer] = part[f"importance_{layer}"].to_numpy()
    # Standardise each cell: importance shrinks over training and would let early epochs
    # dominate the distances otherwise.
    std = matrix.std(axis=0)
    return (matrix - matrix.mean(axis=0)) / np.where(std > 0, std, 1.0)


def cluster_samples(
    rollup: pl.DataFrame, samples: pl.DataFrame, *, k: int, seed: int
) -> pl.DataFrame:
    """One row per sample: target (class), cluster (per class, 0-based), label, cluster_size,
    cluster_loss_auc (mean over epochs of the cluster's mean training loss).

    Args:
        rollup: the per-(sample, epoch) rollup of the streaming engine (sample_id, epoch,
            loss = the mean training loss of the visits, importance_<l>).
        samples: the `samples` table (sample_id, target).
        k: clusters per class, capped by the number of distinct profiles in the class.
        seed: k-means random state.
    """
    from sklearn.cluster import KMeans

    loss = rollup.select("sample_id", "epoch", "loss")
    n_layers = sum(1 for c in rollup.columns if c.startswith("importance_"))
    parts = []
    classes = samples.select("sample_id", "target").sort("sample_id")
    for (target,), members in classes.group_by("target", maintain_order=True):
        ids = members["sample_id"]
        profiles = _profiles(rollup, ids, n_layers)
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
