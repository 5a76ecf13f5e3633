"""Pruning: retrain on the samples each score keeps, against random subsets.

A recorded reference run scores every training sample (`samplescope.analysis.flags`,
higher = harder). For each keep fraction and score, the hardest fraction is kept and a model
is trained on it from the same initialisation, without recording; ``random`` keeps a
uniformly random subset. Keeping the hardest is the EL2N / GraNd convention (Paul et al.,
2021): easy samples are the redundant ones.

Every subset trains for the **same number of SGD steps** as the full set (``epochs`` times
the full set's batches per epoch): the kept samples are reshuffled as often as needed. At
equal epochs a subset of half the data would get half the steps, and pruning would be
judged on its training budget instead of its choice of samples (Paul et al. compare at
equal steps too).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import polars as pl

from samplescope.experiments._common import ExperimentError, mean_std, reference_run
from samplescope.experiments.config import RunConfig
from samplescope.experiments.train import train_run

__all__ = ["DEFAULT_PRUNE_SCORES", "equal_step_batches", "run_prune"]

logger = logging.getLogger(__name__)

DEFAULT_PRUNE_SCORES = (
    "random",
    "importance",
    "importance_late",
    "importance_rank",
    "importance_layer0",
    "final_loss",
    "aum",
    "forgetting",
    "confidence",
    "el2n",
    "grand",
    "el2n_ckpt",
    "grand_ckpt",
    "tracin_self",
)
_KNOWN = (
    "importance",
    "importance_late",
    "importance_rank",
    "final_loss",
    "aum",
    "forgetting",
    "confidence",
    "variability",
    "el2n",
    "grand",
    "tracin_self",
    "val_effect",
    "val_helpful",
    "el2n_ckpt",
    "grand_ckpt",
)


def _kept(ids: np.ndarray, scores: pl.DataFrame, name: str, keep: float, seed: int) -> np.ndarray:
    count = max(1, round(keep * len(ids)))
    if name == "random":
        return np.sort(np.random.default_rng(1000 + seed).permutation(ids)[:count])
    values = scores[name].fill_null(-np.inf).fill_nan(-np.inf).to_numpy()
    # Highest score first; ties by id, so the choice is reproducible.
    order = np.lexsort((ids, -values))
    return np.sort(ids[order[:count]])


def equal_step_batches(
    kept: np.ndarray, n_full: int, batch_size: int, rng: np.random.Generator
) -> Callable[[int], list[np.ndarray]]:
    """``batches(epoch)``: as many full batches per epoch as the full set has, from ``kept``.

    The kept ids are drawn from a stream of reshuffles, so each is seen equally often (to
    within one pass) and every subset gets the full set's number of SGD steps.
    """
    per_epoch = -(-n_full // batch_size)
    stream: list[np.ndarray] = []
    buffered = 0

    def take(count: int) -> np.ndarray:
        nonlocal buffered
        while buffered < count:
            stream.append(rng.permutation(kept))
            buffered += len(kept)
        joined = np.concatenate(stream)
        out, rest = joined[:count], joined[count:]
        stream[:] = [rest]
        buffered = len(rest)
        return out

    def batches(epoch: int) -> list[np.ndarray]:
        del epoch
        if len(kept) == n_full:  # the full set: plain epochs, the last batch may be short
            order = take(n_full)
            return [order[i : i + batch_size] for i in range(0, n_full, batch_size)]
        size = min(batch_size, len(kept))
        return [take(size) for _ in range(per_epoch)]

    return batches


def run_prune(
    config: RunConfig,
    out_dir: str | Path,
    keeps: Sequence[float] = (0.5, 0.7, 0.9),
    scores: Sequence[str] = DEFAULT_PRUNE_SCORES,
    recorder_options: dict | None = None,
) -> pl.DataFrame:
    """Retrain on the subset kept by each score (and at random) at each keep fraction.

    Every subset trains for as many SGD steps as the full set (`equal_step_batches`).
    ``recorder_options`` go to the reference run's Recorder (e.g. ``reference=`` for the
    ``val_effect`` / ``val_helpful`` scores).

    Returns:
        One row per (keep, score): final test accuracy and loss, mean and std over seeds,
        SGD steps per run, plus the full-data accuracy as ``keep = 1.0, score = "all"``.
        Also ``prune.csv``.
    """
    for keep in keeps:
        if not 0 < keep <= 1:
            msg = f"keep fractions must be in (0, 1], not {keep}"
            raise ExperimentError(msg)
    known = re.compile(r"random|importance_layer\d+|" + "|".join(_KNOWN))
    unknown = [s for s in scores if not known.fullmatch(s)]
    if unknown:
        msg = (
            f"unknown scores {', '.join(unknown)}; choose from {', '.join(_KNOWN)}, random "
            "or importance_layer<index>"
        )
        raise ExperimentError(msg)
    out = Path(out_dir)
    data, ids, table = reference_run(config, out, recorder_options)
    unknown = [s for s in scores if s != "random" and s not in table.columns]
    if unknown:
        msg = (
            f"unknown scores {', '.join(unknown)}; the reference trace offers "
            f"{', '.join(c for c in table.columns if c not in ('sample_id', 'target'))}"
        )
        raise ExperimentError(msg)
    plan = [(1.0, "all")] + [(k, s) for k in keeps for s in scores]
    rows = []
    for keep, name in plan:
        results = []
        for seed in range(config.seeds):
            kept = ids if name == "all" else _kept(ids, table, name, keep, seed)
            batches = equal_step_batches(
                kept, len(ids), config.batch_size, np.random.default_rng(seed)
            )
            history = train_run(
                config.with_seed(seed),
                None,
                data=data,
                train_indices=kept,
                batch_plan=lambda epoch, rng, batches=batches: batches(epoch),
                progress=False,
            )
            results.append((history.test_accuracy[-1], history.test_loss[-1]))
        acc, acc_std = mean_std([r[0] for r in results])
        loss, loss_std = mean_std([r[1] for r in results])
        logger.info("keep %.2f by %s: test accuracy %.4f", keep, name, acc)
        rows.append(
            {
                "keep": keep,
                "score": name,
                "seeds": config.seeds,
                "steps": config.epochs * -(-len(ids) // config.batch_size),
                "test_accuracy": acc,
                "test_accuracy_std": acc_std,
                "test_loss": loss,
                "test_loss_std": loss_std,
            }
        )
    frame = pl.DataFrame(rows)
    frame.write_csv(out / "prune.csv")
    return frame
