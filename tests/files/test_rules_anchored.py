"""Host-absolute path rules (issue 24): a rule naming a path under SRC_DIR is that path; rules
that match nothing are reported."""
import os

import pytest

from smsrepl.errors import ConfigError
from smsrepl.files.local import sync_tree
from smsrepl.files.rules import PathRules, RoundFilter, unmatched_note
from smsrepl.files.scan import walk


def body(*pairs):
    return {"configurations": [{"config_key": k, "config_value": v} for k, v in pairs]}


def p(path: str) -> tuple[bytes, ...]:
    return tuple(c.encode() for c in path.strip("/").split("/") if c)


@pytest.fixture
def srv(tmp_path):
    """A source directory standing for a host's /srv: cache/, data/db/, etc/."""
    root = tmp_path / "srv"
    for d in ("cache/tmp", "data/db", "data/logs", "etc"):
        (root / d).mkdir(parents=True)
    (root / "cache/tmp/junk").write_text("junk")
    (root / "data/db/t1").write_text("t1")
    (root / "data/logs/l1").write_text("l1")
    (root / "etc/conf").write_text("conf")
    return root


def test_a_rule_naming_a_path_under_src_dir_is_that_path(srv):
    rules = PathRules.from_configurations(body(("EXCLUDE_MIGRATE_PATH", f"{srv}/cache, /etc")))
    before = rules.for_round("full")
    assert before.includes(p("cache/tmp/junk"))  # today's reading: <srv><srv>/cache, which is not there
    f = rules.anchored(str(srv)).for_round("full")
    assert not f.includes(p("cache")) and not f.includes(p("cache/tmp/junk"))
    assert not f.includes(p("etc/conf"))  # a rule relative to SRC_DIR still works
    assert f.includes(p("data/db/t1")) and f.includes(p("cachex"))
    # text and key kept for messages; parts relative to SRC_DIR
    a = rules.anchored(str(srv)).migrate_exclude[0]
    assert (a.text, a.key, a.parts, a.relative) == (f"{srv}/cache", "EXCLUDE_MIGRATE_PATH", (b"cache",), "/cache")


def test_globs_in_the_leading_components_match_src_dirs_own_components(srv, tmp_path):
    parent = str(tmp_path)
    rules = PathRules.from_configurations(body(
        ("SYNC_EXCLUDE_PATH", f"{parent}/s?v/cache"),  # a glob standing for 'srv'
        ("SYNC_EXCLUDE_DIR", f"{parent}/[st]rv/data/*/t1"),
        ("SYNC_EXCLUDE_PATH", f"{parent}/x*/etc"),  # does not match 'srv': relative, as before
        ("ONLY_SYNC_PATH", "/**/db")))  # ** never stands for SRC_DIR's components
    a = rules.anchored(str(srv))
    assert [x.parts for x in a.sync_exclude] == [(b"cache",), (b"data", b"*", b"t1"),
                                                 p(f"{parent}/x*/etc")]
    assert a.only_sync[0].parts == (b"**", b"db")
    deep = "/" + "/".join(["**"] * len(p(str(srv)))) + "/cache"  # as long as SRC_DIR's path, all **
    assert PathRules.from_configurations(body(("EXCLUDE_MIGRATE_PATH", deep))).anchored(str(srv)).migrate_exclude[
        0].parts == p(deep)
    f = a.for_round("sync")
    assert not f.includes(p("cache/tmp")) and not f.includes(p("data/db/t1"))
    assert f.includes(p("data/db")) and f.includes(p("data/db/t2"))


def test_a_rule_naming_src_dir_itself(srv):
    with pytest.raises(ConfigError) as exc:
        PathRules.from_configurations(body(("MIGRATE_EXCLUDE_DIR", f"/etc,{srv}"))).anchored(str(srv))
    msg = str(exc.value)
    assert "\n" not in msg and "MIGRATE_EXCLUDE_DIR" in msg and repr(str(srv)) in msg and "everything" in msg
    with pytest.raises(ConfigError, match="SYNC_EXCLUDE_PATH"):
        PathRules.from_configurations(body(("SYNC_EXCLUDE_PATH", f"{srv}/"))).anchored(str(srv))
    # ONLY_SYNC and CONSISTENCY_DIR: the whole tree
    a = PathRules.from_configurations(body(("ONLY_SYNC_PATH", f"{srv}, /nothing"),
                                           ("CONSISTENCY_DIR", f"{srv},{srv}/data"))).anchored(str(srv))
    sync = a.for_round("sync")
    assert sync.includes(p("etc/conf")) and sync.includes(p("data")) and sync.descend(p("cache"))
    assert [c.relative for c in a.consistency_dirs] == ["/", "/data"]
    assert [c.text for c in a.consistency_dirs] == [str(srv), f"{srv}/data"]


