"""Which observer watches which module: an explicit table, looked up through the MRO."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.weight_norm import WeightNorm

from samplescope.errors import SamplescopeError
from samplescope.recorder.layers.base import HookObserver, NormFn, Observer, Session
from samplescope.recorder.layers.shared import UseBook

__all__ = [
    "LayerRegistry",
    "OnUnsupported",
    "Rule",
    "UnsupportedLayerError",
    "derived_weights",
    "known_batch_dims",
    "share_parameters",
]

logger = logging.getLogger(__name__)

OnUnsupported = Literal["error", "warn", "fallback"]
ObserverFactory = Callable[..., Observer]  # (name, module, session) -> Observer


class UnsupportedLayerError(SamplescopeError):
    """The model has parameterised layers that no rule covers and fallback is off."""


@dataclass(frozen=True)
class Rule:
    """How to observe one layer family.

    Attributes:
        factory: builds the observer for one module, called as
            ``factory(name, module, session)`` and returning an `Observer` (see
            ``recorder/layers/base.py``; ``HookObserver(name, module, session, norm_fn)`` is
            what a plain norm function gets).
        claims_children: the observer also covers the module's children's parameters
            (``nn.MultiheadAttention`` uses ``out_proj.weight`` without calling it).
        declines: given a module of the family, the reason this rule cannot observe that
            configuration (e.g. ``Embedding(sparse=True)``), or None when it can. A declined
            module is treated as unsupported: fallback, warning or error, as asked.
    """

    factory: ObserverFactory
    claims_children: bool = False
    declines: Callable[[nn.Module], str | None] | None = None


class LayerRegistry:
    """A table from module class to `Rule`. Build one explicitly; nothing registers on import.

    A class may also be registered by its import path (``"package.module.ClassName"``): the
    rule then applies to any module whose class, or a base of it, has that ``__module__`` and
    ``__qualname__``. Nothing is imported to resolve the name, so a registry can cover a
    library's layers (Hugging Face's ``transformers.pytorch_utils.Conv1D``) without
    depending on it. A rule registered by class wins over one registered by name at the same
    place in the MRO.

    Args:
        fallback: builds the observer for modules no rule covers (or whose rule declines),
            called as ``fallback(name, module, session)``, plus ``claims_children=True``
            when a declined rule claimed the module's children.
    """

    def __init__(self, fallback: ObserverFactory | None = None) -> None:
        self._rules: dict[type[nn.Module], Rule] = {}
        self._named: dict[str, Rule] = {}
        self._fallback = fallback

    def register(
        self,
        cls: type[nn.Module] | str,
        rule: Rule | NormFn,
        *,
        claims_children: bool = False,
    ) -> None:
        """Map ``cls`` (and its subclasses) to a rule, or to a closed-form norm function.

        Args:
            cls: the module class, or its import path ``"package.module.ClassName"``.
            rule: a `Rule`, or a `NormFn` ``(module, activation, grad_output) ->
                {param_name: Tensor[N]}`` of squared per-sample norms, where activation is
                the module's first positional input and grad_output the gradient w.r.t.
                its (single tensor) output, both with the batch in dim 0.
            claims_children: with a NormFn, it also covers the children's parameters.

        Raises:
            TypeError: ``cls`` is neither an nn.Module subclass nor a dotted path, or
                ``rule`` is not callable.
        """
        if not isinstance(rule, Rule):
            if not callable(rule):
                msg = f"rule must be a Rule or a norm function, not {type(rule).__name__}"
                raise TypeError(msg)
            rule = Rule(_hook_factory(rule), claims_children=claims_children)
        if isinstance(cls, str):
            if "." not in cls:
                msg = f"register by name needs an import path 'package.module.Class', not {cls!r}"
                raise TypeError(msg)
            self._named[cls] = rule
        elif isinstance(cls, type) and issubclass(cls, nn.Module):
            self._rules[cls] = rule
        else:
            msg = f"register needs an nn.Module subclass or an import path, not {cls!r}"
            raise TypeError(msg)

    def lookup(self, module: nn.Module) -> Rule | None:
        """The rule for the nearest class in ``type(module).__mro__``, or None."""
        for cls in type(module).__mro__:
            if cls in self._rules:
                return self._rules[cls]
            if self._named:
                rule = self._named.get(f"{cls.__module__}.{cls.__qualname__}")
                if rule is not None:
                    return rule
        return None

    def observers(
        self,
        model: nn.Module,
        session: Session,
        on_unsupported: OnUnsupported = "fallback",
        batch_dims: Mapping[str, int] | None = None,
    ) -> list[Observer]:
        """One observer per layer of ``model`` that owns trainable parameters.

        Args:
            model: the model.
            session: the recorder the observers report to.
            on_unsupported: what to do with modules no rule covers.
            batch_dims: where the batch runs in a module's tensors, by module name, for
                layouts samplescope cannot know (see `known_batch_dims`).

        Raises:
            UnsupportedLayerError: with ``on_unsupported="error"``, naming every module that
                no rule covers, all at once; or naming a shared parameter that a layer's
                observer cannot account for.
        """
        if on_unsupported not in ("error", "warn", "fallback"):
            msg = f"on_unsupported must be 'error', 'warn' or 'fallback', not {on_unsupported!r}"
            raise ValueError(msg)
        layout = {**known_batch_dims(model), **dict(batch_dims or {})}
        observers: list[Observer] = []
        unsupported: list[str] = []
        claimed: list[str] = []
        for name, module in model.named_modules():
            if any(name.startswith(prefix + ".") or not prefix for prefix in claimed):
                continue
            rule = self.lookup(module)
            claims = rule is not None and rule.claims_children
            reason = rule.declines(module) if rule is not None and rule.declines else None
            derived = derived_weights(module)
            if derived is not None:
                # The closed forms read the weight the module computes with; the trainable
                # leaves are its originals, which the fallback differentiates exactly.
                reason, claims = derived, True
            if reason is not None:
                logger.debug("%s (%s): rule declines: %s", name, type(module).__name__, reason)
                rule = None
            if claims:
                claimed.append(name)
            elif not any(p.requires_grad for p in module.parameters(recurse=False)):
                continue
            if rule is not None:
                observers.append(rule.factory(name, module, session))
            elif on_unsupported == "fallback" and self._fallback is not None:
                extra = {"claims_children": True} if claims else {}
                observers.append(self._fallback(name, module, session, **extra))
            else:
                why = f": {reason}" if reason else ""
                unsupported.append(f"{name or '<root>'} ({type(module).__name__}{why})")
        if unsupported:
            what = ", ".join(unsupported)
            if on_unsupported != "warn":
                msg = (
                    f"no per-sample norm rule for: {what}; pass on_unsupported='fallback' "
                    "with a registry that has a fallback (default_registry() does), or "
                    "'warn' to leave them out"
                )
                raise UnsupportedLayerError(msg)
            warnings.warn(f"samplescope leaves out unsupported layers: {what}", stacklevel=3)
        observers = [o for o in observers if o.params or _claims(o)]
        for observer in observers:
            observer.batch_dim = layout.get(observer.name, 0)
        return share_parameters(model, observers)


def known_batch_dims(model: nn.Module) -> dict[str, int]:
    """Where the batch runs, by module name, where the model's own flags say so.

    Inside an ``nn.Transformer``, ``nn.TransformerEncoder``/``Decoder`` or one of their
    layers built with ``batch_first=False`` (PyTorch's default) every tensor is
    [T, N, ...]: each descendant's batch dimension is 1. (``nn.MultiheadAttention`` and
    the RNNs read their own ``batch_first``.) Everywhere else the batch is dimension 0.
    """
    layout: dict[str, int] = {}
    for name, module in model.named_modules():
        first = _batch_first(module)
        if first is None or first:
            continue
        prefix = f"{name}." if name else ""
        layout[name] = 1
        for child, _ in module.named_modules(prefix=name):
            if child.startswith(prefix) or child == name:
                layout[child] = 1
    return layout


def _batch_first(module: nn.Module) -> bool | None:
    if isinstance(module, nn.Transformer | nn.TransformerEncoder | nn.TransformerDecoder):
        layers = module.layers if hasattr(module, "layers") else module.encoder.layers
        return bool(layers[0].self_attn.batch_first) if len(layers) else None
    if isinstance(module, nn.TransformerEncoderLayer | nn.TransformerDecoderLayer):
        return bool(module.self_attn.batch_first)
    return None


def derived_weights(module: nn.Module) -> str | None:
    """Why ``module`` computes with weights that are not its trainable leaves, or None.

    ``torch.nn.utils.parametrizations.weight_norm``/``spectral_norm`` (and any
    ``parametrize.register_parametrization``) keep the originals in children;
    the old ``torch.nn.utils.weight_norm`` keeps ``weight_g``/``weight_v`` and writes the
    weight in a forward pre-hook.
    """
    if parametrize.is_parametrized(module):
        names = ", ".join(module.parametrizations.keys())
        return f"parametrized {names}: measured on the trainable originals by the fallback"
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, WeightNorm):
            return f"weight_norm of {hook.name!r}: measured on {hook.name}_g and {hook.name}_v"
    return None


def share_parameters(model: nn.Module, observers: list[Observer]) -> list[Observer]:
    """Give each parameter used by several layers one owner and a shared book of uses.

    The owner is the layer under whose name ``model.named_parameters()`` yields the
    parameter first (the first in module order); the others "borrow" it: their uses go
    to the book and they do not count it. A layer left with no parameter of its own rides
    along with the owner of what it borrows (it is no row of the trace).

    Raises:
        UnsupportedLayerError: a shared parameter used by an observer that cannot hand
            its uses to the book (e.g. re-expressed attention).
    """
    book = UseBook()
    book.names = {id(p): n for n, p in model.named_parameters()}
    owners: dict[int, Observer] = {}
    holders: dict[int, int] = {}
    for observer in observers:
        for param in observer.params.values():
            holders[id(param)] = holders.get(id(param), 0) + 1
            owners.setdefault(id(param), observer)
    refused = []
    for observer in observers:
        observer.book = book
        for pname, param in list(observer.params.items()):
            if holders[id(param)] < 2:
                continue
            if not observer.supports_reuse:
                refused.append(f"{book.names[id(param)]} (in {observer.name!r})")
            if owners[id(param)] is observer:
                observer.shared[pname] = param
            else:
                observer.borrowed[pname] = observer.params.pop(pname)
    if refused:
        msg = (
            f"shared parameters used by a layer that cannot account for them: "
            f"{', '.join(refused)}; give each layer its own parameter"
        )
        raise UnsupportedLayerError(msg)
    kept = []
    for observer in observers:
        if observer.params:
            kept.append(observer)
        else:
            first = next(iter(observer.borrowed.values()))
            owners[id(first)].partners.append(observer)
    return kept


def _claims(observer: Observer) -> bool:
    return any(p.requires_grad for p in observer.module.parameters())


def _hook_factory(norm_fn: NormFn) -> ObserverFactory:
    def factory(name: str, module: nn.Module, session: Session) -> Observer:
        return HookObserver(name, module, session, norm_fn)

    return factory
