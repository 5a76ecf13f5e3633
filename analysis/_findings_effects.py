"""The effects behind `findings`: per-sample features, their weighted sums, and each claim's
effect under each control, one value per bootstrap replicate.

`features(data)` lays out the per-sample columns once; `sums(features)` is the linear map
from replicate weights to group sums that `_bootstrap.replicate_sums` calls; `effects(claim,
sums, features)` turns the sums into ``{control: [replicates]}`` (None where a control does
not apply). Definitions are in docs/experiments.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from samplescope.analysis._findings_data import RunData

__all__ = ["Features", "Sums", "div", "effects", "features", "partial", "share", "sums", "when"]


@dataclass
class Features:
    """Per-sample columns whose weighted sums give every effect."""

    data: RunData
    imp: np.ndarray  # [S, L*E]
    normed: np.ndarray | None  # [S, E]: input layer / (‖x‖² + 1)
    timed: np.ndarray  # [S, L+1]: total importance · the sample's mean visited epoch
    ranks: np.ndarray  # [S, L]: rank of total importance per layer
    loss_rank: np.ndarray  # [S]
    input_rank: np.ndarray | None  # [S]
    epoch_ranks: np.ndarray  # [S, L, E], float32 below 2**23 samples (exact)
    known: np.ndarray  # [S] bool: difficulty known


def _rank(values: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean rank), as Spearman's rho uses."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    sorted_values = values[order]
    start = np.r_[0, np.flatnonzero(sorted_values[1:] != sorted_values[:-1]) + 1]
    stop = np.r_[start[1:], len(values)]
    means = (start + stop - 1) / 2
    ranks[order] = np.repeat(means, stop - start)
    return ranks


def features(data: RunData) -> Features:
    s, n_layers, n_epochs = data.imp.shape
    total = data.imp.sum(axis=2)  # [S, L]
    visits = data.visits.sum(axis=1)
    mean_epoch = (data.visits * data.epochs).sum(axis=1) / np.maximum(visits, 1)
    normed = None
    timed = total * mean_epoch[:, None]
    if data.input_sq is not None and data.input_norm_exact:
        normed = data.imp[:, 0, :] / (data.input_sq[:, None] + 1.0)
        timed = np.concatenate([timed, (normed.sum(axis=1) * mean_epoch)[:, None]], axis=1)
    known = ~np.isnan(data.final_loss)
    loss = np.where(known, data.final_loss, 0.0)
    # Filled in place (not stacked from a list, which holds the ranks twice). float32 holds
    # every rank exactly (integers and halves below 2**23) at half the memory; the
    # correlations widen them back to float64 a few epochs at a time (`_epoch_corr`).
    exact = np.float32 if s < 2**23 else np.float64
    epoch_ranks = np.empty((s, n_layers, n_epochs), dtype=exact)
    for i in range(n_layers):
        for e in range(n_epochs):
            epoch_ranks[:, i, e] = _rank(data.imp[:, i, e])
    return Features(
        data=data,
        imp=data.imp.reshape(s, n_layers * n_epochs),
        normed=normed,
        timed=timed,
        ranks=np.stack([_rank(total[:, i]) for i in range(n_layers)], 1),
        loss_rank=_rank(loss),
        input_rank=None if data.input_sq is None else _rank(data.input_sq),
        epoch_ranks=epoch_ranks,
        known=known,
    )


# Epochs whose rank columns share one pass over the replicate weights (see `_corr_sums`):
# 4 epochs of a 4-layer, 60k-sample run make a 23 MB product matrix.
_EPOCHS_PER_PASS = 4


def _corr_sums(w: np.ndarray, x: np.ndarray, y: np.ndarray, width: int = 0) -> np.ndarray:
    """Weighted Pearson correlation of the columns of ``x`` [S, K] with ``y`` [S], per row of w.

    ``width`` groups the columns in runs of that many (0: one group) for the constant-column
    threshold, so several calls' columns can share one product with ``w``: the weights are
    the large operand (replicates × samples), and reading them once for all columns instead
    of three times per column group is what makes the bootstrap fast.
    """
    width = width or x.shape[1]
    # Centred first: moments from sums lose every digit to cancellation otherwise.
    k = x.shape[1]
    y = y - y.mean()
    # [x, x², x·y] side by side, written in place: one product with w gives all three.
    columns = np.empty((len(x), 3 * k))
    x = np.subtract(x, x.mean(axis=0), out=columns[:, :k])
    x_sq = np.multiply(x, x, out=columns[:, k : 2 * k])
    np.multiply(x, y[:, None], out=columns[:, 2 * k :])
    sw = w.sum(axis=1, keepdims=True)
    moments = w @ columns
    mx = moments[:, :k] / sw
    my = (w @ y)[:, None] / sw
    vx = moments[:, k : 2 * k] / sw - mx * mx
    vy = (w @ (y * y))[:, None] / sw - my * my
    cov = moments[:, 2 * k :] / sw - mx * my
    # A column constant within a replicate has no correlation (NaN), not a rounding error's.
    yy = float((y * y).mean())
    x_sq_mean = x_sq.reshape(len(x), k // width, width).mean(axis=(0, 2))
    tiny = 1e-9 * np.maximum(x_sq_mean, max(yy, 1e-300))
    tiny = np.repeat(tiny, width)[None, :]
    with np.errstate(all="ignore"):
        r = np.where((vx > tiny) & (vy > tiny), cov / np.sqrt(vx * vy), np.nan)
    return np.clip(r, -1.0, 1.0)


def _epoch_corr(w: np.ndarray, f: Features) -> np.ndarray:
    """[R, L, E]: per epoch and layer, the correlation of importance rank with loss rank."""
    s, n_layers, n_epochs = f.epoch_ranks.shape
    parts = []
    for start in range(0, n_epochs, _EPOCHS_PER_PASS):
        part = f.epoch_ranks[:, :, start : start + _EPOCHS_PER_PASS]
        # Epoch-major, one group per epoch; float64 as the ranks were computed.
        columns = part.transpose(0, 2, 1).reshape(s, -1).astype(np.float64)
        r = _corr_sums(w, columns, f.loss_rank, n_layers)
        parts.append(r.reshape(len(w), part.shape[2], n_layers).transpose(0, 2, 1))
    return np.concatenate(parts, axis=2)


def sums(f: Features) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    data = f.data
    easy, hard = data.easy, data.hard
    n_layers, n_epochs = data.imp.shape[1], data.imp.shape[2]
    # The groups' rows, taken once rather than in every block of replicates.
    rows = {"easy": easy, "hard": hard}
    imp = {g: f.imp[m] for g, m in rows.items()}
    timed = {g: f.timed[m] for g, m in rows.items()}
    normed = None if f.normed is None else {g: f.normed[m] for g, m in rows.items()}
    all_known = bool(f.known.all())

    def weighted(w: np.ndarray) -> dict[str, np.ndarray]:
        r = w.shape[0]
        shape = (r, n_layers, n_epochs)
        part = {g: w[:, m] for g, m in rows.items()}
        out = {
            "easy": (part["easy"] @ imp["easy"]).reshape(shape),
            "hard": (part["hard"] @ imp["hard"]).reshape(shape),
            "all": (w @ f.imp).reshape(shape),
            "easy_timed": part["easy"] @ timed["easy"],
            "hard_timed": part["hard"] @ timed["hard"],
        }
        if normed is not None and f.normed is not None:
            out |= {
                "easy_n0": part["easy"] @ normed["easy"],
                "hard_n0": part["hard"] @ normed["hard"],
                "all_n0": w @ f.normed,
            }
        wk = w if all_known else w * f.known  # no copy of the weights in the usual case
        out["rho"] = _corr_sums(wk, f.ranks, f.loss_rank)
        out["rho_epoch"] = _epoch_corr(wk, f)
        if f.input_rank is not None:
            out["r_xz"] = _corr_sums(wk, f.ranks, f.input_rank)
            out["r_yz"] = _corr_sums(wk, f.input_rank[:, None], f.loss_rank)[:, 0]
        return out

    return weighted


# -- effects: functions of the sums, one value per replicate --------------------------------

Sums = dict[str, np.ndarray]


def _log(x: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        return np.log(x)


def div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1.0), np.nan)


def share(s: Sums, group: str, layer: int, normed: bool = False) -> np.ndarray:
    if normed and layer == 0:
        return div(s[f"{group}_n0"].sum(-1), s["all_n0"].sum(-1))
    return div(s[group][:, layer].sum(-1), s["all"][:, layer].sum(-1))


def _ends(claim: str, n_layers: int) -> tuple[str, int, int]:
    out = n_layers - 1
    return ("easy", out, 0) if claim == "easy_output" else ("hard", 0, out)


def _layer_effects(claim: str, s: Sums, f: Features) -> dict[str, np.ndarray | None]:
    group, favoured, other = _ends(claim, f.data.n_layers)
    n = f.data.n_params
    per_layer = {g: s[g].sum(-1) / n for g in ("easy", "hard")}  # [R, L] per parameter
    depth_axis = np.arange(f.data.n_layers) / max(f.data.n_layers - 1, 1)
    depth = {g: div((per_layer[g] * depth_axis).sum(-1), per_layer[g].sum(-1)) for g in per_layer}
    within = _log(div(s[group][:, favoured], s["all"][:, favoured])) - _log(
        div(s[group][:, other], s["all"][:, other])
    )
    within = np.where(np.isfinite(within), within, np.nan)
    with np.errstate(all="ignore"):
        same_period = np.nanmean(within, axis=1) if within.shape[1] > 1 else None
    normed = None
    if "all_n0" in s:
        normed = _log(share(s, group, favoured, True)) - _log(share(s, group, other, True))
    return {
        "raw": _log(share(s, group, favoured)) - _log(share(s, group, other)),
        "per_param": depth["easy"] - depth["hard"],
        "same_period": same_period,
        "input_norm": normed,
    }


def when(values: np.ndarray, epochs: np.ndarray) -> np.ndarray:
    """Value-weighted mean epoch over the last axis."""
    return div((values * epochs).sum(-1), values.sum(-1))


def _timing_effects(s: Sums, f: Features) -> dict[str, np.ndarray | None]:
    epochs = f.data.epochs.astype(np.float64)
    span = max(float(epochs[-1] - epochs[0]), 1.0)
    n = f.data.n_params[None, :, None]
    raw = (when(s["hard"], epochs) - when(s["easy"], epochs)) / span  # [R, L]
    pp = {g: (s[g] / n).sum(1) for g in ("easy", "hard")}
    shares = {g: div(s[g], s["all"]) for g in ("easy", "hard")}
    within = (when(shares["hard"], epochs) - when(shares["easy"], epochs)) / span
    normed = None
    if "all_n0" in s:
        q = {g: div(s[f"{g}_n0"], s["all_n0"]) for g in ("easy", "hard")}
        normed = (when(q["hard"], epochs) - when(q["easy"], epochs)) / span
    return {
        "raw": raw.min(axis=1),
        "per_param": (when(pp["hard"], epochs) - when(pp["easy"], epochs)) / span,
        "same_period": within.min(axis=1),
        "input_norm": normed,
    }


def _late_effects(s: Sums, f: Features) -> dict[str, np.ndarray | None]:
    epochs = f.data.epochs.astype(np.float64)
    span = max(float(epochs[-1] - epochs[0]), 1.0)
    hard = s["hard"][:, 0]
    uniform = div(s["hard_timed"][:, 0], hard.sum(-1))
    hard_share = div(s["hard"][:, 0], s["all"][:, 0])
    normed = None
    if "all_n0" in s:
        base = div(s["hard_timed"][:, -1], s["hard_n0"].sum(-1))
        normed = (when(s["hard_n0"], epochs) - base) / span
    return {
        "raw": (when(hard, epochs) - uniform) / span,
        # One layer: dividing by its parameter count changes nothing.
        "per_param": None,
        # Within-epoch shares: spread uniformly in time, the share is flat and its weighted
        # mean epoch is the plain mean of the epochs.
        "same_period": (when(hard_share, epochs) - epochs.mean()) / span,
        "input_norm": normed,
    }


def partial(r_xy: np.ndarray, r_xz: np.ndarray, r_yz: np.ndarray) -> np.ndarray:
    # A constant input norm correlates with nothing: there is nothing to partial out.
    r_xz = np.nan_to_num(r_xz)
    r_yz = np.nan_to_num(r_yz)[:, None]
    with np.errstate(all="ignore"):
        return (r_xy - r_xz * r_yz) / np.sqrt((1 - r_xz**2) * (1 - r_yz**2))


def _loss_effects(s: Sums, f: Features) -> dict[str, np.ndarray | None]:
    epochs = s["rho_epoch"].shape[2]
    with np.errstate(all="ignore"):
        per_epoch = np.nanmedian(s["rho_epoch"], axis=2) if epochs > 1 else None
    partial_rho = None
    if "r_xz" in s and f.data.input_norm_exact:
        partial_rho = partial(s["rho"], s["r_xz"], s["r_yz"]).min(axis=1)
    return {
        "raw": s["rho"].min(axis=1),
        # A rank correlation within one layer is unchanged by dividing by its size.
        "per_param": None,
        "same_period": None if per_epoch is None else per_epoch.min(axis=1),
        "input_norm": partial_rho,
    }


def effects(claim: str, s: Sums, f: Features) -> dict[str, np.ndarray | None]:
    if claim in ("easy_output", "hard_input"):
        return _layer_effects(claim, s, f)
    if claim == "easy_early_hard_late":
        return _timing_effects(s, f)
    if claim == "hard_input_late":
        return _late_effects(s, f)
    return _loss_effects(s, f)
