"""A lock client in a process of its own, driven by JSON lines on stdin.

Usage: python -m tests.lockmgr.lock_worker ADDR KEYFILE NODE SLOT [LEASE]
(from the repository's top directory)

Each stdin line is a command ``{"id": N, "op": ..., ...}``; each runs as a task of its
own and answers ``{"id": N, "ok": ...}`` or ``{"id": N, "error": "ExceptionName",
"msg": ...}`` on stdout.  Events are printed as they come: ``{"event": "bast", ...}``,
``{"event": "node_down", ...}``, ``{"event": "lease_lost"}``.

Operations: lock, convert, unlock, status, recovered, incr (a read-modify-write loop on
a counter file under an EX lock: lost updates would show a lock granted twice), exit.
"""

import json
import os
import sys

import trio

from lockmgr import LockClient, Mode, downgrade_for, load_key


def out(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def main(addr, keyfile, node, slot, lease):
    key = load_key(keyfile)
    async with trio.open_nursery() as nursery:
        client = await LockClient.connect(addr, key, node, slot, nursery=nursery,
                                          lease=lease)

        async def node_down(name, s):
            out({"event": "node_down", "node": name, "slot": s})

        client.on_node_down(node_down)

        async def watch_lease():
            while True:
                await client.wait_lease_lost()
                out({"event": "lease_lost", "generation": client.generation})
                while not client.lease_valid():
                    await trio.sleep(0.05)

        nursery.start_soon(watch_lease)

        def handler_for(kind):
            if kind in (None, "none"):
                return None

            async def on_blocking(name, mode):
                out({"event": "bast", "name": name.decode(), "mode": Mode(mode).name})
                if kind == "release":
                    await client.unlock(name)
                elif kind == "downgrade":
                    held = client.held(name)
                    if held is not None:
                        await client.convert(name, downgrade_for(held.mode, mode))
            return on_blocking

        async def run(cmd):
            cid = cmd.get("id")
            op = cmd["op"]
            try:
                name = cmd.get("name", "").encode()
                lvb = bytes.fromhex(cmd["lvb"]) if cmd.get("lvb") else None
                if op == "lock":
                    g = await client.lock(name, Mode[cmd["mode"]],
                                          try_lock=cmd.get("try", False),
                                          timeout=cmd.get("timeout"),
                                          on_blocking=handler_for(cmd.get("on_blocking")))
                    res = {"mode": g.mode.name, "lvb": g.lvb.hex() if g.lvb else None}
                elif op == "convert":
                    g = await client.convert(name, Mode[cmd["mode"]], lvb=lvb,
                                             try_lock=cmd.get("try", False),
                                             timeout=cmd.get("timeout"))
                    res = {"mode": g.mode.name, "lvb": g.lvb.hex() if g.lvb else None}
                elif op == "unlock":
                    await client.unlock(name, lvb=lvb)
                    res = True
                elif op == "status":
                    res = await client.status()
                elif op == "recovered":
                    res = await client.report_recovered(cmd["slot"])
                elif op == "incr":
                    res = await incr(client, name, cmd["path"], cmd["count"])
                elif op == "exit":
                    out({"id": cid, "ok": True})
                    if cmd.get("close", True):
                        await client.close()
                    nursery.cancel_scope.cancel()
                    return
                else:
                    raise ValueError(f"unknown op {op}")
                out({"id": cid, "ok": res})
            except Exception as e:
                out({"id": cid, "error": type(e).__name__, "msg": str(e)})

        stdin = trio.lowlevel.FdStream(os.dup(0))
        buf = b""
        out({"event": "ready", "session": client.session_id})
        while True:
            data = await stdin.receive_some(65536)
            if not data:
                break
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.strip():
                    nursery.start_soon(run, json.loads(line))
        await client.close()
        nursery.cancel_scope.cancel()


async def incr(client, name: bytes, path: str, count: int) -> int:
    """``count`` times: lock EX, read the counter file, yield, write it + 1, unlock."""
    for _ in range(count):
        await client.lock(name, Mode.EX)
        with open(path) as f:
            value = int(f.read() or 0)
        await trio.sleep(0.001)     # widen the window a double grant would need
        with open(path, "w") as f:
            f.write(str(value + 1))
        await client.unlock(name)
    return count


if __name__ == "__main__":
    a = sys.argv[1:]
    trio.run(main, a[0], a[1], a[2], int(a[3]), float(a[4]) if len(a) > 4 else 5.0)
