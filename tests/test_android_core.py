"""The Android app's plain-Kotlin core (android_demo/core) on the host JVM, and against the Python runtime.

The JUnit classes test the core alone (fake model, fake tokenizer). The rest runs the same inputs
through both sides: a bundle the Python converter wrote is read by the Kotlin Bundle as
runtime/manifest.py reads it (and refused by both when damaged), the manifest's chat_format renders
what the bundle's Jinja template renders, and the Kotlin sampler's filtered distribution equals the
one runtime/sampling.py draws from, for the same logits and parameters.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import kotlin_host
import numpy as np
import pytest
from nomoat.runtime import sampling
from nomoat.runtime.errors import BundleError
from nomoat.runtime.manifest import read_manifest
from nomoat.runtime.sampling import Sampler, SamplingParams

pytestmark = pytest.mark.android

JUNIT = [f"dev.nomoat.core.{name}" for name in
         ("BundleTest", "SamplerTest", "StopsTest", "GeneratorTest", "ChatFormatTest", "LookupTest", "BandwidthTest",
          "ConversationTest", "HeapBudgetTest")]


def test_junit_classes_pass():
    out = kotlin_host.run_junit(*JUNIT)
    assert "OK (" in out, out


def test_the_app_calls_no_stdlib_function_whose_result_changed_after_kotlin_1_3():
    """The host compiles with Debian's Kotlin 1.3, the app with Gradle's 1.9: max(), min(), maxBy, minBy,
    maxWith and minWith return null for an empty collection in 1.3 and throw in 1.7+, so a `?: 0` that
    passes every host test fails in the app (StopMatcher did, for every generation without stop strings)."""
    changed = re.compile(r"\.(?:max|min)\(\)|\.(?:maxBy|minBy|maxWith|minWith)\s*[({]")
    sources = sorted((kotlin_host.ROOT / "android_demo").glob("*/src/main/**/*.kt"))
    assert len(sources) > 10, sources
    found = [f"{path.relative_to(kotlin_host.ROOT)}:{number}: {line.strip()}" for path in sources
             for number, line in enumerate(path.read_text().splitlines(), 1) if changed.search(line)]
    assert not found, "use fold/maxOf, or the *OrNull form, which mean the same in 1.3 and 1.9:\n" + "\n".join(found)


# -- the bundle ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    """A real bundle from the Python converter: tiny random LLaMA, fp32, ChatML template (~8 s)."""
    from tiny_models import tiny_fp32_bundle

    return tiny_fp32_bundle(tmp_path_factory, max_context=96)


def kotlin_bundle(path: Path, *flags: str) -> dict:
    return json.loads(kotlin_host.run_kotlin("dev.nomoat.core.BundleCli", str(path), *flags))


def python_refusal(path: Path) -> str:
    with pytest.raises(BundleError) as e:
        read_manifest(path)
    return str(e.value)


def test_kotlin_reads_a_real_bundle_as_python_does(tiny_bundle):
    from nomoat.runtime import Model

    k = kotlin_bundle(tiny_bundle)
    assert "error" not in k, k
    m = read_manifest(tiny_bundle)
    assert k["format_version"] == m.format_version == 1
    spec = {name: getattr(m.model, name) for name in ("architecture", "num_layers", "num_heads", "num_kv_heads",
                                                      "head_dim", "hidden_size", "vocab_size", "rope_theta",
                                                      "parameters")}
    assert k["model"] == spec
    assert m.onnx is not None
    keys = ("model_file", "data_file", "io", "kv_dtype", "min_onnxruntime")
    assert {key: k["onnx"][key] for key in keys} == {key: getattr(m.onnx, key) for key in keys}
    assert m.onnx.min_onnxruntime  # the converter wrote it, both sides read it
    assert k["onnx"]["past_key_0"] == m.onnx.io["past_key"].format(layer=0)
    assert k["onnx"]["present_value_1"] == m.onnx.io["present_value"].format(layer=1)
    tok = m.tokenizer
    assert k["tokenizer"] == {"tokenizer_file": tok.tokenizer_file, "chat_template_file": tok.chat_template_file,
                              "bos_token_id": tok.bos_token_id, "add_bos_token": tok.add_bos_token,
                              "special_tokens": tok.special_tokens}
    assert k["max_context"] == m.max_context == 96
    assert k["stop_token_ids"] == m.stop_token_ids
    assert k["generation_defaults"] == m.generation_defaults
    assert k["quantization"] == m.quantization
    assert k["target_name"] == m.target.get("name")
    assert k["target_threads"] == m.target.get("threads")
    assert k["files"] == m.files and k["file_order"] == list(m.files)
    assert k["created_by"] == m.created_by
    assert k["has_chat_format"] is (m.chat_format is not None) is True
    # The bundle's sampling defaults, as Model.sampling_params() builds them.
    python_params = Model.load(tiny_bundle).sampling_params()
    assert k["sampling"] == {"temperature": python_params.temperature, "top_k": python_params.top_k,
                             "top_p": python_params.top_p, "min_p": python_params.min_p,
                             "repetition_penalty": python_params.repetition_penalty,
                             "repeat_last_n": python_params.repeat_last_n, "seed": python_params.seed}
    assert k["max_new_tokens"] == m.generation_defaults.get("max_new_tokens", 256)


def _copy(bundle: Path, to: Path) -> Path:
    shutil.copytree(bundle, to)
    return to


@pytest.mark.parametrize("damage", ["flipped-byte", "missing-file", "truncated"])
def test_a_damaged_copy_is_refused_by_both_naming_the_file(tiny_bundle, tmp_path, damage):
    m = read_manifest(tiny_bundle)
    name = max(m.files, key=lambda f: (tiny_bundle / f).stat().st_size)  # the weights: the copy most likely cut
    copy = _copy(tiny_bundle, tmp_path / "copy")
    target = copy / name
    data = bytearray(target.read_bytes())
    if damage == "flipped-byte":
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
    elif damage == "truncated":
        target.write_bytes(bytes(data[: len(data) - 1000]))
    else:
        target.unlink()
    python = python_refusal(copy)
    kotlin = kotlin_bundle(copy)
    assert "error" in kotlin, kotlin
    assert f"bundle file {name} " in python and f"bundle file {name} " in kotlin["error"]
    assert "nomoat deploy --adb" in kotlin["error"]
    if damage != "missing-file":  # without verification a damaged (but present) file is not looked at
        assert "error" not in kotlin_bundle(copy, "--no-verify")


# onnx fields the Python runtime checks (OnnxBackend.from_dict), with a value it refuses.
BAD_ONNX_FIELDS = {"onnx-kv_dtype-bfloat16": ("kv_dtype", "bfloat16"), "onnx-kv_dtype-null": ("kv_dtype", None),
                   "onnx-weight_bytes_per_token-0": ("weight_bytes_per_token", 0),
                   "onnx-weight_bytes_per_token-1.5": ("weight_bytes_per_token", 1.5),
                   "onnx-weight_bytes_per_token-true": ("weight_bytes_per_token", True)}


@pytest.mark.parametrize("edit", ["format_version-2", "format_version-missing", "no-max_context", "no-model",
                                  *BAD_ONNX_FIELDS])
def test_a_bad_manifest_is_refused_by_both(tiny_bundle, tmp_path, edit):
    copy = _copy(tiny_bundle, tmp_path / "copy")
    raw = json.loads((copy / "manifest.json").read_text())
    if edit == "format_version-2":
        raw["format_version"] = 2
    elif edit == "format_version-missing":
        del raw["format_version"]
    elif edit in BAD_ONNX_FIELDS:
        field, value = BAD_ONNX_FIELDS[edit]
        raw["onnx"][field] = value
    else:
        del raw[edit.removeprefix("no-")]
    (copy / "manifest.json").write_text(json.dumps(raw))
    python = python_refusal(copy)
    kotlin = kotlin_bundle(copy)["error"]
    if edit.startswith("format_version"):
        # The same sentence up to who reads it: "... is not supported by this nomoat runtime/app".
        assert kotlin.split(" is not supported")[0] == python.split(" is not supported")[0]
        assert "Re-convert the model with a matching `nomoat convert`" in kotlin
    elif edit in BAD_ONNX_FIELDS:
        # The same reason in the same words, e.g. "onnx.kv_dtype 'bfloat16' is not one this runtime keeps ...".
        reason = re.search(r"\((onnx\.\w+ .*)\); re-convert the model\.$", kotlin)
        assert reason and reason.group(1) in python, (kotlin, python)
    else:
        field = edit.removeprefix("no-")
        assert field in python and f'missing "{field}"' in kotlin and "re-convert the model" in kotlin


def _set(*path_and_value):
    """An edit of the manifest's JSON: set the field at path (None-free: DROP deletes it)."""
    *path, value = path_and_value

    def edit(raw: dict) -> None:
        *head, last = path
        for key in head:
            raw = raw[key]
        if value is DROP:
            del raw[last]
        else:
            raw[last] = value
    return edit


