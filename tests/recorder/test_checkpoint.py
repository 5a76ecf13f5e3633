"""Recorder.score_checkpoint: EL2N and GraNd of every sample at a fixed checkpoint."""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samplescope.recorder import Recorder, RecorderError

N, D, C = 12, 5, 3


def _model() -> nn.Module:
    # Dropout and BatchNorm behave differently in eval mode: the oracle must see eval mode.
    return nn.Sequential(
        nn.Linear(D, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, C)
    )


def _data(dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, D, generator=g, dtype=dtype)
    y = torch.randint(0, C, (N,), generator=g)
    return x, y, torch.arange(N) + 100


def _loss_fn(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    logits = model(x)
    return F.cross_entropy(logits, y, reduction="none"), logits


def _loader(x: Tensor, y: Tensor, ids: Tensor, size: int = 5) -> list[tuple[Tensor, ...]]:
    return [(x[i : i + size], y[i : i + size], ids[i : i + size]) for i in range(0, N, size)]


def _train_step(rec: Recorder, model: nn.Module, opt: torch.optim.Optimizer, batch) -> None:
    x, y, ids = batch
    opt.zero_grad()
    logits = model(x)
    rec.backward(F.cross_entropy(logits, y, reduction="none"), ids, logits, y)
    opt.step()


def _read(path: Path, group: str) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {k: f[group][k][()] for k in f[group]}


def _names(path: Path) -> list[str]:
    with h5py.File(path, "r") as f:
        return [n.decode() if isinstance(n, bytes) else n for n in f["layers/name"][()]]


def test_checkpoint_matches_a_per_sample_oracle_in_eval_mode(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _model().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y, ids = _data()
    path = tmp_path / "t.h5"
    with Recorder(path, model, opt, checkpoints=True) as rec:
        _train_step(rec, model, opt, (x[:8], y[:8], ids[:8]))  # moves BN running stats
        index = rec.score_checkpoint(_loader(x, y, ids), _loss_fn)
        assert rec.step == 1
        assert model.training
    assert index == 0
    rows = _read(path, "checkpoints")
    assert rows["checkpoint"].tolist() == [0] * N
    assert rows["step"].tolist() == [1] * N
    assert rows["sample_id"].tolist() == ids.tolist()

    # Oracle: one sample at a time, in eval mode, gradients by autograd.
    model.eval()
    layers = {name: module for name, module in model.named_modules() if name in _names(path)}
    for i in range(N):
        logits = model(x[i : i + 1])
        loss = F.cross_entropy(logits, y[i : i + 1])
        for column, name in enumerate(_names(path)):
            grads = torch.autograd.grad(loss, list(layers[name].parameters()), retain_graph=True)
            expected = sum(float(g.square().sum()) for g in grads)
            assert rows["grad_sq"][i, column] == pytest.approx(expected, rel=1e-5)
        assert rows["loss"][i] == pytest.approx(float(loss.detach()), rel=1e-5)
        error = torch.softmax(logits[0], 0) - F.one_hot(y[i], C).double()
        assert rows["el2n"][i] == pytest.approx(float(error.detach().norm()), rel=1e-5)
        assert rows["target"][i] == int(y[i])
        assert rows["pred"][i] == int(logits.argmax())
    with h5py.File(path, "r") as f:
        assert f["steps/step"].shape == (1,)
        assert f["visits/step"].shape == (8,)


def _run(path: Path, *, score: bool) -> tuple[nn.Module, torch.optim.Optimizer, dict]:
    torch.manual_seed(0)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y, ids = _data(torch.float32)
    batches = _loader(x, y, ids, size=4)
    with Recorder(path, model, opt, checkpoints=True) as rec:
        for step in range(6):
            x_b, y_b, id_b = batches[step % len(batches)]
            opt.zero_grad()
            logits = model(x_b)
            rec.backward(F.cross_entropy(logits, y_b, reduction="none"), id_b, logits, y_b)
            if score and step == 2:
                # Between backward and the optimizer step: the .grad it is about to use
                # must come back untouched.
                rec.score_checkpoint(_loader(x, y, ids), _loss_fn)
            opt.step()
        assert rec.step == 6
    return model, opt, _read(path, "visits")


def test_training_after_a_checkpoint_is_bit_identical(tmp_path: Path) -> None:
    model_a, opt_a, visits_a = _run(tmp_path / "a.h5", score=True)
    model_b, opt_b, visits_b = _run(tmp_path / "b.h5", score=False)
    state_b = model_b.state_dict()
    for name, a in model_a.state_dict().items():
        assert torch.equal(a, state_b[name]), name
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(opt_a.state[pa]["momentum_buffer"], opt_b.state[pb]["momentum_buffer"])
        assert torch.equal(pa.grad, pb.grad)
    for column, values in visits_b.items():
        np.testing.assert_array_equal(visits_a[column], values, err_msg=column)
    assert _read(tmp_path / "a.h5", "checkpoints")["step"].tolist() == [3] * N
    assert _read(tmp_path / "b.h5", "checkpoints")["step"].size == 0


def test_grad_and_modes_are_restored(tmp_path: Path) -> None:
    model = _model()
    model[1].eval()  # a frozen BatchNorm stays in eval mode; the rest trains
    x, y, ids = _data(torch.float32)
    with Recorder(tmp_path / "t.h5", model, checkpoints=True) as rec:
        rec.backward(F.cross_entropy(model(x), y, reduction="none"), ids)
        before = [p.grad for p in model.parameters()]
        copies = [g.clone() for g in before]
        rec.score_checkpoint(_loader(x, y, ids), _loss_fn)
        assert all(p.grad is g for p, g in zip(model.parameters(), before, strict=True))
        assert all(torch.equal(p.grad, c) for p, c in zip(model.parameters(), copies, strict=True))
    assert model.training
    assert model[0].training
    assert not model[1].training


def test_several_checkpoints_and_no_logits(tmp_path: Path) -> None:
    model = _model()
    x, y, ids = _data(torch.float32)
    with Recorder(tmp_path / "t.h5", model, checkpoints=True) as rec:
        assert rec.score_checkpoint(_loader(x, y, ids), _loss_fn) == 0
        rec.set_epoch(2)
        losses_only = lambda m, xb, yb: F.cross_entropy(m(xb), yb, reduction="none")  # noqa: E731
        assert rec.score_checkpoint(_loader(x, y, ids), losses_only) == 1
    rows = _read(tmp_path / "t.h5", "checkpoints")
    assert rows["checkpoint"].tolist() == [0] * N + [1] * N
    assert rows["epoch"].tolist() == [0] * N + [2] * N
    assert (rows["target"][N:] == -1).all()
    assert np.isnan(rows["el2n"][N:]).all()
    assert np.isfinite(rows["el2n"][:N]).all()
    np.testing.assert_allclose(rows["loss"][:N], rows["loss"][N:], rtol=1e-6)


def test_trace_without_checkpoints_has_no_group(tmp_path: Path) -> None:
    model = _model()
    x, y, ids = _data(torch.float32)
    with (
        Recorder(tmp_path / "t.h5", model) as rec,
        pytest.raises(RecorderError, match="checkpoints=True"),
    ):
        rec.score_checkpoint(_loader(x, y, ids), _loss_fn)
    with h5py.File(tmp_path / "t.h5", "r") as f:
        assert "checkpoints" not in f


def test_bad_calls_are_refused(tmp_path: Path) -> None:
    model = _model()
    x, y, ids = _data(torch.float32)
    rec = Recorder(tmp_path / "t.h5", model, checkpoints=True, on_error="warn")
    with pytest.raises(RecorderError, match="outside"):
        rec.score_checkpoint(_loader(x, y, ids), _loss_fn)
    with rec:
        with pytest.raises(RecorderError, match="tuples"):
            rec.score_checkpoint([x], _loss_fn)
        with pytest.raises(RecorderError, match="more than once"):
            rec.score_checkpoint([(x[:2], y[:2], [7, 7])], _loss_fn)
        with pytest.raises(RecorderError, match="no batches"):
            rec.score_checkpoint([], _loss_fn)
        model(x)  # a training forward whose backward has not run
        with pytest.raises(RecorderError, match="between a training forward"):
            rec.score_checkpoint(_loader(x, y, ids), _loss_fn)
        assert rec.n_checkpoints == 0


class _Reversed(nn.Module):
    """Registers its layers in the opposite order to their forward order."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(6, C)
        self.enc = nn.Linear(D, 6)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.enc(x)))


def test_compaction_reorders_checkpoint_layers_and_analysis_reads_them(tmp_path: Path) -> None:
    from samplescope.analysis import open_trace

    torch.manual_seed(0)
    model = _Reversed().double()
    x, y, ids = _data()
    path = tmp_path / "t.h5"
    with Recorder(path, model, checkpoints=True) as rec:
        rec.backward(F.cross_entropy(model(x), y, reduction="none"), ids)
        rec.score_checkpoint(_loader(x, y, ids), _loss_fn)
    assert _names(path) == ["enc", "head"]  # forward order after compaction
    with open_trace(path) as trace:
        table = trace.checkpoints().sort("sample_id")
        samples = trace.samples().sort("sample_id")
    for i in range(N):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        enc = sum(
            float(g.square().sum())
            for g in torch.autograd.grad(loss, [*model.enc.parameters()], retain_graph=True)
        )
        head = sum(
            float(g.square().sum()) for g in torch.autograd.grad(loss, [*model.head.parameters()])
        )
        assert table["grad_sq"][i].to_list() == pytest.approx([enc, head], rel=1e-5)
        assert samples["grand_ckpt"][i] == pytest.approx(math.sqrt(enc + head), rel=1e-5)


def test_outputs_false_still_scores_el2n_at_checkpoints(tmp_path: Path) -> None:
    # `outputs` is about /visits; a checkpoint's rows always have the output columns.
    model = _model()
    x, y, ids = _data(torch.float32)
    with Recorder(tmp_path / "t.h5", model, outputs=False, checkpoints=True) as rec:
        rec.backward(F.cross_entropy(model(x), y, reduction="none"), ids)
        rec.score_checkpoint(_loader(x, y, ids), _loss_fn)
    rows = _read(tmp_path / "t.h5", "checkpoints")
    assert np.isfinite(rows["el2n"]).all()
    assert rows["target"].tolist() == y.tolist()
    with h5py.File(tmp_path / "t.h5", "r") as f:
        assert "el2n" not in f["visits"]


@pytest.mark.parametrize("on_error", ["raise", "warn"])
def test_a_failed_checkpoint_writes_nothing(tmp_path: Path, on_error: str) -> None:
    model = _model()
    x, y, ids = _data(torch.float32)
    weight = torch.ones(1, requires_grad=True)

    def bypass(m: nn.Module, xb: Tensor, yb: Tensor) -> tuple[Tensor, None]:
        return xb.sum(1) * weight, None  # never calls the model: nothing is recorded

    with Recorder(tmp_path / "t.h5", model, checkpoints=True, on_error=on_error) as rec:
        if on_error == "raise":
            with pytest.raises(RecorderError, match="no forward"):
                rec.score_checkpoint(_loader(x, y, ids), bypass)
        else:
            with pytest.warns(UserWarning, match="checkpoint 0 not recorded"):
                rec.score_checkpoint(_loader(x, y, ids), bypass)
        assert rec.n_checkpoints == 0
        assert rec.score_checkpoint(_loader(x, y, ids), _loss_fn) == 0
    assert _read(tmp_path / "t.h5", "checkpoints")["checkpoint"].tolist() == [0] * N
