"""The batch gradient under data parallelism: what /steps/grad_sq and alignment use.

Per-sample norms need nothing from other ranks: each rank's samples and the (identical
or all-gathered) parameters they ran with are local. The *batch* gradient G is not: it is
what DDP or FSDP2 reduces across ranks, and the optimizer applies. A parameter hook sees
only the rank's local contribution, which DDP sometimes happens to average in place (when
``.grad`` was None and autograd stole the tensor) and sometimes does not
(``zero_grad(set_to_none=False)``, ``no_sync``); FSDP2 hooks see nothing at all (its
sharded parameters get their gradient from a reduce-scatter, not from autograd). So G is
read here, after backward, for each way the model is trained:

- one process: the hooks' gradients, as before;
- DDP: ``param.grad`` where DDP wrote it from nothing this step (no extra communication),
  otherwise one all-reduce (average) of the hooks' local gradients: the same mean over
  ranks that DDP applies, also for a backward under ``no_sync`` (whose batch gradient is
  the micro-batch's, averaged over ranks);
- FSDP2: each sharded ``param.grad`` (less what it held before backward); its squared norm
  is the sum over ranks of the shards' squared norms (one small all-reduce), and alignment
  all-gathers the full gradient (`full_value`).

Tensor parallelism (parameters sharded other than by FSDP2) is refused at ``with``.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from samplescope.recorder._columns import param_norms
from samplescope.recorder.errors import RecorderError

if TYPE_CHECKING:
    from samplescope.recorder.layers.base import Observer, StepResult

__all__ = [
    "BatchGradient",
    "ParallelismError",
    "batch_gradient",
    "full_value",
    "functional_call",
]


class ParallelismError(RecorderError):
    """A way of distributing the model that the recorder cannot measure exactly."""


def _dtensor_type() -> type | None:
    # Only a process that imported torch.distributed.tensor can hold a DTensor; importing
    # it here would cost every single-process user the import.
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def is_dtensor(value: object) -> bool:
    kind = _dtensor_type()
    return kind is not None and isinstance(value, kind)


def full_value(tensor: Tensor) -> Tensor:
    """The whole tensor, detached: a DTensor is all-gathered (a collective: every rank of
    its mesh must call this in the same order, as FSDP2's own all-gathers require)."""
    if is_dtensor(tensor):
        with torch.no_grad():
            return tensor.detach().full_tensor()
    return tensor.detach()


def _is_fsdp_module(module: nn.Module) -> bool:
    fsdp = sys.modules.get("torch.distributed.fsdp")
    kind: Any = getattr(fsdp, "FSDPModule", None)
    return kind is not None and isinstance(module, kind)


def functional_call(
    module: nn.Module, state: dict[str, Tensor], args: Any, kwargs: dict[str, Any] | None = None
) -> Any:
    """`torch.func.functional_call`, except that an FSDP2 module's own hooks do not run.

    Its pre-forward hook would all-gather and put its unsharded parameters in place of the
    ones given, so a replay would not depend on them (alignment came out 0).
    """
    if not _is_fsdp_module(module):
        return torch.func.functional_call(module, state, args, kwargs)
    from torch.nn.utils.stateless import _reparametrize_module

    args = args if isinstance(args, tuple) else (args,)
    with _reparametrize_module(module, state):
        return type(module).forward(module, *args, **(kwargs or {}))


class BatchGradient:
    """One process: the batch gradient is what the parameter hooks saw."""

    def __init__(self, observers: list[Observer]) -> None:
        self.observers = observers

    def before_backward(self) -> None:
        """Called right before the step's ``loss.backward()``."""

    def gradients(self, results: list[StepResult]) -> list[dict[str, Tensor]]:
        """G per parameter, per layer, in the observers' order."""
        return [r.batch_grad for r in results]

    def norms(self, grads: list[list[Tensor]]) -> Tensor:
        """‖G_p‖ of every parameter (not squared), as `param_norms`."""
        return param_norms(grads)

    def for_alignment(self, grads: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        """G in the form observers take for alignment (whole tensors)."""
        return grads

    def _params(self, observer: Observer) -> dict[str, nn.Parameter]:
        return observer.params


class _DataParallelGradient(BatchGradient):
    """DDP: the average over ranks of the local gradients, as DDP applies it."""

    def __init__(self, observers: list[Observer], ddp: nn.Module) -> None:
        super().__init__(observers)
        self.ddp = ddp
        self._fresh: set[int] = set()
        self._sync = True

    def before_backward(self) -> None:
        # DDP writes the reduced gradient into .grad; that is this step's G only where
        # .grad held nothing before (else it holds old + new, reduced or not).
        self._sync = bool(getattr(self.ddp, "require_backward_grad_sync", True))
        self._fresh = {id(p) for o in self.observers for p in o.params.values() if p.grad is None}

    def gradients(self, results: list[StepResult]) -> list[dict[str, Tensor]]:
        import torch.distributed as dist

        out: list[dict[str, Tensor]] = [{} for _ in results]
        pending: list[tuple[int, str, Tensor]] = []
        # Every parameter of every layer, in one order on all ranks, so the collective
        # matches even where a layer got no gradient on some rank.
        for i, (observer, result) in enumerate(zip(self.observers, results, strict=True)):
            for name, param in observer.params.items():
                reduced = self._sync and id(param) in self._fresh and param.grad is not None
                if reduced:
                    out[i][name] = param.grad.detach()
                    continue
                local = result.batch_grad.get(name)
                local = torch.zeros_like(param) if local is None else local
                pending.append((i, name, local.to_dense() if local.is_sparse else local))
        by_dtype: dict[tuple[torch.dtype, torch.device], list[tuple[int, str, Tensor]]] = {}
        for item in pending:
            by_dtype.setdefault((item[2].dtype, item[2].device), []).append(item)
        world = dist.get_world_size()
        for items in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for _, _, g in items])
            dist.all_reduce(flat)
            flat /= world
            for (i, name, g), part in zip(
                items, flat.split([g.numel() for _, _, g in items]), strict=True
            ):
                out[i][name] = part.view_as(g)
        return out


