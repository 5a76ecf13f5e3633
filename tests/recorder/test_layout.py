"""Where the batch runs: broadcast (batch-1) modules and sequence-first layouts.

Against the whole-model oracle (float64, per-sample autograd loop, 1e-5) and for
bit-identical training; T == N everywhere, where reading the wrong dimension as the batch
would go unnoticed by shapes alone.
"""

from __future__ import annotations

import pytest
import torch
from oracle_support import check_bit_identical, check_exact, recorded_step
from torch import Tensor, nn

from samplescope.recorder import RecorderError

pytestmark = pytest.mark.usefixtures("float64_default")

N = T = 4
V, D = 9, 8


def _seeded(*shape: int, seed: int = 1) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _ids() -> Tensor:
    return torch.randint(0, V, (N, T), generator=torch.Generator().manual_seed(2))


class Positions(nn.Module):
    """GPT-2's embeddings: ``wpe(position_ids)`` with position ids [1, T], broadcast."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(V, D)
        self.wpe = nn.Embedding(T, D)
        self.bias_net = nn.Linear(T, D)  # a Linear fed a broadcast [1, T] tensor
        self.scale = Scale()  # the fallback, fed a broadcast tensor
        self.head = nn.Linear(D, 3)

    def forward(self, ids: Tensor) -> Tensor:
        positions = torch.arange(ids.shape[1])[None]
        h = self.wte(ids) + self.wpe(positions)
        h = h + self.bias_net(torch.eye(T)[None]) + self.scale(torch.ones(1, T, D))
        return self.head(torch.tanh(h))


class Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight


def _positions_loss(m: nn.Module) -> Tensor:
    return m(input_ids=_ids()).square().sum((1, 2))


class PositionsByKeyword(Positions):
    def forward(self, input_ids: Tensor) -> Tensor:  # called as model(input_ids=...)
        return super().forward(input_ids)


def _encoder_layer() -> nn.Module:
    return nn.TransformerEncoderLayer(D, 2, 16, dropout=0.0)  # batch_first=False


def _encoder() -> nn.Module:
    return nn.TransformerEncoder(
        nn.TransformerEncoderLayer(D, 2, 16, dropout=0.0),
        2,
        norm=nn.LayerNorm(D),
        enable_nested_tensor=False,
    )


class SequenceFirstAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(D, 2)  # batch_first=False

    def forward(self, x: Tensor) -> Tensor:
        return self.attn(x, x, x)[0]


def _seq_first_loss(m: nn.Module) -> Tensor:
    return m(_seeded(T, N, D)).square().sum((0, 2))  # [T, N, D]: the batch is dim 1


CASES = {
    "broadcast_positions": (PositionsByKeyword, _positions_loss),
    "transformer_encoder_layer": (_encoder_layer, _seq_first_loss),
    "transformer_encoder": (_encoder, _seq_first_loss),
    "multihead_attention": (SequenceFirstAttention, _seq_first_loss),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_batch_layout_is_exact(tmp_path, case: str, reduction: str) -> None:
    make, loss = CASES[case]
    check_exact(tmp_path, make, loss, reduction=reduction)


# nn.MultiheadAttention is re-expressed while recorded (attention.py): the same
# computation in another order, equal to float rounding rather than bit for bit.
REEXPRESSED = {"transformer_encoder_layer", "transformer_encoder", "multihead_attention"}


@pytest.mark.parametrize("case", list(CASES))
def test_batch_layout_trains_bit_identically(tmp_path, case: str) -> None:
    make, loss = CASES[case]
    check_bit_identical(tmp_path, make, loss, rtol=1e-12 if case in REEXPRESSED else 0.0)


class TimeMajor(nn.Module):
    """A custom model fed [N, T, D] that works time-major inside: no flag says so."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(D, D)
        self.head = nn.Linear(D, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.proj(x.transpose(0, 1)))  # [T, N, D]
        return self.head(h.transpose(0, 1))


def _time_major_loss(m: nn.Module) -> Tensor:
    return m(_seeded(N, T + 1, D)).square().sum((1, 2))


def test_an_unknown_layout_is_refused_naming_the_layer_and_the_option(tmp_path) -> None:
    with pytest.raises(RecorderError) as error:
        recorded_step(tmp_path / "t.h5", TimeMajor(), _time_major_loss)
    message = str(error.value)
    assert "layer 'proj'" in message
    assert "batch_dims={'proj': 1}" in message
    assert "\n" not in message


def test_a_layout_override_makes_it_exact(tmp_path) -> None:
    check_exact(tmp_path, TimeMajor, _time_major_loss, batch_dims={"proj": 1})
    check_bit_identical(tmp_path, TimeMajor, _time_major_loss, batch_dims={"proj": 1})
