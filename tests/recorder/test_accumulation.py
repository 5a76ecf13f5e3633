"""Gradient accumulation: K micro-batches recorded as one optimizer step (issue 12).

Measured on main before `accumulation_steps` existed: recording the usual `loss / K` loop
stored losses ×1/K, grad_sq ×1/K² and every micro-batch as its own step
(`test_the_usual_loss_over_k_loop_without_accumulation_steps_is_scaled`).
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from samplescope.analysis import open_trace
from samplescope.recorder import Recorder, RecorderError

K, B, STEPS = 2, 4, 3  # powers of two: the 1/K and 1/B factors are exact in float64


def _data(n: int = K * B * STEPS, d: int = 6, k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=g), torch.randint(0, k, (n,), generator=g)


def _mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def _big_batches(x, y):
    for s in range(STEPS):
        rows = torch.arange(s * K * B, (s + 1) * K * B)
        yield x[rows], y[rows], rows


def _micro_batches(x, y):
    """(micro index, x, y, ids) of each micro-batch, the same samples as `_big_batches`."""
    for s in range(STEPS):
        for m in range(K):
            rows = torch.arange(s * K * B + m * B, s * K * B + (m + 1) * B)
            yield m, x[rows], y[rows], rows


def _accumulated(model, opt, x, y, rec=None, *, own_scale=False):
    for m, xb, yb, ids in _micro_batches(x, y):
        logits = model(xb)
        losses = F.cross_entropy(logits, yb, reduction="none")
        if rec is None:
            (losses.mean() / K).backward()
        elif own_scale:
            rec.backward(losses / K, ids, logits=logits, targets=yb, loss_scale=1 / K)
        else:
            rec.backward(losses, ids, logits=logits, targets=yb)
        if m == K - 1:
            opt.step()
            opt.zero_grad()


def _trace(path):
    with h5py.File(path, "r") as f:
        return {
            "visits": {k: f[f"visits/{k}"][:] for k in f["visits"]},
            "steps": {k: f[f"steps/{k}"][:] for k in f["steps"]},
        }


def _big_run(tmp_path, x, y):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "big.h5"
    with Recorder(path, model, opt) as rec:
        for xb, yb, ids in _big_batches(x, y):
            logits = model(xb)
            rec.backward(F.cross_entropy(logits, yb, reduction="none"), ids, logits, yb)
            opt.step()
            opt.zero_grad()
    return path


@pytest.mark.usefixtures("float64_default")
def test_the_usual_loss_over_k_loop_without_accumulation_steps_is_scaled(tmp_path):
    """Today's bug, kept as the reason for the option: the trace is off by 1/K and 1/K²."""
    x, y = _data()
    big = _trace(_big_run(tmp_path, x, y))
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "naive.h5"
    with Recorder(path, model, opt) as rec:
        for m, xb, yb, ids in _micro_batches(x, y):
            logits = model(xb)
            rec.backward(F.cross_entropy(logits, yb, reduction="none") / K, ids)
            if m == K - 1:
                opt.step()
                opt.zero_grad()
    naive = _trace(path)
    assert len(naive["steps"]["step"]) == K * STEPS  # every micro-batch its own step
    np.testing.assert_allclose(naive["visits"]["loss"], big["visits"]["loss"] / K, rtol=1e-6)
    np.testing.assert_allclose(
        naive["visits"]["grad_sq"], big["visits"]["grad_sq"] / K**2, rtol=1e-5
    )


