"""A base for classes that only hold named constants (protocol stages, message tags)."""

from __future__ import annotations

from typing import Any

__all__ = ["Namespace"]


class Namespace:
    """Subclasses are namespaces of constants (like Flower's ``Stage``): never instantiated."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Namespace:
        """Refuse: a namespace of constants has no instances."""
        raise TypeError(f"{cls.__name__} is a namespace of constants")
