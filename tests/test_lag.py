"""Replication lag: backlog, rates, the cutover estimate and the 'not converging' verdict."""
import logging
from types import SimpleNamespace

from smsrepl.replication.lag import FINE_BLOCK, WINDOW, LagMeter


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Backlog:
    """A dirty map seen as lag.py sees one: how many blocks are marked now."""

    def __init__(self) -> None:
        self.blocks = 0

    def dirty_blocks(self) -> int:
        return self.blocks


def _round(meter, clock, backlog, *, blocks, seconds, wait):
    """A round that starts with ``blocks`` marked, sends them in ``seconds``, then ``wait``s."""
    backlog.blocks = blocks
    meter.round_started()
    backlog.blocks = 0  # the round froze the map: what it sends is no longer backlog
    clock.t += seconds
    meter.round_done(SimpleNamespace(dirty_blocks=blocks, data_bytes=blocks * FINE_BLOCK))
    clock.t += wait


def test_rounds_that_drain_faster_than_the_source_dirties_converge(caplog):
    clock, backlog = Clock(), Backlog()
    meter = LagMeter(backlog, clock=clock, tracking="kernel")
    assert meter.figures()["lag_s"] is None and meter.figures()["cutover_estimate_s"] is None
    with caplog.at_level(logging.WARNING, logger="smsrepl.lag"):
        _round(meter, clock, backlog, blocks=100_000, seconds=10, wait=0)  # the copy
        for _ in range(2 * WINDOW):
            _round(meter, clock, backlog, blocks=2_500, seconds=1, wait=9)  # 10 MB/10 s, drained in 1 s
    backlog.blocks = 2_500
    f = meter.figures()
    assert f["converging"] and not caplog.records
    assert f["dirty_bytes"] == 2_500 * FINE_BLOCK
    assert f["dirty_rate_bps"] == 2_500 * FINE_BLOCK // 10  # per second between round starts
    assert f["drain_rate_bps"] == 2_500 * FINE_BLOCK  # the backlog of a round per second it ran
    assert f["cutover_estimate_s"] == 1.0  # this backlog at that rate
    assert f["lag_s"] == 10.0  # the target holds the source as of the last round's start
    assert meter.trace().startswith("lag {")


def test_a_source_that_outruns_the_rounds_is_reported_not_converging_once(caplog):
    clock, backlog = Clock(), Backlog()
    meter = LagMeter(backlog, clock=clock, tracking="kernel")
    with caplog.at_level(logging.WARNING, logger="smsrepl.lag"):
        _round(meter, clock, backlog, blocks=100_000, seconds=10, wait=0)
        blocks = 10_000
        for i in range(WINDOW + 3):
            # back to back, and each round finds more to send than the one before
            _round(meter, clock, backlog, blocks=blocks, seconds=blocks / 1000, wait=0)
            blocks = int(blocks * 1.3)
            if i < WINDOW - 1:
                assert meter.converging, i  # not before WINDOW rounds in a row say so
    assert not meter.converging
    assert not meter.figures()["converging"]
    assert meter.trace().startswith("NOT CONVERGING: lag {")
    warnings = [r for r in caplog.records if "not converging" in r.getMessage()]
    assert len(warnings) == 1  # said once, not at every round


def test_a_source_that_calms_down_converges_again():
    clock, backlog = Clock(), Backlog()
    meter = LagMeter(backlog, clock=clock)
    _round(meter, clock, backlog, blocks=100_000, seconds=10, wait=0)
    blocks = 10_000
    for _ in range(WINDOW + 1):
        _round(meter, clock, backlog, blocks=blocks, seconds=blocks / 1000, wait=0)
        blocks = int(blocks * 1.3)
    assert not meter.converging
    for _ in range(2):
        _round(meter, clock, backlog, blocks=500, seconds=0.5, wait=5)
    assert meter.converging


def test_without_a_map_the_backlog_is_unknown_and_the_estimate_is_the_last_round():
    clock = Clock()
    meter = LagMeter(None, clock=clock, tracking="scan")
    meter.round_started()
    clock.t += 7.5
    meter.round_done(SimpleNamespace(dirty_blocks=None, data_bytes=1 << 30))
    f = meter.figures()
    assert f["dirty_bytes"] is None and f["tracking"] == "scan"
    assert f["cutover_estimate_s"] == 7.5  # a whole-source round takes as long as the last one


def test_back_to_back_rounds_whose_backlog_shrinks_converge():
    # rounds that start as soon as the previous ends always "take as long as the interval";
    # what says they catch up is the backlog shrinking
    clock, backlog = Clock(), Backlog()
    meter = LagMeter(backlog, clock=clock)
    _round(meter, clock, backlog, blocks=100_000, seconds=10, wait=0)
    blocks = 50_000
    for _ in range(2 * WINDOW):
        _round(meter, clock, backlog, blocks=blocks, seconds=blocks / 5000, wait=0)
        blocks //= 2
    assert meter.converging
