"""Built-in adapters by name, so callers (workers, the agent) need no import of concrete classes."""

from __future__ import annotations

from collections.abc import Callable

from planner.models.base import ModelAdapter
from planner.models.minilm import MINILM_NAME, MiniLMAdapter
from planner.models.tiny import TinyAdapter
from planner.specs import PlanError

__all__ = ["BUILTIN_MODELS", "load_adapter"]

#: name → zero-argument factory.
BUILTIN_MODELS: dict[str, Callable[[], ModelAdapter]] = {
    MINILM_NAME: MiniLMAdapter,
    "tiny": TinyAdapter,
}


def load_adapter(name: str) -> ModelAdapter:
    """A built-in adapter by name; unknown names raise PlanError listing the known ones."""
    try:
        factory = BUILTIN_MODELS[name]
    except KeyError:
        raise PlanError(
            f"unknown built-in model {name!r} (known: {', '.join(sorted(BUILTIN_MODELS))})"
        ) from None
    return factory()
