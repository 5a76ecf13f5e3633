"""Validation attribution end to end: record with a reference batch, read val_effect.

The score is the first-order change of the validation loss: summed over a step's samples
it must predict the actual change of the reference loss after a small SGD step.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import Tensor, nn

from samplescope.analysis import open_trace
from samplescope.recorder import Recorder

B = 8


def _loss(m: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(m(x), y, reduction="none")


def _setup() -> tuple[nn.Module, Tensor, Tensor, Tensor, Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    x = torch.randn(4 * B, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (4 * B,))
    x_val = torch.randn(64, 5, dtype=torch.float64)
    y_val = torch.randint(0, 3, (64,))
    return model.double(), x, y, x_val, y_val


def _record(path: Path, every: int, lr: float, epochs: int = 2) -> list[float]:
    """Train, returning the reference loss before each step and after the last."""
    model, x, y, x_val, y_val = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    val_losses = []
    with Recorder(
        path,
        model,
        opt,
        overwrite=True,
        reference=(x_val, y_val),
        reference_loss=_loss,
        reference_every=every,
    ) as rec:
        for epoch in range(epochs):
            rec.set_epoch(epoch)
            for b in range(4):
                with torch.no_grad():
                    val_losses.append(float(_loss(model, x_val, y_val).mean()))
                opt.zero_grad()
                ids = torch.arange(b * B, (b + 1) * B)
                rec.backward(_loss(model, x[ids], y[ids]), ids)
                opt.step()
    with torch.no_grad():
        val_losses.append(float(_loss(model, x_val, y_val).mean()))
    return val_losses


def test_val_effect_predicts_the_change_of_the_validation_loss(tmp_path: Path) -> None:
    val_losses = _record(tmp_path / "t.h5", every=1, lr=1e-3)
    with open_trace(tmp_path / "t.h5") as trace:
        table = trace.val_effect()
        samples = trace.samples()
        per_epoch = trace.query(
            "SELECT epoch, sum(val_effect) AS effect FROM val_effect GROUP BY epoch ORDER BY 1"
        )
        per_layer = trace.query(
            "SELECT layer_index, sum(val_effect) AS e FROM val_effect GROUP BY 1 ORDER BY 1"
        )
    predicted = float(table["val_effect"].sum())
    actual = val_losses[-1] - val_losses[0]
    assert actual != 0
    assert abs(predicted - actual) <= 0.02 * abs(actual), (predicted, actual)
    assert samples["val_effect"].null_count() == 0
    assert samples["n_val_measured"].to_list() == [2] * (4 * B)
    assert per_epoch["epoch"].to_list() == [0, 1]
    assert per_layer["layer_index"].to_list() == [0, 1]
    np.testing.assert_allclose(per_epoch["effect"].sum(), predicted, rtol=1e-9)


@pytest.mark.parametrize("every", [1, 3])
def test_val_effect_is_minus_lr_s_val_dot_times_k(tmp_path: Path, every: int) -> None:
    path = tmp_path / "k.h5"
    _record(path, every=every, lr=0.1)
    with h5py.File(path, "r") as f:
        dots = f["visits/val_dot"][:].astype(np.float64)
        ids = f["visits/sample_id"][:]
        steps = f["visits/step"][:]
    measured = steps % every == 0
    assert np.isfinite(dots[measured]).all()
    assert np.isnan(dots[~measured]).all()
    expected = np.zeros(4 * B)
    np.add.at(expected, ids[measured], -0.1 / B * every * dots[measured].sum(1))
    with open_trace(path) as trace:
        got = trace.samples().sort("sample_id")
        assert "val_effect" in trace.table_names
    seen = np.isin(np.arange(4 * B), ids[measured])
    # A sample no measured step visited has no estimate (null), not a zero effect.
    assert np.isnan(got["val_effect"].to_numpy()[~seen]).all()
    assert seen.sum() == (4 * B if every == 1 else 3 * B)
    np.testing.assert_allclose(got["val_effect"].to_numpy()[seen], expected[seen], rtol=1e-5)
    np.testing.assert_allclose(
        got["val_effect_measured"].to_numpy()[seen], expected[seen] / every, rtol=1e-5
    )


def test_a_trace_without_reference_has_no_val_effect(tmp_path: Path) -> None:
    model, x, y, _, _ = _setup()
    with Recorder(tmp_path / "n.h5", model) as rec:
        rec.backward(_loss(model, x[:B], y[:B]), torch.arange(B))
    with open_trace(tmp_path / "n.h5") as trace:
        assert "val_effect" not in trace.table_names
        assert "val_effect" not in trace.samples().columns
        assert trace.val_effect().height == 0


def test_report_page_shows_helpful_and_harmful_samples(tmp_path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from samplescope.reports import valeffect
    from samplescope.reports._data import ReportData
    from samplescope.reports.render import render_report

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x = torch.randn(4 * B, 1, 4, 4)
    y = torch.randint(0, 3, (4 * B,))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    path = tmp_path / "r.h5"
    reference = (torch.randn(16, 1, 4, 4), torch.randint(0, 3, (16,)))
    with Recorder(
        path, model, opt, thumbnails=True, reference=reference, reference_loss=_loss
    ) as rec:
        for b in range(4):
            opt.zero_grad()
            ids = torch.arange(b * B, (b + 1) * B)
            logits = model(x[ids])
            losses = nn.functional.cross_entropy(logits, y[ids], reduction="none")
            rec.backward(losses, ids, logits=logits, targets=y[ids])
            opt.step()
    with open_trace(path) as trace:
        data = ReportData(trace, path)
        helpful, harmful = valeffect.helpful_and_harmful(data)
        assert helpful.height == valeffect.TOP
        assert (helpful["val_effect"].diff().drop_nulls() >= 0).all()
        assert (harmful["val_effect"] > 0).all()
        samples = trace.samples()
        assert helpful["val_effect"][0] == samples["val_effect"].min()
        figures = list(valeffect.SECTION.pages(data))
        for fig in figures:
            FigureCanvasAgg(fig).draw()
        images = [ax for ax in figures[0].axes if ax.images]
        assert len(images) == helpful.height + harmful.height
        assert valeffect.SECTION.left_out_because(data) is None
    out = render_report(path, tmp_path / "r.pdf", pages="val_effect", progress=False)
    assert out.stat().st_size > 0


def test_report_leaves_the_page_out_without_a_reference(tmp_path: Path) -> None:
    from samplescope.reports import valeffect
    from samplescope.reports._data import ReportData

    model, x, y, _, _ = _setup()
    with Recorder(tmp_path / "n.h5", model) as rec:
        rec.backward(_loss(model, x[:B], y[:B]), torch.arange(B))
    with open_trace(tmp_path / "n.h5") as trace:
        reason = valeffect.SECTION.left_out_because(ReportData(trace))
    assert reason is not None
    assert "reference" in reason


def test_score_table_offers_val_effect_and_its_negation(tmp_path: Path) -> None:
    from samplescope.analysis.flags import score_table

    _record(tmp_path / "s.h5", every=1, lr=0.1)
    with open_trace(tmp_path / "s.h5") as trace:
        table = score_table(trace).sort("sample_id")
        samples = trace.samples().sort("sample_id")
    np.testing.assert_allclose(table["val_effect"].to_numpy(), samples["val_effect"].to_numpy())
    np.testing.assert_allclose(table["val_helpful"].to_numpy(), -samples["val_effect"].to_numpy())
