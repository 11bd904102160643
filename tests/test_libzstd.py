"""Loading the system's libzstd: the environment's switch, a bad value of it, a library too old."""
import logging

import pytest

from smsrepl import libzstd


@pytest.fixture
def fresh(monkeypatch):
    """library() looks again (it loads once a process)."""
    monkeypatch.setattr(libzstd, "_looked", False)
    monkeypatch.setattr(libzstd, "_lib", None)


def test_zero_keeps_to_python_zstandard(fresh, monkeypatch):
    monkeypatch.setenv("SMSREPL_SYSTEM_ZSTD", "0")
    assert libzstd.library() is None


def test_a_bad_value_says_so_in_one_line_and_keeps_the_default(fresh, monkeypatch, caplog):
    monkeypatch.setenv("SMSREPL_SYSTEM_ZSTD", "off")
    with caplog.at_level(logging.WARNING, logger="smsrepl"):
        lib = libzstd.library()
    assert [r.getMessage() for r in caplog.records] == [
        "SMSREPL_SYSTEM_ZSTD='off' is neither 0 nor 1: compressing with the system's libzstd where it loads"]
    monkeypatch.setattr(libzstd, "_looked", False)
    monkeypatch.delenv("SMSREPL_SYSTEM_ZSTD")
    assert (lib is None) == (libzstd.library() is None)


class _Fn:
    restype = argtypes = None

    def __call__(self, *args):
        return 10309  # 1.3.9


class _Old:
    """A libzstd.so.1 with every function the binding sets up, but older than the parameter API."""

    def __init__(self, name):
        pass

    def __getattr__(self, name):
        fn = _Fn()
        setattr(self, name, fn)
        return fn


def test_a_library_too_old_or_missing_is_not_used(fresh, monkeypatch):
    monkeypatch.delenv("SMSREPL_SYSTEM_ZSTD", raising=False)
    monkeypatch.setattr(libzstd.ctypes, "CDLL", _Old)
    assert libzstd.library() is None
    monkeypatch.setattr(libzstd, "_looked", False)

    def missing(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(libzstd.ctypes, "CDLL", missing)
    assert libzstd.library() is None
