"""What the runtime takes from its callers and its bundle: prompts that are not UTF-8, Ctrl-C,
stop strings, empty system messages, SDK argument types, and manifest.json's fields and files."""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from nomoat.runtime import BundleError, Model
from nomoat.runtime.manifest import read_manifest, sha256_file
from nomoat.runtime.stops import StopMatcher
from tiny_models import tiny_fp32_bundle

NOT_UTF8 = "caf\udce9 cr\udce8me"  # b"caf\xe9 cr\xe8me" (Latin-1) as Python holds it from argv or stdin


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return tiny_fp32_bundle(tmp_path_factory, max_context=96)


@pytest.fixture(scope="module")
def model(bundle) -> Model:
    return Model.load(bundle)


def _nomoat(*args: str | bytes, stdin: bytes = b"") -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "nomoat", *args], input=stdin, capture_output=True, timeout=300)
    result.stdout, result.stderr = (out.decode("utf-8", "replace") for out in (result.stdout, result.stderr))
    return result


# -- 1. a prompt that is not UTF-8 ------------------------------------------------------------


def test_text_that_is_not_utf8_is_a_value_error_naming_the_byte_and_the_fix(model):
    with pytest.raises(ValueError, match=r"the prompt is not valid UTF-8 text: byte 0xe9 at character 4; "
                                         r"convert it to UTF-8, e.g. iconv"):
        model.encode(NOT_UTF8)
    with pytest.raises(ValueError, match=r"the prompt is not valid UTF-8 text: byte 0xe9 at character 4;"):
        model.generate(NOT_UTF8, 3)  # the position is in the caller's text, not in the rendered template
    with pytest.raises(ValueError, match=r"the system message is not valid UTF-8 text: a lone surrogate U\+D800 "
                                         r"at character 3;"):
        model.render("hi", system="ab\ud800")
    with pytest.raises(ValueError, match=r"messages\[1\]\['content'\] is not valid UTF-8 text"):
        model.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": NOT_UTF8}])


def test_a_chat_message_that_is_not_utf8_is_refused_and_leaves_no_turn(model):
    chat = model.chat()
    with pytest.raises(ValueError, match="the message is not valid UTF-8 text: byte 0xe9 at character 4"):
        chat.send(NOT_UTF8, 3)
    assert chat.messages == []
    assert chat.send("hi", 3, temperature=0).token_ids  # the chat goes on


def test_generate_refuses_a_latin1_prompt_in_one_line_before_loading(tmp_path):
    # No bundle needed: the prompt is checked before the load (minutes on a Pi).
    missing = str(tmp_path / "no-bundle")
    for args, stdin in [(("--prompt", "-"), b"Translate: caf\xe9 cr\xe8me\n"), (("--prompt", b"caf\xe9"), b"")]:
        result = _nomoat("generate", missing, *args, stdin=stdin)
        assert result.returncode == 1, result.stderr
        assert result.stderr.startswith("nomoat generate: error: the prompt is not valid UTF-8 text: byte 0xe9 at "
                                        "character "), result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_chat_refuses_a_latin1_message_and_goes_on(bundle):
    result = _nomoat("chat", str(bundle), "--temperature", "0", "--max-new-tokens", "4",
                     stdin=b"caf\xe9\nhi\n")
    assert result.returncode == 0, result.stderr
    assert "[the message is not valid UTF-8 text: byte 0xe9 at character 4; convert it to UTF-8" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == Model.load(bundle).chat().send("hi", 4, temperature=0).text + "\n"  # the one answer


def test_chat_refuses_a_system_message_that_is_not_utf8_at_start(bundle):
    result = _nomoat("chat", str(bundle), "--system", b"caf\xe9", stdin=b"hi\n")
    assert result.returncode == 2
    assert result.stderr.startswith("nomoat chat: error: the system message is not valid UTF-8 text: byte 0xe9")


# -- 2. Ctrl-C --------------------------------------------------------------------------------


def _status(run, args) -> int:
    """run(args), with a KeyboardInterrupt that escapes it a test failure (not pytest's own stop)."""
    try:
        return run(args)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped run() (a traceback for the user)")