def test_src_dir_with_a_trailing_slash_or_through_a_symlink(srv, tmp_path):
    os.symlink(srv, tmp_path / "link")
    rules = PathRules.from_configurations(body(("EXCLUDE_MIGRATE_PATH", f"{srv}/cache"),
                                               ("SYNC_EXCLUDE_PATH", f"{tmp_path}/link/etc")))
    # the real path names SRC_DIR however it is given; the link's path, where it is given so
    for given in (f"{srv}/", f"{tmp_path}/./srv", f"{tmp_path}/link", f"{tmp_path}/link/"):
        a = rules.anchored(given)
        assert a.migrate_exclude[0].parts == (b"cache",), given
        assert a.sync_exclude[0].parts == ((b"etc",) if "link" in given else p(f"{tmp_path}/link/etc")), given


def test_src_dir_slash_changes_nothing_and_anchoring_twice_is_anchoring_once(srv):
    rules = PathRules.from_configurations(body(("EXCLUDE_MIGRATE_PATH", f"{srv}/cache,/etc"),
                                               ("ONLY_SYNC_PATH", f"{srv}/data")))
    assert rules.anchored("/") is rules
    once = rules.anchored(str(srv))
    assert once.anchored(str(srv)) == once and once.anchored(os.fsencode(srv)) == once
    assert [x.parts for x in once.migrate_exclude] == [(b"cache",), (b"etc",)]
    assert once.only_sync[0].parts == (b"data",)


def test_the_filter_notes_which_rules_matched_what_it_was_asked_about(srv):
    rules = PathRules.from_configurations(body(
        ("EXCLUDE_MIGRATE_PATH", f"{srv}/cache, {srv}/cach, /cache/tmp"),  # a typo; one below an excluded dir
        ("SYNC_EXCLUDE_PATH", "/data/logs"),
        ("ONLY_SYNC_PATH", "/data, /data/db, /dta"))).anchored(str(srv))
    full = rules.for_round("full")
    assert full.unmatched() == [("EXCLUDE_MIGRATE_PATH", f"{srv}/cache"), ("EXCLUDE_MIGRATE_PATH", f"{srv}/cach"),
                                ("EXCLUDE_MIGRATE_PATH", "/cache/tmp")]  # nothing asked yet
    paths = [e.path for e in walk(str(srv), full)]
    assert b"cache" not in paths and b"etc/conf" in paths
    assert full.unmatched() == [("EXCLUDE_MIGRATE_PATH", f"{srv}/cach")]
    sync = rules.for_round("sync")
    list(walk(str(srv), sync, implied=True))
    # /data and /data/db both cover data/db/t1: both matched, not only the first
    assert sync.unmatched() == [("EXCLUDE_MIGRATE_PATH", f"{srv}/cach"), ("ONLY_SYNC_PATH", "/dta")]
    # what a filter was asked is no part of what it is
    assert sync == rules.for_round("sync") and hash(sync) == hash(rules.for_round("sync"))
    assert unmatched_note("ONLY_SYNC_PATH", "/dta", str(srv)) == f"ONLY_SYNC_PATH '/dta' matched nothing under {srv}"


def test_a_filter_built_from_patterns_directly_still_reports(srv):
    from smsrepl.files.rules import Pattern

    f = RoundFilter((Pattern.parse("/etc", "t"),), ())
    f.includes(p("data"))
    assert f.unmatched() == [("", "/etc")]
    f.includes(p("etc/conf"))
    assert f.unmatched() == []


@pytest.mark.parametrize("checksum", [False, True])  # a directory at a time, and an entry at a time
def test_local_sync_honours_host_paths_and_lists_unmatched_rules(srv, tmp_path, checksum):
    dst = tmp_path / "dst"
    rules = PathRules.from_configurations(body(("EXCLUDE_MIGRATE_PATH", f"{srv}/cache, {srv}/cach")))
    stats = sync_tree(str(srv), str(dst), rules=rules, checksum=checksum)
    assert not (dst / "cache").exists() and (dst / "data/db/t1").read_text() == "t1"
    assert stats.unmatched_rules == [("EXCLUDE_MIGRATE_PATH", f"{srv}/cach")]
    # a sync round: excluded content the target has is neither replaced nor deleted
    (dst / "cache").mkdir()
    (dst / "cache/mine").write_text("target's own")
    stats = sync_tree(str(srv), str(dst), rules=rules, kind="sync", checksum=checksum)
    assert (dst / "cache/mine").read_text() == "target's own" and not (dst / "cache/tmp").exists()
    assert stats.unmatched_rules == [("EXCLUDE_MIGRATE_PATH", f"{srv}/cach")]
    assert sync_tree(str(srv), str(dst), checksum=checksum).unmatched_rules == []  # no rules, nothing to say
