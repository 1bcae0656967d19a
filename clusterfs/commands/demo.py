"""``make demo``: a three-node cluster on one volume, end to end.

1. make a key and start a lock manager on 127.0.0.1;
2. make a volume (a sparse image file);
3. mount it as three nodes (three ``clusterfs mount`` processes);
4. write a large file on node1 and checksum it on node2 and node3;
5. node2 opens it for writing; node3's open for writing gets EBUSY;
6. kill node2 with SIGKILL: node3 recovers it (journal replay, locks released) and
   then opens the file for writing;
7. unmount everything, stop the lock manager, check the volume with fsck.

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

    def mount(self, node: str, volume: str, lockd: str, key: str) -> str:
        mnt = os.path.join(self.work, node)
        os.mkdir(mnt)
        proc = self.start(node, [PY, "-m", "clusterfs.cli", "mount", "--foreground", volume,
                                 mnt, "--lockd", lockd, "--key", key, "--node", node])
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

    def run(self) -> None:
        key = os.path.join(self.work, "cluster.key")
        volume = os.path.join(self.work, "volume.img")
        lockd = f"127.0.0.1:{free_port()}"

        say("1. a key and a lock manager")
        cli("keygen", key)
        self.start("lockd", [PY, "-m", "clusterfs.cli", "lockd", "--listen", lockd,
                             "--key", key, "--grace", "1"])
        time.sleep(0.5)
        print(f"clusterfs lockd listening on {lockd}")

        say("2. a volume")
        print(cli("mkfs", volume, "--size", f"{max(1024, self.size_mib * 4)}M",
                  "--slots", "4", "--label", "demo").stdout.rstrip())

        say("3. mount it as three nodes")
        for node in ("node1", "node2", "node3"):
            mnt = self.mount(node, volume, lockd, key)
            print(f"{node}: {volume} mounted on {mnt}")
        print(cli("status", volume, "--watch", "1.2").stdout.rstrip())

        say(f"4. write {self.size_mib} MiB on node1, checksum it on every node")
        n1, n2, n3 = (self.mounts[n] for n in ("node1", "node2", "node3"))
        chunk = os.urandom(1 << 20)
        digest = hashlib.sha256()
        t = time.monotonic()
        with open(os.path.join(n1, "disk.img"), "wb") as f:
            for i in range(self.size_mib):
                block = bytes([i & 0xFF]) + chunk[1:]
                f.write(block)
                digest.update(block)
            os.fsync(f.fileno())
        print(f"node1 wrote disk.img in {time.monotonic() - t:.1f}s, sha256 {digest.hexdigest()[:16]}...")
        for node, mnt in (("node2", n2), ("node3", n3)):
            t = time.monotonic()
            h = hashlib.sha256()
            with open(os.path.join(mnt, "disk.img"), "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
            ok = "same" if h.digest() == digest.digest() else "DIFFERENT"
            print(f"{node} read it in {time.monotonic() - t:.1f}s, sha256 {h.hexdigest()[:16]}... ({ok})")
            if h.digest() != digest.digest():
                raise RuntimeError("checksums differ")

        say("5. node2 opens disk.img for writing; node3 may not")
        holder = subprocess.Popen([PY, "-c",
                                   "import os,sys,time; fd=os.open(sys.argv[1], os.O_WRONLY); "
                                   "print('open', flush=True); time.sleep(3600)",
                                   os.path.join(n2, "disk.img")],
                                  stdout=subprocess.PIPE, text=True, start_new_session=True)
        self.procs["writer"] = holder
        holder.stdout.readline()
        print("node2: disk.img open for writing")
        try:
            os.close(os.open(os.path.join(n3, "disk.img"), os.O_WRONLY))
            raise RuntimeError("node3 could open the file for writing")
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
            print("node3: open for writing -> EBUSY (the cluster open mode is node2's)")

        say("6. kill node2 with SIGKILL; node3 recovers it")
        node2 = self.procs.pop("node2")
        t0 = time.monotonic()
        node2.kill()
        node2.wait()
        subprocess.run(["fusermount3", "-u", "-z", self.mounts.pop("node2")], capture_output=True)
        holder.kill()
        holder.wait()
        self.procs.pop("writer")
        print("node2 killed")
        while True:
            try:
                fd = os.open(os.path.join(n3, "disk.img"), os.O_WRONLY)
                break
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise
                time.sleep(0.1)
        os.close(fd)
        print(f"node3: open for writing succeeded {time.monotonic() - t0:.1f}s after the kill")
        time.sleep(0.3)
        for line in self.log_lines("node1", "recover", "replayed", "declared dead") + \
                self.log_lines("node3", "recover", "replayed", "declared dead"):
            print("  " + line)
        h = hashlib.sha256()
        with open(os.path.join(n1, "disk.img"), "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        print("node1: disk.img still", "intact" if h.digest() == digest.digest() else "DAMAGED")

        say("7. unmount, stop the lock manager, check the volume")
        for node in ("node1", "node3"):
            self.unmount(node)
            print(f"{node} unmounted")
        lockd_proc = self.procs.pop("lockd")
        lockd_proc.send_signal(signal.SIGTERM)
        lockd_proc.wait(timeout=20)
        print(cli("status", volume, "--watch", "0").stdout.rstrip())
        from clusterfs import cli as climod
        if "fsck.cli" in climod.SUBCOMMAND_MODULES:
            proc = cli("fsck", "-fn", volume, check=False)
            print(proc.stdout.rstrip() or proc.stderr.rstrip())
            print(f"fsck exit status {proc.returncode}")
            if proc.returncode:
                raise RuntimeError("fsck found problems")
        say("done: the cluster wrote, shared, survived a killed node, and left a clean volume")


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
