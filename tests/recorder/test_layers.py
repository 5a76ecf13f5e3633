"""Per-layer norms and alignments against independent oracles, over generated shapes.

Every test runs the Observer API directly (fake session), for `mean` and `sum`, in float64,
and checks each layer's squared norms and ⟨g_i, G⟩ to 1e-5 relative error.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_layers_support import (
    QuadraticLoss,
    assert_close,
    check_layers,
    loop_oracle,
    observed,
    run_observed,
    scale,
)
from torch import Tensor, nn

from samplescope.recorder.layers.conv import CONV_METHODS, conv_weight_sq

pytestmark = pytest.mark.usefixtures("float64_default")

REDUCTIONS = st.sampled_from(["mean", "sum"])
FEW = settings(max_examples=12, deadline=None)


# -- Linear ------------------------------------------------------------------------------


@FEW
@given(
    n=st.integers(1, 4),
    extra=st.lists(st.integers(1, 4), max_size=2),
    fan_in=st.integers(1, 6),
    fan_out=st.integers(1, 6),
    bias=st.booleans(),
    reduction=REDUCTIONS,
)
def test_linear(
    n: int, extra: list[int], fan_in: int, fan_out: int, bias: bool, reduction: str
) -> None:
    torch.manual_seed(0)
    model = nn.Linear(fan_in, fan_out, bias=bias)
    check_layers(model, (torch.randn(n, *extra, fan_in),), reduction)


# -- Conv --------------------------------------------------------------------------------


@st.composite
def convs(draw: st.DrawFn) -> tuple[nn.Module, Tensor]:
    dims = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 2))
    kernel = draw(st.integers(1, 3))
    dilation = draw(st.integers(1, 2))
    padding = draw(st.sampled_from([0, 1, "same"]))
    stride = 1 if padding == "same" else draw(st.integers(1, 2))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    if mode != "zeros" and padding == 0:
        mode = "zeros"
    cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
    conv = cls(
        groups * draw(st.integers(1, 2)),
        groups * draw(st.integers(1, 3)),
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=draw(st.booleans()),
        padding_mode=mode,
    )
    side = (7, 6, 5)[dims - 1]  # room for kernel 3 at dilation 2 without padding
    x = torch.randn(draw(st.integers(1, 3)), conv.in_channels, *[side] * dims)
    return conv, x


@FEW
@given(case=convs(), reduction=REDUCTIONS)
def test_conv(case: tuple[nn.Module, Tensor], reduction: str) -> None:
    torch.manual_seed(0)
    conv, x = case
    run = check_layers(conv, (x,), reduction)
    # The per-shape choice is cached on the observer's norm function.
    assert len(run.observers[""].norm_fn.choice) == 1


@settings(max_examples=8, deadline=None)
@given(case=convs())
def test_conv_every_method_is_exact(case: tuple[nn.Module, Tensor]) -> None:
    conv, x = case
    d = torch.randn_like(conv(x))
    expected = torch.stack(
        [
            torch.autograd.grad(conv(x[i : i + 1]), conv.weight, d[i : i + 1])[0].square().sum()
            for i in range(x.shape[0])
        ]
    )
    for method in CONV_METHODS:
        assert_close(conv_weight_sq(conv, x, d, method), expected)


def test_conv_choice_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    conv = nn.Conv2d(2, 3, 3)
    with caplog.at_level("DEBUG", logger="samplescope.recorder.layers.conv"):
        check_layers(conv, (torch.randn(2, 2, 6, 6),), "sum")
    assert "chose" in caplog.text


# -- Embedding ---------------------------------------------------------------------------


@FEW
@given(
    n=st.integers(1, 4),
    tokens=st.lists(st.integers(1, 4), max_size=2),
    vocab=st.integers(2, 6),
    dim=st.integers(1, 4),
    padding=st.booleans(),
    variant=st.sampled_from(["plain", "scale_grad_by_freq", "sparse"]),
    reduction=REDUCTIONS,
)
def test_embedding(
    n: int, tokens: list[int], vocab: int, dim: int, padding: bool, variant: str, reduction: str
) -> None:
    torch.manual_seed(0)
    embedding = nn.Embedding(
        vocab,
        dim,
        padding_idx=1 if padding else None,
        scale_grad_by_freq=variant == "scale_grad_by_freq",
        sparse=variant == "sparse",
    )
    # A small vocabulary makes repeated tokens (and padding) common.
    ids = torch.randint(0, vocab, (n, *tokens))
    # Batch-wide token counts make the samples interact: the oracle is the additive term.
    run = check_layers(
        nn.Sequential(embedding), (ids,), reduction, interacting=variant == "scale_grad_by_freq"
    )
    # sparse=True uses the same closed form (tests/recorder/test_layers_more.py).
    assert run.observers["0"].method == "identity"


# -- Normalisation -----------------------------------------------------------------------


@FEW
@given(
    n=st.integers(1, 3),
    lead=st.lists(st.integers(1, 3), max_size=2),
    features=st.lists(st.integers(1, 4), min_size=1, max_size=2),
    bias=st.booleans(),
    rms=st.booleans(),
    reduction=REDUCTIONS,
)
def test_layer_and_rms_norm(
    n: int, lead: list[int], features: list[int], bias: bool, rms: bool, reduction: str
) -> None:
    torch.manual_seed(0)
    if rms:
        norm = nn.RMSNorm(features, eps=None if bias else 1e-3)
    else:
        norm = nn.LayerNorm(features, bias=bias)
    with torch.no_grad():
        for p in norm.parameters():
            p.normal_()
    check_layers(norm, (torch.randn(n, *lead, *features),), reduction)


@FEW
@given(
    n=st.integers(1, 3),
    groups=st.integers(1, 3),
    per_group=st.integers(2, 3),
    spatial=st.lists(st.integers(1, 3), max_size=2),
    reduction=REDUCTIONS,
)
def test_group_norm(
    n: int, groups: int, per_group: int, spatial: list[int], reduction: str
) -> None:
    torch.manual_seed(0)
    norm = nn.GroupNorm(groups, groups * per_group)
    with torch.no_grad():
        norm.weight.normal_()
    check_layers(norm, (torch.randn(n, groups * per_group, *spatial),), reduction)


@FEW
@given(
    n=st.integers(2, 4),
    channels=st.integers(1, 3),
    dims=st.integers(0, 3),
    training=st.booleans(),
    track=st.booleans(),
    reduction=REDUCTIONS,
)
def test_batch_norm(
    n: int, channels: int, dims: int, training: bool, track: bool, reduction: str
) -> None:
    torch.manual_seed(0)
    cls = (nn.BatchNorm1d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims]
    norm = cls(channels, track_running_stats=track)
    with torch.no_grad():
        norm.weight.normal_()
        if track:
            norm.running_mean.normal_()
            norm.running_var.uniform_(0.5, 2.0)
    norm.train(training)
    x = torch.randn(n, channels, *[3] * dims)
    # Batch statistics (training, or no running stats) make the samples interact.
    check_layers(norm, (x,), reduction, interacting=training or not track)


@FEW
@given(n=st.integers(1, 3), dims=st.integers(1, 3), training=st.booleans(), reduction=REDUCTIONS)
def test_instance_norm(n: int, dims: int, training: bool, reduction: str) -> None:
    torch.manual_seed(0)
    cls = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)[dims - 1]
    norm = cls(2, affine=True, track_running_stats=True)
    with torch.no_grad():
        norm.weight.normal_()
        norm.running_var.uniform_(0.5, 2.0)
    norm.train(training)
    check_layers(norm, (torch.randn(n, 2, *[3] * dims),), reduction)


# -- Attention ---------------------------------------------------------------------------


class Attention(nn.Module):
    """Batch-first inputs and outputs around an nn.MultiheadAttention in any configuration."""

    def __init__(self, mha: nn.MultiheadAttention, call: dict, attn_mask: Tensor | None) -> None:
        super().__init__()
        self.mha = mha
        self.call = call
        self.attn_mask = attn_mask

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        padding: Tensor | None,
        masks: Tensor | None,
    ) -> Tensor:
        if not self.mha.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        mask = self.attn_mask if masks is None else masks.flatten(0, 1)
        out, weights = self.mha(
            query, key, value, key_padding_mask=padding, attn_mask=mask, **self.call
        )
        if not self.mha.batch_first:
            out = out.transpose(0, 1)
        if weights is not None:
            # Let gradient flow through the returned weights too.
            out = out + weights.flatten(1).sum(1)[:, None, None]
        return out


@st.composite
def attentions(draw: st.DrawFn) -> tuple[Attention, tuple]:
    heads = draw(st.integers(1, 2))
    embed = heads * draw(st.integers(1, 3))
    cross = draw(st.booleans())
    kdim = draw(st.integers(1, 4)) if cross else None
    vdim = draw(st.integers(1, 4)) if cross else None
    mha = nn.MultiheadAttention(
        embed,
        heads,
        bias=draw(st.booleans()),
        kdim=kdim,
        vdim=vdim,
        batch_first=draw(st.booleans()),
    )
    n = draw(st.integers(1, 3))
    tgt = draw(st.integers(1, 4))
    src = tgt if not cross else draw(st.integers(1, 4))
    query = torch.randn(n, tgt, embed)
    key = torch.randn(n, src, kdim or embed)
    value = key if not cross else torch.randn(n, src, vdim or embed)
    if not cross:
        key = value = query  # self-attention, as TransformerEncoderLayer calls it
    need_weights = draw(st.booleans())
    call = {"need_weights": need_weights, "average_attn_weights": draw(st.booleans())}
    padding = None
    if draw(st.booleans()):
        padding = torch.rand(n, src) < 0.4
        padding[:, 0] = False  # every query keeps a key to attend to
        if draw(st.booleans()):
            padding = padding.double().masked_fill(padding, float("-inf"))
    attn_mask = masks = None
    kind = draw(st.sampled_from(["none", "2d", "3d", "causal"]))
    if kind == "2d":
        attn_mask = torch.randn(tgt, src)
    elif kind == "3d":
        masks = torch.randn(n, heads, tgt, src)
    elif kind == "causal" and tgt == src:
        attn_mask = nn.Transformer.generate_square_subsequent_mask(tgt)
        call["is_causal"] = True
    return Attention(mha, call, attn_mask), (query, key, value, padding, masks)


@FEW
@given(case=attentions(), reduction=REDUCTIONS)
def test_attention(case: tuple[Attention, tuple], reduction: str) -> None:
    model, inputs = case
    reference = copy.deepcopy(model)
    run = check_layers(model, inputs, reduction)
    assert run.observers["mha"].method == "reexpressed"
    # The re-expressed forward matches the module's own within float rounding...
    torch.testing.assert_close(run.output, reference(*inputs))
    # ...and so do the parameter gradients it back-propagates.
    model.zero_grad()
    with observed(model):
        model(*inputs).square().sum().backward()
    reference(*inputs).square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_attention_dropout_runs() -> None:
    """With dropout the masks are a different draw: only check it records finite norms."""
    mha = nn.MultiheadAttention(4, 2, dropout=0.5, batch_first=True)
    model = Attention(mha, {"need_weights": False}, None)
    x = torch.randn(3, 5, 4)
    run = run_observed(model, (x, x, x, None, None), QuadraticLoss((3, 5, 4)), "mean")
    assert torch.isfinite(run.results["mha"].grad_sq).all()


# -- Fallback ----------------------------------------------------------------------------


class ScaleShift(nn.Module):
    """A user-defined layer with its own parameters and no rule."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(features))
        self.shift = nn.Parameter(torch.randn(features))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x * self.scale + self.shift)


