"""numpy, imported on first use: a file round or a short command should not pay its import
(about 0.1 s, most of a small sync round's start) when it never touches an array."""
from __future__ import annotations

import importlib

TYPE_CHECKING = False  # not typing's: importing typing would cost every short command 3 ms
if TYPE_CHECKING:
    from typing import Any


class _Lazy:
    __slots__ = ("_name", "_mod")

    def __init__(self, name: str) -> None:
        self._name = name
        self._mod: Any = None

    def __getattr__(self, attr: str):
        mod = self._mod
        if mod is None:
            mod = self._mod = importlib.import_module(self._name)
        return getattr(mod, attr)


if TYPE_CHECKING:  # the type checker sees numpy itself, with its types
    import numpy as np
else:
    np = _Lazy("numpy")
