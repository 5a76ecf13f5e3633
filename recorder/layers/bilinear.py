"""nn.Bilinear: y_t = x1_tᵀ W x2_t + b, W of shape [O, I1, I2], tokens in any leading dims.

Sample i's weight gradient is Σ_t δ_t ⊗ x1_t ⊗ x2_t. Its squared norm, like a Linear's, is
either that tensor materialised (N·T·O·I1·I2 work) or the Gram identity
Σ_{t,u} (δ_t·δ_u)(x1_t·x1_u)(x2_t·x2_u) (N·T²·(O+I1+I2) work); we take the cheaper. The bias
gets ‖Σ_t δ_t‖².
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samplescope.recorder.layers.base import Observer, Session, norm_region
from samplescope.recorder.layers.linear import working_precision

__all__ = ["BilinearObserver", "bilinear_norms"]


def bilinear_norms(
    module: nn.Module, x1: Tensor, x2: Tensor, grad_output: Tensor
) -> dict[str, Tensor]:
    """Squared per-sample norms of an nn.Bilinear's weight and bias gradients.

    Args:
        module: the nn.Bilinear.
        x1: first input [N, ..., I1].
        x2: second input [N, ..., I2].
        grad_output: gradient w.r.t. the output [N, ..., O].

    Returns:
        ``{"weight": [N], "bias": [N]}`` for the trainable ones.
    """
    x1, x2, grad_output = working_precision(x1, x2, grad_output)
    n = grad_output.shape[0]
    a = x1.reshape(n, -1, x1.shape[-1])
    b = x2.reshape(n, -1, x2.shape[-1])
    d = grad_output.reshape(n, -1, grad_output.shape[-1])
    t, i1, i2, o = a.shape[1], a.shape[2], b.shape[2], d.shape[2]
    norms = {}
    if module.weight.requires_grad:
        if t == 1:
            norms["weight"] = _sq(a[:, 0]) * _sq(b[:, 0]) * _sq(d[:, 0])
        elif t * (o + i1 + i2) < o * i1 * i2:
            gram = (d @ d.transpose(1, 2)) * (a @ a.transpose(1, 2)) * (b @ b.transpose(1, 2))
            norms["weight"] = gram.sum((1, 2))
        else:
            norms["weight"] = torch.einsum("nto,nti,ntj->noij", d, a, b).square().sum((1, 2, 3))
    if module.bias is not None and module.bias.requires_grad:
        norms["bias"] = _sq(d.sum(1))
    return norms


def _sq(x: Tensor) -> Tensor:
    return torch.linalg.vecdot(x, x)


class BilinearObserver(Observer):
    """Keeps both inputs of an nn.Bilinear and computes `bilinear_norms` in backward."""

    def __init__(self, name: str, module: nn.Module, session: Session) -> None:
        super().__init__(name, module, session)
        self._saved: tuple[Tensor, Tensor, Tensor] | None = None

    def _attach(self) -> None:
        self._handles.append(self.module.register_forward_hook(self._on_forward))

    def _clear(self) -> None:
        self._saved = None

    def _on_forward(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if not self._recording() or not isinstance(output, Tensor):
            return
        if not output.requires_grad or not self._count_call():
            return
        # Emptied by the hook, so autograd frees the inputs once this layer's backward ran.
        held = [(args[0].detach(), args[1].detach())]
        output.register_hook(lambda grad: self._on_grad(*held.pop(), grad) if held else None)

    def _on_grad(self, x1: Tensor, x2: Tensor, grad: Tensor) -> None:
        try:
            with norm_region(grad.device.type):
                self._store_norms(bilinear_norms(self.module, x1, x2, grad))
            if self.session.alignment:
                self._saved = (x1, x2, grad.detach())
        except Exception as error:  # noqa: BLE001 - handed to the recorder after backward
            self._store_error(error)

    def alignment(self, batch_grad: dict[str, Tensor]) -> Tensor:
        """Σ_t ⟨δ_t, x1_tᵀ G_W x2_t + G_b⟩ per sample."""
        if self._saved is None:
            msg = f"layer {self.name!r}: no saved forward for alignment"
            raise RuntimeError(msg)
        x1, x2, d = self._saved
        weight = batch_grad.get("weight", torch.zeros_like(self.module.weight))
        moved = F.bilinear(x1, x2, weight.to(x1.dtype), batch_grad.get("bias"))
        return (moved * d).reshape(d.shape[0], -1).sum(1)
