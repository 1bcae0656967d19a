"""Build a small real guest from Debian packages, offline from anything but the Debian mirror.

The guest is a Debian cloud kernel (`linux-image-*-cloud-amd64`, fetched with
`apt-get download` and unpacked with `dpkg-deb -x`, never installed) and an initramfs
written here in Python (cpio "newc") holding a static busybox (`busybox-static`, fetched
the same way), the virtio modules the kernel has as modules (with their dependencies,
read from each module's `.modinfo`: the package ships no `modules.dep`, depmod writes it
at install time) and `/init` (`INIT_SCRIPT` below).

What `/init` does, driven by the kernel command line (`cfsvm.*` parameters):
- Every `cfsvm.interval` seconds it writes one record
  ``CFSREC seq=N boot=BOOT_ID up=UPTIME`` to its disk (`cfsvm.disk`, 512 bytes padded
  with spaces and ended by a newline, at byte offset ``N * 512``, O_DIRECT) and then,
  once the disk write has completed, the same line to the console (ttyS0). So every
  record seen on the console is on the disk.
- It answers requests on a second serial port (`cfsvm.ctl`, ttyS1), one line each:
  ``ID ping``, ``ID fill MIB`` (fill MIB MiB of a tmpfs with /dev/urandom data, reply
  with its md5), ``ID sum`` (md5 of that data again), ``ID last``, ``ID discard OFF
  LEN`` (blkdiscard of LEN bytes at byte OFF of the disk: a guest's discard, which
  QEMU turns into a punched hole) and ``ID quiesce`` (stop counting, sync, reply
  with the last sequence number). Replies are
  ``CFSCTL ID key=value ...``.
- `cfsvm.fill=MIB` fills RAM at boot already.

Built artefacts are cached under `cache_dir()` keyed by the package versions and a hash
of this builder, so only the first run of a machine pays for them. Binaries never go in
the repository.

CLI: ``python -m tests.vm.guest build [DIR]`` builds (or finds in the cache) the guest
and copies `vmlinuz` and `initrd.cpio` into DIR if given.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
HOST_PACKAGES = ("qemu-system-x86", "qemu-utils", "cpio")
HOST_TOOLS = ("qemu-system-x86_64", "qemu-img")

# Modules /init loads, in this order after their dependencies. The cloud kernel has the
# 8250 serial driver built in, so the console and the control port need no module.
WANTED_MODULES = ("virtio_pci", "virtio_blk")

# Bump when the layout of the initramfs changes in a way the hash of INIT_SCRIPT misses.
BUILDER_REVISION = 1

DEFAULT_CACHE = Path("/var/cache/clusterfs-vm")
KEEP_CACHED = 4  # built guests kept in the cache (about 16 MiB each)


class GuestUnavailable(RuntimeError):
    """The host cannot build or run the guest (no QEMU, no Debian mirror, not root...)."""


INIT_SCRIPT = r"""#!/bin/busybox sh
# clusterfs test guest: count to the disk and console, fill RAM on request.
/bin/busybox mkdir -p /proc /sys /dev /run /fill
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo 1 > /proc/sys/kernel/printk

