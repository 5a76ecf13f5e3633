"""An end-to-end oracle for whole models: record one step, compare with a per-sample loop.

The oracle needs nothing from the recorder but the layer names it wrote: every unique
trainable parameter (``model.named_parameters()``, which yields a tied parameter once,
under its first name) belongs to the longest recorded layer name that prefixes it, and
sample i's squared norm for a layer is Σ_params ‖∂loss_i/∂θ‖², from a float64 loop of
``torch.autograd.grad`` over the samples of one batch forward.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import Tensor, nn

from samplescope.recorder import Recorder

# (model) -> per-sample losses [N]
LossFn = Callable[[nn.Module], Tensor]


def recorded_step(path: Path, model: nn.Module, loss_fn: LossFn, **options: object) -> dict:
    """One recorded backward; the trace's layer names, n_params and grad_sq [N, layers]."""
    with Recorder(path, model, overwrite=True, **options) as rec:
        losses = loss_fn(model)
        rec.backward(losses, sample_ids=torch.arange(losses.shape[0]))
    with h5py.File(path, "r") as f:
        return {
            "names": [n.decode() for n in f["layers/name"][:]],
            "n_params": f["layers/n_params"][:].tolist(),
            "grad_sq": f["visits/grad_sq"][:].astype(np.float64),
        }


def owner(param_name: str, layers: list[str]) -> str:
    """The longest layer name that prefixes ``param_name`` ('' for the root)."""
    best = None
    for layer in layers:
        if (layer == "" or param_name.startswith(layer + ".")) and (
            best is None or len(layer) > len(best)
        ):
            best = layer
    if best is None:
        msg = f"parameter {param_name!r} belongs to no recorded layer in {layers}"
        raise AssertionError(msg)
    return best


def oracle_grad_sq(model: nn.Module, loss_fn: LossFn, layers: list[str]) -> np.ndarray:
    """‖∂loss_i/∂θ_layer‖² per sample and layer, by a per-sample autograd loop."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    columns = [layers.index(owner(n, layers)) for n, _ in named]
    losses = loss_fn(model)
    out = np.zeros((losses.shape[0], len(layers)))
    for i in range(losses.shape[0]):
        grads = torch.autograd.grad(
            losses[i], [p for _, p in named], retain_graph=True, allow_unused=True
        )
        for column, g in zip(columns, grads, strict=True):
            if g is not None:
                out[i, column] += float(g.double().square().sum())
    return out


def check_alignment(
    tmp_path: Path, make: Callable[[], nn.Module], loss_fn: LossFn, rtol: float = 1e-5
) -> None:
    """Recorded ⟨∂loss_i/∂θ_l, G_l⟩ (G: the mean loss's gradient) against the loop."""
    torch.manual_seed(0)
    model = make()
    torch.manual_seed(0)
    reference = make()
    path = tmp_path / "align.h5"
    with Recorder(path, model, overwrite=True, alignment=True) as rec:
        losses = loss_fn(model)
        rec.backward(losses, sample_ids=torch.arange(losses.shape[0]))
    with h5py.File(path, "r") as f:
        layers = [n.decode() for n in f["layers/name"][:]]
        got = f["visits/alignment"][:].astype(np.float64)
    named = [(n, p) for n, p in reference.named_parameters() if p.requires_grad]
    columns = [layers.index(owner(n, layers)) for n, _ in named]
    losses = loss_fn(reference)
    params = [p for _, p in named]
    batch = torch.autograd.grad(losses.mean(), params, retain_graph=True, allow_unused=True)
    expected = np.zeros_like(got)
    for i in range(losses.shape[0]):
        grads = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
        for column, g, b in zip(columns, grads, batch, strict=True):
            if g is not None and b is not None:
                expected[i, column] += float((g.double() * b.double()).sum())
    scale = max(float(np.abs(expected).max()), 1e-30)
    assert np.abs(got - expected).max() <= rtol * scale, (got, expected)


def check_exact(
    tmp_path: Path,
    make: Callable[[], nn.Module],
    loss_fn: LossFn,
    rtol: float = 1e-5,
    **options: object,
) -> dict:
    """Record one step of ``make()`` and assert every layer matches the oracle to ``rtol``.

    ``make`` builds the model afresh (seeded) twice: a deep copy cannot copy every model
    (old-style weight_norm), and the oracle must see the parameters before any step.
    """
    torch.manual_seed(0)
    model = make()
    torch.manual_seed(0)
    reference = make()
    got = recorded_step(tmp_path / "oracle.h5", model, loss_fn, **options)
    expected = oracle_grad_sq(reference, loss_fn, got["names"])
    scale = max(float(np.abs(expected).max()), 1e-30)
    error = np.abs(got["grad_sq"] - expected) / np.maximum(np.abs(expected), 1e-3 * scale)
    worst = np.unravel_index(int(np.argmax(error)), error.shape)
    assert error.max() <= rtol, (
        f"layer {got['names'][worst[1]]!r}, sample {worst[0]}: recorded "
        f"{got['grad_sq'][worst]:.6g}, oracle {expected[worst]:.6g} (rel. err {error.max():.2e})"
    )
    unique = {id(p): p.numel() for p in reference.parameters() if p.requires_grad}
    assert sum(got["n_params"]) == sum(unique.values())
    return got


def check_bit_identical(
    tmp_path: Path,
    make: Callable[[], nn.Module],
    loss_fn: LossFn,
    steps: int = 3,
    rtol: float = 0.0,
    **options: object,
) -> None:
    """SGD on two copies, one recorded: every parameter must end bit-identical.

    ``rtol`` > 0 only for re-expressed attention, whose forward is PyTorch's computation
    in another order (equal within float rounding, not bit for bit; see attention.py).
    """
    torch.manual_seed(0)
    plain = make()
    torch.manual_seed(0)
    model = make()
    for m, record in ((plain, False), (model, True)):
        torch.manual_seed(0)
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        if record:
            with Recorder(tmp_path / "bits.h5", m, optimizer=opt, overwrite=True, **options) as rec:
                for _ in range(steps):
                    opt.zero_grad()
                    losses = loss_fn(m)
                    rec.backward(losses, sample_ids=torch.arange(losses.shape[0]))
                    opt.step()
        else:
            for _ in range(steps):
                opt.zero_grad()
                loss_fn(m).mean().backward()
                opt.step()
    for (name, a), b in zip(plain.named_parameters(), model.parameters(), strict=True):
        same = torch.equal(a, b) if rtol == 0 else torch.allclose(a, b, rtol=rtol, atol=rtol)
        assert same, f"parameter {name} differs after {steps} recorded steps"
