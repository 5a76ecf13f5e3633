"""The paper's claims (Gao & Jojic), checked on one or several runs, with intervals and controls.

`findings(trace)` returns one `Finding` per claim. Each claim is an **effect size** with a
stated **minimum effect** (`MIN_EFFECTS`) and a 90% bootstrap interval over samples
(`_bootstrap`; over seeds too when several runs are pooled). The effect is measured on raw
importance over the whole run and again under up to three controls:

- ``per_param``: importance divided by the layer's parameter count (big layers dominate
  raw sums across layers);
- ``same_period``: the comparison made within each epoch (every sample's importance drifts
  toward the input layer and shrinks as training goes on, so whole-run sums mix periods);
- ``input_norm``: the input layer's importance divided by ``‖x‖² + 1`` (exact for a linear
  first layer, whose per-sample gradient norm is ``‖δ‖²(‖x‖² + 1)``; not applied to other
  first layers, see docs/analysis.md).

A claim is ``"supported"`` only when the raw interval and the interval under every control
that applies lie wholly above the minimum effect; ``"raw sums only"`` when the raw interval
does but a control's does not; ``"not supported"`` when the raw interval does not. A run that
is too short, not converged, still open or ends in a partial epoch, or whose deciles are a
handful of samples, gives ``"inconclusive"`` with the reason, never a verdict. On traces
whose importance is unrelated to difficulty (each step's ``grad_sq`` shuffled among its
batch-mates) a claim is supported in at most 5% of runs (tests/analysis/test_findings_null.py).

Easy and hard are the easiest and hardest deciles by final loss — this run's, or another
run's (``difficulty_from``), since defining difficulty by the same run's final loss makes
"hard samples matter late" nearly true by construction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from samplescope.analysis import _findings_effects as fx
from samplescope.analysis._bootstrap import N_BOOT, Interval, interval, pool, replicate_sums
from samplescope.analysis._findings_data import (
    MIN_DECILE,
    PERIOD_FRACTION,
    FindingsError,
    RunData,
    difficulty_of,
    gather,
    guard,
)

if TYPE_CHECKING:
    import os

    from samplescope.analysis.trace import Trace

    # Where easy and hard come from: another open trace, or what `open_trace` takes.
    DifficultySource = Trace | str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None

__all__ = [
    "CLAIMS",
    "CONTROLS",
    "EFFECTS",
    "MIN_DECILE",
    "MIN_EFFECTS",
    "VERDICTS",
    "Finding",
    "FindingsError",
    "findings",
    "findings_frame",
    "findings_runs",
    "group_runs",
    "headlines",
]

VERDICTS = ("supported", "not supported", "raw sums only", "inconclusive")
CONTROLS = ("per_param", "same_period", "input_norm")

CLAIMS = {
    "easy_output": "Easy samples shape the layers near the output: the easiest decile "
    "carries a larger share of the output layer's importance than of the input layer's.",
    "hard_input": "Hard samples shape the layers near the input: the hardest decile "
    "carries a larger share of the input layer's importance than of the output layer's.",
    "easy_early_hard_late": "Easy samples matter early and hard samples late: the "
    "importance-weighted mean epoch of the easiest decile is earlier than the hardest's, "
    "in every layer.",
    "hard_input_late": "Hard samples shape the input layer late: the hardest decile's "
    "importance-weighted mean epoch in the input layer is later than if each hard sample's "
    "importance were spread uniformly over the epochs it was visited.",
    "importance_tracks_loss": "A sample's importance rises with its final loss: "
    "Spearman correlation of importance with final loss is positive in every layer.",
}

# Each claim's effect, and the smallest value that counts as the claim holding.
EFFECTS = {
    "easy_output": "log(easy share of output layer / easy share of input layer)",
    "hard_input": "log(hard share of input layer / hard share of output layer)",
    "easy_early_hard_late": "min over layers of (hard - easy mean epoch) / run length",
    "hard_input_late": "(hard mean epoch - uniform-in-time mean epoch) / run length, input layer",
    "importance_tracks_loss": "min over layers of Spearman(importance, final loss)",
}
MIN_EFFECTS = {
    "easy_output": math.log(1.1),  # a share at least 10% larger
    "hard_input": math.log(1.1),
    "easy_early_hard_late": 0.05,  # 5% of the run
    "hard_input_late": 0.05,
    "importance_tracks_loss": 0.1,
}
# The per-parameter control of the layer claims compares importance-per-parameter-weighted
# depths (0 = input, 1 = output): easy must sit nearer the output than hard by this much.
MIN_DEPTH = 0.05


@dataclass(frozen=True)
class Finding:
    """One claim's verdict on one run (or on several runs pooled).

    Attributes:
        claim: short id, a key of `CLAIMS`.
        statement: the claim in words.
        verdict: one of `VERDICTS`.
        numbers: the measured values behind the verdict (shares in [0, 1], epochs, rho).
        explanation: one or two sentences saying why the verdict is what it is.
        controls: each control's outcome: True its interval clears the minimum effect,
            False it does not, None not applicable.
        effect: the raw effect's estimate, interval and minimum (None when inconclusive).
        intervals: the effect under each control that applies.
        run: which run: its index among the runs given, or "pooled".
        agreement: for pooled findings, the fraction of runs whose verdict is the pooled one.
        difficulty_source: where easy and hard came from.
    """

    claim: str
    statement: str
    verdict: str
    numbers: dict[str, float]
    explanation: str
    controls: dict[str, bool | None] = field(default_factory=dict)
    effect: Interval | None = None
    intervals: dict[str, Interval] = field(default_factory=dict)
    run: str = "0"
    agreement: float | None = None
    difficulty_source: str = "this run's final loss"


def _min_effect(claim: str, control: str) -> float:
    if control == "per_param" and claim in ("easy_output", "hard_input"):
        return MIN_DEPTH
    return MIN_EFFECTS[claim]


# -- verdicts ------------------------------------------------------------------------------


def _verdict(raw: Interval, intervals: dict[str, Interval]) -> str:
    if not raw.defined:
        return "inconclusive"
    if not raw.clears:
        return "not supported"
    if all(i.clears for i in intervals.values()):
        return "supported"
    return "raw sums only"


_NAMES = {
    "per_param": "per parameter",
    "same_period": "same epoch",
    "input_norm": "input norm",
}


def _fmt(i: Interval) -> str:
    return f"{i.estimate:.3g} [{i.low:.3g}, {i.high:.3g}]"


def _explain(claim: str, raw: Interval, intervals: dict[str, Interval], skipped: list[str]) -> str:
    parts = [f"Effect ({EFFECTS[claim]}) {_fmt(raw)}, 90% interval; minimum {raw.min_effect:.3g}."]
    held = [f"{_NAMES[k]} {_fmt(v)}" for k, v in intervals.items() if v.clears]
    failed = [f"{_NAMES[k]} {_fmt(v)}" for k, v in intervals.items() if not v.clears]
    if held:
        parts.append(f"Clears under {'; '.join(held)}.")
    if failed:
        parts.append(f"Does not clear under {'; '.join(failed)}.")
    if skipped:
        parts.append(f"Not applicable: {', '.join(skipped)}.")
    return " ".join(parts)


def _inconclusive(claim: str, why: str, run: str = "0", source: str = "") -> Finding:
    return Finding(
        claim,
        CLAIMS[claim],
        "inconclusive",
        {},
        f"Inconclusive: {why}.",
        dict.fromkeys(CONTROLS),
        run=run,
        difficulty_source=source or "this run's final loss",
    )


def _finding(
    claim: str,
    effects: dict[str, Interval | None],
    numbers: dict[str, float],
    run: str,
    source: str,
    agreement: float | None = None,
) -> Finding:
    raw = effects["raw"]
    assert raw is not None
    intervals = {k: v for k, v in effects.items() if k != "raw" and v is not None}
    skipped = [_NAMES[k] for k in CONTROLS if effects.get(k) is None]
    controls = {k: (intervals[k].clears if k in intervals else None) for k in CONTROLS}
    numbers = dict(numbers)
    numbers.update(effect=raw.estimate, ci_low=raw.low, ci_high=raw.high)
    for key, value in intervals.items():
        numbers.update(
            {
                f"effect_{key}": value.estimate,
                f"ci_low_{key}": value.low,
                f"ci_high_{key}": value.high,
            }
        )
    return Finding(
        claim,
        CLAIMS[claim],
        _verdict(raw, intervals),
        numbers,
        _explain(claim, raw, intervals, skipped),
        controls,
        raw,
        intervals,
        run,
        agreement,
        source,
    )


# -- one run -------------------------------------------------------------------------------


@dataclass
class _RunResult:
    findings: list[Finding]
    replicates: dict[str, dict[str, np.ndarray]]  # claim -> control -> [1 + reps]


def _numbers(claim: str, s: fx.Sums, data: RunData) -> dict[str, float]:
    """Descriptive numbers (point estimates) behind each claim, for tables and headlines."""
    point = {k: v[:1] for k, v in s.items()}
    out = data.n_layers - 1
    numbers: dict[str, float] = {}
    if claim in ("easy_output", "hard_input"):
        group = "easy" if claim == "easy_output" else "hard"
        mask = data.easy if group == "easy" else data.hard
        period = data.period[mask].sum(0) / np.maximum(data.period.sum(0), 1e-300)
        numbers |= {
            f"{group}_share_output": float(fx.share(point, group, out)[0]),
            f"{group}_share_input": float(fx.share(point, group, 0)[0]),
            f"{group}_share_output_early": float(period[out, 0]),
            f"{group}_share_input_early": float(period[0, 0]),
            f"{group}_share_output_late": float(period[out, 1]),
            f"{group}_share_input_late": float(period[0, 1]),
        }
        if "all_n0" in point:
            numbers[f"{group}_share_input_norm_controlled"] = float(
                fx.share(point, group, 0, True)[0]
            )
        if data.input_sq is not None:
            easy, hard = data.input_sq[data.easy].mean(), data.input_sq[data.hard].mean()
            numbers |= {
                "easy_input_sq": float(easy),
                "hard_input_sq": float(hard),
                "hard_over_easy_input_sq": float(hard / easy) if easy > 0 else math.nan,
            }
    elif claim == "easy_early_hard_late":
        epochs = data.epochs.astype(np.float64)
        for group in ("easy", "hard"):
            raw = fx.when(point[group], epochs)[0]
            within = fx.when(fx.div(point[group], point["all"]), epochs)[0]
            for layer in range(data.n_layers):
                numbers[f"{group}_when_layer{layer}"] = float(raw[layer])
                numbers[f"{group}_when_within_epoch_layer{layer}"] = float(within[layer])
    elif claim == "hard_input_late":
        epochs = data.epochs.astype(np.float64)
        hard = point["hard"][:, 0]
        numbers["hard_when_layer0"] = float(fx.when(hard, epochs)[0])
        numbers["hard_uniform_when_layer0"] = float(
            fx.div(point["hard_timed"][:, 0], hard.sum(-1))[0]
        )
    else:
        for layer in range(data.n_layers):
            numbers[f"rho_layer{layer}"] = float(point["rho"][0, layer])
            with np.errstate(all="ignore"):
                numbers[f"median_epoch_rho_layer{layer}"] = float(
                    np.nanmedian(point["rho_epoch"][0, layer])
                )
            if "r_xz" in point:
                numbers[f"partial_rho_layer{layer}"] = float(
                    fx.partial(point["rho"], point["r_xz"], point["r_yz"])[0, layer]
                )
    return numbers


def _one_run(
    trace: Trace,
    difficulty: pl.DataFrame | None,
    source: str,
    run: str,
    n_boot: int,
    seed: int,
) -> _RunResult:
    why = guard(trace)
    data = None
    if why is None:
        data = gather(trace, difficulty, source)
        why = guard(trace, data)
        if why is None and data.n_layers < 2:
            why = "the trace records a single layer"
    if why is not None:
        label = data.difficulty_source if data is not None else ""
        return _RunResult([_inconclusive(c, why, run, label) for c in CLAIMS], {})
    assert data is not None
    feats = fx.features(data)
    middle = np.flatnonzero(~data.easy & ~data.hard)
    strata = [np.flatnonzero(data.easy), np.flatnonzero(data.hard), middle]
    s = replicate_sums(strata, len(data.sample_ids), n_boot, fx.sums(feats), seed)
    results, replicates = [], {}
    for claim in CLAIMS:
        measured = fx.effects(claim, s, feats)
        replicates[claim] = {k: v for k, v in measured.items() if v is not None}
        intervals = {
            k: None if v is None else interval(v, _min_effect(claim, k))
            for k, v in measured.items()
        }
        if not intervals["raw"].defined:  # type: ignore[union-attr]
            results.append(
                _inconclusive(
                    claim,
                    "the effect is undefined here (no importance in a layer, or importance or "
                    "final loss constant)",
                    run,
                    data.difficulty_source,
                )
            )
            continue
        numbers = _numbers(claim, s, data)
        results.append(_finding(claim, intervals, numbers, run, data.difficulty_source))
    return _RunResult(results, replicates)


def _difficulty(difficulty_from: DifficultySource) -> tuple[pl.DataFrame | None, str]:
    if difficulty_from is None:
        return None, ""
    if hasattr(difficulty_from, "samples"):
        return difficulty_of(difficulty_from), ", ".join(difficulty_from.meta.get("paths", []))
    from samplescope.analysis.trace import open_trace

    with open_trace(difficulty_from) as other:
        return difficulty_of(other), str(difficulty_from)


def findings(
    trace: Trace,
    *,
    difficulty_from: DifficultySource = None,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> list[Finding]:
    """Check the paper's claims on one run, each with its interval and controls.

    Args:
        trace: an open `samplescope.analysis.Trace` whose visits recorded targets and
            logits (so final loss, difficulty and input norms are known).
        difficulty_from: another run of the same data (a path or an open trace) whose
            final loss defines easy and hard, so difficulty is not taken from the run whose
            importance is measured.
        n_boot: bootstrap replicates.
        seed: the bootstrap's seed.

    Returns:
        One `Finding` per entry of `CLAIMS`, in that order.

    Raises:
        FindingsError: the difficulty run shares too few samples with `trace`.
    """
    difficulty, source = _difficulty(difficulty_from)
    return _one_run(trace, difficulty, source, "0", n_boot, seed).findings


def findings_runs(
    traces: Sequence[Trace],
    *,
    difficulty_from: DifficultySource = None,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> list[Finding]:
    """The claims on each of several runs of the same data, then pooled over them.

    Args:
        traces: open traces (e.g. one per seed); each is checked on its own.
        difficulty_from: as for `findings`, used for every run.
        n_boot: bootstrap replicates per run.
        seed: the bootstrap's seed.

    Returns:
        Each run's findings (``run`` = its index), then one pooled finding per claim
        (``run = "pooled"``): the mean effect over runs with an interval from resampling runs
        and samples together, and ``agreement``, the fraction of runs whose verdict matches.
        If any run is inconclusive, the pooled findings are too.

    Raises:
        FindingsError: fewer than two runs, or runs that do not share their samples.
    """
    if len(traces) < 2:
        msg = "findings_runs needs at least two runs; use findings() for one"
        raise FindingsError(msg)
    _check_same_data(traces)
    difficulty, source = _difficulty(difficulty_from)
    runs = [
        _one_run(t, difficulty, source, str(i), n_boot, seed + 7919 * i)
        for i, t in enumerate(traces)
    ]
    out = [f for r in runs for f in r.findings]
    for index, claim in enumerate(CLAIMS):
        per_run = [r.findings[index] for r in runs]
        bad = [f for f in per_run if f.verdict == "inconclusive" and f.effect is None]
        label = per_run[0].difficulty_source
        if bad:
            out.append(
                _inconclusive(
                    claim,
                    f"run {bad[0].run} is inconclusive ({bad[0].explanation[14:].rstrip('.')})",
                    "pooled",
                    label,
                )
            )
            continue
        keys = runs[0].replicates[claim].keys()
        effects: dict[str, Interval | None] = dict.fromkeys(CONTROLS)
        for key in keys:
            effects[key] = pool(
                [r.replicates[claim][key] for r in runs], _min_effect(claim, key), seed
            )
        means = {
            k: float(np.mean([f.numbers[k] for f in per_run if k in f.numbers]))
            for k in per_run[0].numbers
            if not k.startswith(("effect", "ci_"))
        }
        pooled = _finding(claim, effects, means, "pooled", label)
        agree = float(np.mean([f.verdict == pooled.verdict for f in per_run]))
        out.append(
            Finding(
                **{
                    **pooled.__dict__,
                    "agreement": agree,
                    "explanation": f"{pooled.explanation} {_agreement_text(per_run, pooled)}",
                }
            )
        )
    return out


def _agreement_text(per_run: list[Finding], pooled: Finding) -> str:
    same = sum(f.verdict == pooled.verdict for f in per_run)
    verdicts = ", ".join(f.verdict for f in per_run)
    return f"{same} of {len(per_run)} runs agree ({verdicts})."


def _check_same_data(traces: Sequence[Trace]) -> None:
    first = set(
        np.asarray(
            traces[0].table("visits").select("sample_id").unique().collect()["sample_id"]
        ).tolist()
    )
    for index, other in enumerate(traces[1:], 1):
        ids = set(
            other.table("visits").select("sample_id").unique().collect()["sample_id"].to_list()
        )
        shared = len(first & ids)
        if shared < 0.5 * max(len(first), len(ids)):
            msg = (
                f"run {index} shares {shared} of its {len(ids)} samples with run 0 "
                f"({len(first)}); pool only runs of the same data"
            )
            raise FindingsError(msg)


def group_runs(paths: Sequence[str | Path]) -> list[list[str]]:
    """Split trace paths into runs: shards of one run share a run_id, seeds do not.

    Args:
        paths: files or globs, as `open_trace` takes them.

    Returns:
        One list of paths per run, in order of first appearance.
    """
    import h5py

    from samplescope.analysis._hdf5 import resolve_paths

    runs: dict[str, list[str]] = {}
    for path in resolve_paths(list(paths)):
        try:
            with h5py.File(path, "r", locking=False) as f:
                run_id = str(f.attrs.get("run_id", path))
        except OSError:
            run_id = str(path)  # open_trace will say what is wrong with it
        runs.setdefault(run_id, []).append(str(path))
    return list(runs.values())


def findings_frame(results: list[Finding]) -> pl.DataFrame:
    """The findings as a table.

    Columns: run (only for several runs), claim, verdict, effect, ci_low, ci_high,
    min_effect, one boolean column per control, agreement (only for several runs),
    difficulty, explanation.
    """
    several = any(f.run != "0" for f in results)

    def value(f: Finding, attr: str) -> float | None:
        return None if f.effect is None else getattr(f.effect, attr)

    columns: dict[str, list[Any]] = {}
    schema: dict[str, Any] = {}
    if several:
        columns["run"], schema["run"] = [f.run for f in results], pl.String
    columns |= {
        "claim": [f.claim for f in results],
        "verdict": [f.verdict for f in results],
        "effect": [value(f, "estimate") for f in results],
        "ci_low": [value(f, "low") for f in results],
        "ci_high": [value(f, "high") for f in results],
        "min_effect": [MIN_EFFECTS[f.claim] for f in results],
    }
    schema |= {"claim": pl.String, "verdict": pl.String}
    schema |= dict.fromkeys(("effect", "ci_low", "ci_high", "min_effect"), pl.Float64)
    for control in CONTROLS:
        columns[control] = [f.controls.get(control) for f in results]
        schema[control] = pl.Boolean
    if several:
        columns["agreement"], schema["agreement"] = [f.agreement for f in results], pl.Float64
    columns["difficulty"] = [f.difficulty_source for f in results]
    columns["explanation"] = [f.explanation for f in results]
    schema |= {"difficulty": pl.String, "explanation": pl.String}
    return pl.DataFrame(columns, schema=schema)


def _pct(share: float) -> str:
    """A share as a percentage: whole numbers from 10%, then one or two decimals."""
    if share >= 0.095:
        return f"{share:.0%}"
    return f"{share:.1%}" if share >= 0.00095 else f"{share:.2%}"


def headlines(trace: Trace, results: list[Finding] | None = None) -> list[str]:
    """Three to five plain-language sentences summarising `findings(trace)`.

    Args:
        trace: an open trace.
        results: `findings(trace)` (or the pooled part of `findings_runs`) if computed.
    """
    results = results if results is not None else findings(trace)
    if any(f.run == "pooled" for f in results):
        results = [f for f in results if f.run == "pooled"]
    by_claim = {f.claim: f for f in results}
    if all(f.verdict == "inconclusive" for f in results):
        return [results[0].explanation]
    easy, hard = by_claim["easy_output"].numbers, by_claim["hard_input"].numbers
    timing, late = by_claim["easy_early_hard_late"].numbers, by_claim["hard_input_late"].numbers
    loss = by_claim["importance_tracks_loss"]
    lines = []
    if "easy_share_output_early" in easy:
        lines.append(
            f"The easiest 10% of samples carried {_pct(easy['easy_share_output_early'])} of the "
            f"output layer's importance in the first {PERIOD_FRACTION:.0%} of training "
            f"(and {_pct(easy['easy_share_input_early'])} of the input layer's)."
        )
    if "hard_share_input_late" in hard:
        lines.append(
            f"The hardest 10% carried {_pct(hard['hard_share_input_late'])} of the input "
            f"layer's importance in the last {PERIOD_FRACTION:.0%} of training "
            f"(and {_pct(hard['hard_share_output_late'])} of the output layer's)."
        )
    if "easy_when_layer0" in timing:
        lines.append(
            f"Weighted by importance, easy samples mattered at epoch "
            f"{timing['easy_when_layer0'] + 1:.1f} on average and hard ones at epoch "
            f"{timing['hard_when_layer0'] + 1:.1f} (input layer; epoch 1 = the first)"
            + (
                f"; spread uniformly in time, the hard ones' would be "
                f"{late['hard_uniform_when_layer0'] + 1:.1f}."
                if "hard_uniform_when_layer0" in late
                else "."
            )
        )
    verdicts = ", ".join(f"{f.claim.replace('_', ' ')}: {f.verdict}" for f in results)
    rhos = [v for k, v in loss.numbers.items() if k.startswith("rho_layer")]
    rho_text = (
        f"importance vs final loss ρ = {np.median(rhos):.2f} (median over layers); " if rhos else ""
    )
    source = results[0].difficulty_source
    lines.append(
        f"With 90% intervals and minimum effects, difficulty from {source}: {rho_text}{verdicts}."
    )
    return lines
