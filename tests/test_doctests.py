"""Docstring examples of the public surface run as doctests."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["nmcompile", "nmcompile._pattern", "nmcompile._registry", "nmcompile._compile"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, raise_on_error=False)
    assert result.failed == 0
    if name != "nmcompile":
        assert result.attempted > 0, f"{name} lost its examples"
