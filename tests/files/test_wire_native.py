"""The C copy of the record layout (_native/fstree.h, fstree_record.c, fstree_scan.c) against files/wire.py.

The file-tree kernels write and parse entry records by hand (offsets, field widths, kind codes, the FILE
opcode); nothing ties those numbers to wire.py but these tests. The first ones read the C
text, so they run on either backend; the last one runs the native scan."""
from __future__ import annotations

import os
import re
import stat
import struct
from pathlib import Path

import pytest

from smsrepl import kernels
from smsrepl.files import wire as W
from smsrepl.files.scan import walk

NATIVE = Path(__file__).resolve().parents[2] / "src" / "smsrepl" / "_native"
#: the fields of an entry record's head, in wire.py's order (its docstring and Reader.entry)
FIELDS = ("kind", "mode", "uid", "gid", "size", "mtime_ns", "rdev", "nlink", "plen", "llen", "xlen", "has_digest")
#: kind_of()'s file types and wire.py's kind names
S_IF = {"REG": "file", "DIR": "dir", "LNK": "symlink", "CHR": "chardev", "BLK": "blockdev", "IFO": "fifo",
        "SOCK": "socket"}


def _source(name: str) -> str:
    return (NATIVE / name).read_text()


def _defines(text: str) -> dict[str, int]:
    pattern = r"^#define\s+(\w+)\s+(\d+|0x[0-9a-fA-F]+)\s*(?:/\*.*)?$"
    return {m[1]: int(m[2], 0) for m in re.finditer(pattern, text, re.M)}


def _function(text: str, signature: str) -> str:
    """The body of the C function whose definition starts with ``signature``."""
    start = text.index(signature)
    end = text.index("\n}\n", start)
    return text[start:end]


def _wire_head() -> list[tuple[str, int, int, bool]]:
    """(field, offset, width, signed) of each field of wire.py's record head."""
    codes = W._ENTRY.format.lstrip(">!")
    assert len(codes) == len(FIELDS), "wire.py's record head gained or lost a field: update FIELDS and fstree_record.c"
    return [(name, struct.calcsize(">" + codes[:i]), struct.calcsize(">" + c), c.islower())
            for i, (name, c) in enumerate(zip(FIELDS, codes))]


def test_record_head_size_and_file_opcode():
    h = _defines(_source("fstree.h"))
    assert h["SMS_REC_HEAD"] == W._ENTRY.size
    assert h["SMS_OP_FILE"] == W.FILE


def test_kind_codes():
    defs = _defines(_source("fstree.h"))
    kind_of = _function(_source("fstree_record.c"), "int sms_kind_of(")
    cases = {S_IF[m[1]]: int(defs.get(m[2], m[2]))
             for m in re.finditer(r"case S_IF(\w+):\s*return (\w+);", kind_of)}
    assert cases == W.KIND_CODES
    assert {k: defs[f"KIND_{k.upper()}"] for k in ("file", "dir", "symlink")} == \
        {k: W.KIND_CODES[k] for k in ("file", "dir", "symlink")}


