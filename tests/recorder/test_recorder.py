"""The Recorder through its public API: what lands in the trace, and what must not change."""

from __future__ import annotations

import copy
import json
import math

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from samplescope import Recorder, with_sample_ids
from samplescope.recorder import RecorderError, TraceWriteError


def _data(n: int = 96, d: int = 16, k: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, k, (n,), generator=g)


def _mlp(d: int = 16, k: int = 4) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(d, 12), nn.ReLU(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, k))


def _train(model, opt, x, y, rec=None, epochs=2, batch=32, reduction="mean"):
    train = with_sample_ids(TensorDataset(x, y))
    g = torch.Generator().manual_seed(3)
    for epoch in range(epochs):
        if rec is not None:
            rec.set_epoch(epoch)
        for xb, yb, ids in DataLoader(train, batch_size=batch, shuffle=True, generator=g):
            logits = model(xb)
            losses = F.cross_entropy(logits, yb, reduction="none")
            if rec is None:
                (losses.mean() if reduction == "mean" else losses.sum()).backward()
            else:
                rec.backward(losses, sample_ids=ids, logits=logits, targets=yb)
            opt.step()
            opt.zero_grad()


def _oracle_grad_sq(model: nn.Module, x, y) -> np.ndarray:
    """Per-sample, per-layer squared gradient norms by a batch-size-1 loop."""
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    rows = []
    for i in range(len(x)):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        rows.append(
            [sum(float(p.grad.double().square().sum()) for p in m.parameters()) for m in layers]
        )
    model.zero_grad()
    return np.array(rows)


def test_quick_start_trace_holds_every_documented_dataset(tmp_path):
    x, y = _data()
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "run.h5"
    with Recorder(path, model, optimizer=opt, config={"lr": 0.1}) as rec:
        _train(model, opt, x, y, rec)
        rec.log_eval("test", loss=0.5, accuracy=0.75)
    with h5py.File(path, "r", swmr=True) as f:
        assert f.attrs["format"] == "samplescope-trace"
        assert f.attrs["format_version"] == 2
        assert json.loads(f.attrs["config"]) == {"lr": 0.1}
        assert f.attrs["reduction"] == "mean"
        assert f.attrs["optimizer"] == "SGD"
        assert json.loads(f.attrs["optimizer_hparams"])["lr"] == 0.1
        assert [n.decode() for n in f["layers/name"][:]] == ["0", "2", "4"]
        assert f["layers/n_params"][:].tolist() == [16 * 12 + 12, 12 * 8 + 8, 8 * 4 + 4]
        assert f["steps/step"][:].tolist() == list(range(6))
        assert f["steps/epoch"][:].tolist() == [0, 0, 0, 1, 1, 1]
        assert f["steps/visit_start"][:].tolist() == [0, 32, 64, 96, 128, 160]
        assert np.allclose(f["steps/lr"][:], 0.1)
        assert f["visits/grad_sq"].shape == (192, 3)
        assert sorted(f["visits/sample_id"][:96].tolist()) == list(range(96))
        for name in ("loss", "target", "pred", "p_target", "margin", "input_sq"):
            assert f[f"visits/{name}"].shape == (192,)
        assert f["status/closed"][0] == 1
        assert f["evals/accuracy"][:].tolist() == [0.75]
        assert f["evals/split"][0].decode() == "test"


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_grad_sq_matches_a_batch_of_one_oracle(tmp_path, reduction):
    x, y = _data(n=20)
    model = _mlp().double()
    x = x.double()
    expected = _oracle_grad_sq(copy.deepcopy(model), x, y)
    with Recorder(tmp_path / "t.h5", model, reduction=reduction) as rec:
        logits = model(x)
        losses = F.cross_entropy(logits, y, reduction="none")
        rec.backward(losses, sample_ids=torch.arange(20), logits=logits, targets=y)
    with h5py.File(tmp_path / "t.h5", "r", swmr=True) as f:
        got = f["visits/grad_sq"][:]
        assert np.allclose(f["visits/loss"][:], losses.detach().numpy(), rtol=1e-6)
        assert f["visits/pred"][:].tolist() == logits.detach().argmax(1).tolist()
        assert f["visits/target"][:].tolist() == y.tolist()
        p = torch.softmax(logits.detach(), 1)[torch.arange(20), y].numpy()
        assert np.allclose(f["visits/p_target"][:], p, rtol=1e-5)
        margin = logits.detach().clone()
        target_logit = margin[torch.arange(20), y].clone()
        margin[torch.arange(20), y] = -math.inf
        assert np.allclose(
            f["visits/margin"][:],
            (target_logit - margin.max(1).values).numpy(),
            rtol=1e-5,
            atol=1e-6,
        )
        assert np.allclose(f["visits/input_sq"][:], x.square().sum(1).numpy(), rtol=1e-6)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_pred_and_target_are_each_steps_argmax_and_labels(tmp_path):
    """pred is argmax(logits) and target the label, visit by visit, across steps of any size.

    The output columns are computed for many steps at once at flush; this checks that every
    visit gets its own step's row, not a neighbour's.
    """
    x, y = _data(n=45, k=6)
    model = _mlp(k=6)
    expected_pred, expected_target = [], []
    with Recorder(tmp_path / "t.h5", model) as rec:
        start = 0
        for size in (1, 16, 3, 25):
            xb, yb = x[start : start + size], y[start : start + size]
            logits = model(xb)
            losses = F.cross_entropy(logits, yb, reduction="none")
            rec.backward(
                losses, sample_ids=torch.arange(start, start + size), logits=logits, targets=yb
            )
            expected_pred += logits.detach().argmax(1).tolist()
            expected_target += yb.tolist()
            start += size
    with h5py.File(tmp_path / "t.h5", "r", swmr=True) as f:
        assert f["visits/pred"][:].tolist() == expected_pred
        assert f["visits/target"][:].tolist() == expected_target
    # Untrained, the predictions still vary: a constant column would not pass by luck.
    assert len(set(expected_pred)) > 1


