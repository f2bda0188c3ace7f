"""Structured output: answers held to a JSON schema, a regex or a GBNF grammar (llguidance).

The tiny bundle's model is random: left alone it writes no JSON at all, so every valid answer
below is the constraint's doing."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from nomoat.runtime import Grammar, Model
from nomoat.runtime.structured import StructuredOutputUnavailable

pytest.importorskip("llguidance")

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "pets"],
          "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0},
                         "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 3}}}


def valid_person(text: str) -> bool:
    value = json.loads(text)
    return (set(value) == {"name", "age", "pets"} and isinstance(value["name"], str) and len(value["name"]) <= 12
            and type(value["age"]) is int and value["age"] >= 0 and isinstance(value["pets"], list)
            and len(value["pets"]) <= 3 and set(value["pets"]) <= {"cat", "dog"})


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Model:
    from tiny_models import tiny_fp32_bundle

    return Model.load(tiny_fp32_bundle(tmp_path_factory, max_context=512), threads=1)


def test_the_random_model_writes_no_json_unconstrained(model):
    # The premise of the tests below.
    text = model.generate("Describe a person as JSON.", 60, temperature=0).text
    with pytest.raises(ValueError):
        json.loads(text)


@pytest.mark.parametrize("seed", [None, 1, 2, 3])
def test_a_json_schema_holds_greedy_and_sampled_answers(model, seed):
    sampling = {"temperature": 0} if seed is None else {"temperature": 1.0, "seed": seed}
    answer = model.generate("Describe a person as JSON.", 200, grammar=Grammar.json(PERSON), **sampling)
    assert answer.finish_reason == "stop", answer.text  # ended where the object closed
    assert valid_person(answer.text), answer.text


def test_json_without_a_schema_is_any_object_and_a_chat_turn_takes_a_grammar(model):
    chat = model.chat()
    answer = chat.send("An object, please.", 120, grammar=Grammar.json(), temperature=0)
    assert answer.finish_reason == "stop" and isinstance(json.loads(answer.text), dict), answer.text
    assert chat.messages[-1] == {"role": "assistant", "content": answer.text}


def test_a_regex_and_a_gbnf_grammar(model):
    code = model.generate("A code:", 20, grammar=Grammar.regex(r"[A-Z]{3}-[0-9]{2}"), temperature=1.0, seed=4)
    assert re.fullmatch(r"[A-Z]{3}-[0-9]{2}", code.text) and code.finish_reason == "stop", code.text
    gbnf = 'root ::= answer " because " reason\nanswer ::= "yes" | "no"\nreason ::= [a-z]{1,8}'
    reply = model.generate("Well?", 30, grammar=Grammar.gbnf(gbnf), temperature=1.0, seed=5)
    assert re.fullmatch(r"(yes|no) because [a-z]{1,8}", reply.text), reply.text


def test_max_new_tokens_still_ends_a_match_that_is_not_whole(model):
    answer = model.generate("x", 3, grammar=Grammar.json(PERSON), temperature=0)
    assert answer.finish_reason == "length" and len(answer.token_ids) == 3 and answer.text.startswith("{")


def test_logprobs_are_the_models_own_under_a_grammar(model):
    answer = model.generate("A code:", 6, grammar=Grammar.regex("[0-9]+"), temperature=0, logprobs=1)
    # The digits are what the grammar allowed, not what the random model liked best: the raw top
    # token is elsewhere at least once, and every chosen token's raw logprob is reported.
    assert answer.text.isdigit() and len(answer.logprobs) == len(answer.token_ids)
    assert any(scored.top[0][0] != scored.token_id for scored in answer.logprobs)


def _follows(model, grammar: Grammar, text: str, then: str) -> bool:
    """Whether the grammar lets `then` come after `text` (each as the model's tokenizer splits it)."""
    import numpy as np

    constraint = model.constraint(grammar)
    for token in model.tokenizer.encode(text, add_special_tokens=False).ids:
        constraint.accept(token)
    first = model.tokenizer.encode(then, add_special_tokens=False).ids[0]
    return bool(np.isfinite(constraint.mask(np.zeros(model.manifest.model.vocab_size, np.float32))[first]))


OPEN_PERSON = {key: value for key, value in PERSON.items() if key != "additionalProperties"}


@pytest.mark.parametrize("schema", [
    OPEN_PERSON,  # listed properties, nothing said about others
    {"type": "array", "items": OPEN_PERSON},
    {"$defs": {"p": OPEN_PERSON}, "anyOf": [{"$ref": "#/$defs/p"}, {"type": "integer"}]},
])
def test_an_object_that_lists_its_properties_takes_no_others_as_in_llama_cpp(model, schema):
    """JSON Schema allows any other key; llama.cpp's grammars (and OpenAI's strict mode) do not, and a small
    model given the freedom adds keys until max_tokens runs out (SmolLM2 did, on the README's example)."""
    prefix = ("[" if schema.get("type") == "array" else "") + '{"name": "a", "age": 1, "pets": []'
    assert _follows(model, Grammar.json(schema), prefix, "}")
    assert not _follows(model, Grammar.json(schema), prefix, ",")


def test_an_object_that_says_it_takes_others_or_lists_none_still_does(model):
    prefix = '{"name": "a", "age": 1, "pets": []'
    assert _follows(model, Grammar.json({**OPEN_PERSON, "additionalProperties": True}), prefix, ",")
    assert _follows(model, Grammar.json({"type": "object"}), '{"a": 1', ",")  # json_object: any object
    # an allOf's branches each list a share of the properties: the object is theirs together
    both = {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                      {"properties": {"b": {"type": "integer"}}, "required": ["b"]}]}
    assert _follows(model, Grammar.json(both), '{"a": 1', ",")


