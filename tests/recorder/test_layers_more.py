"""Closed forms for PReLU, Bilinear, EmbeddingBag, sparse Embedding and transposed Linears.

Each against a float64 batch-of-one oracle, for mean and sum, over hypothesis-generated
shapes (derandomized) plus an explicit example for every branch of the closed form.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_layers_support import (
    QuadraticLoss,
    assert_close,
    check_layers,
    output_shape,
    run_observed,
    scale,
)
from torch import Tensor, nn

from samplescope.recorder.layers import default_registry

pytestmark = pytest.mark.usefixtures("float64_default")

REDUCTIONS = st.sampled_from(["mean", "sum"])
FEW = settings(max_examples=10, deadline=None, derandomize=True)


# -- PReLU -------------------------------------------------------------------------------


@FEW
@given(
    n=st.integers(1, 4),
    channels=st.integers(1, 4),
    spatial=st.lists(st.integers(1, 3), max_size=2),
    shared=st.booleans(),
    reduction=REDUCTIONS,
)
@example(3, 3, [], True, "mean")  # one slope, [N, C]
@example(3, 3, [2, 2], False, "sum")  # a slope per channel, [N, C, H, W]
@example(2, 4, [3], False, "mean")  # a slope per channel, [N, C, L]
def test_prelu(n: int, channels: int, spatial: list[int], shared: bool, reduction: str) -> None:
    torch.manual_seed(0)
    prelu = nn.PReLU(1 if shared else channels, init=0.3)
    run = check_layers(nn.Sequential(prelu), (torch.randn(n, channels, *spatial),), reduction)
    assert run.observers["0"].method == "identity"


# -- Bilinear ----------------------------------------------------------------------------


@FEW
@given(
    n=st.integers(1, 3),
    tokens=st.lists(st.integers(1, 4), max_size=2),
    i1=st.integers(1, 4),
    i2=st.integers(1, 4),
    out=st.integers(1, 4),
    bias=st.booleans(),
    reduction=REDUCTIONS,
)
@example(3, [], 3, 2, 4, True, "mean")  # one token: ‖δ‖²‖x1‖²‖x2‖²
@example(3, [2], 3, 3, 3, True, "sum")  # T(O+I1+I2) < O·I1·I2: Gram identity
@example(2, [4, 2], 2, 2, 2, False, "mean")  # otherwise: materialised
def test_bilinear(
    n: int, tokens: list[int], i1: int, i2: int, out: int, bias: bool, reduction: str
) -> None:
    torch.manual_seed(0)
    model = nn.Bilinear(i1, i2, out, bias=bias)
    x1 = torch.randn(n, *tokens, i1)
    x2 = torch.randn(n, *tokens, i2)
    run = check_layers(model, (x1, x2), reduction)
    assert type(run.observers[""]).__name__ == "BilinearObserver"


# -- EmbeddingBag ------------------------------------------------------------------------


@st.composite
def bags(draw: st.DrawFn) -> dict:
    mode = draw(st.sampled_from(["sum", "mean", "max"]))
    return {
        "mode": mode,
        "bags": draw(st.integers(1, 4)),
        "vocab": draw(st.integers(2, 5)),
        "dim": draw(st.integers(1, 3)),
        "form": draw(st.sampled_from(["2d", "offsets", "last_offset"])),
        "weights": mode == "sum" and draw(st.booleans()),
        "padding": draw(st.booleans()),
        "sparse": mode != "max" and draw(st.booleans()),  # max refuses sparse
        "seed": draw(st.integers(0, 3)),
    }


def _case(**kw: object) -> dict:
    base = {
        "mode": "sum",
        "bags": 3,
        "vocab": 4,
        "dim": 3,
        "form": "offsets",
        "weights": False,
        "padding": False,
        "sparse": False,
        "seed": 0,
    }
    return {**base, **kw}


def _bag_inputs(case: dict) -> tuple[nn.EmbeddingBag, Tensor, Tensor | None, Tensor | None]:
    g = torch.Generator().manual_seed(case["seed"])
    bag = nn.EmbeddingBag(
        case["vocab"],
        case["dim"],
        mode=case["mode"],
        padding_idx=1 if case["padding"] else None,
        sparse=case["sparse"],
        include_last_offset=case["form"] == "last_offset",
    )
    n = case["bags"]
    if case["form"] == "2d":
        ids = torch.randint(0, case["vocab"], (n, 3), generator=g)
        offsets = None
    else:
        # Bag sizes 0..3, so empty bags occur; small vocabularies repeat tokens.
        sizes = torch.randint(0, 4, (n,), generator=g)
        sizes[0] = 3
        ids = torch.randint(0, case["vocab"], (int(sizes.sum()),), generator=g)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
        if case["form"] == "offsets":
            offsets = offsets[:-1]
    weights = torch.randn(ids.shape, generator=g) if case["weights"] else None
    return bag, ids, offsets, weights


def _bag_oracle(
    bag: nn.EmbeddingBag,
    ids: Tensor,
    offsets: Tensor | None,
    weights: Tensor | None,
    losses: QuadraticLoss,
) -> Tensor:
    """Per-bag weight gradients [B, V, D]: each bag alone through a copy of the layer."""
    ref = copy.deepcopy(bag)
    ref.include_last_offset = False
    if ids.dim() == 2:
        members = [(ids[b], None if weights is None else weights[b]) for b in range(ids.shape[0])]
    else:
        ends = (
            offsets[1:]
            if bag.include_last_offset
            else torch.cat([offsets[1:], ids.new([len(ids)])])
        )
        starts = offsets[:-1] if bag.include_last_offset else offsets
        members = [
            (ids[s:e], None if weights is None else weights[s:e])
            for s, e in zip(starts.tolist(), ends.tolist(), strict=True)
        ]
    grads = []
    for b, (bag_ids, bag_weights) in enumerate(members):
        out = ref(bag_ids, torch.zeros(1, dtype=torch.long), bag_weights)
        loss = losses(out, slice(b, b + 1))[0]
        (g,) = torch.autograd.grad(loss, ref.weight)
        grads.append(g.to_dense() if g.is_sparse else g)
    return torch.stack(grads)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(case=bags(), reduction=REDUCTIONS)
@example(_case(), "mean")
@example(_case(weights=True, form="last_offset", sparse=True), "sum")
@example(_case(mode="mean", padding=True, form="2d"), "mean")
@example(_case(mode="mean", form="offsets", seed=2), "sum")
@example(_case(mode="max", form="offsets", padding=True), "mean")
@example(_case(mode="max", form="2d"), "sum")
@example(_case(mode="mean", form="last_offset", sparse=True, padding=True), "sum")
def test_embedding_bag(case: dict, reduction: str) -> None:
    torch.manual_seed(case["seed"])
    bag, ids, offsets, weights = _bag_inputs(case)
    reference = copy.deepcopy(bag)
    inputs = (ids, offsets, weights)
    losses = QuadraticLoss(output_shape(bag, inputs))
    run = run_observed(bag, inputs, losses, reduction)
    result = run.results[""]
    assert result.error is None, result.error
    assert type(run.observers[""]).__name__ == "EmbeddingBagObserver"
    oracle = _bag_oracle(reference, ids, offsets, weights, losses)
    s = scale(oracle.shape[0], reduction)
    assert_close(result.grad_sq, s * s * oracle.flatten(1).square().sum(1))
    batch = result.batch_grad["weight"]
    batch = batch.to_dense() if batch.is_sparse else batch
    assert_close(run.aligned[""], s * (oracle.flatten(1) * batch.reshape(1, -1)).sum(1))


def test_embedding_bag_scale_grad_by_freq_is_declined() -> None:
    bag = nn.EmbeddingBag(5, 2, scale_grad_by_freq=True)
    rule = default_registry().lookup(bag)
    assert rule is not None
    assert "scale_grad_by_freq" in rule.declines(bag)


# -- Embedding(sparse=True) --------------------------------------------------------------


@FEW
@given(
    n=st.integers(1, 4),
    tokens=st.lists(st.integers(1, 4), min_size=1, max_size=2),
    vocab=st.integers(2, 8),
    padding=st.booleans(),
    reduction=REDUCTIONS,
)
@example(3, [4], 3, True, "mean")
@example(2, [2, 3], 8, False, "sum")
def test_sparse_embedding(
    n: int, tokens: list[int], vocab: int, padding: bool, reduction: str
) -> None:
    torch.manual_seed(0)
    embedding = nn.Embedding(vocab, 3, padding_idx=1 if padding else None, sparse=True)
    ids = torch.randint(0, vocab, (n, *tokens))
    run = check_layers(nn.Sequential(embedding), (ids,), reduction)
    assert run.observers["0"].method == "identity"
    assert run.results["0"].batch_grad["weight"].is_sparse


# -- Linear with a transposed weight (Hugging Face Conv1D) -------------------------------


class Conv1D(nn.Module):
    """The same computation as transformers.pytorch_utils.Conv1D: weight [in, out]."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.5)
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x: Tensor) -> Tensor:
        size_out = (*x.size()[:-1], self.nf)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