class _InterruptedStream:
    """A model whose answer is cut by Ctrl-C after its first piece."""

    def stream(self, *args, **kwargs):
        yield type("Event", (), {"text": "Once", "finish_reason": None})()
        raise KeyboardInterrupt


def test_ctrl_c_during_generate_stops_quietly_with_130(bundle, monkeypatch, capsys):
    from nomoat.runtime import cli_generate

    monkeypatch.setattr(cli_generate, "load_model", lambda verb, args: _InterruptedStream())
    parser = argparse.ArgumentParser()
    cli_generate.add_arguments(parser)
    status = _status(cli_generate.run, parser.parse_args([str(bundle), "--prompt", "tell a story"]))
    out, err = capsys.readouterr()
    assert status == 128 + signal.SIGINT
    assert (out, err) == ("Once", "\n")


def test_ctrl_c_during_bench_closes_the_workers_and_says_interrupted(bundle, monkeypatch, capsys):
    from nomoat.runtime import cli_bench

    workers = []

    class Worker:
        def __init__(self, label, argv):
            self.label, self.ready, self.closed = label, {}, False
            workers.append(self)

        def start(self):
            self.ready = {"machine": {}}

        def close(self):
            self.closed = True

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_bench, "WorkerProcess", Worker)
    monkeypatch.setattr(cli_bench, "run_alternating", interrupted)
    parser = argparse.ArgumentParser()
    cli_bench.add_arguments(parser)
    args = parser.parse_args([str(bundle), "--threads", "1", "--threads", "2", "--prompt-tokens", "8",
                              "--new-tokens", "8", "--no-ceiling"])
    assert _status(cli_bench.run, args) == 128 + signal.SIGINT
    assert capsys.readouterr().err.endswith("[interrupted]\n")
    assert len(workers) == 2 and all(w.closed for w in workers)


def test_ctrl_c_anywhere_else_in_a_verb_is_quiet(monkeypatch, capsys):
    from nomoat import __main__ as cli

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_dispatch", interrupted)
    assert _status(cli.main, ["generate"]) == 128 + signal.SIGINT
    assert capsys.readouterr().err == "\n"


def interrupted_import(*args, **kwargs):
    """What Ctrl-C while onnxruntime imports raises: pybind11 turns the KeyboardInterrupt into this."""
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt as e:
        raise ImportError("initialization failed") from e


@pytest.mark.parametrize("verb", [["chat"], ["generate", "--prompt", "tell a story"]])
def test_ctrl_c_while_onnxruntime_imports_is_ctrl_c(bundle, verb, monkeypatch, capsys):
    from nomoat import __main__ as cli

    monkeypatch.setattr(Model, "load", interrupted_import)
    assert _status(cli.main, [verb[0], str(bundle), *verb[1:]]) == 128 + signal.SIGINT
    assert capsys.readouterr().err == "\n"


def test_only_an_import_error_that_ctrl_c_caused_is_taken_for_ctrl_c(monkeypatch):
    from nomoat import __main__ as cli

    def broken(argv):
        raise ImportError("libonnxruntime.so: cannot open shared object file")

    monkeypatch.setattr(cli, "_dispatch", broken)
    with pytest.raises(ImportError, match="cannot open shared object"):
        cli.main(["generate"])
    try:
        interrupted_import()
    except ImportError as e:
        wrapped = ImportError("onnxruntime failed to import")  # a package's __init__ re-raising it as its own
        wrapped.__context__ = e
        assert cli.interrupted(wrapped) and cli.interrupted(e)


# -- 3. stop=None -----------------------------------------------------------------------------


def test_stop_none_is_no_stop_strings(model):
    plain = model.generate("hi", 4, temperature=0)
    assert model.generate("hi", 4, temperature=0, stop=None).text == plain.text
    assert "".join(e.text for e in model.stream("hi", 4, temperature=0, stop=None)) == plain.text
    assert model.chat().send("hi", 4, temperature=0, stop=None).text == model.chat().send("hi", 4, temperature=0).text
    assert StopMatcher(None).feed("abc") == ("abc", False)


# -- 4. --stop "" -----------------------------------------------------------------------------


