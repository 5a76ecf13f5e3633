"""Flag likely mislabeled or redundant samples, in cleanlab's conventions.

Every score in `score_table` is oriented the same way: higher means harder — more likely
mislabeled, more informative to keep. `flag` turns one of them into a quality score in
[0, 1] where, as in cleanlab's ``get_label_quality_scores``, lower means more likely an
issue: for ``kind="mislabeled"`` a low ``label_quality`` suggests a wrong label; for
``kind="redundant"`` a low ``informativeness`` suggests the sample adds little. Rows come in
ranked order (rank 0 is flagged first) with a boolean ``flagged`` mask at the budget, like
``find_label_issues(..., return_indices_ranked_by=...)``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from samplescope.analysis.scores import epoch_slices
from samplescope.errors import SamplescopeError

if TYPE_CHECKING:
    from samplescope.analysis.trace import Trace

__all__ = ["DEFAULT_SCORE", "KINDS", "FlagError", "flag", "score_names", "score_table"]

KINDS = ("mislabeled", "redundant")
DEFAULT_SCORE = {"mislabeled": "confidence", "redundant": "importance"}
# The last fifth of the epochs are "late" for the late-epoch importance score.
LATE_FRACTION = 0.2

# name -> (column of samples(), sign): score = sign * column, so higher = harder.
_SAMPLE_SCORES: dict[str, tuple[str, float]] = {
    "importance": ("importance", 1.0),
    "final_loss": ("final_loss", 1.0),
    "aum": ("aum", -1.0),
    # Pleiss et al.'s reference runs start averaging margins after the first epoch.
    "aum_after_first": ("aum_after_first", -1.0),
    "forgetting": ("forgetting_events", 1.0),
    "confidence": ("confidence", -1.0),
    "variability": ("variability", 1.0),
    # The true ||softmax - onehot||_2 where the trace recorded it; older traces only offer
    # the 1 - p_target proxy, under its own name so nobody mistakes one for the other.
    "el2n": ("el2n", 1.0),
    "el2n_proxy": ("el2n_proxy", 1.0),
    "grand": ("grand", 1.0),
    "tracin_self": ("tracin_self", 1.0),
    # Validation attribution (Recorder(reference=...)): val_effect > 0 raised the held-out
    # loss (suspect); val_helpful is its negation, for keeping the most helpful samples.
    "val_effect": ("val_effect", 1.0),
    "val_helpful": ("val_effect", -1.0),
    # Data Diet's scores in eval mode at fixed checkpoints (Recorder.score_checkpoint):
    # only in traces that scored some, averaged over their checkpoints.
    "el2n_ckpt": ("el2n_ckpt", 1.0),
    "grand_ckpt": ("grand_ckpt", 1.0),
}


class FlagError(SamplescopeError):
    """A bad kind, score or budget for `flag`."""


def score_table(trace: Trace) -> pl.DataFrame:
    """Every per-sample score, oriented so that higher = harder (more suspect, more useful).

    Columns: sample_id, target, then one Float64 column per score: the baselines of
    `_SAMPLE_SCORES` (final loss, AUM negated, forgetting events, 1 - confidence as
    ``-confidence``, variability, EL2N, GraNd, TracIn self-influence), and importance-based
    scores: ``importance`` (whole run), ``importance_late`` (last fifth of the epochs),
    ``importance_rank`` (mean within-(epoch, layer) rank, so every epoch and layer weighs
    the same) and ``importance_layer{l}`` per layer. Plus every /sample_info column as
    ``info_<name>``.
    """
    samples = trace.samples()
    columns = [pl.col("sample_id"), pl.col("target")]
    for name, (column, sign) in _SAMPLE_SCORES.items():
        if column in samples.columns and _offered(name, samples):
            columns.append((sign * pl.col(column).cast(pl.Float64)).alias(name))
    layers = trace.layers().sort("layer_index")
    for index in layers["layer_index"].to_list():
        if f"importance_{index}" in samples.columns:
            columns.append(
                pl.col(f"importance_{index}").cast(pl.Float64).alias(f"importance_layer{index}")
            )
    table = samples.select(*columns, *_info_columns(trace, samples))
    return table.join(_epoch_scores(trace), on="sample_id", how="left")


def _offered(name: str, samples: pl.DataFrame) -> bool:
    """EL2N only where recorded (not all NULL); its proxy only where EL2N is not; the
    checkpoint scores only where some checkpoint filled them."""
    if name.endswith("_ckpt"):
        return samples[name].null_count() < samples.height
    recorded = samples["el2n"].null_count() < samples.height if "el2n" in samples.columns else False
    if name == "el2n":
        return recorded
    if name == "el2n_proxy":
        return not recorded
    return True


def _info_columns(trace: Trace, samples: pl.DataFrame) -> list[pl.Expr]:
    """/sample_info columns, each as ``info_<name>`` (samples() prefixes only clashing ones)."""
    if "sample_info" not in trace.table_names:
        return []
    names = [c for c in trace.table("sample_info").collect_schema().names() if c != "sample_id"]
    found = []
    for name in names:
        column = f"info_{name}" if f"info_{name}" in samples.columns else name
        if column in samples.columns:
            found.append(pl.col(column).alias(f"info_{name}"))
    return found


def _epoch_scores(trace: Trace) -> pl.DataFrame:
    """importance_late and importance_rank per sample, from the rollup one epoch at a time.

    The rollup holds one row per (sample, epoch), sorted by epoch: each epoch's rows are a
    slice of it (no copy), ranked on their own and folded into per-sample sums in epoch
    order, so the ranks of every (sample, epoch, layer) cell are never held at once (a
    window over the whole rollup took 4x the memory).
    """
    rollup = trace._rollup()
    n_layers = trace.layers().height
    slices = epoch_slices(rollup["epoch"])
    epochs = [epoch for epoch, _, _ in slices]
    late = set(epochs[-max(1, math.ceil(LATE_FRACTION * len(epochs))) :] if epochs else [])
    ids = np.unique(rollup["sample_id"].to_numpy())
    late_sum, count = np.zeros(len(ids)), np.zeros(len(ids), dtype=np.int64)
    pct_sum = [np.zeros(len(ids)) for _ in range(n_layers)]
    # importance_rank of sample_epochs (0 = most important within (epoch, layer), ties by
    # sample_id) as a percentile, averaged over the sample's (epoch, layer) cells.
    n = pl.max_horizontal(pl.len() - 1, 1)
    pct = [
        (1.0 - (pl.col(f"importance_{layer}").rank("ordinal", descending=True) - 1) / n).alias(
            f"_pct_{layer}"
        )
        for layer in range(n_layers)
    ]
    late_importance = pl.sum_horizontal(f"importance_{layer}" for layer in range(n_layers))
    for epoch, offset, size in slices:
        ranked = rollup.slice(offset, size).select(
            "sample_id", late_importance.alias("_late"), *pct
        )
        where = np.searchsorted(ids, ranked["sample_id"].to_numpy())
        count[where] += 1
        if epoch in late:
            late_sum[where] += ranked["_late"].to_numpy()
        for layer in range(n_layers):
            pct_sum[layer][where] += ranked[f"_pct_{layer}"].to_numpy()
    total = pct_sum[0] if n_layers else np.zeros(len(ids))
    for layer in range(1, n_layers):  # left to right, as sum_horizontal adds
        total = total + pct_sum[layer]
    return pl.DataFrame(
        {
            "sample_id": ids.astype(np.int64),
            "importance_late": late_sum,
            "importance_rank": total / np.maximum(n_layers * count, 1),
        }
    )


def score_names(trace: Trace) -> list[str]:
    """The scores `score_table(trace)` offers, in its column order."""
    table = score_table(trace)
    return [
        c for c in table.columns if c not in ("sample_id", "target") and not c.startswith("info_")
    ]


def _budget_count(budget: float, n: int) -> int:
    if (
        isinstance(budget, bool)
        or not isinstance(budget, (int, float))
        or not math.isfinite(budget)
        or budget <= 0
    ):
        msg = f"budget must be a fraction in (0, 1] or a count of samples >= 1, not {budget!r}"
        raise FlagError(msg)
    if isinstance(budget, float) and budget <= 1:
        return min(n, round(budget * n))
    if float(budget) != int(budget):
        msg = f"a budget above 1 is a count of samples and must be whole, not {budget}"
        raise FlagError(msg)
    return min(n, int(budget))


def flag(
    trace: Trace, kind: str = "mislabeled", budget: float = 0.1, score: str | None = None
) -> pl.DataFrame:
    """Rank samples by how likely they are mislabeled (or redundant) and flag the worst.

    Args:
        trace: an open trace.
        kind: ``"mislabeled"`` or ``"redundant"``.
        budget: how many to flag: a fraction of the samples in (0, 1] (a float), or a count.
        score: which score of `score_table` to rank by; default `DEFAULT_SCORE[kind]`.

    Returns:
        One row per sample, ranked (rank 0 first): sample_id, target, the quality column
        (``label_quality`` or ``informativeness``, in [0, 1], lower = more likely an issue),
        ``score`` (the raw score, higher = harder), ``rank`` and ``flagged``.

    Raises:
        FlagError: unknown kind or score, or a bad budget.
    """
    if kind not in KINDS:
        msg = f"kind must be one of {', '.join(KINDS)}, not {kind!r}"
        raise FlagError(msg)
    name = score or DEFAULT_SCORE[kind]
    table = score_table(trace)
    names = [
        c for c in table.columns if c not in ("sample_id", "target") and not c.startswith("info_")
    ]
    if name not in names:
        msg = f"unknown score {name!r}; choose one of {', '.join(names)}"
        raise FlagError(msg)
    count = _budget_count(budget, table.height)
    if table.height and table.get_column(name).fill_nan(None).null_count() == table.height:
        # Ranking samples that all lack the score would flag the first ids: refuse instead.
        scored = [
            n for n in names if table.get_column(n).fill_nan(None).null_count() < table.height
        ]
        msg = (
            f"score {name!r} has no value for any sample (it needs data this trace did not "
            f"record, such as logits and targets); choose one of {', '.join(scored) or 'none'}"
        )
        raise FlagError(msg)
    quality = "label_quality" if kind == "mislabeled" else "informativeness"
    # Mislabeled: flag the hardest first. Redundant: flag the easiest (least useful) first.
    hard_first = kind == "mislabeled"
    frame = table.select("sample_id", "target", pl.col(name).fill_nan(None).alias("score"))
    pct = (pl.col("score").rank("average") - 1) / max(table.height - 1, 1)
    frame = frame.with_columns((1.0 - pct if hard_first else pct).fill_null(0.5).alias(quality))
    frame = (
        frame.sort([quality, "sample_id"])
        .with_row_index("rank")
        .with_columns(
            pl.col("rank").cast(pl.Int64),
            ((pl.col("rank") < count) & pl.col("score").is_not_null()).alias("flagged"),
        )
    )
    return frame.select("sample_id", "target", quality, "score", "rank", "flagged")