# Named as Hugging Face names it, without importing transformers.
Conv1D.__module__ = "transformers.pytorch_utils"


@FEW
@given(
    n=st.integers(1, 4),
    tokens=st.lists(st.integers(1, 5), max_size=2),
    fan_in=st.integers(1, 6),
    fan_out=st.integers(1, 6),
    reduction=REDUCTIONS,
)
@example(3, [], 4, 3, "mean")  # one token
@example(2, [5], 6, 6, "sum")  # Gram identity (T(I+O) < I·O)
@example(2, [5], 2, 2, "mean")  # materialised
def test_transposed_linear(
    n: int, tokens: list[int], fan_in: int, fan_out: int, reduction: str
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(fan_out, fan_in), nn.Tanh(), Conv1D(2, fan_out))
    run = check_layers(model, (torch.randn(n, *tokens, fan_in),), reduction)
    assert {o.method for o in run.observers.values()} == {"identity"}


def test_real_transformers_conv1d_if_installed() -> None:
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(0)
    model = nn.Sequential(pytorch_utils.Conv1D(3, 4))
    run = check_layers(model, (torch.randn(3, 5, 4),), "mean")
    assert run.observers["0"].method == "identity"


def test_registry_never_imports_transformers() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from samplescope.recorder import default_registry; "
        "default_registry(); print('transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


class Mixed(nn.Module):
    """Every layer of this file in one model."""

    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(7, 4, mode="mean")
        self.embed = nn.Embedding(7, 4, sparse=True)
        self.prelu = nn.PReLU(4)
        self.bilinear = nn.Bilinear(4, 4, 3)
        self.proj = Conv1D(2, 3)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.prelu(self.bag(ids)) + self.embed(ids).sum(1)
        return self.proj(self.bilinear(h, torch.tanh(h)))


def test_observing_changes_training_not_at_all() -> None:
    """Closed forms only read: outputs and gradients are bit-identical to an unobserved run."""
    torch.manual_seed(0)
    model = Mixed()
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 7, (5, 3))
    losses = QuadraticLoss((5, 2))
    run = run_observed(model, (ids,), losses, "mean")
    assert {o.method for o in run.observers.values()} == {"identity"}
    expected = reference(ids)
    losses(expected).mean().backward()
    assert torch.equal(run.output, expected)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        g, h = p.grad, q.grad
        if g.is_sparse:
            g, h = g.coalesce().to_dense(), h.coalesce().to_dense()
        assert torch.equal(g, h), name
