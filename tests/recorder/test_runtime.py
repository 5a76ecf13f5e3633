"""The recorder at run time: devices, compiled models, layers without a gradient, eval
mode, and parameters owned by the model itself."""

from __future__ import annotations

import copy
import threading
import warnings
from typing import ClassVar

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from samplescope.recorder import Recorder, RecorderError, _transfer
from samplescope.recorder.layers import default_registry


def _data(n: int = 8, d: int = 6, k: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(
        0, k, (n,), generator=g
    )


def _oracle(model: nn.Module, layers: dict[str, nn.Module], loss_fn, x, y) -> np.ndarray:
    """Per-sample squared gradient norm of each named layer's own parameters, one by one."""
    model = copy.deepcopy(model)
    owned = {
        name: [p for _, p in model.get_submodule(name).named_parameters(recurse=False)]
        for name in layers
    }
    rows = []
    for i in range(len(x)):
        model.zero_grad()
        loss_fn(model, x[i : i + 1], y[i : i + 1]).sum().backward()
        rows.append(
            [
                sum(0.0 if p.grad is None else float(p.grad.square().sum()) for p in owned[name])
                for name in layers
            ]
        )
    return np.array(rows)


def _ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y, reduction="none")


def _read(path, name: str) -> np.ndarray:
    with h5py.File(path, "r", swmr=True) as f:
        return f[name][:]


# -- devices: nothing on the training thread reads a tensor's values -----------------------

_READS = ("numpy", "item", "tolist", "cpu", "__float__", "__int__", "__bool__", "__index__")


