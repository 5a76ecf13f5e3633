"""nn.LSTM, nn.GRU and nn.RNN through their re-expressed forward, against the float64 oracle.

Every configuration the observer branches on (kind, layers, directions, layout, bias,
proj_size, initial state, packed input) is drawn by hypothesis and also pinned by an
explicit example, so each branch runs on every test run.
"""

from __future__ import annotations

import copy
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_layers_support import FakeSession, check_layers, hooks_left, observed
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from samplescope.recorder import Recorder, RecorderError

pytestmark = pytest.mark.usefixtures("float64_default")

KINDS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn_tanh": nn.RNN, "rnn_relu": nn.RNN}


def make_rnn(kind: str, layers: int, bidirectional: bool, batch_first: bool, bias: bool, proj: int):
    extra = {"nonlinearity": "relu"} if kind == "rnn_relu" else {}
    if proj:
        extra["proj_size"] = proj
    return KINDS[kind](
        3,
        4,
        num_layers=layers,
        bidirectional=bidirectional,
        batch_first=batch_first,
        bias=bias,
        **extra,
    )


class Wrapped(nn.Module):
    """Batch-first in and out around an RNN; outputs and h_n (and c_n) all reach the loss.

    With ``packed`` the padded batch is packed with per-sample lengths (unsorted) and
    unpacked again; padding positions are zero in the output.
    """

    def __init__(self, rnn: nn.RNNBase, packed: bool) -> None:
        super().__init__()
        self.rnn = rnn
        self.packed = packed

    def forward(self, x: Tensor, h0: Tensor | None, lengths: Tensor | None) -> Tensor:
        rnn = self.rnn
        t_len = x.shape[1]
        state = None
        if h0 is not None:
            h = h0.transpose(0, 1).contiguous()
            if isinstance(rnn, nn.LSTM):
                c = torch.tanh(h[..., :1]).expand(*h.shape[:2], rnn.hidden_size).contiguous()
                state = (h, c)
            else:
                state = h
        if self.packed:
            seq = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            out, hidden = rnn(seq, state)
            out, _ = pad_packed_sequence(out, batch_first=True, total_length=t_len)
        else:
            out, hidden = rnn(x if rnn.batch_first else x.transpose(0, 1), state)
            if not rnn.batch_first:
                out = out.transpose(0, 1)
        parts = [out.flatten(1)]
        for state_out in hidden if isinstance(hidden, tuple) else (hidden,):
            parts.append(state_out.transpose(0, 1).flatten(1))
        return torch.cat(parts, 1)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(
    kind=st.sampled_from(sorted(KINDS)),
    n=st.integers(1, 3),
    steps=st.integers(1, 4),
    layers=st.integers(1, 2),
    bidirectional=st.booleans(),
    batch_first=st.booleans(),
    bias=st.booleans(),
    proj=st.sampled_from([0, 2]),
    initial=st.booleans(),
    packed=st.booleans(),
    reduction=st.sampled_from(["mean", "sum"]),
)
@example("lstm", 3, 4, 2, False, True, True, 0, False, False, "mean")
@example("lstm", 2, 3, 2, True, False, False, 2, True, False, "sum")
@example("lstm", 3, 4, 1, True, True, True, 2, True, True, "mean")
@example("gru", 3, 4, 2, True, False, True, 0, True, False, "mean")
@example("gru", 3, 3, 1, False, True, False, 0, False, True, "sum")
@example("rnn_tanh", 2, 3, 2, False, False, True, 0, True, False, "sum")
@example("rnn_relu", 3, 4, 1, True, True, True, 0, False, True, "mean")
def test_recurrent(
    kind: str,
    n: int,
    steps: int,
    layers: int,
    bidirectional: bool,
    batch_first: bool,
    bias: bool,
    proj: int,
    initial: bool,
    packed: bool,
    reduction: str,
) -> None:
    if kind != "lstm":
        proj = 0
    torch.manual_seed(0)
    rnn = make_rnn(kind, layers, bidirectional, batch_first, bias, proj)
    directions = 2 if bidirectional else 1
    h0 = torch.randn(n, layers * directions, proj or 4) if initial else None
    # Lengths from 1 to steps, first sample full, so packing really leaves rows out.
    lengths = torch.tensor([steps] + [1 + (i * 2) % steps for i in range(1, n)])
    model = Wrapped(rnn, packed)
    x = torch.randn(n, steps, 3)
    run = check_layers(model, (x, h0, lengths), reduction)
    observer = run.observers["rnn"]
    assert observer.method == "reexpressed"
    assert set(observer.params) == {name for name, _ in rnn.named_parameters()}