def test_an_empty_stop_string_is_a_usage_error_at_start(tmp_path, capsys):
    from nomoat.runtime import cli_chat, cli_generate

    for module, extra in ((cli_generate, ["--prompt", "hi"]), (cli_chat, [])):
        parser = argparse.ArgumentParser(prog="nomoat x")
        module.add_arguments(parser)
        with pytest.raises(SystemExit) as e:
            parser.parse_args([str(tmp_path), *extra, "--stop", ""])
        assert e.value.code == 2
        assert "argument --stop: a stop string cannot be empty" in capsys.readouterr().err
    # The reviewer's case, end to end: refused before any bundle is read.
    result = _nomoat("chat", str(tmp_path / "no-bundle"), "--stop", "", stdin=b"hello\n")
    assert result.returncode == 2 and "--stop: a stop string cannot be empty" in result.stderr


# -- 5. manifest.json -------------------------------------------------------------------------


def _edited(bundle: Path, tmp_path: Path, edit) -> Path:
    copy = Path(shutil.copytree(bundle, tmp_path / "copy"))
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest, copy)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def _set(*path_and_value):
    *path, key, value = path_and_value

    def edit(manifest, copy):
        node = manifest
        for name in path:
            node = node[name]
        node[key] = value

    return edit


def _drop_logits(manifest, copy):
    del manifest["onnx"]["io"]["logits"]


def _unlist_and_truncate_weights(manifest, copy):
    del manifest["files"]["model.onnx.data"]
    data = copy / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])


def _tokenizer_outside(manifest, copy):
    outside = copy.parent / "x"
    outside.mkdir()
    shutil.copy(copy / "tokenizer.json", outside / "tokenizer.json")
    manifest["tokenizer"]["tokenizer_file"] = "../x/tokenizer.json"
    manifest["files"]["../x/tokenizer.json"] = sha256_file(outside / "tokenizer.json")


BAD_MANIFESTS = {
    "max_context -5": (_set("max_context", -5), "max_context is -5, not an integer >= 1"),
    "max_context '96'": (_set("max_context", "96"), "max_context is '96'"),
    "io without logits": (_drop_logits, "onnx.io has no name for logits"),
    "KV name without {layer}": (_set("onnx", "io", "past_key", "past"), "onnx.io.past_key 'past' is not a name"),
    "num_layers '30'": (_set("model", "num_layers", "30"), "model.num_layers is '30', not an integer >= 1"),
    "vocab_size true": (_set("model", "vocab_size", True), "model.vocab_size is True"),
    "sliding_window 0": (_set("model", "sliding_window", 0), "model.sliding_window is 0, not an integer >= 1"),
    "sliding_window '6'": (_set("model", "sliding_window", "6"), "model.sliding_window is '6'"),
    "sliding_window true": (_set("model", "sliding_window", True), "model.sliding_window is True"),
    "stop token past the vocabulary": (_set("stop_token_ids", [10**9]), "stop_token_ids holds 1000000000"),
    "files not an object": (_set("files", ["model.onnx"]), "files is"),
    "a sha256 that is no sha256": (_set("files", "tokenizer.json", "abc"), "'abc' is not a sha256"),
    "temperature -1 in the defaults": (_set("generation_defaults", "temperature", -1), "generation_defaults: "),
    "target threads 0": (_set("target", "threads", 0), "target.threads is 0"),
    "weights unlisted and truncated": (_unlist_and_truncate_weights, "files has no sha256 for model.onnx.data"),
    "tokenizer outside the bundle": (_tokenizer_outside, "'../x/tokenizer.json' is not the name of a file in the "
                                                         "bundle folder"),
    "model file by absolute path": (_set("onnx", "model_file", "/etc/passwd"), "'/etc/passwd' is not the name"),
}


@pytest.mark.parametrize("case", BAD_MANIFESTS)
def test_a_malformed_manifest_is_a_bundle_error_saying_reconvert(bundle, tmp_path, case):
    edit, detail = BAD_MANIFESTS[case]
    copy = _edited(bundle, tmp_path, edit)
    with pytest.raises(BundleError) as e:
        Model.load(copy)
    assert str(e.value).startswith("manifest.json is malformed (")
    assert str(e.value).endswith("; re-convert the model.")
    assert detail in str(e.value)


