"""Parameter identity: tied weights, modules called twice, functional reuse, parametrizations.

Each case against the whole-model oracle (float64, per-sample autograd loop, 1e-5) and
for bit-identical training with and without the recorder.
"""

from __future__ import annotations

import h5py
import pytest
import torch
import torch.nn.functional as F
from oracle_support import check_alignment, check_bit_identical, check_exact, recorded_step
from torch import Tensor, nn

from samplescope.recorder import Recorder, RecorderError

pytestmark = pytest.mark.usefixtures("float64_default")

N, T, V, D = 5, 4, 7, 6


def _x() -> Tensor:
    return torch.randn(N, D, generator=torch.Generator().manual_seed(1))


def _ids() -> Tensor:
    # Repeated tokens within a sample, so per-row sums matter.
    return torch.randint(0, V, (N, T), generator=torch.Generator().manual_seed(2))


class TiedLinears(nn.Module):
    """``b.weight = a.weight``: one parameter, two modules, each with its own bias."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(D, D)
        self.b = nn.Linear(D, D)
        self.b.weight = self.a.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(x)))


class CalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(D, D)
        self.head = nn.Linear(D, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.a(torch.tanh(self.a(x))))


class TiedLM(nn.Module):
    """GPT-2's default: the output projection is the token embedding (Embedding + Linear)."""

    def __init__(self, padding_idx: int | None = None) -> None:
        super().__init__()
        self.wte = nn.Embedding(V, D, padding_idx=padding_idx)
        self.mix = nn.Linear(D, D)
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.mix(self.wte(ids))))


class EmbeddingTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(V, D)
        self.out = nn.Linear(D, 1)

    def forward(self, ids: Tensor) -> Tensor:
        return self.out(self.wte(ids) * self.wte(ids.flip(1)))


class ConvTwice(nn.Module):
    """A closed-form layer with no factored use: per-sample gradients for it alone."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 3, 3, padding=1)
        self.norm = nn.LayerNorm(8)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(torch.tanh(self.norm(self.conv(x)))))


class Scale(nn.Module):
    """No rule covers it: the torch.func fallback."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(D))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class FallbackTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.s = Scale()
        self.lin = nn.Linear(D, D)

    def forward(self, x: Tensor) -> Tensor:
        return self.s(torch.tanh(self.lin(self.s(x))))


class TiedAcrossKinds(nn.Module):
    """A Linear and a fallback module sharing one [D] vector? No: a Linear's bias and a
    fallback's parameter — a dense use paired with a dense use, in different layers."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, D)
        self.s = Scale()
        self.s.scale = self.lin.bias

    def forward(self, x: Tensor) -> Tensor:
        return self.s(torch.tanh(self.lin(x)))


def _square(m: nn.Module) -> Tensor:
    return m(_x()).square().flatten(1).sum(1)


def _tokens(m: nn.Module) -> Tensor:
    return m(_ids()).logsumexp(-1).flatten(1).sum(1)


CASES = {
    "tied_linears": (TiedLinears, _square),
    "called_twice": (CalledTwice, _square),
    "tied_lm": (TiedLM, _tokens),
    "tied_lm_padding": (lambda: TiedLM(padding_idx=0), _tokens),
    "embedding_twice": (EmbeddingTwice, lambda m: m(_ids()).square().flatten(1).sum(1)),
    "conv_twice": (
        ConvTwice,
        lambda m: (
            m(torch.randn(N, 3, 8, generator=torch.Generator().manual_seed(4)))
            .square()
            .flatten(1)
            .sum(1)
        ),
    ),
    "fallback_twice": (FallbackTwice, _square),
    "tied_across_kinds": (TiedAcrossKinds, _square),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_shared_parameters_are_exact(tmp_path, case: str, reduction: str) -> None:
    make, loss = CASES[case]
    check_exact(tmp_path, make, loss, reduction=reduction)


@pytest.mark.parametrize("case", list(CASES))
def test_shared_parameters_train_bit_identically(tmp_path, case: str) -> None:
    make, loss = CASES[case]
    check_bit_identical(tmp_path, make, loss)


@pytest.mark.parametrize("case", list(CASES))
def test_shared_parameters_have_exact_alignment(tmp_path, case: str) -> None:
    make, loss = CASES[case]
    check_alignment(tmp_path, make, loss)


def test_a_shared_parameter_has_one_owner_and_is_counted_once(tmp_path) -> None:
    got = recorded_step(tmp_path / "t.h5", TiedLM(), _tokens)
    # The owner is the first name model.named_parameters() gives it; the head has nothing
    # of its own left, so it is no row of the trace.
    assert got["names"] == ["wte", "mix"]
    assert got["n_params"] == [V * D, D * D + D]
    got = recorded_step(tmp_path / "u.h5", TiedLinears(), _square)
    assert got["names"] == ["a", "b"]
    assert got["n_params"] == [D * D + D, D]


class FunctionalReuse(nn.Module):
    """``F.linear(h, wte.weight)``: a use no module hook sees."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(V, D)

    def forward(self, ids: Tensor) -> Tensor:
        return F.linear(torch.tanh(self.wte(ids)), self.wte.weight)


