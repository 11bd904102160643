"""numpy, imported on first use: a file round or a short command should not pay its import
(about 0.1 s, most of a small sync round's start) when it never touches an array."""
from __future__ import annotations

import importlib


class _Lazy:
    __slots__ = ("_name", "_mod")

    def __init__(self, name: str) -> None:
        self._name = name
        self._mod = None

    def __getattr__(self, attr: str):
        mod = self._mod
        if mod is None:
            mod = self._mod = importlib.import_module(self._name)
        return getattr(mod, attr)


np = _Lazy("numpy")