def test_a_manifest_that_is_not_utf8_or_not_an_object_is_malformed(bundle, tmp_path):
    copy = Path(shutil.copytree(bundle, tmp_path / "copy"))
    with open(copy / "manifest.json", "ab") as f:
        f.write(b"\xff")
    with pytest.raises(BundleError, match=r"manifest.json is malformed \(not UTF-8 text.*re-convert the model"):
        Model.load(copy)
    (copy / "manifest.json").write_text("[1, 2]")
    with pytest.raises(BundleError, match=r"manifest.json is malformed \(a JSON list, not an object\)"):
        Model.load(copy)


def test_a_malformed_manifest_is_one_line_in_the_cli(bundle, tmp_path):
    copy = _edited(bundle, tmp_path, _set("model", "num_layers", "30"))
    result = _nomoat("generate", str(copy), "--prompt", "hi")
    assert result.returncode == 1
    assert result.stderr.startswith("nomoat generate: error: manifest.json is malformed (")
    assert result.stderr.count("\n") == 1


def test_the_converter_lists_every_file_the_runtime_opens(bundle):
    manifest = read_manifest(bundle)
    assert {"model.onnx", "model.onnx.data", "tokenizer.json", "chat_template.jinja"} <= set(manifest.runtime_files)
    assert set(manifest.runtime_files) <= set(manifest.files)


def test_without_checksums_a_bundle_may_list_no_files(bundle, tmp_path):
    # The converter's verify stage loads the staged bundle before its files are hashed.
    copy = _edited(bundle, tmp_path, _set("files", {}))
    assert Model.load(copy, verify_checksums=False).generate("hi", 2, temperature=0).token_ids


def test_weights_onnx_runtime_cannot_read_unchecked_are_a_bundle_error(bundle, tmp_path):
    copy = Path(shutil.copytree(bundle, tmp_path / "copy"))
    data = copy / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(BundleError, match=r"ONNX Runtime could not load .*model.onnx: .*Copy the bundle again"):
        Model.load(copy, verify_checksums=False)


# -- 6. system="" -----------------------------------------------------------------------------


def test_an_empty_system_message_is_an_empty_system_turn_in_chat_as_in_stream(model):
    chat = model.chat(system="")
    assert chat.messages == [{"role": "system", "content": ""}]
    user = {"role": "user", "content": "hi"}
    assert model.render([*chat.messages, user]) == model.render("hi", system="")
    chat.reset(system=None)
    assert chat.messages == []


# -- 7. SDK argument checks -------------------------------------------------------------------


