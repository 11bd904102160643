"""``--progress``: where a transfer's or a check's 5.4.8 reports go (JSON lines on stdout, or a
progress bar on stderr with the operator's lines written above it)."""
from __future__ import annotations

import json
import os
import shutil
import sys
from contextlib import AbstractContextManager

TYPE_CHECKING = False  # typing itself would cost every command 3 ms of imports

if TYPE_CHECKING:
    from tqdm import tqdm


def bar_width() -> dict:
    """tqdm's size arguments: the terminal's, followed as it is resized; a terminal that reports
    no size (a serial console, a pty nobody sized: 0 x 0) gets COLUMNS and LINES or 80 x 24,
    where tqdm would draw a bar of no width below a screen of no height: nothing at all."""
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):  # not a terminal
        return {"dynamic_ncols": True}
    if size.columns and size.lines:
        return {"dynamic_ncols": True}
    columns, lines = shutil.get_terminal_size()
    return {"ncols": columns, "nrows": lines}


class ProgressOutput:
    """--progress json: one 5.4.8 report per line on stdout; bar: a tqdm bar on stderr, one a
    round, with log lines and notes written above it while it is shown (never through it)."""

    def __init__(self, mode: str, *, wire: bool = True) -> None:
        self.mode = mode
        self.wire = wire  # False: nothing crosses a wire (a local check), no rate of it on the bar
        self.bar: tqdm | None = None
        self._redirect: AbstractContextManager[None] | None = None  # tqdm's logging redirect while a bar is shown

    def report(self, rep: dict) -> None:
        try:
            self._report(rep)
        except OSError as exc:  # the reader of the reports went away (a pipe's: EPIPE)
            self._lost(exc)

    def _lost(self, exc: OSError) -> None:
        """Reports can no longer be written: none after this one, and the transfer goes on (what
        watches a copy is not part of it; stopping it is Ctrl-C's job)."""
        stream = sys.stdout if self.mode == "json" else sys.stderr
        self.mode = "none"
        self.bar = None  # its stream is gone: not even closing it can draw
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None
        try:  # later writes, and the interpreter's flush at exit, go nowhere instead of failing
            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
        except (OSError, ValueError):
            pass
        name = "stdout" if stream is sys.stdout else "stderr"
        print(f"progress reports stopped: {name} is closed ({exc.strerror or exc}); the transfer goes on",
              file=sys.stderr, flush=True)

    def _report(self, rep: dict) -> None:
        if self.mode == "json":
            print(json.dumps(rep, ensure_ascii=False), flush=True)
        elif self.mode == "bar":
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            bar = self.bar
            if bar is None:
                bar = self.bar = tqdm(total=rep["totalsize"], unit="B", unit_scale=True, unit_divisor=1024,
                                      desc=rep["subtask_name"], file=sys.stderr, **bar_width())
                self._redirect = logging_redirect_tqdm()
                self._redirect.__enter__()
            # the rate first: update() draws the bar, with the postfix set by then
            # the round's last report says 0 (nothing moves any more): end_round shows the average
            if self.wire and (rep["migrate_speed"] or rep["progress"] < 100):
                bar.set_postfix_str(f"{rep['migrate_speed']:.0f} Mbit/s on the wire", refresh=False)
            bar.update(rep["replicatesize"] - bar.n)

    def note(self, line: str) -> None:
        """A line for the operator on stderr: above the bar while one is shown."""
        if self.bar is not None:
            from tqdm import tqdm

            tqdm.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def end_round(self, wire_bytes: int, seconds: float) -> None:
        """Close the round's bar, its rate the round's average: before the summary is printed,
        so that nothing redraws the bar after it."""
        if self.bar is not None and seconds > 0:
            from smsrepl.cli.summary import human_rate

            self.bar.set_postfix_str(f"{human_rate(wire_bytes / seconds)} on the wire, average", refresh=False)
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None
