"""The convolution method choice: one per shape for the process, cheap to make, and under
a memory budget (issue 15)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from samplescope.recorder import Recorder
from samplescope.recorder.layers import conv as conv_module


def _record_one_step(tmp_path, model: nn.Module, x: torch.Tensor) -> Recorder:
    with Recorder(tmp_path / "t.h5", model) as rec:
        out = model(x).flatten(1)
        y = torch.zeros(len(x), dtype=torch.long)
        rec.backward(F.cross_entropy(out, y, reduction="none"), torch.arange(len(x)))
    return rec


def test_identical_layers_share_one_timed_choice(tmp_path, monkeypatch):
    monkeypatch.setattr(conv_module, "_CHOICES", conv_module._Choices())
    timed = []
    real = conv_module._time_candidates

    def counting(module, x, grad_output):
        timed.append(tuple(x.shape))
        return real(module, x, grad_output)

    monkeypatch.setattr(conv_module, "_time_candidates", counting)
    model = nn.Sequential(
        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()
    )
    rec = _record_one_step(tmp_path, model, torch.randn(8, 4, 10, 10))
    assert len(timed) == 1  # the second layer has the first one's shape
    first, second = (o.norm_fn.choice for o in rec._observers)
    assert first == second


def test_candidates_are_timed_on_a_few_samples(monkeypatch):
    monkeypatch.setattr(conv_module, "_CHOICES", conv_module._Choices())
    seen = []
    for name, method in list(conv_module.CONV_METHODS.items()):

        def spy(module, x, grad_output, method=method):
            seen.append(x.shape[0])
            return method(module, x, grad_output)

        monkeypatch.setitem(conv_module.CONV_METHODS, name, spy)
    conv = nn.Conv2d(3, 8, 3)
    x = torch.randn(64, 3, 12, 12)
    d = torch.randn_like(conv(x))
    conv_module._time_candidates(conv, x, d)
    assert seen
    assert max(seen) <= conv_module._PROBE_SAMPLES


def test_a_method_over_budget_runs_in_slices_with_the_same_norms(monkeypatch):
    conv = nn.Conv2d(32, 64, 3, padding=1)
    x = torch.randn(64, 32, 16, 16)
    d = torch.randn(64, 64, 16, 16)
    # unfold's patches ([64, 256, 288], 4.7M elements) exceed the budget (padded x and d: 1.7M).
    batches = []
    real = conv_module.CONV_METHODS["unfold"]

    def spy(module, xs, ds):
        batches.append(xs.shape[0])
        return real(module, xs, ds)

    monkeypatch.setitem(conv_module.CONV_METHODS, "unfold", spy)
    sliced = conv_module.conv_weight_sq(conv, x, d, "unfold")
    assert len(batches) > 1
    assert max(batches) < 64
    footprint = conv_module._footprint(conv, x[: max(batches)], d[: max(batches)])["unfold"]
    assert footprint <= conv_module.pad_input(conv, x).numel() + d.numel()
    whole = real(conv, conv_module.pad_input(conv, x), d)
    torch.testing.assert_close(sliced, whole, rtol=1e-5, atol=0)
