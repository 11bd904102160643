"""smsrepl: the data plane of a server migration (block and file replication over mutual TLS)."""
from ._version import __version__
from .kernels import BACKEND as backend

__all__ = ["__version__", "backend"]