def test_training_is_bit_for_bit_unchanged_and_hooks_are_removed(tmp_path):
    x, y = _data()
    plain = _mlp()
    recorded = copy.deepcopy(plain)
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    opt_rec = torch.optim.SGD(recorded.parameters(), lr=0.1, momentum=0.9)
    _train(plain, opt_plain, x, y)
    with Recorder(tmp_path / "t.h5", recorded, opt_rec, alignment=True, input_grad=True) as rec:
        _train(recorded, opt_rec, x, y, rec)
    for a, b in zip(plain.parameters(), recorded.parameters(), strict=True):
        assert torch.equal(a, b)
    for module in recorded.modules():
        assert not module._forward_hooks
        assert not module._forward_pre_hooks
        assert not module._backward_hooks
    for p in recorded.parameters():
        assert not p._backward_hooks


def test_eval_mode_and_no_grad_forwards_record_nothing(tmp_path):
    x, y = _data(n=8)
    model = _mlp()
    with Recorder(tmp_path / "t.h5", model) as rec:
        model.eval()
        losses = F.cross_entropy(model(x), y, reduction="none")
        with pytest.warns(UserWarning, match=r"eval mode .* call model\.train\(\)"):
            rec.backward(losses, sample_ids=torch.arange(8))
        model.train()
        with torch.no_grad():
            model(x)
        assert rec.step == 0
    with h5py.File(tmp_path / "t.h5", "r", swmr=True) as f:
        assert f["steps/step"].shape == (0,)
        assert f["visits/grad_sq"].shape == (0, 3)


