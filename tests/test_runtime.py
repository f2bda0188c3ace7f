"""nomoat.runtime on a tiny bundle: loading rules, generation, chat KV reuse, limits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from nomoat.runtime import BundleError, ContextOverflowError, GenerationStats, Model
from tiny_models import SPECIAL_TOKENS, tiny_fp32_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return tiny_fp32_bundle(tmp_path_factory, max_context=96)


def _copy(bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / "copy"))


def test_import_runtime_leaves_torch_out():
    code = ("import sys, nomoat.runtime; bad = [m for m in ('torch', 'transformers', 'nomoat.converter') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_running_a_bundle_leaves_nothing_in_home(bundle, tmp_path):
    """ONNX Runtime 1.32's Linux wheel writes a device id and a queued telemetry event under
    ~/.cache/Microsoft at its first session unless ORT_DISABLE_TELEMETRY is set before its import."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("ORT_DISABLE_TELEMETRY", "XDG_CACHE_HOME")}
    code = "import sys; from nomoat.runtime import Model; Model.load(sys.argv[1]).logits([1, 2])"
    result = subprocess.run([sys.executable, "-c", code, str(bundle)], capture_output=True, text=True,
                            env={**env, "HOME": str(home)})
    assert result.returncode == 0, result.stderr
    assert [str(p.relative_to(home)) for p in home.rglob("*")] == []


def test_jinja_is_imported_only_when_a_template_renders(bundle):
    # ~3 MB of RSS that a process running token ids (a benchmark, perplexity) does not need
    code = ("import sys; from nomoat.runtime import Model; m = Model.load(sys.argv[1]); "
            "m.generate_tokens([1, 2], 2, ignore_eos=True).__next__(); print('jinja2' in sys.modules, end=' '); "
            "m.render('hi'); print('jinja2' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code, str(bundle)], capture_output=True, text=True)
    assert result.stdout.strip() == "False True", result.stdout + result.stderr


def test_the_template_is_the_loaded_bundles_after_its_folder_is_swapped_or_gone(bundle, tmp_path):
    """`nomoat deploy` swaps a bundle's folder under a running `pi_demo serve`: the model it loaded must
    go on chatting through its own template, not the new bundle's (or fail at every chat once it is gone)."""
    loaded = _copy(bundle, tmp_path)
    model = Model.load(loaded)
    expected = model.render("hi")
    model = Model.load(loaded)  # the template not compiled yet
    other = _with_template(bundle, tmp_path / "other", "{% for m in messages %}<<{{ m.content }}>>{% endfor %}")
    shutil.move(loaded, tmp_path / "moved-aside")
    shutil.move(other, loaded)
    assert model.render("hi") == expected
    shutil.rmtree(loaded)
    assert model.render("hi") == expected


def test_a_bundle_path_given_with_a_literal_tilde_is_in_home(bundle, tmp_path, monkeypatch):
    """convert --out=~/x expands the ~ (bash leaves it after '='); the runtime took "~/x" literally."""
    from nomoat.runtime.manifest import read_manifest

    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(bundle, tmp_path / "mine")
    assert Model.load("~/mine").generate("hi", 2, temperature=0).token_ids
    assert read_manifest("~/mine").max_context == 96


def test_a_tokenizer_that_panics_on_a_prompt_is_a_value_error(bundle, tmp_path):
    """A bundle's pre-tokenizer regex that backtracks past Oniguruma's retry limit panics in Rust: pyo3's
    PanicException is a BaseException, which went by the server's handlers and dropped the connection."""
    from nomoat.runtime.manifest import sha256_file

    b = _copy(bundle, tmp_path)
    tokenizer = json.loads((b / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"(\w+\s?)+$"}, "behavior": "Isolated", "invert": False},
        tokenizer["pre_tokenizer"]]}
    (b / "tokenizer.json").write_text(json.dumps(tokenizer))
    m = json.loads((b / "manifest.json").read_text())
    m["files"]["tokenizer.json"] = sha256_file(b / "tokenizer.json")
    (b / "manifest.json").write_text(json.dumps(m))
    model = Model.load(b)
    assert model.encode("short")  # the regex is fine on most text
    with pytest.raises(ValueError, match=r"the bundle's tokenizer failed on this text \(.*retry-limit"):
        model.encode("hello there friend how are you today my good old pal we have not met in a long long time "
                     "so tell me all about it!")


def test_a_path_that_is_not_utf8_is_refused_with_the_byte(bundle, tmp_path):
    """A folder named in Latin-1: ONNX Runtime's binding failed with a TypeError traceback, tokenizers' and
    safetensors' with advice to copy or download the files again; convert --out failed after the work."""
    import os

    from nomoat.converter.bundle import check_destination
    from nomoat.converter.errors import ConversionError
    from nomoat.converter.load import load_checkpoint

    latin1 = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9"))
    shutil.copytree(bundle, latin1)
    said = r"'.*/caf\\xe9' has the byte 0xe9, which is not UTF-8 .*rename the folder"
    with pytest.raises(BundleError, match="the bundle's path " + said):
        Model.load(latin1)
    with pytest.raises(ConversionError, match="--model " + said):
        load_checkpoint(latin1)
    with pytest.raises(ConversionError, match="--out " + said):
        check_destination(latin1, force=True)


def test_unknown_format_version_is_refused(bundle, tmp_path):
    b = _copy(bundle, tmp_path)
    m = json.loads((b / "manifest.json").read_text())
    m["format_version"] = 99
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="format_version 99.*Re-convert"):
        Model.load(b)


def test_a_manifest_nested_too_deep_is_one_line_not_a_recursion_error(bundle, tmp_path, capsys):
    """json.loads recurses per bracket: 200,000 were a RecursionError traceback in Model.load, chat and inspect."""
    from nomoat.__main__ import main

    b = _copy(bundle, tmp_path)
    (b / "manifest.json").write_text("[" * 200_000 + "]" * 200_000)
    said = "manifest.json is not valid JSON (maximum recursion depth exceeded while decoding a JSON array"
    with pytest.raises(BundleError, match=r"manifest\.json is not valid JSON \(maximum recursion depth exceeded"):
        Model.load(b)
    for verb in ("chat", "inspect"):
        assert main([verb, str(b)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"nomoat {verb}: error: {b}/{said}") and err.count("\n") == 1, err


def test_damaged_file_is_refused(bundle, tmp_path):
    b = _copy(bundle, tmp_path)
    data = bytearray((b / "model.onnx.data").read_bytes())
    data[100] ^= 0xFF
    (b / "model.onnx.data").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="model.onnx.data does not match its sha256"):
        Model.load(b)


