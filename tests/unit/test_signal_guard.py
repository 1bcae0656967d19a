"""The mount's signal guard once its serve loop has ended: a SIGTERM that arrives
between the end of the trio run and the leave is ignored, not an exception raised in
the middle of the unmount's clean-up."""

import logging
import signal
from types import SimpleNamespace

import trio

from clusterfs.fuse.mount import _SignalGuard


def test_sigterm_after_the_serve_loop_ended_is_ignored(caplog):
    guard = _SignalGuard(SimpleNamespace(terminated=False), "/nonexistent")
    try:
        async def serving():
            guard.serving()

        trio.run(serving)               # the run ends; the guard still says serving
        with caplog.at_level(logging.INFO, logger="clusterfs.fuse.mount"):
            guard._handler(signal.SIGTERM, None)
        assert "ignored" in caplog.text
    finally:
        guard.restore()
