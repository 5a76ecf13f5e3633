"""Parameters with more than one use in a step: tied weights, modules called twice.

Sample i's gradient for a parameter θ is the sum over its uses u of g_{u,i}, so

    ‖Σ_u g_{u,i}‖² = Σ_u ‖g_{u,i}‖² + 2 Σ_{u<v} ⟨g_{u,i}, g_{v,i}⟩,

cross terms included. Each use is kept in a factored form whose norms and inner products
have closed forms (the ghost-norm identities extended to pairs):

- `LinearUse` — Σ_t d_t a_tᵀ (an nn.Linear's weight, or any [O, I] weight used as one);
  two of them are one Linear over the concatenated tokens, so the pair costs one
  `token_outer_sq`;
- `EmbeddingUse` — Σ_t e_{x_t} d_tᵀ (an nn.Embedding's weight): two of them are one
  embedding over the concatenated tokens; with a Linear use of the same [V, D] weight
  (GPT-2's tied lm_head) ⟨Σ_t d_t a_tᵀ, Σ_u e_{x_u} δ_uᵀ⟩ = Σ_{t,u} d_t[x_u] (a_t·δ_u);
- `DenseUse` — the per-sample gradients themselves, [N, *shape] (a bias, or a module with
  no factored form: its per-sample gradients are materialised for that parameter only).

A `UseBook` collects the uses of one step, keyed by parameter, and answers each owner's
squared norms at the end of backward. It also gives every use's sum over the batch, which
the first recorded step compares with the parameter's actual batch gradient: a use that
no hook saw (``F.linear(h, wte.weight)`` outside the owning module) makes them differ.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from samplescope.recorder.layers.linear import token_outer_sq

__all__ = [
    "BatchUse",
    "DenseUse",
    "EmbeddingUse",
    "LinearUse",
    "Use",
    "UseBook",
    "hidden_use_message",
]

# Relative difference between Σ_i (observed uses) and the parameter's batch gradient above
# which a use is taken to be hidden. Float rounding of two summation orders stays orders of
# magnitude below it; a missing use is of the order of the gradient itself.
HIDDEN_USE_RTOL = 1e-3


@dataclass
class LinearUse:
    """Σ_t d_t a_tᵀ per sample: a [N, T, I], d [N, T, O]; the weight is [O, I]."""

    a: Tensor
    d: Tensor

    def batch_sum(self) -> Tensor:
        return torch.einsum("nto,nti->oi", self.d, self.a)

    def inner(self, g: Tensor) -> Tensor:
        """⟨Σ_t d_t a_tᵀ, G⟩ = Σ_t d_tᵀ G a_t per sample."""
        return torch.einsum("nto,oi,nti->n", self.d, g, self.a)


@dataclass
class EmbeddingUse:
    """Σ_k e_{ids_k} d_kᵀ over the tokens k of each sample, flattened.

    ``sample[k]`` is token k's sample, ``ids[k]`` its row, ``d[k]`` the gradient it adds
    (padding dropped, frequency scaling applied), ``n`` the batch size.
    """

    sample: Tensor
    ids: Tensor
    d: Tensor
    n: int
    rows: int

    def batch_sum(self) -> Tensor:
        return self.d.new_zeros(self.rows, self.d.shape[1]).index_add_(0, self.ids, self.d)

    def inner(self, g: Tensor) -> Tensor:
        """Σ_k ⟨G[x_k], d_k⟩ per sample."""
        per_token = (g[self.ids] * self.d).sum(1)
        return per_token.new_zeros(self.n).index_add_(0, self.sample, per_token)


@dataclass
class DenseUse:
    """Materialised per-sample gradients [N, *shape]."""

    g: Tensor

    def batch_sum(self) -> Tensor:
        return self.g.sum(0)

    def inner(self, g: Tensor) -> Tensor:
        return (self.g.flatten(1) * g.reshape(1, -1)).sum(1)


@dataclass
class BatchUse:
    """Only a use's batch sum: kept on the first step to check that every use was seen."""

    total: Tensor

    def batch_sum(self) -> Tensor:
        return self.total


Use = LinearUse | EmbeddingUse | DenseUse | BatchUse


def combined_sq(uses: list[Use]) -> Tensor:
    """‖Σ_u g_{u,i}‖² per sample, cross terms included (`BatchUse`s are not allowed)."""
    if any(isinstance(u, BatchUse) for u in uses):
        msg = "a use kept only for its batch sum has no per-sample norms"
        raise RuntimeError(msg)
    linear = [u for u in uses if isinstance(u, LinearUse)]
    embedding = [u for u in uses if isinstance(u, EmbeddingUse)]
    dense = [u for u in uses if isinstance(u, DenseUse)]
    lin = None
    if linear:
        lin = LinearUse(torch.cat([u.a for u in linear], 1), torch.cat([u.d for u in linear], 1))
    emb = _cat_embeddings(embedding) if embedding else None
    den = DenseUse(torch.stack([u.g for u in dense]).sum(0)) if dense else None
    parts = []
    if lin is not None:
        parts.append(token_outer_sq(lin.a, lin.d))
    if emb is not None:
        parts.append(_embedding_sq(emb))
    if den is not None:
        parts.append(den.g.flatten(1).square().sum(1))
    if lin is not None and emb is not None:
        parts.append(2 * _linear_embedding(lin, emb))
    if lin is not None and den is not None:
        parts.append(2 * torch.einsum("nto,noi,nti->n", lin.d, den.g, lin.a))
    if emb is not None and den is not None:
        parts.append(2 * _embedding_dense(emb, den))
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def _cat_embeddings(uses: list[EmbeddingUse]) -> EmbeddingUse:
    return EmbeddingUse(
        torch.cat([u.sample for u in uses]),
        torch.cat([u.ids for u in uses]),
        torch.cat([u.d for u in uses]),
        uses[0].n,
        uses[0].rows,
    )


