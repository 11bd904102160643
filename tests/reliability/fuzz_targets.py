"""Parsers of untrusted input, each with its documented errors, seeds and a mutator.

Shared by the hypothesis tests of the default run, the long profile
(SMSREPL_FUZZ_INPUTS=N) and the atheris driver (atheris_fuzz.py). A target's
``parse(data)`` may raise only its ``allowed`` errors; anything else is a bug.
"""
from __future__ import annotations

import json
import os
import random
import struct
import tempfile
from dataclasses import dataclass
from typing import Callable

import numpy as np

from smsrepl import kernels
from smsrepl.blocks import manifest as M
from smsrepl.blocks.dirtymap import DirtyMap
from smsrepl.errors import ConfigError, ManifestError, RemoteProtocolError, ReplicationError
from smsrepl.files import wire as W
from smsrepl.files.rules import PathRules, parse_configuration_body
from smsrepl.protocol import NEED_DATA, RECEIVER, SENDER, Connection, ConnectionClosed
from smsrepl.protocol import frames as F
from smsrepl.protocol.writers import frame as _frame
from smsrepl.throttle import SpeedSchedule
from smsrepl.transport.certkey import CertKey


@dataclass
class Target:
    name: str
    parse: Callable[[bytes], None]
    allowed: tuple[type[BaseException], ...]
    seeds: list[bytes]
    #: repairs checksums after a mutation, so that inputs reach past the first check
    fixup: Callable[[bytes], bytes] | None = None


# --- frames and the state machine ------------------------------------------------------

def _wire(*events) -> bytes:
    return b"".join(bytes(p) for e in events for p in F.encode(e))


