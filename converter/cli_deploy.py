"""Copy a bundle to an Android device over adb, or to a Linux board (a Raspberry Pi) over ssh, and
check it there.

The bundle is checked here first, then pushed into a staging folder on the device, checked
there with sha256sum and only then swapped in for the bundle of the same name, so a failed
or interrupted deploy leaves the device as it was. Progress goes to stderr; stdout gets the
bundle's path on the device (its only line without --bench).

--bench then starts the nomoat Android app's benchmark mode on the deployed bundle (the app,
android_demo, must be installed) and prints the rounds it measured on the phone as `nomoat
bench` does: the path line, an empty line, then the table; with --json, stdout is one JSON
object alone (the path is its "device_path").

--ssh HOST does the same for a board: the same staging, sha256sum check and swap, over the
user's own ssh (keys, ~/.ssh/config); --bench there runs `nomoat bench`'s worker on the board
through ssh (ssh_bench.py), so the board needs nomoat installed (this checkout's wheel).

Needs adb (Debian/Ubuntu: `apt install adb`) and a phone with USB debugging on, Android 7 or
newer (8 for the app that --bench runs); or the ssh client and a board that takes your key.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .deploy import DEFAULT_REMOTE_DIR
from .deploy_bench import DEFAULT_TIMEOUT_S
from .ssh_bench import DEFAULT_REMOTE_PYTHON, README_VENV_PYTHON

if TYPE_CHECKING:
    from .adb import Device
    from .deploy import BundleFile
    from .ssh import SshHost

DEFAULT_SSH_REMOTE_DIR = "nomoat"  # relative: in the remote user's home folder

BENCH_DEFAULTS = {"prompt_tokens": 128, "new_tokens": 128, "rounds": 3, "threads": None, "prompt_lookup": 0,
                  "json": False, "bench_timeout": DEFAULT_TIMEOUT_S}
BENCH_ONLY = ("prompt_tokens", "new_tokens", "rounds", "threads", "prompt_lookup", "json", "bench_timeout")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from nomoat.runtime.cli_generate import prompt_lookup

    p.add_argument("bundle", type=Path, help="bundle folder written by `nomoat convert`")
    transport = p.add_mutually_exclusive_group(required=True)
    transport.add_argument("--adb", action="store_true", help="deploy with adb to an Android device")
    transport.add_argument("--ssh", metavar="HOST", default=None,
                           help="deploy with ssh to a Linux board such as a Raspberry Pi: [user@]host, "
                                "ssh://[user@]host:port or a Host alias from your ssh config")
    p.add_argument("--serial", default=None,
                   help="(adb) the device's serial from `adb devices` when several are attached (default: "
                        "$ANDROID_SERIAL, as for adb itself)")
    p.add_argument("--ssh-config", default=None, metavar="FILE", help="(ssh) this ssh config file instead of "
                   "~/.ssh/config (ssh -F)")
    p.add_argument("--remote-dir", default=None,
                   help=f"folder on the device that holds bundles (default: {DEFAULT_REMOTE_DIR} over adb, "
                        f"~/{DEFAULT_SSH_REMOTE_DIR} over ssh, where a relative path is taken from the home folder)")
    p.add_argument("--name", default=None,
                   help="folder name of the bundle on the device; None: the bundle folder's name")
    p.add_argument("--force", action="store_true",
                   help="replace REMOTE_DIR/NAME even if it is not a bundle (has no manifest.json): what it holds "
                        "is deleted; without it such a folder is refused before anything is copied")
    p.add_argument("--adb-port", type=int, default=None, metavar="PORT",
                   help="port of the adb server to use (adb -P); None: adb's own (5037 or $ANDROID_ADB_SERVER_PORT)")
    b = p.add_argument_group("benchmark on the device (--bench; needs the nomoat Android app installed on a phone, "
                             "nomoat's Python runtime on a board)")
    # SUPPRESS: unset stays absent, so a bench flag without --bench is an error rather than ignored,
    # and the help shows the real defaults instead of "(default: None)".
    unset = argparse.SUPPRESS
    b.add_argument("--bench", action="store_true",
                   help="after deploying, run the app's benchmark mode (adb) or `nomoat bench`'s worker (ssh) on "
                        "the bundle and print a table like `nomoat bench` below the path line")
    b.add_argument("--prompt-tokens", type=int, default=unset, metavar="N",
                   help="prompt length in tokens (default: 128)")
    b.add_argument("--new-tokens", type=int, default=unset, metavar="N",
                   help="tokens generated per round, at least 2 (default: 128)")
    b.add_argument("--rounds", type=int, default=unset, metavar="N", help="measured rounds (default: 3)")
    b.add_argument("--threads", type=int, default=unset, metavar="N", help="CPU threads (default: the bundle's)")
    b.add_argument("--prompt-lookup", type=prompt_lookup, default=unset, metavar="N",
                   help="also measure prompt-lookup decoding with up to N drafted tokens per pass, in rows of "
                        "its own next to plain decoding, round by round (default: off)")
    b.add_argument("--json", action="store_true", default=unset,
                   help="print one JSON object (like `nomoat bench --json`, plus device_path) instead of the "
                        "path line and the table")
    b.add_argument("--bench-timeout", type=timeout_seconds, default=unset, metavar="SECONDS",
                   help="give up when the benchmark has not finished by then; over ssh, its worker is then "
                        f"killed on the board (default: {DEFAULT_TIMEOUT_S:.0f})")
    b.add_argument("--remote-python", default=None, metavar="COMMAND",
                   help=f"(ssh) the board's Python with nomoat installed, a shell command like rsync's "
                        f"--rsync-path (default: {README_VENV_PYTHON} if the board has it, as the README's "
                        f"steps install it, else {DEFAULT_REMOTE_PYTHON})")

MAX_TIMEOUT_S = 7 * 24 * 3600.0  # a week: past that a number is a typo (and past ~1e9 s no wait is possible)


def timeout_seconds(value: str) -> float:
    """argparse type for --bench-timeout: a positive, finite number of seconds."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds <= MAX_TIMEOUT_S:  # also false for nan
        raise argparse.ArgumentTypeError(f"{value!r} is not a time to wait: give seconds above 0 and at most "
                                         f"{MAX_TIMEOUT_S:.0f} (a week), e.g. 1800")
    return seconds


