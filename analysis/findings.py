"""The paper's claims (Gao & Jojic), checked on a trace, with the controls reviewers asked for.

`findings(trace)` returns one `Finding` per claim. Each claim is first tested on raw
importance sums over the whole run; then under up to three controls:

- ``per_param``: importance divided by the layer's parameter count (big layers dominate
  raw sums across layers);
- ``same_period``: the comparison made within each epoch (every sample's importance drifts
  toward the input layer and shrinks as training goes on, so whole-run sums mix periods);
- ``input_norm``: the input layer's importance divided by ``input_sq + 1`` (a linear
  layer's per-sample gradient norm scales with ``‖x‖² + 1``, so large inputs look important
  in the input layer; hard samples may just be larger inputs).

A claim that fails raw is ``"not supported"``; one that holds raw and under every control
that applies is ``"supported"``; one that holds raw but fails a control is
``"raw sums only"``; too little data (one layer, one epoch, deciles of a handful of
samples) gives ``"inconclusive"``. Easy and hard are the easiest and hardest deciles by
final loss (`samples().difficulty_decile`). Everything is read through the analysis API.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

__all__ = ["CLAIMS", "VERDICTS", "Finding", "findings", "findings_frame", "headlines"]

VERDICTS = ("supported", "not supported", "raw sums only", "inconclusive")

CLAIMS = {
    "easy_output": "Easy samples shape the layers near the output: the easiest decile "
    "carries a larger share of the output layer's importance than of the input layer's.",
    "hard_input": "Hard samples shape the layers near the input: the hardest decile "
    "carries a larger share of the input layer's importance than of the output layer's.",
    "easy_early_hard_late": "Easy samples matter early and hard samples late: the "
    "importance-weighted mean epoch of the easiest decile is earlier than the hardest's, "
    "in every layer.",
    "importance_tracks_loss": "A sample's importance rises with its final loss: "
    "Spearman correlation of importance with final loss is positive in every layer.",
}

# The first and last fifth of training form the "early" and "late" periods of the headlines.
PERIOD_FRACTION = 0.2
# Spearman correlations below this are treated as no relation.
MIN_RHO = 0.1
# Deciles of fewer samples than this make a claim inconclusive.
MIN_DECILE = 3


@dataclass(frozen=True)
class Finding:
    """One claim's verdict on one trace.

    Attributes:
        claim: short id, a key of `CLAIMS`.
        statement: the claim in words.
        verdict: one of `VERDICTS`.
        numbers: the measured values behind the verdict (shares in [0, 1], epochs, rho).
        explanation: one or two sentences saying why the verdict is what it is.
        controls: each control's outcome: True passed, False failed, None not applicable.
    """

    claim: str
    statement: str
    verdict: str
    numbers: dict[str, float]
    explanation: str
    controls: dict[str, bool | None] = field(default_factory=dict)


@dataclass
class _Data:
    imp: pl.DataFrame  # step, epoch, sample_id, layer_index, importance, per_param, imp_in, group
    samples: pl.DataFrame  # sample_id, group, final_loss, input_sq
    n_layers: int
    epochs: list[int]
    input_norm_known: bool


def _gather(trace: Any) -> _Data:
    layers = trace.layers().sort("layer_index")
    samples = trace.samples()
    input_sq = (
        samples["input_sq"]
        if "input_sq" in samples.columns
        else pl.Series("input_sq", [None] * samples.height, dtype=pl.Float64)
    )
    top = samples["difficulty_decile"].max()
    samples = samples.select(
        "sample_id",
        "final_loss",
        input_sq.cast(pl.Float64).alias("input_sq"),
        pl.when(pl.col("difficulty_decile") == 0)
        .then(pl.lit("easy"))
        .when((pl.col("difficulty_decile") == top) & (top > 0))
        .then(pl.lit("hard"))
        .otherwise(pl.lit(None, dtype=pl.String))
        .alias("group"),
    )
    n_params = layers.select("layer_index", pl.col("n_params").cast(pl.Float64))
    imp = (
        trace.table("importance")
        .select("step", "epoch", "sample_id", "layer_index", "importance")
        .collect()
        .join(n_params, on="layer_index", how="left")
        .join(samples.select("sample_id", "group", "input_sq"), on="sample_id", how="left")
    )
    steps = imp.select("step").unique().sort("step").with_row_index("_pos")
    n_steps = max(steps.height, 1)
    imp = (
        imp.join(steps, on="step")
        .with_columns(
            pl.col("importance").cast(pl.Float64),
            (pl.col("importance") / pl.col("n_params")).alias("per_param"),
            pl.when(pl.col("layer_index") == 0)
            .then(pl.col("importance") / (pl.col("input_sq") + 1.0))
            .otherwise(pl.col("importance"))
            .alias("imp_in"),
            pl.when(pl.col("_pos") < PERIOD_FRACTION * n_steps)
            .then(pl.lit("early"))
            .when(pl.col("_pos") >= (1 - PERIOD_FRACTION) * n_steps)
            .then(pl.lit("late"))
            .otherwise(pl.lit(None, dtype=pl.String))
            .alias("period"),
        )
        .drop("_pos", "n_params", "input_sq")
    )
    known = samples["input_sq"].drop_nulls().drop_nans()
    return _Data(
        imp=imp,
        samples=samples,
        n_layers=layers.height,
        epochs=sorted(imp["epoch"].unique().to_list()),
        input_norm_known=known.len() == samples.height and samples.height > 0,
    )


def _shares(imp: pl.DataFrame, value: str, by: tuple[str, ...] = ()) -> pl.DataFrame:
    """Each group's share of each layer's `value` (per `by`): group, layer_index, *by, share."""
    keys = ["layer_index", *by]
    total = imp.group_by(keys).agg(pl.col(value).sum().alias("_total"))
    part = (
        imp.filter(pl.col("group").is_not_null())
        .group_by(["group", *keys])
        .agg(pl.col(value).sum().alias("_part"))
    )
    return part.join(total, on=keys).select(
        "group",
        *keys,
        pl.when(pl.col("_total") > 0).then(pl.col("_part") / pl.col("_total")).alias("share"),
    )


def _share(shares: pl.DataFrame, group: str, layer: int, **keys: Any) -> float:
    frame = shares.filter((pl.col("group") == group) & (pl.col("layer_index") == layer))
    for key, value in keys.items():
        frame = frame.filter(pl.col(key) == value)
    if frame.height == 0 or frame["share"][0] is None:
        return 0.0
    return float(frame["share"][0])


def _depth(imp: pl.DataFrame, value: str, n_layers: int) -> dict[str, float]:
    """Value-weighted mean layer depth per group, 0 = input layer, 1 = output layer."""
    frame = (
        imp.filter(pl.col("group").is_not_null())
        .group_by("group")
        .agg(
            (
                (pl.col("layer_index") * pl.col(value)).sum()
                / pl.col(value).sum()
                / max(n_layers - 1, 1)
            ).alias("depth")
        )
    )
    return {row["group"]: _num(row["depth"]) for row in frame.iter_rows(named=True)}


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)


def _verdict(raw: bool, controls: dict[str, bool | None]) -> str:
    if not raw:
        return "not supported"
    if all(c is not False for c in controls.values()):
        return "supported"
    return "raw sums only"


def _too_small(data: _Data) -> str | None:
    counts = data.samples["group"].value_counts()
    sizes = {row["group"]: row["count"] for row in counts.iter_rows(named=True)}
    if min(sizes.get("easy", 0), sizes.get("hard", 0)) < MIN_DECILE:
        return (
            f"the easiest and hardest deciles need at least {MIN_DECILE} samples each "
            f"(this trace has {data.samples.height} samples)"
        )
    if float(data.imp["importance"].sum()) <= 0 or not math.isfinite(
        float(data.imp["importance"].sum())
    ):
        return "the trace's total importance is zero or not finite"
    return None


def _inconclusive(claim: str, why: str) -> Finding:
    return Finding(
        claim,
        CLAIMS[claim],
        "inconclusive",
        {},
        f"Inconclusive: {why}.",
        {"per_param": None, "same_period": None, "input_norm": None},
    )


def _layer_claim(data: _Data, claim: str) -> Finding:
    """easy_output / hard_input: a group's share of one end layer beats its share of the other."""
    if data.n_layers < 2:
        return _inconclusive(claim, "the trace records a single layer")
    out = data.n_layers - 1
    group, favoured, other = ("easy", out, 0) if claim == "easy_output" else ("hard", 0, out)
    raw = _shares(data.imp, "importance")
    by_epoch = _shares(data.imp, "importance", ("epoch",))
    by_period = _shares(data.imp.filter(pl.col("period").is_not_null()), "importance", ("period",))
    wins = [
        _share(by_epoch, group, favoured, epoch=e) > _share(by_epoch, group, other, epoch=e)
        for e in data.epochs
    ]
    depth_pp = _depth(data.imp, "per_param", data.n_layers)
    nearer_out = depth_pp.get("easy", math.nan) > depth_pp.get("hard", math.nan)
    numbers = {
        f"{group}_share_output": _share(raw, group, out),
        f"{group}_share_input": _share(raw, group, 0),
        f"{group}_share_output_early": _share(by_period, group, out, period="early"),
        f"{group}_share_input_early": _share(by_period, group, 0, period="early"),
        f"{group}_share_output_late": _share(by_period, group, out, period="late"),
        f"{group}_share_input_late": _share(by_period, group, 0, period="late"),
        "epochs_holding_fraction": float(np.mean(wins)) if wins else math.nan,
        "easy_depth_per_param": depth_pp.get("easy", math.nan),
        "hard_depth_per_param": depth_pp.get("hard", math.nan),
    }
    passes = (
        numbers[f"{group}_share_{'output' if favoured else 'input'}"]
        > numbers[f"{group}_share_{'input' if favoured else 'output'}"]
    )
    controls: dict[str, bool | None] = {
        "per_param": bool(nearer_out),
        "same_period": (numbers["epochs_holding_fraction"] > 0.5) if len(wins) > 1 else None,
        "input_norm": None,
    }
    if data.input_norm_known:
        normed = _shares(data.imp, "imp_in")
        numbers[f"{group}_share_input_norm_controlled"] = _share(normed, group, 0)
        left = _share(normed, group, favoured)
        right = _share(normed, group, other)
        controls["input_norm"] = left > right
        numbers.update(_input_norms(data))
    verdict = _verdict(passes, controls)
    end, far = ("output", "input") if favoured else ("input", "output")
    label = "easiest" if group == "easy" else "hardest"
    explanation = (
        f"The {label} decile carried {_pct(numbers[f'{group}_share_{end}'])} of the {end} "
        f"layer's importance and {_pct(numbers[f'{group}_share_{far}'])} of the {far} layer's "
        f"over the run. {_control_text(controls)}"
    )
    return Finding(claim, CLAIMS[claim], verdict, numbers, explanation, controls)