def _digests(data: bytes) -> np.ndarray:
    d = np.empty(max(1, -(-len(data) // 4096)), dtype="<u8")
    kernels.block_digests(data, 4096, d)
    return d


_HELLO = F.Hello([F.PROTOCOL_VERSION], "block", "disk0", "fuzz", 1 << 20, 4096, ["block-set"])
_WELCOME = F.Welcome(1, "fuzz", 1 << 20, "new", 0, "full", 0, "", capabilities=["block-set"])
_DATA = bytes(range(256)) * 16


def _sender_frames() -> list[bytes]:
    """Frames a sender sends after its HELLO, one per seed."""
    return [
        _wire(F.RoundBegin(1, "full", 0), F.BlockData(0, 4096, 0, _digests(_DATA), _DATA), F.RoundEnd(1)),
        _wire(F.RoundBegin(2, "sync", 0), F.BlockSet(8192, np.array([0, 3], dtype="<u4"), 0,
                                                     np.concatenate([_digests(_DATA)] * 2), _DATA * 2)),
        _wire(F.RoundBegin(1, "full", 0), F.ZeroRange(0, 65536), F.Scanned(65536)),
        _wire(F.ManifestRequest("coarse", 0, 4), F.Ping(7, 0)),
        _wire(F.Close("done")),
    ]


def _receiver_frames() -> list[bytes]:
    """Frames a receiver sends after its WELCOME, one per seed."""
    return [
        _wire(F.Checkpoint(1, 4096, 4096), F.RoundDone(1, "00" * 16)),
        _wire(F.ManifestData("fine", 0, np.arange(4, dtype="<u8"))),
        _wire(F.Pong(7, 0), F.Error("SMS.2007", "disk full", 3, True)),
    ]


def _feed(conn: Connection, data: bytes) -> None:
    conn.receive_data(data)
    conn.receive_data(b"")
    for _ in range(200):
        ev = conn.next_event()
        if ev is NEED_DATA or isinstance(ev, ConnectionClosed):
            return


def parse_at_receiver(data: bytes) -> None:
    """A receiver that has welcomed a sender, then reads ``data`` as the sender's frames."""
    conn = Connection(RECEIVER)
    conn.receive_data(_wire(_HELLO))
    conn.next_event()
    conn.send(_WELCOME)
    _feed(conn, data)


def parse_at_sender(data: bytes) -> None:
    """A sender that said HELLO and began a round, then reads ``data`` as the receiver's frames."""
    conn = Connection(SENDER)
    conn.send(_HELLO)
    conn.receive_data(_wire(_WELCOME))
    conn.next_event()
    conn.send(F.RoundBegin(1, "full", 0))
    _feed(conn, data)


def fix_frame_checks(data: bytes) -> bytes:
    """Re-stamp every header's length and check, so that mutations reach the body decoders."""
    out, pos = bytearray(), 0
    while pos + F.HEADER_SIZE <= len(data):
        length, ftype = struct.unpack_from(">IB", data, pos)
        body = data[pos + F.HEADER_SIZE:pos + F.HEADER_SIZE + min(length, 1 << 16)]
        checked = len(body)
        if ftype == F.BlockData.TYPE and len(body) >= 32:  # its payload is checked by digests instead
            checked = min(len(body), 32 + -(-struct.unpack_from(">I", body, 8)[0] // 4096 // 8))
        out += _frame(ftype, bytes(body), checked)
        pos += F.HEADER_SIZE + len(body)
    return bytes(out + data[pos:])


# --- files on disk -------------------------------------------------------------------------

_SCRATCH = tempfile.mkdtemp(prefix="smsrepl-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)


def _scratch(name: str, data: bytes) -> str:
    path = os.path.join(_SCRATCH, name)
    with open(path, "wb") as fh:
        fh.write(data)
    return path


def _manifest_seed() -> bytes:
    path = os.path.join(_SCRATCH, "seed.manifest")
    fine = np.arange(1, 2 * M.GROUP_BLOCKS + 5, dtype=np.uint64)
    M.ManifestFile.create(path, len(fine) * 4096, fine=fine).close()
    with open(path, "rb") as fh:
        return fh.read()


def parse_manifest(data: bytes) -> None:
    man = M.ManifestFile.open(_scratch("m", data))
    try:
        if man.nblocks <= 1 << 16:
            man.verify()
            man.read_fine(0, man.nblocks)
    finally:
        man.close()


def fix_manifest_header(data: bytes) -> bytes:
    if len(data) < M.HEADER.size:
        return data
    head = bytearray(data[:M.HEADER.size])
    fields = list(M.HEADER.unpack(bytes(head)))
    fields[5] = 0
    head = bytearray(M.HEADER.pack(*fields))
    fields[5] = M._header_check(bytes(head))
    return M.HEADER.pack(*fields) + data[M.HEADER.size:]


_MAP_SIZE = 1 << 20


def _dirtymap_seed() -> bytes:
    path = os.path.join(_SCRATCH, "seed.map")
    dm = DirtyMap.open(path, _MAP_SIZE)
    dm.mark(8192, 4096 * 3)
    dm.close()
    with open(path, "rb") as fh:
        return fh.read()


def parse_dirty_map(data: bytes) -> None:
    path = _scratch("d", data)
    dm = DirtyMap.open(path, _MAP_SIZE)
    try:
        frozen = dm.freeze()
        list(frozen.ranges())
        frozen.dirty_blocks()
    finally:
        dm.close()
        os.unlink(path)


# --- JSON documents --------------------------------------------------------------------

def _certkey_doc(bundle) -> dict:
    from smsrepl.lab.certs import write_certkey

    path = write_certkey(_SCRATCH, bundle)
    with open(path) as fh:
        return json.load(fh)


def parse_certkey(data: bytes) -> None:
    CertKey.from_json(data, source="fuzz")


def parse_speed_limit(data: bytes) -> None:
    SpeedSchedule.from_json(data)


def parse_configuration(data: bytes) -> None:
    PathRules.from_configurations(parse_configuration_body(data, "fuzz"), source="fuzz")


def parse_file_ops(data: bytes) -> None:
    list(W.decode_ops(data))


def parse_tree_listing(data: bytes) -> None:
    r = W.Reader(data)
    while not r.done():
        r.entry()


_SPEED = [b'{"speed_limit":[{"start":"00:00","end":"23:59","speed":1000,"over_speed_threshold":50.0}]}',
          b'{"speed_limit":[{"start":"8:00","end":"18:00","speed":80},{"start":"22:00","end":"6:00","speed":0}]}']
_CONFIG = [json.dumps({"configurations": [
    {"config_key": "EXCLUDE_MIGRATE_PATH", "config_value": "/tmp,/var/cache/*"},
    {"config_key": "SYNC_EXCLUDE_DIR", "config_value": "/proc/**"},
    {"config_key": "CONSISTENCY_DIR", "config_value": "/etc,/home"},
    {"config_key": "LINUX_CPU_LIMIT", "config_value": "30"}]}).encode()]


def _entry(path: bytes, kind: str = "file", link: bytes | None = None):
    from smsrepl.files.scan import Entry

    return Entry(path, kind, 0o644, 0, 0, 5, 1_600_000_000_000_000_000, 0, 0, 1, 0, link)


def _file_ops_seed() -> bytes:
    return b"".join(bytes(b) for b in W.encode_op(W.FILE, _entry(b"dir/file"), data=b"hello"))


def _listing_seed() -> bytes:
    return W.encode_entry(_entry(b"dir", "dir")) + W.encode_entry(_entry(b"dir/l", "symlink", b"../x")) \
        + W.encode_entry(_entry(b"dir/file"), b"\1" * 16)


def targets() -> dict[str, Target]:
    return {t.name: t for t in (
        Target("frames at the receiver", parse_at_receiver, (RemoteProtocolError,), _sender_frames(), fix_frame_checks),
        Target("frames at the sender", parse_at_sender, (RemoteProtocolError,), _receiver_frames(), fix_frame_checks),
        Target("manifest file", parse_manifest, (ManifestError,), [_manifest_seed()], fix_manifest_header),
        Target("dirty-map file", parse_dirty_map, (ManifestError, ConfigError), [_dirtymap_seed()]),
        Target("certkey JSON (5.7.1)", parse_certkey, (ConfigError,), [json.dumps(_certkey_doc(_bundle())).encode()]),
        Target("speed-limit JSON (5.4.9)", parse_speed_limit, (ConfigError,), _SPEED),
        Target("configuration JSON (5.10.1)", parse_configuration, (ConfigError,), _CONFIG),
        Target("file operation records", parse_file_ops, (ReplicationError,), [_file_ops_seed()]),
        Target("tree listing records", parse_tree_listing, (ReplicationError,), [_listing_seed()]),
    )}


_BUNDLE = []


def _bundle():
    if not _BUNDLE:
        from smsrepl.lab.certs import make_bundle

        _BUNDLE.append(make_bundle())
    return _BUNDLE[0]


# --- mutation ----------------------------------------------------------------------------

_INTERESTING = [b"\x00", b"\xff", b"\x7f", b"\x80", b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"{", b"}", b"[",
                b"]", b'"', b"\\", b"null", b"-1", b"1e999", b"NaN", b"9" * 30, b"\xc3\x28", b"\n", b"/..", b"**"]


def mutate(data: bytes, rng: random.Random, corpus: list[bytes]) -> bytes:
    """A few random edits: bit flips, interesting bytes, cuts, duplicates, splices."""
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 3, 5, 8))):
        op = rng.randrange(8)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        elif op == 2:
            buf[pos:pos] = rng.choice(_INTERESTING)
        elif op == 3 and buf:
            end = min(len(buf), pos + rng.randrange(1, 64))
            del buf[pos:end]
        elif op == 4 and buf:
            end = min(len(buf), pos + rng.randrange(1, 64))
            buf[pos:pos] = buf[pos:end] * rng.randrange(1, 4)
        elif op == 5:
            other = rng.choice(corpus)
            a = rng.randrange(len(other) + 1)
            buf[pos:pos] = other[a:a + rng.randrange(1, 128)]
        elif op == 6 and len(buf) >= 4:
            i = rng.randrange(len(buf) - 3)
            struct.pack_into("<I" if rng.random() < 0.5 else ">I", buf, i,
                             rng.choice((0, 1, 0xFFFFFFFF, 0x7FFFFFFF, 1 << 20, rng.randrange(1 << 32))))
        elif op == 7:
            buf = buf[:pos]
    return bytes(buf)


def check_one(target: Target, data: bytes) -> bool:
    """Run one input; True if it was accepted, False if refused with a documented error.
    Any other exception propagates: that is the finding."""
    try:
        target.parse(data)
        return True
    except target.allowed:
        return False


def run_inputs(target: Target, n: int, seed: int = 0) -> dict:
    """``n`` mutated inputs (half with repaired checksums where the target has a fixup)."""
    rng = random.Random(seed)
    corpus = list(target.seeds)
    accepted = 0
    for i in range(n):
        data = mutate(rng.choice(corpus), rng, corpus)
        if target.fixup is not None and i % 2:
            data = target.fixup(data)
        try:
            ok = check_one(target, data)
        except Exception as exc:
            raise AssertionError(f"{target.name}: input {data[:200]!r}... raised {type(exc).__name__}: {exc}") from exc
        if ok:
            accepted += 1
            if len(corpus) < 256 and rng.random() < 0.05:
                corpus.append(data)  # accepted inputs breed: deeper states get explored
    return {"inputs": n, "accepted": accepted}
