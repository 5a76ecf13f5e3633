"""nn.Embedding (dense or sparse) and nn.EmbeddingBag.

Sample i's weight gradient has one non-zero row per distinct token v it uses:
row v = Σ_{t: x_t = v} δ_t. Its squared norm is therefore Σ_v ‖Σ_{t: x_t = v} δ_t‖²: group
the (sample, token) pairs with `torch.unique`, add the δ of equal pairs with `index_add_`,
square, and add the rows back to their samples — O(N·T·D), never the [N, V, D] gradient.
``sparse=True`` changes only how the batch gradient is stored, not its value, so the same
closed form applies.

nn.EmbeddingBag is the same sum with the bag as the sample: token t of bag b adds c_t δ_b to
row x_t, with c_t = 1 (``sum``), the per-sample weight (``sum`` with ``per_sample_weights``)
or 1/|bag| (``mean``, padding not counted). In ``max`` mode each output entry (b, k) comes
from one token's row, so δ_b[k] lands in a distinct entry of the gradient and the squared
norm is ‖δ_b‖² for every bag with a non-padding token (0 for an empty bag).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from samplescope.recorder.layers.base import HookObserver, Observer, Session, norm_region
from samplescope.recorder.layers.linear import working_precision

__all__ = [
    "EmbeddingBagObserver",
    "EmbeddingObserver",
    "embedding_bag_declines",
    "embedding_bag_norms",
    "embedding_declines",
    "embedding_norms",
]


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
    return {"weight": _grouped_rows_sq(sample, ids, d, n, module.num_embeddings)}


def _grouped_rows_sq(sample: Tensor, ids: Tensor, d: Tensor, n: int, vocab: int) -> Tensor:
    """Σ_v ‖Σ_{t of sample i with id v} d_t‖² per sample [n], from flat (sample, id, d_t)."""
    (d,) = working_precision(d)
    # One key per (sample, token): rows of different samples must never be merged.
    key = sample * vocab + ids
    unique, inverse = torch.unique(key, return_inverse=True)
    rows = d.new_zeros(unique.shape[0], d.shape[1]).index_add_(0, inverse, d)
    per_row = rows.square().sum(1)
    owner = torch.div(unique, vocab, rounding_mode="floor")
    return per_row.new_zeros(n).index_add_(0, owner, per_row)


def embedding_declines(module: nn.Module) -> str | None:
    """Why `embedding_norms` cannot observe ``module``, or None when it can (always, now)."""
    return None


def rows_of(grad: Tensor, ids: Tensor) -> Tensor:
    """``grad[ids]`` for a dense or a sparse (``sparse=True``) weight gradient.

    A sparse gradient is looked up among its stored rows, never densified to [V, D].
    """
    if not grad.is_sparse:
        return grad[ids]
    grad = grad.coalesce()
    stored = grad.indices()[0]
    values = grad.values()
    if stored.numel() == 0:
        return values.new_zeros(ids.shape[0], *grad.shape[1:])
    where = torch.searchsorted(stored, ids).clamp(max=stored.numel() - 1)
    found = stored[where] == ids
    return values[where] * found.reshape(-1, *[1] * (values.dim() - 1)).to(values.dtype)


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
        per_token = (d * rows_of(batch_grad["weight"], ids).to(d.dtype)).sum(1)
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


# -- nn.EmbeddingBag ----------------------------------------------------------------------


def embedding_bag_declines(module: nn.Module) -> str | None:
    """Why `embedding_bag_norms` cannot observe ``module``, or None when it can."""
    if module.scale_grad_by_freq:
        return "scale_grad_by_freq=True is not modelled by the EmbeddingBag closed form"
    return None


def embedding_bag_norms(
    module: nn.Module,
    indices: Tensor,
    offsets: Tensor | None,
    per_sample_weights: Tensor | None,
    grad_output: Tensor,
) -> dict[str, Tensor]:
    """Squared per-bag norm of an nn.EmbeddingBag's weight gradient; each bag is a sample.

    Args:
        module: the nn.EmbeddingBag (modes sum, mean, max; dense or sparse).
        indices: [B, L] (a bag per row) or 1-D with ``offsets``.
        offsets: start of each bag in 1-D ``indices`` (and the end, with
            ``include_last_offset``), or None for 2-D ``indices``.
        per_sample_weights: a weight per index (mode sum), or None.
        grad_output: gradient w.r.t. the bags' vectors [B, D].

    Returns:
        ``{"weight": [B]}`` when the weight is trainable.
    """
    if not module.weight.requires_grad:
        return {}
    (grad_output,) = working_precision(grad_output)
    n = grad_output.shape[0]
    bag, ids, coef = _bag_terms(module, indices, offsets, per_sample_weights, n)
    if module.mode == "max":
        non_empty = torch.zeros(n, dtype=torch.bool, device=bag.device)
        non_empty[bag] = True
        return {"weight": grad_output.square().sum(1) * non_empty.to(grad_output.dtype)}
    d = grad_output[bag] * coef[:, None].to(grad_output.dtype)
    return {"weight": _grouped_rows_sq(bag, ids, d, n, module.num_embeddings)}


def _bag_terms(
    module: nn.Module,
    indices: Tensor,
    offsets: Tensor | None,
    per_sample_weights: Tensor | None,
    n: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """(bag, token id, coefficient) of every index that adds to the gradient, flattened."""
    if indices.dim() == 2:
        rows, length = indices.shape
        bag = torch.arange(rows, device=indices.device).repeat_interleave(length)
    else:
        # Index j belongs to the last bag starting at or before j.
        starts = offsets[:n] if module.include_last_offset else offsets
        positions = torch.arange(indices.numel(), device=indices.device)
        bag = torch.searchsorted(starts, positions, right=True) - 1
        if module.include_last_offset:
            bag = torch.where(positions < offsets[n], bag, -1)
    flat = indices.reshape(-1)
    coef = (
        per_sample_weights.reshape(-1).detach()
        if per_sample_weights is not None
        else torch.ones(flat.shape, dtype=torch.float64, device=flat.device)
    )
    keep = bag >= 0
    if module.padding_idx is not None:
        keep = keep & (flat != module.padding_idx)
    bag, flat, coef = bag[keep], flat[keep], coef[keep]
    if module.mode == "mean":
        counts = torch.bincount(bag, minlength=n).clamp(min=1)
        coef = coef / counts[bag].to(coef.dtype)
    return bag, flat, coef


class EmbeddingBagObserver(Observer):
    """Keeps an nn.EmbeddingBag's indices, offsets and per-sample weights for the closed form."""

    def __init__(self, name: str, module: nn.Module, session: Session) -> None:
        super().__init__(name, module, session)
        self._saved: tuple[Tensor, Tensor | None, Tensor | None, Tensor] | None = None

    def _attach(self) -> None:
        self._handles.append(self.module.register_forward_hook(self._on_forward, with_kwargs=True))

    def _clear(self) -> None:
        self._saved = None

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> None:
        if not self._recording() or not isinstance(output, Tensor):
            return
        if not output.requires_grad or not self._count_call():
            return
        bound = {"offsets": None, "per_sample_weights": None}
        bound.update(zip(("input", "offsets", "per_sample_weights"), args, strict=False))
        bound.update(kwargs)
        indices = bound.get("input")
        if indices is None or (indices.dim() == 1 and bound["offsets"] is None):
            error = ValueError(f"layer {self.name!r}: 1-D EmbeddingBag input needs offsets")
            self._store_error(error)
            return
        weights = bound["per_sample_weights"]
        held = [
            (
                indices.detach(),
                None if bound["offsets"] is None else bound["offsets"].detach(),
                None if weights is None else weights.detach(),
            )
        ]
        output.register_hook(lambda grad: self._on_grad(*held.pop(), grad) if held else None)

    def _on_grad(
        self, indices: Tensor, offsets: Tensor | None, weights: Tensor | None, grad: Tensor
    ) -> None:
        try:
            with norm_region(grad.device.type):
                norms = embedding_bag_norms(self.module, indices, offsets, weights, grad)
                self._store_norms(norms)
            if self.session.alignment:
                self._saved = (indices, offsets, weights, grad.detach())
        except Exception as error:  # noqa: BLE001 - handed to the recorder after backward
            self._store_error(error)

    def alignment(self, batch_grad: dict[str, Tensor]) -> Tensor:
        """Σ over the bag's tokens of c_t ⟨δ_b, G[x_t]⟩ (max: Σ_k δ_b[k] G[x_{t*(k)}, k])."""
        if self._saved is None:
            msg = f"layer {self.name!r}: no saved forward for alignment"
            raise RuntimeError(msg)
        indices, offsets, weights, d = self._saved
        n = d.shape[0]
        if "weight" not in batch_grad:
            return d.new_zeros(n)
        grad = batch_grad["weight"]
        m = self.module
        if m.mode == "max":
            flat, starts = _flat_bags(indices, offsets)
            # The kernel's own argmax per (bag, dim): the row each output entry came from.
            max_rows = torch.ops.aten._embedding_bag_forward_only(
                m.weight.detach(),
                flat,
                starts,
                False,
                2,
                False,
                None,
                m.include_last_offset and indices.dim() == 1,
                -1 if m.padding_idx is None else m.padding_idx,
            )[3]
            filled = torch.bincount(_bag_terms(m, indices, offsets, weights, n)[0], minlength=n)
            unique, inverse = torch.unique(max_rows.clamp(min=0), return_inverse=True)
            columns = torch.arange(max_rows.shape[1], device=d.device)
            picked = rows_of(grad, unique)[inverse, columns[None, :]].to(d.dtype)
            return (d * picked).sum(1) * (filled > 0).to(d.dtype)
        bag, ids, coef = _bag_terms(m, indices, offsets, weights, n)
        per_token = (d[bag] * rows_of(grad, ids).to(d.dtype)).sum(1) * coef.to(d.dtype)
        return per_token.new_zeros(n).index_add_(0, bag, per_token)


def _flat_bags(indices: Tensor, offsets: Tensor | None) -> tuple[Tensor, Tensor]:
    """1-D indices and bag starts, whichever form the forward got."""
    if indices.dim() == 1:
        return indices, offsets
    rows, length = indices.shape
    return indices.reshape(-1), torch.arange(rows, device=indices.device) * length
