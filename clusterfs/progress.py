"""Progress of a long command (mkfs of a large volume, grow, fsck, snapshot) on a terminal.

A ``Progress`` draws one line, rewritten in place (``\\r``), at most ``RATE`` times a
second: what is being done, how far, the rate and the time left.  It draws nothing when
its stream is not a terminal (a log file, a pipe, CI) or when asked to be quiet
(``-q``), so scripts read the same output as before.  ``close`` ends the line (or
erases it, ``erase=True``) so that what follows starts on a line of its own.
"""

from __future__ import annotations

import sys
import time

RATE = 10                   # redraws a second at most


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _duration(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else \
        f"{s // 60}:{s % 60:02d}"


class Progress:
    """One line of progress on a terminal.

    Args:
        what: what is being done ("writing resource groups", "pass 2: namespace").
        total: the amount that makes 100 % (0: unknown; only the count is shown).
        quiet: draw nothing.
        stream: where to draw (default ``sys.stderr``); nothing is drawn unless it is
            a terminal.
        unit: "" for a count of things, "bytes" to show sizes.
    """

    def __init__(self, what: str, total: int = 0, *, quiet: bool = False, stream=None,
                 unit: str = ""):
        self.what = what
        self.total = total
        self.unit = unit
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        try:
            tty = self.stream.isatty()
        except (AttributeError, ValueError):
            tty = False
        self.shown = tty and not quiet
        self._start = time.monotonic()
        self._drawn = 0.0
        self._width = 0

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, done: int, what: str | None = None) -> None:
        """``done`` of ``total`` are done now (``what``: a new description)."""
        self.done = done
        if what is not None:
            self.what = what
        now = time.monotonic()
        if self.shown and now - self._drawn >= 1 / RATE:
            self._drawn = now
            self._draw(now)

    def advance(self, n: int = 1) -> None:
        """``n`` more are done."""
        self.update(self.done + n)

    def line(self, now: float | None = None) -> str:
        """The line as it would be drawn now."""
        now = time.monotonic() if now is None else now
        elapsed = max(now - self._start, 1e-9)
        fmt = _size if self.unit == "bytes" else (lambda n: f"{n:,.0f}")
        text = f"{self.what}: {fmt(self.done)}"
        if self.total:
            pct = min(100.0, 100.0 * self.done / self.total)
            text += f" of {fmt(self.total)} ({pct:.0f}%)"
        rate = self.done / elapsed
        if self.unit == "bytes":
            text += f", {_size(rate)}/s"
        if self.total and rate > 0 and self.done < self.total:
            text += f", {_duration((self.total - self.done) / rate)} left"
        return text

    def _draw(self, now: float) -> None:
        text = self.line(now)
        pad = max(0, self._width - len(text))
        self._width = len(text)
        self.stream.write("\r" + text + " " * pad)
        self.stream.flush()

    def close(self, *, erase: bool = False) -> None:
        """End the line: the final figures (or nothing, ``erase``) and a newline."""
        if not self.shown:
            return
        self.shown = False
        if erase:
            self.stream.write("\r" + " " * self._width + "\r")
        else:
            text = self.line()
            self.stream.write("\r" + text + " " * max(0, self._width - len(text)) + "\n")
        self.stream.flush()
