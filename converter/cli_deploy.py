"""Copy a bundle to an Android device over adb and check it there.

The bundle is checked here first, then pushed into a staging folder on the device, checked
there with sha256sum and only then swapped in for the bundle of the same name, so a failed
or interrupted deploy leaves the device as it was. Progress goes to stderr; stdout gets the
bundle's path on the device (its only line without --bench).

--bench then starts the nomoat Android app's benchmark mode on the deployed bundle (the app,
android_demo, must be installed) and prints the rounds it measured on the phone as `nomoat
bench` does: the path line, an empty line, then the table; with --json, stdout is one JSON
object alone (the path is its "device_path").

adb is the only transport for now (--adb is required; an ssh transport for a Raspberry Pi
may come later). Needs adb (Debian/Ubuntu: `apt install adb`) and a phone with USB
debugging on, Android 7 or newer.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .deploy import DEFAULT_REMOTE_DIR
from .deploy_bench import DEFAULT_TIMEOUT_S

if TYPE_CHECKING:
    from .adb import Device

BENCH_DEFAULTS = {"prompt_tokens": 128, "new_tokens": 128, "rounds": 3, "threads": None, "json": False,
                  "bench_timeout": DEFAULT_TIMEOUT_S}
BENCH_ONLY = ("prompt_tokens", "new_tokens", "rounds", "threads", "json", "bench_timeout")


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
    b = p.add_argument_group("benchmark on the phone (--bench; needs the nomoat Android app installed)")
    # SUPPRESS: unset stays absent, so a bench flag without --bench is an error rather than ignored,
    # and the help shows the real defaults instead of "(default: None)".
    unset = argparse.SUPPRESS
    b.add_argument("--bench", action="store_true",
                   help="after deploying, run the app's benchmark mode on the bundle and print a table like "
                        "`nomoat bench` below the path line")
    b.add_argument("--prompt-tokens", type=int, default=unset, metavar="N",
                   help="prompt length in tokens (default: 128)")
    b.add_argument("--new-tokens", type=int, default=unset, metavar="N",
                   help="tokens generated per round, at least 2 (default: 128)")
    b.add_argument("--rounds", type=int, default=unset, metavar="N", help="measured rounds (default: 3)")
    b.add_argument("--threads", type=int, default=unset, metavar="N", help="CPU threads (default: the bundle's)")
    b.add_argument("--json", action="store_true", default=unset,
                   help="print one JSON object (like `nomoat bench --json`, plus device_path) instead of the "
                        "path line and the table")
    b.add_argument("--bench-timeout", type=float, default=unset, metavar="SECONDS",
                   help=f"give up when the app has not finished by then (default: {DEFAULT_TIMEOUT_S:.0f})")


def run(args: argparse.Namespace) -> int:
    from .adb import AdbError, pick_device
    from .deploy import DeployError, deploy_bundle

    try:
        check_bench_flags(args)  # before deploying: a bad request should not cost a push
        device = pick_device(args.serial, args.adb_port)
        result = deploy_bundle(args.bundle, device, args.remote_dir, args.name, progress=progress)
        progress(f"deployed {len(result.files)} files, {result.bytes / 1e6:.1f} MB in {result.seconds:.1f} s "
                 f"({result.mb_per_s:.1f} MB/s) to {result.serial}")
        if not getattr(args, "json", False):
            print(result.device_path, flush=True)  # deployed, whatever the benchmark does next
        if args.bench:
            from nomoat.runtime.cli_bench import format_table

            report = run_bench(device, result.device_path, args)
            print(json.dumps(report, indent=2) if args.json else f"\n{format_table(report)}")
    except (AdbError, DeployError) as e:
        print(f"nomoat deploy: error: {e}", file=sys.stderr)
        return 2
    return 0


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def check_bench_flags(args: argparse.Namespace) -> None:
    """Fill in the bench defaults, or refuse bench flags without --bench."""
    from .deploy import DeployError
    from .deploy_bench import check_bench_request

    if not args.bench:
        given = [f"--{k.replace('_', '-')}" for k in BENCH_ONLY if hasattr(args, k)]
        if given:
            raise DeployError(f"{', '.join(given)} only apply with --bench; add --bench or drop them.")
        return
    for key, value in BENCH_DEFAULTS.items():
        if not hasattr(args, key):
            setattr(args, key, value)
    check_bench_request(args.bundle, args.prompt_tokens, args.new_tokens, args.rounds, args.threads)


def run_bench(device: Device, device_path: str, args: argparse.Namespace) -> dict[str, Any]:
    """The app's benchmark on the deployed bundle, as the report `nomoat bench` prints."""
    from .deploy_bench import bench_on_device, bench_report, device_machine

    progress(f"benchmarking on {device.serial}: {args.rounds} rounds of {args.prompt_tokens}+{args.new_tokens} "
             "tokens in the nomoat app ...")
    # The deployed path, not the name: the app takes an absolute path as is, wherever --remote-dir put it.
    bench = bench_on_device(device, device_path, args.prompt_tokens, args.new_tokens, args.rounds, args.threads,
                            timeout=args.bench_timeout, progress=progress)
    report = bench_report(device_path, device_machine(device), bench, args.rounds, args.threads,
                          args.prompt_tokens, args.new_tokens)
    return {"device_path": device_path, "serial": device.serial, **report}
