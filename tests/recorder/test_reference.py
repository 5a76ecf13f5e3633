"""Validation attribution: ⟨g(i,l), g_val(l)⟩ recorded in /visits/val_dot.

Every supported layer kind against a float64 per-sample loop (g_i from one batch forward,
g_val the gradient of the reference batch's mean loss in eval mode at the same
parameters); training with a reference is bit-identical to training without one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from oracle_support import owner
from test_layers_mixed import Everything
from test_shared_params import CASES
from torch import Tensor, nn

from samplescope.recorder import Recorder, RecorderError

N = 5


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _square(out: Tensor) -> Tensor:
    return out.square().flatten(1).sum(1)


class Custom(nn.Module):
    """No closed-form rule: recorded by the torch.func fallback."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x @ self.w)


class Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(9, 4, mode="mean")
        self.sparse = nn.Embedding(9, 4, sparse=True)

    def forward(self, ids: Tensor) -> Tensor:
        return torch.cat([self.bag(ids), self.sparse(ids).sum(1)], 1)


class Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bilinear = nn.Bilinear(3, 4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.bilinear(x[:, :3], x[:, 3:7])


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(3, 4, batch_first=True)
        self.rnn = nn.RNN(4, 2, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.rnn(self.gru(x)[0])[0]


def _everything() -> nn.Module:
    model = Everything()
    # Eval-mode BatchNorm: the samples do not interact, so the per-sample loop is the oracle.
    model.batch_norm.eval()
    with torch.no_grad():
        model.batch_norm2d.running_mean.normal_()
        model.batch_norm2d.running_var.uniform_(0.5, 2.0)
    return model


def _mixed_inputs(seed: int) -> tuple[Tensor, Tensor]:
    return torch.randint(0, 11, (N, 5), generator=_gen(seed)), torch.randn(
        N, 1, 7, 7, generator=_gen(seed + 1)
    )


# name -> (make, training inputs, reference inputs); the loss is _square of the output.
KINDS: dict[str, tuple[Callable[[], nn.Module], Callable[[int], tuple]]] = {
    "every_kind_mixed": (_everything, _mixed_inputs),
    "linear_prelu_conv3d_instance_norm": (
        lambda: nn.Sequential(
            nn.Conv3d(2, 3, 2),
            nn.InstanceNorm3d(3, affine=True),
            nn.PReLU(3),
            nn.Flatten(),
            nn.Linear(24, 2),
        ),
        lambda seed: (torch.randn(N, 2, 3, 3, 3, generator=_gen(seed)),),
    ),
    "conv2d_group_norm": (
        lambda: nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.GroupNorm(2, 4)),
        lambda seed: (torch.randn(N, 2, 6, 6, generator=_gen(seed)),),
    ),
    "bilinear": (Pair, lambda seed: (torch.randn(N, 7, generator=_gen(seed)),)),
    "embedding_bag_sparse": (
        Bag,
        lambda seed: (torch.randint(0, 9, (N, 3), generator=_gen(seed)),),
    ),
    "gru_rnn": (Recurrent, lambda seed: (torch.randn(N, 4, 3, generator=_gen(seed)),)),
    "attention": (
        lambda: nn.TransformerEncoderLayer(6, 2, 8, dropout=0.0, batch_first=True),
        lambda seed: (torch.randn(N, 3, 6, generator=_gen(seed)),),
    ),
    "fallback": (
        lambda: nn.Sequential(Custom()),
        lambda seed: (torch.randn(N, 4, generator=_gen(seed)),),
    ),
}


def _modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(m, m.training) for m in model.modules()]