@pytest.mark.usefixtures("float64_default")
@pytest.mark.parametrize("own_scale", [False, True], ids=["recorder_scales", "loss_scale"])
def test_accumulated_steps_match_one_big_batch(tmp_path, own_scale):
    x, y = _data()
    big_path = _big_run(tmp_path, x, y)
    big = _trace(big_path)

    plain = _mlp()
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    _accumulated(plain, plain_opt, x, y)

    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "acc.h5"
    with Recorder(path, model, opt, accumulation_steps=K) as rec:
        _accumulated(model, opt, x, y, rec, own_scale=own_scale)
        assert rec.step == STEPS
    # Parameters bit for bit those of the unrecorded `loss / K` loop.
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        assert torch.equal(p, q)

    acc = _trace(path)
    v, s = acc["visits"], acc["steps"]
    assert s["step"].tolist() == list(range(STEPS))  # one step per optimizer step
    assert s["batch_size"].tolist() == [K * B] * STEPS
    assert v["step"].tolist() == big["visits"]["step"].tolist()
    assert v["micro"].tolist() == [m for _ in range(STEPS) for m in range(K) for _ in range(B)]
    np.testing.assert_array_equal(v["scale"], np.full(K * B * STEPS, 1 / (K * B)))
    np.testing.assert_array_equal(v["sample_id"], big["visits"]["sample_id"])
    # Unscaled per-sample losses and norms: the ones of the big batch.
    np.testing.assert_array_equal(v["loss"], big["visits"]["loss"])
    np.testing.assert_allclose(v["grad_sq"], big["visits"]["grad_sq"], rtol=1e-6)
    np.testing.assert_allclose(v["p_target"], big["visits"]["p_target"], rtol=1e-6)
    np.testing.assert_allclose(s["loss_mean"], big["steps"]["loss_mean"], rtol=1e-12)
    # The batch gradient is the whole step's (both micro-batches), as the big batch's.
    np.testing.assert_allclose(s["grad_sq"], big["steps"]["grad_sq"], rtol=1e-5)

    with open_trace(path) as t, open_trace(big_path) as b:
        assert t.meta["n_steps"] == STEPS
        got, want = t.samples().sort("sample_id"), b.samples().sort("sample_id")
        for column in ("importance", "grand", "tracin_self", "final_loss", "el2n"):
            np.testing.assert_allclose(got[column], want[column], rtol=1e-5, err_msg=column)
        per_step = "SELECT step, sum(importance) AS i FROM importance GROUP BY 1 ORDER BY 1"
        np.testing.assert_allclose(t.query(per_step)["i"], b.query(per_step)["i"], rtol=1e-5)


@pytest.mark.usefixtures("float64_default")
def test_a_short_last_group_ends_at_the_optimizer_step(tmp_path):
    """Three micro-batches with K = 2: the third is a step of its own, ended by opt.step()."""
    x, y = _data()
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "short.h5"
    with Recorder(path, model, opt, accumulation_steps=K) as rec:
        for i in range(3):
            rows = torch.arange(i * B, (i + 1) * B - (1 if i == 2 else 0))  # last has B - 1
            logits = model(x[rows])
            rec.backward(F.cross_entropy(logits, y[rows], reduction="none"), rows)
            if i % K == K - 1 or i == 2:
                opt.step()
                opt.zero_grad()
        assert rec.step == 2
    acc = _trace(path)
    assert acc["steps"]["batch_size"].tolist() == [2 * B, B - 1]
    assert acc["visits"]["micro"].tolist() == [0] * B + [1] * B + [0] * (B - 1)
    # Each micro-batch is weighted by its own size: 1/(K·B), and 1/(K·(B-1)) for the last.
    expected = [1 / (K * B)] * (2 * B) + [1 / (K * (B - 1))] * (B - 1)
    np.testing.assert_allclose(acc["visits"]["scale"], expected, rtol=1e-15)
    # Importance uses each visit's own weight, not 1/batch_size of the optimizer step.
    grad = acc["visits"]["grad_sq"].astype(np.float64).sum(1)
    with open_trace(path) as t:
        imp = t.query("SELECT sample_id, sum(importance) AS i FROM importance GROUP BY 1")
        imp = imp.sort("sample_id")["i"].to_numpy()
        samples = t.samples().sort("sample_id")
    np.testing.assert_allclose(imp, (0.1 * np.asarray(expected)) ** 2 * grad, rtol=1e-6)
    np.testing.assert_allclose(samples["importance"], imp, rtol=1e-12)
    np.testing.assert_allclose(samples["tracin_self"], 0.1 * np.asarray(expected) * grad, rtol=1e-6)


@pytest.mark.usefixtures("float64_default")
def test_sum_reduction_back_propagates_sum_over_k(tmp_path):
    x, y = _data()
    plain, model = _mlp(), _mlp()
    path = tmp_path / "sum.h5"
    with Recorder(path, model, reduction="sum", accumulation_steps=K) as rec:
        for _, xb, yb, ids in _micro_batches(x, y):
            (F.cross_entropy(plain(xb), yb, reduction="sum") / K).backward()
            rec.backward(F.cross_entropy(model(xb), yb, reduction="none"), ids)
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)
    acc = _trace(path)
    np.testing.assert_array_equal(acc["visits"]["scale"], np.full(K * B * STEPS, 1 / K))
    with open_trace(path) as t:  # no optimizer: lr is NaN, but s is 1/K, not 1
        assert t.query("SELECT DISTINCT micro FROM visits ORDER BY 1")["micro"].to_list() == [0, 1]


