"""The runtime and pi_demo on arm64 Debian under qemu-user: what a Raspberry Pi would run.

Run with `nox -s pi` (needs root and network; see tests/arm64_root.py for the emulated root).
The module builds a wheel of this checkout, installs it in a fresh venv inside the root with
only binary wheels allowed, converts SmolLM2-135M-Instruct on the host for the Pi 5 (int4 with
int8 activations, as shipped) and in fp32, and compares the Pi's tokens and logits with the
host's; then serves and chats inside. Every step is timed (build/pi/timings-SUITE.json); emulated runs
take 15-40x as long as the same runs natively on the x86 host and say nothing about a Pi's speed.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from arm64_root import SUITE, Steps, ensure_root, entered, pip_environment, prepare_host, run
from bundle_cache import converter_fingerprint, is_current, stamp_of
from checkout_wheel import build_wheel
from pty_terminal import Terminal
from real_model import smollm2_gguf_path

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("NOMOAT_PI") != "1",
                       reason="arm64 emulation (root, network, ~20 min): run with `nox -s pi`"),
]

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "build" / "pi"
# One root per suite ($NOMOAT_PI_ROOT-bookworm, ...): `nox -s pi` runs both, and one path for both
# would build each anew every time.
ROOT = Path(f"{os.environ.get('NOMOAT_PI_ROOT', REPO / 'build' / 'pi-root')}-{SUITE}")
CHECK = "/opt/nomoat-check"  # in the guest: the wheel, bundles, pi_demo and the guest script
VENV = "/opt/nomoat-venv"
PYTHON = f"{VENV}/bin/python"
PROMPTS = ["What is the capital of France?", "Write a short poem about autumn leaves.",
           "Explain photosynthesis to a ten-year-old."]
TOKENS = 32
# name -> convert arguments. rpi5 is what a Pi 5 gets (int4, accuracy_level 4 = int8 activations);
# fp32 has no activation quantization, so x86 and arm must agree to float rounding.
# fp32-kv16 isolates the float16 KV cache (`--kv-dtype float16`, GroupQueryAttention in fp16) from
# int8 activations: the one difference left between the two machines is the attention's kernels.
BUNDLES = {"rpi5": ["--target", "rpi5"], "fp32": ["--target", "rpi5", "--quant", "fp32"],
           "fp32-kv16": ["--target", "rpi5", "--quant", "fp32", "--kv-dtype", "float16"]}
RUNTIME_DEPS = ("numpy", "onnxruntime", "tokenizers", "jinja2")
NOT_ON_A_PI = ("torch", "transformers", "peft", "onnx", "gguf", "executorch")
STATS = r"\[(\d+) new prompt tokens \((\d+) cached\) @ \d+ tok/s, (\d+) tokens @ [\d.]+ tok/s\]"
STEPS = Steps()
FINDINGS: dict[str, object] = {}


@pytest.fixture(scope="module")
def guest():
    BUILD.mkdir(parents=True, exist_ok=True)
    with STEPS.step("host packages + binfmt"):
        prepare_host()
    with STEPS.step("arm64 root (debootstrap; cached in " + str(ROOT) + ")"):
        FINDINGS["root_built_now"] = ensure_root(ROOT)
    try:
        with entered(ROOT) as g:
            yield g
    finally:
        report = {"steps_seconds": STEPS.seconds, **FINDINGS}
        (BUILD / f"timings-{SUITE}.json").write_text(json.dumps(report, indent=2))
        print("\n[pi] emulated run (x86 host, qemu-user; not a Pi's speed):\n" + json.dumps(report, indent=2))


@pytest.fixture(scope="module")
def bundles() -> dict[str, Path]:
    """The bundles, converted on the host; reused while the converter and the model are unchanged."""
    gguf = smollm2_gguf_path()
    out = {}
    for name, args in BUNDLES.items():
        path, fingerprint = BUILD / name, converter_fingerprint(str(gguf), str(args))
        if not is_current(path, fingerprint):
            with STEPS.step(f"host: convert {name}"):
                run([sys.executable, "-m", "nomoat", "convert", "--model", str(gguf), *args, "--out", str(path),
                     "--skip-verify", "--force", "--quiet"])
            stamp_of(path).write_text(fingerprint)
        out[name] = path
    return out


@pytest.fixture(scope="module")
def installed(guest, bundles) -> dict[str, str]:
    """A fresh venv in the guest with this checkout's wheel; returns {package: version} installed."""
    with STEPS.step("host: pip wheel --no-deps ."):
        wheel = build_wheel(BUILD / "dist")
    check = guest.path(CHECK)
    with STEPS.step("copy wheel, bundles, pi_demo into the root"):
        shutil.rmtree(check, ignore_errors=True)
        check.mkdir(parents=True)
        shutil.copy(wheel, check)
        for name, path in bundles.items():
            shutil.copytree(path, check / name)
        shutil.copytree(REPO / "pi_demo", check / "pi_demo", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(REPO / "tests" / "pi_guest.py", check)
        (check / "prompts.json").write_text(json.dumps(PROMPTS))
        (check / "prompt1.json").write_text(json.dumps(PROMPTS[:1]))
        # The host's versions of the runtime's dependencies, so a difference in tokens is the CPU's,
        # not a release's. (`pip install nomoat` on a Pi takes the newest; this pins only for the comparison.)
        (check / "constraints.txt").write_text("".join(f"{p}=={importlib.metadata.version(p)}\n"
                                                       for p in RUNTIME_DEPS))
    with STEPS.step("guest: python3 -m venv"):
        shutil.rmtree(guest.path(VENV), ignore_errors=True)
        guest.run(["python3", "-m", "venv", VENV])
    with STEPS.step("guest: pip install --only-binary=:all: nomoat (the wheel)"):
        result = guest.run([PYTHON, "-m", "pip", "install", "--only-binary=:all:", "-c", f"{CHECK}/constraints.txt",
                            f"{CHECK}/{wheel.name}"], env=pip_environment(), timeout=1800)
    print(result.stdout[-2000:])
    listed = guest.run([PYTHON, "-m", "pip", "list", "--format=json"]).stdout
    packages = {p["name"].lower(): p["version"] for p in json.loads(listed)}
    FINDINGS["guest_packages"] = packages
    FINDINGS["guest_venv_mb"] = round(sum(f.stat().st_size for f in guest.path(VENV).rglob("*") if f.is_file())
                                      / 2**20)
    return packages


def test_pip_install_pulls_only_aarch64_wheels_and_nothing_of_the_converter(guest, installed):
    assert not [p for p in NOT_ON_A_PI if p in installed]
    for dep in RUNTIME_DEPS:
        assert installed[dep] == importlib.metadata.version(dep)
    # Every installed package came as a wheel for this machine (or pure Python) ...
    tags = set()
    for wheel_file in guest.path(VENV).glob("lib/python3*/site-packages/*.dist-info/WHEEL"):
        tags |= {line.split(": ", 1)[1] for line in wheel_file.read_text().splitlines() if line.startswith("Tag: ")}
    platforms = {t.rsplit("-", 1)[1] for t in tags}
    assert platforms and all(p == "any" or p.endswith("aarch64") for p in platforms), platforms
    # ... and nothing could have been compiled: the root has no compiler at all.
    for compiler in ("gcc", "cc", "c++", "clang"):
        assert not (guest.path("/usr/bin") / compiler).exists()
    FINDINGS["wheel_platforms"] = sorted(platforms)


def test_the_runtime_imports_on_arm64_without_torch(guest, installed):
    code = ("import platform, sys, nomoat.runtime, onnxruntime; "
            "print(platform.machine(), sorted(m for m in sys.modules if m.split('.')[0] in "
            f"{NOT_ON_A_PI!r}), onnxruntime.__version__, platform.python_version())")
    with STEPS.step("guest: import nomoat.runtime"):
        out = guest.run([PYTHON, "-c", code]).stdout.split()
    assert out[0] == "aarch64" and out[1] == "[]" and out[2] == installed["onnxruntime"]
    FINDINGS["guest_python"] = out[3]
    # The suite's own Python: bookworm's 3.11, trixie's 3.13 (what each Raspberry Pi OS runs).
    assert out[3].startswith({"bookworm": "3.11.", "trixie": "3.13."}[SUITE]), out


def test_bandwidth_probe_runs_on_arm64(guest, installed):
    # What `nomoat bench` and `nomoat deploy --ssh --bench` run on a board for the ceiling column
    # (emulated here: the number says nothing of a Pi, the command and its output format do).
    with STEPS.step("guest: python -m nomoat.runtime.bandwidth"):
        out = guest.run([PYTHON, "-m", "nomoat.runtime.bandwidth", "1", "2", "--megabytes", "16"]).stdout
    rates = json.loads(out.strip().splitlines()[-1])
    assert list(rates) == ["1", "2"] and all(r > 1e6 for r in rates.values())


def _tokens_and_logits(guest, name: str, bundle: Path, n_prompts: int = len(PROMPTS), *guest_flags: str
                       ) -> tuple[np.lib.npyio.NpzFile, np.lib.npyio.NpzFile]:
    """Greedy tokens and teacher-forced logits of the first n_prompts prompts, on the host and in the guest
    (1 or 3 prompts: an fp32 bundle takes ~150 s a prompt under emulation); guest_flags go to the
    guest's pi_guest.py."""
    if n_prompts not in (1, len(PROMPTS)):
        raise ValueError(f"n_prompts is 1 or {len(PROMPTS)}")
    host_file = BUILD / f"host-{name}.npz"
    prompts_file = f"{CHECK}/" + ("prompts.json" if n_prompts == len(PROMPTS) else "prompt1.json")
    with STEPS.step(f"host: greedy {TOKENS} tokens x {n_prompts} prompts, {name}"):
        run([sys.executable, str(REPO / "tests" / "pi_guest.py"), str(bundle), str(guest.path(prompts_file)),
             str(TOKENS), str(host_file)])
    shutil.copy(host_file, guest.path(f"{CHECK}/host-{name}.npz"))
    with STEPS.step(f"guest: greedy {TOKENS} tokens x {n_prompts} prompts + logits on the host's tokens, {name}"):
        guest.run([PYTHON, f"{CHECK}/pi_guest.py", f"{CHECK}/{name}", prompts_file, str(TOKENS),
                   f"{CHECK}/arm-{name}.npz", "--reference", f"{CHECK}/host-{name}.npz", *guest_flags])
    return np.load(host_file), np.load(guest.path(f"{CHECK}/arm-{name}.npz"))


def _compare(host, arm) -> dict[str, object]:
    """Where the greedy paths part, and how far the logits are apart on the host's path."""
    same_prefix, top1, deltas = [], [], []
    for i in range(sum(1 for key in host.files if key.startswith("greedy"))):
        h, a = host[f"greedy{i}"], arm[f"greedy{i}"]
        differ = np.flatnonzero(h != a)
        same_prefix.append(int(differ[0]) if differ.size else len(h))
        top1.append(float((host[f"logits{i}"].argmax(-1) == arm[f"logits{i}"].argmax(-1)).mean()))
        deltas.append(np.abs(host[f"logits{i}"] - arm[f"logits{i}"]))
    return {"equal_greedy_prefix": same_prefix, "tokens_per_prompt": TOKENS,
            "teacher_forced_top1_agreement": round(float(np.mean(top1)), 4),
            "max_abs_logit_diff": float(max(d.max() for d in deltas)),
            "mean_abs_logit_diff": float(np.mean([d.mean() for d in deltas])),
            "emulated_seconds_load_and_generate": arm["seconds"].round(1).tolist()}


def test_fp32_bundle_gives_the_hosts_greedy_tokens(guest, installed, bundles):
    host, arm = _tokens_and_logits(guest, "fp32", bundles["fp32"], len(PROMPTS), "--lookup", "8")
    FINDINGS["fp32"] = found = _compare(host, arm)
    for i in range(len(PROMPTS)):
        assert arm[f"greedy{i}"].tolist() == host[f"greedy{i}"].tolist(), found
    assert found["max_abs_logit_diff"] < 1e-3  # float summation order only
    # Prompt lookup on arm: fp32 activations, so its batched check gives greedy's tokens exactly.
    drafted, accepted = arm["lookup0_drafted_accepted"].tolist()
    FINDINGS["fp32"]["lookup_drafted_accepted"] = [drafted, accepted]
    assert arm["lookup0"].tolist() == arm["greedy0"].tolist() and drafted > 0


def test_float16_cache_on_arm_kernels_stays_close_to_the_host(guest, installed, bundles):
    """K and V are rounded to fp16 the same way on both machines; what may differ is how the
    attention kernel computes with them (x86 widens to fp32; arm64 has fp16 arithmetic)."""
    host, arm = _tokens_and_logits(guest, "fp32-kv16", bundles["fp32-kv16"], n_prompts=1)
    FINDINGS["fp32-kv16"] = found = _compare(host, arm)
    print(json.dumps(found))
    assert found["teacher_forced_top1_agreement"] >= 0.97, found
    assert found["mean_abs_logit_diff"] < 0.05, found
    assert min(found["equal_greedy_prefix"]) >= TOKENS // 4, found


def test_rpi5_bundle_int8_activations_stay_close_to_the_host(guest, installed, bundles):
    """accuracy_level=4 quantizes activations to int8 inside MatMulNBits, and x86 (VNNI) and arm
    (dot product) kernels round differently: each lands about as far from fp32 activations as the
    other, so greedy paths part at the first near-tie. Bit-equality is for the fp32 test; here the
    tokens must agree where the host's choice is clear, and the logits within int8 noise."""
    host, arm = _tokens_and_logits(guest, "rpi5", bundles["rpi5"])
    FINDINGS["rpi5"] = found = _compare(host, arm)
    print(json.dumps(found))
    assert found["teacher_forced_top1_agreement"] >= 0.85, found
    assert found["mean_abs_logit_diff"] < 0.5, found
    for i in range(len(PROMPTS)):  # the prompts' tokenization and the first steps are the same
        assert host[f"prompt{i}"].tolist() == arm[f"prompt{i}"].tolist()


def test_rpi5_bundle_without_kleidiai_kernels_changes_the_numbers_not_the_answers(guest, installed, bundles):
    """On an arm64 CPU with the int8 dot product (the guest is a Cortex-A76, as a Pi 5), ONNX
    Runtime's MLAS runs zero-point-free 4-bit matmuls (the rpi5 recipe's gate|up) and fp32 GEMMs
    on Arm's KleidiAI kernels. `--ort-options mlas.disable_kleidiai=1` must reach ONNX Runtime
    there and switch them to MLAS's own NEON kernels: other rounding, the same clear choices. What that does
    to a Pi's speed is for `nomoat bench --ort-options none --ort-options mlas.disable_kleidiai=1`
    on the board (emulated times say nothing)."""
    prompt, first = f"{CHECK}/prompt1.json", f"{CHECK}/arm-rpi5-kleidiai.npz"
    runs = {}
    # The second run's logits are taken on the first run's tokens, so both score one sequence.
    for name, spec, reference in (("kleidiai", "none", []),
                                  ("mlas", "mlas.disable_kleidiai=1", ["--reference", first])):
        with STEPS.step(f"guest: rpi5 greedy + logits, 1 prompt, {name} kernels"):
            guest.run([PYTHON, f"{CHECK}/pi_guest.py", f"{CHECK}/rpi5", prompt, "8",
                       f"{CHECK}/arm-rpi5-{name}.npz", "--ort-options", spec, *reference])
        runs[name] = np.load(guest.path(f"{CHECK}/arm-rpi5-{name}.npz"))
    a, b = runs["kleidiai"], runs["mlas"]
    delta = np.abs(a["logits0"] - b["logits0"])
    FINDINGS["rpi5_kleidiai_off"] = found = {"mean_abs_logit_diff": float(delta.mean()),
                                             "max_abs_logit_diff": float(delta.max()),
                                             "greedy_same": a["greedy0"].tolist() == b["greedy0"].tolist()}
    print(json.dumps(found))
    assert a["prompt0"].tolist() == b["prompt0"].tolist()
    assert delta.mean() > 1e-3, found  # another kernel family ran
    assert delta.mean() < 1.0, found  # and both are right: int8-activation noise (x86 vs arm: ~0.3)
    assert (a["logits0"].argmax(-1) == b["logits0"].argmax(-1)).mean() >= 0.85, found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_in_the_guest_answers_the_host(guest, installed, bundles):
    openai = pytest.importorskip("openai")
    from tokenizers import Tokenizer

    port = _free_port()
    cmd = [PYTHON, "-m", "pi_demo", "serve", f"{CHECK}/rpi5", "--port", str(port)]
    with STEPS.step("guest: pi_demo serve starts"):
        server = guest.popen(cmd, env={"PYTHONPATH": CHECK}, stderr=subprocess.PIPE, text=True)
        _wait_for_line(server, "serving", timeout=600)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=900)
        messages = [{"role": "user", "content": PROMPTS[0]}]
        with STEPS.step("host -> guest: chat completion, 16 tokens max"):
            whole = client.chat.completions.create(model="rpi5", messages=messages, max_tokens=16, temperature=0)
        with STEPS.step("host -> guest: streamed chat completion"):
            chunks = list(client.chat.completions.create(model="rpi5", messages=messages, max_tokens=16,
                                                         temperature=0, stream=True))
    finally:
        server.terminate()
        assert server.wait(timeout=60) == 0
    # The server's greedy answer is the guest's own greedy continuation, up to the stop token.
    arm = np.load(guest.path(f"{CHECK}/arm-rpi5.npz"))["greedy0"].tolist()
    answer_ids = arm[:arm.index(2)] if 2 in arm else arm  # 2 = <|im_end|>, the bundle's stop token
    expected = Tokenizer.from_file(str(bundles["rpi5"] / "tokenizer.json")).decode(answer_ids[:16])
    assert whole.choices[0].message.content == expected and "Paris" in expected
    # The streamed request finds the first one's tokens in the KV cache and recomputes only the
    # prompt's last token (M=1 instead of a batched prefill). With int8 activations the arm kernels
    # for one row and for many round differently, so at a near-tie the greedy path may part
    # ("Paris." vs "Paris, France." was seen): the stream must agree up to the answer itself.
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    answer = expected[:expected.index("Paris") + len("Paris")]
    assert streamed.startswith(answer), (streamed, expected)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert whole.usage.completion_tokens == min(16, len(answer_ids))
    assert whole.usage.prompt_tokens == len(np.load(guest.path(f"{CHECK}/arm-rpi5.npz"))["prompt0"])
    FINDINGS["server_answer"] = expected


