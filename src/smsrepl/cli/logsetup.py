"""Where log lines go and what they look like: stderr or a file (``--log-file``), as text or
one JSON object a line (``--log-format json``). Nothing else here."""
from __future__ import annotations

import json
import logging
import sys

from smsrepl.errors import ConfigError


def _utc(t: float):
    import datetime  # on first use: most commands never log a JSON line

    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc)

TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
FORMATS = ("text", "json")

#: what every LogRecord carries: anything else on a record came from ``extra=`` and is a field
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (ISO 8601, UTC), level, logger, message, and the fields the
    code passed with ``extra=`` (values JSON cannot hold are given as their str())."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": _utc(record.created)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_") and key not in out:
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def _formatter(log_format: str) -> logging.Formatter:
    if log_format not in FORMATS:
        raise ConfigError(f"--log-format {log_format!r}: use one of {', '.join(FORMATS)}")
    return JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)


def configure(verbose: bool = False, log_file: str | None = None, log_format: str = "text") -> None:
    """Send the process's log lines to ``log_file`` (appended) or else to stderr, in
    ``log_format``; INFO and up with ``verbose``, WARNING and up otherwise. Replaces what an
    earlier call configured; handlers someone else put on the root logger (an embedding program,
    pytest) are left alone, and text to stderr is then left to them (as logging.basicConfig
    does). A file that cannot be opened is a ConfigError naming it.

    The file handler reopens the file when it was moved or removed (logrotate), and
    :func:`reopen` does so on demand (SIGHUP)."""
    formatter = _formatter(log_format)
    handler: logging.Handler | None = None
    if log_file:  # opened first: a file that cannot be opened changes nothing
        try:
            from logging.handlers import WatchedFileHandler

            handler = WatchedFileHandler(log_file, encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"--log-file {log_file!r} cannot be opened for appending: "
                              f"{exc.strerror or exc}") from None
    root = logging.getLogger()
    for old in _ours():
        root.removeHandler(old)
        old.close()
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    if handler is None:
        if log_format == "text" and root.handlers:
            return
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    setattr(handler, "_smsrepl", True)  # ours: the next call replaces it
    root.addHandler(handler)


def _ours() -> list[logging.Handler]:
    return [h for h in logging.getLogger().handlers if getattr(h, "_smsrepl", False)]


def reopen() -> None:
    """Close and reopen the log file (a SIGHUP after logrotate moved it); stderr is left alone."""
    from logging.handlers import WatchedFileHandler

    for handler in _ours():
        if isinstance(handler, logging.FileHandler):
            handler.acquire()
            try:
                handler.close()
                handler.stream = handler._open()
                if isinstance(handler, WatchedFileHandler):
                    handler._statstream()  # what it watches is the new file
            except OSError:
                pass  # keep logging nowhere rather than dying: the next reopen may succeed
            finally:
                handler.release()
