"""`smsrepl certs init`: an existing bundle is never replaced without --force (both hosts must hold
the same one), and two hosts holding bundles of different CAs are told so on both sides."""
import os
import subprocess

from smsrepl.lab.testdata import write_image

from .procs import CLI, ReceiverProc, send, sha256, wait_until

HINT = "the two hosts use different certkey bundles: copy the same certkey.json to both (smsrepl certs init once)"


def _init(outdir, *extra) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + ["certs", "init", str(outdir), *extra], capture_output=True, text=True, timeout=60)


def _state(directory) -> dict:
    """Every entry of ``directory``: bytes, mode, mtime and inode (a rename shows as a new inode)."""
    out = {}
    for entry in os.scandir(directory):
        st = entry.stat(follow_symlinks=False)
        data = open(entry.path, "rb").read() if entry.is_file() else None
        out[entry.name] = (data, st.st_mode, st.st_mtime_ns, st.st_ino)
    return out


def test_an_existing_bundle_is_not_replaced(tmp_path):
    assert _init(tmp_path / "ck").returncode == 0
    before = _state(tmp_path / "ck")
    cp = _init(tmp_path / "ck")
    assert cp.returncode == 2, cp.stderr
    lines = cp.stderr.splitlines()
    assert len(lines) == 1, cp.stderr
    assert lines[0].startswith("SMS.3301: ") and str(tmp_path / "ck" / "certkey.json") in lines[0], lines[0]
    assert "already exists" in lines[0] and "--force" in lines[0], lines[0]
    assert cp.stdout == ""
    assert _state(tmp_path / "ck") == before  # same bytes, mtime and inode; no temporary file left


def test_force_replaces_the_bundle_atomically(tmp_path):
    assert _init(tmp_path / "ck").returncode == 0
    (old_data, _, _, old_ino), = _state(tmp_path / "ck").values()
    cp = _init(tmp_path / "ck", "--force")
    assert cp.returncode == 0, cp.stderr
    state = _state(tmp_path / "ck")
    assert list(state) == ["certkey.json"]  # the temporary name is gone
    data, mode, _, ino = state["certkey.json"]
    assert data != old_data and b'"ca"' in data
    assert mode & 0o777 == 0o600
    assert ino != old_ino  # a new file renamed over the old one, never rewritten in place


def test_a_directory_named_certkey_json_is_refused_with_or_without_force(tmp_path):
    (tmp_path / "ck" / "certkey.json").mkdir(parents=True)
    (tmp_path / "ck" / "certkey.json" / "keep").write_text("x")
    before = _state(tmp_path / "ck")
    for extra in ((), ("--force",)):
        cp = _init(tmp_path / "ck", *extra)
        assert cp.returncode == 2, cp.stderr
        lines = cp.stderr.splitlines()
        assert len(lines) == 1 and "is a directory" in lines[0], cp.stderr
        assert str(tmp_path / "ck" / "certkey.json") in lines[0]
        assert _state(tmp_path / "ck") == before
    assert (tmp_path / "ck" / "certkey.json" / "keep").read_text() == "x"


def test_bundles_of_two_cas_say_so_on_both_hosts(tmp_path):
    assert _init(tmp_path / "host-a").returncode == 0
    assert _init(tmp_path / "host-b").returncode == 0
    source = str(tmp_path / "source.img")
    write_image(source, 1 << 20, seed=3)
    target = tmp_path / "target.img"
    rx = ReceiverProc(str(tmp_path / "host-a" / "certkey.json"), {"disk0": str(target)}, str(tmp_path / "rx"))
    try:
        cp = send(source, rx.address, str(tmp_path / "host-b" / "certkey.json"), str(tmp_path / "tx-b"))
        assert cp.returncode == 4, cp.stderr
        lines = cp.stderr.splitlines()
        assert len(lines) == 1, cp.stderr
        assert lines[0].startswith("SMS.0304: ") and HINT in lines[0], lines[0]
        assert "not issued by this bundle's CA" in lines[0], lines[0]
        assert wait_until(lambda: any(HINT in line for line in rx.log), 10), rx.log
        assert not target.exists() or not any(target.read_bytes())
        # the same bundle on both hosts: the copy goes through
        ok = send(source, rx.address, str(tmp_path / "host-a" / "certkey.json"), str(tmp_path / "tx-a"))
        assert ok.returncode == 0, ok.stderr
        assert sha256(source) == sha256(str(target))
    finally:
        rx.stop()