def test_one_of_is_read_as_any_of_as_llama_cpp_reads_it(model):
    answer = model.generate("n:", 8, grammar=Grammar.json({"oneOf": [{"type": "integer"}, {"type": "number"}]}),
                            temperature=0)
    float(answer.text)  # a number, from either branch


@pytest.mark.parametrize(("gbnf", "text", "bad"), [
    ('root ::= "caf\\u00e9"', "caf", "e"),  # llama.cpp's \uXXXX: was refused (llguidance dropped its zeros)
    ('root ::= [\\u0400-\\u04FF]+', "", "a"),
    ('root ::= "\\"" [\\x20\\x21\\x23-\\x5b\\x5d-\\U0010FFFF]* "\\""', '"caf', "\\"),  # old json.gbnf's string
])
def test_gbnf_unicode_escapes_are_read_as_llama_cpp_reads_them(model, gbnf, text, bad):
    good = {"caf": "é", "": "п", '"caf': "é"}[text]
    assert _follows(model, Grammar.gbnf(gbnf), text, good)
    assert not _follows(model, Grammar.gbnf(gbnf), text, bad)


@pytest.mark.parametrize(("grammar", "words"), [
    (lambda: Grammar.gbnf('start ::= "a"'), "GBNF grammar has no root rule"),
    (lambda: Grammar.regex("(unclosed"), "regex grammar cannot be used"),
    (lambda: Grammar.json({"type": "objekt"}), "json grammar cannot be used"),
    (lambda: Grammar.json("{not json"), "JSON schema is not valid JSON"),
    (lambda: Grammar.json(["a list"]), "a JSON schema is a JSON object"),
    (lambda: Grammar.lark("start: undefined_rule"), "lark grammar cannot be used"),
])
def test_a_bad_grammar_is_a_one_line_error_before_any_token(model, grammar, words):
    with pytest.raises(ValueError, match=words) as info:
        model.generate("x", 5, grammar=grammar())
    assert "\n" not in str(info.value)


def test_without_llguidance_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)  # import fails as if it were not installed
    with pytest.raises(StructuredOutputUnavailable, match=r"pip install llguidance"):
        Grammar.json()


# -- the server ---------------------------------------------------------------------------------------

openai = pytest.importorskip("openai")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_pi_server import MODEL_ID, _sse_events, client, running_server  # noqa: E402

from pi_demo.openai_api import Limits  # noqa: E402


@pytest.fixture(scope="module")
def base_url(model):
    with running_server(model, limits=Limits(max_tokens=256)) as server:
        yield f"http://127.0.0.1:{server.server_address[1]}"


def test_the_server_takes_openais_response_format_whole_and_streamed(base_url):
    messages = [{"role": "user", "content": "Describe a person."}]
    schema_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    c = client(base_url)
    whole = c.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=200, temperature=0,
                                      response_format=schema_format)
    assert whole.choices[0].finish_reason == "stop" and valid_person(whole.choices[0].message.content)
    chunks = c.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=200, temperature=0,
                                       response_format=schema_format, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == whole.choices[0].message.content
    anything = c.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=200, temperature=0,
                                         response_format={"type": "json_object"})
    assert isinstance(json.loads(anything.choices[0].message.content), dict)