DROP = object()
UPPER_SHA256 = "A" * 64


def _both(*edits):
    def edit(raw: dict) -> None:
        for one in edits:
            one(raw)
    return edit


def _listed_outside(raw: dict) -> None:  # a real file, reached through the folder's parent: "../copy/model.onnx"
    raw["files"]["../copy/model.onnx"] = raw["files"]["model.onnx"]


# Manifests the Python runtime refuses (runtime/manifest.py since it checks field types and ranges, onnx.io,
# file names, sha256s, UTF-8 and strict JSON), each refused by the Kotlin core with the same reason: a JSON
# edit, a text edit ("text", fn) or the file's bytes. Fields no app code reads and Python checks only for
# their type (model.num_heads, hidden_size, rope_theta, parameters, rope_scaling; tokenizer.special_tokens;
# quantization, source) are not checked by the app: see Manifest.fromJson.
BAD_MANIFESTS = {
    "root-list": b"[]",
    "root-string": b'"manifest"',
    "not-utf8": ("bytes", lambda text: text.replace('"created_by": "nomoat"', '"created_by": "nom\udce9"')
                 .encode("utf-8", "surrogateescape")),
    "json-trailing-text": ("text", lambda text: text + "\n# the end\n"),
    "json-single-quotes": ("text", lambda text: text.replace('"created_by": "nomoat"', "'created_by': 'nomoat'")),
    "json-comment": ("text", lambda text: "// a bundle\n" + text),
    # json.loads' RecursionError was a traceback in Python, a StackOverflowError in the app
    "json-nested-too-deep": b"[" * 200_000 + b"]" * 200_000,
    "json-objects-nested-too-deep": ("text", lambda text: '{"a": ' * 100_000 + text + "}" * 100_000),
    "model-list": _set("model", []),
    "model.num_layers-0": _set("model", "num_layers", 0),
    "model.num_kv_heads-string": _set("model", "num_kv_heads", "2"),
    "model.head_dim-negative": _set("model", "head_dim", -1),
    "model.vocab_size-float": _set("model", "vocab_size", 400.0),
    "generation_defaults-null": _set("generation_defaults", None),
    "target-list": _set("target", []),
    "chat_format-string": _set("chat_format", "chatml"),
    "onnx-list": _set("onnx", [1]),
    "onnx.model_file-parent": _set("onnx", "model_file", "../model.onnx"),
    "onnx.data_file-absolute": _set("onnx", "data_file", "/etc/passwd"),
    "onnx.io-no-logits": _set("onnx", "io", "logits", DROP),
    "onnx.io-no-past_value": _set("onnx", "io", "past_value", DROP),
    "onnx.io.input_ids-number": _set("onnx", "io", "input_ids", 5),
    "onnx.io.past_key-no-placeholder": _set("onnx", "io", "past_key", "past_key_values.key"),
    "onnx.io.present_value-escaped": _set("onnx", "io", "present_value", "present.{{layer}}.value"),
    "onnx.io.present_key-other-field": _set("onnx", "io", "present_key", "present.{0}.key"),
    "onnx.io.past_key-format-spec": _set("onnx", "io", "past_key", "past_key_values.{layer:d}.key"),
    "files-parent-key": _set("files", "../copy/model.onnx", "0" * 64),
    "tokenizer.tokenizer_file-absolute": _set("tokenizer", "tokenizer_file", "/etc/passwd"),
    "tokenizer.chat_template_file-subfolder": _set("tokenizer", "chat_template_file", "templates/chat.jinja"),
    "tokenizer.bos_token_id-negative": _set("tokenizer", "bos_token_id", -1),
    "max_context-0": _set("max_context", 0),
    "max_context-float": _set("max_context", 96.0),
    "stop_token_ids-outside-vocab": _set("stop_token_ids", [400]),
    "stop_token_ids-string": _set("stop_token_ids", ["2"]),
    "generation_defaults.temperature-negative": _set("generation_defaults", "temperature", -1),
    "generation_defaults.top_k-float": _set("generation_defaults", "top_k", 1.5),
    "generation_defaults.seed-string": _set("generation_defaults", "seed", "1"),
    "generation_defaults.frequency_penalty-string": _set("generation_defaults", "frequency_penalty", "1"),
    "generation_defaults.presence_penalty-bool": _set("generation_defaults", "presence_penalty", True),
    "generation_defaults.max_new_tokens-0": _set("generation_defaults", "max_new_tokens", 0),
    "target.threads-0": _set("target", "threads", 0),
    "target.threads-string": _set("target", "threads", "2"),
    "files-list": _set("files", []),
    "files-uppercase-sha256": _set("files", "model.onnx.data", UPPER_SHA256),
    "files-short-sha256": _set("files", "tokenizer.json", "abc"),
    "files-key-outside": _listed_outside,
    "files-no-weights": _set("files", "model.onnx.data", DROP),
    "files-no-chat-template": _set("files", "chat_template.jinja", DROP),
    # Wrong twice: the first in Python's order is named.
    "twice-max_context-stop_token_ids": _both(_set("max_context", 0), _set("stop_token_ids", [9999])),
    "twice-files-onnx-tokenizer": _both(_set("files", []), _set("tokenizer", "bos_token_id", -1),
                                        _set("onnx", "model_file", "../x")),
    "twice-no-onnx-unlisted-tokenizer": _both(_set("onnx", DROP), _set("files", "tokenizer.json", DROP)),
}