def _input_norms(data: _Data) -> dict[str, float]:
    means = (
        data.samples.filter(pl.col("group").is_not_null())
        .group_by("group")
        .agg(pl.col("input_sq").mean())
    )
    values = {row["group"]: _num(row["input_sq"]) for row in means.iter_rows(named=True)}
    easy, hard = values.get("easy", math.nan), values.get("hard", math.nan)
    return {
        "easy_input_sq": easy,
        "hard_input_sq": hard,
        "hard_over_easy_input_sq": hard / easy if easy > 0 else math.nan,
    }


def _control_text(controls: dict[str, bool | None]) -> str:
    names = {
        "per_param": "per-parameter normalisation",
        "same_period": "same-epoch comparison",
        "input_norm": "input-norm control",
    }
    held = [names[k] for k, v in controls.items() if v is True]
    failed = [names[k] for k, v in controls.items() if v is False]
    parts = []
    if held:
        parts.append(f"Holds under {', '.join(held)}.")
    if failed:
        parts.append(f"Fails under {', '.join(failed)}.")
    skipped = [names[k] for k, v in controls.items() if v is None]
    if skipped:
        parts.append(f"Not checked: {', '.join(skipped)}.")
    return " ".join(parts)


def _when(imp: pl.DataFrame, value: str, by_layer: bool) -> pl.DataFrame:
    keys = ["group", "layer_index"] if by_layer else ["group"]
    return (
        imp.filter(pl.col("group").is_not_null())
        .group_by(keys)
        .agg(((pl.col("epoch") * pl.col(value)).sum() / pl.col(value).sum()).alias("when"))
    )


