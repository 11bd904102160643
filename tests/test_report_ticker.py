"""The thread that reports a round's progress (control.report_ticker)."""
import threading

from smsrepl.control.report_ticker import Ticker


def test_a_ticker_whose_report_fails_says_so_once_and_stops(caplog):
    calls = []
    failed = threading.Event()

    def tick():
        calls.append(1)
        failed.set()
        raise ValueError("the control plane's queue is closed")

    with Ticker(tick, every=0.01):
        assert failed.wait(5)
        threading.Event().wait(0.1)
    assert len(calls) == 1
    assert [r.getMessage() for r in caplog.records] == ["progress reports stopped: the control plane's queue is closed"]