class _Spy:
    """Reads of a tensor's values on the host, as (method, thread name): on the training
    thread while ``on`` is set (inside `Recorder.backward`), on any other thread always."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.on = threading.Event()


@pytest.fixture
def value_reads(monkeypatch) -> _Spy:
    spy = _Spy()
    for name in _READS:
        original = getattr(torch.Tensor, name)

        def read(self, *args, _name=name, _original=original, **kwargs):
            thread = threading.current_thread()
            if spy.on.is_set() or thread is not threading.main_thread():
                spy.calls.append((_name, thread.name))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, read)
    return spy


class _Event:
    """Stands in for a device event, so the accelerator path runs on a CPU-only machine."""

    waited: ClassVar[list[str]] = []

    def synchronize(self) -> None:
        _Event.waited.append(threading.current_thread().name)


@pytest.fixture
def accelerator_path(monkeypatch) -> list[str]:
    """Force the copy-and-event path that non-CPU tensors take; returns who waited."""
    _Event.waited = []
    monkeypatch.setattr(_transfer, "_needs_copy", lambda t: True)
    monkeypatch.setattr(_transfer, "_record_event", lambda device: _Event())
    return _Event.waited


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 3)
    ).double()


def _record_cnn(path, steps: int = 3, spy: _Spy | None = None, **options) -> nn.Module:
    model = _cnn()
    opt = torch.optim.SGD(model.parameters(), lr=torch.tensor(0.05))
    g = torch.Generator().manual_seed(1)
    with Recorder(path, model, opt, **options) as rec:
        for step in range(steps):
            x = torch.randn(8, 1, 8, 8, generator=g, dtype=torch.float64)
            y = torch.randint(0, 3, (8,), generator=g)
            logits = model(x)
            losses = F.cross_entropy(logits, y, reduction="none")
            # The first step's hidden-use check (every use of a parameter seen?) reads its
            # result on the host once; every later step must read nothing.
            if spy is not None and step > 0:
                spy.on.set()
            rec.backward(losses, np.arange(8) + 8 * step, logits=logits, targets=y)
            if spy is not None:
                spy.on.clear()
            opt.step()
            opt.zero_grad()
    return model


def test_a_recorded_step_reads_no_tensor_value_on_the_training_thread(
    tmp_path, value_reads, accelerator_path
):
    options = {"alignment": True, "input_grad": True, "thumbnails": True}
    _record_cnn(tmp_path / "t.h5", spy=value_reads, **options)
    training_thread = [c for c in value_reads.calls if c[1] == threading.current_thread().name]
    # The spy sees reads: the writer thread is where the values are turned into numpy.
    assert ("numpy", "samplescope-writer") in value_reads.calls
    assert training_thread == []
    # One wait per transfer (3 steps, 1 thumbnail batch each), all on the writer thread.
    assert accelerator_path == ["samplescope-writer"] * 6
    assert np.allclose(_read(tmp_path / "t.h5", "steps/lr"), 0.05)


def test_the_accelerator_path_writes_the_same_trace_as_the_cpu_path(tmp_path, monkeypatch):
    options = {"alignment": True, "input_grad": True, "thumbnails": True}
    _record_cnn(tmp_path / "cpu.h5", **options)
    monkeypatch.setattr(_transfer, "_needs_copy", lambda t: True)
    monkeypatch.setattr(_transfer, "_record_event", lambda device: _Event())
    _record_cnn(tmp_path / "dev.h5", **options)
    with h5py.File(tmp_path / "cpu.h5", "r") as a, h5py.File(tmp_path / "dev.h5", "r") as b:
        for table in ("visits", "steps", "thumbnails"):
            for name in a[table]:
                if name != "time":
                    assert np.array_equal(a[table][name][:], b[table][name][:], equal_nan=True)


def test_a_tensor_learning_rate_is_copied_before_the_scheduler_changes_it(tmp_path):
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=torch.tensor(0.5))
    with Recorder(tmp_path / "t.h5", model, opt) as rec:
        for _ in range(2):
            losses = model(torch.randn(3, 4)).square().sum(1)
            rec.backward(losses, [0, 1, 2])
            opt.param_groups[0]["lr"].mul_(0.5)  # what schedulers do to a tensor lr
    assert _read(tmp_path / "t.h5", "steps/lr").tolist() == [0.5, 0.25]


def test_nonfinite_values_are_counted_by_the_writer_and_warned_once(tmp_path):
    model = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    x[1, 0] = float("inf")
    with Recorder(tmp_path / "t.h5", model) as rec:
        for _ in range(2):
            losses = model(x).square().sum(1)
            rec.backward(losses, [0, 1, 2, 3])
        with pytest.warns(UserWarning, match="non-finite .* at step 0") as caught:
            rec.flush()
        assert len(caught) == 1
        counts = _read(tmp_path / "t.h5", "steps/n_nonfinite")
        # Per step: the loss, both layers' norm... of sample 1, and its input norm.
        assert counts.tolist() == [3, 3]
        assert rec.n_nonfinite == 6
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            rec.backward(model(x).square().sum(1), [0, 1, 2, 3])
    assert rec.n_nonfinite == 9


def test_undefined_input_norms_are_not_counted_as_nonfinite(tmp_path):
    # Token ids (not floating) and an input whose first dimension is not the batch:
    # input_sq is NaN by definition, not a fault.
    tokens = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 2))

    class SeqFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x.transpose(0, 1))  # [T, N, D] in, the layer sees [N, T, D]

    seq_first = SeqFirst()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with Recorder(tmp_path / "a.h5", tokens) as rec:
            losses = tokens(torch.randint(0, 10, (3, 2))).square().sum(1)
            rec.backward(losses, [0, 1, 2])
        # The model input is sequence-first: said so, as the recorder asks (never guessed).
        with Recorder(tmp_path / "b.h5", seq_first, batch_dims={"": 1}) as rec:
            losses = seq_first(torch.randn(5, 3, 4)).square().sum((1, 2))
            rec.backward(losses, [0, 1, 2])
    for path in (tmp_path / "a.h5", tmp_path / "b.h5"):
        assert np.isnan(_read(path, "visits/input_sq")).all()
        assert _read(path, "steps/n_nonfinite").tolist() == [0]


# -- torch.compile ------------------------------------------------------------------------


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))


@pytest.mark.parametrize(
    ("compile_it", "message"),
    [
        (torch.compile, r"Sequential is compiled \(torch\.compile\(model\)\)"),
        (lambda m: m.compile() or m, r"Sequential is compiled \(model\.compile\(\)\)"),
        (
            lambda m: (m.get_submodule("0").compile(), m)[1],
            r"module '0' is compiled \(model\.compile\(\)\)",
        ),
    ],
)
def test_a_compiled_model_is_refused_at_entry_in_one_line(tmp_path, compile_it, message):
    model = compile_it(_mlp())
    with pytest.raises(RecorderError, match=message) as caught, Recorder(tmp_path / "t.h5", model):
        pass
    assert "\n" not in str(caught.value)
    assert "pass and call the uncompiled module" in str(caught.value)
    assert not (tmp_path / "t.h5").exists()


def test_calling_a_compiled_wrapper_of_the_recorded_model_is_an_error(tmp_path):
    model = _mlp()
    compiled = torch.compile(model, backend="eager")
    x, y = torch.randn(4, 4), torch.tensor([0, 1, 0, 1])
    F.cross_entropy(compiled(x), y).backward()  # compiled before the hooks exist
    with Recorder(tmp_path / "t.h5", model) as rec:
        losses = F.cross_entropy(compiled(x), y, reduction="none")
        with pytest.raises(RecorderError, match=r"compile'd wrapper .* call the uncompiled model"):
            rec.backward(losses, [0, 1, 2, 3])


# -- layers that get no gradient in a step ---------------------------------------------------


class _Heads(nn.Module):
    """A body, a head the loss uses, an auxiliary head it leaves out, and a branch."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(6, 5)
        self.head = nn.Linear(5, 3)
        self.aux = nn.Linear(5, 3)  # runs, but the loss does not use it
        self.branch = nn.GRUCell(5, 5)  # a fallback layer, only in "deep" steps
        self.deep = False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.body(x))
        if self.deep:
            h = self.branch(h)
        return self.head(h), self.aux(h)