@pytest.mark.parametrize("value, message", [
    (2.5, "max_new_tokens must be an integer, got 2.5"),
    ("5", "max_new_tokens must be an integer, got '5'"),
    (True, "max_new_tokens must be an integer, got True"),
    (0, "max_new_tokens must be at least 1, got 0"),
])
def test_max_new_tokens_must_be_a_positive_integer(model, value, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        model.generate("hi", max_new_tokens=value)
    with pytest.raises(ValueError, match=f"^{message}$"):
        model.chat().send("hi", max_new_tokens=value)


@pytest.mark.parametrize("value, message", [
    (-1, "prompt_lookup must be at least 0, got -1"),
    (2.5, "prompt_lookup must be an integer, got 2.5"),
])
def test_prompt_lookup_must_be_a_count(model, value, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        model.generate("hi", 3, prompt_lookup=value)


@pytest.mark.parametrize("value, message", [
    (-1, "threads must be at least 1, got -1"),
    (0, "threads must be at least 1, got 0"),
    ("2", "threads must be an integer, got '2'"),
    (2.0, "threads must be an integer, got 2.0"),
])
def test_threads_must_be_a_positive_integer(bundle, value, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        Model.load(bundle, threads=value)


@pytest.mark.parametrize("value, message", [
    (2.5, "prefill_chunk must be an integer, got 2.5"),
    (0, "prefill_chunk must be at least 1, got 0"),
])
def test_prefill_chunk_must_be_a_positive_integer_before_the_session_loads(bundle, monkeypatch, value, message):
    from nomoat.runtime import model as model_module

    def no_load(*args, **kwargs):
        raise AssertionError("the session loaded before prefill_chunk was checked")

    monkeypatch.setattr(model_module, "DecoderSession", no_load)
    with pytest.raises(ValueError, match=f"^{message}$"):
        Model.load(bundle, prefill_chunk=value)


def test_raw_with_a_system_message_is_refused_in_the_sdk(model):
    """raw skips the chat template, where the system message goes: it would be dropped without a word."""
    message = r"^system= needs the chat template, which raw=True skips; drop one of them"
    with pytest.raises(ValueError, match=message):
        model.render("hi", system="Answer in French.", raw=True)
    with pytest.raises(ValueError, match=message):
        model.generate("hi", 3, system="Answer in French.", raw=True)
    with pytest.raises(ValueError, match=message):
        next(model.stream("hi", 3, system="", raw=True))  # "" is a system turn too
    assert model.render("hi", raw=True) == "hi"


@pytest.mark.parametrize("bad, position", [(-1, 2), ("vocab", 1), ("vocab+5", 0)])
def test_a_token_id_outside_the_vocabulary_is_refused_naming_its_position(model, bad, position):
    """A negative id was read from the end of the embedding; one past it failed inside ONNX Runtime."""
    vocab = model.manifest.model.vocab_size
    value = {"vocab": vocab, "vocab+5": vocab + 5}.get(bad, bad)
    ids = [5, 6, 7, 8]
    ids[position] = value
    message = f"^token id {value} at position {position} is not in the vocabulary \\(0 to {vocab - 1}\\)"
    with pytest.raises(ValueError, match=message):
        next(model.generate_tokens(ids, 2))
    with pytest.raises(ValueError, match=message):
        next(model.generate_tokens_lookahead(ids, 2))
    with pytest.raises(ValueError, match=message):
        next(model.stream_ids(ids, 2))
    with pytest.raises(ValueError, match=message):
        model.logits(ids)
    assert next(model.stream_ids([5, 6, vocab - 1], 1)).token_id is not None  # the last row is in


def test_token_ids_that_are_not_integers_are_a_type_error(model):
    with pytest.raises(TypeError, match=r"^token ids must be a flat sequence of integers, got \[5, 6.5\]"):
        next(model.generate_tokens([5, 6.5], 2))


@pytest.mark.parametrize("kwargs, error, said", [
    ({"stop": 123}, ValueError, "stop must be a string or a list of strings, got int"),  # was "not iterable"
    ({"stop": b"x"}, ValueError, "stop must be a string or a list of strings, got bytes"),  # was "got 120"
    ({"grammar": "json"}, TypeError, "grammar must be a Grammar"),  # was an AttributeError on .source
])
def test_arguments_of_the_wrong_kind_name_what_to_give(bundle, kwargs, error, said):
    with pytest.raises(error, match=said):
        Model.load(bundle).generate("hi", 2, **kwargs)


def test_stop_strings_come_in_any_collection(bundle):
    model = Model.load(bundle)
    plain = model.generate("hi", 4, temperature=0, stop=["zzz"]).token_ids
    assert model.generate("hi", 4, temperature=0, stop={"zzz"}).token_ids == plain  # a set, as list() takes it
    assert model.generate("hi", 4, temperature=0, stop=("zzz",)).token_ids == plain


def test_an_empty_conversation_and_params_that_are_not_sampling_params_are_refused(bundle):
    model = Model.load(bundle)
    with pytest.raises(ValueError, match="messages is empty"):  # was an answer to the template's header alone
        model.generate([], 2)
    with pytest.raises(TypeError, match="params must be a SamplingParams"):
        list(model.stream_ids([1, 2], 2, params={"temperature": 0}))


def test_the_sdk_ships_its_type_hints():
    """PEP 561: without py.typed a user's mypy skips nomoat.runtime ("missing library stubs")."""
    import importlib.resources

    assert importlib.resources.files("nomoat.runtime").joinpath("py.typed").is_file()
