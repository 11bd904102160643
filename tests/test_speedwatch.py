"""The --speed-limit watcher (cli.speedwatch) and the files flags name (cli.configfile): a
changed schedule reaches the running sender; a bad one is refused with one line and the old
one kept; an unreadable file is one line naming the flag and the path."""
from __future__ import annotations

import json
import os

import pytest

from smsrepl.cli.configfile import read_config
from smsrepl.cli.speedwatch import ScheduleWatcher
from smsrepl.errors import ConfigError


class FakeSender:
    def __init__(self) -> None:
        self.schedules: list = []

    def replace_schedule(self, schedule) -> None:
        self.schedules.append(schedule)


def _write(path, body, tick: int) -> None:
    path.write_text(body if isinstance(body, str) else json.dumps(body))
    os.utime(path, ns=(tick * 10**9, tick * 10**9))  # a new mtime whatever the clock's resolution


def test_a_changed_schedule_reaches_the_sender_and_a_bad_one_is_refused(tmp_path):
    path = tmp_path / "limit.json"
    _write(path, {"speed_limit": [{"start": "0:00", "end": "23:59", "speed": 100}]}, 1)
    watcher = ScheduleWatcher(str(path))
    notes: list[str] = []
    watcher.note = notes.append
    sender = FakeSender()
    watcher.sender = sender  # type: ignore[assignment]
    watcher.poll()
    assert sender.schedules == [] and notes == []  # unchanged: nothing to do

    _write(path, {"speed_limit": [{"start": "0:00", "end": "23:59", "speed": 7}]}, 2)
    watcher.poll()
    assert [s.rules[0].speed for s in sender.schedules] == [7] and notes == []

    _write(path, "{not json", 3)
    watcher.poll()
    assert len(sender.schedules) == 1  # the old schedule stays
    assert len(notes) == 1 and notes[0].startswith(
        f"ignoring changed speed limit: --speed-limit {str(path)!r}: speed limit: invalid JSON"), notes

    path.unlink()
    watcher.poll()  # gone: nothing happens until it is back
    assert len(sender.schedules) == 1 and len(notes) == 1


def test_an_unreadable_file_is_one_line_naming_the_flag_and_path(tmp_path):
    with pytest.raises(ConfigError) as missing:
        ScheduleWatcher(str(tmp_path / "nope.json"))
    assert missing.value.message == f"--speed-limit {str(tmp_path / 'nope.json')!r} cannot be read: No such file or directory"
    with pytest.raises(ConfigError) as a_dir:
        ScheduleWatcher(str(tmp_path))
    assert a_dir.value.message == f"--speed-limit {str(tmp_path)!r} cannot be read: Is a directory"
    with pytest.raises(ConfigError) as config_dir:
        read_config(str(tmp_path))
    assert config_dir.value.message == f"--config {str(tmp_path)!r} cannot be read: Is a directory"
    assert sorted(os.listdir(tmp_path)) == []  # nothing written
