"""nn.MultiheadAttention, observed by re-expressing its forward.

Its in-projection is a raw parameter used through F.linear deep inside
F.multi_head_attention_forward, and ``out_proj`` is never called as a module, so no module
hook sees their inputs. While attached, the observer puts an equivalent forward on the
instance built from observable pieces — q/k/v projections and the output projection as
F.linear calls whose outputs carry tensor hooks — and every projection is then a Linear
whose per-sample norm is the ghost norm (`token_outer_sq`) of its input and output gradient.
The packed ``in_proj_weight`` is three Linears stacked, so its norm is the sum of theirs.

The attention core is the same computation as PyTorch's (scaled dot-product attention
without weights, an explicit softmax with them), so outputs and gradients agree with the
original module within float rounding. With dropout active the masks come from a different
RNG draw, so they agree only in distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samplescope.recorder.layers.base import ReexpressedObserver, Session
from samplescope.recorder.layers.linear import token_outer_sq

__all__ = ["AttentionObserver", "attention_declines"]


@dataclass(frozen=True)
class _Projection:
    """One Linear inside the attention: which parameters, and which third of a packed one."""

    weight: str
    bias: str | None
    weight_block: int | None  # third of a packed in_proj_weight; None when the weight is whole
    bias_block: int | None  # third of in_proj_bias; None for out_proj.bias


def attention_declines(module: nn.Module) -> str | None:
    """Why `AttentionObserver` cannot observe ``module`` (then the fallback applies), or None."""
    if module.bias_k is not None or module.bias_v is not None:
        return "add_bias_kv=True appends learned key/value rows the re-expression does not model"
    if module.add_zero_attn:
        return "add_zero_attn=True is not modelled by the re-expression"
    return None


class AttentionObserver(ReexpressedObserver):
    """Observes an nn.MultiheadAttention (and its ``out_proj``) via a re-expressed forward."""

    def __init__(self, name: str, module: nn.Module, session: Session) -> None:
        super().__init__(name, module, session)
        # The rule claims the children: out_proj's parameters are this layer's too.
        self.params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        self._norms: dict[str, Tensor] = {}
        self._saved: list[tuple[_Projection, Tensor, Tensor]] = []

    # -- Observer hooks -------------------------------------------------------------------

    def _clear(self) -> None:
        self._norms = {}
        self._saved = []

    def alignment(self, batch_grad: dict[str, Tensor]) -> Tensor:
        """Σ over projections of ⟨Σ_t δ_t a_tᵀ, G_W⟩ + ⟨Σ_t δ_t, G_b⟩ = Σ_t ⟨δ_t, G_W a_t + G_b⟩."""
        if not self._saved:
            msg = f"layer {self.name!r}: no saved forward for alignment"
            raise RuntimeError(msg)
        total = None
        for proj, a, d in self._saved:
            weight = _third(batch_grad.get(proj.weight), proj.weight_block)
            bias = _third(batch_grad.get(proj.bias) if proj.bias else None, proj.bias_block)
            moved = torch.zeros_like(d) if weight is None else F.linear(a, weight)
            if bias is not None:
                moved = moved + bias
            value = (moved * d).sum((1, 2))
            total = value if total is None else total + value
        return total

    # -- the re-expressed forward ---------------------------------------------------------

    def _forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        kwargs = {
            "key_padding_mask": key_padding_mask,
            "need_weights": need_weights,
            "attn_mask": attn_mask,
            "average_attn_weights": average_attn_weights,
            "is_causal": is_causal,
        }
        # Only differentiable forwards of the recorded step are re-expressed; everything
        # else (evaluation, no grad) takes PyTorch's own path, fast path included.
        if not self._recording() or not torch.is_grad_enabled():
            return self._original(query, key, value, **kwargs)
        if query.dim() != 3:
            msg = (
                f"layer {self.name!r}: unbatched attention input (query of shape "
                f"{tuple(query.shape)}) has no per-sample norms; add a batch dimension"
            )
            self._store_error(ValueError(msg))
            return self._original(query, key, value, **kwargs)
        if not self._count_call():
            return self._original(query, key, value, **kwargs)
        return self._reexpressed(query, key, value, **kwargs)

    def _reexpressed(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        *,
        key_padding_mask: Tensor | None,
        need_weights: bool,
        attn_mask: Tensor | None,
        average_attn_weights: bool,
        is_causal: bool,
    ) -> tuple[Tensor, Tensor | None]:
        m = self.module
        if not m.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, tgt_len, embed = query.shape
        src_len = key.shape[1]
        heads = m.num_heads
        head_dim = embed // heads
        mask, sdpa_causal = _merged_mask(
            key_padding_mask, attn_mask, is_causal, need_weights, query.dtype, (n, heads)
        )
        q, k, v = (
            self._project(proj, x, *self._in_weights(i))
            for i, (proj, x) in enumerate(
                zip(self._in_projections(), (query, key, value), strict=True)
            )
        )
        q = q.reshape(n, tgt_len, heads, head_dim).transpose(1, 2)
        k = k.reshape(n, src_len, heads, head_dim).transpose(1, 2)
        v = v.reshape(n, src_len, heads, head_dim).transpose(1, 2)
        dropout = m.dropout if m.training else 0.0
        weights = None
        if need_weights:
            # As F.multi_head_attention_forward: scale q, add the mask, softmax, dropout.
            scores = (q * math.sqrt(1.0 / head_dim)) @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores + mask
            weights = F.softmax(scores, dim=-1)
            if dropout > 0.0:
                weights = F.dropout(weights, p=dropout)
            context = weights @ v
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=sdpa_causal
            )
        context = context.transpose(1, 2).reshape(n, tgt_len, embed)
        out_proj = _Projection("out_proj.weight", "out_proj.bias", None, None)
        out = self._project(out_proj, context, m.out_proj.weight, m.out_proj.bias)
        if not m.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _in_projections(self) -> list[_Projection]:
        bias = "in_proj_bias" if self.module.in_proj_bias is not None else None
        if self.module._qkv_same_embed_dim:
            return [_Projection("in_proj_weight", bias, i, i) for i in range(3)]
        return [_Projection(f"{c}_proj_weight", bias, None, i) for i, c in enumerate("qkv")]

    def _in_weights(self, i: int) -> tuple[Tensor, Tensor | None]:
        m = self.module
        if m._qkv_same_embed_dim:
            weight = m.in_proj_weight.chunk(3)[i]
        else:
            weight = (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight)[i]
        bias = None if m.in_proj_bias is None else m.in_proj_bias.chunk(3)[i]
        return weight, bias

    def _project(self, proj: _Projection, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        out = F.linear(x, weight, bias)
        if out.requires_grad:
            activation = x.detach()
            out.register_hook(lambda grad: self._on_grad(proj, activation, grad))
        return out

    def _on_grad(self, proj: _Projection, activation: Tensor, grad: Tensor) -> None:
        try:
            with torch.no_grad():
                n = grad.shape[0]
                a = activation.reshape(n, -1, activation.shape[-1])
                d = grad.detach().reshape(n, -1, grad.shape[-1])
                if proj.weight in self.params:
                    self._add(proj.weight, token_outer_sq(a, d))
                if proj.bias is not None and proj.bias in self.params:
                    self._add(proj.bias, d.sum(1).square().sum(1))
                self._store_norms(self._norms)
            if self.session.alignment:
                self._saved.append((proj, a, d))
        except Exception as error:  # noqa: BLE001 - handed to the recorder after backward
            self._store_error(error)

    def _add(self, pname: str, value: Tensor) -> None:
        previous = self._norms.get(pname)
        self._norms[pname] = value if previous is None else previous + value


def _third(grad: Tensor | None, block: int | None) -> Tensor | None:
    """The q, k or v third of a packed gradient (rows), or the gradient itself."""
    if grad is None or block is None:
        return grad
    return grad.chunk(3)[block]


def _float_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Boolean masks become additive -inf masks, as MultiheadAttention does."""
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


def _merged_mask(
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    is_causal: bool,
    need_weights: bool,
    dtype: torch.dtype,
    batch_heads: tuple[int, int],
) -> tuple[Tensor | None, bool]:
    """One additive mask broadcastable to [N, H, L, S], and whether SDPA may use is_causal.

    Mirrors F.multi_head_attention_forward: is_causal is only a hint that attn_mask is
    causal; it is used as such only without a key padding mask and without weights.
    """
    if is_causal and attn_mask is None:
        msg = (
            "Need attn_mask if specifying the is_causal hint. You may use the Transformer "
            "module method `generate_square_subsequent_mask` to create this mask."
        )
        raise RuntimeError(msg)
    padding = _float_mask(key_padding_mask, dtype)
    if is_causal and padding is None and not need_weights:
        return None, True
    mask = _float_mask(attn_mask, dtype)
    if mask is not None:
        n, heads = batch_heads
        mask = mask.reshape(n, heads, *mask.shape[1:]) if mask.dim() == 3 else mask[None, None]
    if padding is not None:
        padding = padding[:, None, None, :]
        mask = padding if mask is None else mask + padding
    return mask, False
