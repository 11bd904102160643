"""Golden records: fixed entries and operations of files/wire.py whose bytes are pinned, so the
layout of file sessions cannot drift silently (the fstree_*.c kernels write and reads the same records).

A deliberate format change updates these vectors together with the layout in wire.py,
fstree.h and fstree_record.c (see test_wire_native.py) and PROTOCOL_VERSION once a release has shipped.
"""
import pytest
import xxhash

from smsrepl.files import wire as W
from smsrepl.files.scan import Entry

MTIME = 1_700_000_000_123_456_789
DIGEST = bytes(range(0xA0, 0xB0))


def _entry(path, kind, mode=0o644, size=0, link=None, xattrs=None, rdev=0, nlink=1, mtime=MTIME):
    # dev and ino are 0: records do not carry them; no xattrs decodes as {}
    return Entry(path, kind, mode, 1000, 1001, size, mtime, 0, 0, nlink, rdev, link, xattrs or {})


#: name -> (entry, digest): every kind, and each variable part (link, xattrs, digest) present and absent
ENTRIES = {
    "file": (_entry(b"dir/file.txt", "file", size=12345), None),
    "file.digest": (_entry(b"big.bin", "file", mode=0o600, size=1 << 33, nlink=2), DIGEST),
    "file.xattrs": (_entry(b"x", "file", size=3, xattrs={b"user.b": b"2", b"user.a": b"", b"security.selinux":
                                                          b"system_u:object_r:etc_t:s0\0"}), None),
    "dir": (_entry(b"dir", "dir", mode=0o2775, nlink=3), None),
    "root": (_entry(b"", "dir", mode=0o755, mtime=0), None),
    "symlink": (_entry(b"dir/link", "symlink", mode=0o777, size=9, link=b"../t\xffrget"), None),
    "symlink.empty-link": (_entry(b"empty", "symlink", mode=0o777, link=b""), None),
    "chardev": (_entry(b"dev/null", "chardev", mode=0o666, rdev=0x103), None),
    "blockdev": (_entry(b"dev/sda1", "blockdev", mode=0o660, rdev=0x801), None),
    "fifo": (_entry(b"run/pipe", "fifo", mode=0o4755), None),
    "socket": (_entry(b"run/sock", "socket", mode=0o7777, mtime=-1_000_000_001), None),
}

GOLDEN_ENTRIES = {
    "file": (62, "ad66e41927236f81"),
    "file.digest": (73, "649137c42efeaf65"),
    "file.xattrs": (127, "f5268c41924b6176"),
    "dir": (53, "e9d88208369b87d1"),
    "root": (50, "40dcd56950ac811e"),
    "symlink": (67, "3b565055e5241881"),
    "symlink.empty-link": (55, "924d691208477e10"),
    "chardev": (58, "92206ae1d2cbb524"),
    "blockdev": (58, "552559eabb5d87ed"),
    "fifo": (58, "b99baec804b089f3"),
    "socket": (58, "f106d9b8823b9043"),
}

#: one record spelled out field by field: the layout of the module's docstring, independent of its code
SPELLED = ("file.xattrs", bytes.fromhex(
    "01"  # kind: file
    "000001a4"  # mode 0644
    "000003e8"  # uid 1000
    "000003e9"  # gid 1001
    "0000000000000003"  # size 3
    "17979cfe3d85cd15"  # mtime_ns 1_700_000_000_123_456_789
    "0000000000000000"  # rdev
    "00000001"  # nlink
    "0001"  # path length
    "0000"  # link length
    "0000004c"  # xattr bytes (76)
    "00"  # has digest: no
    "78"  # path b"x"
    "0003"  # xattrs: 3 items, sorted by name
    "0010" "73656375726974792e73656c696e7578" "0000001b" "73797374656d5f753a6f626a6563745f723a6574635f743a733000"
    "0006" "757365722e61" "00000000"
    "0006" "757365722e62" "00000001" "32"
))


def _pin(data: bytes) -> tuple[int, str]:
    return len(data), xxhash.xxh3_64_hexdigest(data)


def test_every_kind_has_a_golden_record():
    assert {e.kind for e, _ in ENTRIES.values()} == set(W.KIND_CODES)
    assert set(GOLDEN_ENTRIES) == set(ENTRIES)


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_entry_record_bytes_are_pinned(name):
    entry, digest = ENTRIES[name]
    assert _pin(W.encode_entry(entry, digest)) == GOLDEN_ENTRIES[name]


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_entry_record_decodes_to_its_entry(name):
    entry, digest = ENTRIES[name]
    r = W.Reader(W.encode_entry(entry, digest))
    assert r.entry() == (entry, digest)
    assert r.done()