@pytest.mark.parametrize("case", BAD_MANIFESTS)
def test_kotlin_refuses_what_python_refuses_in_its_words(tiny_bundle, tmp_path, case):
    copy = _copy(tiny_bundle, tmp_path / "copy")
    path = copy / "manifest.json"
    edit = BAD_MANIFESTS[case]
    if isinstance(edit, bytes):
        path.write_bytes(edit)
    elif isinstance(edit, tuple):
        kind, fn = edit
        text = json.dumps(json.loads(path.read_text()))
        path.write_bytes(fn(text) if kind == "bytes" else fn(text).encode())
    else:
        raw = json.loads(path.read_text())
        edit(raw)
        path.write_text(json.dumps(raw))
    python = python_refusal(copy)
    kotlin = kotlin_bundle(copy)["error"]
    if " is not valid JSON (" in python:  # Python names the path, the app the file; the reason is json.loads'
        assert kotlin == "manifest.json is not valid JSON (" + python.split(" is not valid JSON (", 1)[1], python
    else:  # Python's "(ValueError: ...)" is "(...)" on the app
        assert kotlin == python.replace("is malformed (ValueError: ", "is malformed (", 1), python


def test_a_bundle_without_onnx_is_refused(tiny_bundle, tmp_path):
    copy = _copy(tiny_bundle, tmp_path / "copy")
    raw = json.loads((copy / "manifest.json").read_text())
    del raw["onnx"]
    (copy / "manifest.json").write_text(json.dumps(raw))
    assert read_manifest(copy).onnx is None  # Python reads it; Model.load refuses it
    assert "this app runs ONNX bundles" in kotlin_bundle(copy)["error"]


CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
    [{"role": "user", "content": " spaces \n and lines\n"}, {"role": "assistant", "content": "Hello! 😀"},
     {"role": "user", "content": "naïve café"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}, {"role": "user", "content": "e"}],
]


def test_chat_format_renders_what_the_template_renders(tiny_bundle):
    from nomoat.runtime import Model

    model = Model.load(tiny_bundle, verify_checksums=False)
    lines = "".join(json.dumps(c) + "\n" for c in CONVERSATIONS)
    out = kotlin_host.run_kotlin("dev.nomoat.core.BundleCli", str(tiny_bundle), "--render", input=lines)
    rendered = [json.loads(line) for line in out.splitlines()]
    assert rendered == [model.template.render(c, add_generation_prompt=True) for c in CONVERSATIONS]


@pytest.mark.parametrize("name", ["LLAMA32_TEMPLATE", "DEEPSEEK_R1_TEMPLATE", "QWEN3_STYLE_TEMPLATE", "LLAMA2_TEMPLATE",
                                  "MISTRAL_V01_TEMPLATE", "MISTRAL_V03_TEMPLATE", "PHI35_TEMPLATE"])
def test_chat_format_content_changes_and_dates_render_as_jinja_does(name, tiny_bundle, tmp_path):
    """Templates that trim content, drop an earlier answer's reasoning, put in today's date, end the
    prompt with text an answered turn does not repeat (DeepSeek-R1-Distill's "<think>\\n") or take no
    system message as fixed text: the app renders the converter's pieces as Jinja renders the template,
    on the day it is given, and refuses a system message as Python's render_pieces does."""
    import test_chat_format
    from nomoat.converter.chat_format import NO_SYSTEM, derive_chat_format
    from nomoat.runtime.chat_template import ChatTemplate

    template = ChatTemplate(getattr(test_chat_format, name), bos_token="<s>", eos_token="</s>")
    bundle = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    fmt = manifest["chat_format"] = derive_chat_format(template)
    assert set(fmt) & {"content", "dates", "generation_prompt"} or fmt["first_turn_with_system"] is None
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    conversations = CONVERSATIONS + test_chat_format.CONVERSATIONS
    lines = "".join(json.dumps(c) + "\n" for c in conversations)
    day = test_chat_format.DAY
    out = kotlin_host.run_kotlin("dev.nomoat.core.BundleCli", str(bundle), "--render", f"--now={day.isoformat()}",
                                 input=lines)
    rendered = [json.loads(line) for line in out.splitlines()]
    assert rendered == [{"error": NO_SYSTEM} if c[0]["role"] == "system" and fmt["first_turn_with_system"] is None
                        else template.render(c, add_generation_prompt=True, strftime_now=day.strftime)
                        for c in conversations]


