"""An arm64 Debian root (bookworm or trixie) under qemu-user: Raspberry Pi OS's base, on an x86 workstation.

Built once with debootstrap and cached (build/pi-root-SUITE, or $NOMOAT_PI_ROOT-SUITE); binaries in it run
through the kernel's binfmt_misc handler for aarch64 ELF files (qemu-aarch64-static, registered
with the F flag so the chroot needs no copy of qemu). Needs root: debootstrap, chroot and mount do.

What a program inside sees, and why:
- /proc is mounted (onnxruntime opens a model's external data through /proc/self/fd), with
  /proc/cpuinfo replaced by a Raspberry Pi 5's: the host's x86 one means nothing to an arm64
  process and onnxruntime's CPU detection would fail on it.
- /sys is NOT mounted: onnxruntime crashes under qemu when it reads the host's CPU files.
  A plain directory with the Pi 5's CPU list (0-3) stands in for /sys/devices/system/cpu.
- QEMU_CPU=cortex-a76 (the Pi 5's core): qemu's default CPU would offer instructions the Pi
  lacks (SVE, i8mm), and onnxruntime would pick kernels the Pi can never run.
- pip reaches the package index as the host does: the host's CA bundle and its http(s) index
  settings (file:// indexes on the host do not exist inside and are left out).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

# Raspberry Pi OS (64-bit) is built on Debian: bookworm (Python 3.11) until its 2025 release on
# trixie (Python 3.13). $NOMOAT_PI_SUITE picks one; `nox -s pi` runs both.
SUITES = ("bookworm", "trixie")
SUITE = os.environ.get("NOMOAT_PI_SUITE", "bookworm")
MIRROR = "http://deb.debian.org/debian"
INCLUDE = "python3,python3-venv,ca-certificates"  # the suite's own python3, as on the Pi
HOST_PACKAGES = {"qemu-aarch64-static": "qemu-user-static", "update-binfmts": "binfmt-support",
                 "debootstrap": "debootstrap"}
BINFMT = Path("/proc/sys/fs/binfmt_misc")
GUEST_CA = "/etc/ssl/certs/host-ca-certificates.crt"
PATH = "/usr/local/bin:/usr/bin:/bin"
CPU = "cortex-a76"
CORES = 4
_CPUINFO_BLOCK = """processor\t: {n}
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x4
CPU part\t: 0xd0b
CPU revision\t: 1

"""  # what a Raspberry Pi 5's Cortex-A76 cores report (part 0xd0b, with asimddp = int8 dot product)


class Arm64RootError(RuntimeError):
    """The machine cannot build or run the arm64 root; the message says what to do."""


class Steps:
    """Named, timed steps, printed as they finish (under emulation the times say nothing about a Pi)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        print(f"[pi] {name} ...", flush=True)
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - start, 1)
            print(f"[pi] {name}: {self.seconds[name]:.1f} s", flush=True)


def run(cmd: Sequence[str], timeout: float = 1800, **kw) -> subprocess.CompletedProcess:
    """Run a host command; fail with its output."""
    result = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kw)
    if result.returncode != 0:
        raise Arm64RootError(f"{' '.join(map(str, cmd))} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


# -- the host ----------------------------------------------------------------------------------------


def prepare_host() -> None:
    """The Debian packages, and qemu registered for aarch64 binaries in binfmt_misc."""
    if os.geteuid() != 0:
        raise Arm64RootError("building and entering the arm64 root needs root (debootstrap, chroot, mount): "
                             "run `nox -s pi` as root, e.g. `sudo nox -s pi`")
    missing = sorted({pkg for tool, pkg in HOST_PACKAGES.items() if not _which(tool)})
    if missing:
        if not shutil.which("apt-get"):
            raise Arm64RootError(f"install {', '.join(missing)} (Debian/Ubuntu packages) first")
        print(f"[pi] apt-get install {' '.join(missing)}", flush=True)
        run(["apt-get", "update", "-qq"], timeout=600)
        run(["apt-get", "install", "-y", "-qq", *missing], timeout=900, env={**os.environ,
                                                                            "DEBIAN_FRONTEND": "noninteractive"})
    if not (BINFMT / "status").exists():
        run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)])
    if not (BINFMT / "qemu-aarch64").exists():
        run(["update-binfmts", "--enable", "qemu-aarch64"])
    entry = (BINFMT / "qemu-aarch64").read_text() if (BINFMT / "qemu-aarch64").exists() else ""
    if not entry.startswith("enabled"):
        raise Arm64RootError("qemu-aarch64 is not enabled in binfmt_misc: `update-binfmts --enable qemu-aarch64` "
                             "(inside a container the host must do it)")


