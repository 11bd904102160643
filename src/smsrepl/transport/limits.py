"""The receiver's limits and timeouts, and the limits both ends of a session keep.

One home for the numbers that bound what a peer may cost the receiver (connections, threads,
time) and what a frame may ask for: the endpoint server, its admission and watchdog, the
session handlers and the sender read them from here. ``Receiver(...)`` takes most of the
per-receiver ones as arguments; these are the defaults.
"""
from __future__ import annotations

#: seconds between durable checkpoints while data flows
CHECKPOINT_SECONDS = 2.0
#: from accepting a connection to its HELLO: TLS handshake and the first frame together
HANDSHAKE_TIMEOUT = 15.0
#: a session that completes no frame and moves less than MIN_PROGRESS bytes for this long
#: is dropped: a peer trickling one byte a second is, a slow but steady link (an 8 MiB frame
#: at 512 kbit/s takes 131 s) is not
IDLE_TIMEOUT = 120.0
MIN_PROGRESS = 64 << 10
#: seconds between the PONGs a file session sends while it works without sending (a syncfs that
#: waits for a busy disk, a listing that reads a large file): the sender's I/O timeout is 300 s
KEEPALIVE = 20.0
#: connections served at once, and how many of them may still be before their HELLO:
#: a flood of connections costs a bounded number of threads and is shed at the door
MAX_CONNECTIONS = 64
MAX_UNAUTHENTICATED = 16
#: seconds a connection that spoke waits, when MAX_UNAUTHENTICATED are before their HELLO, before
#: the oldest of those is evicted for it: a mutual TLS handshake and a HELLO take a few round
#: trips (four sessions' extra connections joining at once over a 150 ms link: 28 of them for
#: about 0.3 s), a connection that idles there holds its place this long at most
EVICT_AFTER = 2.0
#: connections that have said nothing yet wait without a thread (door.py), this many at most
MAX_WAITING = 1024
#: TLS handshakes a second from one peer address (CONNECT_BURST at once): connections past
#: that are closed when they speak, before the handshake; silent ones cost none (door.py)
CONNECT_RATE = 20.0
CONNECT_BURST = 64
#: network checks in a pool of their own, outside MAX_CONNECTIONS: idle or abusive checks
#: cannot hold the slots of data sessions. A check lasts seconds; one is dropped after
#: NETCHECK_SECONDS
MAX_NETCHECKS = 16  # room for one check over MAX_STREAMS connections
NETCHECK_SECONDS = 120.0
#: session outcomes kept for serve_forever(once=True) and embedders; older ones are dropped
KEEP_OUTCOMES = 100
WATCHDOG_SECONDS = 0.5
#: how long a session whose target failed (a full disk, an I/O error) reads what its sender
#: still streams after the ERROR frame
DRAIN_STREAMING = 10.0
#: how long a session waits for its target to be let go by another before it is told "busy"
BUSY_WAIT = 3.0
#: manifest entries per MANIFEST_DATA frame (4 MiB coarse, 2 MiB fine): the most a sender
#: asks for in one MANIFEST_REQUEST, and the most a receiver answers
MAX_MANIFEST_ENTRIES = 1 << 18
#: a session told to end (the receiver stops, or another sender takes its target over) that has
#: not let go after this long is cut: its peer may be gone and a send to it blocked
LET_GO_SECONDS = 1.0
#: how long a stopping receiver reads what a sender still streams after its ERROR frame
STOP_DRAIN = 0.5
#: the longest stop() waits for sessions' last checkpoints (each one fsyncs the target)
STOP_GRACE = 60.0
#: connections one session may run over (parallel streams), its own included
MAX_STREAMS = 16
#: seconds between the PINGs a sender sends on an idle extra connection of its session
STREAM_KEEPALIVE = 20.0
