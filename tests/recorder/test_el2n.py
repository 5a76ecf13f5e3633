"""The recorder writes the true EL2N, ‖softmax − one-hot‖₂, from the logits it sees."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from samplescope import Recorder


def test_el2n_column_is_softmax_minus_onehot_norm(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 6, generator=g), torch.randint(0, 5, (24,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5))
    with Recorder(tmp_path / "t.h5", model) as rec:
        logits = model(x)
        losses = F.cross_entropy(logits, y, reduction="none")
        rec.backward(losses, sample_ids=torch.arange(24), logits=logits, targets=y)
    expected = torch.linalg.vector_norm(
        torch.softmax(logits.detach(), 1) - F.one_hot(y, 5).float(), dim=1
    ).numpy()
    with h5py.File(tmp_path / "t.h5", "r", swmr=True) as f:
        got = f["visits/el2n"][:]
        p = f["visits/p_target"][:]
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # The old proxy 1 - p is a lower bound, within a factor sqrt(2).
    assert np.all(got >= (1 - p) - 1e-6)
    assert np.all(got <= np.sqrt(2) * (1 - p) + 1e-6)
