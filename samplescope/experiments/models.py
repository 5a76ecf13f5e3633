"""The two model families the experiments train: the paper's MLP and a small CNN."""

from __future__ import annotations

import math

from torch import nn

# The names live with the config, torch-free, for the CLI.
from samplescope.experiments.config import MODELS

__all__ = ["MODELS", "make_model"]


def make_model(
    name: str, input_shape: tuple[int, ...], n_classes: int, hidden: int = 512, depth: int = 3
) -> nn.Module:
    """Build a model for inputs of ``input_shape`` (without the batch dimension).

    ``mlp`` is the paper's network: ``depth`` hidden ReLU layers of ``hidden`` units with
    Glorot (Xavier) uniform initialisation. ``cnn`` is two conv-ReLU-maxpool blocks and two
    linear layers (1-D convolutions for 1-D inputs such as mnist1d).
    """
    if name == "mlp":
        return _mlp(math.prod(input_shape), n_classes, hidden, depth)
    if name == "cnn":
        return _cnn(input_shape, n_classes)
    msg = f"unknown model {name!r}; choose one of {', '.join(MODELS)}"
    raise ValueError(msg)


def _mlp(n_in: int, n_classes: int, hidden: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    width = n_in
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, n_classes))
    model = nn.Sequential(*layers)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    return model


def _cnn(input_shape: tuple[int, ...], n_classes: int) -> nn.Sequential:
    channels, *spatial = input_shape
    conv, pool = (nn.Conv1d, nn.MaxPool1d) if len(spatial) == 1 else (nn.Conv2d, nn.MaxPool2d)
    flat = 64 * math.prod(s // 4 for s in spatial)
    return nn.Sequential(
        conv(channels, 32, 3, padding=1),
        nn.ReLU(),
        pool(2),
        conv(32, 64, 3, padding=1),
        nn.ReLU(),
        pool(2),
        nn.Flatten(),
        nn.Linear(flat, 128),
        nn.ReLU(),
        nn.Linear(128, n_classes),
    )
