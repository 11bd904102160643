"""The sessions of a receiver that granted extra connections (parallel streams), by key.

A session that receives STREAMS (session.Session.grant_streams) offers a random key here for
the count it grants. An extra connection (stream_join.py) presents the key with its index and
must name the same target and session. Ending the session withdraws the key and cuts its
extra connections.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

from smsrepl.errors import RefusedError
from smsrepl.protocol import frames as F
from smsrepl.transport.channel import Channel
from smsrepl.transport.frame_order import FrameOrder


@dataclass(eq=False)
class Offer:
    target: str
    session_id: str
    count: int
    order: FrameOrder
    joined: set = field(default_factory=set)
    chans: list = field(default_factory=list)


class StreamOffers:
    """The keys of sessions that granted extra connections (the host's ``streams``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._offers: dict[str, Offer] = {}

    def offer(self, key: str, target: str, session_id: str, count: int, order: FrameOrder) -> None:
        with self._lock:
            self._offers[key] = Offer(target, session_id, count, order)

    def join(self, key: str, index: int, hello: F.Hello, chan: Channel) -> FrameOrder:
        with self._lock:
            offer = self._offers.get(key)
            if offer is None or offer.target != hello.target or offer.session_id != hello.session_id:
                raise RefusedError("no session of this target and id offers extra connections with this key")
            if not 1 <= index < offer.count or index in offer.joined:
                raise RefusedError(f"extra connection {index} is not one the session granted "
                                   f"({offer.count - 1} granted, {sorted(offer.joined)} joined)")
            offer.joined.add(index)
            offer.chans.append(chan)
            return offer.order

    def withdraw(self, key: str) -> None:
        """The session ended: its key goes, its extra connections are cut."""
        with self._lock:
            offer = self._offers.pop(key, None)
        if offer is not None:
            offer.order.close()
            for chan in offer.chans:
                chan.abort("the session this connection carried frames of has ended")
