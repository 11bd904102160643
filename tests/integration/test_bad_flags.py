"""Every option of every subcommand, fed a bad value: one line on stderr naming the option or the
value, exit 2, no traceback, nothing written. The table of bad values must cover every option the
parser has (a new option without a case here fails test_the_table_covers_every_option), and every
option must have a help text.

File options get a missing file, a directory, malformed content and an unreadable file (as root,
"unreadable" needs the process without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH: the CLI runs with them
dropped from its bounding set, so root's mode-000 file is refused as for any user)."""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import os
import subprocess
import sys

import pytest

from smsrepl.cli.parser import build_parser
from smsrepl.cli.flags import subcommands

CLI = [sys.executable, "-m", "smsrepl"]

# placeholders, expanded in the workspace {w}
MISSING = "{w}/no-such-dir/nope.json"
A_DIR = "{w}/adir"
A_FILE = "{w}/afile"
MALFORMED = "{w}/malformed.json"
EMPTY = "{w}/empty"
UNREADABLE = "{w}/unreadable"  # mode 000
UNWRITABLE = "{w}/readonly/sub"  # under a mode 0500 directory
CK = "{w}/ck/certkey.json"


@dataclasses.dataclass(frozen=True)
class Bad:
    value: str
    expect: str | None = None  # a fragment the line must hold besides the option or the value
    set: tuple = ()  # (option, value) pairs added to or replacing the base arguments
    drop: tuple = ()  # options or positional names removed from the base arguments
    code: str | None = None  # the SMS code the line must begin with
    exit: int = 2

    @property
    def privileged_read(self) -> bool:
        return "{w}/unreadable" in self.value or "{w}/readonly" in self.value


def file_cases(*, content=True, code=None):
    out = [Bad(MISSING, code=code), Bad(A_DIR, code=code), Bad(UNREADABLE, code=code)]
    if content:
        out.append(Bad(MALFORMED, code=code))
    return out


CERTKEY = file_cases(code="SMS.3301")
PASSPHRASE = [Bad(MISSING, code="SMS.3301"), Bad(A_DIR, code="SMS.3301"), Bad(UNREADABLE, code="SMS.3301"),
              Bad(EMPTY, code="SMS.3301")]
TO = [Bad("8912", expect="HOST:PORT"), Bad("127.0.0.1:x"), Bad("127.0.0.1:0"), Bad("127.0.0.1:65536"), Bad(":8900")]
CONFIG = file_cases() + [Bad("{w}/config-extra.json", expect="'colour'"),
                         Bad("{w}/config-unknown-key.json", expect="NO_SUCH_KEY")]
SPEED = file_cases() + [Bad("{w}/speed-bad.json")]
LEVEL = [Bad("x"), Bad("99"), Bad("-1")]
STREAMS = [Bad("x", expect="1 to 16"), Bad("0", expect="1 to 16"), Bad("17", expect="1 to 16")]
INTERVAL = [Bad("x", set=(("--continuous", None),)), Bad("-1", set=(("--continuous", None),)),
            Bad("nan", set=(("--continuous", None),)), Bad("5")]  # the last: without --continuous
FREEZE_TIMEOUT = [Bad("x", set=(("--continuous", None), ("--freeze", None))),
                  Bad("0", set=(("--continuous", None), ("--freeze", None)))]
STATE_DIR = [Bad(A_FILE), Bad(UNWRITABLE)]
REMOTE = (("--to", "127.0.0.1:1"), ("--target", "disk0"), ("--certkey", CK))

BASE = {
    "certs init": {"outdir": "{w}/new-bundle"},
    "receive": {"--listen": "127.0.0.1:0", "--certkey": CK, "--target": "d={w}/rx-target.img",
                "--state-dir": "{w}/rx-state", "--once": None},
    "send files": {"source": "{w}/srcdir", "--to": "127.0.0.1:1", "--target": "tree", "--certkey": CK,
                   "--state-dir": "{w}/tx-state"},
    "send block": {"source": "{w}/src.img", "--to": "127.0.0.1:1", "--target": "disk0", "--certkey": CK,
                   "--state-dir": "{w}/tx-state"},
    "netcheck": {"--to": "127.0.0.1:1", "--certkey": CK},
    "status": {"--to": "127.0.0.1:1", "--certkey": CK},
    "verify block": {"source": "{w}/src.img", "target_path": "{w}/tgt.img"},
    "verify files": {"source": "{w}/srcdir", "target_path": "{w}/tgtdir"},
    "agent": {"--endpoint": "https://127.0.0.1:1", "--token-file": "{w}/token", "--source-id": "src-1",
              "--disk": "/dev/vda={w}/src.img", "--state-dir": "{w}/agent-state"},
    "demo": {},
}

