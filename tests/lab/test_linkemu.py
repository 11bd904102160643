"""The link emulator (smsrepl.lab.linkemu) does what it is told: a bulk TCP transfer between
its namespaces runs at the configured rate, round trips take twice the one-way delay, the
loss is the configured one, jitter never reorders, the queue drops at its bound, and
everything is removed at exit. Bounds are generous: the machine is shared and noisy."""
from __future__ import annotations

import subprocess

import pytest

from smsrepl.lab import linkprobe
from smsrepl.lab.linkemu import LinkEmulator, LinkSpec, parse_rate, parse_spec, unavailable


def test_parse_spec():
    assert parse_spec("100mbit:20ms") == LinkSpec(100e6, 10.0)
    assert parse_spec("1gbit:50ms:0.1%") == LinkSpec(1e9, 25.0, loss=0.001)
    assert parse_spec("1gbit:150ms:jitter=2ms:queue=30ms") == LinkSpec(1e9, 75.0, jitter_ms=2.0, queue_ms=30.0)
    assert str(parse_spec("1gbit:50ms:0.1%")) == "1gbit:50ms:0.1%"
    assert parse_rate("800kbit") == 800e3 and parse_rate("2.5g") == 2.5e9
    for bad in ("100mbit", "fast:20ms", "1gbit:20ms:lots", "1gbit:20ms:150%"):
        with pytest.raises(ValueError):
            parse_spec(bad)


needs_link = pytest.mark.skipif(bool(unavailable()), reason=f"link emulator unavailable: {unavailable()}")


@needs_link
@pytest.mark.parametrize("rate, delay_ms", [(100e6, 10.0), (20e6, 2.0)])
def test_bulk_tcp_runs_at_the_rate_and_the_round_trip_is_twice_the_delay(rate, delay_ms):
    with LinkEmulator(rate, delay_ms) as link:
        ping = linkprobe.ping(link, count=60, interval_ms=5)
        got = linkprobe.bulk(link, seconds=2.5)
        if got["steady_bps"] < 0.85 * rate:  # a busy machine can starve the endpoints: once more
            got = max(got, linkprobe.bulk(link, seconds=2.5, port=5203), key=lambda g: g["steady_bps"])
    rtt = 2 * delay_ms
    assert ping["received"] == ping["sent"] and ping["in_order"]
    # a 64-byte datagram: the delay each way plus microseconds of serialization and scheduling
    assert rtt - 0.2 <= ping["rtt_ms"]["min"] <= rtt + 3, ping
    assert rtt - 0.2 <= ping["rtt_ms"]["median"] <= rtt + 6, ping
    assert rtt - 0.2 <= got["sender"]["min_rtt_us"] / 1e3 <= rtt + 8, got
    # Never above the rate, over the whole connection: the steady window's start can fall on a
    # hole (a queue drop whose later segments wait out of order, unreadable), so the window
    # gets them all at once when the retransmission fills it (20.7 of 20 Mbit/s seen that way).
    assert got["bps"] <= 1.03 * rate, got
    # below it only by what TCP and a loaded machine leave unused
    assert got["steady_bps"] >= 0.8 * rate, got
    ab = link.stats["a->b"]  # type: ignore[index]
    assert ab["bytes"] >= got["bytes"] and ab["lost"] == 0
    assert link.stats["cpu_s"] < 2.5  # type: ignore[index]


@needs_link
def test_random_loss_matches():
    with LinkEmulator(50e6, 1.0, loss=0.05, seed=7) as link:
        got = linkprobe.ping(link, count=1500, interval_ms=0.5)
    both_ways = 1 - 0.95 ** 2  # a datagram or its echo: 9.75%
    assert both_ways - 0.03 <= got["loss"] <= both_ways + 0.03, got
    st = link.stats
    assert st is not None
    for way in ("a->b", "b->a"):
        lost, seen = st[way]["lost"], st[way]["lost"] + st[way]["packets"] + st[way]["dropped"]
        assert 0.03 <= lost / seen <= 0.07, st


@needs_link
def test_jitter_spreads_the_delay_but_never_reorders():
    with LinkEmulator(100e6, 5.0, jitter_ms=4.0) as link:
        got = linkprobe.ping(link, count=300, interval_ms=2)
    assert got["received"] == got["sent"]
    assert got["in_order"], got
    assert got["rtt_ms"]["max"] - got["rtt_ms"]["min"] >= 3, got
    assert got["rtt_ms"]["min"] >= 2 - 0.2, got


@needs_link
def test_the_queue_drops_at_its_bound():
    # 1400-byte datagrams every 0.2 ms (56 Mbit/s) into a 10 Mbit/s link with 20 ms of queue
    with LinkEmulator(10e6, 2.0, queue_ms=20, mtu=1500) as link:
        got = linkprobe.ping(link, count=2000, interval_ms=0.2, size=1400)
        queue = link.queue_bytes
    ab = link.stats["a->b"]  # type: ignore[index]
    assert queue == 25000
    assert ab["dropped"] > 0.5 * got["sent"], ab
    assert ab["peak_queue_bytes"] <= queue, ab
    # what got through waited at most the queue's 20 ms (plus the delay and one datagram) each
    # way (the echoes, bunched by the echo server, can queue on the way back too); the median,
    # as the client's own timestamps can be late on a loaded machine
    assert 4 + 10 <= got["rtt_ms"]["median"] <= 4 + 2 * (20 + 1.2) + 8, got
    assert ab["packets"] * 1400 * 8 <= 10e6 * (2000 * 0.2e-3 + 0.05) * 1.1


@needs_link
@pytest.mark.parametrize("cc", ["cubic", "bbr"])
def test_congestion_control_of_both_ends(cc):
    if unavailable(cc):
        pytest.skip(unavailable(cc))
    with LinkEmulator(50e6, 1.0, cc=cc) as link:
        got = linkprobe.bulk(link, seconds=0.5)
        routes = subprocess.run(["ip", "-n", link.ns("b"), "route"], capture_output=True, text=True).stdout
    assert got["sender"]["cc"] == cc
    assert f"congctl {cc}" in routes


@needs_link
def test_everything_goes_at_exit_even_on_error():
    with pytest.raises(RuntimeError, match="boom"):
        with LinkEmulator(10e6, 1.0) as link:
            names = [link.ns("a"), link.ns("b")]
            sleeper = link.run_in("a", ["sleep", "60"])
            listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
            assert all(n in listed for n in names)
            raise RuntimeError("boom")
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n in listed for n in names)
    assert sleeper.poll() is not None
    assert link.stats is not None and "cpu_s" in link.stats


@needs_link
def test_raised_buffers_are_set_and_defaults_are_kept():
    def rmem_max(link: LinkEmulator) -> int:
        out = subprocess.run(["ip", "netns", "exec", link.ns("a"), "sysctl", "-n", "net.ipv4.tcp_wmem"],
                             capture_output=True, text=True, check=True).stdout
        return int(out.split()[2])

    with LinkEmulator(10e6, 1.0, tcp_buffer_max=64 << 20) as link:
        assert rmem_max(link) == 64 << 20
    with LinkEmulator(10e6, 1.0) as link:
        assert rmem_max(link) < 64 << 20
