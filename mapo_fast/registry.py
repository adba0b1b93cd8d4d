"""Variants registered by name: the policy-loss objectives, the KL estimators, the loss
aggregation modes and the advantage estimators each live in one ``Registry``, filled by a
decorator where the variant is defined. A name is registered once (a second registration under
the same name is refused, naming it), and a lookup of an unknown name lists the valid ones.
Settings (``TrainConfig.algo``, ``PolicyLossConfig.kl_type``, ...) are validated against the
registry, and the framework integrations register their variants through it."""

from __future__ import annotations

from typing import Callable, Dict, Generic, Iterator, Optional, Tuple, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Named variants of one kind (``kind``, e.g. ``"advantage estimator"``, names it in
    errors). ``register(name)`` is a decorator (or ``register(name, obj)`` a call);
    ``get(name)`` the lookup; ``names()`` the registered names, in registration order."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: Dict[str, T] = {}

    def register(self, name: str, obj: Optional[T] = None) -> Callable[[T], T]:
        """Registers ``obj`` under ``name`` (``ValueError`` if the name is taken or not a
        non-empty string); without ``obj``, returns a decorator that registers what it wraps
        and returns it unchanged."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} registry: a name must be a non-empty string, got "
                             f"{name!r}")

        def add(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} registry: {name!r} is already registered "
                                 f"(names: {list(self._items)})")
            self._items[name] = item
            return item

        if obj is not None:
            add(obj)
        return add

    def get(self, name: str) -> T:
        """The variant named ``name`` (``ValueError`` listing the valid names otherwise)."""
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise ValueError(f"unknown {self.kind} {name!r}; valid: {list(self._items)}") \
                from None

    def names(self) -> Tuple[str, ...]:
        return tuple(self._items)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._items)})"