INTERVAL=0.2; DISK=/dev/vda; CON=/dev/ttyS0; CTL=/dev/ttyS1; FILL=0
for w in $(cat /proc/cmdline); do
    case "$w" in
        cfsvm.interval=*) INTERVAL=${w#*=} ;;
        cfsvm.disk=*) DISK=${w#*=} ;;
        cfsvm.con=*) CON=${w#*=} ;;
        cfsvm.ctl=*) CTL=${w#*=} ;;
        cfsvm.fill=*) FILL=${w#*=} ;;
    esac
done
say() { echo "$*" > "$CON"; }

for m in $(cat /lib/modules/load.order); do
    insmod "/lib/modules/$m.ko" || say "CFSERR insmod $m"
done
i=0
while [ ! -b "$DISK" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
[ -b "$DISK" ] || say "CFSERR no disk $DISK"
mount -t tmpfs -o size=95% tmpfs /fill
BOOT=$(cat /proc/sys/kernel/random/boot_id)
read up idle < /proc/uptime
say "CFSBOOT boot=$BOOT up=$up disk=$DISK interval=$INTERVAL"

counter() {
    n=0
    while [ ! -e /run/stop ]; do
        read up idle < /proc/uptime
        rec="CFSREC seq=$n boot=$BOOT up=$up"
        if printf '%-511s\n' "$rec" | dd of="$DISK" bs=512 seek=$n count=1 \
                iflag=fullblock oflag=direct conv=notrunc 2>/dev/null; then
            say "$rec"
            echo $n > /run/last
            n=$((n + 1))
        else
            say "CFSERR disk write seq=$n"
        fi
        sleep "$INTERVAL"
    done
    sync
    touch /run/stopped
}

fill() {
    rm -f /fill/data
    dd if=/dev/urandom of=/fill/data bs=1048576 count="$1" iflag=fullblock 2>/dev/null
    s=$(md5sum /fill/data)
    echo "${s%% *}" > /run/fill.md5
}

[ "$FILL" -gt 0 ] && fill "$FILL"
counter &

exec 3<>"$CTL"
stty -F "$CTL" raw -echo
reply() { echo "CFSCTL $*" >&3; }
while :; do
    if ! read -r id cmd arg <&3; then sleep 0.2; continue; fi
    case "$cmd" in
        ping) reply "$id pong boot=$BOOT" ;;
        fill)
            read t0 idle < /proc/uptime
            fill "$arg"
            read t1 idle < /proc/uptime
            reply "$id filled mib=$arg md5=$(cat /run/fill.md5) t0=$t0 t1=$t1" ;;
        sum)
            if [ -e /fill/data ]; then
                read t0 idle < /proc/uptime
                s=$(md5sum /fill/data)
                read t1 idle < /proc/uptime
                reply "$id sum md5=${s%% *} bytes=$(stat -c %s /fill/data) t0=$t0 t1=$t1"
            else
                reply "$id sum md5=none bytes=0"
            fi ;;
        last) reply "$id last seq=$(cat /run/last 2>/dev/null)" ;;
        discard)
            off=${arg%% *}; len=${arg##* }
            if blkdiscard -o "$off" -l "$len" "$DISK" 2>/dev/null; then
                reply "$id discarded off=$off len=$len"
            else
                reply "$id error discard"
            fi ;;
        quiesce)
            touch /run/stop
            while [ ! -e /run/stopped ]; do sleep 0.1; done
            reply "$id quiesced last=$(cat /run/last 2>/dev/null)" ;;
        *) reply "$id error unknown=$cmd" ;;
    esac
