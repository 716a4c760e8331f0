"""One registry idiom for everything a recipe names by string.

Each kind of pluggable part (policies, losses, datasets, augment kinds, optimisers,
schedules, projectors, taps) is a :class:`Registry`. Adding one is one file with a
decorator line::

    from distill.registries import LOSSES

    @LOSSES.register("my_kd")
    def my_kd(student_logits, teacher_logits, temperature):  # returns (B,)
        ...

Recipe validation and ``docs/recipes.md`` read the choices from :meth:`Registry.names`,
and an unknown name is one :class:`~distill.errors.RecipeError` line with close matches.
"""

from __future__ import annotations

from typing import Callable, Dict, Generic, Iterator, List, Optional, TypeVar

from .errors import RecipeError, close_matches

T = TypeVar("T")


class Registry(Generic[T]):
    """A named table of parts of one kind (``kind`` names it in errors, e.g. 'loss')."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: Dict[str, T] = {}
        self._help: Dict[str, str] = {}

    def register(self, name: Optional[str] = None, help: str = "") -> Callable[[T], T]:
        """Return a decorator registering its argument under ``name`` (default: its
        ``name`` attribute, else its ``__name__``); a second registration of a name is a bug."""
        def decorator(obj: T) -> T:
            key = name or getattr(obj, "name", None) or getattr(obj, "__name__")
            if key in self._items:
                raise ValueError(f"{self.kind} {key!r} registered twice")
            self._items[key] = obj
            self._help[key] = help or (getattr(obj, "__doc__", None) or "").strip().split("\n")[0]
            return obj
        return decorator

    def get(self, name: str, field: str = "") -> T:
        """Return the part registered as ``name``; an unknown name raises one
        :class:`RecipeError` naming ``field`` (the recipe key that chose it) and close matches."""
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise RecipeError(field, self.unknown(name)) from None

    def unknown(self, name: object) -> str:
        """Return the message for an unknown ``name``: close matches and the choices."""
        return (f"unknown {self.kind} {name!r}{close_matches(str(name), self._items)}; "
                f"choose one of: {', '.join(self.names())}")

    def names(self) -> List[str]:
        """Return the registered names, in registration order."""
        return list(self._items)

    def help(self, name: str) -> str:
        """Return the one-line description of ``name`` (its docstring's first line)."""
        return self._help[name]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, name: str) -> T:
        return self._items[name]


POLICIES: Registry = Registry("policy")
LOSSES: Registry = Registry("loss")
DATASETS: Registry = Registry("dataset")
AUGMENTS: Registry = Registry("augment kind")
OPTIMIZERS: Registry = Registry("optimizer")
SCHEDULES: Registry = Registry("schedule")
PROJECTORS: Registry = Registry("projector")
TAPS: Registry = Registry("tap")