def _wait_for_line(proc: subprocess.Popen, text: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    seen = ""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], 1.0)
        if ready:
            line = proc.stderr.readline()
            if not line:
                break
            seen += line
            if text in line:
                return line
    proc.kill()
    raise AssertionError(f"no {text!r} from the guest within {timeout:.0f} s:\n{seen}")


def test_chat_in_the_guest_ctrl_c_stops_the_answer_not_the_program(guest, installed, bundles):
    argv = guest.argv([PYTHON, "-m", "pi_demo", "chat", f"{CHECK}/rpi5", "--max-new-tokens", "200"],
                      env={"PYTHONPATH": CHECK, "TERM": "dumb"})
    term = Terminal(argv)
    try:
        with STEPS.step("guest chat: load"):
            term.expect(r"/quit; .*Ctrl-C stops an answer", timeout=600)
        term.expect(r"\n> ")
        with STEPS.step("guest chat: a long answer starts, Ctrl-C stops it"):
            term.sendline("Write a long story about a dragon who learns to fly.")
            term.expect(r"fly\.\n")  # our own line, echoed
            term.expect(r"\w+\W+\w+\W+\w+", timeout=600)  # three words of the answer
            term.send("\x03")
            term.expect(r"\[stopped: this message and the answer so far are left out", timeout=300)
        term.expect(r"\n> ")
        with STEPS.step("guest chat: the next question is answered"):
            term.sendline(PROMPTS[0])
            stats = term.expect(STATS, timeout=900)
        assert "Paris" in term.seen
        # The stopped turn left nothing in the conversation: the prompt is this one question alone.
        one_question = np.load(guest.path(f"{CHECK}/arm-rpi5.npz"))["prompt0"]
        assert int(stats[1]) + int(stats[2]) == len(one_question)
        term.expect(r"\n> ")
        term.sendline("/quit")
        assert term.wait(timeout=120) == 0
    finally:
        FINDINGS["chat_transcript"] = re.sub(r"\s+", " ", term.seen)[-600:]
        term.close()


