"""numpy, imported on first use: a file round or a short command should not pay its import
(about 0.1 s, most of a small sync round's start) when it never touches an array."""
from __future__ import annotations

import importlib
import os
import sys

TYPE_CHECKING = False  # not typing's: importing typing would cost every short command 3 ms
if TYPE_CHECKING:
    from typing import Any

#: numpy's BLAS starts a thread per CPU as numpy is imported, and smsrepl multiplies no
#: matrices: those threads cost each process CPU at start (importing the sender took 0.17
#: user s for 0.12 s of wall time, 0.09 with one BLAS thread) and spun beside the data path
#: (3.7% of a receiver's CPU during a full copy). A program that imports smsrepl gets this too.
_ONE_THREAD = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def import_numpy():
    """numpy, with a BLAS of one thread unless the environment asks for more."""
    set_here = [] if "numpy" in sys.modules else [k for k in _ONE_THREAD if k not in os.environ]
    for k in set_here:
        os.environ[k] = "1"
    try:
        return importlib.import_module("numpy")
    finally:  # read as the libraries load: the processes this one starts get the environment as it was
        for k in set_here:
            os.environ.pop(k, None)


class _Lazy:
    """A module imported on first use, by ``load`` (importlib.import_module of ``name`` without one)."""

    __slots__ = ("_name", "_load", "_mod")

    def __init__(self, name: str, load=None) -> None:
        self._name = name
        self._load = load
        self._mod: Any = None

    def __getattr__(self, attr: str):
        mod = self._mod
        if mod is None:
            mod = self._mod = self._load() if self._load is not None else importlib.import_module(self._name)
        return getattr(mod, attr)


if TYPE_CHECKING:  # the type checker sees numpy itself, with its types
    import numpy as np
else:
    np = _Lazy("numpy", import_numpy)
