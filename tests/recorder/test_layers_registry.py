"""The registry's lookup and policies, the Observer contract, and hook hygiene."""

from __future__ import annotations

import copy

import pytest
import torch
from test_layers import Attention, ScaleShift
from test_layers_mixed import Everything
from test_layers_support import (
    FakeSession,
    QuadraticLoss,
    check_layers,
    hooks_left,
    observed,
    run_observed,
)
from torch import Tensor, nn

from samplescope.recorder.layers import (
    HookObserver,
    LayerRegistry,
    UnsupportedLayerError,
    default_registry,
)

pytestmark = pytest.mark.usefixtures("float64_default")


class MyLinear(nn.Linear):
    """A subclass: resolves to nn.Linear's rule through the MRO."""


def unsupported_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(3, 3),
        ScaleShift(3),
        # A rule that declines this configuration, and a layer family with no rule.
        nn.EmbeddingBag(5, 3, scale_grad_by_freq=True),
        nn.GRUCell(3, 3),
    )


# -- registry ----------------------------------------------------------------------------


def test_subclass_resolves_through_the_mro() -> None:
    registry = default_registry()
    assert registry.lookup(MyLinear(2, 2)) is registry.lookup(nn.Linear(2, 2))
    model = nn.Sequential(MyLinear(3, 2))
    run = check_layers(model, (torch.randn(4, 3),), "mean")
    assert isinstance(run.observers["0"], HookObserver)


def test_error_lists_every_unsupported_layer_at_once() -> None:
    with pytest.raises(UnsupportedLayerError) as raised:
        default_registry().observers(unsupported_model(), FakeSession(), on_unsupported="error")
    message = str(raised.value)
    assert "1 (ScaleShift)" in message
    assert "2 (EmbeddingBag: scale_grad_by_freq=True" in message
    assert "3 (GRUCell)" in message
    assert "0 (Linear" not in message


def test_warn_leaves_unsupported_layers_out() -> None:
    with pytest.warns(UserWarning, match=r"leaves out unsupported layers: 1 \(ScaleShift\)"):
        observers = default_registry().observers(
            unsupported_model(), FakeSession(), on_unsupported="warn"
        )
    assert [o.name for o in observers] == ["0"]


def test_warn_without_a_fallback_still_only_warns() -> None:
    registry = LayerRegistry()
    registry.register(nn.Linear, default_registry().lookup(nn.Linear(1, 1)))
    with pytest.warns(UserWarning, match="ScaleShift"):
        observers = registry.observers(unsupported_model(), FakeSession(), on_unsupported="warn")
    assert [o.name for o in observers] == ["0"]
    with pytest.raises(UnsupportedLayerError, match="ScaleShift"):
        registry.observers(unsupported_model(), FakeSession(), on_unsupported="fallback")


def test_fallback_takes_unsupported_and_declined_layers() -> None:
    observers = default_registry().observers(unsupported_model(), FakeSession())
    assert [o.method for o in observers] == ["identity", "fallback", "fallback", "fallback"]
    frequency = nn.Sequential(nn.Embedding(5, 3, scale_grad_by_freq=True))
    # Supported in closed form (each sample's additive term with the batch's counts).
    assert default_registry().observers(frequency, FakeSession())[0].method == "identity"


def test_bad_policy_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="on_unsupported"):
        default_registry().observers(nn.Linear(2, 2), FakeSession(), on_unsupported="skip")


def test_frozen_layers_are_not_observed() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model[0].requires_grad_(False)
    assert [o.name for o in default_registry().observers(model, FakeSession())] == ["1"]


# -- the Observer contract ---------------------------------------------------------------


def test_nothing_is_recorded_while_the_session_is_inactive() -> None:
    torch.manual_seed(0)
    model = Everything()
    inputs = (torch.randint(0, 11, (3, 5)), torch.randn(3, 1, 7, 7))
    losses = QuadraticLoss((3, 4))
    run = run_observed(model, inputs, losses, "sum", FakeSession(active=False, alignment=False))
    for name, result in run.results.items():
        assert result.grad_sq is None, name
        assert result.batch_grad == {}, name
        assert result.error is None, name


