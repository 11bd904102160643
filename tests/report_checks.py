"""What every run's 5.4.8 reports must show while data leaves slowly (a speed limit, a slow
link): shared by the tests that watch a send's --progress json."""
from __future__ import annotations

MiB = 1 << 20


def assert_reports_follow_the_socket(arrivals: list[tuple[float, dict]], bytes_per_second: float, *,
                                     inside: int = 3, slack: int = 3 * MiB) -> None:
    """``arrivals``: (time.monotonic() as it arrived, report) of one round. The reports end at
    100%, never go back, come about once a second (3 s of room for a busy machine), show the
    way with ``inside`` reports or more, each with a rate, and never claim more than the link
    can have carried since the first one, ``slack`` bytes aside (sockets' buffers, a burst)."""
    reports = [r for _, r in arrivals]
    assert reports[-1]["progress"] == 100, reports[-1]
    total = reports[-1]["totalsize"]
    sizes = [r["replicatesize"] for r in reports]
    assert sizes == sorted(sizes), sizes
    on_the_way = [r for r in reports if 0 < r["replicatesize"] < total]
    assert len(on_the_way) >= inside, reports
    assert all(r["migrate_speed"] > 0 for r in on_the_way), on_the_way
    gaps = [b[0] - a[0] for a, b in zip(arrivals, arrivals[1:])]
    assert max(gaps) < 3, gaps
    t0 = arrivals[0][0]
    ahead = [(round(t - t0, 1), r["replicatesize"]) for t, r in arrivals[:-1]
             if r["replicatesize"] > bytes_per_second * (t - t0) + slack]
    assert not ahead, ahead
