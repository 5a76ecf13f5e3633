"""nn.LSTM, nn.GRU and nn.RNN, observed by re-expressing their forward.

A recurrent layer runs one fused kernel, so no hook sees the per-time-step pieces. Every one of
its parameters, though, is a Linear applied at every time step: the input projection
``W_ih x_t + b_ih`` (one Linear over the whole sequence), the hidden projection
``W_hh h_{t-1} + b_hh`` and, for an LSTM with ``proj_size``, ``W_hr (o_t ⊙ tanh c_t)``. Sample
i's gradient of such a weight is Σ_t δ_t a_tᵀ, whose squared norm is the ghost norm
(`token_outer_sq`) of the stacked inputs a_t and output gradients δ_t; a bias gets ‖Σ_t δ_t‖².

While attached, the observer puts an equivalent forward on the instance (restored on exit) that
computes those projections with F.linear; the cell arithmetic between
them is PyTorch's (gate order i, f, g, o for the LSTM and r, z, n for the GRU). Outputs and
gradients therefore equal the fused kernel's within float rounding, not bit for bit; with
``dropout`` between layers the masks come from a different RNG draw, so a run matches only in
distribution.

One tensor hook per layer and direction, on the input projection's output, sees every δ_t at
once: the gates add the two projections, so the hidden projection's output gradient is the
same tensor (for the GRU's n-gate, r_t ⊙ it). Only ``proj_size``'s projection needs a hook per
time step.

Padded (or equal-length) batches of either layout are covered, with any ``num_layers``,
``bidirectional``, ``bias`` and ``proj_size``. A ``PackedSequence`` is unpacked, run with a
per-sample length mask (a finished sample's state is carried unchanged, as the packed kernel
does), and packed again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from samplescope.recorder.layers.base import ReexpressedObserver, Session, norm_region
from samplescope.recorder.layers.linear import token_outer_sq, working_precision

__all__ = ["RNNObserver"]


@dataclass
class _Steps:
    """A Linear applied once per time step: its inputs, and the output gradients that arrived."""

    weight: str
    bias: str | None
    inputs: list[Tensor] = field(default_factory=list)
    grads: dict[int, Tensor] = field(default_factory=dict)
    done: bool = False


class RNNObserver(ReexpressedObserver):
    """Observes an nn.LSTM, nn.GRU or nn.RNN through per-time-step projections."""

    def __init__(self, name: str, module: nn.Module, session: Session) -> None:
        super().__init__(name, module, session)
        self._norms: dict[str, Tensor] = {}
        self._steps: list[_Steps] = []
        self._saved: list[tuple[str, str | None, Tensor, Tensor]] = []

    # -- Observer hooks -------------------------------------------------------------------

    def _clear(self) -> None:
        self._norms = {}
        self._steps = []
        self._saved = []

    def _finish(self) -> None:
        # A time step whose output never reached the loss got no gradient: it adds zero.
        for steps in self._steps:
            if not steps.done and steps.grads:
                self._close(steps)

    def alignment(self, batch_grad: dict[str, Tensor]) -> Tensor:
        """Σ over projections of Σ_t ⟨δ_t, G_W a_t + G_b⟩."""
        self._finish()
        if not self._saved:
            msg = f"layer {self.name!r}: no saved forward for alignment"
            raise RuntimeError(msg)
        total = None
        for weight, bias, a, d in self._saved:
            grad_w = batch_grad.get(weight)
            moved = torch.zeros_like(d) if grad_w is None else F.linear(a, grad_w.to(a.dtype))
            if bias is not None and bias in batch_grad:
                moved = moved + batch_grad[bias].to(a.dtype)
            value = (moved * d).sum((1, 2))
            total = value if total is None else total + value
        return total

    # -- the re-expressed forward ---------------------------------------------------------

    def _forward(self, input: Tensor | PackedSequence, hx: Any = None) -> Any:
        # Only differentiable forwards of the recorded step are re-expressed; everything else
        # (evaluation, no grad) takes PyTorch's fused kernel.
        if not self._recording() or not torch.is_grad_enabled():
            return self._original(input, hx)
        packed = isinstance(input, PackedSequence)
        if not packed and input.dim() != 3:
            msg = (
                f"layer {self.name!r}: unbatched recurrent input (shape {tuple(input.shape)}) "
                "has no per-sample norms; add a batch dimension"
            )
            self._store_error(ValueError(msg))
            return self._original(input, hx)
        if not self._count_call():
            return self._original(input, hx)
        if packed:
            return self._packed(input, hx)
        x = input if self.module.batch_first else input.transpose(0, 1)
        output, hidden = self._run(x, hx, None)
        return (output if self.module.batch_first else output.transpose(0, 1)), hidden

    def _packed(self, input: PackedSequence, hx: Any) -> Any:
        # pad_packed_sequence restores the caller's order; h_n is in that order too.
        x, lengths = pad_packed_sequence(input, batch_first=True)
        output, hidden = self._run(x, hx, lengths.to(x.device))
        # Packed again in the caller's sorting, so the data has the fused kernel's layout.
        order = input.sorted_indices
        if order is not None:
            output, lengths = output[order.to(output.device)], lengths[order.cpu()]
        repacked = pack_padded_sequence(output, lengths, batch_first=True, enforce_sorted=True)
        packed = PackedSequence(
            repacked.data, input.batch_sizes, input.sorted_indices, input.unsorted_indices
        )
        return packed, hidden

    def _run(self, x: Tensor, hx: Any, lengths: Tensor | None) -> tuple[Tensor, Any]:
        """The layer on batch-first ``x`` [N, T, I]; returns ([N, T, D·P], h_n or (h_n, c_n))."""
        m = self.module
        n, t_len = x.shape[:2]
        directions = 2 if m.bidirectional else 1
        lstm = isinstance(m, nn.LSTM)
        out_size = m.proj_size if getattr(m, "proj_size", 0) else m.hidden_size
        h0, c0 = _initial_states(m, hx, n, directions, out_size, x)
        mask = None
        if lengths is not None:
            mask = torch.arange(t_len, device=x.device)[None, :] < lengths[:, None]  # [N, T]
        layer_input = x
        h_n: list[Tensor] = []
        c_n: list[Tensor] = []
        for layer in range(m.num_layers):
            outs = []
            for direction in range(directions):
                k = layer * directions + direction
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                out, h, c = self._direction(
                    layer_input, suffix, h0[k], None if c0 is None else c0[k], mask, direction == 1
                )
                outs.append(out)
                h_n.append(h)
                if c is not None:
                    c_n.append(c)
            layer_input = outs[0] if directions == 1 else torch.cat(outs, 2)
            if m.dropout and m.training and layer < m.num_layers - 1:
                layer_input = F.dropout(layer_input, m.dropout)
        hidden: Any = torch.stack(h_n)
        if lstm:
            hidden = (hidden, torch.stack(c_n))
        return layer_input, hidden

    def _direction(
        self,
        x: Tensor,
        suffix: str,
        h: Tensor,
        c: Tensor | None,
        mask: Tensor | None,
        reverse: bool,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """One layer, one direction over x [N, T, I]: (outputs [N, T, P], h_T, c_T)."""
        m = self.module
        bias = m.bias
        w_ih = m.get_parameter(f"weight_ih{suffix}")
        w_hh = m.get_parameter(f"weight_hh{suffix}")
        b_ih = m.get_parameter(f"bias_ih{suffix}") if bias else None
        b_hh = m.get_parameter(f"bias_hh{suffix}") if bias else None
        gi = F.linear(x, w_ih, b_ih)
        # LSTM and RNN gates are gi_t + W_hh h + b_hh: b_hh joins gi once for the sequence and
        # each step is one addmm. (The GRU's b_hn sits inside r ⊙ (W_hn h + b_hn).)
        fold = not isinstance(m, nn.GRU)
        if fold and b_hh is not None:
            gi = gi + b_hh
        if not gi.requires_grad and any(p.requires_grad for p in (w_hh, b_hh) if p is not None):
            # Frozen input weights over an input without gradient: a leaf whose gradient is
            # the gates' gradient all the same (see _hook_gates).
            gi.requires_grad_()
        proj_steps = None
        if getattr(m, "proj_size", 0):
            proj_steps = self._new_steps(f"weight_hr{suffix}", None)
        t_len = x.shape[1]
        order = range(t_len - 1, -1, -1) if reverse else range(t_len)
        outputs: list[Tensor] = [h] * t_len
        previous: list[Tensor] = [h] * t_len  # the hidden projection's input at each t
        resets: list[Tensor] = [h] * t_len  # GRU: r_t, which scales the n-block of δ_hh
        for step, t in enumerate(order):
            previous[t] = h.detach()
            if fold:
                h_new, c_new, r = _cell(m, torch.addmm(gi[:, t], h, w_hh.t()), None, h, c)
            else:
                h_new, c_new, r = _cell(m, gi[:, t], F.linear(h, w_hh, b_hh), h, c)
            if r is not None:
                resets[t] = r.detach()
            if proj_steps is not None:
                h_new = self._step_projection(proj_steps, step, h_new)
            if mask is not None:
                # A sample past its length keeps its state (and its output is padding).
                keep = mask[:, t, None]
                h_new = torch.where(keep, h_new, h)
                if c is not None:
                    c_new = torch.where(keep, c_new, c)
            h, c = h_new, c_new
            outputs[t] = h
        self._hook_gates(
            gi, suffix, x.detach(), previous, resets if isinstance(m, nn.GRU) else None
        )
        return torch.stack(outputs, 1), h, c

    def _hook_gates(
        self,
        gi: Tensor,
        suffix: str,
        x: Tensor,
        previous: list[Tensor],
        resets: list[Tensor] | None,
    ) -> None:
        """One hook on the input projection's output serves both projections.

        The gates add the two projections (gates_t = gi_t + gh_t), so the gradient that
        reaches gi[:, t] is the hidden projection's output gradient too — except the GRU's
        n-block, where gh_n enters as r_t ⊙ gh_n and its gradient is r_t ⊙ δ_n.
        """
        names = [f"weight_ih{suffix}", f"weight_hh{suffix}"]
        if self.module.bias:
            names += [f"bias_ih{suffix}", f"bias_hh{suffix}"]
        if not any(n in self.params for n in names):
            return
        if not gi.requires_grad:
            return
        bias = self.module.bias

        def hook(grad: Tensor) -> None:
            try:
                d = grad.detach()
                self._add_linear(names[0], names[2] if bias else None, x, d)
                a = torch.stack(previous, 1)
                if resets is not None:
                    rz, n_block = d.split([2 * (d.shape[-1] // 3), d.shape[-1] // 3], -1)
                    d = torch.cat([rz, n_block * torch.stack(resets, 1)], -1)
                self._add_linear(names[1], names[3] if bias else None, a, d)
            except Exception as error:  # noqa: BLE001 - handed to the recorder after backward
                self._store_error(error)

        gi.register_hook(hook)

    def _new_steps(self, weight: str, bias: str | None) -> _Steps:
        steps = _Steps(weight, bias)
        self._steps.append(steps)
        return steps

    def _step_projection(self, steps: _Steps, step: int, a: Tensor) -> Tensor:
        out = F.linear(a, self.module.get_parameter(steps.weight), _maybe(self.module, steps.bias))
        steps.inputs.append(a.detach())
        if out.requires_grad:
            out.register_hook(lambda grad: self._on_step_grad(steps, step, grad))
        return out

    # -- the backward side ----------------------------------------------------------------

    def _on_step_grad(self, steps: _Steps, step: int, grad: Tensor) -> None:
        try:
            steps.grads[step] = grad.detach()
            # Backward visits the steps last to first; once all have arrived the stacked
            # ghost norm is computed and the per-step tensors are released.
            if len(steps.grads) == len(steps.inputs):
                self._close(steps)
        except Exception as error:  # noqa: BLE001 - handed to the recorder after backward
            self._store_error(error)

    def _close(self, steps: _Steps) -> None:
        steps.done = True
        a = torch.stack(steps.inputs, 1)
        first = next(iter(steps.grads.values()))
        zero = torch.zeros_like(first)
        d = torch.stack([steps.grads.get(t, zero) for t in range(len(steps.inputs))], 1)
        steps.inputs = []
        steps.grads = {}
        try:
            self._add_linear(steps.weight, steps.bias, a, d)
        except Exception as error:  # noqa: BLE001 - handed to the recorder after backward
            self._store_error(error)

    def _add_linear(self, weight: str, bias: str | None, a: Tensor, d: Tensor) -> None:
        """Add Σ_t δ_t a_tᵀ's and Σ_t δ_t's squared norms for a [N, T, I], d [N, T, O]."""
        with norm_region(d.device.type):
            if weight in self.params:
                self._add(weight, token_outer_sq(a, d))
            if bias is not None and bias in self.params:
                self._add(bias, working_precision(d)[0].sum(1).square().sum(1))
            self._store_norms(self._norms)
        if self.session.alignment:
            self._saved.append((weight, bias, a, d))

    def _add(self, pname: str, value: Tensor) -> None:
        previous = self._norms.get(pname)
        self._norms[pname] = value if previous is None else previous + value


def _maybe(module: nn.Module, name: str | None) -> Tensor | None:
    return None if name is None else module.get_parameter(name)


def _initial_states(
    m: nn.Module, hx: Any, n: int, directions: int, out_size: int, x: Tensor
) -> tuple[Tensor, Tensor | None]:
    """(h0, c0) as [L·D, N, ·]; zeros where the caller gave none, as the kernel does."""
    states = m.num_layers * directions
    lstm = isinstance(m, nn.LSTM)
    if hx is None:
        h0 = x.new_zeros(states, n, out_size)
        c0 = x.new_zeros(states, n, m.hidden_size) if lstm else None
        return h0, c0
    if lstm:
        h0, c0 = hx
        return h0, c0
    return hx, None


def _cell(
    m: nn.Module, gi: Tensor, gh: Tensor | None, h: Tensor, c: Tensor | None
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """One time step, with PyTorch's gate layout: (h, c, GRU's r).

    LSTM and RNN get the summed gates as ``gi`` (``gh`` None); the GRU gets both projections.
    """
    if isinstance(m, nn.LSTM):
        i, f, g, o = gi.chunk(4, 1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c_new), c_new, None
    if isinstance(m, nn.GRU):
        ir, iz, in_ = gi.chunk(3, 1)
        hr, hz, hn = gh.chunk(3, 1)
        r = torch.sigmoid(ir + hr)
        z = torch.sigmoid(iz + hz)
        candidate = torch.tanh(in_ + r * hn)
        return (1 - z) * candidate + z * h, None, r
    pre = gi
    return (torch.tanh(pre) if m.nonlinearity == "tanh" else torch.relu(pre)), None, None
