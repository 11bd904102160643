"""How many connections a session runs over: --streams N|auto."""
import socket

import pytest

from smsrepl.errors import ConfigError
from smsrepl.transport.streams_auto import auto_count, initial_streams, parse_streams, round_trip_ms


@pytest.mark.parametrize("rtt, want", [(None, 1), (0.05, 1), (1.9, 1), (2.0, 2), (20, 3), (50, 4), (100, 7),
                                       (150, 8), (600, 8)])
def test_auto_opens_more_connections_the_longer_the_round_trip(rtt, want):
    assert auto_count(rtt) == want


@pytest.mark.parametrize("text, want", [("1", 1), ("16", 16), ("auto", "auto")])
def test_streams_values(text, want):
    assert parse_streams(text) == want


@pytest.mark.parametrize("text", ["0", "17", "x", "", "-1", "Auto"])
def test_bad_streams_values_say_what_is_allowed(text):
    with pytest.raises(ConfigError, match="from 1 to 16, or auto"):
        parse_streams(text)


def test_the_kernels_round_trip_of_a_loopback_connection_is_a_lan_s_and_loopback_runs_one():
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    peer, _ = server.accept()
    try:
        client.sendall(b"x" * 1000)
        peer.recv(1000)
        rtt = round_trip_ms(client)
        assert rtt is not None and 0 <= rtt < 2
        assert initial_streams("auto", client) == 1
        assert initial_streams(5, None) == 5
    finally:
        for s in (client, peer, server):
            s.close()