def _head_loss(model: nn.Module, x, y) -> torch.Tensor:
    return F.cross_entropy(model(x)[0], y, reduction="none")


def test_a_layer_without_gradient_records_zero_and_training_is_unchanged(tmp_path):
    model = _Heads().double()
    plain = copy.deepcopy(model)
    layers = {n: model.get_submodule(n) for n in ("body", "head", "aux", "branch")}
    x, y = _data()
    expected = []
    for deep in (False, True, False):
        model.deep = plain.deep = deep
        expected.append(_oracle(model, layers, _head_loss, x, y))
        opt = torch.optim.SGD(plain.parameters(), lr=0.1)
        _head_loss(plain, x, y).mean().backward()
        opt.step()
        opt.zero_grad()
        model.load_state_dict(plain.state_dict())
    model = _Heads().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Recorder(tmp_path / "t.h5", model, alignment=True) as rec:
        for deep in (False, True, False):
            model.deep = deep
            rec.backward(_head_loss(model, x, y), np.arange(8))
            opt.step()
            opt.zero_grad()
    names = [n.decode() for n in _read(tmp_path / "t.h5", "layers/name")]
    got = _read(tmp_path / "t.h5", "visits/grad_sq").reshape(3, 8, -1)
    order = [names.index(n) for n in layers]
    np.testing.assert_allclose(got[:, :, order], np.stack(expected), rtol=1e-5, atol=1e-30)
    assert (got[:, :, names.index("aux")] == 0).all()
    assert (got[[0, 2], :, names.index("branch")] == 0).all()
    assert (got[1, :, names.index("branch")] > 0).all()
    assert (
        _read(tmp_path / "t.h5", "visits/alignment").reshape(3, 8, -1)[:, :, names.index("aux")]
        == 0
    ).all()
    for a, b in zip(plain.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_layer_whose_norm_fails_is_still_an_error(tmp_path):
    def broken(module, activation, grad_output):
        msg = "no norm today"
        raise ValueError(msg)

    registry = default_registry()
    registry.register(nn.Linear, broken)
    model = _Heads()
    with Recorder(tmp_path / "t.h5", model, registry=registry) as rec:
        x, y = _data()
        with pytest.raises(RecorderError, match="layer 'body': no norm today"):
            rec.backward(_head_loss(model, x.float(), y), np.arange(8))


# -- eval mode and grad mode ------------------------------------------------------------------


def test_eval_mode_training_warns_once_and_records_nothing(tmp_path):
    model = _mlp()
    model.eval()  # what from_pretrained returns
    with Recorder(tmp_path / "t.h5", model) as rec, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            rec.backward(model(torch.randn(4, 4)).square().sum(1), [0, 1, 2, 3])
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1
    assert "Sequential is in eval mode" in messages[0]
    assert "call model.train()" in messages[0]
    assert "\n" not in messages[0]
    assert _read(tmp_path / "t.h5", "steps/step").shape == (0,)


def test_a_forward_without_grad_warns_once(tmp_path):
    model = _mlp()
    shift = nn.Parameter(torch.zeros(2))  # outside the model: the losses still need grad
    with Recorder(tmp_path / "t.h5", model) as rec, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            with torch.no_grad():
                out = model(torch.randn(4, 4))
            rec.backward((out + shift).square().sum(1), [0, 1, 2, 3])
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1
    assert "grad disabled" in messages[0]
    assert "run the forward with grad enabled" in messages[0]


def test_backward_under_no_grad_after_a_recorded_forward_is_recorded(tmp_path):
    model = _mlp().double()
    x, y = _data(d=4, k=2)
    layers = {n: model.get_submodule(n) for n in ("0", "2")}
    expected = _oracle(model, layers, _ce, x, y)
    with Recorder(tmp_path / "t.h5", model) as rec:
        losses = _ce(model, x, y)
        with torch.no_grad():  # backward itself needs no grad mode
            rec.backward(losses, np.arange(8))
    np.testing.assert_allclose(_read(tmp_path / "t.h5", "visits/grad_sq"), expected, rtol=1e-5)


# -- parameters owned by the model itself ------------------------------------------------------


class _ViTish(nn.Module):
    """A class token and position embedding owned by the root, as in a vision transformer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 4))
        self.pos_embed = nn.Parameter(torch.randn(1, 4, 4) * 0.1)
        self.proj = nn.Linear(3, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), self.proj(x)], 1)
        h = torch.tanh(h + self.pos_embed)
        return self.head(h[:, 0] * h[:, 1:].mean(1))


def test_root_owned_parameters_get_a_name_exact_norms_and_input_norms(tmp_path):
    model = _ViTish().double()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 3, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=g)
    layers = {"": model, "proj": model.proj, "head": model.head}
    expected = _oracle(model, layers, _ce, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no false "non-finite" warning
        with Recorder(tmp_path / "t.h5", model, input_grad=True) as rec:
            for _ in range(2):
                rec.backward(_ce(model, x, y), np.arange(6))
                model.zero_grad()
    names = [n.decode() for n in _read(tmp_path / "t.h5", "layers/name")]
    assert names == ["<root>", "proj", "head"]
    got = _read(tmp_path / "t.h5", "visits/grad_sq")
    np.testing.assert_allclose(got[:6], expected, rtol=1e-5)
    input_sq = x.square().sum((1, 2)).numpy()
    np.testing.assert_allclose(
        _read(tmp_path / "t.h5", "visits/input_sq"), np.tile(input_sq, 2), rtol=1e-6
    )
    assert np.isfinite(_read(tmp_path / "t.h5", "visits/input_grad_sq")).all()
    assert _read(tmp_path / "t.h5", "steps/n_nonfinite").tolist() == [0, 0]


def test_root_layer_name_appears_in_errors(tmp_path):
    def broken(module, activation, grad_output):
        msg = "no norm today"
        raise ValueError(msg)

    registry = default_registry()
    registry.register(_ViTish, broken)
    model = _ViTish()
    with Recorder(tmp_path / "t.h5", model, registry=registry) as rec:
        losses = _ce(model, torch.randn(2, 3, 3), torch.tensor([0, 1]))
        with pytest.raises(RecorderError, match="layer '<root>': no norm today"):
            rec.backward(losses, [0, 1])


def test_rows_keep_the_values_of_their_step_when_tensors_change_later(tmp_path):
    # The writer reads a step's rows up to flush_seconds later: they must be copies.
    model = nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    with Recorder(tmp_path / "t.h5", model) as rec:
        logits = model(x)
        losses = F.cross_entropy(logits, y, reduction="none")
        expected = losses.detach().clone()
        rec.backward(losses, [0, 1, 2, 3], logits=logits, targets=y)
        losses.detach().zero_()
        y.fill_(1)
    np.testing.assert_array_equal(_read(tmp_path / "t.h5", "visits/loss"), expected.numpy())
    assert _read(tmp_path / "t.h5", "visits/target").tolist() == [0, 1, 0, 1]


def test_a_bfloat16_model_is_recorded(tmp_path):
    model = nn.Linear(4, 2).to(torch.bfloat16)
    x = torch.randn(3, 4).to(torch.bfloat16)
    with Recorder(tmp_path / "t.h5", model) as rec:
        rec.backward(model(x).float().square().sum(1), [0, 1, 2])
    np.testing.assert_allclose(
        _read(tmp_path / "t.h5", "visits/input_sq"), x.float().square().sum(1).numpy(), rtol=1e-2
    )
    assert np.isfinite(_read(tmp_path / "t.h5", "visits/grad_sq")).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_a_recorded_step_never_synchronises_and_matches_the_cpu(tmp_path, monkeypatch):
    # The CPU tests above force the device path; this one runs it for real where it can.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    cpu = _cnn().float()
    gpu = copy.deepcopy(cpu).cuda()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 1, 8, 8, generator=g)
    y = torch.randint(0, 3, (8,), generator=g)
    for model, path, device in ((cpu, "cpu.h5", "cpu"), (gpu, "gpu.h5", "cuda")):
        xb, yb = x.to(device), y.to(device)
        opt = torch.optim.SGD(model.parameters(), lr=torch.tensor(0.05, device=device))
        options = {"alignment": True, "input_grad": True, "thumbnails": True}
        with Recorder(tmp_path / path, model, opt, **options) as rec:
            for step in range(3):
                logits = model(xb)
                losses = F.cross_entropy(logits, yb, reduction="none")
                if step and device == "cuda":  # after the convolutions' one-off timing
                    torch.cuda.set_sync_debug_mode("error")
                try:
                    rec.backward(losses, np.arange(8), logits=logits, targets=yb)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                opt.step()
                opt.zero_grad()
    for name in ("visits/grad_sq", "visits/input_sq", "visits/alignment", "steps/grad_sq"):
        np.testing.assert_allclose(
            _read(tmp_path / "gpu.h5", name),
            _read(tmp_path / "cpu.h5", name),
            rtol=1e-3,
            atol=1e-7,
        )
