"""Per-sample statistics: the tables built from the streaming engine's aggregates.

`analysis/_streaming.py` folds the visits into per-sample aggregates and a per-(sample,
epoch) rollup; the functions here finish them (shares, ranks, z-scores, correlations,
groups). Every function takes small eager frames and returns a new frame.
The definitions are the ones written in docs/analysis.md; tests/analysis checks each against
hand-computed values.
"""

from __future__ import annotations

import numpy as np
import polars as pl

__all__ = [
    "GROUP_NAMES",
    "correlations",
    "epoch_slices",
    "finish_sample_scores",
    "groups",
    "sample_epochs",
]

GROUP_NAMES = ("top10", "next10", "rest")


def _imp(layer: int) -> str:
    return f"importance_{layer}"


def _share(layer: int) -> pl.Expr:
    return (
        pl.when(pl.col("importance") > 0)
        .then(pl.col(_imp(layer)) / pl.col("importance"))
        .alias(f"share_{layer}")
    )


def finish_sample_scores(
    per_sample: pl.DataFrame, n_layers: int, sample_info: pl.DataFrame | None = None
) -> pl.DataFrame:
    """Shares, when/where, difficulty ranks and sample_info from per-sample aggregates.

    Args:
        per_sample: one row per sample with the sums of `_visit_aggregates` and the
            cartography columns (from `sample_scores` or computed chunk by chunk).
        n_layers: number of layers.
        sample_info: the /sample_info table, left-joined on sample_id, if recorded.
    """
    per_sample = per_sample.sort("sample_id")
    n = per_sample.height
    rank = (pl.col("final_loss").rank("ordinal") - 1).cast(pl.Int64)
    out = per_sample.with_columns(
        *[_share(layer) for layer in range(n_layers)],
        (pl.when(pl.col("importance") > 0).then(pl.col("_when_num") / pl.col("importance"))).alias(
            "when"
        ),
        (
            pl.when(pl.col("importance") > 0).then(
                pl.sum_horizontal(layer * pl.col(_imp(layer)) for layer in range(n_layers))
                / pl.col("importance")
            )
        ).alias("where"),
        rank.alias("difficulty_rank"),
        (rank * 10 // max(n, 1)).alias("difficulty_decile"),
    ).drop("_when_num")
    order = [
        "sample_id",
        "target",
        "n_visits",
        "importance",
        *[_imp(layer) for layer in range(n_layers)],
        *[f"share_{layer}" for layer in range(n_layers)],
        "when",
        "where",
        "final_loss",
        "final_correct",
        "difficulty_rank",
        "difficulty_decile",
        "confidence",
        "variability",
        "correctness",
        "forgetting_events",
        "aum",
        "aum_after_first",
        "el2n",
        "el2n_proxy",
        "grand",
        "tracin_self",
        "input_sq",
        "input_grad_sq",
    ]
    out = out.select(order)
    if sample_info is not None and sample_info.height:
        taken = set(out.columns)
        info = sample_info.rename(
            {c: f"info_{c}" for c in sample_info.columns if c in taken and c != "sample_id"}
        )
        out = out.join(info, on="sample_id", how="left")
    return out


def checkpoint_scores(checkpoints: pl.DataFrame) -> pl.DataFrame:
    """Per sample, Data Diet's scores at fixed checkpoints (`Recorder.score_checkpoint`).

    ``grand_ckpt`` is GraNd, ‖∇ℓ_i‖₂ over every recorded layer (the square root of the
    summed per-layer ``grad_sq``), and ``el2n_ckpt`` EL2N, ‖softmax − onehot‖₂, both in eval
    mode at the checkpoint. Paul et al. average each score over independent runs at the
    same checkpoint; one trace is one run, so with several checkpoints in it these are
    the means over its checkpoints (``n_checkpoints`` says how many scored the sample).

    Args:
        checkpoints: the `checkpoints` table (one row per checkpoint and sample).
    """
    return (
        checkpoints.group_by("sample_id")
        .agg(
            pl.col("el2n").cast(pl.Float64).mean().alias("el2n_ckpt"),
            pl.col("grand").cast(pl.Float64).mean().alias("grand_ckpt"),
            pl.col("checkpoint").n_unique().cast(pl.Int64).alias("n_checkpoints"),
        )
        .sort("sample_id")
    )


def sample_epochs(rollup: pl.DataFrame, layers: pl.DataFrame) -> pl.DataFrame:
    """Long table: one row per (sample, epoch, layer) with within-(epoch, layer) rank and z.

    Args:
        rollup: the per-(sample, epoch) rollup of the streaming engine (sample_id, epoch,
            importance_<l>, grad_sq_<l>), sorted by epoch then sample_id.
        layers: the layers table (layer_index, layer, ...).
    """
    n_layers = layers.height
    long = pl.concat(
        [
            rollup.select(
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
        # Rows come in sample_id order within a window: ties rank by sample_id.
        (pl.col("importance").rank("ordinal", descending=True).over(window) - 1)
        .cast(pl.Int64)
        .alias("importance_rank"),
        pl.when(std > 0)
        .then((pl.col("importance") - pl.col("importance").mean().over(window)) / std)
        .alias("importance_z"),
    )
    names = layers.select("layer_index", "layer")
    return (
        long.join(names, on="layer_index", how="left")
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


def _spearman(frame: pl.DataFrame, by: list[str]) -> pl.DataFrame:
    return frame.group_by(by).agg(
        pl.len().cast(pl.Int64).alias("n_samples"),
        pl.corr("importance", "final_loss", method="spearman").alias("spearman"),
    )


def epoch_slices(epoch: pl.Series) -> list[tuple[int, int, int]]:
    """(epoch, offset, length) of each epoch's rows in a column sorted by epoch (the
    rollup's order), so a caller can work on one epoch's rows at a time without a copy."""
    values = epoch.to_numpy()
    starts = np.r_[0, np.flatnonzero(values[1:] != values[:-1]) + 1] if len(values) else []
    stops = [*starts[1:], len(values)]
    return [(int(values[a]), int(a), int(b - a)) for a, b in zip(starts, stops, strict=True)]


def correlations(rollup: pl.DataFrame, samples: pl.DataFrame, layers: pl.DataFrame) -> pl.DataFrame:
    """Spearman(importance, final loss) per epoch and layer; NULL epoch/layer = all of them.

    Args:
        rollup: the per-(sample, epoch) rollup of the streaming engine.
        samples: the `samples` table (for final_loss and total importance).
        layers: the layers table.
    """
    n_layers = layers.height
    loss = samples.select("sample_id", "final_loss").sort("sample_id")
    by_layer_parts, all_parts = [], []
    # One epoch at a time (the rollup is sorted by epoch): the join with the samples never
    # holds every (sample, epoch) row at once.
    narrow = rollup.select("sample_id", "epoch", *[_imp(layer) for layer in range(n_layers)])
    slices = epoch_slices(narrow["epoch"])
    for _, start, length in slices:
        part = narrow.slice(start, length)  # a view, not a copy
        frame = part.join(loss, on="sample_id", maintain_order="left")
        by_layer_parts += [
            _spearman(
                frame.select("epoch", pl.col(_imp(layer)).alias("importance"), "final_loss"),
                ["epoch"],
            ).with_columns(pl.lit(layer, dtype=pl.Int64).alias("layer_index"))
            for layer in range(n_layers)
        ]
        all_parts.append(
            _spearman(
                frame.select(
                    "epoch",
                    pl.sum_horizontal(_imp(layer) for layer in range(n_layers)).alias("importance"),
                    "final_loss",
                ),
                ["epoch"],
            ).with_columns(pl.lit(None, dtype=pl.Int64).alias("layer_index"))
        )
    by_layer = pl.concat(by_layer_parts) if by_layer_parts else None
    all_layers = pl.concat(all_parts) if all_parts else None
    # Whole-run sums per sample, folded epoch by epoch in epoch order (a group_by over the
    # whole rollup holds several copies of it).
    ids = loss["sample_id"].to_numpy()
    totals = np.zeros((n_layers, len(ids)))
    seen = np.zeros(len(ids), dtype=bool)  # samples without a rollup row have no sum
    for _, start, length in slices:
        part = narrow.slice(start, length)
        at = np.searchsorted(ids, part["sample_id"].to_numpy())
        seen[at] = True
        for layer in range(n_layers):
            np.add.at(totals[layer], at, part[_imp(layer)].to_numpy())
    per_layer = pl.DataFrame(
        {"sample_id": ids[seen], **{_imp(layer): totals[layer][seen] for layer in range(n_layers)}}
    ).join(loss, on="sample_id")
    overall_layer = pl.concat(
        [
            _spearman(
                per_layer.select(
                    pl.col(_imp(layer)).alias("importance"),
                    "final_loss",
                    pl.lit(layer, dtype=pl.Int64).alias("layer_index"),
                ),
                ["layer_index"],
            )
            for layer in range(n_layers)
        ]
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
    names = layers.select("layer_index", "layer")
    return (
        pl.concat(
            [
                t.select(cols)
                for t in (by_layer, all_layers, overall_layer, overall)
                if t is not None
            ]
        )
        .join(names, on="layer_index", how="left")
        .select("epoch", "layer", "layer_index", "n_samples", "spearman")
        .sort("epoch", "layer_index", nulls_last=True)
    )


def groups(samples: pl.DataFrame, layers: pl.DataFrame) -> pl.DataFrame:
    """The paper's grouping by total importance: top 10 %, next 10 %, the rest.

    Samples are ranked by total importance (descending, ties by sample_id); with n samples
    and m = ceil(n / 10), ranks 0..m-1 are `top10`, m..2m-1 `next10`, the others `rest`.
    Each row gives a group's importance in one layer (NULL layer = all layers) and its share
    of that layer's importance over all samples.
    """
    n_layers = layers.height
    n = samples.height
    m = max(-(-n // 10), 1)
    rank = samples.sort("sample_id")["importance"].rank("ordinal", descending=True) - 1
    labelled = samples.sort("sample_id").with_columns(
        pl.when(rank < m)
        .then(pl.lit("top10"))
        .when(rank < 2 * m)
        .then(pl.lit("next10"))
        .otherwise(pl.lit("rest"))
        .alias("group")
    )
    parts = []
    for layer, column in [
        *((layer, _imp(layer)) for layer in range(n_layers)),
        (None, "importance"),
    ]:
        total = labelled[column].sum()
        part = labelled.group_by("group").agg(
            pl.len().cast(pl.Int64).alias("n_samples"), pl.col(column).sum().alias("importance")
        )
        parts.append(
            part.with_columns(
                pl.lit(layer, dtype=pl.Int64).alias("layer_index"),
                (
                    pl.col("importance") / total if total > 0 else pl.lit(None, dtype=pl.Float64)
                ).alias("share"),
            )
        )
    order = pl.Enum(GROUP_NAMES)
    names = layers.select("layer_index", "layer")
    return (
        pl.concat(parts)
        .join(names, on="layer_index", how="left")
        .with_columns(pl.col("group").cast(order))
        .sort("group", "layer_index", nulls_last=True)
        .with_columns(pl.col("group").cast(pl.String))
        .select("group", "layer", "layer_index", "n_samples", "importance", "share")
    )
