"""The receiver's question sessions: a network check and a status report.

Neither claims a target nor writes anything. A network check (HELLO kind "netcheck",
transport/netcheck.py is the asking side) holds one place of the receiver's own pool for
network checks and answers every PING, padded ones being the bulk transfer, until the sender
closes. A status request (kind "status", transport/status.py) is answered by one STATUS frame:
the receiver's targets and running sessions.
"""
from __future__ import annotations

import logging

from smsrepl.errors import RemoteProtocolError
from smsrepl.protocol import CAPABILITIES, PROTOCOL_VERSION
from smsrepl.protocol import frames as F
from smsrepl.transport.session import CONTROL, Handler

log = logging.getLogger("smsrepl.receiver")


class _Question(Handler):
    def _welcome(self) -> None:
        self.chan.send(F.Welcome(PROTOCOL_VERSION, self.hello.session_id, 0, "new", 0, "full", 0, "",
                                 capabilities=list(CAPABILITIES)))


class NetworkCheck(_Question):
    """HELLO kind "netcheck"."""

    _claimed = False

    def serve(self) -> bool:
        self.host.claims.claim_netcheck()
        self._claimed = True
        self._welcome()
        log.info("%s: network check", self.peer)
        while True:
            ev = self.chan.recv()
            if not isinstance(ev, CONTROL):
                raise RemoteProtocolError(f"{type(ev).__name__} during a network check")
            if self.session.control(ev, " during a network check"):
                return True

    def close(self) -> None:
        if self._claimed:
            self.host.claims.release_netcheck()


class StatusReport(_Question):
    """HELLO kind "status": WELCOME, one STATUS frame, then CLOSE."""

    def serve(self) -> bool:
        self._welcome()
        self.chan.send(F.Status(*self.host.status()))
        log.info("%s: status request", self.peer)
        ev = self.chan.recv()
        if not isinstance(ev, CONTROL):
            raise RemoteProtocolError(f"{type(ev).__name__} after a status report")
        return self.session.control(ev, " after a status report")