class Recurrent(nn.Module):
    """Batch-first in and out around an RNN, with initial states and h_n in the loss."""

    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x: Tensor, h0: Tensor | None) -> Tensor:
        if not self.rnn.batch_first:
            x = x.transpose(0, 1)
        state = None if h0 is None else h0.transpose(0, 1).contiguous()
        if isinstance(self.rnn, nn.LSTM) and state is not None:
            state = (state, torch.tanh(state))
        out, hidden = self.rnn(x, state)
        if not self.rnn.batch_first:
            out = out.transpose(0, 1)
        h_n = hidden[0] if isinstance(hidden, tuple) else hidden
        return torch.cat([out.flatten(1), h_n.transpose(0, 1).flatten(1)], 1)


@FEW
@given(n=st.integers(1, 3), extra=st.lists(st.integers(1, 3), max_size=2), reduction=REDUCTIONS)
def test_fallback_custom_layer(n: int, extra: list[int], reduction: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(ScaleShift(3), nn.Linear(3, 2))
    run = check_layers(model, (torch.randn(n, *extra, 3),), reduction)
    assert run.observers["0"].method == "fallback"
    assert run.observers["1"].method == "identity"


@settings(max_examples=10, deadline=None)
@given(
    kind=st.sampled_from([nn.LSTM, nn.GRU, nn.RNN]),
    n=st.integers(1, 3),
    steps=st.integers(1, 3),
    layers=st.integers(1, 2),
    batch_first=st.booleans(),
    initial=st.booleans(),
    reduction=REDUCTIONS,
)
def test_fallback_recurrent(
    kind: type[nn.RNNBase],
    n: int,
    steps: int,
    layers: int,
    batch_first: bool,
    initial: bool,
    reduction: str,
) -> None:
    torch.manual_seed(0)
    model = Recurrent(kind(3, 2, num_layers=layers, batch_first=batch_first))
    h0 = torch.randn(n, layers, 2) if initial else None
    run = check_layers(model, (torch.randn(n, steps, 3), h0), reduction)
    # Recurrent layers have their own rule now (tests/recorder/test_layers_rnn.py).
    assert run.observers["rnn"].method == "reexpressed"


def test_fallback_output_without_gradient_counts_as_zero() -> None:
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3))

        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            return x * self.weight, x.exp() * self.weight

    class UsesFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.heads = TwoHeads()

        def forward(self, x: Tensor) -> Tensor:
            return self.heads(x)[0]

    check_layers(UsesFirst(), (torch.randn(3, 3),), "mean")


def test_declined_attention_falls_back_with_its_children() -> None:
    mha = nn.MultiheadAttention(4, 2, add_bias_kv=True, batch_first=True)
    model = Attention(mha, {"need_weights": False}, None)
    x = torch.randn(3, 2, 4)
    run = check_layers(model, (x, x, x, None, None), "sum")
    observer = run.observers["mha"]
    assert observer.method == "fallback"
    assert {"out_proj.weight", "bias_k"} <= set(observer.params)
    assert "mha.out_proj" not in run.observers


def test_loop_oracle_matches_torch_func() -> None:
    """The oracle itself, checked once against torch.func on a plain Linear."""
    layer = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    losses = QuadraticLoss((4, 2))
    oracle = loop_oracle(layer, (x,), losses, {"": ["weight", "bias"]})[""]
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def one(p: dict, xi: Tensor, ri: Tensor) -> Tensor:
        out = torch.func.functional_call(layer, p, (xi[None],))
        return (out * ri + 0.5 * out.square()).sum()

    expected = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))(params, x, losses.r)
    for k in oracle:
        assert_close(oracle[k], expected[k])
    assert scale(4, "mean") == 0.25
