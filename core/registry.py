"""Build components from a name: ``name: SlotAttention`` in YAML, never a Python import path."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from core.errors import ConfigError

T = TypeVar("T")


class Registry:
    """Maps names to classes (or factories) of one kind of component.

    >>> GROUPERS = Registry("model.grouper")
    >>> @GROUPERS.register()
    ... class SlotAttention: ...
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., Any]] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        def add(obj: T) -> T:
            key = name or obj.__name__  # type: ignore[attr-defined]
            if key in self._entries:
                raise ValueError(f"{self.kind}: {key!r} is registered twice")
            self._entries[key] = obj  # type: ignore[assignment]
            return obj

        return add

    @property
    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._entries:
            close = difflib.get_close_matches(name, self.names, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(
                f"unknown {self.kind}.name {name!r}{hint}; valid: {', '.join(self.names)}"
            )
        return self._entries[name]

    def build(self, name: str, /, strict: bool = True, **kwargs: Any) -> Any:
        """Instantiate ``name`` with keyword arguments.

        ``strict``: a keyword the constructor does not take is an error naming it. With
        ``strict=False`` such keywords are dropped: for schema fields that only some components
        use (``n_heads`` means nothing to the ``Identity`` predictor).
        """
        factory = self.get(name)
        unknown = self.unknown(name, kwargs)
        if unknown and not strict:
            kwargs = {k: v for k, v in kwargs.items() if k not in unknown}
        elif unknown:
            raise ConfigError(
                f"{self.kind} {name} does not take {', '.join(unknown)}; it takes: "
                f"{', '.join(self.takes(name))}"
            )
        return factory(**kwargs)

    def takes(self, name: str) -> list[str]:
        """The keyword arguments ``name``'s constructor takes."""
        params = inspect.signature(self.get(name)).parameters
        return [k for k, p in params.items() if k != "self" and p.kind not in (
            inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)]

    def unknown(self, name: str, keys: Any) -> list[str]:
        """The ``keys`` that ``name``'s constructor does not take (none if it takes ``**kw``)."""
        params = inspect.signature(self.get(name)).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return []
        return [k for k in keys if k not in params]
