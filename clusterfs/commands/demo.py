"""``make demo``: a three-node cluster on one volume, end to end.

1. make a key and a volume (a sparse image file);
2. mount it as three nodes (three ``clusterfs mount`` processes, no lock manager
   address: every node runs a lock manager candidate, one is elected master through
   the volume);
3. write a large file on node1 and checksum it on the two others;
4. the node that hosts the lock manager opens it for writing; another node's open
   for writing gets EBUSY;
5. kill that node (the lock manager's host) with SIGKILL: the others elect a new
   master, go on (a create succeeds on each), recover the dead node (journal replay,
   locks released) and then open the file for writing;
6. unmount everything, check the volume with fsck.

Everything lives in a temporary directory and is cleaned up, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

PY = sys.executable


def say(msg: str) -> None:
    print(f"\n=== {msg}", flush=True)


def cli(*args, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([PY, "-m", "clusterfs.cli", *args], capture_output=True, text=True)
    if check and proc.returncode:
        raise RuntimeError(f"clusterfs {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Demo:
    def __init__(self, work: str, size_mib: int):
        self.work = work
        self.size_mib = size_mib
        self.procs: dict[str, subprocess.Popen] = {}
        self.mounts: dict[str, str] = {}

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(os.path.join(self.work, f"{name}.log"), "ab")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def log_lines(self, name: str, *needles: str) -> list[str]:
        with open(os.path.join(self.work, f"{name}.log"), errors="replace") as f:
            return [ln.rstrip() for ln in f if any(n in ln for n in needles)]

    def mount(self, node: str, volume: str, key: str) -> str:
        mnt = os.path.join(self.work, node)
        os.mkdir(mnt)
        proc = self.start(node, [PY, "-m", "clusterfs.cli", "mount", "--foreground", volume,
                                 mnt, "--key", key, "--node", node, "--listen",
                                 f"127.0.0.1:{free_port()}"])
        deadline = time.monotonic() + 60
        while not os.path.ismount(mnt):
            if proc.poll() is not None:
                raise RuntimeError(f"{node} failed to mount:\n"
                                   + "\n".join(self.log_lines(node, "")))
            if time.monotonic() > deadline:
                raise RuntimeError(f"{node} did not mount in time")
            time.sleep(0.05)
        self.mounts[node] = mnt
        return mnt

    def unmount(self, node: str) -> None:
        mnt = self.mounts.pop(node, None)
        if mnt and os.path.ismount(mnt):
            if subprocess.run(["fusermount3", "-u", mnt], capture_output=True).returncode:
                subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
        proc = self.procs.pop(node, None)
        if proc is not None:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def cleanup(self) -> None:
        for node in list(self.mounts):
            self.unmount(node)
        for name, proc in list(self.procs.items()):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            self.procs.pop(name, None)

    def master(self, volume: str) -> dict | None:
        import json
        return json.loads(cli("status", volume, "--watch", "0", "--json").stdout)["master"]

    def run(self) -> None:
        key = os.path.join(self.work, "cluster.key")
        volume = os.path.join(self.work, "volume.img")

        say("1. a key and a volume")
        cli("keygen", key)
        print(cli("mkfs", volume, "--size", f"{max(1024, self.size_mib * 4)}M",
                  "--slots", "4", "--label", "demo").stdout.rstrip())

        say("2. mount it as three nodes (no lock manager address: the volume elects one)")
        for node in ("node1", "node2", "node3"):
            mnt = self.mount(node, volume, key)
            print(f"{node}: {volume} mounted on {mnt}")
        print(cli("status", volume, "--watch", "1.2", "--key", key).stdout.rstrip())

        say(f"3. write {self.size_mib} MiB on node1, checksum it on every node")
        chunk = os.urandom(1 << 20)
        digest = hashlib.sha256()
        t = time.monotonic()
        with open(os.path.join(self.mounts["node1"], "disk.img"), "wb") as f:
            for i in range(self.size_mib):
                block = bytes([i & 0xFF]) + chunk[1:]
                f.write(block)
                digest.update(block)
            os.fsync(f.fileno())
        print(f"node1 wrote disk.img in {time.monotonic() - t:.1f}s, sha256 "
              f"{digest.hexdigest()[:16]}...")
        for node in ("node2", "node3"):
            t = time.monotonic()
            h = self.checksum(node)
            ok = "same" if h == digest.digest() else "DIFFERENT"
            print(f"{node} read it in {time.monotonic() - t:.1f}s ({ok})")
            if h != digest.digest():
                raise RuntimeError("checksums differ")

        master = self.master(volume)["node"]
        others = [n for n in ("node1", "node2", "node3") if n != master]
        say(f"4. {master} (it hosts the lock manager) opens disk.img for writing; "
            f"{others[0]} may not")
        holder = subprocess.Popen([PY, "-c",
                                   "import os,sys,time; fd=os.open(sys.argv[1], os.O_WRONLY); "
                                   "print('open', flush=True); time.sleep(3600)",
                                   os.path.join(self.mounts[master], "disk.img")],
                                  stdout=subprocess.PIPE, text=True, start_new_session=True)
        self.procs["writer"] = holder
        holder.stdout.readline()
        print(f"{master}: disk.img open for writing")
        try:
            os.close(os.open(os.path.join(self.mounts[others[0]], "disk.img"), os.O_WRONLY))
            raise RuntimeError(f"{others[0]} could open the file for writing")
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
            print(f"{others[0]}: open for writing -> EBUSY (the cluster open mode is "
                  f"{master}'s)")

        say(f"5. kill {master}, the lock manager's host, with SIGKILL; the others go on")
        proc = self.procs.pop(master)
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGKILL)      # the mount and its lock manager
        proc.wait()
        subprocess.run(["fusermount3", "-u", "-z", self.mounts.pop(master)],
                       capture_output=True)
        holder.kill()
        holder.wait()
        self.procs.pop("writer")
        print(f"{master} killed")
        for node in others:
            with open(os.path.join(self.mounts[node], f"after-{node}"), "wb") as f:
                f.write(b"still here\n")
                os.fsync(f.fileno())
            print(f"{node}: created and fsynced a file {time.monotonic() - t0:.1f}s after "
                  f"the kill")
        new = self.master(volume)
        print(f"new lock manager master: {new['node']} (generation {new['generation']})")
        while True:
            try:
                fd = os.open(os.path.join(self.mounts[others[0]], "disk.img"), os.O_WRONLY)
                break
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise
                time.sleep(0.1)
        os.close(fd)
        print(f"{others[0]}: open for writing succeeded {time.monotonic() - t0:.1f}s after "
              f"the kill ({master} recovered)")
        time.sleep(0.3)
        for node in others:
            for line in self.log_lines(node, "recover", "replayed", "declared dead",
                                       "elected", "reclaimed"):
                print("  " + line)
        h = self.checksum(others[1])
        print(f"{others[1]}: disk.img still", "intact" if h == digest.digest() else "DAMAGED")

        say("6. unmount, check the volume")
        for node in others:
            self.unmount(node)
            print(f"{node} unmounted")
        print(cli("status", volume, "--watch", "0").stdout.rstrip())
        from clusterfs import cli as climod
        if "fsck.cli" in climod.SUBCOMMAND_MODULES:
            proc = cli("fsck", "-fn", volume, check=False)
            print(proc.stdout.rstrip() or proc.stderr.rstrip())
            print(f"fsck exit status {proc.returncode}")
            if proc.returncode:
                raise RuntimeError("fsck found problems")
        say("done: the cluster wrote, shared, survived the death of its lock manager's "
            "node, and left a clean volume")

    def checksum(self, node: str) -> bytes:
        h = hashlib.sha256()
        with open(os.path.join(self.mounts[node], "disk.img"), "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        return h.digest()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="MiB written on node1")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("make demo needs root (FUSE mounts with allow_other)", file=sys.stderr)
        return 2
    work = tempfile.mkdtemp(prefix="clusterfs-demo-")
    demo = Demo(work, args.size)
    signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        demo.run()
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up", file=sys.stderr)
        return 130
    except Exception as e:
        print(f"\ndemo failed: {e}\n(logs in {work})", file=sys.stderr)
        args.keep = True
        return 1
    finally:
        demo.cleanup()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
