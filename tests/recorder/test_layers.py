"""Per-layer norms and alignments against independent oracles, over generated shapes.

Every test runs the Observer API directly (fake session), for `mean` and `sum`, in float64,
and checks each layer's squared norms and ⟨g_i, G⟩ to 1e-5 relative error.

Hypothesis runs derandomized (the same examples on every run), and every branch a rule
takes (one token / Gram identity / materialised for Linear, each conv method and padding
path, each mask path of attention, batch / running statistics for the norms) is also
pinned by an explicit ``@example``, so breaking a branch fails every run, not some.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import h5py
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from oracle_support import oracle_grad_sq
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

from samplescope.recorder import Recorder
from samplescope.recorder.layers.conv import CONV_METHODS, ConvNorms, conv_weight_sq

pytestmark = pytest.mark.usefixtures("float64_default")

REDUCTIONS = st.sampled_from(["mean", "sum"])
FEW = settings(max_examples=12, deadline=None, derandomize=True)


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
@example(n=3, extra=[], fan_in=4, fan_out=3, bias=True, reduction="mean")  # one token
@example(n=2, extra=[1], fan_in=3, fan_out=2, bias=False, reduction="sum")  # one token, 3-D
@example(n=2, extra=[2], fan_in=6, fan_out=6, bias=True, reduction="sum")  # T(I+O) < I·O: Gram
@example(n=3, extra=[2, 2], fan_in=2, fan_out=3, bias=True, reduction="mean")  # materialised
def test_linear(
    n: int, extra: list[int], fan_in: int, fan_out: int, bias: bool, reduction: str
) -> None:
    torch.manual_seed(0)
    model = nn.Linear(fan_in, fan_out, bias=bias)
    check_layers(model, (torch.randn(n, *extra, fan_in),), reduction)


def test_linear_steps_after_the_first_match_the_oracle(tmp_path: Path) -> None:
    # A 2-D Linear with weight and bias trained takes LinearObserver's inlined path (the
    # others, linear_norms), on the first step beside its use check and on later steps
    # alone. Each step is compared with the per-sample loop at the parameters it ran with.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3), nn.Linear(3, 2, bias=False))
    frozen = nn.Linear(2, 2)
    frozen.bias.requires_grad_(False)
    model.append(frozen)
    twin = copy.deepcopy(model)  # trained alongside, outside the block, for the oracle
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    layers = ["0", "2", "3", "4"]
    expected = []
    with Recorder(tmp_path / "t.h5", model, opt) as rec:
        for step in range(3):
            x, y = torch.randn(6, 5), torch.randn(6, 2)

            def losses(m: nn.Module, x: Tensor = x, y: Tensor = y) -> Tensor:
                return ((m(x) - y) ** 2).sum(1)

            # On the twin: a forward of the recorded model inside the block is recorded.
            expected.append(oracle_grad_sq(twin, losses, layers))
            twin.zero_grad()
            losses(twin).mean().backward()
            twin_opt.step()
            rec.backward(losses(model), torch.arange(6) + 6 * step)
            opt.step()
            opt.zero_grad()
    with h5py.File(tmp_path / "t.h5", "r") as f:
        got = f["visits/grad_sq"][:].astype("float64").reshape(3, 6, -1)
    for step in range(3):
        torch.testing.assert_close(
            torch.from_numpy(got[step]), torch.from_numpy(expected[step]), rtol=1e-5, atol=1e-12
        )


# -- Conv --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvCase:
    """A convolution and its input, as plain numbers (built in float64 inside the test)."""

    dims: int = 2
    groups: int = 1
    in_per_group: int = 1
    out_per_group: int = 2
    kernel: int = 3
    stride: int = 1
    dilation: int = 1
    padding: int | str = 0
    mode: str = "zeros"
    bias: bool = True
    n: int = 2

    def build(self) -> tuple[nn.Module, Tensor]:
        torch.manual_seed(0)
        cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[self.dims - 1]
        conv = cls(
            self.groups * self.in_per_group,
            self.groups * self.out_per_group,
            self.kernel,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=self.bias,
            padding_mode=self.mode,
        )
        side = (7, 6, 5)[self.dims - 1]  # room for kernel 3 at dilation 2 without padding
        return conv, torch.randn(self.n, conv.in_channels, *[side] * self.dims)


@st.composite
def convs(draw: st.DrawFn) -> ConvCase:
    padding = draw(st.sampled_from([0, 1, "same", "valid"]))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    return ConvCase(
        dims=draw(st.integers(1, 3)),
        groups=draw(st.integers(1, 2)),
        in_per_group=draw(st.integers(1, 2)),
        out_per_group=draw(st.integers(1, 3)),
        kernel=draw(st.integers(1, 3)),
        stride=1 if padding == "same" else draw(st.integers(1, 2)),
        dilation=draw(st.integers(1, 2)),
        padding=padding,
        mode=mode if padding not in (0, "valid") else "zeros",
        bias=draw(st.booleans()),
        n=draw(st.integers(1, 3)),
    )


# One per path through pad_input and _patches: 1-D and 3-D use the strided view, 2-D F.unfold.
CONV_EXAMPLES = [
    ConvCase(dims=1, groups=2, stride=2, padding=1, mode="reflect", n=3),
    # Kernel 2 under "same": the odd extra element goes on the right.
    ConvCase(dims=2, in_per_group=2, kernel=2, padding="same", mode="circular"),
    ConvCase(dims=2, groups=2, stride=2, dilation=2, padding="valid", bias=False),
    ConvCase(dims=3, kernel=2, padding=1, mode="replicate"),
    ConvCase(dims=3, groups=2, kernel=3, dilation=2, n=1),
]


@FEW
@given(case=convs(), reduction=REDUCTIONS)
@example(case=CONV_EXAMPLES[0], reduction="mean")
@example(case=CONV_EXAMPLES[1], reduction="sum")
@example(case=CONV_EXAMPLES[2], reduction="mean")
@example(case=CONV_EXAMPLES[3], reduction="sum")
@example(case=CONV_EXAMPLES[4], reduction="mean")
def test_conv(case: ConvCase, reduction: str) -> None:
    conv, x = case.build()
    run = check_layers(conv, (x,), reduction)
    # The per-shape choice is cached on the observer's norm function.
    assert len(run.observers[""].norm_fn.choice) == 1


def per_sample_weight_sq(conv: nn.Module, x: Tensor, d: Tensor) -> Tensor:
    """‖∂(d·conv(x_i))/∂W‖² per sample, by a batch-of-one loop."""
    return torch.stack(
        [
            torch.autograd.grad(conv(x[i : i + 1]), conv.weight, d[i : i + 1])[0].square().sum()
            for i in range(x.shape[0])
        ]
    )


@settings(max_examples=8, deadline=None, derandomize=True)
@given(case=convs())
@example(case=CONV_EXAMPLES[0])
@example(case=CONV_EXAMPLES[1])
@example(case=CONV_EXAMPLES[2])
@example(case=CONV_EXAMPLES[3])
@example(case=CONV_EXAMPLES[4])
def test_conv_every_method_is_exact(case: ConvCase) -> None:
    conv, x = case.build()
    d = torch.randn_like(conv(x))
    expected = per_sample_weight_sq(conv, x, d)
    for method in CONV_METHODS:
        assert_close(conv_weight_sq(conv, x, d, method), expected)


@pytest.mark.parametrize("method", sorted(CONV_METHODS))
def test_conv_cached_choice_computes_with_that_method(method: str) -> None:
    """Once a shape's method is chosen, later batches of that shape use it (and it is exact)."""
    conv, x = CONV_EXAMPLES[1].build()
    d = torch.randn_like(conv(x))
    norms = ConvNorms()
    norms(conv, x, d)  # the first batch times the candidates and caches one
    ((key, _),) = norms.choice.items()
    norms.choice[key] = method
    assert_close(norms(conv, x, d)["weight"], per_sample_weight_sq(conv, x, d))


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
@example(n=3, tokens=[], vocab=4, dim=2, padding=False, variant="plain", reduction="mean")
@example(n=2, tokens=[4], vocab=2, dim=3, padding=True, variant="plain", reduction="sum")
@example(
    n=3, tokens=[2, 2], vocab=3, dim=2, padding=True, variant="scale_grad_by_freq", reduction="mean"
)
@example(n=2, tokens=[3], vocab=3, dim=2, padding=False, variant="sparse", reduction="sum")
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
@example(n=2, lead=[], features=[3], bias=True, rms=False, reduction="mean")
@example(n=3, lead=[2], features=[2, 2], bias=False, rms=False, reduction="sum")
@example(n=2, lead=[3], features=[4], bias=True, rms=True, reduction="sum")  # eps None
@example(n=3, lead=[], features=[2, 3], bias=False, rms=True, reduction="mean")
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
@example(n=2, groups=1, per_group=3, spatial=[], reduction="mean")
@example(n=3, groups=3, per_group=2, spatial=[2, 3], reduction="sum")
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
@example(n=3, channels=2, dims=0, training=True, track=True, reduction="mean")  # batch stats
@example(n=2, channels=3, dims=2, training=False, track=True, reduction="sum")  # running stats
@example(n=3, channels=2, dims=1, training=False, track=False, reduction="mean")  # no running
@example(n=2, channels=1, dims=3, training=True, track=False, reduction="sum")
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
@example(n=2, dims=1, training=True, reduction="mean")  # input statistics
@example(n=3, dims=2, training=False, reduction="sum")  # running statistics
@example(n=1, dims=3, training=False, reduction="mean")
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