def test_forward_matches_the_fused_kernel() -> None:
    """Outputs and input gradients agree with PyTorch's kernel within float rounding."""
    torch.manual_seed(0)
    for kind in KINDS:
        rnn = make_rnn(kind, 2, True, True, True, 2 if kind == "lstm" else 0)
        x = torch.randn(3, 5, 3, requires_grad=True)
        expected, _ = rnn(x)
        (grad,) = torch.autograd.grad(expected.square().sum(), x)
        with observed(rnn):
            actual, _ = rnn(x)
            (actual_grad,) = torch.autograd.grad(actual.square().sum(), x)
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(actual_grad, grad, rtol=1e-12, atol=1e-12)
        assert not hooks_left(rnn)


def test_eval_and_no_grad_take_the_fused_kernel() -> None:
    rnn = nn.LSTM(3, 4, batch_first=True)
    x = torch.randn(2, 3, 3)
    with observed(rnn, FakeSession(active=False)) as obs:
        rnn(x)[0].sum().backward()
        assert obs[""].result().grad_sq is None
    with observed(rnn) as obs, torch.no_grad():
        rnn(x)
        assert obs[""]._calls == 0


def test_unbatched_input_is_an_error() -> None:
    rnn = nn.GRU(3, 4)
    with observed(rnn) as obs:
        rnn(torch.randn(5, 3))[0].sum().backward()
        error = obs[""].result().error
    assert isinstance(error, ValueError)
    assert "unbatched" in str(error)


def test_frozen_input_weights_still_give_hidden_norms() -> None:
    torch.manual_seed(0)
    rnn = nn.LSTM(3, 4, batch_first=True)
    rnn.weight_ih_l0.requires_grad_(False)
    rnn.bias_ih_l0.requires_grad_(False)
    model = Wrapped(rnn, packed=False)
    run = check_layers(model, (torch.randn(3, 4, 3), None, None), "sum")
    assert set(run.observers["rnn"].params) == {"weight_hh_l0", "bias_hh_l0"}


class Tagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 6)
        self.rnn = nn.LSTM(6, 8, num_layers=2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        out, _ = self.rnn(self.embed(tokens))
        return self.head(out[:, -1])


def test_recorded_training_is_equal_within_rounding(tmp_path: Path) -> None:
    """Recorded training follows plain training within float rounding, and the trace is exact."""
    torch.manual_seed(0)
    plain = Tagger()
    recorded = copy.deepcopy(plain)
    tokens = torch.randint(0, 20, (4, 5))
    y = torch.randint(0, 3, (4,))
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.1)
    opt_rec = torch.optim.SGD(recorded.parameters(), lr=0.1)
    expected = []
    for i in range(4):
        rows = slice(i, i + 1)
        grads = torch.autograd.grad(
            F.cross_entropy(plain(tokens[rows]), y[rows]), list(plain.rnn.parameters())
        )
        expected.append(sum(g.square().sum() for g in grads))
    with Recorder(tmp_path / "t.h5", recorded, opt_rec) as rec:
        for _ in range(3):
            F.cross_entropy(plain(tokens), y).backward()
            opt_plain.step()
            opt_plain.zero_grad()
            logits = recorded(tokens)
            rec.backward(F.cross_entropy(logits, y, reduction="none"), torch.arange(4))
            opt_rec.step()
            opt_rec.zero_grad()
    for p, q in zip(plain.parameters(), recorded.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    with h5py.File(tmp_path / "t.h5", "r") as f:
        names = [n.decode() for n in f["layers/name"][:]]
        grad_sq = f["visits/grad_sq"][:4, names.index("rnn")]
    np.testing.assert_allclose(grad_sq, torch.stack(expected).numpy(), rtol=1e-5)


def test_ran_twice_is_reported(tmp_path: Path) -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(3, 3, batch_first=True)

        def forward(self, x: Tensor) -> Tensor:
            return self.rnn(self.rnn(x)[0])[0].flatten(1)

    model = Twice()
    with Recorder(tmp_path / "t.h5", model) as rec, pytest.raises(RecorderError, match="2 times"):
        rec.backward(model(torch.randn(2, 4, 3)).sum(1), torch.arange(2))
