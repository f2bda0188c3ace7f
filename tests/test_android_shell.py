"""The Android app's shell (MainActivity, OrtForward) type-checked on the host, with no Android SDK.

kotlinc compiles the shell and the core against hand-written Java declarations of the Android and ONNX
Runtime members the shell calls (android_demo/apicheck), so a wrong name, argument or type is an error
here. What it does not check (behaviour, the real android.jar and AAR, Gradle, resources) is in
android_demo/apicheck/README.md.
"""

from __future__ import annotations

import re
import shutil
import zipfile
from pathlib import Path

import kotlin_host
import pytest

pytestmark = pytest.mark.android

# Packages the declarations stand in for; the shell's other imports are its own, the core's or the JDK's.
DECLARED = ("android.", "ai.onnxruntime.")


def test_the_shell_compiles_against_the_declarations():
    jar = kotlin_host.compile_shell()
    with zipfile.ZipFile(jar) as z:
        names = set(z.namelist())
    for cls in ("MainActivity", "OrtForward"):
        assert f"dev/nomoat/app/{cls}.class" in names, sorted(names)


def test_build_config_takes_the_version_from_gradle():
    version = kotlin_host.onnxruntime_version()
    assert re.fullmatch(r"\d+\.\d+\.\d+", version), version
    assert f'ONNXRUNTIME_VERSION = "{version}";' in kotlin_host.build_config_java()


# -- the check can fail -------------------------------------------------------------------------

# One mistake in each shell file, each against a declaration: (file, the shell's text, the mistake).
MISTAKES = [
    ("OrtForward.kt", "session.run(inputs, outputs)", "session.run(inputs, outputs, 3)"),  # no such overload
    ("MainActivity.kt", "Log.i(BENCH_TAG, Bench.doneLine(run))", "Log.i(BENCH_TAG, rounds)"),  # an Int for a String
]


def test_kotlinc_rejects_a_shell_with_mistakes(tmp_path):
    shell = tmp_path / "shell"
    shutil.copytree(kotlin_host.SHELL, shell)
    lines = {}
    for name, original, mistake in MISTAKES:
        path = next(shell.rglob(name))
        text = path.read_text()
        assert text.count(original) == 1, f"{name} no longer has `{original}` once: update MISTAKES"
        lines[name] = text[:text.index(original)].count("\n") + 1
        path.write_text(text.replace(original, mistake))
    done = kotlin_host.kotlinc_shell(kotlin_host.shell_sources(shell), tmp_path / "out")
    assert done.returncode != 0, done.stderr
    for name, line in lines.items():
        assert re.search(rf"{re.escape(name)}:{line}:\d+: error: ", done.stderr), (name, line, done.stderr)


# -- the declarations and the shell do not drift apart -------------------------------------------


def declared_classes() -> dict[str, Path]:
    """Top-level class name -> declaration file (one class a file, as javac wants)."""
    return {".".join(f.relative_to(kotlin_host.APICHECK).with_suffix("").parts): f
            for f in kotlin_host.declarations()}


