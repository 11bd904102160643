"""verify files honours the rules that shaped the copy, and counts what rclone check counts with
the same rules as filters; its --list is rclone's --combined, line for line."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from smsrepl.files.compare import compare_trees, escape_name
from smsrepl.files.rules import PathRules

pytestmark = pytest.mark.skipif(shutil.which("rclone") is None, reason="rclone (Debian package) is not installed")

CLI = [sys.executable, "-m", "smsrepl"]


def tree(root):
    """A source tree and a copy with every kind of difference, inside and outside the
    directories the rule sets below leave out."""
    src, dst = root / "srv", root / "dst"
    files = {
        "etc/app.conf": b"conf", "etc/hosts": b"127.0.0.1 localhost\n",
        "cache/junk": b"junk", "cache/more/junk2": b"junk2", "cache/tmp/x": b"x",
        "var/log/syslog": b"log line\n" * 50, "var/log/app/app.log": b"a" * 3000, "var/lib/db/data": b"D" * 9000,
        "home/ann/notes.txt": b"notes", "home/ann/tmp/scratch": b"s", "home/bob/tmp/scratch": b"t",
        "data/a.bin": bytes(range(256)) * 20, "data/b.tmp": b"temp", "data/sub/c.tmp": b"temp2",
        "data/sub/keep": b"keep", "top.txt": b"top",
    }
    for path, data in files.items():
        (src / path).parent.mkdir(parents=True, exist_ok=True)
        (src / path).write_bytes(data)
    shutil.copytree(src, dst, symlinks=True)
    # missing on the target
    for p in ("cache/junk", "var/log/syslog", "home/ann/tmp/scratch", "data/sub/c.tmp", "etc/hosts"):
        os.unlink(dst / p)
    # different: one the same size, one not
    for p, data in (("cache/more/junk2", b"JUNK2"), ("var/log/app/app.log", b"b" * 3000), ("data/a.bin", b"short"),
                    ("home/bob/tmp/scratch", b"T"), ("top.txt", b"TOP")):
        (dst / p).write_bytes(data)
    # only on the target
    for p in ("cache/new", "var/log/new.log", "home/ann/tmp/new", "data/new.tmp", "extra.txt", "var/lib/db/wal"):
        (dst / p).parent.mkdir(parents=True, exist_ok=True)
        (dst / p).write_bytes(b"+")
    return src, dst


def rclone(src, dst, *filters):
    cp = subprocess.run(["rclone", "check", str(src), str(dst), "--combined", "-", "--config", "/dev/null",
                         *filters], capture_output=True, text=True)
    lines = sorted(line for line in cp.stdout.splitlines() if line)
    assert not any(line.startswith("!") for line in lines), cp.stdout + cp.stderr
    marks = [line[0] for line in lines]
    counts = {"num_total_files": marks.count("=") + marks.count("*") + marks.count("+"),
              "num_different_files": marks.count("*"), "num_target_miss_files": marks.count("+"),
              "num_target_more_files": marks.count("-")}
    return counts, lines


def config(tmp_path, items):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"configurations": [{"config_key": k, "config_value": v} for k, v in items]}))
    return path


RULE_SETS = [
    # (5.10.1 items, with {SRC} for the source directory's absolute path; rclone's filters)
    ([("EXCLUDE_MIGRATE_PATH", "/cache")], ["--exclude", "/cache/**"]),
    ([(" EXCLUDE_MIGRATE_PATH", "{SRC}/cache")], ["--exclude", "/cache/**"]),  # a host path, as the service sends
    ([("MIGRATE_EXCLUDE_DIR", "/cache, /var/log")], ["--exclude", "/cache/**", "--exclude", "/var/log/**"]),
    ([("SYNC_EXCLUDE_PATH", "{SRC}/home/*/tmp"), ("EXCLUDE_MIGRATE_PATH", "/cache")],
     ["--exclude", "/home/*/tmp/**", "--exclude", "/cache/**"]),
    ([("EXCLUDE_MIGRATE_PATH", "/**/*.tmp")], ["--exclude", "*.tmp"]),
    ([("ONLY_SYNC_PATH", "{SRC}/data,/var/log")], ["--include", "/data/**", "--include", "/var/log/**"]),
    ([("ONLY_SYNC_DIR", "/home"), ("SYNC_EXCLUDE_DIR", "/home/bob")],
     ["--filter", "- /home/bob/**", "--filter", "+ /home/**", "--filter", "- **"]),
]


@pytest.mark.parametrize("items,filters", RULE_SETS, ids=[";".join(f"{k.strip()}={v}" for k, v in items)
                                                           for items, _ in RULE_SETS])
def test_counts_and_marks_equal_rclone_check_with_the_same_rules(tmp_path, items, filters):
    src, dst = tree(tmp_path)
    items = [(k, v.replace("{SRC}", str(src))) for k, v in items]
    theirs, lines = rclone(src, dst, *filters)
    cfg = config(tmp_path, items)
    cp = subprocess.run(CLI + ["verify", "files", str(src), str(dst), "--config", str(cfg), "--list"],
                        capture_output=True, text=True)
    assert cp.returncode == 1, cp.stderr
    ours = json.loads(cp.stdout)["consistency_result"][0]
    assert {k: v for k, v in ours.items() if k != "dir_check"} == theirs
    assert sorted(line for line in cp.stderr.splitlines() if line and not line.startswith("#")) == lines
    # the library gives the same
    rules = PathRules.from_configurations(json.loads(cfg.read_text())).anchored(str(src))
    body, _ = compare_trees(str(src), str(dst), rules=rules, list_paths=False)
    assert body["consistency_result"][0] == ours


def test_a_correct_copy_under_exclusions_is_consistent(tmp_path):
    """The issue's case: send files left cache/ behind as the rules said; the check with the
    same rules must not call that copy inconsistent."""
    src = tmp_path / "srv"
    for p in ("cache/junk", "cache/a/b", "etc/x", "var/y"):
        (src / p).parent.mkdir(parents=True, exist_ok=True)
        (src / p).write_bytes(p.encode())
    dst = tmp_path / "dst"
    shutil.copytree(src, dst, ignore=lambda d, names: ["cache"] if d == str(src) else [])
    cfg = config(tmp_path, [("EXCLUDE_MIGRATE_PATH", f"{src}/cache")])
    cp = subprocess.run(CLI + ["verify", "files", str(src), str(dst), "--config", str(cfg)], capture_output=True,
                        text=True)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert json.loads(cp.stdout)["consistency_result"][0]["num_total_files"] == 2
    cp = subprocess.run(CLI + ["verify", "files", str(src), str(dst)], capture_output=True, text=True)
    assert cp.returncode == 1 and json.loads(cp.stdout)["consistency_result"][0]["num_target_miss_files"] == 2


def test_consistency_dirs_each_count_as_rclone_checks_that_directory(tmp_path):
    src, dst = tree(tmp_path)
    cfg = config(tmp_path, [("CONSISTENCY_DIR", f"/var,{src}/data"), ("EXCLUDE_MIGRATE_PATH", "/**/*.tmp")])
    cp = subprocess.run(CLI + ["verify", "files", str(src), str(dst), "--config", str(cfg)], capture_output=True,
                        text=True)
    got = json.loads(cp.stdout)["consistency_result"]
    assert [e["dir_check"] for e in got] == ["/var", f"{src}/data"]
    for entry, sub in zip(got, ("var", "data")):
        theirs, _ = rclone(src / sub, dst / sub, "--exclude", "*.tmp")
        assert {k: v for k, v in entry.items() if k != "dir_check"} == theirs, sub


def test_rules_and_directories_that_match_nothing_are_noted(tmp_path):
    src, dst = tree(tmp_path)
    cfg = config(tmp_path, [("EXCLUDE_MIGRATE_PATH", f"/cache,{src}/cahce"), ("CONSISTENCY_DIR", "/etc,/nowhere")])
    cp = subprocess.run(CLI + ["verify", "files", str(src), str(dst), "--config", str(cfg)], capture_output=True,
                        text=True)
    notes = json.loads(cp.stdout)["notes"]
    assert notes == [f"EXCLUDE_MIGRATE_PATH '{src}/cahce' matched nothing under {src}",
                     f"CONSISTENCY_DIR '/nowhere' matched nothing under {src}"], notes
    cp = subprocess.run(CLI + ["verify", "files", str(src), str(src)], capture_output=True, text=True)
    assert cp.returncode == 0 and "notes" not in json.loads(cp.stdout)


def test_names_are_listed_escaped_on_one_line(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    odd = [b"new\nline", b"tab\there", b"back\\slash", b"bad \xff byte", b"bell\x07", "ünï".encode()]
    for name in odd:
        with open(os.fsencode(src) + b"/" + name, "wb") as fh:
            fh.write(b"x")
    shutil.copytree(src, dst)
    os.unlink(os.fsencode(dst) + b"/new\nline")
    cp = subprocess.run(CLI + ["verify", "files", str(src), str(dst), "--list"], capture_output=True, text=True)
    rows = [line for line in cp.stderr.splitlines() if not line.startswith("#")]
    assert sorted(rows) == sorted(["+ new\\nline", "= tab\\there", "= back\\\\slash", "= bad \\377 byte",
                                   "= bell\\007", "= ünï"]), rows
    assert escape_name(b"a\rb") == "a\\rb"


@pytest.mark.parametrize("items,filters", [RULE_SETS[1], RULE_SETS[3], RULE_SETS[5]], ids=["host", "sync", "only"])
def test_against_a_receiver_the_same_rules_give_the_same_counts(tmp_path, bundle, certkey_file, items, filters):
    """The receiver lists its whole tree (it knows no rules): the check leaves out of it what
    the rules leave out, and counts as the local check and rclone do."""
    from smsrepl.transport.receiver import Receiver
    from smsrepl.transport.tls import server_context

    src, dst = tree(tmp_path)
    items = [(k, v.replace("{SRC}", str(src))) for k, v in items]
    cfg = config(tmp_path, items)
    theirs, lines = rclone(src, dst, *filters)
    rx = Receiver({"tree": str(dst)}, server_context(bundle), str(tmp_path / "rx-state"), idle_timeout=10)
    host, port = rx.start()
    try:
        cp = subprocess.run(CLI + ["verify", "files", str(src), "--to", f"{host}:{port}", "--target", "tree",
                                   "--certkey", certkey_file, "--config", str(cfg), "--list"],
                            capture_output=True, text=True)
    finally:
        rx.stop()
    assert cp.returncode == 1, cp.stderr
    ours = json.loads(cp.stdout)["consistency_result"][0]
    assert {k: v for k, v in ours.items() if k != "dir_check"} == theirs
    assert sorted(line for line in cp.stderr.splitlines() if line and not line.startswith("#")) == lines