# -- the sampler -----------------------------------------------------------------------------


def python_distribution(logits: np.ndarray, history: list[int], params: SamplingParams,
                        monkeypatch: pytest.MonkeyPatch, prompt_length: int = 0) -> dict[int, float]:
    """What runtime/sampling.py's Sampler.sample draws from: the ids and weights it hands to _draw
    (captured, so this is the sampler's own code path, not a re-spelling of it), normalized;
    a one-hot at its answer when greedy. runtime/sampling.py has no public distribution function."""
    captured: dict[str, np.ndarray] = {}

    def capture(rng, ids, weights):
        captured["ids"], captured["weights"] = np.array(ids), np.array(weights, dtype=np.float64)
        return int(ids[0])

    with monkeypatch.context() as m:
        m.setattr(sampling, "_draw", capture)
        token = Sampler(params).sample(logits, history, prompt_length=prompt_length)
    if not captured:
        return {token: 1.0}
    w = captured["weights"]
    return dict(zip(captured["ids"].tolist(), (w / w.sum()).tolist(), strict=True))


PARAMS = [
    {},  # greedy
    {"repetition_penalty": 1.3},  # greedy with a penalty
    {"temperature": 1.0},
    {"temperature": 0.7},
    {"temperature": 1.5, "top_k": 40},
    {"temperature": 1.0, "top_k": 1},
    {"temperature": 0.8, "top_p": 0.9},
    {"temperature": 1.0, "top_p": 0.5},
    {"temperature": 1.0, "top_p": 0.0},  # the most likely token alone (OpenAI's and transformers' 0)
    {"temperature": 1.0, "min_p": 0.05},
    {"temperature": 0.9, "min_p": 0.2, "top_p": 0.95},
    {"temperature": 0.7, "top_k": 50, "top_p": 0.9, "min_p": 0.05, "repetition_penalty": 1.2},
    {"temperature": 2.0, "top_k": 500, "repetition_penalty": 0.8},
    # llama.cpp's window of the penalty: the last 3 of the 20 history ids, or none
    {"temperature": 1.0, "repetition_penalty": 1.5, "repeat_last_n": 3},
    {"temperature": 1.0, "repetition_penalty": 1.5, "repeat_last_n": 0},
    {"repetition_penalty": 3.0, "repeat_last_n": 1},
    # OpenAI's penalties, alone, together, with the repetition penalty, in a window
    {"frequency_penalty": 0.7},
    {"temperature": 1.0, "presence_penalty": 1.5},
    {"temperature": 0.8, "frequency_penalty": 0.3, "presence_penalty": -0.4, "repetition_penalty": 1.2},
    {"temperature": 1.0, "frequency_penalty": 1.0, "repeat_last_n": 5},
    {"frequency_penalty": 2.0, "presence_penalty": 1.0, "repeat_last_n": 10, "repetition_penalty": 1.1},
    # a nucleus so small its bound rounds to the one candidate's weight (float32 in numpy, 1 - p = 1 in double)
    {"temperature": 1.0, "top_k": 1, "top_p": 1e-8},
    {"temperature": 1.0, "top_k": 1, "top_p": 1e-17},
    {"temperature": 1.0, "top_k": 2 ** 40, "repeat_last_n": 2 ** 40, "repetition_penalty": 1.2},  # as if unset
    # penalties that take logits past float32's range: the largest finite logit, not an infinity
    {"temperature": 1.0, "repetition_penalty": 1e-40},
    {"repetition_penalty": 1e40},
    {"temperature": 1.0, "presence_penalty": -1e300},
    {"temperature": 0.5, "frequency_penalty": 1e300, "repetition_penalty": 1e-40},
]


