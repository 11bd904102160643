"""What a person reads at the end of a send: sizes, rates and times in units, and the one
summary line of a round (the JSON summary, for programs, is the CLI's ``--json``)."""
from __future__ import annotations

_BINARY = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
_DECIMAL_BITS = ("kbit/s", "Mbit/s", "Gbit/s", "Tbit/s")


def _three_digits(value: float) -> str:
    """At most three significant digits, as people read sizes: 1.50, 12.3, 812."""
    if value < 9.995:
        return f"{value:.2f}"
    if value < 99.95:
        return f"{value:.1f}"
    return f"{value:.0f}"


def human_bytes(n: int | float) -> str:
    """``n`` bytes in binary units: 0 B, 512 B, 12.3 KiB, 1.50 GiB."""
    n = max(0, n)
    if n < 1024:
        return f"{int(n)} B"
    return _in_units(float(n), 1024, _BINARY, 1023.5)


def human_rate(bytes_per_second: float) -> str:
    """A rate in decimal bits per second, as links and speed limits are given: 812 Mbit/s."""
    bits = max(0.0, bytes_per_second * 8)
    if bits < 1000:
        return f"{bits:.0f} bit/s"
    return _in_units(bits, 1000, _DECIMAL_BITS, 999.5)


def _in_units(value: float, step: int, units: tuple[str, ...], below: float) -> str:
    """``value`` in the first of ``units`` (each ``step`` times the one before) where it is under
    ``below`` (it would round to the next unit there), or in the last one."""
    for unit in units:
        value /= step
        if value < below or unit == units[-1]:
            return f"{_three_digits(value)} {unit}"
    raise AssertionError("unreachable")


def human_seconds(seconds: float) -> str:
    """12.3 s; 4 min 05 s; 2 h 03 min."""
    seconds = max(0.0, seconds)
    if seconds < 59.95:
        return f"{seconds:.1f} s"
    whole = int(round(seconds))
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


def _ratio(wire: int, data: int) -> str:
    return f"{wire / data:.2f}x" if data else "-"


def _rate(nbytes: int, seconds: float) -> str:
    return human_rate(nbytes / seconds) if seconds > 0 else human_rate(0)


def block_round_line(summary: dict) -> str:
    """The human line of a block round, from the JSON summary's fields::

        sent 1.50 GiB of 4.00 GiB (wire 812 MiB, 0.53x) in 12.3 s, 528 Mbit/s; round 3 sync

    sent: source data that went out as data (unchanged, already-there and all-zero blocks
    do not); wire: what that took on the connection, and its ratio to the data; the rate is
    the wire's, the unit of a --speed-limit."""
    data, wire, seconds = summary["data_bytes"], summary["wire_bytes"], summary["seconds"]
    line = (f"sent {human_bytes(data)} of {human_bytes(summary['source_bytes'])} "
            f"(wire {human_bytes(wire)}, {_ratio(wire, data)}) in {human_seconds(seconds)}, "
            f"{_rate(wire, seconds)}; round {summary['round']} {summary['kind']}")
    if summary.get("resumed_from"):
        line += f", resumed at {human_bytes(summary['resumed_from'])}"
    if summary.get("cutover") is not None:
        line += ", the cutover"
    if summary.get("quiesced"):  # a one-shot round's file systems: "synced", "frozen", ...
        line += "; " + ", ".join(f"{point} {what}" for point, what in summary["quiesced"].items())
    if (summary.get("reconcile") or "").startswith("reconciled"):  # not the first copy's "no local state"
        line += f"; {summary['reconcile']}"
    return line


def files_round_line(summary: dict) -> str:
    """The human line of a file round, from the JSON summary's fields::

        sent 120 files, 1.20 GiB (wire 800 MiB, 0.65x), deleted 3, unchanged 5012 in 12.3 s,
        540 Mbit/s; round 2 sync
    """
    data, wire, seconds = summary["bytes_sent"], summary["wire_bytes"], summary["seconds"]
    files = summary["files_sent"]
    line = (f"sent {files} file{'' if files == 1 else 's'}, {human_bytes(data)} "
            f"(wire {human_bytes(wire)}, {_ratio(wire, data)}), deleted {summary['deleted']}, "
            f"unchanged {summary['unchanged']} in {human_seconds(seconds)}, {_rate(wire, seconds)}; "
            f"round {summary['round']} {summary['kind']}")
    if summary.get("source_moved"):
        line += "; the source changed during the round, the next round catches up"
    return line


def interrupted_line(position: tuple[int, int | None] | None) -> str:
    """What a one-shot send says when a signal stopped it (it then exits 3)."""
    if position is None:
        where = "interrupted before the transfer started"
    elif position[1] is None:
        where = f"interrupted after {human_bytes(position[0])}"
    else:
        where = f"interrupted at {human_bytes(position[0])} of {human_bytes(position[1])}"
    return f"{where}; rerun the same command to resume"
