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
        factory: builds the observer for one module.
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

    Args:
        fallback: builds the observer for modules no rule covers (or whose rule declines),
            called as ``fallback(name, module, session)``, plus ``claims_children=True``
            when a declined rule claimed the module's children.
    """

    def __init__(self, fallback: ObserverFactory | None = None) -> None:
        self._rules: dict[type[nn.Module], Rule] = {}
        self._fallback = fallback

    def register(
        self, cls: type[nn.Module], rule: Rule | NormFn, *, claims_children: bool = False
    ) -> None:
        """Map ``cls`` (and its subclasses) to a rule, or to a closed-form norm function."""
        if not isinstance(rule, Rule):
            rule = Rule(_hook_factory(rule), claims_children=claims_children)
        self._rules[cls] = rule

    def lookup(self, module: nn.Module) -> Rule | None:
        """The rule for the nearest class in ``type(module).__mro__``, or None."""
        for cls in type(module).__mro__:
            if cls in self._rules:
                return self._rules[cls]
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
