"""nn.Embedding.

Sample i's weight gradient has one non-zero row per distinct token v it uses:
row v = Σ_{t: x_t = v} δ_t. Its squared norm is therefore Σ_v ‖Σ_{t: x_t = v} δ_t‖²: group
the (sample, token) pairs with `torch.unique`, add the δ of equal pairs with `index_add_`,
square, and add the rows back to their samples — O(N·T·D), never the [N, V, D] gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["embedding_declines", "embedding_norms"]


def embedding_norms(
    module: nn.Module, activation: Tensor, grad_output: Tensor
) -> dict[str, Tensor]:
    """Squared per-sample norm of an nn.Embedding's weight gradient.

    Tokens equal to ``padding_idx`` add nothing (that row gets no gradient). ``max_norm``
    rescales the weight in place before the lookup and leaves the gradient's form alone.

    Args:
        module: the nn.Embedding.
        activation: token ids [N, ...].
        grad_output: gradient w.r.t. the looked-up vectors [N, ..., D].

    Returns:
        ``{"weight": [N]}`` when the weight is trainable.
    """
    if not module.weight.requires_grad:
        return {}
    n = grad_output.shape[0]
    ids = activation.reshape(n, -1)
    d = grad_output.reshape(n, ids.shape[1], -1)
    sample = torch.arange(n, device=ids.device).unsqueeze(1).expand_as(ids)
    # One key per (sample, token): rows of different samples must never be merged.
    key = sample * module.num_embeddings + ids
    d = d.reshape(-1, d.shape[-1])
    key = key.reshape(-1)
    if module.padding_idx is not None:
        keep = ids.reshape(-1) != module.padding_idx
        key, d = key[keep], d[keep]
    unique, inverse = torch.unique(key, return_inverse=True)
    rows = d.new_zeros(unique.shape[0], d.shape[1]).index_add_(0, inverse, d)
    per_row = rows.square().sum(1)
    owner = torch.div(unique, module.num_embeddings, rounding_mode="floor")
    return {"weight": per_row.new_zeros(n).index_add_(0, owner, per_row)}


def embedding_declines(module: nn.Module) -> str | None:
    """Why `embedding_norms` cannot observe ``module``, or None when it can."""
    if module.scale_grad_by_freq:
        # The gradient is divided by token counts over the whole batch, so a sample's
        # term depends on the others; no closed form here.
        return "scale_grad_by_freq=True scales by batch-wide token counts"
    if module.sparse:
        return "sparse=True gradients are not supported"
    return None