BAD: dict[str, list[Bad]] = {
    "certs init outdir": [Bad(A_FILE), Bad(UNWRITABLE), Bad("{w}/ck", expect="already exists")],
    "certs init --passphrase-file": PASSPHRASE,
    "receive --listen": [Bad("127.0.0.1:99999"), Bad("127.0.0.1:x"), Bad("host:"), Bad(""),
                         Bad("192.0.2.1:0", expect="cannot listen")],
    "receive --certkey": CERTKEY,
    "receive --passphrase-file": PASSPHRASE,
    "receive --target": [Bad("noequals", expect="NAME=PATH"), Bad("bad/name={w}/x.img"), Bad("=x")],
    "receive --root": [Bad(MISSING, drop=("--target",)), Bad(A_FILE, drop=("--target",)),
                       Bad(A_DIR)],  # the last: with --target too
    "receive --state-dir": STATE_DIR,
    "receive --checkpoint-seconds": [Bad("x"), Bad("0"), Bad("-1"), Bad("inf")],
    "send files source": [Bad(MISSING), Bad(A_FILE)],
    "send files --to": TO,
    "send files --target": [Bad("bad/name"), Bad("")],
    "send files --certkey": CERTKEY,
    "send files --passphrase-file": PASSPHRASE,
    "send files --state-dir": STATE_DIR,
    "send files --config": CONFIG,
    "send files --level": LEVEL,
    "send files --streams": STREAMS,
    "send files --speed-limit": SPEED,
    "send files --progress": [Bad("nope")],
    "send files --interval": INTERVAL,
    "send files --journal": [Bad("nope", set=(("--continuous", None),)), Bad("off")],
    "send files --max-delete": [Bad("x"), Bad("-2"), Bad("1.5")],
    "send files --whole-tree-every": [Bad("x", set=(("--continuous", None),)),
                                      Bad("-1", set=(("--continuous", None),)), Bad("3")],
    "send block source": [Bad(MISSING, code="SMS.1901"), Bad(A_DIR, code="SMS.1901")],
    "send block --to": TO,
    "send block --target": [Bad("bad/name"), Bad("")],
    "send block --certkey": CERTKEY,
    "send block --passphrase-file": PASSPHRASE,
    "send block --state-dir": STATE_DIR,
    "send block --progress": [Bad("nope")],
    "send block --speed-limit": SPEED,
    "send block --config": file_cases() + [Bad("{w}/config-extra.json", expect="'colour'"),
                                           Bad("{w}/config-unknown-key.json", expect="NO_SUCH_KEY"),
                                           Bad("{w}/config-files-only.json", expect="file-level")],
    "send block --level": LEVEL,
    "send block --streams": STREAMS,
    "send block --dirty-map": [Bad(A_DIR), Bad(MALFORMED), Bad(UNREADABLE), Bad(MISSING)],
    "send block --interval": INTERVAL,
    "send block --tracking": [Bad("nope", set=(("--continuous", None),)), Bad("scan")],
    "send block --freeze-timeout": FREEZE_TIMEOUT,
    "status --to": TO,
    "status --certkey": CERTKEY,
    "status --passphrase-file": PASSPHRASE,
    "receive --log-file": [Bad("{w}/no-such-dir/rx.log", expect="cannot be opened"), Bad(A_DIR)],
    "receive --log-format": [Bad("xml")],
    "netcheck --to": TO,
    "netcheck --certkey": CERTKEY,
    "netcheck --passphrase-file": PASSPHRASE,
    "netcheck --seconds": [Bad("x"), Bad("0.1"), Bad("601")],
    "netcheck --streams": STREAMS,
    "verify block source": [Bad(MISSING, expect="source"), Bad(A_DIR, expect="source")],
    "verify block target_path": [Bad(MISSING, expect="target"), Bad(A_DIR, expect="target")],
    "verify block --to": [Bad("8912", set=REMOTE[1:], drop=("target_path",)), Bad("127.0.0.1:1")],
    "verify block --target": [Bad("bad/name", set=REMOTE[:1] + REMOTE[2:], drop=("target_path",))],
    "verify block --certkey": [Bad(v.value, code=v.code, set=REMOTE[:2], drop=("target_path",)) for v in CERTKEY],
    "verify block --passphrase-file": [Bad(v.value, code=v.code, set=REMOTE, drop=("target_path",))
                                       for v in PASSPHRASE],
    "verify block --progress": [Bad("nope"), Bad("JSON")],
    "verify files source": [Bad(MISSING, expect="source"), Bad(A_FILE, expect="source")],
    "verify files target_path": [Bad(MISSING, expect="target"), Bad(A_FILE, expect="target")],
    "verify files --to": [Bad("8912", set=REMOTE[1:], drop=("target_path",)), Bad("127.0.0.1:1")],
    "verify files --target": [Bad("bad/name", set=REMOTE[:1] + REMOTE[2:], drop=("target_path",))],
    "verify files --certkey": [Bad(v.value, code=v.code, set=REMOTE[:2], drop=("target_path",)) for v in CERTKEY],
    "verify files --passphrase-file": [Bad(v.value, code=v.code, set=REMOTE, drop=("target_path",))
                                       for v in PASSPHRASE],
    "verify files --dir-check": [Bad("relative/path"), Bad("/a/../b")],
    "verify files --config": CONFIG,
    "verify files --compare": [Bad("content"), Bad("")],
    "verify files --progress": [Bad("nope")],
    "agent --endpoint": [Bad("http://127.0.0.1:1"), Bad("nope"), Bad("https://")],
    "agent --token-file": [Bad(MISSING), Bad(A_DIR), Bad(UNREADABLE), Bad(EMPTY)],
    "agent --source-id": [Bad(""), Bad("a/b")],
    "agent --task-id": [Bad(""), Bad("a/b")],
    "agent --disk": [Bad("noequals", expect="NAME=PATH"), Bad("/dev/vda={w}/missing.img"),
                     Bad("/dev/vda=" + A_DIR)],
    "agent --tree": [Bad(MISSING), Bad(A_FILE)],
    "agent --tree-target": [Bad("bad/name", set=(("--tree", "{w}/srcdir"),))],
    "agent --ca-file": file_cases(),
    "agent --data-port": [Bad("x"), Bad("0"), Bad("65536")],
    "agent --host": [Bad("")],
    "agent --state-dir": STATE_DIR,
    "agent --poll-interval": [Bad("x"), Bad("0"), Bad("-1")],
    "agent --sync-interval": [Bad("x"), Bad("-1")],
    "agent --tracking": [Bad("nope")],
    "agent --streams": STREAMS,
    "agent --freeze-timeout": [Bad("x"), Bad("0")],
    "demo --size-mib": [Bad("x"), Bad("0"), Bad("-5")],
}