def test_sampler_distributions_equal_pythons(monkeypatch):
    rng = np.random.default_rng(0)
    requests, expected = [], []
    for vocab in (50, 3000):
        for rounded in (False, True):  # rounded logits tie: top-k keeps ties, top-p orders them by id
            for p in PARAMS:
                logits = (rng.standard_normal(vocab) * 3).astype(np.float32)
                if rounded:
                    logits = np.round(logits, 1).astype(np.float32)
                history = rng.integers(0, vocab, size=20).tolist()
                prompt_length = 12  # frequency and presence count the last 8 (the answer), the repetition penalty all
                params = SamplingParams.from_dict({**p, "seed": 5})
                expected.append(python_distribution(logits, history, params, monkeypatch, prompt_length))
                requests.append({"logits": logits.tolist(), "history": history, "prompt_length": prompt_length,
                                 "params": {**p, "seed": 5}, "draws": 20})
    out = kotlin_host.run_kotlin("dev.nomoat.core.SamplerCli", input="".join(json.dumps(r) + "\n" for r in requests))
    answers = [json.loads(line) for line in out.splitlines()]
    assert len(answers) == len(requests)
    for request, want, got in zip(requests, expected, answers, strict=True):
        assert "error" not in got, got
        kotlin = dict(zip(got["ids"], got["probs"], strict=True))
        assert set(kotlin) == set(want), (request["params"], sorted(set(kotlin) ^ set(want)))
        for token, prob in want.items():
            assert kotlin[token] == pytest.approx(prob, abs=1e-6), (request["params"], token)
        assert set(got["draws"]) <= set(want)  # the Kotlin sampler draws from that distribution


@pytest.mark.parametrize("params", [{"temperature": -1.0}, {"top_k": -3}, {"top_p": -0.1}, {"top_p": 1.5},
                                    {"min_p": 2.0}, {"repetition_penalty": 0.0},
                                    {"repetition_penalty": 1e-300}, {"seed": -1}, {"topk": 3},
                                    {"top_k": 2.5}, {"temperature": True}, {"repeat_last_n": -2},
                                    {"repeat_last_n": 1.5}, {"frequency_penalty": "1"},
                                    {"presence_penalty": True}])
def test_the_sampler_refuses_what_python_refuses(params):
    with pytest.raises(ValueError) as e:
        SamplingParams.from_dict(params)
    out = kotlin_host.run_kotlin("dev.nomoat.core.SamplerCli",
                                 input=json.dumps({"logits": [0.0, 1.0], "params": params}) + "\n")
    kotlin = json.loads(out)["error"]
    # The same message up to the value's spelling (Python repr vs Kotlin toString).
    assert kotlin.split(", got")[0].split("; expected")[0] == str(e.value).split(", got")[0].split("; expected")[0]


def test_the_bench_prompt_is_the_hosts(tiny_bundle):
    # `nomoat deploy --adb --bench` compares phone and host numbers: both must run the same ids.
    from nomoat.runtime.bench import synthetic_prompt_ids

    out = kotlin_host.run_kotlin("dev.nomoat.core.BundleCli", str(tiny_bundle), "--bench-prompt=300")
    assert json.loads(out) == synthetic_prompt_ids(tiny_bundle / "tokenizer.json", 300)


# -- generation -------------------------------------------------------------------------------


class ScriptSession:
    """DecoderSession's interface over a scripted model, GenerateCli's ScriptForward in Python: after a
    pass the next token is next[the pass's last id] (else fallback); `fed` lists every pass."""

    def __init__(self, capacity: int, vocab: int, next_ids: dict[int, int], fallback: int):
        self.capacity, self.vocab, self.next, self.fallback = capacity, vocab, next_ids, fallback
        self.tokens: list[int] = []
        self.fed: list[list] = []

    @property
    def length(self) -> int:
        return len(self.tokens)

    def truncate(self, n: int) -> None:
        del self.tokens[n:]

    def reset(self) -> None:
        self.tokens.clear()

    def forward(self, ids: list[int], all_logits: bool = False) -> np.ndarray:
        assert len(self.tokens) + len(ids) <= self.capacity, "run past the context"
        self.fed.append([len(self.tokens), list(ids)])
        self.tokens.extend(ids)
        rows = np.zeros((len(ids), self.vocab), np.float32)
        for i, token in enumerate(ids):
            rows[i, self.next.get(token, self.fallback)] = 10
        return rows if all_logits else rows[-1]


