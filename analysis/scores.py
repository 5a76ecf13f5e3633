"""Per-sample statistics, computed with Polars from the visits of a trace.

Every function takes eager frames (collected once by the trace) and returns a new frame.
The definitions are the ones written in docs/analysis.md; tests/analysis checks each against
hand-computed values.
"""

from __future__ import annotations

import polars as pl

__all__ = [
    "GROUP_NAMES",
    "correlations",
    "finish_sample_scores",
    "groups",
    "prepare_visits",
    "sample_epochs",
    "sample_scores",
]

GROUP_NAMES = ("top10", "next10", "rest")


def _imp(layer: int) -> str:
    return f"importance_{layer}"


def prepare_visits(
    visits: pl.DataFrame, n_layers: int, early_epochs: int, *, layer_grad_sq: bool = False
) -> pl.DataFrame:
    """Add per-visit importance per layer and totals; order visits by step (shards interleave).

    Args:
        visits: the visits table (step, epoch, sample_id, loss, ..., grad_sq, lr_scale).
        n_layers: the number of layers (the width of grad_sq).
        early_epochs: how many of the first recorded epochs form the "early" window.
        layer_grad_sq: also add grad_sq_<layer> columns (sample_epochs needs them).
    """
    if not visits["step"].is_sorted():
        visits = visits.sort("step", maintain_order=True)
    epochs = visits["epoch"].unique().sort()
    early = epochs.head(max(early_epochs, 1)).to_list()
    grad = pl.col("grad_sq").cast(pl.Array(pl.Float64, n_layers))
    scale_sq = pl.col("lr_scale") * pl.col("lr_scale")
    per_layer = (
        [grad.arr.get(layer).alias(f"grad_sq_{layer}") for layer in range(n_layers)]
        if layer_grad_sq
        else []
    )
    # One select, dropping the array column: this frame is the peak of t.samples()' memory.
    return visits.select(
        pl.exclude("grad_sq"),
        *[(scale_sq * grad.arr.get(layer)).alias(_imp(layer)) for layer in range(n_layers)],
        *per_layer,
        grad.arr.sum().alias("grad_sq_total"),
        pl.col("epoch").is_in(early).alias("early"),
        (pl.col("epoch") == (early[0] if early else 0)).alias("first_epoch"),
    ).with_columns(
        pl.sum_horizontal(_imp(layer) for layer in range(n_layers)).alias("importance"),
    )


def _share(layer: int) -> pl.Expr:
    return (
        pl.when(pl.col("importance") > 0)
        .then(pl.col(_imp(layer)) / pl.col("importance"))
        .alias(f"share_{layer}")
    )


def _when_outputs(expr: pl.Expr) -> pl.Expr:
    """NULL for a sample none of whose visits recorded outputs (visits-free traces)."""
    return pl.when(pl.col("correct").is_not_null().any()).then(expr)


def _visit_aggregates(n_layers: int) -> list[pl.Expr]:
    early = pl.col("early")
    return [
        pl.len().cast(pl.Int64).alias("n_visits"),
        pl.col("target").last().alias("target"),
        pl.col("importance").sum().alias("importance"),
        *[pl.col(_imp(layer)).sum().alias(_imp(layer)) for layer in range(n_layers)],
        (pl.col("epoch") * pl.col("importance")).sum().alias("_when_num"),
        pl.col("loss").last().cast(pl.Float64).alias("final_loss"),
        pl.col("correct").last().alias("final_correct"),
        # Toneva et al.: a sample never classified correctly gets the maximum count (their
        # code adds the number of presentations), so it ranks above every forgettable one.
        _when_outputs(
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


def _cartography(visits: pl.DataFrame) -> pl.DataFrame:
    """Confidence, variability and correctness over epochs (Swayamdipta et al., 2020)."""
    per_epoch = visits.group_by("sample_id", "epoch").agg(
        pl.col("p_target").cast(pl.Float64).mean().alias("p"),
        pl.col("correct").cast(pl.Float64).mean().alias("c"),
    )
    return per_epoch.group_by("sample_id").agg(
        pl.col("p").mean().alias("confidence"),
        pl.col("p").std(ddof=0).alias("variability"),
        pl.col("c").mean().alias("correctness"),
    )


def sample_scores(
    visits: pl.DataFrame, n_layers: int, sample_info: pl.DataFrame | None = None
) -> pl.DataFrame:
    """One row per sample with every score (see docs/analysis.md, table `samples`).

    Args:
        visits: output of `prepare_visits`.
        n_layers: number of layers.
        sample_info: the /sample_info table, left-joined on sample_id, if recorded.
    """
    per_sample = (
        visits.group_by("sample_id")
        .agg(_visit_aggregates(n_layers))
        .join(_cartography(visits), on="sample_id", how="left")
    )
    return finish_sample_scores(per_sample, n_layers, sample_info)


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


def sample_epochs(visits: pl.DataFrame, layers: pl.DataFrame) -> pl.DataFrame:
    """Long table: one row per (sample, epoch, layer) with within-(epoch, layer) rank and z.

    Args:
        visits: output of `prepare_visits`.
        layers: the layers table (layer_index, layer, ...).
    """
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
