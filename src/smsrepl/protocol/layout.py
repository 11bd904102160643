"""The fixed numbers of the wire format: the frame header, the limits, the binary bodies'
struct layouts, the capabilities, and the frame check that readers and writers both compute.
frames.py's docstring describes the layout these spell out; nothing here touches an event."""
from __future__ import annotations

import struct

import xxhash

from smsrepl.kernels import FINE_BLOCK

HEADER = struct.Struct(">IBBHI")  # body length, type, flags, reserved, check
HEADER_SIZE = HEADER.size  # 12
HEAD8 = struct.Struct(">IBBH")  # the header's first 8 bytes, which the check covers
CHECK = struct.Struct(">I")
#: largest raw payload of one BLOCK_DATA frame a receiver accepts (a sender sends
#: frames above LEGACY_RAW only to a peer that lists the "frame-8m" capability)
MAX_RAW = 8 << 20
LEGACY_RAW = 4 << 20
#: largest body of any frame: a full data frame plus its digests, with room to spare
MAX_BODY = MAX_RAW + (MAX_RAW // FINE_BLOCK) * 12 + 4096
PROTOCOL_VERSION = 2  # 2: frame checks are XXH3-64's low 32 bits (XXH32 ran at 2 GB/s)
#: what this build speaks beyond version 1's core (HELLO and WELCOME list them; each side
#: uses a feature only when the peer listed it)
CAPABILITIES = ("zstd", "block-set", "frame-8m", "files", "tree-stream", "tree-subset", "adopt-session", "status",
                "streams", "early-close", "streams-hello")
#: in a block HELLO: this sender has no completed round of its own for the target and takes over
#: the receiver's session, if the receiver holds a completed copy, with a sync round against its
#: manifest; the receiver then names that session in its WELCOME. In a WELCOME: it may do so
ADOPT_SESSION = "adopt-session"
#: in a WELCOME: the sender may send CLOSE right after ROUND_END, before the ROUND_DONE (the
#: receiver ends the round, answers ROUND_DONE, then CLOSE): one round trip less at a session's end
EARLY_CLOSE = "early-close"
#: in a WELCOME: a HELLO may ask for the session's connections itself (an entry STREAMS_ASK
#: followed by the count, "streams=4"); the receiver then answers STREAMS right after WELCOME,
#: unasked, and the sender's frames are numbered from its first after WELCOME
STREAMS_HELLO = "streams-hello"
STREAMS_ASK = "streams="
#: listed in HELLO by a sender that only looks (send --dry-run): the receiver then creates,
#: removes and begins nothing (never listed in WELCOME, nor in an ordinary HELLO)
DRY_RUN = "dry-run"

BLOCK_PREFIX = struct.Struct(">QIBxxx")  # offset, raw length, codec
SET_PREFIX = struct.Struct(">QIBxxx")  # offset, count, codec
#: most blocks in one BLOCK_SET (its payload stays within LEGACY_RAW)
MAX_SET = LEGACY_RAW // FINE_BLOCK
U64 = struct.Struct(">Q")
ZERO = struct.Struct(">QQ")
PING = struct.Struct(">QQ")
MAN = struct.Struct(">B7xQI4x")
RECORDS = struct.Struct(">BBI")  # flags (TREE_DATA: bit 0 = last, bit 1 = ordered), codec, raw length
SIGREQ = struct.Struct(">I")  # block size, then the path
SUBSET = struct.Struct(">BI")  # flags, count
SUBDIR = struct.Struct(">BH")  # recursive, path length
SIGDATA = struct.Struct(">BIQII")  # flags (bit 0 = last), block size, file size, first block, count
#: most signature blocks in one SIG_DATA frame
MAX_SIG = 1 << 19
#: largest integer a JSON control frame carries (a signed 64-bit one, for peers that parse it so)
MAX_JSON_INT = (1 << 63) - 1
MAX_U64 = (1 << 64) - 1


def check(head8: bytes, *checked: bytes | bytearray | memoryview) -> int:
    """A frame's check: the low 32 bits of XXH3-64 of the header's first 8 bytes and ``checked``."""
    h = xxhash.xxh3_64(head8)
    for part in checked:
        h.update(part)
    return h.intdigest() & 0xFFFFFFFF