def test_parse_rec_reads_the_fields_where_wire_puts_them():
    body = _function(_source("fstree_record.c"), "int sms_parse_rec(")
    got = {}
    for m in re.finditer(r"r->(\w+) = (\(int64_t\))?be(16|32|64)\(p \+ (\d+)\);", body):
        got[m[1]] = (int(m[4]), int(m[3]) // 8, bool(m[2]))
    for m in re.finditer(r"r->(\w+) = p\[(\d+)\]", body):
        got[m[1]] = (int(m[2]), 1, False)
    assert got == {name: (offset, width, signed) for name, offset, width, signed in _wire_head()}
    # the variable parts follow the head in wire.py's order, then a 16-byte digest
    assert re.search(r"SMS_REC_HEAD \+ \(size_t\)r->plen \+ r->llen \+ r->xlen \+ \(r->has_digest \? 16 : 0\)", body)
    assert re.search(r"r->path = p \+ SMS_REC_HEAD;\s*r->link = r->path \+ r->plen;\s*r->xattrs = r->link \+ r->llen;",
                     body)


def test_put_record_writes_the_fields_in_wire_order():
    body = _function(_source("fstree_record.c"), "int sms_put_record(")
    head = body[body.index("uint8_t *p = b->data + b->len;"):body.index("if (prelen)")]
    writes = [(1 if m[1] else int(m[2]) // 8, m[3])
              for m in re.finditer(r"(?:(\*p\+\+ =)|p = put(16|32|64)\(p,)([^;]*);", head)]
    assert [width for width, _ in writes] == [width for _, _, width, _ in _wire_head()]
    # and each value is the field's (has_digest: no digest in a scan)
    names = [name.replace("_ns", "") for name in FIELDS[:-1]] + [" 0"]
    assert all(name in value for name, (_, value) in zip(names, writes)), writes


def test_xattr_block_layout():
    """wire.py: u16 count, then per item (sorted by name) u16 name length, name, u32 value length, value."""
    c = _source("fstree_scan.c")
    body = c[c.index("qsort(names, count, sizeof *names, cmp_cstr);"):]
    body = body[:body.index("goto out;\n        }\n        if (errno != ERANGE")]
    assert re.search(r"xb->len = 2;.*put16\(xb->data, kept\);", body, re.S)  # the count, written last
    assert re.search(r"put16\(xb->data \+ xb->len, \(uint16_t\)nl\);\s*memcpy\(p, names\[i\], nl\);\s*"
                     r"p = put32\(p \+ nl, \(uint32_t\)vn\);\s*memcpy\(p, val, \(size_t\)vn\);", body)
    assert "return strcmp(" in _function(c, "static int cmp_cstr(")  # byte order, as sorted() in Python


# --- the native scan against the Python walk ----------------------------------------------

MTIME = 1_600_000_000_987_654_321


@pytest.mark.skipif(not kernels.TREE, reason="file-tree kernels are native only (pure backend)")
def test_native_scan_record_decodes_to_the_walk_entry(tmp_path):
    root = tmp_path / "t"
    root.mkdir()
    known = root / "known.txt"
    known.write_bytes(b"golden vector\n" * 3)
    os.chmod(known, 0o640)
    os.utime(known, ns=(MTIME, MTIME))
    os.link(known, root / "second")
    os.symlink(b"known.txt\xff", os.path.join(os.fsencode(root), b"link"))
    os.mkfifo(root / "fifo")
    if os.geteuid() == 0:  # CI runs as root: owner and group apart, so that a swap of the two shows
        os.chown(known, 1234, 5678)
        try:
            os.mknod(root / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        except OSError:
            pass  # no CAP_MKNOD here
    (root / "sub").mkdir()
    os.chmod(root / "sub", 0o2750)
    try:
        os.setxattr(known, "user.golden", b"\x00\x01v")
        os.setxattr(known, "user.Empty", b"")  # set last, sorted first
        xattrs = {b"user.golden": b"\x00\x01v", b"user.Empty": b""}
    except OSError:
        xattrs = {}  # a file system without user xattrs: records carry none, on both sides
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        records, names, kinds, ends, errors, sizes = kernels.scan_dir(fd, b"p", os.fsencode(root))
    finally:
        os.close(fd)
    assert errors == []
    r = W.Reader(records)
    native = []
    while not r.done():
        native.append(r.entry())
        assert r.pos == ends[len(native) - 1]
    expected = []
    for e in walk(root, xattrs=True):
        if e.path:
            e.path, e.dev, e.ino = b"p/" + e.path, 0, 0  # records carry neither dev nor ino
            e.xattrs = e.xattrs or {}
            expected.append((e, None))
    assert native == sorted(expected, key=lambda x: x[0].path)
    assert list(kinds) == [W.KIND_CODES[e.kind] for e, _ in native]
    entry = dict((e.path, e) for e, _ in native)[b"p/known.txt"]
    assert (entry.kind, entry.mode, entry.size, entry.mtime_ns, entry.nlink, entry.xattrs) == \
        ("file", 0o640, 42, MTIME, 2, xattrs)
