"""Validation attribution on Fashion-MNIST, reduced: noisy-label detection and pruning.

    python bench/val_attribution.py --subset 10000 --epochs 4 --seeds 1 --out /tmp/va

A fixed reference batch of ``--reference`` training samples outside the subset (their
clean labels; never trained on) is recorded with ``Recorder(reference=...,
reference_every=--every)``. Then:

- noise: 20 % of the subset's labels flipped; AUROC/AP of every score of
  `samplescope.analysis.flags.score_table` (val_effect among them) at finding them;
- prune: keep 0.5 / 0.7 / 0.9 of the clean subset by each score at equal SGD steps
  (`samplescope.experiments.prune.run_prune`); test accuracy.

The full issue setting (60k samples, 3 seeds) is ``--subset 0 --seeds 3``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samplescope.experiments.config import RunConfig
from samplescope.experiments.noise import run_noise
from samplescope.experiments.prune import run_prune

NOISE_SCORES = ("val_effect", "aum", "confidence", "final_loss", "importance", "el2n", "el2n_ckpt")
PRUNE_SCORES = ("random", "el2n", "el2n_ckpt", "importance", "val_helpful", "val_effect")


def _loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(model(x), y, reduction="none")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subset", type=int, default=10000, help="0: all 60k")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--reference", type=int, default=500)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--skip-prune", action="store_true")
    parser.add_argument("--skip-noise", action="store_true")
    parser.add_argument("--out", default="/tmp/val_attribution")
    args = parser.parse_args()
    torch.set_num_threads(1)
    setting = RunConfig(
        dataset="fashion-mnist", epochs=args.epochs, subset=args.subset or None, seeds=args.seeds
    )
    data = setting.load()
    ids = setting.train_ids(data)
    outside = np.setdiff1d(np.arange(len(data.x_train)), ids)
    if outside.size < args.reference:  # the full set: the reference comes from the test split
        pick = np.random.default_rng(1).permutation(len(data.x_test))[: args.reference]
        x_ref, y_ref = data.x_test[pick], data.y_test[pick]
    else:
        pick = np.random.default_rng(1).permutation(outside)[: args.reference]
        x_ref, y_ref = data.x_train[pick], data.y_train[pick]
    options = {"reference": (x_ref, y_ref), "reference_loss": _loss, "reference_every": args.every}
    out = Path(args.out)
    print(
        f"fashion-mnist, {len(ids)} training samples, {args.epochs} epochs, {args.seeds} seed(s), "
        f"MLP {setting.depth}x{setting.hidden}, batch {setting.batch_size}, lr {setting.lr}, "
        f"reference {args.reference} held-out samples every {args.every} steps",
        flush=True,
    )
    if not args.skip_noise:
        noise = run_noise(setting, out / "noise", fractions=(0.2,), recorder_options=options)
        with pl.Config(tbl_rows=40, tbl_cols=10):
            print(noise.filter(pl.col("score").is_in(NOISE_SCORES)), flush=True)
    if not args.skip_prune:
        prune = run_prune(setting, out / "prune", scores=PRUNE_SCORES, recorder_options=options)
        with pl.Config(tbl_rows=40, tbl_cols=10):
            print(prune, flush=True)


if __name__ == "__main__":
    main()