def test_the_server_takes_llama_cpps_grammar_and_json_schema_fields(base_url):
    c = client(base_url)
    reply = c.completions.create(model=MODEL_ID, prompt="Answer:", max_tokens=10, temperature=1.0, seed=3,
                                 extra_body={"grammar": 'root ::= "yes" | "no"'})
    assert reply.choices[0].text in ("yes", "no")
    events = _sse_events(base_url, "/v1/completions", {"model": MODEL_ID, "prompt": "Person:", "max_tokens": 200,
                                                        "temperature": 0, "json_schema": PERSON})
    assert valid_person("".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"]))


@pytest.mark.parametrize(("extra", "param", "words"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "needs"),
    ({"response_format": {"type": "yaml"}}, "response_format", "must be"),
    ({"response_format": {"type": "json_object"}, "grammar": 'root ::= "a"'}, "grammar", "give one of"),
    ({"json_schema": {"type": "objekt"}}, "json_schema", "cannot be used"),
    ({"grammar": "root ::= undefined"}, "grammar", "grammar"),
    ({"grammar": ""}, "grammar", "non-empty"),
])
def test_a_bad_structured_output_request_is_a_400_naming_its_field(base_url, extra, param, words):
    with pytest.raises(openai.BadRequestError) as info:
        client(base_url).chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=5, extra_body=extra)
    error = info.value.response.json()["error"]
    assert error["param"] == param and words in error["message"], error


# -- the command line ---------------------------------------------------------------------------------

NOMOAT = [sys.executable, "-m", "nomoat"]


def _run(*args: str, input: str | None = None):
    import subprocess

    return subprocess.run([*NOMOAT, *args], capture_output=True, text=True, input=input, timeout=300)


def test_generate_and_chat_take_llama_cpps_grammar_flags(model, tmp_path):
    bundle = str(model.bundle)
    result = _run("generate", bundle, "--prompt", "A person:", "--temperature", "0", "--max-new-tokens", "200",
                  "--json-schema", json.dumps(PERSON))
    assert result.returncode == 0 and valid_person(result.stdout.strip()), result.stderr
    grammar = tmp_path / "yes-no.gbnf"
    grammar.write_text('root ::= "yes" | "no"\n')
    result = _run("chat", bundle, "--grammar-file", str(grammar), "--temperature", "1", "--seed", "2",
                  input="Well?\nAgain?\n")
    assert result.returncode == 0, result.stderr
    answers = [line.strip() for line in result.stdout.splitlines() if line.strip() in ("yes", "no")]
    assert len(answers) == 2, result.stdout


@pytest.mark.parametrize(("flags", "words"), [
    (["--json-schema", "{not json"], "not valid JSON"),
    (["--grammar-file", "/nonexistent/g.gbnf"], "cannot read /nonexistent/g.gbnf"),
    (["--json-schema", "{}", "--grammar", 'root ::= "a"'], "not allowed with argument"),
])
def test_a_bad_grammar_flag_is_a_usage_error_before_the_load(tmp_path, flags, words):
    result = _run("generate", str(tmp_path / "no-bundle"), "--prompt", "x", *flags)
    assert result.returncode == 2 and words in result.stderr, result.stderr


def test_a_grammar_the_tokenizer_cannot_take_is_one_line_after_the_load(model):
    result = _run("chat", str(model.bundle), "--json-schema", '{"type": "objekt"}', input="hi\n")
    assert result.returncode == 1 and "json grammar cannot be used" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_llama_cpps_json_object_with_a_schema_holds_to_the_schema(base_url):
    reply = client(base_url).chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "A person."}], max_tokens=200, temperature=0,
        response_format={"type": "json_object", "schema": PERSON})
    assert valid_person(reply.choices[0].message.content), reply.choices[0].message.content


def test_a_bundle_without_a_stop_token_says_why_it_cannot_take_a_grammar():
    from nomoat.runtime.structured import grammar_tokenizer

    with pytest.raises(ValueError, match="structured output needs a stop token, and this bundle has none"):
        grammar_tokenizer("{}", 10, frozenset())
