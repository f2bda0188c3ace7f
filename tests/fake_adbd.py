"""A pretend Android device that the real adb server can `adb connect` to on loopback.

It speaks the adb transport protocol as adbd does (AOSP packages/modules/adb: protocol.txt,
SERVICES.TXT, SYNC.TXT) over TCP, with the host's file system standing in for the phone's:
`shell:CMD` runs CMD with /bin/sh -c here and `sync:` reads and writes host paths. It
advertises no features, so the adb client falls back to the legacy shell service (no exit
status) and the legacy sync protocol (STAT/SEND/RECV/LIST/QUIT), as with an old phone.

Knobs for tests: fail_on_push(substring) makes SEND of matching paths fail after the first
chunk (a disk that fills up mid-file), corrupt_on_push(substring) flips a byte of such files
and still answers OKAY (bad storage), df_output makes `df` print a given text, shell_log
records every shell command the device ran and events the services and sync requests.
throttle_push(seconds) sleeps that long after each chunk of every SEND (a push slow enough
to interrupt), and freeze_on_push(substring) makes the whole device go silent after the first
chunk of a matching SEND, its connection open and nothing answered (a phone that left the
wifi), until thaw() or reset(); freeze_on_shell(substring) does the same when a matching shell
command arrives, before it runs (it runs once thawed, as on a phone that comes back). A shell
command whose stream the host closes before it ended gets SIGHUP in its whole process group, as
an old phone's pty (adbd without shell_v2) hangs up on it; each shell starts with SIGHUP, SIGPIPE
and SIGINT at their defaults, as adbd's do, whatever this process inherited. slow_rm(seconds)
makes `rm -rf` take that long for each entry of a tree (a phone's slow storage). The device's
`sync` is a script on its PATH that returns at once: its storage is a temp folder of this host,
and the host's own sync would wait for every disk of the machine (seconds under a CI run's writes,
past a test's shrunk deadlines). A phone gone silent in its sync is freeze_on_shell("( sync )").

The phone's own tools the nomoat app is driven with are simulated too: `am` (start and force-stop),
`logcat` (-c, -d, -v raw, TAG:PRIORITY filters), `getprop`, `dumpsys power` (its mWakefulness line:
the `wakefulness` attribute, "Awake" unless a test says "Asleep") and `pidof dev.nomoat.app` are
scripts on the shell's PATH that call back into this process over a Unix socket. install_app(app)
puts the nomoat Android app "on the phone": `am start -n dev.nomoat.app/.MainActivity` then runs
app(extras) in a thread and logs each line it yields with Log.i under the tag nomoat-bench, as
MainActivity's benchmark mode does (an exception becomes {"error": ...}, like its catch), each JSON
line with the `--es bench_run ID` extra's id added as the app's Bench.roundLine/doneLine/errorLine
add it (install_app(app, tags_run=False): an app older than run ids). The app's process lives from
its `am start` until a force-stop (a finished app's process stays cached, as Android keeps it), or
until the app raises AppDied: then it logs nothing more, as after a native crash or the low-memory
killer. Without an app, `am start` answers what a phone answers for a missing activity (Error type
3, exit status 0). ignore_logcat_clear() makes `logcat -c` leave the log as it is (failing, as on a
phone whose log another reader streams), and drop_oldest_log_lines() forgets lines as logcat's ring
buffer does once full.

The asyncio loop runs in a daemon thread so that synchronous tests can use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import shutil
import signal
import stat
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

# Message commands: four ASCII letters read as a little-endian uint32.
A_SYNC, A_CNXN, A_OPEN, A_OKAY, A_CLSE, A_WRTE, A_AUTH = (
    struct.unpack("<I", name)[0] for name in (b"SYNC", b"CNXN", b"OPEN", b"OKAY", b"CLSE", b"WRTE", b"AUTH"))
HEADER = struct.Struct("<6I")  # command, arg0, arg1, data_length, data_check, magic
A_VERSION = 0x01000001  # from this version on the data checksum may be 0; we send a real one anyway
MAX_PAYLOAD = 256 * 1024
BANNER = b"device::ro.product.name=nomoat_fake;ro.product.model=fake;ro.product.device=fake;features="

SYNC_HEADER = struct.Struct("<4sI")  # id, length (or mtime / mode, depending on the id)
SYNC_DATA_MAX = 64 * 1024

APP_PACKAGE = "dev.nomoat.app"
APP_ACTIVITY = "dev.nomoat.app.MainActivity"  # MainActivity.kt
BENCH_TAG = "nomoat-bench"  # MainActivity.BENCH_TAG
BENCH_RUN = "bench_run"  # Bench.RUN: the extra with the host's run id, repeated in each line the app logs
LOG_PRIORITIES = "VDIWEFS"  # logcat's order, verbose to silent

# An app's benchmark mode: the `am start` extras in, the messages it logs out (one per yield).
SimulatedApp = Callable[[dict[str, object]], Iterable[str]]
APP_PID = 4242


class AppDied(Exception):  # noqa: N818 (what happens to the app, not an error of the fake)
    """Raised by a SimulatedApp: its process ends there without a word in the log."""

# What each tool script on the device's PATH runs: hand argv to the fake, print what it answers.
TOOL_SCRIPT = """#!{python} -I
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect({socket!r})
s.sendall(json.dumps([{name!r}, sys.argv[1:]]).encode() + b"\\n")
reply = json.loads(s.makefile().read())
sys.stdout.write(reply["stdout"])
sys.stderr.write(reply["stderr"])
sys.exit(reply["status"])
"""

# slow_rm's `rm` on the device's PATH: `rm -rf` removing a tree entry by entry with a pause before each, through
# open folders as toybox's and coreutils' rm do (unlinkat), so that a folder renamed meanwhile is still emptied
# under its new name; a path that is not there is no error (-f). Anything else goes to the real rm.
SLOW_RM_SCRIPT = """#!{python} -I
import os, sys, time
args = sys.argv[1:]
if not args or args[0] not in ("-rf", "-fr"):
    os.execv({rm!r}, [{rm!r}, *args])
