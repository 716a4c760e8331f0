"""User-facing errors: the CLI prints their message on one line and exits with code 2."""

from __future__ import annotations

import difflib
from typing import Iterable


class DistillError(Exception):
    """An error caused by user input (recipe, model spec, data, file); never a bug."""

    exit_code = 2


class RecipeError(DistillError):
    """A recipe field is unknown, misspelt, of the wrong type or has a bad value."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"recipe field '{field}': {message}" if field else f"recipe: {message}")


def close_matches(word: str, choices: Iterable[str], n: int = 3) -> str:
    """Return a ' (did you mean: a, b?)' hint for ``word`` among ``choices``, or ''."""
    matches = difflib.get_close_matches(word, list(choices), n=n, cutoff=0.6)
    return f" (did you mean: {', '.join(matches)}?)" if matches else ""