def test_a_record_spelled_out_field_by_field():
    name, spelled = SPELLED
    entry, digest = ENTRIES[name]
    assert W._ENTRY.size == 50
    assert W.encode_entry(entry, digest) == spelled
    assert W.Reader(spelled).entry() == (entry, None)


# --- operations ----------------------------------------------------------------------------

_FILE = ENTRIES["file.xattrs"][0]
_BIG = _entry(b"big.bin", "file", size=10 << 20)

#: name -> (encode_op arguments, what decode_op gives back)
OPS = {
    "ROOT": ((W.ROOT, ENTRIES["root"][0]), (ENTRIES["root"][0], None)),
    "DIR": ((W.DIR, ENTRIES["dir"][0]), (ENTRIES["dir"][0], None)),
    "FILE": ((W.FILE, _FILE, b"abc"), (_FILE, b"abc")),
    "FILE.empty": ((W.FILE, _entry(b"e", "file")), (_entry(b"e", "file"), b"")),
    "SYMLINK": ((W.SYMLINK, ENTRIES["symlink"][0]), (ENTRIES["symlink"][0], None)),
    "SPECIAL": ((W.SPECIAL, ENTRIES["chardev"][0]), (ENTRIES["chardev"][0], None)),
    "META": ((W.META, ENTRIES["dir"][0]), (ENTRIES["dir"][0], None)),
    "BEGIN": ((W.BEGIN, _BIG), (_BIG, None)),
    "CHUNK": ((W.CHUNK, None, bytes(range(256)) * 3), (None, bytes(range(256)) * 3)),
    "END": ((W.END, None, DIGEST), (None, DIGEST)),
    "HARDLINK": ((W.HARDLINK, _entry(b"a/second", "file", size=5, nlink=2), b"", b"b/first\xff"),
                 (_entry(b"a/second", "file", size=5, nlink=2), b"b/first\xff")),
    "DELETE": ((W.DELETE, None, b"", b"old/name"), (None, b"old/name")),
    "ABORT": ((W.ABORT,), (None, None)),
    "DELTA": ((W.DELTA, _BIG, b"", b"", 131072), (_BIG, 131072)),
    "COPY": ((W.COPY, None, b"", b"", 0, 7, (1 << 40) + 3), (None, (7, (1 << 40) + 3))),
}

GOLDEN_OPS = {
    "ROOT": (51, "7d4c90c23bfe7ceb"),
    "DIR": (54, "cbc876078f4be584"),
    "FILE": (131, "5b3b36df02b7988a"),
    "FILE.empty": (52, "b10951c9f07a7cdc"),
    "SYMLINK": (68, "c44c4279624197b8"),
    "SPECIAL": (59, "7b0f1b17b8cc7014"),
    "META": (54, "243da8bb9fa79367"),
    "BEGIN": (58, "850a58281c759e0c"),
    "CHUNK": (773, "abaf6f0d1686fbe8"),
    "END": (17, "24f31e1e49ad42e5"),
    "HARDLINK": (69, "35c4b148a8ea2252"),
    "DELETE": (11, "6334081460d9c57e"),
    "ABORT": (1, "2661bf6ff51a634a"),
    "DELTA": (62, "c8beddb99c38188e"),
    "COPY": (17, "54da792ebe87310b"),
}


def _op_bytes(name: str) -> bytes:
    return b"".join(bytes(b) for b in W.encode_op(*OPS[name][0]))


def test_every_opcode_has_a_golden_operation():
    assert {OPS[n][0][0] for n in OPS} == set(W.OP_NAMES)
    assert set(GOLDEN_OPS) == set(OPS)


@pytest.mark.parametrize("name", sorted(OPS))
def test_operation_bytes_are_pinned(name):
    assert _pin(_op_bytes(name)) == GOLDEN_OPS[name]


@pytest.mark.parametrize("name", sorted(OPS))
def test_operation_decodes_back(name):
    args, (entry, data) = OPS[name]
    r = W.Reader(_op_bytes(name))
    op, got_entry, got = W.decode_op(r)
    assert r.done()
    assert (op, got_entry) == (args[0], entry)
    assert (bytes(got) if isinstance(got, memoryview) else got) == data


def test_a_round_of_operations_decodes_in_order():
    names = sorted(OPS)
    body = b"".join(_op_bytes(n) for n in names)
    assert [op for op, _, _ in W.decode_ops(body)] == [OPS[n][0][0] for n in names]
