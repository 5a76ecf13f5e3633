"""One model with every supported kind, a Transformer block and an LSTM, layer by layer.

A BatchNorm in training mode sits in the middle, so the layers upstream of it interact
across samples: every layer is checked against its additive-term oracle (which equals the
per-sample gradient for the layers downstream of it).
"""

from __future__ import annotations

import pytest
import torch
from test_layers_support import check_layers
from torch import Tensor, nn

pytestmark = pytest.mark.usefixtures("float64_default")


class Everything(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 8, padding_idx=0)
        self.conv1d = nn.Conv1d(8, 8, 3, padding=1)
        self.group_norm = nn.GroupNorm(2, 8)
        self.batch_norm = nn.BatchNorm1d(8)
        self.linear = nn.Linear(8, 8)
        self.layer_norm = nn.LayerNorm(8)
        self.block = nn.TransformerEncoderLayer(
            8, 2, dim_feedforward=12, dropout=0.0, batch_first=True
        )
        self.rms_norm = nn.RMSNorm(8)
        self.lstm = nn.LSTM(8, 6, batch_first=True)
        self.conv2d = nn.Conv2d(1, 3, 3, stride=2, padding="valid")
        self.batch_norm2d = nn.BatchNorm2d(3).eval()
        self.head = nn.Linear(6 + 3, 4)

    def forward(self, tokens: Tensor, image: Tensor) -> Tensor:
        h = self.embed(tokens).transpose(1, 2)  # [N, D, T]
        h = self.batch_norm(self.group_norm(self.conv1d(h))).transpose(1, 2)
        h = self.layer_norm(torch.relu(self.linear(h)))
        h = self.rms_norm(self.block(h))
        out, _ = self.lstm(h)
        pixels = self.batch_norm2d(self.conv2d(image)).mean((2, 3))
        return self.head(torch.cat([out[:, -1], pixels], 1))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_every_kind_in_one_model(reduction: str) -> None:
    torch.manual_seed(0)
    model = Everything()
    with torch.no_grad():
        model.batch_norm2d.running_mean.normal_()
        model.batch_norm2d.running_var.uniform_(0.5, 2.0)
    tokens = torch.randint(0, 11, (3, 5))
    image = torch.randn(3, 1, 7, 7)
    run = check_layers(model, (tokens, image), reduction, interacting=True)
    methods = {name: o.method for name, o in run.observers.items()}
    assert methods == {
        "embed": "identity",
        "conv1d": "identity",
        "group_norm": "identity",
        "batch_norm": "identity",
        "linear": "identity",
        "layer_norm": "identity",
        "block.self_attn": "reexpressed",
        "block.linear1": "identity",
        "block.linear2": "identity",
        "block.norm1": "identity",
        "block.norm2": "identity",
        "rms_norm": "identity",
        "lstm": "reexpressed",
        "conv2d": "identity",
        "batch_norm2d": "identity",
        "head": "identity",
    }