class FunctionalOnly(nn.Module):
    """The owning module never runs; its weight is used only functionally."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, D)
        self.proj = nn.Linear(D, D)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.lin(x), self.proj.weight)


@pytest.mark.parametrize(
    ("make", "loss", "name"),
    [(FunctionalReuse, _tokens, "wte.weight"), (FunctionalOnly, _square, "proj.weight")],
)
def test_functional_reuse_is_refused_in_one_line(tmp_path, make, loss, name: str) -> None:
    with pytest.raises(RecorderError) as error:
        recorded_step(tmp_path / "t.h5", make(), loss)
    message = str(error.value)
    assert f"parameter {name!r} is used where no module hook sees it" in message
    assert "\n" not in message


def test_a_hidden_use_is_refused_on_every_step_not_only_the_first(tmp_path) -> None:
    model = FunctionalReuse()
    with Recorder(tmp_path / "t.h5", model, on_error="warn") as rec:
        for _ in range(3):
            with pytest.warns(UserWarning, match="no module hook sees it"):
                rec.backward(_tokens(model), sample_ids=torch.arange(N))
    with h5py.File(tmp_path / "t.h5", "r") as f:
        assert f["status/n_errors"][0] == 3
        assert f["steps/step"].shape == (0,)


def _weight_norm_old() -> nn.Module:
    model = nn.Sequential(nn.utils.weight_norm(nn.Linear(D, 3)), nn.Tanh(), nn.Linear(3, 2))
    with torch.no_grad():
        # At initialisation g = ‖v‖ and the norms of W and of (g, v) coincide by accident.
        model[0].weight_g.mul_(torch.linspace(0.5, 2.0, 3)[:, None])
    return model


def _weight_norm_new() -> nn.Module:
    model = nn.Sequential(
        nn.utils.parametrizations.weight_norm(nn.Linear(D, 3)), nn.Tanh(), nn.Linear(3, 2)
    )
    with torch.no_grad():
        model[0].parametrizations.weight.original0.mul_(torch.linspace(0.5, 2.0, 3)[:, None])
    return model


def _spectral_norm() -> nn.Module:
    return nn.Sequential(
        nn.utils.parametrizations.spectral_norm(nn.Linear(D, 3)), nn.Tanh(), nn.Linear(3, 2)
    )


class PositionalConv(nn.Module):
    """wav2vec2's positional convolution: weight_norm over the kernel dimension."""

    def __init__(self) -> None:
        super().__init__()
        conv = nn.Conv1d(D, D, 3, padding=1, groups=2)
        self.conv = nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.conv(x.transpose(1, 2))).transpose(1, 2)


PARAMETRIZED = {
    "weight_norm_old": (_weight_norm_old, _square),
    "weight_norm": (_weight_norm_new, _square),
    "spectral_norm": (_spectral_norm, _square),
    "positional_conv": (
        PositionalConv,
        lambda m: (
            m(torch.randn(N, T, D, generator=torch.Generator().manual_seed(3))).square().sum((1, 2))
        ),
    ),
}


@pytest.mark.parametrize("case", list(PARAMETRIZED))
def test_parametrized_weights_are_measured_on_their_originals(tmp_path, case: str) -> None:
    make, loss = PARAMETRIZED[case]
    got = check_exact(tmp_path, make, loss)
    assert got["names"][0] in ("0", "conv")


@pytest.mark.parametrize("case", list(PARAMETRIZED))
def test_parametrized_weights_train_bit_identically(tmp_path, case: str) -> None:
    make, loss = PARAMETRIZED[case]
    check_bit_identical(tmp_path, make, loss)
