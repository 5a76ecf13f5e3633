"""nn.Embedding.

Sample i's weight gradient has one non-zero row per distinct token v it uses:
row v = Σ_{t: x_t = v} δ_t. Its squared norm is therefore Σ_v ‖Σ_{t: x_t = v} δ_t‖²: group
the (sample, token) pairs with `torch.unique`, add the δ of equal pairs with `index_add_`,
square, and add the rows back to their samples — O(N·T·D), never the [N, V, D] gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from samplescope.recorder.layers.base import HookObserver, Session

__all__ = ["EmbeddingObserver", "embedding_declines", "embedding_norms"]


def embedding_norms(
    module: nn.Module, activation: Tensor, grad_output: Tensor
) -> dict[str, Tensor]:
    """Squared per-sample norm of an nn.Embedding's weight gradient.

    Tokens equal to ``padding_idx`` add nothing (that row gets no gradient). ``max_norm``
    rescales the weight in place before the lookup and leaves the gradient's form alone.
    With ``scale_grad_by_freq`` the batch gradient divides each row by the token's count in
    the whole batch, so samples interact; the result is then each sample's additive term
    (as for BatchNorm), exact with the batch's counts.

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
    sample, ids, d = _token_terms(module, activation, grad_output)
    # One key per (sample, token): rows of different samples must never be merged.
    key = sample * module.num_embeddings + ids
    unique, inverse = torch.unique(key, return_inverse=True)
    rows = d.new_zeros(unique.shape[0], d.shape[1]).index_add_(0, inverse, d)
    per_row = rows.square().sum(1)
    owner = torch.div(unique, module.num_embeddings, rounding_mode="floor")
    return {"weight": per_row.new_zeros(n).index_add_(0, owner, per_row)}


def embedding_declines(module: nn.Module) -> str | None:
    """Why `embedding_norms` cannot observe ``module``, or None when it can."""
    if module.sparse:
        return "sparse=True gradients are not supported by the closed form"
    return None


class EmbeddingObserver(HookObserver):
    """HookObserver with the alignment of the backward's (frequency-scaled) terms.

    A forward-mode pass cannot see ``scale_grad_by_freq`` (it only scales the backward),
    so ⟨term_i, G⟩ = Σ_t ⟨δ_t / c(x_t), G[x_t]⟩ is computed directly.
    """

    def __init__(self, name: str, module: nn.Module, session: Session) -> None:
        super().__init__(name, module, session, embedding_norms)

    def alignment(self, batch_grad: dict[str, Tensor]) -> Tensor:
        if self._saved is None:
            msg = f"layer {self.name!r}: no saved forward for alignment"
            raise RuntimeError(msg)
        activation, grad = self._saved
        n = grad.shape[0]
        if "weight" in self._booked:  # shared, or called twice: the book has every use
            booked = self._book_alignment(batch_grad)
            return grad.new_zeros(n) if booked is None else booked
        if "weight" not in batch_grad:
            return grad.new_zeros(n)
        sample, ids, d = _token_terms(self.module, activation, grad)
        per_token = (d * batch_grad["weight"][ids]).sum(1)
        return per_token.new_zeros(n).index_add_(0, sample, per_token)


def _token_terms(
    module: nn.Module, activation: Tensor, grad_output: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(sample, token id, δ) of every token that adds to the weight gradient, flattened.

    Padding tokens are dropped; with ``scale_grad_by_freq`` δ is divided by the token's
    count in the batch, as the embedding backward does.
    """
    n = grad_output.shape[0]
    ids = activation.reshape(n, -1)
    d = grad_output.reshape(n * ids.shape[1], -1)
    sample = torch.arange(n, device=ids.device).repeat_interleave(ids.shape[1])
    flat = ids.reshape(-1)
    if module.scale_grad_by_freq:
        # The kernel counts every token of the batch, padding included.
        counts = torch.bincount(flat, minlength=module.num_embeddings)
        d = d / counts[flat].unsqueeze(1).to(d.dtype)
    if module.padding_idx is not None:
        keep = flat != module.padding_idx
        sample, flat, d = sample[keep], flat[keep], d[keep]
    return sample, flat, d