def test_structured_output_runs_on_arm64_with_llguidances_wheel(guest, installed, bundles):
    # `pip install 'nomoat[structured]'` on a Pi: llguidance's aarch64 wheel, the host's release.
    with STEPS.step("guest: pip install --only-binary=:all: llguidance"):
        guest.run([PYTHON, "-m", "pip", "install", "--only-binary=:all:",
                   f"llguidance=={importlib.metadata.version('llguidance')}"], env=pip_environment(), timeout=1800)
    schema = {"type": "object", "additionalProperties": False, "required": ["city", "country"],
              "properties": {"city": {"type": "string"}, "country": {"type": "string"}}}
    script = ("import json, sys; from nomoat.runtime import Grammar, Model; "
              f"m = Model.load('{CHECK}/rpi5'); "
              "a = m.generate(sys.argv[1], 40, temperature=0, grammar=Grammar.json(json.loads(sys.argv[2]))); "
              "print(json.dumps([a.text, a.finish_reason]))")
    with STEPS.step("guest: a JSON-schema answer"):
        out = guest.run([PYTHON, "-c", script, f"{PROMPTS[0]} Answer in JSON.", json.dumps(schema)], timeout=900)
    text, finish = json.loads(out.stdout.strip().splitlines()[-1])
    FINDINGS["structured_answer"] = text
    value = json.loads(text)
    assert finish == "stop" and set(value) == {"city", "country"} and value["city"] == "Paris"