def test_alignment_and_input_grad_match_an_oracle(tmp_path):
    x, y = _data(n=10)
    x = x.double()
    model = _mlp().double()
    reference = copy.deepcopy(model)
    with Recorder(tmp_path / "t.h5", model, alignment=True, input_grad=True) as rec:
        losses = F.cross_entropy(model(x), y, reduction="none")
        rec.backward(losses, sample_ids=torch.arange(10))
    layers = [m for m in reference.modules() if isinstance(m, nn.Linear)]
    F.cross_entropy(reference(x), y).backward()
    batch = [[p.grad.clone() for p in m.parameters()] for m in layers]
    align = np.zeros((10, 3))
    input_grad = np.zeros(10)
    for i in range(10):
        reference.zero_grad()
        xi = x[i : i + 1].clone().requires_grad_(True)
        F.cross_entropy(reference(xi), y[i : i + 1]).backward()
        input_grad[i] = float(xi.grad.square().sum())
        for j, m in enumerate(layers):
            align[i, j] = sum(
                float((p.grad * g).sum()) for p, g in zip(m.parameters(), batch[j], strict=True)
            )
    with h5py.File(tmp_path / "t.h5", "r", swmr=True) as f:
        np.testing.assert_allclose(f["visits/alignment"][:], align, rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(f["visits/input_grad_sq"][:], input_grad, rtol=1e-5)
        expected_g = [sum(float(g.square().sum()) for g in gs) for gs in batch]
        np.testing.assert_allclose(f["steps/grad_sq"][0], expected_g, rtol=1e-5)


def test_thumbnails_are_stored_once_per_sample_and_sample_info_kept(tmp_path):
    images = torch.rand(12, 1, 8, 8)
    y = torch.randint(0, 3, (12,))
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    flipped = np.arange(12) % 4 == 0
    info = {"sample_id": np.arange(12), "flipped": flipped}
    with Recorder(tmp_path / "t.h5", model, thumbnails=True, sample_info=info) as rec:
        for _ in range(2):
            for start in (0, 6):
                ids = torch.arange(start, start + 6)
                losses = F.cross_entropy(model(images[ids]), y[ids], reduction="none")
                rec.backward(losses, sample_ids=ids)
    with h5py.File(tmp_path / "t.h5", "r", swmr=True) as f:
        assert sorted(f["thumbnails/sample_id"][:].tolist()) == list(range(12))
        thumbs = f["thumbnails/image"][:]
        assert thumbs.shape == (12, 8, 8)
        assert thumbs.dtype == np.uint8
        assert thumbs.min() == 0
        assert thumbs.max() == 255
        assert f["sample_info/flipped"][:].astype(bool).tolist() == flipped.tolist()


def test_layers_are_ordered_from_input_to_output_once_closed(tmp_path):
    class Backwards(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(5, 2)  # registered first, runs last
            self.body = nn.Linear(3, 5)

        def forward(self, x):
            return self.head(torch.relu(self.body(x)))

    model = Backwards()
    with Recorder(tmp_path / "t.h5", model) as rec:
        losses = F.cross_entropy(
            model(torch.randn(4, 3)), torch.tensor([0, 1, 0, 1]), reduction="none"
        )
        rec.backward(losses, sample_ids=[0, 1, 2, 3])
    with h5py.File(tmp_path / "t.h5", "r", swmr=True) as f:
        # Written live in registration order (format v2, fixed at __enter__), rewritten at
        # close in forward order, the layer axis of every [rows, layers] column with it.
        assert [n.decode() for n in f["layers/name"][:]] == ["body", "head"]
        assert f["layers/forward_order"][:].tolist() == [0, 1]
        assert f["layers/n_params"][:].tolist() == [20, 12]
        body = sum(float(p.grad.square().sum()) for p in model.body.parameters())
        assert f["steps/grad_sq"][0].tolist() == pytest.approx(
            [body, sum(float(p.grad.square().sum()) for p in model.head.parameters())], rel=1e-5
        )


def test_nonfinite_values_are_recorded_and_counted(tmp_path):
    model = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    x[1, 0] = math.inf
    with Recorder(tmp_path / "t.h5", model) as rec, pytest.warns(UserWarning, match="non-finite"):
        losses = F.cross_entropy(model(x), torch.tensor([0, 1, 0, 1]), reduction="none")
        rec.backward(losses, sample_ids=[0, 1, 2, 3])
        rec.flush()  # the writer thread counts them; the warning follows
    with h5py.File(tmp_path / "t.h5", "r", swmr=True) as f:
        assert f["steps/n_nonfinite"][0] > 0
        assert not np.isfinite(f["visits/loss"][1])
        assert np.isfinite(f["visits/loss"][0])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda rec, l: rec.backward(l, sample_ids=[0, 1, 2]), "3 sample ids for 4 losses"),
        (
            lambda rec, l: rec.backward(l, sample_ids=[0, 1, 1, 2]),
            "sample id 1 appears more than once",
        ),
        (lambda rec, l: rec.backward(l.mean(), sample_ids=[0]), "1-D tensor of per-sample losses"),
        (lambda rec, l: rec.backward(l, sample_ids=torch.rand(4)), "must be integers"),
        (
            lambda rec, l: rec.backward(l, sample_ids=[0, 1, 2, 3], logits=torch.zeros(4, 2)),
            "together",
        ),
        (
            lambda rec, l: rec.backward(
                l, [0, 1, 2, 3], logits=torch.zeros(3, 2), targets=torch.zeros(4).long()
            ),
            r"logits must have shape \[4, classes\]",
        ),
    ],
)
def test_bad_backward_arguments_fail_before_backpropagating(tmp_path, call, message):
    model = nn.Linear(3, 2)
    with Recorder(tmp_path / "t.h5", model) as rec:
        losses = F.cross_entropy(
            model(torch.randn(4, 3)), torch.tensor([0, 1, 0, 1]), reduction="none"
        )
        with pytest.raises(RecorderError, match=message):
            call(rec, losses)
        assert model.weight.grad is None


def test_bad_constructor_arguments_and_paths(tmp_path):
    model = nn.Linear(3, 2)
    with pytest.raises(RecorderError, match="reduction must be one of"):
        Recorder(tmp_path / "t.h5", model, reduction="avg")
    with pytest.raises(RecorderError, match="on_error must be one of"):
        Recorder(tmp_path / "t.h5", model, on_error="ignore")
    with pytest.raises(RecorderError, match=r"must be a torch\.nn\.Module"):
        Recorder(tmp_path / "t.h5", "model")
    (tmp_path / "old.h5").write_bytes(b"precious")
    with (
        pytest.raises(TraceWriteError, match="already exists"),
        Recorder(tmp_path / "old.h5", model),
    ):
        pass
    assert (tmp_path / "old.h5").read_bytes() == b"precious"
    (tmp_path / "file").write_text("")
    with (
        pytest.raises(TraceWriteError, match="cannot create trace"),
        Recorder(tmp_path / "file" / "t.h5", model),
    ):
        pass
    with (
        pytest.raises(RecorderError, match="no layers with trainable parameters"),
        Recorder(tmp_path / "n.h5", nn.ReLU()),
    ):
        pass


