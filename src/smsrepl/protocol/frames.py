"""The wire format: its layout, described here, and the one import point for it
(``from smsrepl.protocol import frames as F``). No I/O here. Its parts, each with one job:
layout.py (sizes, limits, struct layouts, the frame check), events.py (the events, which
check their own fields), readers.py (frame bodies to events), writers.py (events to frames).

Every frame is a 12-byte header and a body (big-endian integers):

    offset  size  field
    0       4     body length in bytes (at most MAX_BODY)
    4       1     frame type (see TYPES)
    5       1     flags, must be 0
    6       2     reserved, must be 0
    8       4     check: the low 32 bits of XXH3-64 of header bytes 0-7 followed
                  by the checked part of the body (the whole body, except BLOCK_DATA, whose
                  payload is covered by its block digests instead)
    12      len   body

Control frames carry a JSON object (UTF-8) whose keys and types are fixed by
the event class; unknown or missing keys are a protocol error. Binary bodies:

    BLOCK_DATA  u64 offset | u32 range length | u8 codec | 3 zero bytes |
                16-byte digest | zero map, ceil(range length / 4096 / 8) bytes | payload
                (the frame sets the blocks of [offset, offset + range length);
                offset is 4 KiB aligned; range length at most LEGACY_RAW (4 MiB),
                or MAX_RAW (8 MiB) when the receiver listed "frame-8m". Bit i of the zero map (LSB first, unused
                bits 0) says block i is all zero: zero blocks are never carried,
                compressed or not; the payload decodes to the non-zero blocks, in
                order. The digest is XXH3-128 over the XXH3-64 of every 4 KiB
                block, little-endian, 0 for zero blocks (the manifest's fine
                digests): the receiver computes those anyway, so one 16-byte
                digest per frame checks every block at 0.4% less wire than
                sending each block's digest)
    BLOCK_SET   u64 offset | u32 count | u8 codec | 3 zero bytes |
                u32 index * count | u64 digest * count | payload
                (scattered blocks: block i sits at offset + index[i] * 4096;
                indices strictly increase from 0, so offset is the first
                block's; digests and payload as in BLOCK_DATA; only the
                source's last block may be short. Sync rounds send changes
                spread thin this way: one frame, not one per block)
    ZERO_RANGE  u64 offset | u64 length        (the range reads as zero)
    SCANNED     u64 offset                     (nothing below it is left to send this round)
    PING, PONG  u64 nonce | u64 sender clock ns | padding (netcheck sizes)
    MANIFEST_DATA  u8 level (0 coarse, 1 fine) | 7 zero bytes | u64 first |
                u32 count | 4 zero bytes | entries (16 or 8 bytes each, LE)
    TREE_DATA, FILE_OPS  u8 flags (TREE_DATA: bit 0 = last, bit 1 = ordered) | u8 codec |
                u32 raw length | payload (codec as BLOCK_DATA; the raw bytes are
                entry records or operations, see files/wire.py). An ordered
                TREE_DATA holds whole directories, and the directories of a listing
                come breadth first: by depth, then by their path's components
                compared as bytes (the order of files.dirscan); a receiver sends
                them only to a sender that listed "tree-stream", which may then
                start its round (RoundBegin, FILE_OPS) before the last one arrives
    SEQ         u64 seq  (parallel streams: the frame after it is the seq-th of the session's
                one order, counted from 0 after the STREAMS exchange, over all its connections)
    TREE_SUBSET u8 flags (must be 0) | u32 count | count * (u8 recursive | u16 length | path)
                (TREE_REQUEST for some directories only: each one's entries, and with
                recursive everything below it; answered by ordered TREE_DATA frames as
                TREE_REQUEST is, to a sender that listed "tree-stream", and sent only to a
                receiver that listed "tree-subset". Paths are relative, without empty,
                "." or ".." components; b"" is the root)
    SIG_REQUEST u32 block size | path (the rest of the body)
    SIG_DATA    u8 flags (bit 0 = last) | u32 block size | u64 file size |
                u32 first block | u32 count | weak sums u32 LE * count |
                XXH3-64 u64 LE * count

STATUS (0x07, JSON): the receiver's answer to a HELLO of kind "status" (sent after its WELCOME,
to a receiver that listed "status"): ``targets``, one object per target (name, path, kind
block/directory/missing, size, busy, last_round), and ``sessions``, one per running session
that holds a target (target, peer, kind, started, bytes_received, rounds); see
transport/status.py. The asker then sends CLOSE.

STREAMS (0x50, JSON: count, key) and SEQ: one session over several connections, between
peers that both listed "streams". On the session's connection, in IDLE, the sender asks for
``count`` connections in all (key ""); the receiver answers with the count it grants (at most
the count asked, 1 when it refuses) and a key. From the next frame on, every frame the sender
sends on that connection follows a SEQ. Each extra connection says HELLO (kind "stream", the
session's target, session id and source size) and STREAMS (its index from 1, the key); the
receiver answers WELCOME and reads from it only SEQ, each followed by a BLOCK_DATA, BLOCK_SET,
ZERO_RANGE, SCANNED or FILE_OPS, and PING (a keepalive, unanswered, outside the order). The
receiver applies the frames of all connections in SEQ order, as one connection's; replies go
on the session's connection. A lost connection fails the session (resumable, as a cut one).
A sender may ask in its HELLO instead, one round trip sooner: a capability "streams=N" (N from
2). A receiver that listed "streams-hello" in its WELCOME then answers STREAMS right after the
WELCOME, unasked, and the sender sends no STREAMS: its frames follow a SEQ from its first after
WELCOME (a receiver that did not list it ignores the entry, and is asked as above).

CLOSE ends a session: the sender sends it in IDLE and the receiver answers CLOSE. To a receiver
that listed "early-close", a sender may send it right after ROUND_END instead (its last round):
the receiver ends the round as ever (CHECKPOINT, ROUND_DONE or ERROR), then answers CLOSE.

Type ranges: 0x01-0x0f session, 0x10-0x1f block rounds, 0x20-0x2f
manifests, 0x30-0x3f file transfer, 0x40-0x4f network check, 0x50-0x5f parallel streams.
"""
from smsrepl.errors import FrameError
from smsrepl.kernels import FINE_BLOCK
from smsrepl.protocol.events import (BINARY_EVENTS, CONTROL_EVENTS, TYPES, BlockData, BlockSet, Checkpoint, Close,
                                     ControlEvent, Error, Event, FileOps, Hello, ManifestData, ManifestRequest, Ping,
                                     Pong, RoundBegin, RoundDone, RoundEnd, Scanned, Seq, SigData, SigRequest, Status,
                                     Streams, TreeData, TreeRequest, TreeSubset, Welcome, ZeroRange)