def test_missing_file_is_refused(bundle, tmp_path):
    b = _copy(bundle, tmp_path)
    (b / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="tokenizer.json is missing"):
        Model.load(b)


@pytest.mark.parametrize("section, field, value, said", [
    ("onnx", "kv_dtype", "float16", r"onnx.kv_dtype is 'float16', but model.onnx has past_key_values.0.key of "
                                    r"type tensor\(float\)"),
    ("model", "num_kv_heads", 4, "model.num_kv_heads is 4, but model.onnx has 2 KV heads"),
    ("model", "head_dim", 8, "model.head_dim is 8, but model.onnx has a head_dim of 16"),
    ("model", "num_layers", 1, "model.num_layers is 1, but model.onnx has 2 layers"),
    ("model", "num_layers", 3, "model.num_layers is 3, but model.onnx has 2 layers"),
    ("model", "vocab_size", 300, "model.vocab_size is 300, but model.onnx has a vocabulary of"),
    ("onnx", "io", "logits=out", "onnx.io.logits is 'out', but model.onnx has no output of that name"),
])
def test_a_manifest_that_contradicts_the_graph_is_refused_at_load(bundle, tmp_path, section, field, value, said):
    # manifest.json has no sha256: an edit passed every check and failed the first forward pass in ONNX Runtime.
    b = _copy(bundle, tmp_path)
    m = json.loads((b / "manifest.json").read_text())
    if field == "io":
        key, name = value.split("=")
        m["onnx"]["io"][key] = name
    else:
        m[section][field] = value
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=said + ".*re-convert the bundle, or undo the edit to manifest.json"):
        Model.load(b)


def test_ort_options_parse_into_session_config_entries():
    from nomoat.runtime.onnx_session import parse_ort_options

    assert parse_ort_options("") == parse_ort_options("none") == {}
    assert parse_ort_options("mlas.disable_kleidiai=1, session.intra_op.allow_spinning=0") == {
        "mlas.disable_kleidiai": "1", "session.intra_op.allow_spinning": "0"}
    with pytest.raises(ValueError, match="'mlas.disable_kleidiai' is not KEY=VALUE"):
        parse_ort_options("mlas.disable_kleidiai")
    with pytest.raises(ValueError, match="not KEY=VALUE"):
        parse_ort_options("mlas.disable_kleidiai=")
    with pytest.raises(ValueError, match="'disable_kleidiai' is not an ONNX Runtime session config key"):
        parse_ort_options("disable_kleidiai=1")
    with pytest.raises(ValueError, match="given twice"):
        parse_ort_options("mlas.use_lut_gemm=1,mlas.use_lut_gemm=0")


def test_ort_options_reach_the_session_and_override_nomoats_own(bundle):
    model = Model.load(bundle, ort_options={"mlas.disable_kleidiai": "1", "session.intra_op.allow_spinning": "0"})
    so = model.session.session.get_session_options()
    assert so.get_session_config_entry("mlas.disable_kleidiai") == "1"
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert Model.load(bundle).session.session.get_session_options().get_session_config_entry(
        "session.intra_op.allow_spinning") == "1"


