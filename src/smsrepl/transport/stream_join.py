"""Parallel streams on the receiver: the extra connections of a session (HELLO kind "stream").

An extra connection presents the key its session offered (stream_offers.py) with its index,
and then only carries SEQ-numbered frames into the session's FrameOrder: the session applies
them in order, as frames of its own connection. Losing one of them fails the session (the
sender resumes from the checkpoint, as after any cut).
"""
from __future__ import annotations

from smsrepl.errors import RemoteProtocolError, ReplicationError, TransportError
from smsrepl.protocol import PROTOCOL_VERSION, ConnectionClosed
from smsrepl.protocol import frames as F
from smsrepl.protocol.connection import STREAM_FRAMES
from smsrepl.transport.session import Handler


class StreamJoin(Handler):
    """HELLO kind "stream": an extra connection of a session, carrying its SEQ-numbered frames."""

    def serve(self) -> bool:
        ev = self.chan.recv()
        if not isinstance(ev, F.Streams):
            raise RemoteProtocolError(f"expected STREAMS after a stream's HELLO, got {type(ev).__name__}")
        order = self.host.streams.join(ev.key, ev.count, self.hello, self.chan)
        self.chan.send(F.Welcome(PROTOCOL_VERSION, self.hello.session_id, 0, "new", 0, "full", 0, "",
                                 capabilities=["streams"]))
        self.chan.conn.join_stream()
        index = ev.count
        try:
            while True:
                ev = self.chan.recv()
                if isinstance(ev, F.Seq):
                    frame = self.chan.recv()
                    if not isinstance(frame, STREAM_FRAMES):
                        raise RemoteProtocolError(f"SEQ followed by {type(frame).__name__} on an extra connection")
                    if not order.put_seq(ev.seq, frame):
                        return True  # the session ended
                elif isinstance(ev, ConnectionClosed):
                    if order.closed:
                        return True
                    raise TransportError(f"extra connection {index} of the session was closed")
                elif not isinstance(ev, F.Ping):  # a keepalive, outside the order; else nothing
                    raise RemoteProtocolError(f"{type(ev).__name__} without SEQ on an extra connection")
        except ReplicationError as exc:
            if not order.closed:  # the session fails with it: its checkpoint says where to resume
                # a broken peer's frame is the session's protocol error, told to the sender in an
                # ERROR on its own connection; a lost connection is lost for the sender too
                kind = RemoteProtocolError if isinstance(exc, RemoteProtocolError) else TransportError
                order.put_nowait(kind(f"extra connection {index} of the session failed: {exc.message}"))
            if isinstance(exc, TransportError):
                return False
            raise