def test_backward_outside_the_block_is_an_error(tmp_path):
    model = nn.Linear(3, 2)
    rec = Recorder(tmp_path / "t.h5", model)
    losses = model(torch.randn(2, 3)).sum(1)
    with pytest.raises(RecorderError, match="outside the `with Recorder"):
        rec.backward(losses, sample_ids=[0, 1])


def test_on_error_warn_keeps_training_and_counts(tmp_path):
    class Twice(nn.Module):
        # Re-expressed attention records one call per step: a second is an error.
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.MultiheadAttention(3, 1, batch_first=True)

        def forward(self, x):
            return self.lin(self.lin(x, x, x)[0], x, x)[0].sum(1)

    model = Twice()
    with Recorder(tmp_path / "t.h5", model, on_error="warn") as rec:
        losses = model(torch.randn(4, 2, 3)).square().sum(1)
        with pytest.warns(UserWarning, match="ran 2 times"):
            rec.backward(losses, sample_ids=[0, 1, 2, 3])
        assert model.lin.in_proj_weight.grad is not None
    with h5py.File(tmp_path / "t.h5", "r", swmr=True) as f:
        assert f["status/n_errors"][0] == 1
        assert f["steps/step"].shape == (0,)
    strict = Twice()
    with Recorder(tmp_path / "s.h5", strict) as rec:
        losses = strict(torch.randn(4, 2, 3)).square().sum(1)
        with pytest.raises(RecorderError, match="ran 2 times"):
            rec.backward(losses, sample_ids=[0, 1, 2, 3])
        assert strict.lin.in_proj_weight.grad is not None  # gradients complete before the error


def test_exception_in_the_loop_still_closes_the_trace(tmp_path):
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="user bug"), Recorder(tmp_path / "t.h5", model) as rec:
        losses = model(torch.randn(2, 3)).sum(1)
        rec.backward(losses, sample_ids=[0, 1])
        raise ValueError("user bug")
    with h5py.File(tmp_path / "t.h5", "r", swmr=True) as f:
        assert f["steps/step"].shape == (1,)
        assert f["status/closed"][0] == 1
    assert not model._forward_hooks


def _disk_full(*args, **kwargs):
    raise OSError(28, "No space left on device")


def test_a_full_disk_is_reported_by_name(tmp_path, monkeypatch):
    monkeypatch.setattr("samplescope.recorder.writer._append", _disk_full)
    model = nn.Linear(3, 2)
    with (
        pytest.raises(TraceWriteError, match="No space left on device"),
        Recorder(tmp_path / "t.h5", model, flush_seconds=0.01) as rec,
    ):
        for _ in range(3):
            losses = model(torch.randn(2, 3)).sum(1)
            rec.backward(losses, sample_ids=[0, 1])
            rec.flush()


def test_a_full_disk_only_warns_with_on_error_warn(tmp_path, monkeypatch):
    monkeypatch.setattr("samplescope.recorder.writer._append", _disk_full)
    model = nn.Linear(3, 2)
    with (
        pytest.warns(UserWarning, match="No space left on device"),
        Recorder(tmp_path / "t.h5", model, on_error="warn", flush_seconds=0.01) as rec,
    ):
        for _ in range(3):
            losses = model(torch.randn(2, 3)).sum(1)
            rec.backward(losses, sample_ids=[0, 1])
            model.zero_grad()
    assert rec.step >= 1  # training went on


def test_sparse_embedding_gradients_are_recorded(tmp_path):
    model = nn.Sequential(nn.Embedding(20, 4, sparse=True), nn.Flatten(), nn.Linear(12, 2))
    tokens = torch.randint(0, 20, (5, 3))
    with Recorder(tmp_path / "t.h5", model) as rec:
        losses = F.cross_entropy(model(tokens), torch.zeros(5).long(), reduction="none")
        rec.backward(losses, sample_ids=range(5))
    assert rec.n_nonfinite == 0
    with h5py.File(tmp_path / "t.h5", "r", swmr=True) as f:
        assert f["layers/method"][0].decode() == "identity"  # the closed form, sparse or not
        assert np.all(f["visits/grad_sq"][:] > 0)
        assert f["steps/grad_sq"][0, 0] == pytest.approx(
            float(model[0].weight.grad.coalesce().values().square().sum()), rel=1e-5
        )