class _ShardedGradient(BatchGradient):
    """FSDP2: each rank holds a shard of G in its sharded parameters' ``.grad``."""

    def __init__(self, observers: list[Observer]) -> None:
        super().__init__(observers)
        self._before: dict[int, Tensor] = {}

    def before_backward(self) -> None:
        # With zero_grad(set_to_none=False) or accumulation .grad already holds something:
        # this step's G is what backward adds to it.
        self._before = {
            id(p): p.grad.detach().clone()
            for o in self.observers
            for p in o.params.values()
            if p.grad is not None
        }

    def gradients(self, results: list[StepResult]) -> list[dict[str, Tensor]]:
        out: list[dict[str, Tensor]] = []
        for observer in self.observers:
            grads = {}
            for name, param in observer.params.items():
                grad = param.grad
                if grad is None:
                    grad = torch.zeros_like(param)
                before = self._before.get(id(param))
                grads[name] = grad.detach() if before is None else grad.detach() - before
            out.append(grads)
        self._before = {}
        return out

    def norms(self, grads: list[list[Tensor]]) -> Tensor:
        import torch.distributed as dist

        local = [g.to_local() if is_dtensor(g) else g for layer in grads for g in layer]
        if not local:
            return torch.zeros(0)
        squares = torch.stack([g.double().square().sum() for g in local])
        # Shards of one parameter are disjoint: squared norms add across ranks.
        dist.all_reduce(squares)
        return squares.sqrt()

    def for_alignment(self, grads: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        return [{n: full_value(g) for n, g in layer.items()} for layer in grads]


def batch_gradient(
    model: nn.Module,
    observers: list[Observer],
    rank: int = 0,
    world_size: int = 1,
    *,
    accumulation_steps: int = 1,
    reference: bool = False,
) -> BatchGradient:
    """How this model's batch gradient is read; refuses what cannot be measured exactly.

    Raises:
        ParallelismError: parameters sharded by anything but FSDP2's ``fully_shard`` on a
            one-dimensional mesh (tensor parallelism, HSDP); under a torch.distributed
            group of several processes, ``rank``/``world_size`` that are not the group's,
            or a model that is neither the DDP wrapper nor FSDP2-sharded (its gradient
            reduction would be invisible, and G silently the rank's own).
    """
    from torch.nn.parallel import DistributedDataParallel

    sharded = _check_sharding(model)
    group = _group()
    if group is not None and group != (rank, world_size):
        msg = (
            f"Recorder(rank={rank}, world_size={world_size}) but this process is rank "
            f"{group[0]} of {group[1]}: pass rank=dist.get_rank(), "
            "world_size=dist.get_world_size() (and one path per rank)"
        )
        raise ParallelismError(msg)
    if reference and (group is not None or sharded or isinstance(model, DistributedDataParallel)):
        # The reference forward would run DDP's or FSDP2's own forward logic outside training.
        msg = "reference= (validation attribution) is not supported under DDP or FSDP2 yet"
        raise ParallelismError(msg)
    if isinstance(model, DistributedDataParallel):
        return _DataParallelGradient(observers, model)
    if sharded:
        if accumulation_steps > 1:
            msg = "accumulation_steps > 1 under FSDP2 (fully_shard) is not supported yet"
            raise ParallelismError(msg)
        return _ShardedGradient(observers)
    if group is not None:
        msg = (
            f"{type(model).__name__} runs in a torch.distributed group of {group[1]} processes "
            "but is neither DistributedDataParallel nor sharded by fully_shard: pass the DDP "
            "wrapper itself as model (the batch gradient is read from its reduction)"
        )
        raise ParallelismError(msg)
    return BatchGradient(observers)


def _group() -> tuple[int, int] | None:
    """(rank, world size) of the default process group when it has several processes."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    world = dist.get_world_size()
    return (dist.get_rank(), world) if world > 1 else None


def _check_sharding(model: nn.Module) -> bool:
    """True for a model whose DTensor parameters are all FSDP2's one-dimensional shards."""
    if _dtensor_type() is None:
        return False
    managed = _fsdp_managed(model)
    sharded = False
    for name, param in model.named_parameters():
        if not is_dtensor(param):
            continue
        placements = tuple(param.placements)
        plain_fsdp = (
            id(param) in managed
            and param.device_mesh.ndim == 1
            and len(placements) == 1
            and placements[0].is_shard(0)
        )
        if not plain_fsdp:
            msg = (
                f"parameter {name!r} is a DTensor placed {placements} that FSDP2's fully_shard "
                "does not manage alone (tensor parallelism, or a 2-D mesh); samplescope "
                "records data parallelism only (DDP, FSDP2): see docs/recorder.md, Limits"
            )
            raise ParallelismError(msg)
        sharded = True
    return sharded


def _fsdp_managed(model: nn.Module) -> set[int]:
    """ids of the parameters that FSDP2's fully_shard groups manage."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    kind: Any = getattr(fsdp, "FSDPModule", None)
    if kind is None:
        return set()
    managed: set[int] = set()
    for module in model.modules():
        if not isinstance(module, kind):
            continue
        state = module._get_fsdp_state()
        for group in _param_groups(state):
            managed.update(id(p.sharded_param) for p in group.fsdp_params)
    return managed


def _param_groups(state: Any) -> list[Any]:
    group = getattr(state, "_fsdp_param_group", None)
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is not None:
        return list(groups)
    return [] if group is None else [group]