@dataclass(frozen=True)
class AttentionCase:
    """An nn.MultiheadAttention call as plain choices (built in float64 inside the test).

    ``kdim``/``vdim`` set (and not equal to the embedding) give separate q/k/v weights;
    None with ``cross`` is cross-attention through the packed ``in_proj_weight``.
    """

    heads: int = 1
    head_dim: int = 2
    cross: bool = False
    kdim: int | None = None
    vdim: int | None = None
    bias: bool = True
    batch_first: bool = True
    n: int = 2
    tgt: int = 3
    src: int = 3
    need_weights: bool = False
    average: bool = True
    padding: str = "none"  # "none", "bool" or "float" key padding mask
    mask: str = "none"  # "none", "2d", "3d" or "causal" attention mask

    def build(self) -> tuple[Attention, tuple]:
        torch.manual_seed(0)
        embed = self.heads * self.head_dim
        mha = nn.MultiheadAttention(
            embed,
            self.heads,
            bias=self.bias,
            kdim=self.kdim,
            vdim=self.vdim,
            batch_first=self.batch_first,
        )
        n, tgt, src = self.n, self.tgt, self.src if self.cross else self.tgt
        query = torch.randn(n, tgt, embed)
        if self.cross:
            key = torch.randn(n, src, self.kdim or embed)
            value = torch.randn(n, src, self.vdim or embed)
        else:
            key = value = query  # self-attention, as TransformerEncoderLayer calls it
        call = {"need_weights": self.need_weights, "average_attn_weights": self.average}
        padding = None
        if self.padding != "none":
            padding = torch.rand(n, src) < 0.4
            padding[:, 0] = False  # every query keeps a key to attend to
            if self.padding == "float":
                padding = padding.double().masked_fill(padding, float("-inf"))
        attn_mask = masks = None
        if self.mask == "2d":
            attn_mask = torch.randn(tgt, src)
        elif self.mask == "3d":
            masks = torch.randn(n, self.heads, tgt, src)
        elif self.mask == "causal" and tgt == src:
            attn_mask = nn.Transformer.generate_square_subsequent_mask(tgt)
            call["is_causal"] = True
        return Attention(mha, call, attn_mask), (query, key, value, padding, masks)