class Twice(nn.Module):
    """Calls each layer twice in one step."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3)
        self.custom = ScaleShift(3)
        self.attention = nn.MultiheadAttention(3, 1, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.linear(self.linear(x))
        x = self.custom(self.custom(x))
        x = self.attention(x, x, x, need_weights=False)[0]
        return self.attention(x, x, x, need_weights=False)[0]


def test_only_attention_refuses_to_be_called_twice() -> None:
    # Linear and the fallback add the calls' uses exactly (tests/recorder/test_shared_params.py);
    # the re-expressed attention adds squared norms per call and so refuses.
    run = run_observed(
        Twice(),
        (torch.randn(2, 4, 3),),
        QuadraticLoss((2, 4, 3)),
        "mean",
        FakeSession(alignment=False),
    )
    assert set(run.results) == {"linear", "custom", "attention"}
    assert isinstance(run.results["attention"].error, RuntimeError)
    assert "ran 2 times" in str(run.results["attention"].error)
    assert run.results["linear"].error is None
    assert run.results["custom"].error is None


def test_a_failing_norm_function_never_raises_in_backward() -> None:
    def broken(module: nn.Module, activation: Tensor, grad_output: Tensor) -> dict[str, Tensor]:
        msg = "boom"
        raise ValueError(msg)

    registry = LayerRegistry()
    registry.register(nn.Linear, broken)
    model = nn.Linear(3, 2)
    observer = registry.observers(model, FakeSession())[0]
    observer.attach()
    try:
        model(torch.randn(4, 3)).sum().backward()
    finally:
        observer.detach()
    assert isinstance(observer.result().error, ValueError)
    assert model.weight.grad is not None


def test_begin_step_forgets_the_previous_step() -> None:
    model = nn.Linear(3, 2)
    with observed(model) as observers:
        model(torch.randn(4, 3)).sum().backward()
        assert observers[""].result().grad_sq is not None
        observers[""].begin_step()
        assert observers[""].result().grad_sq is None
        model(torch.randn(4, 3)).sum().backward()
        assert observers[""].result().error is None


# -- hook hygiene ------------------------------------------------------------------------


class _Feedforward(nn.Linear):
    """Stands in for the LSTM: returns (output, state) without a recurrence."""

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        return super().forward(x), None


class NoAttention(Everything):
    """Everything without the re-expressed layers (attention, LSTM): bit for bit."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Identity()
        self.lstm = _Feedforward(8, 6)


def _train_step(model: nn.Module, inputs: tuple) -> tuple[Tensor, dict[str, Tensor]]:
    model.zero_grad()
    out = model(*inputs)
    QuadraticLoss(tuple(out.shape))(out).mean().backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


def _inputs() -> tuple[Tensor, Tensor]:
    return torch.randint(0, 11, (3, 5)), torch.randn(3, 1, 7, 7)


def test_observers_change_nothing_bit_for_bit() -> None:
    torch.manual_seed(0)
    model = NoAttention()
    reference = copy.deepcopy(model)
    inputs = _inputs()
    with observed(model):
        out, grads = _train_step(model, inputs)
    expected_out, expected_grads = _train_step(reference, inputs)
    assert torch.equal(out, expected_out)
    for name, grad in grads.items():
        assert torch.equal(grad, expected_grads[name]), name


def test_reexpressed_attention_changes_results_only_by_rounding() -> None:
    torch.manual_seed(0)
    model = Everything()
    reference = copy.deepcopy(model)
    inputs = _inputs()
    with observed(model):
        out, grads = _train_step(model, inputs)
    expected_out, expected_grads = _train_step(reference, inputs)
    torch.testing.assert_close(out, expected_out)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], msg=name)


def test_detach_removes_every_hook_and_restores_attention() -> None:
    torch.manual_seed(0)
    model = Everything()
    mha = nn.MultiheadAttention(4, 2, batch_first=True)
    wrapped = Attention(mha, {"need_weights": True}, None)
    for m in (model, wrapped):
        assert hooks_left(m) == []
        with observed(m):
            assert hooks_left(m) != []
    assert hooks_left(model) == []
    assert hooks_left(wrapped) == []
    assert "forward" not in mha.__dict__
    assert "forward" not in model.block.self_attn.__dict__
    # After detach the model is the plain model again, bit for bit.
    reference = copy.deepcopy(model)
    inputs = _inputs()
    out, grads = _train_step(model, inputs)
    expected_out, expected_grads = _train_step(reference, inputs)
    assert torch.equal(out, expected_out)
    for name, grad in grads.items():
        assert torch.equal(grad, expected_grads[name]), name


def test_unbatched_attention_reports_an_error_and_still_runs() -> None:
    mha = nn.MultiheadAttention(4, 2)
    x = torch.randn(5, 4)  # [L, E]: no batch dimension
    reference = copy.deepcopy(mha)
    with observed(mha) as observers:
        out = mha(x, x, x, need_weights=False)[0]
        out.sum().backward()
        error = observers[""].result().error
    assert isinstance(error, ValueError)
    assert "unbatched" in str(error)
    assert torch.equal(out, reference(x, x, x, need_weights=False)[0])