for top in args[1:]:
    try:
        if os.path.isdir(top) and not os.path.islink(top):
            for _root, dirs, files, fd in os.fwalk(top, topdown=False):
                for name in files + dirs:
                    time.sleep({pause!r})
                    try:
                        os.rmdir(name, dir_fd=fd) if name in dirs else os.unlink(name, dir_fd=fd)
                    except NotADirectoryError:
                        os.unlink(name, dir_fd=fd)
                    except FileNotFoundError:
                        pass
            os.rmdir(top)
        else:
            os.unlink(top)
    except FileNotFoundError:
        pass
"""


def pack(command: int, arg0: int, arg1: int, data: bytes = b"") -> bytes:
    return HEADER.pack(command, arg0, arg1, len(data), sum(data) & 0xFFFFFFFF, command ^ 0xFFFFFFFF) + data


@dataclass
class Stream:
    """One OPEN'ed service: our id, the client's id, its inbound bytes and the ack for our last WRTE."""

    local_id: int
    remote_id: int
    inbox: asyncio.StreamReader = field(default_factory=asyncio.StreamReader)
    acked: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None
    closed: bool = False


class ProtocolError(Exception):
    pass


class Connection:
    """One TCP connection from the adb server: the transport and its streams."""

    def __init__(self, device: FakeAdbDevice, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.device = device
        self.reader = reader
        self.writer = writer
        self.streams: dict[int, Stream] = {}
        self.next_id = 1
        self.max_payload = MAX_PAYLOAD

    async def serve(self) -> None:
        try:
            while True:
                command, arg0, arg1, data = await self.read_message()
                await self.dispatch(command, arg0, arg1, data)
        except (asyncio.IncompleteReadError, ConnectionError, ProtocolError):
            pass
        finally:
            for s in list(self.streams.values()):
                self.drop(s)
            self.writer.close()

    async def read_message(self) -> tuple[int, int, int, bytes]:
        command, arg0, arg1, length, _check, magic = HEADER.unpack(await self.reader.readexactly(HEADER.size))
        if magic != command ^ 0xFFFFFFFF:
            raise ProtocolError(f"bad magic for command {command:#x}")
        # The checksum is not checked: adb >= 0x01000001 sends 0, older ones the byte sum; both are fine.
        data = await self.reader.readexactly(length) if length else b""
        return command, arg0, arg1, data

    def send(self, command: int, arg0: int, arg1: int, data: bytes = b"") -> None:
        self.writer.write(pack(command, arg0, arg1, data))

    async def dispatch(self, command: int, arg0: int, arg1: int, data: bytes) -> None:
        if command == A_CNXN:
            self.max_payload = min(arg1, MAX_PAYLOAD) or MAX_PAYLOAD
            for s in list(self.streams.values()):  # a new CNXN means the host started over
                self.drop(s)
            self.device.log("CNXN", data.rstrip(b"\0").decode(errors="replace"))
            self.send(A_CNXN, A_VERSION, MAX_PAYLOAD, BANNER)
        elif command == A_OPEN:
            self.open(arg0, data.rstrip(b"\0").decode())
        elif command == A_WRTE:
            stream = self.streams.get(arg1)
            if stream is None:
                self.send(A_CLSE, 0, arg0)
                return
            stream.inbox.feed_data(data)
            self.send(A_OKAY, stream.local_id, stream.remote_id)  # flow control: ready for the next one
        elif command == A_OKAY:
            stream = self.streams.get(arg1)
            if stream is not None:
                stream.remote_id = arg0
                stream.acked.set()
        elif command == A_CLSE:
            stream = self.streams.get(arg1)
            if stream is not None:
                self.drop(stream)
        # A_SYNC is obsolete and A_AUTH is never sent to a device that did not ask for it: ignore.
        await self.writer.drain()

    def open(self, remote_id: int, service: str) -> None:
        self.device.log("OPEN", service)
        if service.startswith("shell:"):
            handler = self.device.shell_service
        elif service == "sync:":
            handler = self.device.sync_service
        else:  # adbd refuses unknown services by closing at once
            self.send(A_CLSE, 0, remote_id)
            return
        stream = Stream(self.next_id, remote_id)
        self.next_id += 1
        self.streams[stream.local_id] = stream
        self.send(A_OKAY, stream.local_id, remote_id)
        stream.task = asyncio.get_running_loop().create_task(self.run_service(handler, stream, service))

    async def run_service(self, handler, stream: Stream, service: str) -> None:
        try:
            await handler(self, stream, service)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            # Not when the coroutine is destroyed after its loop stopped (the device stopped while a
            # service hung, as a silent phone's does): no host is left to tell, no task to ask about.
            if _loop_running():
                self.close(stream)

    async def write(self, stream: Stream, data: bytes) -> None:
        """WRTE data in packets the host accepts, waiting for its OKAY after each one."""
        for start in range(0, len(data), self.max_payload):
            if stream.closed:
                raise ConnectionError("stream closed by the host")
            stream.acked.clear()
            self.send(A_WRTE, stream.local_id, stream.remote_id, data[start:start + self.max_payload])
            await self.writer.drain()
            await stream.acked.wait()

    def close(self, stream: Stream) -> None:
        if not stream.closed:
            self.send(A_CLSE, stream.local_id, stream.remote_id)
        self.drop(stream)

    def drop(self, stream: Stream) -> None:
        stream.closed = True
        stream.acked.set()  # wake a writer waiting for an OKAY that will never come
        stream.inbox.feed_eof()
        self.streams.pop(stream.local_id, None)
        if stream.task is not None and stream.task is not asyncio.current_task():
            stream.task.cancel()


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class FakeAdbDevice:
    """Start with start(); the device is then at 127.0.0.1:port. Stop with stop()."""

    def __init__(self) -> None:
        self.port = 0
        self.df_output: str | None = None
        self.shell_log: list[str] = []
        self.events: list[tuple[str, str]] = []  # (what, detail): CNXN banners, OPENed services, sync requests
        self._fail_on_push: list[str] = []
        self._corrupt_on_push: list[str] = []
        self._push_chunk_delay = 0.0
        self._freeze_on_push: list[str] = []
        self._freeze_on_shell: list[str] = []
        self._thawed = threading.Event()
        self._rm_pause = 0.0
        self.props: dict[str, str] = {"ro.product.model": "fake", "ro.soc.model": "FakeSoC"}
        self.app_starts: list[dict[str, object]] = []  # the extras of each `am start` of the app
        self._app: SimulatedApp | None = None
        self._app_tags_run = True
        self._logcat_clear_status: int | None = None  # None: `logcat -c` clears the log
        self._app_stop = threading.Event()  # set by force-stop: the running app logs nothing more
        self._app_alive = False  # its process: from `am start` to a force-stop or AppDied
        self.wakefulness = "Awake"  # what `dumpsys power` says
        self._logcat: list[tuple[str, str, str]] = []  # (priority, tag, message)
        self._logcat_lock = threading.Lock()  # the app thread logs while the loop dumps
        self._bin = Path(tempfile.mkdtemp(prefix="fake-adbd-bin-"))
        self._write_tool_scripts()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-adbd", daemon=True)
        self._server: asyncio.base_events.Server | None = None

    # --- knobs for tests ---

    def fail_on_push(self, path_substring: str) -> None:
        """SEND of a path containing path_substring writes one chunk, then fails like a full disk."""
        self._fail_on_push.append(path_substring)

    def corrupt_on_push(self, path_substring: str) -> None:
        """SEND of a path containing path_substring flips the file's first byte yet replies OKAY."""
        self._corrupt_on_push.append(path_substring)

    def throttle_push(self, seconds_per_chunk: float) -> None:
        """Every SEND waits this long after each 64 KiB chunk, the device answering all else meanwhile."""
        self._push_chunk_delay = seconds_per_chunk

    def freeze_on_push(self, path_substring: str) -> None:
        """SEND of a path containing path_substring writes one chunk, then the whole device stops
        answering (its event loop blocks) until thaw(): for the adb server, a silent connection."""
        self._thawed.clear()
        self._freeze_on_push.append(path_substring)

    def freeze_on_shell(self, command_substring: str) -> None:
        """A shell command containing command_substring makes the whole device stop answering before it
        runs, until thaw(): a phone that went silent between two steps."""
        self._thawed.clear()
        self._freeze_on_shell.append(command_substring)

    def slow_rm(self, seconds_per_entry: float) -> None:
        """`rm -rf` on the device waits this long before removing each entry of a tree (0: the real rm's speed)."""
        self._rm_pause = seconds_per_entry

    def thaw(self) -> None:
        self._freeze_on_push.clear()
        self._freeze_on_shell.clear()
        self._thawed.set()

    def timed_while_frozen(self, run: Callable[[], int], rescue_after: float = 60.0) -> tuple[int, float]:
        """run() (a deploy) against the frozen device: its result and the seconds it took. The device is
        thawed after rescue_after seconds in any case (a deploy without a deadline would wait for it
        forever: the test then fails on the time, not by hanging) and at the end."""
        rescue = threading.Timer(rescue_after, self.thaw)
        rescue.start()
        try:
            start = time.monotonic()
            result = run()
            return result, time.monotonic() - start
        finally:
            rescue.cancel()
            self.thaw()

    def install_app(self, app: SimulatedApp | None, tags_run: bool = True) -> None:
        """Put the nomoat app on the phone (None: uninstall it); tags_run False: an app that does not add the
        run id to its lines. See the module doc."""
        self._app = app
        self._app_tags_run = tags_run

    def ignore_logcat_clear(self, status: int = 1) -> None:
        """`logcat -c` leaves the log as it is and exits with status: not 0, saying "failed to clear the 'main'
        log" as a phone does while another reader streams its log; 0, silently."""
        self._logcat_clear_status = status

    def drop_oldest_log_lines(self, count: int, tag: str | None = None) -> None:
        """Forget the count oldest log lines (of tag, if given), as logcat's ring buffer does once it is full."""
        with self._logcat_lock:
            mine = [entry for entry in self._logcat if tag is None or entry[1] == tag][:count]
            for entry in mine:
                self._logcat.remove(entry)

    def log_line(self, priority: str, tag: str, message: str) -> None:
        with self._logcat_lock:
            self._logcat.append((priority, tag, message))

    def reset(self) -> None:
        self.thaw()
        self._fail_on_push.clear()
        self._corrupt_on_push.clear()
        self._push_chunk_delay = 0.0
        self._rm_pause = 0.0
        self.df_output = None
        self.shell_log.clear()
        self.events.clear()
        self._app_stop.set()  # an app thread left running by an earlier test
        self._app_alive = False
        self.wakefulness = "Awake"
        self._app = None
        self._app_tags_run = True
        self._logcat_clear_status = None
        self.app_starts.clear()
        with self._logcat_lock:
            self._logcat.clear()

    def log(self, what: str, detail: str) -> None:
        self.events.append((what, detail))

    # --- life cycle ---

    def start(self) -> FakeAdbDevice:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._accept, "127.0.0.1", 0), self._loop).result(timeout=10)
        self.port = self._server.sockets[0].getsockname()[1]
        self._tools_server = asyncio.run_coroutine_threadsafe(
            asyncio.start_unix_server(self._serve_tool, path=str(self._bin / "tools.sock")),
            self._loop).result(timeout=10)
        return self

    def stop(self) -> None:
        async def shutdown() -> None:
            self._server.close()
            self._tools_server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._app_stop.set()
        shutil.rmtree(self._bin, ignore_errors=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await Connection(self, reader, writer).serve()

    # --- services ---

    async def shell_service(self, conn: Connection, stream: Stream, service: str) -> None:
        """Legacy `shell:CMD`: stdout and stderr interleaved in WRTE packets, then CLSE; no exit status."""
        command = service.removeprefix("shell:")
        self.shell_log.append(command)
        if any(s in command for s in self._freeze_on_shell):
            self._thawed.wait(timeout=300)  # blocks the loop: nothing on this device answers
        # A session of its own, as adbd gives each shell: the hangup below reaches the command's children too.
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh", "-c", command, cwd="/", env=self._shell_env(), start_new_session=True,
            preexec_fn=default_signals,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        try:
            while chunk := await proc.stdout.read(SYNC_DATA_MAX):
                await conn.write(stream, chunk)
            await proc.wait()
        finally:
            if proc.returncode is None:  # the host closed the stream (its adb client was stopped)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGHUP)  # the pty's hangup; a command may ignore it and go on
                await proc.wait()

    def _shell_env(self) -> dict[str, str]:
        env = dict(os.environ)
        df = self._bin / "df"
        if self.df_output is not None:  # a `df` earlier on PATH prints the configured text
            (self._bin / "df.txt").write_text(self.df_output)
            df.write_text(f"#!/bin/sh\ncat {shlex.quote(str(self._bin / 'df.txt'))}\n")
            df.chmod(0o755)
        else:
            df.unlink(missing_ok=True)
        rm = self._bin / "rm"
        if self._rm_pause:
            rm.write_text(SLOW_RM_SCRIPT.format(python=sys.executable, rm=shutil.which("rm") or "/bin/rm",
                                                pause=self._rm_pause))
            rm.chmod(0o755)
        else:
            rm.unlink(missing_ok=True)
        env["PATH"] = f"{self._bin}:{env.get('PATH', '/usr/bin:/bin')}"  # am, logcat, getprop, sync (and df, rm)
        return env

    # --- the phone's tools: am, logcat, getprop ---

    def _write_tool_scripts(self) -> None:
        for name in ("am", "logcat", "getprop", "dumpsys", "pidof"):
            script = self._bin / name
            script.write_text(TOOL_SCRIPT.format(python=sys.executable, socket=str(self._bin / "tools.sock"),
                                                 name=name))
            script.chmod(0o755)
        sync = self._bin / "sync"  # instant: see the module doc
        sync.write_text("#!/bin/sh\nexit 0\n")
        sync.chmod(0o755)

    async def _serve_tool(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        name, args = json.loads(await reader.readline())
        tool = {"am": self._am, "logcat": self._logcat_tool, "getprop": self._getprop, "dumpsys": self._dumpsys,
                "pidof": self._pidof}[name]
        stdout, stderr, status = tool(args)
        writer.write(json.dumps({"stdout": stdout, "stderr": stderr, "status": status}).encode())
        await writer.drain()
        writer.close()

    def _getprop(self, args: list[str]) -> tuple[str, str, int]:
        if args:
            return self.props.get(args[0], "") + "\n", "", 0
        return "".join(f"[{k}]: [{v}]\n" for k, v in sorted(self.props.items())), "", 0

    def _dumpsys(self, args: list[str]) -> tuple[str, str, int]:
        if args == ["power"]:  # a few of a phone's lines around the one the host reads
            return (f"POWER MANAGER (dumpsys power)\n\nPower Manager State:\n  mDirty=0x0\n"
                    f"  mWakefulness={self.wakefulness}\n  mWakefulnessChanging=false\n  mIsPowered=true\n"), "", 0
        return "", f"Can't find service: {' '.join(args[:1])}\n", 0

    def _pidof(self, args: list[str]) -> tuple[str, str, int]:
        return (f"{APP_PID}\n", "", 0) if args == [APP_PACKAGE] and self._app_alive else ("", "", 1)

    def _am(self, args: list[str]) -> tuple[str, str, int]:
        if args[:1] == ["force-stop"] and len(args) == 2:
            if args[1] == APP_PACKAGE:
                self._app_stop.set()
                self._app_alive = False
            return "", "", 0
        if args[:1] != ["start"]:
            return "", f"Error: unknown command '{' '.join(args[:1])}' (fake_adbd knows start and force-stop)\n", 1
        try:
            options, component, extras = parse_am_start(args[1:])
        except ValueError as e:
            return "", f"Error: {e}\n", 1
        out = f"Stopping: {APP_PACKAGE}\n" if "-S" in options and component.startswith(APP_PACKAGE + "/") else ""
        if "-S" in options:
            self._app_stop.set()
            self._app_alive = False
        out += f"Starting: Intent {{ cmp={component}{' (has extras)' if extras else ''} }}\n"
        package, _, cls = component.partition("/")
        full_class = package + cls if cls.startswith(".") else cls
        if self._app is None or package != APP_PACKAGE or full_class != APP_ACTIVITY:
            # What ActivityManagerShellCommand prints for an unknown activity; its exit status stays 0.
            return out, f"Error type 3\nError: Activity class {{{package}/{full_class}}} does not exist.\n", 0
        self.log_line("I", "ActivityManager", f"START u0 {{cmp={component} (has extras)}} from uid 2000")
        self.app_starts.append(extras)
        self._launch_app(self._app, extras)
        if "-W" in options:
            out += (f"Status: ok\nLaunchState: COLD\nActivity: {component}\nTotalTime: 212\nWaitTime: 215\n"
                    "Complete\n")
        return out, "", 0

    def _launch_app(self, app: SimulatedApp, extras: dict[str, object]) -> None:
        """Run the app's bench on its own thread, as MainActivity does on its worker: `am start -W`
        returns once the activity is up, long before the rounds are done."""
        stop = self._app_stop = threading.Event()
        run_id = extras.get(BENCH_RUN) if self._app_tags_run else None
        self._app_alive = True

        def run() -> None:
            try:
                for message in app(extras):
                    if stop.is_set():
                        return
                    self.log_line("I", BENCH_TAG, with_run_id(message, run_id))
            except AppDied:
                if not stop.is_set():
                    self._app_alive = False
            except Exception as e:  # MainActivity.bench's catch
                if not stop.is_set():
                    self.log_line("I", BENCH_TAG, with_run_id(json.dumps({"error": str(e) or repr(e)}), run_id))

        threading.Thread(target=run, name="fake-nomoat-app", daemon=True).start()

    def _logcat_tool(self, args: list[str]) -> tuple[str, str, int]:
        """logcat -c | -d [-v raw] [-s] [TAG:PRIORITY ...]; without -d it dumps too instead of following."""
        if "-c" in args:
            if self._logcat_clear_status is not None:
                failed = self._logcat_clear_status != 0
                return "", "failed to clear the 'main' log\n" if failed else "", self._logcat_clear_status
            with self._logcat_lock:
                self._logcat.clear()
            return "", "", 0
        raw = any(a == "raw" and args[i - 1] == "-v" for i, a in enumerate(args) if i > 0)
        specs = dict(a.split(":", 1) for a in args if ":" in a and not a.startswith("-"))
        silent_by_default = "-s" in args
        with self._logcat_lock:
            lines = list(self._logcat)
        out = []
        for priority, tag, message in lines:
            least = specs.get(tag, specs.get("*", "S" if silent_by_default else "V"))
            if LOG_PRIORITIES.index(priority) < LOG_PRIORITIES.index(least):
                continue
            out.append(message if raw else f"{time.strftime('%m-%d %H:%M:%S')}.000  4242  4263 {priority} "
                                           f"{tag}: {message}")
        return "".join(line + "\n" for line in out), "", 0

    async def sync_service(self, conn: Connection, stream: Stream, service: str) -> None:
        """Legacy file sync: 8-byte requests (id, LE length) that may straddle or share WRTE packets."""
        while True:
            request, length = SYNC_HEADER.unpack(await stream.inbox.readexactly(SYNC_HEADER.size))
            name = request.decode(errors="replace")
            if name == "QUIT":
                self.log("SYNC", "QUIT")
                return
            path = (await stream.inbox.readexactly(length)).decode()
            self.log("SYNC", f"{name} {path}")
            if name == "STAT":
                await conn.write(stream, self._stat_reply(path))
            elif name == "LIST":
                await conn.write(stream, self._list_reply(path))
            elif name == "RECV":
                await self._send_file_to_host(conn, stream, path)
            elif name == "SEND":
                if not await self._receive_file(conn, stream, path):
                    return  # adbd closes the sync stream after a failed SEND
            else:
                await conn.write(stream, self._fail(f"unknown sync request {name!r}"))
                return

    @staticmethod
    def _fail(message: str) -> bytes:
        data = message.encode()
        return SYNC_HEADER.pack(b"FAIL", len(data)) + data

    @staticmethod
    def _stat_reply(path: str) -> bytes:
        try:
            st = os.lstat(path)
            return b"STAT" + struct.pack("<3I", st.st_mode & 0xFFFFFFFF, st.st_size & 0xFFFFFFFF,
                                         int(st.st_mtime) & 0xFFFFFFFF)
        except OSError:
            return b"STAT" + struct.pack("<3I", 0, 0, 0)  # all zero: "no such file"

    @staticmethod
    def _list_reply(path: str) -> bytes:
        out = bytearray()
        try:
            names = sorted(os.listdir(path))
        except OSError:
            names = []
        for name in names:
            try:
                st = os.lstat(os.path.join(path, name))
            except OSError:
                continue
            raw = name.encode()
            out += b"DENT" + struct.pack("<4I", st.st_mode & 0xFFFFFFFF, st.st_size & 0xFFFFFFFF,
                                         int(st.st_mtime) & 0xFFFFFFFF, len(raw)) + raw
        return bytes(out + b"DONE" + struct.pack("<4I", 0, 0, 0, 0))

    async def _send_file_to_host(self, conn: Connection, stream: Stream, path: str) -> None:
        try:
            with open(path, "rb") as f:
                while block := f.read(SYNC_DATA_MAX):
                    await conn.write(stream, SYNC_HEADER.pack(b"DATA", len(block)) + block)
        except OSError as e:
            await conn.write(stream, self._fail(f"{path}: {e.strerror}"))
            return
        await conn.write(stream, SYNC_HEADER.pack(b"DONE", 0))

    async def _receive_file(self, conn: Connection, stream: Stream, spec: str) -> bool:
        """SEND "path,mode", then DATA chunks and DONE mtime; reply OKAY, or FAIL after draining the data."""
        path, _, mode_text = spec.rpartition(",")
        mode = stat.S_IMODE(int(mode_text)) if mode_text.isdigit() else 0o644
        fail_after_first_chunk = any(s in path for s in self._fail_on_push)
        freeze_after_first_chunk = any(s in path for s in self._freeze_on_push)
        error = None
        try:
            os.makedirs(os.path.dirname(path) or "/", exist_ok=True)
            f = open(path, "wb")  # closed below, after the DONE
        except OSError as e:
            f, error = None, f"{path}: {e.strerror}"
        chunks = 0
        while True:
            request, length = SYNC_HEADER.unpack(await stream.inbox.readexactly(SYNC_HEADER.size))
            if request == b"DONE":  # length is the mtime
                break
            if request != b"DATA" or length > SYNC_DATA_MAX:
                error = error or f"bad sync data {request!r} of {length} bytes"
                break
            block = await stream.inbox.readexactly(length)
            chunks += 1
            if f is not None and error is None:
                f.write(block)
                if fail_after_first_chunk:
                    error = f"{path}: No space left on device (fake_adbd fail_on_push)"
                if freeze_after_first_chunk and chunks == 1:
                    f.flush()  # the test sees the push under way
                    self._thawed.wait(timeout=300)  # blocks the loop: nothing on this device answers
            if self._push_chunk_delay:
                await asyncio.sleep(self._push_chunk_delay)
        if f is not None:
            f.close()
            os.chmod(path, mode)
            if error is None and any(s in path for s in self._corrupt_on_push):
                _flip_first_byte(path)
        self.log("SEND", f"{path} {chunks} chunks {'FAIL ' + error if error else 'OKAY'}")
        if error:
            await conn.write(stream, self._fail(error))
            return False
        await conn.write(stream, SYNC_HEADER.pack(b"OKAY", 0))
        return True


def default_signals() -> None:
    """Run in a shell's process before it starts: SIGHUP, SIGPIPE and SIGINT at their defaults, as a phone's
    adbd starts its shells. An ignored signal stays ignored across exec, and a test run started in the background
    (`nohup`, as CI runs them; a background job of a script ignores SIGINT) has SIGHUP and SIGINT ignored: its
    shells would then shrug off the hangup that fake_adbd sends as a phone's does, and a command that only
    survives it with `trap '' HUP` (deploy.swap_in's) would pass its test without the trap."""
    for signum in (signal.SIGHUP, signal.SIGPIPE, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)


def with_run_id(message: str, run_id: object) -> str:
    r"""A JSON object's line with the run id added, as Bench.roundLine/doneLine/errorLine add it (org.json's
    compact form, '/' as '\/'); without a run id, or for a line that is not a JSON object (a warning), as it is."""
    try:
        value = json.loads(message)
    except ValueError:
        return message
    if run_id is None or not isinstance(value, dict):
        return message
    return json.dumps({**value, BENCH_RUN: run_id}, separators=(",", ":")).replace("/", "\\/")


def _flip_first_byte(path: str) -> None:
    with open(path, "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 0xFF]) if first else b"x")


def parse_am_start(args: list[str]) -> tuple[set[str], str, dict[str, object]]:
    """(flags, component, extras) of `am start` arguments: -W -S, -n COMPONENT, --es/--ei/--ez KEY VALUE."""
    options: set[str] = set()
    component = None
    extras: dict[str, object] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-W", "-S"):
            options.add(arg)
            i += 1
        elif arg == "-n" and i + 1 < len(args):
            component = args[i + 1]
            i += 2
        elif arg in ("--es", "--ei", "--ez") and i + 2 < len(args):
            key, value = args[i + 1], args[i + 2]
            if arg == "--ei":
                if not value.lstrip("-").isdigit():
                    raise ValueError(f"invalid integer value {value!r} for --ei {key}")
                extras[key] = int(value)
            elif arg == "--ez":
                if value.lower() not in ("true", "false", "t", "f", "1", "0"):
                    raise ValueError(f"invalid boolean value {value!r} for --ez {key}")
                extras[key] = value.lower() in ("true", "t", "1")
            else:
                extras[key] = value
            i += 3
        else:
            raise ValueError(f"fake_adbd's am does not know the option {arg!r}")
    if component is None:
        raise ValueError("no component given (-n)")
    return options, component, extras
