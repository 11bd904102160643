"""smsrepl: the data plane of a server migration (block and file replication over mutual TLS)."""
from smsrepl import _moved
from smsrepl._version import __version__

_moved.install()  # old import paths of moved modules keep working (see _moved.py)

__all__ = ["__version__", "backend"]


def __getattr__(name: str):
    # lazy: importing the package must not pull numpy in before the CLI has set
    # its environment (see cli/__init__.py), nor cost a library user who needs only a part
    if name == "backend":
        from smsrepl.kernels import BACKEND

        return BACKEND
    raise AttributeError(f"module 'smsrepl' has no attribute {name!r}")
