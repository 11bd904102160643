import pytest

from smsrepl.errors import ConfigError
from smsrepl.files.rules import PathRules


def body(*pairs):
    return {"configurations": [{"config_key": k, "config_value": v} for k, v in pairs]}


def p(path: str) -> tuple[bytes, ...]:
    return tuple(c.encode() for c in path.strip("/").split("/") if c)


def test_excludes_name_a_subtree_and_globs_stay_in_one_component():
    rules = PathRules.from_configurations(body(("EXCLUDE_MIGRATE_PATH", "/var/log, /home/*/cache,/tmp/x?.bin")))
    f = rules.for_round("full")
    assert not f.includes(p("/var/log")) and not f.includes(p("/var/log/syslog/old"))
    assert f.includes(p("/var")) and f.includes(p("/var/logs"))  # a component, not a string prefix
    assert not f.includes(p("/home/ann/cache/x")) and f.includes(p("/home/ann/docs"))
    assert f.includes(p("/home/ann/sub/cache"))  # * does not cross '/'
    assert not f.includes(p("/tmp/x1.bin")) and f.includes(p("/tmp/x12.bin"))
    assert not f.descend(p("/var/log")) and f.descend(p("/home/ann"))


def test_double_star_crosses_components():
    f = PathRules.from_configurations(body(("MIGRATE_EXCLUDE_DIR", "/srv/**/node_modules"))).for_round("full")
    assert not f.includes(p("/srv/node_modules/a"))
    assert not f.includes(p("/srv/a/b/c/node_modules"))
    assert f.includes(p("/srv/a/b/c/lib"))


def test_sync_rounds_keep_migration_excludes_and_add_their_own():
    rules = PathRules.from_configurations(body(("EXCLUDE_MIGRATE_PATH", "/a"), ("SYNC_EXCLUDE_PATH", "/b")))
    full, sync = rules.for_round("full"), rules.for_round("sync")
    assert not full.includes(p("/a/1")) and full.includes(p("/b/1"))
    assert not sync.includes(p("/a/1")) and not sync.includes(p("/b/1")) and sync.includes(p("/c"))


def test_only_sync_limits_sync_rounds_but_walks_the_way_there():
    rules = PathRules.from_configurations(body(("ONLY_SYNC_DIR", "/srv/data/*/db"), ("SYNC_EXCLUDE_DIR", "/srv/data/x")))
    sync = rules.for_round("sync")
    assert rules.for_round("full").includes(p("/etc/passwd"))  # the full copy is not limited
    assert not sync.includes(p("/etc/passwd")) and not sync.descend(p("/etc"))
    assert sync.descend(p("/srv")) and sync.descend(p("/srv/data")) and sync.descend(p("/srv/data/y"))
    assert not sync.includes(p("/srv/data")) and not sync.includes(p("/srv/data/y"))
    assert sync.includes(p("/srv/data/y/db")) and sync.includes(p("/srv/data/y/db/t1"))
    assert not sync.includes(p("/srv/data/x/db/t1")) and not sync.descend(p("/srv/data/x"))


def test_non_utf8_names_match_by_their_bytes():
    f = PathRules.from_configurations(body(("EXCLUDE_MIGRATE_PATH", "/d/*.tmp"))).for_round("full")
    assert not f.includes((b"d", b"\xff\xfe.tmp")) and f.includes((b"d", b"\xff\xfe.dat"))


def test_consistency_dirs_cpu_limit_and_spellings():
    rules = PathRules.from_configurations({"configurations": [
        {"config_key": " EXCLUDE_MIGRATE_PATH", "config_value": "/x"},  # as the reference's example writes it
        {"config_key": "CONSISTENCY_DIR", "config_value": "/etc,/var/lib"},
        {"config_key": "LINUX_CPU_LIMIT", "config_value": 50},
        {"config_key": "SYNC_EXCLUDE_PATH", "config_value": ""}]})
    assert [c.text for c in rules.consistency_dirs] == ["/etc", "/var/lib"]
    assert rules.cpu_limit == 50 and rules.sync_exclude == ()
    assert not rules.for_round("full").includes(p("/x"))


@pytest.mark.parametrize("bad,match", [
    ({"configs": []}, "expected"),
    (body(("EXCLUDE_PATH", "/a")), "unknown config_key 'EXCLUDE_PATH'"),
    (body(("EXCLUDE_MIGRATE_PATH", "var/log")), "EXCLUDE_MIGRATE_PATH.*not an absolute path"),
    (body(("EXCLUDE_MIGRATE_PATH", "/a/../etc")), r"contains '\.\.'"),
    (body(("EXCLUDE_MIGRATE_PATH", "/")), "whole tree"),
    (body(("ONLY_SYNC_PATH", ["/a"])), "must be a string"),
    (body(("ONLY_SYNC_PATH", "/a" * 600)), "at most 1024"),
    (body(("LINUX_CPU_LIMIT", "lots")), "LINUX_CPU_LIMIT"),
    ({"configurations": ["EXCLUDE_MIGRATE_PATH=/a"]}, r"configurations\[0\]"),
])
def test_bad_configurations_name_the_problem(bad, match):
    with pytest.raises(ConfigError, match=match):
        PathRules.from_configurations(bad)


def test_a_value_with_a_lone_surrogate_is_a_config_error():
    from smsrepl.errors import ConfigError
    from smsrepl.files.rules import PathRules

    body = {"configurations": [{"config_key": "EXCLUDE_MIGRATE_PATH", "config_value": "/tmp/\udbe0x"}]}
    with pytest.raises(ConfigError, match="not valid Unicode"):
        PathRules.from_configurations(body)