def _embedding_sq(use: EmbeddingUse) -> Tensor:
    """Σ_v ‖Σ_{k: x_k = v} d_k‖² per sample (see embedding.py)."""
    key = use.sample * use.rows + use.ids
    unique, inverse = torch.unique(key, return_inverse=True)
    rows = use.d.new_zeros(unique.shape[0], use.d.shape[1]).index_add_(0, inverse, use.d)
    owner = torch.div(unique, use.rows, rounding_mode="floor")
    return use.d.new_zeros(use.n).index_add_(0, owner, rows.square().sum(1))


def _linear_embedding(lin: LinearUse, emb: EmbeddingUse) -> Tensor:
    """⟨Σ_t d_t a_tᵀ, Σ_k e_{x_k} δ_kᵀ⟩ = Σ_k Σ_t d_t[x_k] (a_t·δ_k), per sample."""
    d_rows = lin.d[emb.sample, :, emb.ids]  # [K, T]: each token's row of every d_t
    a_dot = torch.einsum("ktd,kd->kt", lin.a[emb.sample], emb.d)
    per_token = (d_rows * a_dot).sum(1)
    return per_token.new_zeros(emb.n).index_add_(0, emb.sample, per_token)


def _embedding_dense(emb: EmbeddingUse, den: DenseUse) -> Tensor:
    """⟨G_i, Σ_k e_{x_k} δ_kᵀ⟩ = Σ_k ⟨G_i[x_k], δ_k⟩, per sample."""
    per_token = (den.g[emb.sample, emb.ids] * emb.d).sum(1)
    return per_token.new_zeros(emb.n).index_add_(0, emb.sample, per_token)


class UseBook:
    """The uses of every multi-use parameter in one step, keyed by the parameter.

    ``collectors`` are called (once each) before anything is read: observers whose uses
    are only known at the end of backward (the torch.func fallback) add them then.
    """

    def __init__(self) -> None:
        self.names: dict[int, str] = {}  # id(parameter) -> its name in the model
        self._uses: dict[int, list[Use]] = {}
        self._collectors: list[Callable[[], None]] = []
        self._collected = False
        self.recording = False  # some observer recorded a forward in this step

    def add_collector(self, collect: Callable[[], None]) -> None:
        self._collectors.append(collect)

    def add(self, param: nn.Parameter, use: Use) -> None:
        self._uses.setdefault(id(param), []).append(use)

    def has_uses(self, param: nn.Parameter) -> bool:
        return bool(self._uses.get(id(param)))

    def clear(self) -> None:
        self._uses = {}
        self._collected = False
        self.recording = False

    def _collect(self) -> None:
        if not self._collected:
            self._collected = True
            for collect in self._collectors:
                collect()

    def sq(self, param: nn.Parameter) -> Tensor | None:
        """‖Σ_uses g_i‖² per sample, or None when the parameter had no use this step."""
        self._collect()
        uses = self._uses.get(id(param))
        return combined_sq(uses) if uses else None

    def inner(self, param: nn.Parameter, g: Tensor) -> Tensor | None:
        """⟨Σ_uses g_i, G⟩ per sample (the alignment), or None without a use this step."""
        self._collect()
        uses = self._uses.get(id(param))
        if not uses:
            return None
        g = g.to_dense() if g.is_sparse else g
        total = uses[0].inner(g)
        for use in uses[1:]:
            total = total + use.inner(g)
        return total

    def batch_sum(self, param: nn.Parameter) -> Tensor | None:
        """Σ_i Σ_uses g_i: what the batch gradient is when every use was seen."""
        self._collect()
        uses = self._uses.get(id(param))
        if not uses:
            return None
        total = uses[0].batch_sum()
        for use in uses[1:]:
            total = total + use.batch_sum()
        return total


def hidden_use_message(
    name: str, observed: Tensor | None, actual: Tensor, layer_norm: float = 0.0
) -> str | None:
    """A one-line refusal when the observed uses do not add up to the batch gradient.

    ``layer_norm`` (‖G‖ over the layer's parameters) sets a floor of float rounding: a
    gradient that is zero in exact arithmetic (a key bias under softmax) is rounding noise
    of summands of the layer's size, and any relative comparison of it is meaningless.
    """
    actual = actual.to_dense() if actual.is_sparse else actual
    reference = float(actual.double().norm())
    floor = 1e3 * torch.finfo(actual.dtype).eps * layer_norm if actual.is_floating_point() else 0
    if observed is None:
        difference = reference
    else:
        difference = float((observed.double() - actual.double()).norm())
    # Non-finite gradients are counted and warned about elsewhere; they prove nothing here.
    if not math.isfinite(difference) or difference <= HIDDEN_USE_RTOL * reference + floor + 1e-30:
        return None
    return (
        f"parameter {name!r} is used where no module hook sees it (e.g. F.linear(h, "
        f"module.weight) outside its module, or a random module the fallback replays): "
        f"its observed uses miss {difference / max(reference, 1e-30):.1%} of its batch "
        "gradient; call the module that owns it instead, or exclude the layer"
    )