def test_no_optimizer_ends_a_short_group_at_the_next_epoch_and_at_exit(tmp_path):
    x, y = _data()
    model = _mlp()
    path = tmp_path / "noopt.h5"
    with Recorder(path, model, accumulation_steps=3) as rec:
        for epoch in range(2):
            rec.set_epoch(epoch)
            for i in range(4):  # 4 micro-batches: one full group of 3 and one of 1
                rows = torch.arange(i * 2, i * 2 + 2)
                rec.backward(F.cross_entropy(model(x[rows]), y[rows], reduction="none"), rows)
                model.zero_grad()
    acc = _trace(path)
    assert acc["steps"]["step"].tolist() == [0, 1, 2, 3]
    assert acc["steps"]["epoch"].tolist() == [0, 0, 1, 1]
    assert acc["steps"]["batch_size"].tolist() == [6, 2, 6, 2]


def test_bad_accumulation_arguments_are_refused(tmp_path):
    model = _mlp()
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(RecorderError, match="accumulation_steps"):
            Recorder(tmp_path / "a.h5", model, accumulation_steps=bad)
    with pytest.raises(RecorderError, match="alignment"):
        Recorder(tmp_path / "a.h5", model, alignment=True, accumulation_steps=2)
    x, y = _data()
    with Recorder(tmp_path / "b.h5", model, accumulation_steps=2) as rec:
        for bad in (0.0, -0.5, float("nan"), float("inf"), "x"):
            losses = F.cross_entropy(model(x[:2]), y[:2], reduction="none")
            with pytest.raises(RecorderError, match="loss_scale"):
                rec.backward(losses, [0, 1], loss_scale=bad)
    with Recorder(tmp_path / "c.h5", model) as rec:
        losses = F.cross_entropy(model(x[:2]), y[:2], reduction="none")
        with pytest.raises(RecorderError, match="accumulation_steps=K"):
            rec.backward(losses / 2, [0, 1], loss_scale=0.5)
        assert all(p.grad is None for p in model.parameters())  # refused before backward


def test_set_epoch_with_the_same_epoch_keeps_the_step_accumulating(tmp_path):
    x, y = _data()
    model = _mlp()
    with Recorder(tmp_path / "same.h5", model, accumulation_steps=2) as rec:
        for i in range(4):
            rec.set_epoch(0)  # some loops call it at every step
            rows = torch.arange(i * 2, i * 2 + 2)
            rec.backward(F.cross_entropy(model(x[rows]), y[rows], reduction="none"), rows)
    acc = _trace(tmp_path / "same.h5")
    assert acc["steps"]["batch_size"].tolist() == [4, 4]
    assert acc["visits"]["micro"].tolist() == [0, 0, 1, 1] * 2


def test_without_accumulation_the_trace_has_no_micro_column(tmp_path):
    x, y = _data()
    model = _mlp()
    with Recorder(tmp_path / "plain.h5", model) as rec:
        rec.backward(F.cross_entropy(model(x[:4]), y[:4], reduction="none"), [0, 1, 2, 3])
    with h5py.File(tmp_path / "plain.h5", "r") as f:
        assert "micro" not in f["visits"]
        assert "scale" not in f["visits"]


def test_the_optimizer_hook_is_removed_at_exit(tmp_path):
    x, y = _data()
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    recorder = Recorder(tmp_path / "h.h5", model, opt, accumulation_steps=K)
    with pytest.raises(ValueError, match="boom"), recorder as rec:
        assert len(opt._optimizer_step_post_hooks) == 1
        _accumulated(model, opt, x, y, rec)
        raise ValueError("boom")
    assert not opt._optimizer_step_post_hooks


def test_a_failed_micro_batch_drops_its_whole_step_with_on_error_warn(tmp_path):
    class Attention(nn.Module):
        # Re-expressed attention records one call per step: a second call is an error.
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(3, 1, batch_first=True)
            self.twice = False

        def forward(self, x):
            h = self.attn(x, x, x)[0]
            return (self.attn(h, x, x)[0] if self.twice else h).sum(1)

    model = Attention()
    path = tmp_path / "warn.h5"
    with Recorder(path, model, on_error="warn", accumulation_steps=2) as rec:
        for i in range(4):  # step 0: micro-batch 1 fails; step 1: both fine
            model.twice = i == 1
            losses = model(torch.randn(2, 2, 3)).square().sum(1)
            if i == 1:
                with pytest.warns(UserWarning, match="ran 2 times"):
                    rec.backward(losses, [2 * i, 2 * i + 1])
            else:
                rec.backward(losses, [2 * i, 2 * i + 1])
        assert rec.n_visits == 4
    with h5py.File(path, "r") as f:
        assert f["status/n_errors"][0] == 1
        assert f["steps/batch_size"][:].tolist() == [4]  # no partial step 0
        assert f["visits/sample_id"][:].tolist() == [4, 5, 6, 7]
        assert f["visits/micro"][:].tolist() == [0, 0, 1, 1]