def python_generation(bundle: Path, request: dict) -> dict:
    """What GenerateCli does for one request, with runtime/model.py."""
    import dataclasses

    from nomoat.runtime import Model
    from nomoat.runtime.errors import ContextOverflowError
    from tokenizers import Tokenizer

    manifest = dataclasses.replace(read_manifest(bundle), max_context=request["max_context"])
    session = ScriptSession(request["max_context"], manifest.model.vocab_size,
                            {int(k): v for k, v in request["next"].items()}, request["fallback"])
    model = Model(bundle, manifest, session, Tokenizer.from_file(str(bundle / "tokenizer.json")))
    stop, lookup = request.get("stop", []), request.get("prompt_lookup", 0)
    if "chat" in request:
        chat, turns, deltas = model.chat(), [], []
        for user in request["chat"]:
            try:
                events = list(chat.stream(user, request["max_new"], stop=stop, prompt_lookup=lookup, temperature=0.0))
            except ContextOverflowError as e:
                turns.append({"error": str(e)})
                continue
            deltas += [e.text for e in events if e.text]
            turns.append({"text": "".join(e.text for e in events), "finish": events[-1].finish_reason,
                          "ids": [e.token_id for e in events if e.token_id is not None]})
        return {"turns": turns, "history": chat.messages, "deltas": deltas, "fed": session.fed}
    events = list(model.stream_ids(request["prompt"], request["max_new"], stop=stop, prompt_lookup=lookup))
    return {"text": "".join(e.text for e in events), "ids": [e.token_id for e in events if e.token_id is not None],
            "finish": events[-1].finish_reason, "deltas": [e.text for e in events if e.text], "fed": session.fed}


def test_generation_and_chat_match_pythons(tiny_bundle):
    """Generator and Chat against Model.stream_ids and Chat over the same scripted model and the bundle's
    tokenizer: the text shown (special tokens the model writes are not), the answer's ids, why it
    ended, the history, and every pass the KV cache ran."""
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(tiny_bundle / "tokenizer.json"))
    manifest = read_manifest(tiny_bundle)

    def one(text: str) -> int:
        ids = hf.encode(text, add_special_tokens=False).ids
        assert len(ids) == 1, (text, ids)
        return ids[0]

    eot, im_start, im_end, nl = one("<|endoftext|>"), one("<|im_start|>"), one("<|im_end|>"), one("\n")
    assert im_end in manifest.stop_token_ids and not {eot, im_start} & set(manifest.stop_token_ids)
    a, b, c = one("The"), one(" capital"), one(" France")
    prompt = hf.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).ids
    # A special token mid-answer, then the bundle's stop token; one that loops until max_new.
    chain = {nl: a, a: eot, eot: b, b: c, c: im_end}
    loop = {nl: a, a: im_start, im_start: b, b: nl}
    lt, bar = one("<"), one("|")
    cut = {nl: a, a: lt, lt: b, b: im_end}  # "The<" cut at "<", the start of the template's "<|im_end|>"
    base = {"max_context": 96, "fallback": im_end, "max_new": 12}
    requests = [
        {**base, "prompt": prompt, "next": chain},
        {**base, "prompt": prompt, "next": loop},
        # A stop string that is one special token stops at that token (not in the ids); others stay text.
        {**base, "prompt": prompt, "next": loop, "stop": ["<|im_start|>"]},
        {**base, "prompt": prompt, "next": loop, "stop": [" capital", "<|endoftext|>"]},
        {**base, "prompt": prompt, "next": loop, "stop": ["<|im_start|>"], "prompt_lookup": 4},
        {**base, "prompt": prompt, "next": chain, "prompt_lookup": 4},
        # Chat: the history keeps the text shown, the next prompt the tokens the model saw.
        {**base, "chat": ["hi", "more", "again"], "next": chain},
        {**base, "chat": ["hi", "more"], "next": loop, "stop": ["<|im_start|>"]},
        {**base, "chat": ["hi", "more", "and more", "still more"], "next": loop, "max_context": 64},
        {**base, "chat": ["hi", "more"], "next": cut, "stop": ["<"]},
    ]
    out = kotlin_host.run_kotlin("dev.nomoat.core.GenerateCli", str(tiny_bundle),
                                 input="".join(json.dumps(r) + "\n" for r in requests))
    answers = [json.loads(line) for line in out.splitlines()]
    assert len(answers) == len(requests)
    for request, kotlin in zip(requests, answers, strict=True):
        assert kotlin == python_generation(tiny_bundle, request), request
    # The cases did what they are for: special tokens generated but not shown, a special stop string, an overflow.
    assert answers[0]["ids"] == [a, eot, b, c] and "<|endoftext|>" not in answers[0]["text"]
    assert im_start in answers[1]["ids"] and "<|im_start|>" not in answers[1]["text"]
    assert answers[2]["ids"] == [a] and answers[2]["finish"] == "stop"
    assert any("error" in turn for turn in answers[-2]["turns"])
    # The turn cut at "<" is fed back as its text and the special <|im_end|>, not "<" and "|im_end|>" as text.
    assert answers[-1]["turns"][0]["text"] == "The" and bar not in [t for _, run in answers[-1]["fed"] for t in run]