def test_cli_names_a_bad_ort_option(bundle):
    result = subprocess.run([sys.executable, "-m", "nomoat", "generate", str(bundle), "--prompt", "hi",
                             "--ort-options", "kleidiai=off"], capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == ""
    assert "--ort-options: 'kleidiai' is not an ONNX Runtime session config key" in result.stderr


@pytest.mark.parametrize("option", [
    "session.qdq_matmulnbits_accuracy_level=banana",  # ONNX Runtime raises its own Fail
    "session.intra_op_thread_affinities=abc",  # a failed ORT_ENFORCE: a plain RuntimeError
])
def test_a_value_onnx_runtime_refuses_is_a_one_line_error(bundle, option):
    """The key has the right shape (nomoat's check), the value is not one ONNX Runtime takes."""
    for verb in (["generate", str(bundle), "--prompt", "hi"], ["chat", str(bundle)]):
        result = _nomoat(*verb, "--ort-options", option, stdin="hi\n")
        assert (result.returncode, result.stdout) == (2, ""), result.stderr
        assert "Traceback" not in result.stderr
        assert "[E:onnxruntime" not in result.stderr  # ONNX Runtime's own log line of the same error
        last = result.stderr.splitlines()[-1]
        assert last.startswith(f"nomoat {verb[0]}: error: ONNX Runtime refused --ort-options {option}: "), \
            result.stderr


def test_a_value_onnx_runtime_refuses_is_one_line_in_serve_and_bench_and_an_error_of_its_own(bundle):
    """The same refusal through pi_demo serve, nomoat bench (its worker) and the SDK."""
    from nomoat.runtime import Model, OrtOptionsError

    option = "session.intra_op_thread_affinities=abc"
    repo = Path(__file__).resolve().parents[1]
    path = os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))  # pi_demo from the checkout
    serve = subprocess.run([sys.executable, "-m", "pi_demo", "serve", str(bundle), "--port", "0", "--ort-options",
                            option], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": path})
    assert (serve.returncode, serve.stdout) == (1, ""), serve.stderr
    assert "Traceback" not in serve.stderr
    assert serve.stderr.splitlines()[-1].startswith(
        f"pi_demo serve: error: ONNX Runtime refused --ort-options {option}: "), serve.stderr
    bench = _nomoat("bench", str(bundle), "--prompt-tokens", "8", "--new-tokens", "2", "--rounds", "1",
                    "--no-ceiling", "--ort-options", option)
    assert (bench.returncode, bench.stdout) == (1, ""), bench.stderr
    assert "Traceback" not in bench.stderr
    assert f"ONNX Runtime refused the session options {option}: " in bench.stderr
    with pytest.raises(OrtOptionsError) as refused:
        Model.load(bundle, ort_options={"session.intra_op_thread_affinities": "abc"})
    assert refused.value.options == option and "Processor id must consist of only digits" in refused.value.reason


def test_a_runtime_error_outside_onnx_runtime_is_not_taken_for_its_refusal():
    from nomoat.runtime.onnx_session import is_onnxruntime_error

    try:
        raise RuntimeError("ours")
    except RuntimeError as e:
        assert not is_onnxruntime_error(e)


def test_raw_with_a_system_message_is_refused(bundle):
    """--raw skips the chat template, which is where the system message goes: it would be dropped silently."""
    result = _nomoat("generate", str(bundle), "--prompt", "hi", "--raw", "--system", "Answer in French.")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == ("nomoat generate: error: --system needs the chat template, which --raw skips; drop one "
                             "of them (with --raw, write the instructions into the prompt itself)\n")


NO_SYSTEM_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                      "{{ raise_exception('System role not supported') }}{% endif %}"
                      "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
                      "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def _with_template(bundle: Path, tmp_path: Path, template: str) -> Path:
    """A copy of the bundle with another chat template (and its sha256 in the manifest)."""
    from nomoat.runtime.manifest import sha256_file

    b = _copy(bundle, tmp_path)
    (b / "chat_template.jinja").write_text(template)
    m = json.loads((b / "manifest.json").read_text())
    m["files"]["chat_template.jinja"] = sha256_file(b / "chat_template.jinja")
    (b / "manifest.json").write_text(json.dumps(m))
    return b


def test_generate_into_a_pipe_whose_reader_left_ends_quietly(bundle):
    """`nomoat generate ... | head -c 10`: the streamed tokens meet a closed pipe."""
    from test_cli import reader_gone

    status, stderr = reader_gone("generate", str(bundle), "--prompt", "hi", "--max-new-tokens", "32")
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
    assert status == 141, (status, stderr)


def _nomoat(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "nomoat", *args], input=stdin.encode(), capture_output=True,
                            timeout=300, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    # decoded by hand: text=True would turn a "\r" the tiny model writes into "\n"
    result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode()
    return result


def test_a_template_that_refuses_the_prompt_is_a_one_line_error_and_the_chat_goes_on(bundle, tmp_path):
    b = _with_template(bundle, tmp_path, NO_SYSTEM_TEMPLATE)
    result = _nomoat("generate", str(b), "--prompt", "hi", "--system", "Be brief.")
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == ("nomoat generate: error: the chat template failed: System role not supported (this "
                             "model's template may not accept a system message: leave out --system)\n")

    result = _nomoat("chat", str(b), "--system", "Be brief.", "--temperature", "0", "--max-new-tokens", "8",
                     stdin="hi\nhello\n/system\nhi\n")
    assert result.returncode == 0, result.stderr
    refusal = ("[the chat template failed: System role not supported (this model's template may not accept a "
               "system message: /system alone drops it)]\n")
    assert result.stderr == refusal * 2 + "[system message removed; conversation reset]\n"
    assert result.stdout == Model.load(b).chat().send("hi", 8, temperature=0).text + "\n"  # the one answer


def test_an_answer_the_full_context_cut_off_is_said_at_once_and_stats_survive_a_refused_message(bundle):
    """The answer stopped mid-sentence with no word why until the next message was refused, and /stats
    then showed zeros (the refused request's stats)."""
    message = "word " * 12  # most of the 96-token context (~80 tokens in the template), so the answer fills the rest
    reply = Model.load(bundle).chat().send(message, 200, temperature=0)
    assert reply.finish_reason == "length" and reply.stats.context_full and reply.stats.generated_tokens < 200
    result = _nomoat("chat", str(bundle), "--temperature", "0", "--max-new-tokens", "200",
                     stdin=f"{message}\n/stats\nmore\n/stats\n")
    assert result.returncode == 0, result.stderr
    full, stats, refused, stats_again = [line for line in result.stderr.splitlines() if line]
    assert full == ("[the conversation filled the bundle's context of 96 tokens, which cut this answer off: no next "
                    "message fits. Type /reset to start over.]")
    assert refused.startswith("[the prompt has ") and stats_again == stats
    assert not stats.startswith("[0 new prompt tokens"), stats

    result = _nomoat("generate", str(bundle), "--prompt", message, "--temperature", "0", "--max-new-tokens", "200")
    assert result.returncode == 0 and result.stderr == (
        "[the prompt and the answer filled the bundle's context of 96 tokens, which cut the answer off]\n")
    result = _nomoat("generate", str(bundle), "--prompt", message, "--temperature", "0", "--max-new-tokens", "3")
    assert result.returncode == 0 and result.stderr == ""  # max_new_tokens, not the context


def test_the_penalty_window_comes_from_the_bundle_or_the_caller(bundle, monkeypatch):
    import nomoat.runtime.model as model_module

    model = Model.load(bundle)
    windows: list[tuple[int, list[int]]] = []

    class Recording(model_module.Sampler):
        def sample(self, logits, previous_ids=(), prompt_length=0):
            windows.append((self.params.repeat_last_n, list(previous_ids)))
            return super().sample(logits, previous_ids, prompt_length)

    monkeypatch.setattr(model_module, "Sampler", Recording)
    monkeypatch.setitem(model.manifest.generation_defaults, "repeat_last_n", 7)
    assert model.sampling_params().repeat_last_n == 7  # a GGUF's general.sampling.penalty_last_n
    model.generate("hi", 3, repetition_penalty=1.3, repeat_last_n=2)
    assert [n for n, _ in windows] == [2] * len(windows) and windows
    assert len(windows[-1][1]) > 2  # the whole history goes in; the sampler takes its window


@pytest.mark.parametrize(("flag", "value", "why"), [
    ("--temperature", "-1", "temperature must be >= 0"), ("--top-p", "-0.5", "top_p must be in [0, 1]"),
    ("--top-k", "-2", "top_k must be >= 0"), ("--min-p", "1.5", "min_p must be in [0, 1]"),
    ("--repetition-penalty", "0", "repetition_penalty must be > 0"), ("--seed", "-3", "seed must be a non-negative"),
    ("--repeat-last-n", "-2", "repeat_last_n must be >= -1"),
    ("--temperature", "nan", "temperature must be a finite number"), ("--top-k", "1.5", "'1.5' is not an integer"),
    ("--max-new-tokens", "0", "'0' is not a number of tokens: give 1 or more"),
    ("--threads", "0", "'0' is not a number of threads: give 1 or more"),
    ("--threads", "-3", "'-3' is not a number of threads: give 1 or more"),
])
def test_a_bad_sampling_flag_is_a_usage_error_that_names_it(bundle, flag, value, why):
    for verb in (["chat", str(bundle)], ["generate", str(bundle), "--prompt", "hi"]):
        result = _nomoat(*verb, flag, value, stdin="hi\n")
        assert (result.returncode, result.stdout) == (2, ""), result.stderr
        assert f"error: argument {flag}: {why}" in result.stderr.splitlines()[-1], result.stderr
        assert "Traceback" not in result.stderr


def test_greedy_is_deterministic_and_sampling_follows_the_seed(bundle):
    model = Model.load(bundle)
    a = model.generate("hello there", 12, temperature=0)
    b = model.generate("hello there", 12, temperature=0)
    assert a.token_ids == b.token_ids and len(a.token_ids) > 0
    s1 = model.generate("hello there", 12, temperature=1.0, seed=7)
    s2 = model.generate("hello there", 12, temperature=1.0, seed=7)
    s3 = model.generate("hello there", 12, temperature=1.0, seed=8)
    assert s1.token_ids == s2.token_ids
    assert s1.token_ids != s3.token_ids


def test_stream_concatenates_to_the_decoded_completion(bundle):
    model = Model.load(bundle)
    events = list(model.stream("tell me a story", 20, temperature=0))
    assert events[-1].finish_reason in ("stop", "length")
    ids = [e.token_id for e in events if e.token_id is not None]
    text = "".join(e.text for e in events)
    assert text == model.tokenizer.decode(ids, skip_special_tokens=True)


def test_stop_string_cuts_the_output(bundle):
    model = Model.load(bundle)
    full = model.generate("tell me a story", 30, temperature=0, raw=True)
    text = full.text
    assert len(text) > 6, "the tiny model should produce some text"
    stop = text[len(text) // 2: len(text) // 2 + 3]
    cut = model.generate("tell me a story", 30, temperature=0, raw=True, stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.text == text[: text.index(stop)]


def test_generate_with_cache_prompt_false_computes_the_prompt_from_an_empty_cache(bundle):
    model = Model.load(bundle)
    first = model.generate("tell me a story", 6, temperature=0)
    model.generate("tell me a story about a cat", 4, temperature=0)
    assert model.last_stats.cached_tokens > 0  # the default: the shared prefix came from the cache
    again = model.generate("tell me a story", 6, temperature=0, cache_prompt=False)
    assert model.last_stats.cached_tokens == 0
    assert model.last_stats.prefill_tokens == model.last_stats.prompt_tokens
    assert again.token_ids == first.token_ids


def test_a_stream_read_to_its_finish_reason_and_kept_leaves_the_model_free(bundle):
    """The README: a caller may stop reading at the finish_reason. The stream, kept (a notebook's variable),
    held the model's lock: the next request on the thread was refused, one on another thread waited for ever."""
    import threading

    model = Model.load(bundle)
    answer = model.chat().send("hi", 8, temperature=0)
    assert answer.finish_reason == "length" and len(answer.text) > 6
    for stop, reason in (((), "length"), ([answer.text[3:6]], "stop")):  # the answer's end, a stop string
        chat = model.chat()
        stream = chat.stream("hi", 8, temperature=0, stop=stop)
        events = []
        for event in stream:
            events.append(event)
            if event.finish_reason is not None:
                break
        assert events[-1].finish_reason == reason and len(chat.messages) == 2  # the turn was kept
        assert model.generate("hello", 2, temperature=0).token_ids  # the same thread, the stream still open
        other = threading.Thread(target=model.generate, args=("hello", 2), kwargs={"temperature": 0})
        other.start()
        other.join(30)
        assert not other.is_alive()
        assert list(stream) == []  # nothing after the finish_reason


def test_close_frees_the_session_and_a_closed_model_says_so(bundle):
    """No close() existed, and del left the freed heap to the process: load-and-del cycles grew it."""
    import gc
    import weakref

    import nomoat.runtime.model as model_module
    from nomoat.runtime import NomoatError, StructuredOutputUnavailable

    trims = []
    with Model.load(bundle) as model:
        ort_session = weakref.ref(model.session.session)
        assert model.generate("hi", 2, temperature=0).token_ids
        real_trim = model_module.trim_heap
        model_module.trim_heap = lambda: trims.append(1) or real_trim()
    try:
        gc.collect()
        assert ort_session() is None and trims == [1]  # freed, and the heap trimmed after it
        with pytest.raises(RuntimeError, match=r"this Model was closed .*Model.load the bundle again"):
            model.generate("hi", 2)
        model.close()  # twice is fine
    finally:
        model_module.trim_heap = real_trim
    # One except for every error the runtime raises for a caller's problem; a prompt too long is a ValueError too.
    assert all(issubclass(e, NomoatError) for e in (BundleError, ContextOverflowError, StructuredOutputUnavailable))
    assert issubclass(ContextOverflowError, ValueError)


def test_chat_prefills_only_the_new_turn(bundle):
    model = Model.load(bundle)
    chat = model.chat(system="be brief")
    # Greedy: the tiny model's defaults sample (temperature 0.7, fresh entropy), and a sampled
    # special token inside an answer is left out of the message text, so the next turn is
    # rendered whole and reuses the cache only up to there (the documented fallback; a CI run
    # drew <|im_start|> once). This test is about the common case.
    first = chat.send("hi", 8, temperature=0)
    assert not set(first.token_ids) & {model.tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    turn1_prompt = model.last_stats.prompt_tokens
    assert model.last_stats.cached_tokens == 0
    seen_after_turn1 = chat._text
    chat.send("and then?", 8, temperature=0)
    s = model.last_stats
    # Turn one (prompt + answer, minus a last answer token that was never fed back) came
    # from the cache; only the text the template added for turn two ran.
    assert s.cached_tokens >= turn1_prompt + len(first.token_ids) - 1
    assert s.prefill_tokens == s.prompt_tokens - s.cached_tokens
    new_text = model.render(chat.messages[:-1])[len(seen_after_turn1):]
    assert "and then?" in new_text and "hi" not in new_text
    assert s.prefill_tokens <= len(model.encode(new_text, add_bos=False)) + 1


def test_chat_turns_see_the_whole_conversation(bundle):
    model = Model.load(bundle)
    chat = model.chat()
    chat.send("hi", 6, temperature=0)
    second = chat.send("more", 6, temperature=0)
    # The same conversation from an empty cache gives the same greedy answer.
    model.session.reset()
    ids = chat._ids[: len(chat._ids) - len(second.token_ids)]
    fresh = list(model.generate_tokens(ids, 6))
    assert fresh == second.token_ids


LLAMA2_STYLE_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}"
                         "{{ '<s>[INST] ' + m['content'] + ' [/INST]' }}"
                         "{% else %}{{ m['content'] + ' </s>' }}{% endif %}{% endfor %}")


def _prepending_tokenizer(vocab_size: int, eos_id: int):
    """A legacy SentencePiece-style tokenizer.json: a Prepend("▁") normalizer, one character a token
    (so any answer re-encodes to its own ids), as many tokens as the model has rows."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    chars = ["▁", *(chr(c) for c in range(33, 127))]
    chars += [chr(0x4E00 + i) for i in range(vocab_size - 2 - len(chars))]  # filler: one character each
    pieces = chars[:eos_id] + ["</s>"] + chars[eos_id:]
    pieces.insert(eos_id + 1, "<s>")
    tok = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[]))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Replace("▁", " ")
    tok.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    assert tok.get_vocab_size() == vocab_size and tok.token_to_id("</s>") == eos_id
    return tok


def test_a_chat_turn_with_a_prepending_tokenizer_is_the_whole_rendering_encoded(bundle):
    """Encoded alone, a Llama-2-chat suffix " </s><s>[INST] ..." gains a "▁" that the whole
    rendering does not have: each later turn would differ from a fresh render."""
    from nomoat.runtime.chat_template import ChatTemplate
    from nomoat.runtime.model import prepends_space

    base = Model.load(bundle)
    assert not prepends_space(base.tokenizer)  # the byte-level tiny tokenizer encodes suffixes alone, as before
    (eos_id,) = base.stop_token_ids
    tokenizer = _prepending_tokenizer(base.manifest.model.vocab_size, eos_id)
    model = Model(bundle, base.manifest, base.session, tokenizer, template=ChatTemplate(LLAMA2_STYLE_TEMPLATE))
    assert prepends_space(tokenizer)
    chat = model.chat()
    first = chat.send("hi", 6, temperature=0, stop=["<s>"])  # an answer without special tokens
    first_prompt = len(chat._ids) - len(first.token_ids)
    second = chat.send("more", 6, temperature=0, stop=["<s>"])
    prompt = chat._ids[:len(chat._ids) - len(second.token_ids)]
    rendered = model.render(chat.messages[:-1])
    assert rendered.startswith(model.render(chat.messages[:1]) + first.text)  # the suffix path's premise
    assert prompt == model.encode(rendered)
    # The cache still holds turn one: only what follows it (and an answer's unfed last token) runs.
    assert chat.stats.cached_tokens >= first_prompt + len(first.token_ids) - 1


def test_prompt_over_the_context_is_a_clear_error(bundle):
    model = Model.load(bundle)
    with pytest.raises(ContextOverflowError, match="context holds 96"):
        model.generate("word " * 400, 4)


def test_generation_stops_at_the_context_limit(bundle):
    model = Model.load(bundle)
    ids = model.encode("word " * 40)[:90]
    out = list(model.generate_tokens(ids, 50, ignore_eos=True))
    assert len(out) == 96 - 90 + 1  # the last token is sampled from the full cache, not fed back


def test_an_answer_cut_off_by_the_context_ends_with_length_and_one_at_a_stop_token_with_stop(bundle):
    model = Model.load(bundle)
    ids = model.encode("word " * 40)[:90]
    first = next(model.generate_tokens(ids, 1, ignore_eos=True))
    for lookup in (0, 4):
        # The tiny model never says its stop token on this prompt (greedy): the context ends the answer.
        events = list(model.stream_ids(ids, 50, stop=(), prompt_lookup=lookup))
        assert events[-1].finish_reason == "length" and model.session.length == 96, lookup
        assert not events[-1].stats.stop_token
        assert len([e for e in events if e.token_id is not None]) == 96 - 90 + 1
        # A stop token ends it with "stop": here the first token the model picks, made a stop token.
        stats = GenerationStats()
        tokens = (model.generate_tokens_lookahead(ids, 50, 4, stats=stats, extra_stop_ids=frozenset({first}))
                  if lookup else model.generate_tokens(ids, 50, stats=stats, extra_stop_ids=frozenset({first})))
        assert list(tokens) == [] and stats.stop_token, lookup
    assert model.generate("word " * 10, 3, temperature=0, raw=True).finish_reason == "length"


def test_max_new_tokens_below_one_is_refused(bundle):
    model = Model.load(bundle)
    for n in (0, -5):
        with pytest.raises(ValueError, match=f"max_new_tokens must be at least 1, got {n}"):
            model.generate("hi", n)
        with pytest.raises(ValueError, match="at least 1"):
            next(model.generate_tokens([1, 2], n))
        with pytest.raises(ValueError, match="at least 1"):
            next(model.generate_tokens_lookahead([1, 2], n))


def test_a_stop_string_that_is_a_special_token_is_matched_as_a_token(bundle):
    # The detokenizer leaves special tokens out of the text, where a stop string could never see them.
    model = Model.load(bundle)
    ids = {t: model.tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    assert model._special_token_ids(["<|im_start|>", "<|endoftext|>", "hello", "<|im_start|>x"]) == {
        ids["<|im_start|>"], ids["<|endoftext|>"]}
    # Sampled answers of the tiny model say special tokens now and then (about one seed in five, the
    # first at seed 0 here): find one that does.
    for seed in range(200):
        full = model.generate("tell me a story", 40, raw=True, temperature=1.5, seed=seed, stop=[])
        said = [t for t in SPECIAL_TOKENS if ids[t] in full.token_ids and ids[t] not in model.stop_token_ids]
        if said:
            break
    else:
        pytest.fail("no sampled answer of 200 said a special token: the test needs another prompt or temperature")
    cut = model.generate("tell me a story", 40, raw=True, temperature=1.5, seed=seed, stop=[said[0]])
    assert cut.finish_reason == "stop"
    assert cut.token_ids == full.token_ids[:full.token_ids.index(ids[said[0]])]


def test_a_second_request_from_a_thread_with_an_open_stream_is_refused_not_a_deadlock(bundle):
    import signal

    def waited(signum, frame):
        raise TimeoutError("the second request waited for the lock its own thread holds")

    model = Model.load(bundle)
    stream = model.stream("hi", 8, temperature=0)
    next(stream)
    previous = signal.signal(signal.SIGALRM, waited)  # a deadlock fails the test instead of hanging it
    signal.alarm(20)
    try:
        with pytest.raises(RuntimeError, match=r"still open: read it to the end or close\(\) it .*"
                                               "another thread has read from since is waited for"):
            model.generate("hello", 4, temperature=0)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    stream.close()
    assert model.generate("hello", 4, temperature=0).token_ids  # the lock was let go


def test_a_stream_resumed_on_another_thread_is_waited_for_not_refused(bundle):
    """A thread pool (Starlette iterating a sync generator) resumes each next() on whichever worker is
    free: the stream's owner is the thread that last ran it, so a request on the thread that started
    it waits for the stream to finish on the other one."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    model = Model.load(bundle)
    expected_a = model.generate("hi", 8, temperature=0).token_ids
    expected_b = model.generate("hello", 4, temperature=0).token_ids
    assert len(expected_a) >= 3  # the premise: the first stream is suspended between tokens
    with ThreadPoolExecutor(1) as pool1, ThreadPoolExecutor(1) as pool2:
        stream = model.stream("hi", 8, temperature=0)
        events = [pool1.submit(next, stream).result(timeout=60)]  # started on pool 1's thread
        events.append(pool2.submit(next, stream).result(timeout=60))  # resumed on pool 2's
        second = pool1.submit(model.generate, "hello", 4, temperature=0)  # pool 1's thread again
        time.sleep(0.3)
        assert not second.done(), second.exception()  # it waits for the lock, not refused
        events += pool2.submit(list, stream).result(timeout=60)
        completion = second.result(timeout=60)
    assert [e.token_id for e in events if e.token_id is not None] == expected_a
    assert completion.token_ids == expected_b


def test_each_completion_keeps_its_own_stats(bundle):
    model = Model.load(bundle)
    events = list(model.stream("hi", 5, temperature=0))
    stats = events[-1].stats
    assert stats.generated_tokens == len([e for e in events if e.token_id is not None])
    model.generate("a much longer prompt than the first one", 2, temperature=0)
    assert model.last_stats is not stats and stats.generated_tokens == len(events) - 1


def test_a_chat_keeps_a_whole_turn_when_the_caller_stops_at_its_end(bundle):
    model = Model.load(bundle)
    chat = model.chat()
    for event in chat.stream("hi", 5, temperature=0):
        if event.finish_reason:
            break
    assert [m["role"] for m in chat.messages] == ["user", "assistant"]
    stream = chat.stream("again", 5, temperature=0)
    next(stream)
    stream.close()  # before its end: the half turn is not kept
    assert [m["role"] for m in chat.messages] == ["user", "assistant"]


def test_a_chat_turn_cut_by_a_stop_string_is_not_fed_back_with_the_cut_text(bundle):
    """A stop string the template's next text begins with ("<" before "<|im_end|>"): the model's
    tokens held it, the history does not. The next prompt must end the turn with the special
    <|im_end|>, not with "<" followed by "|im_end|>" spelled out as plain text."""
    pytest.importorskip("llguidance")
    from nomoat.runtime import Grammar

    model = Model.load(bundle)
    im_end = model.tokenizer.token_to_id("<|im_end|>")
    chat = model.chat()
    first = chat.send("hi", 6, temperature=0, stop="<", grammar=Grammar.regex("<[a-z]{1,4}"))
    assert first.finish_reason == "stop" and first.text == ""
    second = chat.send("more", 4, temperature=0)
    prompt = chat._ids[:len(chat._ids) - len(second.token_ids)]
    rendered = model.render(chat.messages[:-1])
    assert prompt.count(im_end) == rendered.count("<|im_end|>")
    assert model.tokenizer.decode(prompt, skip_special_tokens=False) == rendered


def test_a_chat_stream_closed_after_a_reset_leaves_the_new_conversation_alone(bundle):
    model = Model.load(bundle)
    for system in ("be brief", None):
        chat = model.chat(system="old")
        stream = chat.stream("fox", 5, temperature=0)
        next(stream)
        chat.reset(system=system)  # a "new chat" button while the answer streams
        stream.close()
        assert chat.messages == ([{"role": "system", "content": system}] if system else [])
        finished = chat.stream("dog", 3, temperature=0)
        next(finished)
        chat.reset()
        list(finished)  # an answer that ends after the reset is not written into the new conversation
        assert chat.messages == []


def test_logits_for_all_positions_match_last_position(bundle):
    model = Model.load(bundle)
    ids = model.encode("the quick brown fox")
    all_logits = model.logits(ids)
    model.session.reset()
    np.testing.assert_allclose(model.session.forward(ids), all_logits[-1], atol=1e-5)


def test_decode_steps_between_prefill_and_all_logits_passes_read_their_own_inputs(bundle):
    # Decode steps keep their inputs bound across tokens; prefill and all-logits passes bind
    # others. Every mix of the three must give the logits of one pass over the same tokens.
    model = Model.load(bundle)
    session = model.session
    ids = (model.encode("the quick brown fox jumps over the lazy dog") * 2)[:12]
    reference = session.forward(ids, all_logits=True)
    session.reset()
    # Last-position logits live in one reused buffer: copied before the next pass.
    got = {2: session.forward(ids[:3]).copy()}  # prefill, last position
    got[3] = session.forward([ids[3]]).copy()  # decode
    got[4] = session.forward([ids[4]]).copy()  # decode, inputs already bound
    for offset, row in enumerate(session.forward(ids[5:8], all_logits=True)):
        got[5 + offset] = row
    got[8] = session.forward([ids[8]]).copy()  # decode again after an all-logits pass
    got[10] = session.forward(ids[9:11]).copy()  # a prefill chunk after a decode step
    got[11] = session.forward([ids[11]]).copy()
    for position, logits in got.items():
        np.testing.assert_allclose(logits, reference[position], atol=1e-5, err_msg=f"position {position}")


def test_prompt_lookup_decoding_gives_the_greedy_tokens_with_fewer_passes(bundle):
    model = Model.load(bundle)
    # A prompt that repeats itself, so drafts exist and some are accepted.
    ids = model.encode("one two three four five six " * 4)[:60]
    plain = list(model.generate_tokens(ids, 30, ignore_eos=True))
    stats = GenerationStats()
    fast = list(model.generate_tokens_lookahead(ids, 30, draft_tokens=4, ignore_eos=True, stats=stats))
    assert fast == plain
    assert stats.drafted_tokens > 0
    # Rejected drafts were rewound: the cache holds only real tokens of this sequence.
    cached = model.session.tokens
    assert cached == (ids + fast)[: len(cached)] and len(cached) >= len(ids) + len(fast) - 1


def test_prompt_lookup_counts_only_the_accepted_drafts_that_reach_the_answer(bundle, monkeypatch):
    """A pass can confirm drafts past where a stop string (or token) ends the answer; those were counted
    ("3 tokens, 7/8 drafted tokens accepted"). Each decode pass but the last adds one token of its own,
    and the prefill one: accepted drafts + passes <= tokens, with equality when an answer ends mid-draft."""
    model = Model.load(bundle)
    ids = model.encode("one two three four five six " * 4)[:60]  # the tiny model repeats two tokens here
    full = list(model.generate_tokens_lookahead(ids, 30, draft_tokens=4, ignore_eos=True))
    forward, calls = model.session.forward, []
    monkeypatch.setattr(model.session, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    counts = []
    for end in range(5, 16):  # stop strings that end the answer at each token from the 5th on
        calls.clear()
        events = list(model.stream_ids(ids, 30, stop=[model.tokenizer.decode(full[4:end])], prompt_lookup=4,
                                       cache_prompt=False))
        stats, passes = events[-1].stats, len(calls) - 1  # the prompt fits one prefill chunk
        assert stats.generated_tokens == end and events[-1].finish_reason == "stop"
        counts.append((end, stats.accepted_tokens, passes))
    assert any(accepted for _, accepted, _ in counts), counts  # drafts were accepted at all
    assert [c for c in counts if c[1] + c[2] > c[0]] == [], counts


def test_prompt_lookup_fills_the_context_as_plain_decoding_does(bundle):
    model = Model.load(bundle)
    ids = model.encode("one two three four five six " * 8)[:model.max_context - 6]
    plain = list(model.generate_tokens(ids, 30, ignore_eos=True))
    fast = list(model.generate_tokens_lookahead(ids, 30, draft_tokens=4, ignore_eos=True))
    # The last token plain decoding makes needs the cache's last position: lookup makes it too.
    assert len(plain) == model.max_context - len(ids) + 1
    assert fast == plain


def test_a_chat_with_prompt_lookup_gives_the_same_turns_and_drafts_from_the_whole_conversation(bundle):
    model = Model.load(bundle)
    turns = ["one two three one two three", "one two"]  # the tiny bundle's context is 96 tokens

    def converse(lookup: int) -> list[tuple[list[int], GenerationStats]]:
        chat = model.chat(system="Repeat.")
        return [(chat.send(text, 12, temperature=0, prompt_lookup=lookup).token_ids, chat.stats) for text in turns]

    plain, drafted = converse(0), converse(4)
    assert [ids for ids, _ in drafted] == [ids for ids, _ in plain]
    assert all(stats.drafted_tokens == 0 for _, stats in plain)
    assert all(stats.drafted_tokens > 0 for _, stats in drafted)
    # The second turn still prefills only its new message: the rewound drafts left the cache exact
    # (it may hold one token more than plain decoding's, which never feeds its last token).
    assert drafted[1][1].cached_tokens >= plain[1][1].cached_tokens > len(model.encode(turns[0]))
    first_prompt = model.prompt_ids(turns[0], system="Repeat.")
    assert model.session.tokens[:len(first_prompt)] == first_prompt


def test_prompt_lookup_is_a_count_of_drafted_tokens_on_the_command_line(bundle, capsys):
    from nomoat.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["generate", str(bundle), "--prompt", "hi", "--prompt-lookup", "-1"])
    assert e.value.code == 2
    assert "'-1' is not a number of drafted tokens: give 0 (off) or more" in capsys.readouterr().err


@pytest.mark.parametrize("verb", ["generate", "chat"])
def test_prompt_lookup_with_sampling_is_refused_on_the_command_line(bundle, verb, capsys, monkeypatch):
    """Drafts are checked by argmax: a sampled answer (the tiny bundle's default temperature is 0.7)
    would draft nothing, without a word."""
    import io

    from nomoat.__main__ import main

    monkeypatch.setattr(sys, "stdin", io.StringIO("one two one two\n"))
    prompt = ["--prompt", "one two one two"] if verb == "generate" else []
    args = [verb, str(bundle), "--max-new-tokens", "4", *prompt]
    assert main([*args, "--prompt-lookup", "4"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == (f"nomoat {verb}: error: --prompt-lookup drafts only when decoding is greedy, and the "
                                 "bundle's default temperature is 0.7: add --temperature 0 (or drop --prompt-lookup)\n")
    assert main([*args, "--prompt-lookup", "4", "--temperature", "0.5"]) == 2
    assert "and --temperature is 0.5: add --temperature 0" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", io.StringIO("one two one two\n"))
    assert main([*args, "--prompt-lookup", "4", "--temperature", "0"]) == 0
    assert "error" not in capsys.readouterr().err


def test_prompt_lookup_with_sampling_is_a_value_error_in_the_sdk_and_runs_plain_in_stream_ids(bundle):
    model = Model.load(bundle)
    message = (r"prompt_lookup drafts only when decoding is greedy, and temperature is 0.7 \(the bundle's default\): "
               "pass temperature=0")
    with pytest.raises(ValueError, match=message):
        model.generate("one two one two", 4, prompt_lookup=4)  # the bundle's default temperature
    with pytest.raises(ValueError, match="temperature is 0.5: pass"):  # given, so not called the bundle's
        model.chat().send("one two one two", 4, prompt_lookup=4, temperature=0.5)
    with pytest.raises(ValueError, match="temperature is 0.7: pass"):
        model.generate("one two one two", 4, prompt_lookup=4, temperature=0.7)
    assert model.generate("one two one two", 4, prompt_lookup=4, temperature=0).token_ids
    # The server applies its --prompt-lookup to every request: stream_ids runs a sampled one plain.
    ids = model.encode("one two one two " * 4)
    sampled = model.sampling_params(seed=1)
    events = list(model.stream_ids(ids, 8, params=sampled, prompt_lookup=4))
    assert events[-1].stats.drafted_tokens == 0
    assert [e.token_id for e in events] == [e.token_id for e in model.stream_ids(ids, 8, params=sampled)]


@pytest.mark.parametrize("verb", ["generate", "chat"])
@pytest.mark.parametrize(("flags", "said"), [
    (["--repetition-penalty", "1.1"], "drafts only without penalties, and --repetition-penalty is 1.1: add "
                                      "--repetition-penalty 1 (or drop --prompt-lookup)"),
    (["--presence-penalty", "0.5"], "and --presence-penalty is 0.5: add --presence-penalty 0"),
    (["--json-schema", '{"type": "string"}'], "--prompt-lookup does not draft under a grammar"),
])
def test_prompt_lookup_with_a_penalty_or_a_grammar_is_refused_on_the_command_line(bundle, verb, flags, said, capsys,
                                                                                   monkeypatch):
    """A penalty changes the argmax drafts are checked against, a grammar takes a token at a time: either
    would draft nothing, without a word."""
    import io

    from nomoat.__main__ import main

    monkeypatch.setattr(sys, "stdin", io.StringIO("one two one two\n"))
    prompt = ["--prompt", "one two one two"] if verb == "generate" else []
    args = [verb, str(bundle), "--max-new-tokens", "4", "--temperature", "0", *prompt, *flags]
    if flags[0] == "--json-schema":
        pytest.importorskip("llguidance")
    assert main([*args, "--prompt-lookup", "4"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and said in err
    if flags[0] != "--json-schema":
        assert main([*args, "--repeat-last-n", "0", "--prompt-lookup", "4"]) == 0  # the penalty's window is off
        assert "error" not in capsys.readouterr().err


def test_prompt_lookup_with_a_penalty_logprobs_or_a_grammar_is_a_value_error_in_the_sdk(bundle):
    model = Model.load(bundle)
    greedy = {"temperature": 0, "prompt_lookup": 4}
    with pytest.raises(ValueError, match=r"penalties, and frequency_penalty is 0.3: pass frequency_penalty=0,"):
        model.generate("one two one two", 4, frequency_penalty=0.3, **greedy)
    with pytest.raises(ValueError, match="does not draft with logprobs .*pass logprobs=None, or prompt_lookup=0"):
        list(model.stream("one two one two", 4, logprobs=2, **greedy))
    with pytest.raises(ValueError, match="without penalties, and repetition_penalty is 1.2"):
        model.chat().send("one two one two", 4, repetition_penalty=1.2, **greedy)
    assert model.generate("one two one two", 4, repetition_penalty=1.2, repeat_last_n=0, **greedy).token_ids
    # stream_ids, as the server uses it, runs a penalized request plain
    ids = model.encode("one two one two " * 4)
    penalized = model.sampling_params(temperature=0, repetition_penalty=1.2)
    events = list(model.stream_ids(ids, 8, params=penalized, prompt_lookup=4))
    assert events[-1].stats.drafted_tokens == 0


def test_bench_engine_with_prompt_lookup_gives_the_plain_tokens_in_fewer_passes(bundle):
    from nomoat.runtime.bench import NomoatEngine

    def run(engine: NomoatEngine, ids: list[int]) -> tuple[list[int], int]:
        engine.prepare()
        session = engine.model.session
        passes = []
        forward = session.forward
        session.forward = lambda *a, **k: passes.append(1) or forward(*a, **k)
        engine.reset()
        return list(engine.run(ids, 30)), len(passes)

    plain = NomoatEngine(str(bundle))
    ids = Model.load(bundle).encode("one two three four five six " * 4)[:60]
    plain_tokens, plain_passes = run(plain, ids)
    lookup_tokens, lookup_passes = run(NomoatEngine(str(bundle), prompt_lookup=4), ids)
    assert lookup_tokens == plain_tokens and len(lookup_tokens) == 30
    assert lookup_passes < plain_passes
    with pytest.raises(ValueError, match="prompt_lookup must be >= 0"):
        NomoatEngine(str(bundle), prompt_lookup=-1)


def test_a_bench_round_with_prompt_lookup_says_how_many_drafts_were_kept(bundle):
    from nomoat.runtime.bench import NomoatEngine, RoundResult, measure_once

    ids = Model.load(bundle).encode("one two three four five six " * 4)[:60]
    engine = NomoatEngine(str(bundle), prompt_lookup=4)
    engine.prepare()
    stats = GenerationStats()
    engine.model.session.reset()
    list(engine.model.generate_tokens_lookahead(ids, 30, draft_tokens=4, ignore_eos=True, stats=stats))
    expected = stats.drafted_tokens, stats.accepted_tokens
    result = measure_once(engine, ids, 30)
    assert (result.drafted_tokens, result.accepted_tokens) == expected and expected[0] > 0
    assert RoundResult.from_dict(result.to_dict()) == result
    plain = NomoatEngine(str(bundle))
    plain.prepare()
    assert measure_once(plain, ids, 8).drafted_tokens is None  # plain decoding drafts nothing to count


def test_find_continuation_finds_the_latest_continuation_of_the_longest_match():
    from nomoat.runtime.lookup import accepted_prefix, find_continuation

    assert find_continuation([1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3], 2) == (3, [7, 5])
    assert find_continuation([1, 2, 3, 4], 3) == (0, [])
    assert find_continuation([5, 6, 5], 3) == (1, [6, 5])
    assert accepted_prefix([4, 5, 6], [4, 5, 9, 1]) == 2


def test_the_drafter_stops_drafting_where_drafts_fail_and_goes_on_where_they_pass():
    from nomoat.runtime.lookup import Drafter

    drafter = Drafter(8, cost=0.25)
    one_token_match = [5, 1, 2, 3, 4, 6, 7, 8, 9, 10, 5]  # only the last token occurred before
    assert drafter.propose(one_token_match, 8) == [1, 2, 3, 4, 6, 7, 8, 9]  # untried: in full
    lengths = [8]
    for _ in range(3):
        drafter.update(lengths[-1], 0)  # every draft rejected
        lengths.append(len(drafter.propose(one_token_match, 8)))
    # q = 1/2, 1/3, 1/4: the j-th draft while q**j >= 0.25, then none (plain steps)
    assert lengths == [8, 2, 1, 0]
    drafter.update(0, 0)  # a pass without drafts teaches nothing
    assert drafter.acceptance(1) == 0.25

    three_token_match = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3]  # judged on its own record
    assert drafter.propose(three_token_match, 8) == [4, 5, 6, 7, 8, 9, 1, 2]
    drafter.update(8, 8)
    assert drafter.propose(three_token_match, 3) == [4, 5, 6]  # the room left caps it
    drafter.update(3, 1)  # with the prior's one: 10 accepted, 1 rejected, q = 10/11, q**8 = 0.47 >= 0.25
    assert len(drafter.propose(three_token_match, 8)) == 8
    assert drafter.propose([1, 2, 3, 4], 8) == []  # nothing to copy
    with pytest.raises(ValueError, match="max_draft must be >= 1"):
        Drafter(0)
    assert Drafter(8, cost=0.0).propose([1, 2, 3, 9, 1, 2, 3], 8) == [9, 1, 2, 3]  # cost 0: as long as allowed
    assert Drafter(8).propose(three_token_match, 0) == []  # no room left: a plain step


@pytest.mark.parametrize("verb", ["generate", "chat", "bench", "convert", "deploy"])
def test_help_says_each_default_once(verb, capsys):
    import re

    from nomoat.__main__ import main

    with pytest.raises(SystemExit):
        main([verb, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: " in text  # argparse's own defaults are still shown ...
    assert re.search(r"\(default[^)]*\) \(default", text) is None, text  # ... but not after the help's own


def test_chat_with_stdin_closed_says_so_before_loading(tmp_path):
    """`nomoat chat B <&-` (a service, a script): one line naming the fix, not a traceback after the load."""
    import shlex

    cmd = f"exec {shlex.quote(sys.executable)} -m nomoat chat {shlex.quote(str(tmp_path / 'not-loaded'))} <&-"
    result = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == "", result.stderr
    assert result.stderr.startswith("nomoat chat: error: standard input is closed"), result.stderr