def _which(tool: str) -> str | None:
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin")


def pip_environment() -> dict[str, str]:
    """PIP_* variables giving the guest the host's view of the package index (http(s) parts only)."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    env = {"PIP_CERT": GUEST_CA, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_DEFAULT_TIMEOUT": "120"}
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        name = key.rsplit(".", 1)[-1]  # "global.index-url", ":env:.index-url" -> "index-url"
        if name in ("index-url", "extra-index-url", "trusted-host"):
            kept = [v for v in value.strip("'\"").split() if name == "trusted-host" or v.startswith("http")]
            if kept:
                env["PIP_" + name.upper().replace("-", "_")] = " ".join(kept)
    for proxy in ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY"):
        if proxy in os.environ:
            env[proxy] = os.environ[proxy]
    return env


# -- the root ----------------------------------------------------------------------------------------


def ensure_root(path: Path) -> bool:
    """Build the root unless a complete one is cached there; True if it was built now."""
    if SUITE not in SUITES:
        raise Arm64RootError(f"NOMOAT_PI_SUITE={SUITE!r} is not a suite Raspberry Pi OS is built on: "
                             f"use one of {', '.join(SUITES)}")
    ready = path / ".nomoat-ready"
    recipe = f"{SUITE} arm64 minbase {INCLUDE}\n"
    if ready.exists() and ready.read_text() == recipe:
        return False
    partial = path.with_name(path.name + ".partial")
    for stale in (path, partial):
        _remove(stale)
    partial.parent.mkdir(parents=True, exist_ok=True)
    # debootstrap sees that this machine can execute arm64 binaries (binfmt + qemu) and runs
    # both stages itself; no --foreign.
    run([_which("debootstrap") or "debootstrap", "--arch=arm64", "--variant=minbase", f"--include={INCLUDE}",
         SUITE, str(partial), MIRROR], timeout=3600)
    partial.rename(path)  # a root only ever appears complete
    ready.write_text(recipe)
    return True


def _remove(path: Path) -> None:
    """Delete a (partial) root, never following a mount into the host's /proc or /sys."""
    if not path.exists():
        return
    _unmount_under(path)
    if _mounts_under(path):
        raise Arm64RootError(f"{path} still has mounts inside; unmount them before it can be rebuilt")
    shutil.rmtree(path)


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    points = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    return [p for p in points if p.startswith(prefix)]


def _unmount_under(path: Path) -> None:
    for point in sorted(_mounts_under(path), key=len, reverse=True):  # innermost first
        subprocess.run(["umount", point], check=False)


@contextmanager
def entered(root: Path) -> Iterator[Guest]:
    """The root with /proc mounted and the Pi's CPU files in place, for the time of the block."""
    _unmount_under(root)  # left over from a run that was killed
    cpu = root / "sys/devices/system/cpu"
    for n in range(CORES):
        (cpu / f"cpu{n}").mkdir(parents=True, exist_ok=True)
    for name in ("possible", "present", "online"):
        (cpu / name).write_text(f"0-{CORES - 1}\n")
    cpuinfo = root / "etc/nomoat-cpuinfo"
    cpuinfo.write_text("".join(_CPUINFO_BLOCK.format(n=n) for n in range(CORES)))
    shutil.copyfile("/etc/ssl/certs/ca-certificates.crt", root / GUEST_CA.lstrip("/"))
    run(["mount", "-t", "proc", "proc", str(root / "proc")])
    try:
        run(["mount", "--bind", str(cpuinfo), str(root / "proc/cpuinfo")])
        yield Guest(root)
    finally:
        _unmount_under(root)


class Guest:
    """Commands run inside the root with a clean environment (the host's PIP_* etc. stay out)."""

    def __init__(self, root: Path):
        self.root = root

    def argv(self, cmd: Sequence[str], env: dict[str, str] | None = None) -> list[str]:
        base = {"PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8", "QEMU_CPU": CPU, **(env or {})}
        return ["chroot", str(self.root), "/usr/bin/env", "-i", *(f"{k}={v}" for k, v in base.items()), *cmd]

    def run(self, cmd: Sequence[str], env: dict[str, str] | None = None, timeout: float = 3600):
        return run(self.argv(cmd, env), timeout=timeout)

    def popen(self, cmd: Sequence[str], env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.argv(cmd, env), **kw)

    def path(self, guest_path: str) -> Path:
        """The host path of a file inside the root."""
        return self.root / guest_path.lstrip("/")
