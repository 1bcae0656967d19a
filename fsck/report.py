"""Findings, answers, console output and the JSON report of one fsck run.

A *finding* is one problem (or a run of like problems, e.g. 40 leaked blocks in a
row) found by one layer.  ``Report.problem`` records it, prints it, and decides
whether to repair it:

* ``-n``: never (the finding stays uncorrected);
* ``-y``: always;
* ``-p``: when the finding is *safe* (routine damage a crash or an interrupted
  operation leaves: journal replay, stale slots, counters, leaked blocks, orphans);
  anything else stops the run with "UNEXPECTED INCONSISTENCY" (e2fsck's preen rule);
* interactive (a terminal, none of the above): asks ``Fix? [y/n/a/q]``.

Exit status (e2fsck's, ORed together): 0 clean, 1 errors corrected, 4 errors left
uncorrected, 8 operational error, 16 usage error, 32 cancelled by the user.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass

from clusterfs.progress import Progress as ProgressLine

EXIT_OK = 0
EXIT_FIXED = 1
EXIT_UNCORRECTED = 4
EXIT_OPERATIONAL = 8
EXIT_USAGE = 16
EXIT_CANCELLED = 32

LAYERS = {
    1: "Volume",
    2: "Cluster",
    3: "Allocation",
    4: "Inodes and extents",
    5: "Namespace",
    6: "Data surface scan",
}


class FsckError(Exception):
    """An operational error: the volume cannot be opened or parsed, or a repair was
    asked for while a node is alive.  The run ends there (exit status 8); the message
    is its one line."""


class Cancelled(Exception):
    """The user answered 'quit' (or the input ended) at a repair question."""


class Unexpected(Exception):
    """``-p`` met a finding that is not safe to repair without asking."""


@dataclass
class Finding:
    """One problem found by one layer (JSON: every field, ``None`` omitted)."""

    layer: int
    code: str
    message: str
    fix: str = ""                 # what the repair does ("" = nothing can be done)
    fixed: bool = False
    safe: bool = False            # repaired by -p without asking
    severity: str = "error"       # "error" or "warning" (warnings never set the exit status)
    ino: int | None = None
    block: int | None = None
    count: int | None = None      # for runs of like problems (blocks ...)
    path: str | None = None

    def as_dict(self) -> dict:
        d = asdict(self)
        d["layer_name"] = LAYERS[self.layer]
        return {k: v for k, v in d.items() if v is not None}


@dataclass
class LayerResult:
    layer: int
    name: str
    summary: str = ""
    errors: int = 0
    fixed: int = 0
    warnings: int = 0
    seconds: float = 0.0
    skipped: bool = False         # a key of the JSON report; no layer is skipped alone


class Progress:
    """The progress of the pass running now: one line on a terminal (stderr), drawn
    by ``clusterfs.progress``; nothing elsewhere (a pipe, a file, ``-q``).

    ``start`` begins a pass, ``step`` counts its work, ``clear`` erases the line
    (before any other output; the next ``step`` draws it again).
    """

    def __init__(self, stream, enabled: bool):
        self.stream = stream
        self.enabled = enabled
        self.label = ""
        self.total = 0
        self.done = 0
        self._line: ProgressLine | None = None

    def start(self, label: str, total: int) -> None:
        self.clear()
        self.label, self.total, self.done = label, max(total, 1), 0
        self._draw()

    def step(self, n: int = 1) -> None:
        if self.enabled:
            self.done += n
            self._draw()

    def _draw(self) -> None:
        if not self.enabled:
            return
        if self._line is None:
            self._line = ProgressLine(self.label, self.total, stream=self.stream)
        self._line.update(self.done)

    def clear(self) -> None:
        if self._line is not None:
            self._line.close(erase=True)
            self._line = None


class Report:
    """Collects findings and layer results; prints them; answers repair questions.

    Args:
        mode: "n", "y", "p" or "ask".
        out: stream for findings and summaries (stdout).
        err: stream for the progress bar and questions (stderr).
        progress: draw progress bars.
        ask_in: where answers are read from in "ask" mode.
        quiet: print nothing (findings are still recorded).
    """

    def __init__(self, mode: str = "n", *, out=None, err=None, progress: bool = False,
                 ask_in=None, quiet: bool = False):
        self.mode = mode
        self.out = out if out is not None else sys.stdout
        self.err = err if err is not None else sys.stderr
        self.ask_in = ask_in if ask_in is not None else sys.stdin
        self.quiet = quiet
        self.progress = Progress(self.err, progress)
        self.findings: list[Finding] = []
        self.layers: list[LayerResult] = []
        self.current: LayerResult | None = None
        self.yes_to_all = False
        self.repairs_allowed = mode != "n"
        self.notes: list[str] = []
        self.operational_error: str | None = None
        self.cancelled = False
        self.unexpected = False
        self._t0 = 0.0

    # -- layers ---------------------------------------------------------------------

    def begin_layer(self, layer: int) -> None:
        self.current = LayerResult(layer, LAYERS[layer])
        self.layers.append(self.current)
        self._t0 = time.monotonic()

    def end_layer(self, summary: str) -> None:
        cur = self.current
        self.progress.clear()
        cur.seconds = round(time.monotonic() - self._t0, 3)
        cur.summary = summary
        if cur.errors:
            tail = f"{cur.errors} error(s), {cur.fixed} fixed"
        else:
            tail = "ok"
        self.say(f"Layer {cur.layer} {cur.name}: {summary}; {tail}")
        self.current = None

    def say(self, line: str) -> None:
        self.progress.clear()
        if not self.quiet:
            print(line, file=self.out, flush=True)

    def note(self, line: str) -> None:
        """An informational line (kept in the JSON report too)."""
        self.notes.append(line)
        self.say(line)

    # -- findings ---------------------------------------------------------------------

    def warn(self, code: str, message: str, **kw) -> Finding:
        f = Finding(self.current.layer if self.current else 0, code, message,
                    severity="warning", **kw)
        self.findings.append(f)
        if self.current:
            self.current.warnings += 1
        self.say(f"  WARNING: {message}")
        return f

    def problem(self, code: str, message: str, fix: str = "", *, safe: bool = False,
                can_fix: bool = True, **kw) -> bool:
        """Record a problem of the current layer; return whether to repair it now.

        Args:
            code: short machine-readable kind ("leaked-blocks", ...).
            message: one line naming the damage.
            fix: what the repair does ("free them"); empty when nothing can be done.
            safe: may be repaired by -p.
            can_fix: False when the repair is impossible in this run (the finding
                stays uncorrected whatever the mode).
        """
        layer = self.current.layer
        f = Finding(layer, code, message, fix=fix, safe=safe, **kw)
        self.findings.append(f)
        self.current.errors += 1
        do = False
        if fix and can_fix and self.repairs_allowed:
            do = self._decide(f)
        elif fix and can_fix and self.mode == "p" and not safe:
            # -p after repairs were disabled: still an unexpected inconsistency
            do = False
        f.fixed = do
        if do:
            self.current.fixed += 1
            self.say(f"  {message}: {fix}")
        elif fix:
            self.say(f"  {message}: not fixed (would {fix})")
        else:
            self.say(f"  {message}")
        return do

    def record(self, code: str, message: str, fix: str, fixed: bool, *,
               safe: bool = False, **kw) -> None:
        """Record a problem whose repair was decided with another finding's."""
        f = Finding(self.current.layer, code, message, fix=fix, safe=safe, fixed=fixed, **kw)
        self.findings.append(f)
        self.current.errors += 1
        if fixed:
            self.current.fixed += 1
            self.say(f"  {message}: {fix}")
        else:
            self.say(f"  {message}: not fixed (would {fix})")

    def unfix(self, f_or_none=None, why: str = "") -> None:
        """The repair just approved failed: count the last finding as uncorrected."""
        f = f_or_none or self.findings[-1]
        if f.fixed:
            f.fixed = False
            for res in self.layers:
                if res.layer == f.layer:
                    res.fixed -= 1
                    break
        if why:
            self.say(f"    repair failed: {why}")

    def _decide(self, f: Finding) -> bool:
        if self.mode == "y" or self.yes_to_all:
            return True
        if self.mode == "p":
            if f.safe:
                return True
            self.unexpected = True
            raise Unexpected(f.message)
        # interactive
        self.progress.clear()
        while True:
            self.err.write(f"  {f.message}.\n  Fix ({f.fix})? [y]es/[n]o/[a]ll/[q]uit: ")
            self.err.flush()
            line = self.ask_in.readline()
            if not line:
                raise Cancelled()
            ans = line.strip().lower()
            if ans in ("y", "yes"):
                return True
            if ans in ("n", "no"):
                return False
            if ans in ("a", "all"):
                self.yes_to_all = True
                return True
            if ans in ("q", "quit"):
                raise Cancelled()

    # -- results ---------------------------------------------------------------------

    def errors(self) -> int:
        return sum(1 for f in self.findings if f.severity == "error")

    def fixed(self) -> int:
        return sum(1 for f in self.findings if f.severity == "error" and f.fixed)

    def exit_code(self) -> int:
        if self.operational_error is not None:
            code = EXIT_OPERATIONAL
        else:
            code = EXIT_OK
        if self.fixed():
            code |= EXIT_FIXED
        if self.errors() > self.fixed() or self.unexpected:
            code |= EXIT_UNCORRECTED
        if self.cancelled:
            code |= EXIT_CANCELLED
        return code

    def as_dict(self, volume: str, extra: dict | None = None) -> dict:
        return {
            "volume": volume,
            "mode": self.mode,
            "exit_code": self.exit_code(),
            "errors": self.errors(),
            "fixed": self.fixed(),
            "operational_error": self.operational_error,
            "cancelled": self.cancelled,
            "layers": [asdict(r) for r in self.layers],
            "findings": [f.as_dict() for f in self.findings],
            "notes": self.notes,
            **(extra or {}),
        }

    def write_json(self, path: str, volume: str, extra: dict | None = None) -> None:
        data = self.as_dict(volume, extra)
        if path == "-":
            json.dump(data, sys.stdout, indent=1)
            sys.stdout.write("\n")
            return
        with open(path, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