def _when_of(frame: pl.DataFrame, group: str, layer: int | None = None) -> float:
    frame = frame.filter(pl.col("group") == group)
    if layer is not None:
        frame = frame.filter(pl.col("layer_index") == layer)
    return _num(frame["when"][0]) if frame.height else math.nan


def _timing_claim(data: _Data) -> Finding:
    claim = "easy_early_hard_late"
    if len(data.epochs) < 2:
        return _inconclusive(claim, "the trace covers a single epoch")
    imp = data.imp.with_columns(
        (pl.col("importance") / pl.col("importance").sum().over("epoch", "layer_index")).alias(
            "epoch_share"
        ),
        (pl.col("imp_in") / pl.col("imp_in").sum().over("epoch", "layer_index")).alias(
            "epoch_share_in"
        ),
    )
    raw = _when(imp, "importance", True)
    normed = _when(imp, "epoch_share", True)
    layers = range(data.n_layers)
    numbers: dict[str, float] = {}
    for layer in layers:
        for group in ("easy", "hard"):
            numbers[f"{group}_when_layer{layer}"] = _when_of(raw, group, layer)
            numbers[f"{group}_when_within_epoch_layer{layer}"] = _when_of(normed, group, layer)
    per_param = _when(imp, "per_param", False)
    numbers["easy_when_per_param"] = _when_of(per_param, "easy")
    numbers["hard_when_per_param"] = _when_of(per_param, "hard")
    passes = all(numbers[f"easy_when_layer{x}"] < numbers[f"hard_when_layer{x}"] for x in layers)
    controls: dict[str, bool | None] = {
        "per_param": numbers["easy_when_per_param"] < numbers["hard_when_per_param"],
        "same_period": all(
            numbers[f"easy_when_within_epoch_layer{x}"]
            < numbers[f"hard_when_within_epoch_layer{x}"]
            for x in layers
        ),
        "input_norm": None,
    }
    if data.input_norm_known:
        normed_in = _when(imp, "epoch_share_in", True)
        numbers["easy_when_input_norm_controlled"] = _when_of(normed_in, "easy", 0)
        numbers["hard_when_input_norm_controlled"] = _when_of(normed_in, "hard", 0)
        controls["input_norm"] = (
            numbers["easy_when_input_norm_controlled"] < numbers["hard_when_input_norm_controlled"]
        )
    last = data.n_layers - 1
    explanation = (
        # Sentences count epochs from 1, as the report's axes do; `numbers` keep the trace's
        # 0-based epochs.
        f"Importance-weighted mean epoch (1 = first), input layer: easy "
        f"{numbers['easy_when_layer0'] + 1:.2f} vs hard {numbers['hard_when_layer0'] + 1:.2f}; "
        f"output layer: easy {numbers[f'easy_when_layer{last}'] + 1:.2f} vs hard "
        f"{numbers[f'hard_when_layer{last}'] + 1:.2f}. "
        f"{_control_text(controls)}"
    )
    return Finding(claim, CLAIMS[claim], _verdict(passes, controls), numbers, explanation, controls)


