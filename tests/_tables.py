"""The error-path tables at the end of the test files: one row per refused call,
``(callable, kwargs, exception, message regex)``, so that a reader meets the derivations first
and the refusals in one place."""

import pytest


def refusals(rows):
    """``pytest.mark.parametrize`` over ``(fn, kwargs, exc, match)`` rows, each id'd by the
    callable's name and its row number."""
    params = []
    for i, (fn, kwargs, exc, match) in enumerate(rows):
        name = getattr(fn, "__qualname__", None) or type(fn).__name__
        params.append(pytest.param(fn, kwargs, exc, match, id=f"{name}-{i}"))
    return pytest.mark.parametrize("fn,kwargs,exc,match", params)