from smsrepl.protocol.layout import (ADOPT_SESSION, CAPABILITIES, DRY_RUN, EARLY_CLOSE, HEADER, HEADER_SIZE, LEGACY_RAW,
                                     MAX_BODY, MAX_RAW, MAX_SET, MAX_SIG, PROTOCOL_VERSION, STREAMS_ASK, STREAMS_HELLO)
from smsrepl.protocol.readers import decode
from smsrepl.protocol.writers import encode, frame_digest, frame_size

__all__ = [
    "FrameError", "FINE_BLOCK", "BINARY_EVENTS", "CONTROL_EVENTS", "TYPES", "BlockData", "BlockSet", "Checkpoint",
    "Close", "ControlEvent", "Error", "Event", "FileOps", "Hello", "ManifestData", "ManifestRequest", "Ping", "Pong",
    "RoundBegin", "RoundDone", "RoundEnd", "Scanned", "Seq", "Streams", "SigData", "SigRequest", "Status",
    "TreeData", "TreeRequest", "TreeSubset", "Welcome", "ZeroRange", "ADOPT_SESSION", "CAPABILITIES", "DRY_RUN",
    "EARLY_CLOSE", "HEADER", "HEADER_SIZE", "LEGACY_RAW", "MAX_BODY", "MAX_RAW", "MAX_SET", "MAX_SIG", "PROTOCOL_VERSION",
    "STREAMS_ASK", "STREAMS_HELLO", "decode", "encode", "frame_digest", "frame_size",
]