# -- prompt lookup ---------------------------------------------------------------------------


def python_drafts(tokens: list[int], start: int, max_draft: int, cost: float) -> list[list[int]]:
    """LookupCli's replay with runtime/lookup.py: propose, accept what the true continuation confirms, learn."""
    from nomoat.runtime.lookup import Drafter, accepted_prefix

    drafter = Drafter(max_draft, cost=cost)
    drafts = []
    for at in range(start, len(tokens)):
        draft = drafter.propose(tokens[:at], len(tokens) - at)
        drafter.update(len(draft), accepted_prefix(draft, tokens[at:at + len(draft)]))
        drafts.append(draft)
    return drafts


def test_the_drafter_drafts_what_pythons_drafts():
    rng = np.random.default_rng(7)
    requests = []
    for i in range(40):
        # Few symbols and pasted runs: plenty of matches, some drafts kept, some rejected.
        tokens = rng.integers(0, 3 + i % 6, size=int(rng.integers(20, 90))).tolist()
        if i % 2:
            at = int(rng.integers(5, len(tokens)))
            tokens += tokens[at - 5:at + 10]
        requests.append({"tokens": tokens, "start": int(rng.integers(1, 12)), "max_draft": int(rng.integers(1, 9)),
                         "cost": [0.25, 0.0, 0.5][i % 3]})
    out = kotlin_host.run_kotlin("dev.nomoat.core.LookupCli", input="".join(json.dumps(r) + "\n" for r in requests))
    answers = [json.loads(line) for line in out.splitlines()]
    assert len(answers) == len(requests)
    for request, answer in zip(requests, answers, strict=True):
        expected = python_drafts(request["tokens"], request["start"], request["max_draft"], request["cost"])
        assert answer["drafts"] == expected, request
    # The replays exercised the drafter: drafts made, and some cut short by its record.
    assert sum(len(d) for a in answers for d in a["drafts"]) > 200


# -- the bandwidth probe ---------------------------------------------------------------------


def test_kotlin_bandwidth_probe_reads_memory_as_the_python_one_does():
    # The app's probe (Bandwidth.kt, JIT-compiled loops) against runtime/bandwidth.py (numpy) on
    # this machine: the same method, so the same memory within the noise; a probe bound by its
    # own loop, or reading a cache, would be off by far more than 2x.
    # Other work on the machine slows a probe down by a share that comes and goes (on a busy 2-core
    # machine, 2x and more): each Kotlin run is set against the better of the Python runs just before
    # and just after it, and while the load keeps them apart another turn is taken, up to 6. A probe
    # that is really off is off in every turn; on a quiet machine the first turn decides.
    from nomoat.runtime.bandwidth import read_bandwidth

    python, kotlin = [read_bandwidth(1)], []
    for _ in range(6):
        kotlin.append(json.loads(kotlin_host.run_kotlin("dev.nomoat.core.BandwidthCli", "1").strip())["1"])
        python.append(read_bandwidth(1))
        if 0.5 < kotlin[-1] / max(python[-2:]) < 2.0:
            break
    else:
        pytest.fail(f"Kotlin's read bandwidth {kotlin} is not within 2x of Python's {python} in any turn")
