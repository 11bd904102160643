"""Units in the human summary and interruption lines (smsrepl.cli.summary)."""
import pytest

from smsrepl.cli.summary import (block_round_line, files_round_line, human_bytes, human_rate,
                                 human_seconds, interrupted_line)


@pytest.mark.parametrize("n, text", [(0, "0 B"), (1023, "1023 B"), (1024, "1.00 KiB"), (12_345, "12.1 KiB"),
                                     (812 << 20, "812 MiB"), (1023 << 20, "1023 MiB"), (1024 << 20, "1.00 GiB"),
                                     (int(1.5 * (1 << 30)), "1.50 GiB"), (4 << 40, "4.00 TiB")])
def test_sizes_are_binary_units_with_three_digits(n, text):
    assert human_bytes(n) == text


@pytest.mark.parametrize("bps, text", [(0, "0 bit/s"), (100, "800 bit/s"), (125_000, "1.00 Mbit/s"),
                                       (66_000_000, "528 Mbit/s"), (127_500_000, "1.02 Gbit/s")])
def test_rates_are_decimal_bits_as_speed_limits_are(bps, text):
    assert human_rate(bps) == text


@pytest.mark.parametrize("s, text", [(0.04, "0.0 s"), (12.34, "12.3 s"), (245, "4 min 05 s"), (7380, "2 h 03 min")])
def test_times(s, text):
    assert human_seconds(s) == text


def test_a_block_round_line():
    summary = {"round": 3, "kind": "sync", "resumed_from": 0, "source_bytes": 4 << 30,
               "data_bytes": int(1.5 * (1 << 30)), "wire_bytes": 812 << 20, "seconds": 12.3}
    assert block_round_line(summary) == \
        "sent 1.50 GiB of 4.00 GiB (wire 812 MiB, 0.53x) in 12.3 s, 554 Mbit/s; round 3 sync"
    resumed = dict(summary, round=1, kind="full", resumed_from=2 << 30, data_bytes=0, wire_bytes=96)
    assert block_round_line(resumed) == \
        "sent 0 B of 4.00 GiB (wire 96 B, -) in 12.3 s, 62 bit/s; round 1 full, resumed at 2.00 GiB"


def test_a_files_round_line():
    summary = {"round": 2, "kind": "sync", "files_sent": 1, "bytes_sent": 7, "wire_bytes": 500, "deleted": 2,
               "unchanged": 7, "seconds": 0.02, "source_moved": False}
    assert files_round_line(summary) == \
        "sent 1 file, 7 B (wire 500 B, 71.43x), deleted 2, unchanged 7 in 0.0 s, 200 kbit/s; round 2 sync"


def test_interrupted_lines():
    assert interrupted_line((int(1.2 * (1 << 30)), 4 << 30)) == \
        "interrupted at 1.20 GiB of 4.00 GiB; rerun the same command to resume"
    assert interrupted_line((5 << 20, None)) == "interrupted after 5.00 MiB; rerun the same command to resume"
    assert interrupted_line(None) == "interrupted before the transfer started; rerun the same command to resume"