def oracle_val_dot(
    model: nn.Module,
    train_loss: Callable[[nn.Module], Tensor],
    val_loss: Callable[[nn.Module], Tensor],
    layers: list[str],
) -> np.ndarray:
    """Σ_{params of l} ⟨∂loss_i/∂θ, ∇ mean(val losses)⟩ per sample and layer, in float64."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    columns = [layers.index(owner(n, layers)) for n, _ in named]
    modes = _modes(model)
    model.eval()
    g_val = torch.autograd.grad(val_loss(model).mean(), params, allow_unused=True)
    for m, training in modes:
        m.training = training
    losses = train_loss(model)
    out = np.zeros((losses.shape[0], len(layers)))
    for i in range(losses.shape[0]):
        grads = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
        for column, g, v in zip(columns, grads, g_val, strict=True):
            if g is not None and v is not None:
                out[i, column] += float((g.to_dense() * v.to_dense()).sum())
    return out


def check_val_dot(
    tmp_path: Path,
    make: Callable[[], nn.Module],
    train_loss: Callable[[nn.Module], Tensor],
    val_loss: Callable[[nn.Module], Tensor],
    reduction: str = "mean",
) -> np.ndarray:
    torch.manual_seed(0)
    model = make()
    torch.manual_seed(0)
    reference = make()
    path = tmp_path / "val.h5"
    with Recorder(
        path,
        model,
        overwrite=True,
        reduction=reduction,
        reference=(None, None),
        reference_loss=lambda m, x, y: val_loss(m),
    ) as rec:
        losses = train_loss(model)
        rec.backward(losses, sample_ids=torch.arange(losses.shape[0]))
    with h5py.File(path, "r") as f:
        layers = [n.decode() for n in f["layers/name"][:]]
        got = f["visits/val_dot"][:].astype(np.float64)
        assert "alignment" not in f["visits"]
    expected = oracle_val_dot(reference, train_loss, val_loss, layers)
    scale = max(float(np.abs(expected).max()), 1e-30)
    assert np.abs(expected).max() > 0
    assert np.abs(got - expected).max() <= 1e-5 * scale, (layers, got, expected)
    return got


@pytest.mark.usefixtures("float64_default")
@pytest.mark.parametrize("kind", list(KINDS))
def test_val_dot_matches_the_oracle_for_every_layer_kind(tmp_path: Path, kind: str) -> None:
    make, inputs = KINDS[kind]
    train, val = inputs(1), inputs(7)
    check_val_dot(tmp_path, make, lambda m: _square(m(*train)), lambda m: _square(m(*val)))


@pytest.mark.usefixtures("float64_default")
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_val_dot_with_shared_parameters(tmp_path: Path, case: str, reduction: str) -> None:
    make, loss = CASES[case]

    def val_loss(m: nn.Module) -> Tensor:
        # Another direction than the batch gradient: the same samples, weighted unequally.
        losses = loss(m)
        return losses * torch.linspace(0.2, 2.0, losses.shape[0])

    check_val_dot(tmp_path, make, loss, val_loss, reduction)


def _train(
    path: Path | None, every: int | None, steps: int = 4
) -> tuple[nn.Module, Tensor, np.ndarray | None]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    data = torch.randn(steps, 8, 6, generator=_gen(3))
    labels = torch.randint(0, 3, (steps, 8), generator=_gen(4))
    x_val, y_val = torch.randn(16, 6, generator=_gen(5)), torch.randint(0, 3, (16,))

    def val_loss(m: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        # Draws random numbers, as a loss with noise might: the training stream must not move.
        return nn.functional.cross_entropy(m(x), y, reduction="none") + 0 * torch.rand(1)

    def run(rec: Recorder | None) -> None:
        for step in range(steps):
            opt.zero_grad()
            losses = nn.functional.cross_entropy(model(data[step]), labels[step], reduction="none")
            if rec is None:
                losses.mean().backward()
            else:
                rec.backward(losses, sample_ids=torch.arange(8) + 8 * step)
            opt.step()

    torch.manual_seed(1)
    if path is None:
        run(None)
        return model, torch.rand(3), None
    options: dict[str, Any] = {}
    if every is not None:
        options = {"reference": (x_val, y_val), "reference_loss": val_loss}
        options["reference_every"] = every
    with Recorder(path, model, opt, overwrite=True, **options) as rec:
        run(rec)
    after = torch.rand(3)
    with h5py.File(path, "r") as f:
        val_dot = f["visits/val_dot"][:] if "val_dot" in f["visits"] else None
    return model, after, val_dot


def test_training_is_bit_identical_with_and_without_a_reference(tmp_path: Path) -> None:
    plain, plain_rng, _ = _train(None, None)
    without, rng_without, none = _train(tmp_path / "a.h5", None)
    with_ref, rng_with, val_dot = _train(tmp_path / "b.h5", 1)
    assert none is None
    assert val_dot is not None
    assert np.isfinite(val_dot).all()
    for a, b, c in zip(
        plain.state_dict().values(),
        without.state_dict().values(),
        with_ref.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b)
        assert torch.equal(a, c)  # parameters, momentum-driven updates and BN statistics
    assert torch.equal(plain_rng, rng_without)
    assert torch.equal(plain_rng, rng_with)
    assert with_ref.training
    assert all(m.training for m in with_ref.modules())


def test_reference_every_k_leaves_the_other_steps_nan(tmp_path: Path) -> None:
    _, _, val_dot = _train(tmp_path / "k.h5", 2)
    assert val_dot is not None
    per_step = val_dot.reshape(4, 8, -1)
    assert np.isfinite(per_step[[0, 2]]).all()
    assert np.isnan(per_step[[1, 3]]).all()
    with h5py.File(tmp_path / "k.h5", "r") as f:
        assert '"reference_every": 2' in f.attrs["options"]


def test_bad_reference_arguments_are_refused(tmp_path: Path) -> None:
    model = nn.Linear(2, 1)
    x = torch.randn(3, 2)
    with pytest.raises(RecorderError, match="reference_loss"):
        Recorder(tmp_path / "t.h5", model, reference=(x, x))
    with pytest.raises(RecorderError, match="reference_every"):
        Recorder(
            tmp_path / "t.h5",
            model,
            reference=(x, x),
            reference_loss=lambda m, a, b: m(a)[:, 0],
            reference_every=0,
        )
    with pytest.raises(RecorderError, match="pair"):
        Recorder(tmp_path / "t.h5", model, reference=x, reference_loss=lambda m, a, b: a)
    with (
        pytest.raises(RecorderError, match="per-sample losses"),
        Recorder(
            tmp_path / "t.h5",
            model,
            overwrite=True,
            reference=(x, x),
            reference_loss=lambda m, a, b: m(a).sum(),
        ) as rec,
    ):
        rec.backward(model(x)[:, 0], sample_ids=[0, 1, 2])
