"""Compile and run the Android app's plain-Kotlin core (android_demo/core) on the host JVM.

The app's logic lives in plain Kotlin that only needs org.json (part of Android; on the host,
Debian's libandroid-json-java, Android's own implementation), so it compiles with Debian's
kotlinc and runs with junit4 here, with no Android SDK. The jar is cached by a hash of the
sources under build/android-host/.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "android_demo" / "core" / "src"
CACHE = ROOT / "build" / "android-host"
# Debian packages: kotlin, junit4 (with hamcrest), libandroid-json-java.
JARS = {
    "junit4": "/usr/share/java/junit4.jar",
    "hamcrest": "/usr/share/java/hamcrest-core.jar",
    "libandroid-json-java": "/usr/share/java/com.android.json.jar",
}
APT = "apt-get install kotlin junit4 libandroid-json-java"


def require_tools() -> None:
    """Fail (not skip) when a tool is missing: `nox -s android` is where these tests run."""
    missing = [] if shutil.which("kotlinc") else ["kotlinc (Debian package kotlin)"]
    missing += [f"{path} (Debian package {pkg})" for pkg, path in JARS.items() if not Path(path).is_file()]
    if missing:
        pytest.fail(f"missing for the Android core tests: {', '.join(missing)}; install with: {APT}")


def classpath(*extra: Path) -> str:
    return ":".join([*map(str, extra), *JARS.values()])


def sources(kind: str) -> list[Path]:
    return sorted((CORE / kind / "kotlin").rglob("*.kt"))


def compile_core() -> Path:
    """A jar with the core and its tests (kotlin runtime included), rebuilt when a source changes."""
    require_tools()
    files = sources("main") + sources("test")
    digest = hashlib.sha256()
    for f in files:
        digest.update(str(f.relative_to(CORE)).encode())
        digest.update(f.read_bytes())
    jar = CACHE / f"core-{digest.hexdigest()[:16]}.jar"
    if jar.is_file():
        return jar
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = jar.with_suffix(".tmp.jar")
    done = subprocess.run(["kotlinc", *map(str, files), "-include-runtime", "-cp", classpath(), "-d", str(tmp)],
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        pytest.fail(f"kotlinc failed:\n{done.stderr[-5000:]}")
    tmp.rename(jar)  # a jar in the cache is whole
    return jar


def run_kotlin(main_class: str, *args: str, input: str | None = None, timeout: float = 120) -> str:
    """Run `main_class` from the compiled core; its stdout."""
    jar = compile_core()
    done = subprocess.run(["java", "-cp", classpath(jar), main_class, *args], input=input,
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"{main_class} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


def run_junit(*test_classes: str) -> str:
    """Run JUnit 4 test classes; fails with JUnit's report when one fails."""
    return run_kotlin("org.junit.runner.JUnitCore", *test_classes, timeout=300)