done
"""


@dataclasses.dataclass(frozen=True)
class Guest:
    """A built guest: paths of its kernel and initramfs, and what it was built from."""

    kernel: Path
    initrd: Path
    kernel_package: str
    kernel_version: str
    busybox_version: str

    def cmdline(self, *, interval_s: float = 0.2, fill_mib: int = 0) -> str:
        """Kernel command line for this guest with its `cfsvm.*` parameters."""
        return (
            "console=ttyS0 loglevel=3 panic=-1 "
            f"cfsvm.interval={interval_s:g} cfsvm.fill={int(fill_mib)} "
            "cfsvm.disk=/dev/vda cfsvm.ctl=/dev/ttyS1"
        )


# --------------------------------------------------------------------------- host tools


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def ensure_host_tools() -> None:
    """Install QEMU from Debian when it is missing.

    Raises:
        GuestUnavailable: QEMU is missing and cannot be installed here.
    """
    if all(shutil.which(t) for t in HOST_TOOLS):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise GuestUnavailable("qemu-system-x86_64/qemu-img missing and apt-get not usable (need root)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True, env=env, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *HOST_PACKAGES],
                       check=True, capture_output=True, env=env, timeout=1200)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        err = getattr(e, "stderr", b"") or b""
        raise GuestUnavailable(f"apt-get install {' '.join(HOST_PACKAGES)} failed: "
                               f"{err.decode(errors='replace').strip()[-300:]}") from e
    if not all(shutil.which(t) for t in HOST_TOOLS):
        raise GuestUnavailable("QEMU still missing after apt-get install")


def cache_dir() -> Path:
    """Where built guests are kept: $CLUSTERFS_VM_CACHE, /var/cache/clusterfs-vm, or ~/.cache."""
    env = os.environ.get("CLUSTERFS_VM_CACHE")
    if env:
        return Path(env)
    try:
        DEFAULT_CACHE.mkdir(parents=True, exist_ok=True)
        if os.access(DEFAULT_CACHE, os.W_OK):
            return DEFAULT_CACHE
    except OSError:
        pass
    return Path.home() / ".cache" / "clusterfs-vm"


# --------------------------------------------------------------------------- apt


def _candidate_versions(*packages: str) -> dict[str, str]:
    """{package: version apt would install} for those PACKAGES apt knows (one apt-cache run)."""
    try:
        out = _run(["apt-cache", "policy", *packages], timeout=60).stdout
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return {}
    found: dict[str, str] = {}
    current = None
    for line in out.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            current = line[:-1]
        elif current and line.strip().startswith("Candidate:"):
            v = line.split(":", 1)[1].strip()
            if v and v != "(none)":
                found[current] = v
    return found


def _kernel_package() -> str | None:
    """The concrete `linux-image-X-cloud-amd64` package the meta-package points at."""
    try:
        out = _run(["apt-cache", "depends", KERNEL_META_PACKAGE], timeout=60).stdout
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "Depends:" and parts[1].startswith("linux-image-") \
                and parts[1].endswith("-cloud-amd64"):
            return parts[1]
    return None


def _resolve_packages(update_if_missing: bool = True) -> tuple[str, str, str] | None:
    """(kernel package, its version, busybox-static version) that apt offers, or None."""
    kpkg = _kernel_package()
    versions = _candidate_versions(*filter(None, (kpkg, BUSYBOX_PACKAGE)))
    kver = versions.get(kpkg) if kpkg else None
    bver = versions.get(BUSYBOX_PACKAGE)
    if (not kpkg or not kver or not bver) and update_if_missing and os.geteuid() == 0:
        with contextlib.suppress(OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
            _run(["apt-get", "update", "-qq"], timeout=600)
        return _resolve_packages(update_if_missing=False)
    if not kpkg or not kver or not bver:
        return None
    return kpkg, kver, bver


def _download_and_extract(package: str, version: str, into: Path) -> None:
    """`apt-get download PKG=VERSION` then `dpkg-deb -x` into INTO (nothing installed)."""
    with tempfile.TemporaryDirectory(prefix="cfsvm-deb-") as dl:
        os.chmod(dl, 0o777)  # lets apt's sandbox user write there (no warning)
        try:
            _run(["apt-get", "download", "-q", f"{package}={version}"], cwd=dl, timeout=900)
        except subprocess.CalledProcessError as e:
            raise GuestUnavailable(f"apt-get download {package}={version} failed: {e.stderr.strip()[-300:]}") from e
        debs = list(Path(dl).glob("*.deb"))
        if len(debs) != 1:
            raise GuestUnavailable(f"apt-get download {package}: expected one .deb, got {debs}")
        _run(["dpkg-deb", "-x", str(debs[0]), str(into)], timeout=900)


# --------------------------------------------------------------------------- modules


def modinfo(path: Path) -> dict[str, list[str]]:
    """The `.modinfo` section of a kernel module (ELF64 little endian) as key -> values."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError(f"{path}: not an ELF64 little-endian module")
    e_shoff, = struct.unpack_from("<Q", data, 0x28)
    e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        off = e_shoff + i * e_shentsize
        name, = struct.unpack_from("<I", data, off)
        offset, size = struct.unpack_from("<QQ", data, off + 0x18)
        return name, offset, size

    _, stroff, _ = section(e_shstrndx)
    info: dict[str, list[str]] = {}
    for i in range(e_shnum):
        name, offset, size = section(i)
        end = data.index(b"\0", stroff + name)
        if data[stroff + name:end] != b".modinfo":
            continue
        for item in data[offset:offset + size].split(b"\0"):
            if b"=" in item:
                k, v = item.decode(errors="replace").split("=", 1)
                info.setdefault(k, []).append(v)
    return info