# Flags that belong to one transport; given with the other, they are an error rather than ignored.
ADB_ONLY = ("serial", "adb_port")
SSH_ONLY = ("ssh_config", "remote_python")


def run(args: argparse.Namespace) -> int:
    from nomoat.runtime.bench import BenchError

    from .bundle import signals_interrupt
    from .deploy import DeployError, deploy_bundle
    from .transport import TransportError

    deployed = None  # the bundle's path on the device once the new bundle is in place
    try:
        with signals_interrupt():  # SIGTERM/SIGHUP unwind like Ctrl-C: the staging folder goes with them
            check_transport_flags(args)
            check_bench_flags(args)  # before deploying: a bad request should not cost a push
            # before connecting: a bundle's problem is said even with no device attached
            checked = check_bundle(args)
            device, remote_dir = connect(args)
            if args.bench and args.ssh:
                from .ssh_bench import check_remote_runtime, remote_python

                args.remote_python = remote_python(device, args.remote_python)
                check_remote_runtime(device, args.remote_python)  # before the push, too
            result = deploy_bundle(args.bundle, device, remote_dir, args.name, progress=progress,
                                   android_app=not args.ssh, force=args.force, checked=checked)
            deployed = result.device_path
            progress(f"deployed {len(result.files)} files, {result.bytes / 1e6:.1f} MB in {result.seconds:.1f} s "
                     f"({result.mb_per_s:.1f} MB/s) to {result.serial}")
            if args.ssh:  # the app loads at each start; a server keeps the model it loaded, the old bundle's
                progress("a pi_demo serve or chat started before keeps the bundle it loaded: restart it to use "
                         "this one (the service: sudo systemctl restart nomoat)")
            if not getattr(args, "json", False):
                print(result.device_path, flush=True)  # deployed, whatever the benchmark does next
            if args.bench:
                from nomoat.runtime.cli_bench import format_table

                report = (run_ssh_bench(device, result.device_path, args) if args.ssh
                          else run_bench(device, result.device_path, args))
                print(json.dumps(report, indent=2) if args.json else f"\n{format_table(report)}")
    except (TransportError, DeployError, BenchError) as e:
        print(f"nomoat deploy: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM/SIGHUP (bundle.Interrupted)
        return report_interrupt(e, getattr(e, "deployed_to", None) or deployed)
    return 0


def report_interrupt(e: KeyboardInterrupt, deployed: str | None) -> int:
    """bundle.report_interrupt's line, saying which bundle the device holds. Before the swap the old
    bundle is untouched (the staging folder is removed, or the next deploy removes it);
    deploy.swap_in_whole holds signals during the swap, so after it the new one is in place."""
    from .bundle import report_interrupt as report

    state = f"the new bundle is in place at {deployed}" if deployed else "the bundle deployed before is unchanged"
    return report("deploy", e, outcome=state)


def connect(args: argparse.Namespace) -> tuple[Device | SshHost, str]:
    """The device and the absolute folder on it that holds bundles."""
    if args.ssh:
        import posixpath

        from .ssh import connect as ssh_connect

        remote_dir = args.remote_dir or DEFAULT_SSH_REMOTE_DIR
        if remote_dir.startswith("~") and remote_dir != "~" and not remote_dir.startswith("~/"):
            from .deploy import DeployError

            # ~user/dir: another user's home, which only the remote shell could look up; taken as a relative
            # path it would land in $HOME/~user/dir.
            raise DeployError(f"--remote-dir {remote_dir!r}: only ~ and ~/... (your home folder on the board) are "
                              "expanded, not ~user; give that folder's absolute path instead.")
        board = ssh_connect(args.ssh, args.ssh_config)
        if remote_dir == "~" or remote_dir.startswith("~/"):  # as a user would type it; no shell expands it here
            remote_dir = remote_dir[2:]
        return board, remote_dir if remote_dir.startswith("/") else posixpath.join(board.home(), remote_dir)
    from .adb import pick_device

    return pick_device(args.serial, args.adb_port), args.remote_dir or DEFAULT_REMOTE_DIR


def check_bundle(args: argparse.Namespace) -> list[BundleFile]:
    """What deploy_bundle checks before touching the device (its name on the device, every file's sha256,
    a KV cache the app can keep), done before connecting to it. The files with their hashes, for
    deploy_bundle to reuse: hashing a bundle twice would read it twice. A file changed in between is
    still caught, by the sha256sum on the device, which is compared with these hashes."""
    from .deploy import bundle_files, check_name, default_name

    check_name(args.name if args.name is not None else default_name(Path(args.bundle)))
    return bundle_files(args.bundle, android_app=not args.ssh)


def only_with(flags: list[str], needed: str, fix: str) -> str:
    """`--a only applies with --b; drop it.` (several flags: apply, them)."""
    one = len(flags) == 1
    return (f"{', '.join(flags)} only {'applies' if one else 'apply'} with {needed}; "
            f"{fix}drop {'it' if one else 'them'}.")


def check_transport_flags(args: argparse.Namespace) -> None:
    """Refuse the other transport's flags."""
    from .deploy import DeployError

    given = [k for k in (SSH_ONLY if args.adb else ADB_ONLY) if getattr(args, k, None) is not None]
    if given:
        flags = [f"--{k.replace('_', '-')}" for k in given]
        raise DeployError(only_with(flags, "--ssh" if args.adb else "--adb", ""))
    if args.ssh and args.remote_python is not None and not args.bench:
        raise DeployError(only_with(["--remote-python"], "--bench", "add --bench or "))


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def check_bench_flags(args: argparse.Namespace) -> None:
    """Fill in the bench defaults, or refuse bench flags without --bench."""
    from .deploy import DeployError
    from .deploy_bench import check_bench_request

    if not args.bench:
        given = [f"--{k.replace('_', '-')}" for k in BENCH_ONLY if hasattr(args, k)]
        if given:
            raise DeployError(only_with(given, "--bench", "add --bench or "))
        return
    for key, value in BENCH_DEFAULTS.items():
        if not hasattr(args, key):
            setattr(args, key, value)
    check_bench_request(args.bundle, args.prompt_tokens, args.new_tokens, args.rounds, args.threads)


def run_bench(device: Device, device_path: str, args: argparse.Namespace) -> dict[str, Any]:
    """The app's benchmark on the deployed bundle, as the report `nomoat bench` prints."""
    from .deploy_bench import bench_on_device, bench_report, device_machine

    lookup = f", plain and with prompt lookup {args.prompt_lookup} in turn," if args.prompt_lookup else ""
    progress(f"benchmarking on {device.serial}: {args.rounds} rounds of {args.prompt_tokens}+{args.new_tokens} "
             f"tokens{lookup} in the nomoat app ...")
    # The deployed path, not the name: the app takes an absolute path as is, wherever --remote-dir put it.
    bench = bench_on_device(device, device_path, args.prompt_tokens, args.new_tokens, args.rounds, args.threads,
                            timeout=args.bench_timeout, progress=progress, prompt_lookup=args.prompt_lookup)
    from nomoat.runtime.manifest import read_manifest

    per_token = read_manifest(args.bundle, verify_files=False).onnx.weight_bytes_per_token
    report = bench_report(device_path, device_machine(device), bench, args.rounds, args.threads,
                          args.prompt_tokens, args.new_tokens, weight_bytes_per_token=per_token)
    return {"device_path": device_path, "serial": device.serial, **report}


def run_ssh_bench(board: SshHost, device_path: str, args: argparse.Namespace) -> dict[str, Any]:
    """`nomoat bench`'s worker on the board, on the deployed bundle."""
    from .ssh_bench import bench_over_ssh

    return bench_over_ssh(board, device_path, args.bundle, args.prompt_tokens, args.new_tokens, args.rounds,
                          args.threads, python=args.remote_python, progress=progress,
                          prompt_lookup=args.prompt_lookup, timeout=args.bench_timeout)
