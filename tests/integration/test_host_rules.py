"""send files with host-absolute path rules (issue 24): the control plane names host paths
(/srv/cache) and SRC_DIR is /srv; rules that match nothing are reported."""
import json
import os
import subprocess
import sys

import pytest

from smsrepl import kernels
from smsrepl.files.rules import PathRules
from smsrepl.transport.file_sender import FileSender
from smsrepl.transport.receiver import Receiver
from smsrepl.transport.tls import client_context, server_context


@pytest.fixture
def rx(tmp_path, bundle):
    receiver = Receiver({"tree": str(tmp_path / "dst")}, server_context(bundle), str(tmp_path / "rx-state"),
                        idle_timeout=10, create=True)
    host, port = receiver.start()
    yield f"{host}:{port}"
    receiver.stop()


@pytest.fixture
def srv(tmp_path):
    root = tmp_path / "srv"
    (root / "cache/tmp").mkdir(parents=True)
    (root / "data").mkdir()
    (root / "cache/tmp/junk").write_text("junk")
    (root / "data/t1").write_text("t1")
    return root


def config(tmp_path, *pairs) -> str:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"configurations": [{"config_key": k, "config_value": v} for k, v in pairs]}))
    return str(path)


def send_files(src, addr, certkey_file, conf, *extra):
    return subprocess.run([sys.executable, "-m", "smsrepl", "send", "files", str(src), "--to", addr, "--target", "tree",
                           "--certkey", certkey_file, "--config", conf, *extra],
                          capture_output=True, text=True, timeout=120)


def test_a_host_path_under_src_dir_is_excluded_and_a_typo_is_reported(tmp_path, rx, certkey_file, srv):
    conf = config(tmp_path, ("EXCLUDE_MIGRATE_PATH", f"{srv}/cache"), ("SYNC_EXCLUDE_PATH", f"{srv}/dat"))
    cp = send_files(srv, rx, certkey_file, conf, "--json")
    assert cp.returncode == 0, cp.stderr
    summary = json.loads(cp.stdout)
    assert summary["kind"] == "full" and summary["files_sent"] == 1
    assert summary["unmatched_rules"] == []  # a full round applies the migration excludes only
    dst = tmp_path / "dst"
    assert (dst / "data/t1").read_text() == "t1" and not (dst / "cache").exists()
    (srv / "data/t2").write_text("t2")
    # a sync round (SRC_DIR given with a trailing slash), in the human form
    cp = send_files(f"{srv}/", rx, certkey_file, conf)
    assert cp.returncode == 0, cp.stderr
    assert f"note: SYNC_EXCLUDE_PATH '{srv}/dat' matched nothing under {srv}\n" in cp.stderr
    assert "EXCLUDE_MIGRATE_PATH" not in cp.stderr
    assert (dst / "data/t2").read_text() == "t2" and not (dst / "cache").exists()
    cp = send_files(srv, rx, certkey_file, conf, "--json")
    assert json.loads(cp.stdout)["unmatched_rules"] == [{"key": "SYNC_EXCLUDE_PATH", "rule": f"{srv}/dat"}]


def test_a_typo_in_a_migration_exclude_is_listed_and_copies_as_before(tmp_path, rx, certkey_file, srv):
    conf = config(tmp_path, ("EXCLUDE_MIGRATE_PATH", f"{srv}/cach, /data/t9"))
    cp = send_files(srv, rx, certkey_file, conf, "--json")
    assert cp.returncode == 0, cp.stderr
    assert json.loads(cp.stdout)["unmatched_rules"] == [{"key": "EXCLUDE_MIGRATE_PATH", "rule": f"{srv}/cach"},
                                                        {"key": "EXCLUDE_MIGRATE_PATH", "rule": "/data/t9"}]
    assert (tmp_path / "dst/cache/tmp/junk").read_text() == "junk"
    assert cp.stderr.count("matched nothing under") == 2
    # sync rounds: walked while the receiver lists its tree (the rounds' rules are the same), and
    # an entry at a time (--checksum)
    for extra in ((), ("--checksum",)):
        cp = send_files(srv, rx, certkey_file, conf, "--json", *extra)
        assert cp.returncode == 0, cp.stderr
        summary = json.loads(cp.stdout)
        assert summary["kind"] == "sync" and summary["unmatched_rules"] == [
            {"key": "EXCLUDE_MIGRATE_PATH", "rule": f"{srv}/cach"}, {"key": "EXCLUDE_MIGRATE_PATH", "rule": "/data/t9"}]
    cp = send_files(srv, rx, certkey_file, conf, "--dry-run")  # says so too, changing nothing
    assert cp.returncode == 0 and cp.stderr.count("matched nothing under") == 2, cp.stderr
    assert f"note: EXCLUDE_MIGRATE_PATH '{srv}/cach' matched nothing under {srv}\n" in cp.stderr


def test_an_exclude_naming_src_dir_itself_is_refused_before_anything_is_sent(tmp_path, rx, certkey_file, srv):
    conf = config(tmp_path, ("MIGRATE_EXCLUDE_DIR", f"{srv}"))
    cp = send_files(srv, rx, certkey_file, conf, "--json")
    assert cp.returncode == 2 and cp.stdout == ""
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1 and "MIGRATE_EXCLUDE_DIR" in lines[0] and repr(str(srv)) in lines[0], cp.stderr
    assert "Traceback" not in cp.stderr
    assert not (tmp_path / "dst").exists()  # the receiver was never asked for the target


@pytest.mark.skipif(os.geteuid() != 0 or not kernels.TREE, reason="a change journal needs root and the native kernels")
def test_a_round_of_the_directories_a_journal_named_lists_no_unmatched_rules(tmp_path, rx, bundle, srv):
    from smsrepl.files.journal import open_journal

    rules = PathRules.from_configurations({"configurations": [
        {"config_key": "EXCLUDE_MIGRATE_PATH", "config_value": f"{srv}/cache, {srv}/cach"}]})
    journal = open_journal(str(srv), whole_every=0, notice=print)
    assert journal is not None
    host, port = rx.rsplit(":", 1)
    try:
        def run():
            return FileSender(str(srv), "tree", (host, int(port)), client_context(bundle), rules=rules,
                              journal=journal).run()

        first = run()
        assert first.scope == "whole" and first.stats.unmatched_rules == [("EXCLUDE_MIGRATE_PATH", f"{srv}/cach")]
        (srv / "data/t2").write_text("t2")
        second = run()
        # a part of the tree says nothing about the rest: not "matched nothing"
        assert second.scope == "journal" and second.stats.files_sent == 1
        assert second.summary()["unmatched_rules"] == []
        assert not (tmp_path / "dst/cache").exists()
    finally:
        journal.close()