def _norm(name: str) -> str:
    return name.replace("-", "_")


def module_load_order(modules_root: Path, wanted: tuple[str, ...] = WANTED_MODULES) -> list[Path]:
    """The .ko files to insmod, dependencies first, for the WANTED modules.

    Args:
        modules_root: `lib/modules/<version>` of the unpacked kernel package.
        wanted: module names; those built into the kernel are skipped.

    Raises:
        GuestUnavailable: a wanted module is neither a module nor built in.
    """
    by_name = {_norm(p.name[:-3]): p for p in modules_root.rglob("*.ko")}
    builtin_file = modules_root / "modules.builtin"
    builtin = set()
    if builtin_file.exists():
        builtin = {_norm(Path(line.strip()).name.removesuffix(".ko"))
                   for line in builtin_file.read_text().splitlines() if line.strip()}
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        name = _norm(name)
        if name in seen:
            return
        seen.add(name)
        if name not in by_name:
            if name in builtin:
                return
            raise GuestUnavailable(f"kernel module {name} not found in {modules_root}")
        deps = modinfo(by_name[name]).get("depends", [""])[0]
        for dep in filter(None, deps.split(",")):
            visit(dep)
        order.append(by_name[name])

    for w in wanted:
        visit(w)
    return order


# --------------------------------------------------------------------------- cpio


