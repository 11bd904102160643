"""logsetup.configure in a process that has handlers of its own (an embedding program, pytest)."""
import json
import logging

import pytest

from smsrepl.cli import logsetup
from smsrepl.errors import ConfigError


@pytest.fixture
def root():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield root
    for h in logsetup._ours():
        root.removeHandler(h)
        h.close()
    root.handlers[:] = handlers
    root.setLevel(level)


def test_foreign_handlers_stay_and_ours_are_replaced(root, tmp_path):
    foreign = logging.NullHandler()
    root.addHandler(foreign)
    logsetup.configure(False)  # text to stderr: left to the handlers already there
    assert foreign in root.handlers and logsetup._ours() == [] and root.level == logging.WARNING
    logsetup.configure(True, str(tmp_path / "a.log"), "json")
    logsetup.configure(True, str(tmp_path / "b.log"), "json")
    [ours] = logsetup._ours()
    assert ours.baseFilename == str(tmp_path / "b.log") and foreign in root.handlers
    logging.getLogger("smsrepl.test").info("hello %s", "there", extra={"target": "disk0"})
    rec = json.loads((tmp_path / "b.log").read_text())
    assert rec["message"] == "hello there" and rec["target"] == "disk0" and rec["level"] == "INFO"
    assert (tmp_path / "a.log").read_text() == ""


def test_a_file_that_cannot_be_opened_changes_nothing(root, tmp_path):
    logsetup.configure(False, str(tmp_path / "a.log"))
    before = root.handlers[:]
    with pytest.raises(ConfigError, match=r"^--log-file '.*/nope/x.log' cannot be opened for appending: "
                                          r"No such file or directory$"):
        logsetup.configure(True, str(tmp_path / "nope" / "x.log"))
    assert root.handlers == before and root.level == logging.WARNING
    assert not (tmp_path / "nope").exists()
