"""Experiments score Data Diet's checkpoint: every training sample, once, at the parameters
after the chosen epoch, without changing the training that follows."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from samplescope.analysis import open_trace
from samplescope.errors import SamplescopeError
from samplescope.experiments.config import RunConfig
from samplescope.experiments.train import TrainHook, early_checkpoint, train_run


class _Keep(TrainHook):
    def attach(self, model: nn.Module) -> None:
        self.model = model


def test_checkpoint_scores_every_sample_at_the_epochs_parameters(tmp_path) -> None:
    torch.set_num_threads(1)
    config = RunConfig(dataset="digits", epochs=2, subset=300, hidden=16, depth=1)
    data = config.load()
    ids = config.train_ids(data)
    path = tmp_path / "run.h5"
    recorded = train_run(
        config,
        path,
        data=data,
        train_indices=ids,
        thumbnails=False,
        progress=False,
        checkpoint_epochs=(0,),
    )
    # The same run stopped after one epoch, unrecorded: the parameters the checkpoint saw.
    one_epoch = _Keep()
    train_run(
        dataclasses.replace(config, epochs=1),
        None,
        data=data,
        train_indices=ids,
        progress=False,
        hooks=[one_epoch],
    )
    one_epoch.model.eval()
    with torch.no_grad():
        probs = F.softmax(one_epoch.model(data.x_train[ids]), dim=1)
    onehot = F.one_hot(data.y_train[ids], probs.shape[1]).to(probs.dtype)
    expected = torch.linalg.vector_norm(probs - onehot, dim=1).numpy()

    with open_trace(path) as trace:
        table = trace.checkpoints().sort("sample_id")
    assert table["checkpoint"].unique().to_list() == [0]
    assert table["epoch"].unique().to_list() == [0]
    assert table["sample_id"].to_list() == sorted(ids.tolist())
    order = np.argsort(ids)
    np.testing.assert_allclose(table["el2n"].to_numpy(), expected[order], rtol=1e-4, atol=1e-6)
    # Scoring did not change training: the second epoch ends where an unscored run does.
    plain = train_run(config, None, data=data, train_indices=ids, progress=False)
    assert recorded.test_accuracy == plain.test_accuracy
    assert recorded.test_loss == plain.test_loss


def test_checkpoint_epochs_need_a_trace() -> None:
    with pytest.raises(SamplescopeError, match="checkpoint_epochs needs a trace"):
        train_run(RunConfig(epochs=1, subset=50), None, progress=False, checkpoint_epochs=(0,))


@pytest.mark.parametrize(("epochs", "after"), [(1, 0), (4, 0), (8, 0), (15, 1), (50, 4)])
def test_the_early_checkpoint_is_a_tenth_of_the_way_in(epochs: int, after: int) -> None:
    assert early_checkpoint(epochs) == (after,)