class CpioWriter:
    """Minimal cpio "newc" archive writer (the initramfs format the kernel reads)."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        namez = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 2 if mode & 0o040000 else 1, 0, len(data),
                  0, 0, rdev[0], rdev[1], len(namez), 0)
        self._ino += 1
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._buf.write(hdr + namez)
        self._buf.write(b"\0" * (-(len(hdr) + len(namez)) % 4))
        self._buf.write(data)
        self._buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, 0o020000 | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._ino = 0
        self._entry("TRAILER!!!", 0)
        data = self._buf.getvalue()
        return data + b"\0" * (-len(data) % 512)


def build_initramfs(busybox: Path, modules: list[Path], init_script: str = INIT_SCRIPT) -> bytes:
    """The initramfs (uncompressed cpio) holding busybox, MODULES (in load order) and /init."""
    w = CpioWriter()
    for d in ("bin", "dev", "proc", "sys", "run", "fill", "lib", "lib/modules"):
        w.dir(d)
    w.chardev("dev/console", 5, 1)
    w.chardev("dev/null", 1, 3, 0o666)
    w.file("bin/busybox", busybox.read_bytes(), 0o755)
    w.symlink("bin/sh", "busybox")
    names = []
    for p in modules:
        name = _norm(p.name[:-3])
        names.append(name)
        w.file(f"lib/modules/{name}.ko", p.read_bytes())
    w.file("lib/modules/load.order", ("\n".join(names) + "\n").encode())
    w.file("init", init_script.encode(), 0o755)
    return w.finish()


# --------------------------------------------------------------------------- build + cache


def _builder_hash() -> str:
    h = hashlib.sha256()
    h.update(INIT_SCRIPT.encode())
    h.update(repr((BUILDER_REVISION, WANTED_MODULES)).encode())
    return h.hexdigest()[:12]


def _load(entry: Path) -> Guest | None:
    try:
        meta = json.loads((entry / "guest.json").read_text())
    except (OSError, ValueError):
        return None
    kernel, initrd = entry / "vmlinuz", entry / "initrd.cpio"
    if not kernel.is_file() or not initrd.is_file():
        return None
    return Guest(kernel, initrd, meta["kernel_package"], meta["kernel_version"], meta["busybox_version"])


def _prune(cache: Path, keep: int) -> None:
    """Remove all but the KEEP newest built guests (older kernels, older builders)."""
    entries = sorted((p for p in cache.iterdir() if p.is_dir() and (p / "guest.json").exists()),
                     key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def build_guest(cache: Path | None = None, *, log=lambda msg: None) -> Guest:
    """Return the guest for the package versions apt offers, building it on a cache miss.

    Args:
        cache: cache directory (default `cache_dir()`).
        log: called with one progress line per step.

    Raises:
        GuestUnavailable: no package information and nothing cached, or a download failed.
    """
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    bhash = _builder_hash()
    resolved = _resolve_packages()
    if resolved is None:
        # Offline without apt lists: any guest this builder made before will do.
        entries = sorted(cache.glob(f"*__{bhash}"), key=lambda p: p.stat().st_mtime, reverse=True)
        for e in entries:
            g = _load(e)
            if g:
                log(f"apt has no package information; using cached guest {e.name}")
                return g
        raise GuestUnavailable(f"apt offers no {KERNEL_META_PACKAGE}/{BUSYBOX_PACKAGE} and nothing is cached in {cache}")
    kpkg, kver, bver = resolved
    key = f"{kpkg}_{kver}__busybox_{bver}__{bhash}".replace(":", "_").replace("/", "_")
    entry = cache / key
    g = _load(entry)
    if g:
        return g
    with open(cache / ".lock", "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)  # one builder at a time per cache
        g = _load(entry)
        if g:
            return g
        log(f"building guest {key} in {cache}")
        with tempfile.TemporaryDirectory(prefix="build-", dir=cache) as tmp:
            tmp = Path(tmp)
            kroot, broot, out = tmp / "kernel", tmp / "busybox", tmp / "out"
            out.mkdir()
            log(f"apt-get download {kpkg}={kver}")
            _download_and_extract(kpkg, kver, kroot)
            log(f"apt-get download {BUSYBOX_PACKAGE}={bver}")
            _download_and_extract(BUSYBOX_PACKAGE, bver, broot)
            uname = kpkg.removeprefix("linux-image-")
            vmlinuz = kroot / "boot" / f"vmlinuz-{uname}"
            if not vmlinuz.is_file():
                raise GuestUnavailable(f"{kpkg} has no {vmlinuz.name}")
            busybox = next((p for p in (broot / "bin/busybox", broot / "usr/bin/busybox") if p.is_file()), None)
            if busybox is None:
                raise GuestUnavailable(f"{BUSYBOX_PACKAGE} has no bin/busybox")
            modules = module_load_order(kroot / "lib" / "modules" / uname)
            log("modules: " + " ".join(_norm(p.name[:-3]) for p in modules))
            shutil.copyfile(vmlinuz, out / "vmlinuz")
            (out / "initrd.cpio").write_bytes(build_initramfs(busybox, modules))
            (out / "guest.json").write_text(json.dumps({
                "kernel_package": kpkg, "kernel_version": kver, "busybox_version": bver,
                "modules": [_norm(p.name[:-3]) for p in modules], "builder": bhash,
            }, indent=1) + "\n")
            os.rename(out, entry)
        _prune(cache, keep=KEEP_CACHED)
    g = _load(entry)
    assert g is not None
    return g


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.vm.guest", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or find in the cache) the guest; copy it into DIR if given")
    b.add_argument("dir", nargs="?", type=Path)
    b.add_argument("--cache", type=Path, default=None, help="cache directory (default: %s)" % DEFAULT_CACHE)
    sub.add_parser("cmdline", help="print the default kernel command line")
    args = ap.parse_args(argv)
    try:
        g = build_guest(getattr(args, "cache", None), log=lambda m: print(m, file=sys.stderr))
    except GuestUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.cmd == "cmdline":
        print(g.cmdline())
        return 0
    if args.dir:
        args.dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(g.kernel, args.dir / "vmlinuz")
        shutil.copyfile(g.initrd, args.dir / "initrd.cpio")
        print(args.dir / "vmlinuz")
        print(args.dir / "initrd.cpio")
    else:
        print(g.kernel)
        print(g.initrd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