#: actions that take no value: nothing to get wrong
_SWITCHES = (argparse._HelpAction, argparse._VersionAction, argparse._StoreTrueAction,
             argparse._StoreFalseAction, argparse._StoreConstAction, argparse._CountAction)


def _name(action: argparse.Action) -> str:
    return max(action.option_strings, key=len) if action.option_strings else action.dest


def _leaves():
    for leaf in subcommands(build_parser()):
        yield leaf.prog.removeprefix("smsrepl "), leaf


def _value_options() -> set[str]:
    return {f"{cmd} {_name(a)}" for cmd, leaf in _leaves() for a in leaf._actions if not isinstance(a, _SWITCHES)}


def test_the_table_covers_every_option():
    options = _value_options()
    assert not options - BAD.keys(), f"options without a bad-value case here: {sorted(options - BAD.keys())}"
    assert not BAD.keys() - options, f"cases for options the parser does not have: {sorted(BAD.keys() - options)}"
    assert {cmd for cmd, _ in _leaves()} == BASE.keys()


def _parsers(parser):
    """Every parser: the top one, the groups (send, verify, certs) and the subcommands."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                yield from _parsers(sub)


def test_every_option_has_help():
    missing = [f"{parser.prog} {_name(a)}" for parser in _parsers(build_parser()) for a in parser._actions
               if not (a.help or "").strip()]
    assert not missing, f"options without help text: {missing}"


# -- the workspace ------------------------------------------------------------------
@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from smsrepl.lab.certs import make_bundle, write_certkey
    from smsrepl.lab.testdata import write_image

    w = tmp_path_factory.mktemp("flags")
    write_certkey(w / "ck", make_bundle())
    write_image(str(w / "src.img"), 1 << 20, seed=1)
    write_image(str(w / "tgt.img"), 1 << 20, seed=1)
    for d in ("srcdir", "tgtdir", "adir"):
        (w / d).mkdir()
    (w / "srcdir" / "a.txt").write_text("a\n")
    (w / "tgtdir" / "a.txt").write_text("a\n")
    (w / "afile").write_text("not a directory\n")
    (w / "malformed.json").write_text("{not json\n")
    (w / "empty").write_text("")
    (w / "token").write_text("a-token\n")
    (w / "unreadable").write_text('{"configurations": []}\n')
    os.chmod(w / "unreadable", 0)
    (w / "readonly").mkdir()
    os.chmod(w / "readonly", 0o500)
    item = {"config_key": "EXCLUDE_MIGRATE_PATH", "config_value": "/tmp"}
    (w / "config-extra.json").write_text(json.dumps({"configurations": [{**item, "colour": "red"}]}))
    (w / "config-unknown-key.json").write_text(json.dumps({"configurations": [{**item, "config_key": "NO_SUCH_KEY"}]}))
    (w / "config-files-only.json").write_text(json.dumps({"configurations": [item]}))
    (w / "speed-bad.json").write_text(json.dumps({"speed_limit": [{"start": "25:00", "end": "26:00", "speed": 5}]}))
    return w


def _snapshot(root) -> dict:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            out[os.path.join(dirpath, name)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def _argv(cmd: str, option: str, bad: Bad, w: str) -> tuple[list[str], str]:
    args = dict(BASE[cmd])
    for name in bad.drop:
        args.pop(name)
    args.update(dict(bad.set))
    value = bad.value.format(w=w)
    args[option] = value
    argv = list(CLI) + cmd.split()
    for name, v in args.items():
        if v is not None:
            v = v.format(w=w)
        if not name.startswith("-"):
            argv.append(v)
        elif v is None:
            argv.append(name)
        else:
            argv.append(f"{name}={v}")  # '=' keeps an empty or '-'-led value a value
    return argv, value


def _drop_dac_capabilities() -> None:
    """preexec_fn: root without the capabilities that bypass file modes (the bounding set limits
    what the exec'ed program gets)."""
    libc = ctypes.CDLL(None, use_errno=True)
    PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


CASES = [(key, bad) for key, bads in BAD.items() for bad in bads]


@pytest.mark.parametrize("key,bad", CASES, ids=[f"{k} {b.value.replace('{w}/', '')}" for k, b in CASES])
def test_a_bad_value_is_one_line_and_exit_2(work, tmp_path, key, bad):
    cmd, option = key.rsplit(" ", 1)
    argv, value = _argv(cmd, option, bad, str(work))
    before = _snapshot(work)
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state-home")}
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL,
                        preexec_fn=_drop_dac_capabilities if bad.privileged_read and os.geteuid() == 0 else None)
    lines = cp.stderr.splitlines()
    assert "Traceback" not in cp.stderr, cp.stderr
    assert cp.returncode == bad.exit, (argv, cp.stderr)
    assert len(lines) == 1, cp.stderr
    line = lines[0]
    named = (option.startswith("-") and option in line) or (value and value in line)
    assert named, f"neither {option} nor {value!r} named: {line}"
    if bad.expect:
        assert bad.expect in line, line
    if bad.code:
        assert line.startswith(bad.code + ":"), line
    assert cp.stdout == ""
    assert _snapshot(work) == before, "the workspace changed"
