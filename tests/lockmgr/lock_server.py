"""A plain lock server in a process of its own, for the tests of the lock manager
library across processes (clusterfs members run theirs through the volume's election:
``clusterfs lockd VOLUME``).

Usage: python -m tests.lockmgr.lock_server KEYFILE HOST:PORT [--unix PATH]
[--lease S] [--grace S] [--deadlock-wait S]  (from the repository's top directory)

Serves until SIGINT or SIGTERM, then exits 0.
"""

import argparse
import logging
import signal

import trio

from lockmgr import LockServer, load_key


async def main(args) -> None:
    server = LockServer(load_key(args.keyfile), lease=args.lease, grace=args.grace,
                        deadlock_wait=args.deadlock_wait)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run, args.listen, args.unix)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as sigs:
            async for sig in sigs:
                logging.info("signal %d: shutting down", sig)
                nursery.cancel_scope.cancel()
                return


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("keyfile")
    p.add_argument("listen")
    p.add_argument("--unix")
    p.add_argument("--lease", type=float, default=5.0)
    p.add_argument("--grace", type=float, default=None)
    p.add_argument("--deadlock-wait", type=float, default=1.0)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    trio.run(main, p.parse_args())