def _partial(r_xy: float, r_xz: float, r_yz: float) -> float:
    # A constant input norm correlates with nothing: there is nothing to partial out.
    r_xz = 0.0 if math.isnan(r_xz) else r_xz
    r_yz = 0.0 if math.isnan(r_yz) else r_yz
    denominator = math.sqrt(max((1 - r_xz**2) * (1 - r_yz**2), 0.0))
    return (r_xy - r_xz * r_yz) / denominator if denominator > 0 else math.nan


def _loss_claim(data: _Data) -> Finding:
    claim = "importance_tracks_loss"
    samples = data.samples.select("sample_id", "final_loss", "input_sq")
    per_layer = (
        data.imp.group_by("sample_id", "layer_index")
        .agg(pl.col("importance").sum())
        .join(samples, on="sample_id")
    )
    rho = (
        per_layer.group_by("layer_index")
        .agg(
            pl.corr("importance", "final_loss", method="spearman").alias("rho"),
            pl.corr("importance", "input_sq", method="spearman").alias("r_xz"),
            pl.corr("final_loss", "input_sq", method="spearman").alias("r_yz"),
        )
        .sort("layer_index")
    )
    per_epoch = (
        data.imp.group_by("sample_id", "layer_index", "epoch")
        .agg(pl.col("importance").sum())
        .join(samples, on="sample_id")
        .group_by("layer_index", "epoch")
        .agg(pl.corr("importance", "final_loss", method="spearman").alias("rho"))
        .group_by("layer_index")
        .agg(pl.col("rho").median().alias("median"), pl.col("rho").min().alias("min"))
        .sort("layer_index")
    )
    numbers: dict[str, float] = {}
    for row in rho.iter_rows(named=True):
        layer = row["layer_index"]
        numbers[f"rho_layer{layer}"] = _num(row["rho"])
        if data.input_norm_known:
            numbers[f"partial_rho_layer{layer}"] = _partial(
                _num(row["rho"]), _num(row["r_xz"]), _num(row["r_yz"])
            )
    for row in per_epoch.iter_rows(named=True):
        numbers[f"median_epoch_rho_layer{row['layer_index']}"] = _num(row["median"])
        numbers[f"min_epoch_rho_layer{row['layer_index']}"] = _num(row["min"])
    layers = range(data.n_layers)
    if any(math.isnan(numbers.get(f"rho_layer{x}", math.nan)) for x in layers):
        return _inconclusive(
            claim, "importance or final loss is constant, so no rank correlation can be computed"
        )
    passes = all(numbers[f"rho_layer{x}"] >= MIN_RHO for x in layers)
    controls: dict[str, bool | None] = {
        # A rank correlation within one layer is unchanged by dividing by its size.
        "per_param": True,
        "same_period": (
            all(numbers[f"median_epoch_rho_layer{x}"] >= MIN_RHO for x in layers)
            if len(data.epochs) > 1
            else None
        ),
        "input_norm": (
            all(numbers[f"partial_rho_layer{x}"] >= MIN_RHO for x in layers)
            if data.input_norm_known
            else None
        ),
    }
    values = [numbers[f"rho_layer{x}"] for x in layers]
    explanation = (
        f"Spearman ρ of whole-run importance with final loss ranges {min(values):.2f} to "
        f"{max(values):.2f} over layers (threshold {MIN_RHO}). {_control_text(controls)}"
    )
    return Finding(claim, CLAIMS[claim], _verdict(passes, controls), numbers, explanation, controls)


