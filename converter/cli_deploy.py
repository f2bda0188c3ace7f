"""Copy a bundle to an Android device over adb and check it there.

The bundle is checked here first, then pushed into a staging folder on the device, checked
there with sha256sum and only then swapped in for the bundle of the same name, so a failed
or interrupted deploy leaves the device as it was. Progress goes to stderr; the last line
on stdout is the bundle's path on the device.

adb is the only transport for now (--adb is required; an ssh transport for a Raspberry Pi
may come later). Needs adb (Debian/Ubuntu: `apt install adb`) and a phone with USB
debugging on, Android 7 or newer.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .deploy import DEFAULT_REMOTE_DIR


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", type=Path, help="bundle folder written by `nomoat convert`")
    p.add_argument("--adb", action="store_true", required=True,
                   help="deploy with adb to an Android device (required: the only transport for now)")
    p.add_argument("--serial", default=None, help="the device's serial from `adb devices` when several are attached")
    p.add_argument("--remote-dir", default=DEFAULT_REMOTE_DIR, help="folder on the device that holds bundles")
    p.add_argument("--name", default=None,
                   help="folder name of the bundle on the device; None: the bundle folder's name")
    p.add_argument("--adb-port", type=int, default=None, metavar="PORT",
                   help="port of the adb server to use (adb -P); None: adb's own (5037 or $ANDROID_ADB_SERVER_PORT)")


def run(args: argparse.Namespace) -> int:
    from .adb import AdbError, pick_device
    from .deploy import DeployError, deploy_bundle

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        device = pick_device(args.serial, args.adb_port)
        result = deploy_bundle(args.bundle, device, args.remote_dir, args.name, progress=progress)
    except (AdbError, DeployError) as e:
        print(f"nomoat deploy: error: {e}", file=sys.stderr)
        return 2
    progress(f"deployed {len(result.files)} files, {result.bytes / 1e6:.1f} MB in {result.seconds:.1f} s "
             f"({result.mb_per_s:.1f} MB/s) to {result.serial}")
    print(result.device_path)
    return 0