@st.composite
def attentions(draw: st.DrawFn) -> AttentionCase:
    cross = draw(st.booleans())
    return AttentionCase(
        heads=draw(st.integers(1, 2)),
        head_dim=draw(st.integers(1, 3)),
        cross=cross,
        kdim=draw(st.integers(1, 4)) if cross else None,
        vdim=draw(st.integers(1, 4)) if cross else None,
        bias=draw(st.booleans()),
        batch_first=draw(st.booleans()),
        n=draw(st.integers(1, 3)),
        tgt=draw(st.integers(1, 4)),
        src=draw(st.integers(1, 4)) if cross else 0,
        need_weights=draw(st.booleans()),
        average=draw(st.booleans()),
        padding=draw(st.sampled_from(["none", "bool", "float"])),
        mask=draw(st.sampled_from(["none", "2d", "3d", "causal"])),
    )


@FEW
@given(case=attentions(), reduction=REDUCTIONS)
# Scaled dot-product attention, packed projection; then SDPA's own is_causal.
@example(case=AttentionCase(), reduction="mean")
@example(case=AttentionCase(heads=2, mask="causal", batch_first=False), reduction="sum")
# Explicit softmax (weights returned), causal mask merged with a boolean padding mask.
@example(case=AttentionCase(need_weights=True, mask="causal", padding="bool"), reduction="mean")
# Separate q/k/v weights, per-head weights, a 3-D mask and a float padding mask, no bias.
@example(
    case=AttentionCase(
        heads=2,
        cross=True,
        kdim=3,
        vdim=1,
        src=4,
        need_weights=True,
        average=False,
        padding="float",
        mask="3d",
        bias=False,
        batch_first=False,
    ),
    reduction="sum",
)
# Cross-attention through the packed weight, a 2-D mask.
@example(case=AttentionCase(cross=True, src=2, mask="2d", padding="bool"), reduction="mean")
def test_attention(case: AttentionCase, reduction: str) -> None:
    model, inputs = case.build()
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