def findings(trace: Any) -> list[Finding]:
    """Check the paper's four claims on `trace`, each with its controls.

    Args:
        trace: an open `samplescope.analysis.Trace` whose visits recorded targets and
            logits (so final loss, difficulty and input norms are known).

    Returns:
        One `Finding` per entry of `CLAIMS`, in that order.
    """
    data = _gather(trace)
    small = _too_small(data)
    if small is not None:
        return [_inconclusive(claim, small) for claim in CLAIMS]
    return [
        _layer_claim(data, "easy_output"),
        _layer_claim(data, "hard_input"),
        _timing_claim(data),
        _loss_claim(data),
    ]


def findings_frame(results: list[Finding]) -> pl.DataFrame:
    """The findings as a table: claim, verdict, one column per control, explanation."""
    return pl.DataFrame(
        {
            "claim": [f.claim for f in results],
            "verdict": [f.verdict for f in results],
            "per_param": [f.controls.get("per_param") for f in results],
            "same_period": [f.controls.get("same_period") for f in results],
            "input_norm": [f.controls.get("input_norm") for f in results],
            "explanation": [f.explanation for f in results],
        },
        schema={
            "claim": pl.String,
            "verdict": pl.String,
            "per_param": pl.Boolean,
            "same_period": pl.Boolean,
            "input_norm": pl.Boolean,
            "explanation": pl.String,
        },
    )


def _pct(share: float) -> str:
    """A share as a percentage: whole numbers from 10%, then one or two decimals."""
    if share >= 0.095:
        return f"{share:.0%}"
    return f"{share:.1%}" if share >= 0.00095 else f"{share:.2%}"


def headlines(trace: Any, results: list[Finding] | None = None) -> list[str]:
    """Three or four plain-language sentences summarising `findings(trace)`.

    Args:
        trace: an open trace.
        results: `findings(trace)` if already computed.
    """
    results = results if results is not None else findings(trace)
    by_claim = {f.claim: f for f in results}
    if all(f.verdict == "inconclusive" for f in results):
        return [results[0].explanation]
    easy, hard = by_claim["easy_output"].numbers, by_claim["hard_input"].numbers
    timing, loss = by_claim["easy_early_hard_late"].numbers, by_claim["importance_tracks_loss"]
    lines = []
    pct = _pct
    if easy:
        lines.append(
            f"The easiest 10% of samples carried {pct(easy['easy_share_output_early'])} of the "
            f"output layer's importance in the first {PERIOD_FRACTION:.0%} of training "
            f"(and {pct(easy['easy_share_input_early'])} of the input layer's)."
        )
    if hard:
        lines.append(
            f"The hardest 10% carried {pct(hard['hard_share_input_late'])} of the input "
            f"layer's importance in the last {PERIOD_FRACTION:.0%} of training "
            f"(and {pct(hard['hard_share_output_late'])} of the output layer's)."
        )
    if timing:
        lines.append(
            f"Weighted by importance, easy samples mattered at epoch "
            f"{timing['easy_when_layer0'] + 1:.1f} on average and hard ones at epoch "
            f"{timing['hard_when_layer0'] + 1:.1f} (input layer; epoch 1 = the first)."
        )
    verdicts = ", ".join(f"{f.claim.replace('_', ' ')}: {f.verdict}" for f in results)
    rhos = [v for k, v in loss.numbers.items() if k.startswith("rho_layer")]
    rho_text = (
        f"importance vs final loss ρ = {np.median(rhos):.2f} (median over layers); " if rhos else ""
    )
    lines.append(f"Under the controls, {rho_text}{verdicts}.")
    return lines
