"""Which observer watches which module: an explicit table, looked up through the MRO."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from torch import nn

from samplescope.errors import SamplescopeError
from samplescope.recorder.layers.base import HookObserver, NormFn, Observer, Session

__all__ = ["LayerRegistry", "OnUnsupported", "Rule", "UnsupportedLayerError"]

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
        self, model: nn.Module, session: Session, on_unsupported: OnUnsupported = "fallback"
    ) -> list[Observer]:
        """One observer per layer of ``model`` that owns trainable parameters.

        Raises:
            UnsupportedLayerError: with ``on_unsupported="error"``, naming every module that
                no rule covers, all at once.
        """
        if on_unsupported not in ("error", "warn", "fallback"):
            msg = f"on_unsupported must be 'error', 'warn' or 'fallback', not {on_unsupported!r}"
            raise ValueError(msg)
        observers: list[Observer] = []
        unsupported: list[str] = []
        claimed: list[str] = []
        for name, module in model.named_modules():
            if any(name.startswith(prefix + ".") for prefix in claimed):
                continue
            rule = self.lookup(module)
            claims = rule is not None and rule.claims_children
            reason = rule.declines(module) if rule is not None and rule.declines else None
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
        return [o for o in observers if o.params or _claims(o)]


def _claims(observer: Observer) -> bool:
    return any(p.requires_grad for p in observer.module.parameters())


def _hook_factory(norm_fn: NormFn) -> ObserverFactory:
    def factory(name: str, module: nn.Module, session: Session) -> Observer:
        return HookObserver(name, module, session, norm_fn)

    return factory
