"""The smsrepl wire protocol: frames and the state machine, with no I/O."""
from smsrepl.protocol.connection import (NEED_DATA, RECEIVER, SENDER, Connection, ConnectionClosed,
                                         Role, State, TRANSITIONS)
from smsrepl.protocol.frames import (CAPABILITIES, MAX_BODY, MAX_RAW, PROTOCOL_VERSION, BlockData,
                                     BlockSet, Checkpoint, Close, Error, Event, Hello, ManifestData,
                                     ManifestRequest, Ping, Pong, RoundBegin, RoundDone, RoundEnd,
                                     Scanned, Welcome, ZeroRange)

__all__ = [name for name in dir() if not name.startswith("_")]