def owner(name: str, classes: dict[str, Path]) -> str | None:
    """The declared top-level class a dotted name (class, nested class or member) belongs to."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in classes:
            return ".".join(parts[:n])
    return None


def shell_imports() -> list[str]:
    imports = []
    for f in kotlin_host.shell_sources():
        imports += re.findall(r"^import\s+([\w.]+)(?:\s+as\s+\w+)?\s*$", f.read_text(), re.MULTILINE)
    return [name for name in imports if name.startswith(DECLARED)]


def references(text: str, package: str, classes: dict[str, Path]) -> set[str]:
    """The declared classes a declaration file names in code: imported, fully qualified, or by simple name
    in its own package."""
    code = re.sub(r"//[^\n]*", "", text)
    found = {owner(name, classes) for name in re.findall(r"\b((?:android|ai\.onnxruntime)\.[\w.]+)", code)}
    found |= {cls for cls in classes
              if cls.rpartition(".")[0] == package and re.search(rf"\b{cls.rpartition('.')[2]}\b", code)}
    return found - {None}


def test_every_class_the_shell_imports_is_declared():
    classes = declared_classes()
    imports = shell_imports()
    assert imports, "the shell imports nothing from android.* or ai.onnxruntime.*?"
    missing = [name for name in imports if owner(name, classes) is None]
    assert not missing, f"imported by the shell, not declared under android_demo/apicheck/java: {missing}"


def test_every_declaration_is_used_by_the_shell():
    """Each declared class is imported by the shell or needed by a declaration that is (no dead declarations)."""
    classes = declared_classes()
    used = {owner(name, classes) for name in shell_imports()} - {None}
    todo = list(used)
    while todo:
        path = classes[todo.pop()]
        package = ".".join(path.relative_to(kotlin_host.APICHECK).parent.parts)
        for cls in references(path.read_text(), package, classes) - used:
            used.add(cls)
            todo.append(cls)
    unused = sorted(set(classes) - used)
    assert not unused, f"declared but not used by the shell: {unused}: remove them"


# Declared members the shell reaches without naming them.
UNNAMED = {"onClick": "View.OnClickListener's method: the lambda given to setOnClickListener"}


def declared_members(text: str) -> set[str]:
    """The methods (not constructors) and constants a declaration file declares."""
    code = re.sub(r"//[^\n]*", "", text)
    methods = re.findall(r"^\s*(?:public|protected)\b[^=;{(]*?\b([a-z]\w*)\s*\(", code, re.MULTILINE)
    abstract = re.findall(r"^\s*(?:\w+\s+)+([a-z]\w*)\s*\([^)]*\)\s*;", code, re.MULTILINE)  # interface methods
    constants = re.findall(r"\bstatic final \w+ (\w+)\s*=", code)
    return {*methods, *abstract, *constants}


def used_by(name: str, shell: str) -> bool:
    """Whether the shell's text calls method [name], reads or writes the Kotlin property a getter or setter
    makes of it (getText/setText: `text`; isEnabled/setEnabled: `isEnabled`), or names constant [name].
    A guard against leftovers, not a proof."""
    if re.search(rf"\b{name}\s*[({{]", shell):  # a call, or a call with a trailing lambda
        return True
    accessor = re.fullmatch(r"(?:get|set|is)([A-Z]\w*)", name)
    words = {name} if re.fullmatch(r"[A-Z][A-Z0-9_]*", name) else set()
    if accessor:
        words |= {accessor.group(1)[0].lower() + accessor.group(1)[1:], "is" + accessor.group(1)}
    return any(re.search(rf"\b{w}\b", shell) for w in words)


def test_every_declared_member_is_used_by_the_shell():
    shell = "\n".join(f.read_text() for f in kotlin_host.shell_sources())
    unused = [f"{cls}.{name}" for cls, path in declared_classes().items()
              for name in sorted(declared_members(path.read_text()))
              if name not in UNNAMED and not used_by(name, shell)]
    assert not unused, f"declared but never named by the shell: {unused}: remove them"


def test_the_member_check_sees_members():
    """The patterns above find what they should (else the previous test would pass on nothing)."""
    text = (kotlin_host.APICHECK / "android" / "widget" / "TextView.java").read_text()
    assert declared_members(text) == {"getText", "setText", "append", "getHint", "setHint", "setTextIsSelectable"}
    view = (kotlin_host.APICHECK / "android" / "view" / "View.java").read_text()
    assert declared_members(view) == {"setPadding", "isEnabled", "setEnabled", "setOnClickListener", "onClick",
                                      "post", "getBottom", "scrollTo"}
    assert used_by("getText", "x.text = 1") and used_by("setEnabled", "send.isEnabled = false")
    assert used_by("i", "Log.i(TAG, s)") and used_by("FOCUS_DOWN", "fullScroll(ScrollView.FOCUS_DOWN)")
    assert not used_by("getFoo", "bar()") and not used_by("close", "closed = true")
    assert not used_by("e", "catch (e: Exception) { e.message }") and not used_by("run", "val run = 1")


# -- what the screen does (the logic is the core's, tested there; these check the shell uses it) ------


def shell_function(name: str) -> str:
    """The text of MainActivity's `private fun name(...)`, up to its closing brace."""
    text = next(f for f in kotlin_host.shell_sources() if f.name == "MainActivity.kt").read_text()
    start = text.index(f"    private fun {name}(")
    return text[start:text.index("\n    }\n", start) + 6]


def test_the_chat_screen_can_start_over():
    """Once a chat fills the bundle's context every message fails (ContextOverflowException says to reset
    the conversation): messages go through Conversation.send ("/reset", and the notes that say how to
    start over; ConversationTest), and a New chat button resets the conversation on the worker thread."""
    assert "talk.send(" in shell_function("onSend") and "turn.note" in shell_function("onSend")
    assert re.search(r"text = Conversation\.NEW_CHAT\s+isEnabled = false\s+setOnClickListener \{ onNewChat\(\) \}",
                     shell_function("buildScreen"))
    assert re.search(r"worker\.execute \{\s+conversation\?\.reset\(\)", shell_function("onNewChat"))
    assert "newChat.isEnabled = true" in shell_function("load")


@pytest.mark.parametrize("task", ["load", "bench", "onSend"])
def test_the_screens_tasks_report_errors_too(task):
    """An OutOfMemoryError or UnsatisfiedLinkError while loading is an Error, not an Exception: caught only
    as an Exception it would crash the app, and `nomoat deploy --adb --bench` would wait out its timeout
    for the {"error": ...} line. Each worker task catches Throwable and says it with failureText."""
    body = shell_function(task)
    assert "catch (e: Throwable)" in body and "failureText(e)" in body, body
    assert "catch (e: Exception)" not in body, body
