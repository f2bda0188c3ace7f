"""pi_demo serve: OpenAI's own Python client against the server on localhost, on a tiny bundle."""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # pi_demo is a folder copied to the Pi next to the bundle, not an installed package

from pi_demo.openai_api import ApiError, Limits, parse_chat, parse_completion  # noqa: E402
from pi_demo.server import App, Handler, PiServer, ServerConfig  # noqa: E402

KEY = "test-key"
LIMITS = Limits(max_tokens=64, max_body_bytes=16 << 10, max_queue=8)
MODEL_ID = "tiny"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    from tiny_models import tiny_fp32_bundle

    return tiny_fp32_bundle(tmp_path_factory, max_context=256)


@pytest.fixture(scope="module")
def model(bundle):
    from nomoat.runtime import Model

    return Model.load(bundle, threads=1)


@contextmanager
def running_server(model, limits: Limits = LIMITS, api_key: str | None = KEY, prompt_lookup: int = 0,
                   model_id: str = MODEL_ID, cache_prompt: bool = True,
                   cors_origin: str | None = None) -> Iterator[PiServer]:
    """The server in a thread of this process."""
    config = ServerConfig(model_id, limits, api_key, prompt_lookup, cache_prompt=cache_prompt, cors_origin=cors_origin)
    server = PiServer(("127.0.0.1", 0), App(model, config))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def url_of(server: PiServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(scope="module")
def base_url(model) -> Iterator[str]:
    with running_server(model) as server:
        yield url_of(server)


def client(base_url: str, key: str = KEY):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0, timeout=120)


def ask(base_url: str, prompt: str, stream: bool, max_tokens: int = 16) -> str:
    messages = [{"role": "user", "content": prompt}]
    c = client(base_url)
    if not stream:
        r = c.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=max_tokens, temperature=0)
        return r.choices[0].message.content
    chunks = c.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=max_tokens, temperature=0,
                                       stream=True)
    return "".join(ch.choices[0].delta.content or "" for ch in chunks)


def health(base_url: str) -> dict:
    with urllib.request.urlopen(f"{base_url}/health", timeout=10) as r:  # no key needed
        return json.load(r)


@contextmanager
def model_held(model) -> Iterator:
    """Hold the model's lock: the worker blocks at its next generation and requests pile up in line.
    Yields release(), to let them run."""
    model._lock.acquire()
    held = [True]

    def release() -> None:
        held[0] = False
        model._lock.release()

    try:
        yield release
    finally:
        if held[0]:
            model._lock.release()


def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def jobs_of(server: PiServer) -> list:
    """The jobs the server submits to its worker from now on, in order."""
    app, jobs = server.app, []
    submit = app.submit
    app.submit = lambda job: (jobs.append(job), submit(job))[1]
    return jobs


def raw_request(base_url: str, path: str, body: dict) -> socket.socket:
    """POST `body` on a bare socket, so a test can hang up whenever it likes; the answer is left unread."""
    host, port = base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    data = json.dumps({"model": MODEL_ID, **body}).encode()
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


# -- answers -------------------------------------------------------------------------------------


def test_models_and_health(base_url):
    assert [m.id for m in client(base_url).models.list().data] == [MODEL_ID]
    assert client(base_url).models.retrieve(MODEL_ID).owned_by == "nomoat"
    assert health(base_url) == {"status": "ok", "model": MODEL_ID, "generating": False, "waiting": 0,
                                "max_queue": LIMITS.max_queue}


def test_chat_completion_is_the_models_greedy_answer_with_usage(base_url, model):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital?"}]
    r = client(base_url).chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=12, temperature=0)
    expected = model.generate(messages, 12, temperature=0)
    assert r.object == "chat.completion" and r.model == MODEL_ID and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected.text
    assert r.choices[0].finish_reason == expected.finish_reason
    assert r.usage.prompt_tokens == len(model.prompt_ids(messages))
    assert r.usage.completion_tokens == len(expected.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streamed_chat_sends_the_same_answer_in_chunks_then_usage(base_url):
    messages = [{"role": "user", "content": "Tell me about the fox."}]
    whole = client(base_url).chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=20, temperature=0)
    chunks = list(client(base_url).chat.completions.create(
        model=MODEL_ID, messages=messages, max_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(text_chunks) > 3  # streamed as generated, not in one piece
    assert "".join(c.choices[0].delta.content for c in text_chunks) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_text_completion_takes_the_prompt_raw(base_url, model):
    c = client(base_url)
    r = c.completions.create(model=MODEL_ID, prompt="The quick brown", max_tokens=10, temperature=0)
    assert r.object == "text_completion"
    assert r.choices[0].text == model.generate("The quick brown", 10, raw=True, temperature=0).text
    assert r.usage.prompt_tokens == len(model.encode("The quick brown"))
    streamed = c.completions.create(model=MODEL_ID, prompt="The quick brown", max_tokens=10, temperature=0,
                                    stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == r.choices[0].text


def test_a_text_completion_goes_on_from_its_prompt_with_the_space_its_first_word_has(tmp_path_factory):
    """A LLaMA-2-style tokenizer drops the space of a first token decoded alone; a completion's text
    continues its prompt, so it keeps it (" jumps", as OpenAI returns it), streamed or not, in the
    logprobs' text_offset too; a chat answer is decoded alone, as transformers decodes it."""
    from nomoat.runtime import Grammar, Model
    from tiny_models import llama2_style_fp32_bundle

    model = Model.load(llama2_style_fp32_bundle(tmp_path_factory), threads=1)
    jumps = Grammar.gbnf('root ::= " jumps over the lazy dog."')
    assert model.generate("The quick brown fox", 16, raw=True, grammar=jumps).text == " jumps over the lazy dog."
    with running_server(model) as server:
        body = {"model": MODEL_ID, "prompt": "The quick brown fox", "max_tokens": 16, "logprobs": 0,
                "grammar": 'root ::= " jumps over the lazy dog."'}
        status, r = _raw_post(url_of(server), "/v1/completions", json.dumps(body).encode())
        assert status == 200, r
        choice = r["choices"][0]
        assert choice["text"] == " jumps over the lazy dog."
        assert "".join(choice["logprobs"]["tokens"]) == choice["text"]
        assert choice["logprobs"]["text_offset"][1] == len(choice["logprobs"]["tokens"][0])
        streamed = client(url_of(server)).completions.create(
            model=MODEL_ID, prompt="The quick brown fox", max_tokens=16, stream=True,
            extra_body={"grammar": 'root ::= " jumps over the lazy dog."'})
        assert "".join(ch.choices[0].text for ch in streamed) == " jumps over the lazy dog."
    chat = model.generate("Say it", 16, grammar=jumps)
    assert chat.text == model.tokenizer.decode(chat.token_ids) == "jumps over the lazy dog."


def _exchange(base_url: str, method: str, path: str, headers: dict, body: bytes | None = None):
    """(status, headers with lower-case names) of one request on a connection of its own."""
    return _response(base_url, method, path, headers, body)[:2]


def _response(base_url: str, method: str, path: str, headers: dict, body: bytes | None = None):
    """(status, headers with lower-case names, body) of one request on a connection of its own."""
    host, port = base_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request(method, path, body=body, headers=headers)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, data


PREFLIGHT = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"}


def test_cors_is_off_unless_an_origin_is_given(base_url):
    status, headers = _exchange(base_url, "OPTIONS", "/v1/chat/completions", PREFLIGHT)
    assert status == 405 and headers["allow"] == "POST"
    status, headers = _exchange(base_url, "GET", "/v1/models", {"Authorization": f"Bearer {KEY}"})
    assert status == 200 and "access-control-allow-origin" not in headers


@pytest.mark.parametrize("origin", ["http://localhost:3000", "*"])
def test_a_browser_on_the_cors_origin_may_call_the_api(model, origin):
    """--cors-origin: the preflight (sent without the key) gets the methods and the headers asked for,
    and every answer, errors and streams included, names the origin."""
    with running_server(model, cors_origin=origin) as server:
        url = url_of(server)
        status, headers = _exchange(url, "OPTIONS", "/v1/chat/completions", PREFLIGHT)
        assert status == 204
        assert headers["access-control-allow-origin"] == origin
        assert headers["access-control-allow-methods"] == "POST, OPTIONS"
        assert headers["access-control-allow-headers"] == "authorization, content-type, x-stainless-os"
        status, headers = _exchange(url, "OPTIONS", "/v1/models/tiny", PREFLIGHT)
        assert status == 204 and headers["access-control-allow-methods"].startswith("GET")
        assert _exchange(url, "OPTIONS", "/v1/nowhere", PREFLIGHT)[0] == 404
        body = json.dumps({"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        for key, stream, expected in ((KEY, False, 200), (KEY, True, 200), ("wrong", False, 401)):
            sent = json.loads(body) | {"stream": stream}
            status, headers = _exchange(url, "POST", "/v1/chat/completions",
                                        {"Authorization": f"Bearer {key}", "Origin": PREFLIGHT["Origin"],
                                         "Content-Type": "application/json"}, json.dumps(sent).encode())
            assert status == expected and headers["access-control-allow-origin"] == origin, (key, stream)
        # The connection the preflight used still serves the next request.
        host, port = url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("OPTIONS", "/v1/completions", headers=PREFLIGHT)
        assert conn.getresponse().read() == b""
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
        conn.close()


@pytest.mark.parametrize("value", ["localhost:3000", "http://localhost:3000/", "http://host/path", "ftp://host", ""])
def test_a_cors_origin_that_is_no_origin_is_refused(value):
    import argparse

    from pi_demo.serve import cors_origin

    with pytest.raises(argparse.ArgumentTypeError, match="is not a web origin: give scheme://host"):
        cors_origin(value)
    assert cors_origin("https://chat.example:8443") == "https://chat.example:8443" and cors_origin("*") == "*"


def test_seed_temperature_top_p_and_stop_are_honoured(base_url):
    c = client(base_url)

    def text(**kw) -> str:
        return c.completions.create(model=MODEL_ID, prompt="Small models", max_tokens=24, **kw).choices[0].text

    greedy = text(temperature=0)
    sampled = text(temperature=1.5, seed=7)
    assert text(temperature=1.5, seed=7) == sampled  # the seed makes sampling repeatable
    assert {text(temperature=1.5, seed=s) for s in range(1, 5)} != {sampled}  # and it is sampling
    assert text(temperature=1.5, top_p=1e-6, seed=3) == greedy  # a nucleus of one token is greedy
    assert text(temperature=1.5, top_p=0, seed=3) == greedy  # OpenAI's 0: the top token, not a 400
    stop = greedy[len(greedy) // 2:len(greedy) // 2 + 2]
    r = c.completions.create(model=MODEL_ID, prompt="Small models", max_tokens=24, temperature=0, stop=[stop])
    assert r.choices[0].text == greedy[:greedy.index(stop)] and r.choices[0].finish_reason == "stop"


def test_prompt_lookup_serves_the_same_greedy_answers_and_leaves_sampled_ones_alone(model, caplog):
    messages = [{"role": "user", "content": "one two three four five six " * 3}]

    def answers(server: PiServer) -> tuple[list[str], list[int]]:
        texts, drafted = [], []
        for sampling in ({"temperature": 0}, {"temperature": 0.8, "seed": 7}):
            r = client(url_of(server)).chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=24,
                                                               **sampling)
            texts.append(r.choices[0].message.content)
            drafted.append(model.last_stats.drafted_tokens)  # one worker, one request at a time: this one's
        return texts, drafted

    with running_server(model) as server:
        plain, plain_drafted = answers(server)
    with caplog.at_level("INFO", logger="pi_demo.serve"), running_server(model, prompt_lookup=4) as server:
        looked_up, drafted = answers(server)
    assert looked_up == plain
    assert plain_drafted == [0, 0]
    assert drafted[0] > 0 and drafted[1] == 0  # the sampled request ran plain
    assert "drafted tokens accepted" in caplog.text


def _fresh(model, prompt, max_tokens: int, **kwargs):
    """The answer from an empty KV cache, as after loading the bundle."""
    model.session.reset()
    return model.generate(prompt, max_tokens, temperature=0, **kwargs)


def test_cache_prompt_false_computes_the_prompt_from_an_empty_cache(base_url, model):
    # An int4 bundle's last prompt token run alone (after a cache hit) rounds its int8 activations
    # unlike a batched prefill: at a near-tie the answer changes. cache_prompt: false (llama.cpp's
    # field) makes a request's answer its fresh one, whatever ran before.
    c = client(base_url)
    messages = [{"role": "user", "content": "Tell me about the fox."}]

    def chat(**extra):
        return c.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=8, temperature=0, **extra)

    def complete(**extra):
        return c.completions.create(model=MODEL_ID, prompt="The quick brown", max_tokens=8, temperature=0, **extra)

    for call in (chat, complete):
        call()
        assert call().usage.prompt_tokens_details.cached_tokens > 0  # by default the cache is reused
        uncached = call(extra_body={"cache_prompt": False})
        assert uncached.usage.prompt_tokens_details.cached_tokens == 0
        assert call(extra_body={"cache_prompt": True}).usage.prompt_tokens_details.cached_tokens > 0
    assert uncached.choices[0].text == _fresh(model, "The quick brown", 8, raw=True).text
    assert chat(extra_body={"cache_prompt": False}).choices[0].message.content == _fresh(model, messages, 8).text
    for value in ("false", 0):
        with pytest.raises(openai.BadRequestError) as info:
            chat(extra_body={"cache_prompt": value})
        _assert_openai_error(info.value.response.json(), None, "cache_prompt")
        assert "boolean" in info.value.response.json()["error"]["message"]


def test_no_cache_prompt_makes_false_every_requests_default(model):
    with running_server(model, cache_prompt=False) as server:
        c = client(url_of(server))

        def cached_tokens(**extra) -> int:
            return c.completions.create(model=MODEL_ID, prompt="The quick brown", max_tokens=4, temperature=0,
                                        **extra).usage.prompt_tokens_details.cached_tokens

        assert cached_tokens() == cached_tokens() == 0
        assert cached_tokens(extra_body={"cache_prompt": True}) > 0  # a request may still ask for the cache


def test_a_client_that_hangs_up_during_a_long_prefill_stops_it_between_chunks(model, monkeypatch):
    monkeypatch.setattr(model, "prefill_chunk", 8)
    forward, runs = model.session.forward, []

    def slow_forward(ids, *args, **kwargs):
        runs.append(len(ids))
        if len(runs) == 1:  # a Pi's prefill: the client gives up before its first chunk ends, and the server
            jobs[0]._cancelled.wait(30)  # notices (its handler polls the socket) before the next chunk starts
        else:
            time.sleep(0.3)
        return forward(ids, *args, **kwargs)

    monkeypatch.setattr(model.session, "forward", slow_forward)
    prompt = "The quick brown fox jumps over the lazy dog. " * 8
    chunks = -(-len(model.encode(prompt)) // 8)
    assert chunks >= 10
    with running_server(model) as server:
        jobs = jobs_of(server)
        url = url_of(server)
        sock = raw_request(url, "/v1/completions", {"prompt": prompt, "max_tokens": 4, "cache_prompt": False})
        wait_for(lambda: len(runs) >= 1)
        sock.close()
        wait_for(lambda: not health(url)["generating"], timeout=chunks * 0.3)
        assert jobs[0].cancelled and runs == [8], runs  # the rest of the prompt never ran
        monkeypatch.setattr(model.session, "forward", forward)
        assert ask(url, "Tell me about the fox.", stream=False)  # the cache it left is sound


def test_should_stop_ends_the_runtimes_prefill_between_chunks_without_an_answer(model, monkeypatch):
    monkeypatch.setattr(model, "prefill_chunk", 4)
    ids = model.encode("The quick brown fox jumps over the lazy dog. " * 2)
    asked = []
    model.session.reset()
    events = list(model.stream_ids(ids, 4, should_stop=lambda: asked.append(1) or len(asked) >= 2))
    assert events == [] and model.session.length == 8  # two chunks ran, then it stopped
    stats = model.last_stats
    assert stats.stopped_in_prefill and stats.prefill_tokens == 8 and stats.generated_tokens == 0
    assert model.generate("hi", 4, raw=True).token_ids  # the model goes on
    assert not model.last_stats.stopped_in_prefill


def test_a_shutdown_after_the_answer_is_out_leaves_the_answer_whole(model, monkeypatch):
    """The worker's check after the stream: a job cancelled once its finish event was queued (a
    SIGTERM at that moment) keeps its answer; only a stream that stopped in its prefill is cancelled."""
    from pi_demo.worker import Job, Worker

    worker = Worker(model, max_waiting=4)
    job = Job(model.prompt_ids("hi"), 3, model.sampling_params(), [])
    stream_ids = model.stream_ids

    def cancelled_at_the_end(*args, **kwargs):
        yield from stream_ids(*args, **kwargs)
        job._cancelled.set()  # after the last event, before the worker's own check

    monkeypatch.setattr(model, "stream_ids", cancelled_at_the_end)
    try:
        worker._run(job)
    finally:
        worker.close()
    events = list(job.results())
    assert events[-1].finish_reason in ("stop", "length") and job.stats is not None


def test_a_chat_without_max_tokens_runs_to_the_servers_cap_or_the_contexts_end(model, monkeypatch):
    # As OpenAI and llama.cpp (n_predict -1): not the bundle's max_new_tokens (here made 8 to show it).
    monkeypatch.setitem(model.manifest.generation_defaults, "max_new_tokens", 8)
    messages = [{"role": "user", "content": "Tell me about the fox."}]
    prompt_tokens = len(model.prompt_ids(messages))
    room = model.max_context - prompt_tokens + 1  # the last token is sampled, never put in the cache
    for cap in (40, 1024):  # the server's --max-tokens, then the context's end, whichever comes first
        with running_server(model, Limits(max_tokens=cap, max_body_bytes=16 << 10, max_queue=8)) as server:
            c = client(url_of(server))
            r = c.chat.completions.create(model=MODEL_ID, messages=messages, temperature=0)
            expected = _fresh(model, messages, min(cap, room))
            assert r.choices[0].message.content == expected.text
            assert r.usage.completion_tokens == len(expected.token_ids) > 8
            if not expected.stats.stop_token:  # the tiny model seldom says its stop token
                assert r.usage.completion_tokens == min(cap, room) and r.choices[0].finish_reason == "length"
            text = c.completions.create(model=MODEL_ID, prompt="The quick brown", temperature=0)
            assert text.usage.completion_tokens <= 16  # OpenAI's legacy default for /v1/completions stays


def test_eight_concurrent_clients_get_complete_unmixed_answers(model):
    prompts = ["The quick brown fox", "What is the capital of France?", "Small models run on phones",
               "def hello(name):", "Numbers like 12345", "Emoji 😀🚀", "中文字符", "Raspberry Pi"]
    with running_server(model) as server:
        url = url_of(server)
        alone = [ask(url, p, stream=False, max_tokens=24) for p in prompts]
        assert len(set(alone)) == len(prompts)  # different answers, so a mix-up would show
        # Hold the model so all eight are provably in line at once, then let them run.
        with model_held(model) as release, ThreadPoolExecutor(len(prompts)) as pool:
            futures = [pool.submit(ask, url, p, i % 2 == 0, 24) for i, p in enumerate(prompts)]
            wait_for(lambda: health(url) | {"status": 0} == {"status": 0, "model": MODEL_ID, "generating": True,
                                                           "waiting": len(prompts) - 1, "max_queue": 8})
            release()
            together = [f.result(timeout=120) for f in futures]
    assert together == alone


# -- refusals -------------------------------------------------------------------------------------


def _raw_post(base_url: str, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    host, port = base_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", path, body=body, headers={"Authorization": f"Bearer {KEY}", **(headers or {})})
    response = conn.getresponse()
    status, payload = response.status, json.loads(response.read())
    conn.close()
    return status, payload


def _assert_openai_error(body: dict, code: str | None, param: str | None = None) -> None:
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code and body["error"]["param"] == param and body["error"]["message"]


def test_malformed_json_is_a_400(base_url):
    status, body = _raw_post(base_url, "/v1/chat/completions", b'{"model": "tiny", "messages": [')
    assert status == 400
    _assert_openai_error(body, "invalid_json")
    assert body["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(("call", "status", "code", "param"), [
    (lambda c: c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}]),
     404, "model_not_found", "model"),
    (lambda c: c.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}],
                                         max_tokens=0), 400, None, "max_tokens"),
    (lambda c: c.completions.create(model=MODEL_ID, prompt="hi", temperature=3), 400, None, "temperature"),
    (lambda c: c.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}], n=2),
     400, "unsupported_parameter", "n"),
    (lambda c: c.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "x" * 20_000}]),
     413, "request_too_large", None),
    (lambda c: c.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "fox " * 300}]),
     400, "context_length_exceeded", "messages"),
])
def test_bad_requests_get_the_right_4xx_with_an_openai_error_body(base_url, call, status, code, param):
    with pytest.raises(openai.APIStatusError) as info:
        call(client(base_url))
    assert info.value.status_code == status
    _assert_openai_error(info.value.response.json(), code, param)


def test_a_wrong_or_missing_api_key_is_a_401(base_url):
    with pytest.raises(openai.AuthenticationError) as info:
        client(base_url, key="wrong").chat.completions.create(model=MODEL_ID, messages=[{"role": "user",
                                                                                       "content": "hi"}])
    _assert_openai_error(info.value.response.json(), "invalid_api_key")
    status, body = _raw_post(base_url, "/v1/completions", b"{}", headers={"Authorization": ""})
    assert status == 401
    assert health(base_url)["status"] == "ok"  # /health stays open for monitoring


def test_a_full_queue_is_a_429_and_the_queued_requests_still_complete(model):
    with running_server(model, Limits(max_tokens=64, max_body_bytes=16 << 10, max_queue=1)) as server:
        url = url_of(server)
        alone = ask(url, "first", stream=False)
        with model_held(model) as release, ThreadPoolExecutor(2) as pool:
            running = pool.submit(ask, url, "first", False)
            wait_for(lambda: health(url)["generating"])
            waiting = pool.submit(ask, url, "second", True)
            wait_for(lambda: health(url)["waiting"] == 1)
            with pytest.raises(openai.RateLimitError) as info:
                ask(url, "third", stream=False)
            release()
            answers = running.result(timeout=60), waiting.result(timeout=60)
    assert info.value.response.headers["Retry-After"]
    _assert_openai_error(info.value.response.json(), "rate_limit_exceeded")
    assert answers[0] == alone and answers[1]


def test_a_waiting_client_that_hangs_up_gives_its_place_in_line_back_at_once(model):
    with running_server(model, Limits(max_tokens=64, max_body_bytes=16 << 10, max_queue=1)) as server:
        url = url_of(server)
        with model_held(model) as release, ThreadPoolExecutor(2) as pool:
            running = pool.submit(ask, url, "first", False)
            wait_for(lambda: health(url)["generating"])
            gone = raw_request(url, "/v1/completions", {"prompt": "second", "max_tokens": 4})
            wait_for(lambda: health(url)["waiting"] == 1)
            gone.close()
            wait_for(lambda: health(url)["waiting"] == 0, timeout=5)  # not when the worker reaches it
            waiting = pool.submit(ask, url, "third", True)  # the only live waiter: not a 429
            wait_for(lambda: health(url)["waiting"] == 1)
            release()
            assert running.result(timeout=60) and waiting.result(timeout=60)


def test_shutdown_answers_the_waiting_requests_with_503(model):
    with running_server(model) as server:
        url, worker = url_of(server), server.app.worker
        with model_held(model) as release, ThreadPoolExecutor(2) as pool:
            running = pool.submit(ask, url, "first", False)
            wait_for(lambda: health(url)["generating"])
            waiting = pool.submit(ask, url, "second", True)
            wait_for(lambda: health(url)["waiting"] == 1)
            worker.close(timeout=0)  # what server_close does on SIGTERM
            release()
            for future in (running, waiting):
                with pytest.raises(openai.InternalServerError) as info:
                    future.result(timeout=60)
                assert info.value.status_code == 503
                _assert_openai_error(info.value.response.json(), "shutting_down")
        with pytest.raises(openai.InternalServerError):
            ask(url, "third", stream=False)


def _received(sock: socket.socket) -> bytes:
    """What the server has sent on sock so far, without waiting for more."""
    data = b""
    sock.setblocking(False)
    try:
        while chunk := sock.recv(1 << 16):
            data += chunk
    except BlockingIOError:
        pass
    return data



def held_after_first_token(stream_ids, go_on: threading.Event):
    """stream_ids, held after its first token until go_on is set (at most 30 s)."""
    def held(*args, **kwargs):
        events = stream_ids(*args, **kwargs)
        try:
            for i, event in enumerate(events):
                if i == 1:
                    go_on.wait(30)
                yield event
        finally:
            events.close()
    return held

def test_server_close_returns_once_the_waiting_and_running_requests_have_their_answers(model, monkeypatch):
    # On SIGTERM serve.py runs server_close, then the process exits and takes the handler threads
    # with it: whatever they had not written yet was lost (a queued client got RemoteDisconnected,
    # a stream ended without [DONE]). Slow writes make the race certain here.
    go_on = threading.Event()
    held_after_the_first_token = held_after_first_token(model.stream_ids, go_on)

    def slowly(write):
        def slow(self, *args, **kwargs):
            if go_on.is_set():
                time.sleep(0.3)
            return write(self, *args, **kwargs)
        return slow

    monkeypatch.setattr(model, "stream_ids", held_after_the_first_token)
    monkeypatch.setattr(Handler, "_send_event", slowly(Handler._send_event))
    monkeypatch.setattr(Handler, "_send_json", slowly(Handler._send_json))
    server = PiServer(("127.0.0.1", 0), App(model, ServerConfig(MODEL_ID, LIMITS, KEY)))
    jobs = jobs_of(server)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = url_of(server)
    streamed = raw_request(url, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 64,
                                                    "temperature": 0, "stream": True})
    head = b""
    while b"data: " not in head:
        head += streamed.recv(1 << 16)
    waiting = raw_request(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
    wait_for(lambda: health(url)["waiting"] == 1)
    server.shutdown()
    # The generation goes on once server_close has cancelled it (and the writes turn slow), whenever that is.
    running = jobs[0]
    threading.Thread(target=lambda: (running._cancelled.wait(30), go_on.set()), daemon=True).start()
    server.server_close()
    thread.join(10)
    stream_text = (head + _received(streamed)).decode()
    assert stream_text.rstrip().endswith("data: [DONE]"), stream_text[-300:]
    assert '"code": "shutting_down"' in stream_text.rsplit("data: ", 2)[1]  # the error event, then [DONE]
    answer = _received(waiting)
    assert answer.startswith(b"HTTP/1.1 503"), answer
    _assert_openai_error(json.loads(answer.split(b"\r\n\r\n", 1)[1]), "shutting_down")
    streamed.close()
    waiting.close()


def test_a_wrong_method_is_a_405(base_url):
    request = urllib.request.Request(f"{base_url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code == 405 and info.value.headers["Allow"] == "POST"
    _assert_openai_error(json.load(info.value), "method_not_allowed")


def test_a_client_that_hangs_up_mid_stream_does_not_disturb_the_next(base_url):
    stream = client(base_url).chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "a long answer please"}], max_tokens=64,
        temperature=0, stream=True)
    next(iter(stream))
    stream.close()
    assert ask(base_url, "Tell me about the fox.", stream=False) == ask(base_url, "Tell me about the fox.", True)
    wait_for(lambda: not health(base_url)["generating"])


def test_a_client_that_hangs_up_before_its_answer_cancels_its_generation_or_its_place_in_line(model):
    prompt = {"prompt": "Once upon a time", "max_tokens": 64, "temperature": 0}  # greedy: 64 tokens, no stop
    with running_server(model) as server:
        url, jobs = url_of(server), jobs_of(server)
        with model_held(model) as release:
            whole = raw_request(url, "/v1/completions", prompt)  # not streamed: nothing is written until the end
            wait_for(lambda: health(url)["generating"])
            streamed = raw_request(url, "/v1/completions", {**prompt, "stream": True})
            wait_for(lambda: health(url)["waiting"] == 1)
            whole.close()
            streamed.close()
            # Both are noticed while the model is still held: the running job before its first token,
            # the waiting one before its prefill.
            wait_for(lambda: len(jobs) == 2 and all(job.cancelled for job in jobs), timeout=10)
            release()
        wait_for(lambda: health(url) | {"status": 0} == {"status": 0, "model": MODEL_ID, "generating": False,
                                                       "waiting": 0, "max_queue": LIMITS.max_queue})
        # The last generation was the first request's (the second never ran), and it stopped at once.
        assert model.last_stats.prompt_tokens == len(model.encode("Once upon a time"))
        assert model.last_stats.generated_tokens <= 2
        assert ask(url, "Tell me about the fox.", stream=False)  # and the server goes on


def test_a_streaming_client_that_hangs_up_is_not_an_error_and_gets_nothing_more(model, monkeypatch, caplog):
    # Only the write to the closed socket tells the server here (the check of the socket while
    # waiting is turned off), and the answer is held after its first token until the client is gone.
    monkeypatch.setattr(Handler, "_client_gone", lambda self: False, raising=False)
    go_on = threading.Event()
    held_after_the_first_token = held_after_first_token(model.stream_ids, go_on)

    monkeypatch.setattr(model, "stream_ids", held_after_the_first_token)
    with caplog.at_level("INFO", logger="pi_demo.serve"), running_server(model) as server:
        url, jobs = url_of(server), jobs_of(server)
        sock = raw_request(url, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 64,
                                                    "temperature": 0, "stream": True})
        head = b""
        while b"\r\n" not in head:
            head += sock.recv(64)
        assert head.startswith(b"HTTP/1.1 200")
        sock.close()  # with the rest of the answer unread
        go_on.set()
        wait_for(lambda: len(jobs) == 1 and jobs[0].cancelled and not health(url)["generating"])
        wait_for(lambda: "the client hung up" in caplog.text)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


@pytest.mark.parametrize("model_id", ["org/model", "my model"])  # a Hugging Face name; a space
def test_a_model_id_that_needs_percent_encoding_can_be_retrieved(model, model_id):
    with running_server(model, model_id=model_id) as server:
        c = client(url_of(server))
        assert [m.id for m in c.models.list().data] == [model_id]
        assert c.models.retrieve(model_id).id == model_id
        with pytest.raises(openai.NotFoundError):
            c.models.retrieve("org/other")


def test_head_is_get_without_a_body_and_other_methods_get_a_json_405(base_url):
    host, port = base_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)

    def call(method: str, path: str, body: bytes | None = None) -> tuple[http.client.HTTPResponse, bytes]:
        conn.request(method, path, body=body, headers={"Authorization": f"Bearer {KEY}"})
        response = conn.getresponse()
        return response, response.read()

    response, body = call("HEAD", "/health")
    assert response.status == 200 and body == b"" and response.headers["Content-Type"] == "application/json"
    assert int(response.headers["Content-Length"]) == len(json.dumps(health(base_url)).encode())
    response, body = call("HEAD", "/v1/models")
    assert response.status == 200 and body == b""
    for method, path, allow in [("OPTIONS", "/v1/chat/completions", "POST"), ("HEAD", "/v1/completions", "POST"),
                                ("DELETE", f"/v1/models/{MODEL_ID}", "GET, HEAD"), ("POST", "/health", "GET, HEAD"),
                                ("PUT", "/v1/models", "GET, HEAD")]:
        response, body = call(method, path, b"{}" if method == "PUT" else None)
        assert (response.status, response.headers["Allow"]) == (405, allow), (method, path)
        if method != "HEAD":
            _assert_openai_error(json.loads(body), "method_not_allowed")
    response, body = call("PATCH", "/nowhere", b"{}")
    assert response.status == 404
    _assert_openai_error(json.loads(body), "not_found")
    response, body = call("GET", "/health")  # the same connection: the refused bodies were read, not left in it
    assert response.status == 200 and json.loads(body)["status"] == "ok"
    conn.close()


def test_logit_bias_is_refused_and_vllms_top_k_of_minus_one_means_off(base_url):
    messages = [{"role": "user", "content": "hi"}]

    def parse(**body):
        return parse_chat({"messages": messages, **body}, MODEL_ID, LIMITS, 16)

    with pytest.raises(ApiError) as info:
        parse(logit_bias={"50": -100})
    assert (info.value.param, info.value.code) == ("logit_bias", "unsupported_parameter")
    assert parse(logit_bias={}).sampling == parse(logit_bias=None).sampling == {}
    assert parse(top_k=-1).sampling == parse(top_k=0).sampling == {"top_k": 0}
    with pytest.raises(ApiError) as info:
        parse(top_k=1.5)
    assert info.value.param == "top_k"
    c = client(base_url)
    with pytest.raises(openai.BadRequestError) as info:
        c.completions.create(model=MODEL_ID, prompt="The quick brown", max_tokens=4, logit_bias={"50": -100})
    _assert_openai_error(info.value.response.json(), "unsupported_parameter", "logit_bias")
    greedy = c.completions.create(model=MODEL_ID, prompt="The quick brown", max_tokens=8, temperature=0)
    assert c.completions.create(model=MODEL_ID, prompt="The quick brown", max_tokens=8, temperature=0,
                                extra_body={"top_k": -1}).choices[0].text == greedy.choices[0].text


def test_request_parsing_refuses_wrong_types_with_the_field_named():
    def param_of(body) -> str | None:
        with pytest.raises(ApiError) as info:
            parse_chat({"messages": [{"role": "user", "content": "hi"}], **body}, MODEL_ID, LIMITS, 16)
        return info.value.param

    assert param_of({"max_tokens": "5"}) == "max_tokens"
    assert param_of({"max_tokens": True}) == "max_tokens"  # JSON true is not 1
    assert param_of({"stop": [str(i) for i in range(17)]}) == "stop"
    assert param_of({"messages": [{"role": "robot", "content": "hi"}]}) == "messages[0].role"
    assert param_of({"stream_options": {"include_usage": True}}) == "stream_options"
    parts = [{"type": "text", "text": "Say"}, {"type": "text", "text": "hi"}]
    request = parse_chat({"messages": [{"role": "developer", "content": parts}], "seed": 1}, MODEL_ID, LIMITS, 16)
    assert request.prompt == [{"role": "system", "content": "Say\nhi"}] and request.sampling == {"seed": 1}
    with pytest.raises(ApiError) as info:  # a 400 naming the field, not "the model '123' does not exist"
        parse_chat({"messages": [{"role": "user", "content": "hi"}], "model": 123}, MODEL_ID, LIMITS, 16)
    assert (info.value.status, info.value.param) == (400, "model")
    assert request.max_tokens == 16


def _parse(kind: str = "chat", **body):
    if kind == "chat":
        return parse_chat({"messages": [{"role": "user", "content": "hi"}], **body}, MODEL_ID, LIMITS, 16)
    return parse_completion({"prompt": "hi", **body}, MODEL_ID, LIMITS, 16)


def _refused(kind: str = "chat", **body) -> ApiError:
    with pytest.raises(ApiError) as info:
        _parse(kind, **body)
    assert info.value.status == 400
    return info.value


def test_a_whole_number_float_is_taken_for_an_integer_field_and_a_fraction_or_bool_is_not():
    # vLLM's pydantic takes 40.0 for an int; JavaScript clients send numbers that way.
    request = _parse(top_k=40.0, max_tokens=5.0, seed=42.0)
    assert request.max_tokens == 5 and type(request.max_tokens) is int
    assert request.sampling == {"top_k": 40, "seed": 42} and all(type(v) is int for v in request.sampling.values())
    for field in ("top_k", "max_tokens", "seed"):
        for value in (40.5, True):
            error = _refused(**{field: value})
            assert error.param == field and "integer" in error.message, error.message


def test_llama_cpps_repeat_last_n_is_taken_and_below_minus_one_refused():
    assert _parse(repeat_last_n=64, repetition_penalty=1.1).sampling == {"repeat_last_n": 64,
                                                                        "repetition_penalty": 1.1}
    assert _parse(repeat_last_n=-1).sampling == {"repeat_last_n": -1}  # the whole history
    error = _refused(repeat_last_n=-2)
    assert error.param == "repeat_last_n" and "at least -1" in error.message, error.message


def test_a_number_too_large_for_a_float_is_refused_by_its_own_name():
    for field in ("temperature", "top_p", "min_p", "repetition_penalty"):
        error = _refused(**{field: float("inf")})  # what json.loads makes of 1e400
        assert error.param == field and "finite" in error.message, error.message


def test_any_int64_seed_is_taken_and_minus_one_means_no_seed():
    assert _parse(seed=-1).sampling == {}  # llama.cpp's "random"
    for seed in (-2, -(2**63), 2**63 - 1, 0):
        sampling = _parse(seed=seed).sampling
        assert sampling == {"seed": seed % 2**64} and _parse(seed=seed).sampling == sampling  # deterministic
    assert _parse(seed=-2).sampling != _parse(seed=2).sampling
    for seed in (2**63, -(2**63) - 1):
        assert _refused(seed=seed).param == "seed"


def test_a_negative_seed_samples_repeatably_end_to_end(base_url):
    c = client(base_url)

    def text(seed: int) -> str:
        return c.completions.create(model=MODEL_ID, prompt="Small models", max_tokens=12, temperature=1.5,
                                    seed=seed).choices[0].text

    assert text(-5) == text(-5)


def test_logprobs_are_read_as_each_api_asks_for_them():
    assert _parse("chat", logprobs=True).logprobs == 0
    assert _parse("chat", logprobs=True, top_logprobs=3).logprobs == 3
    assert _parse("chat", logprobs=False, top_logprobs=0).logprobs is None is _parse("chat").logprobs
    assert _parse("completion", logprobs=2).logprobs == 2
    assert _parse("completion", logprobs=0).logprobs == 0  # the sampled token's alone; 0 == False in Python
    assert _parse("completion", logprobs=False).logprobs is None
    assert _refused("chat", top_logprobs=2).param == "top_logprobs"  # as OpenAI: needs logprobs: true
    assert _refused("chat", logprobs=True, top_logprobs=21).param == "top_logprobs"
    assert _refused("chat", logprobs=0).param == "logprobs"  # chat's logprobs is a boolean
    assert _refused("completion", logprobs=-1).param == "logprobs"
    assert _refused("completion", top_logprobs=3).param == "top_logprobs"  # the chat API's; not ignored
    assert _refused("chat", n=True).param == "n"  # True == 1 is not n=1 either


def test_frequency_and_presence_penalties_are_taken_in_openais_range():
    assert _parse(frequency_penalty=0.5, presence_penalty=-1).sampling == {"frequency_penalty": 0.5,
                                                                          "presence_penalty": -1.0}
    assert _parse("completion", frequency_penalty=0).sampling == {"frequency_penalty": 0.0}
    for field in ("frequency_penalty", "presence_penalty"):
        error = _refused(**{field: 2.5})
        assert error.param == field and "between -2.0 and 2.0" in error.message, error.message


def _entry(model, token_id: int, logprob: float) -> dict:
    raw = model.token_text.bytes_of(token_id)
    return {"token": raw.decode("utf-8", errors="replace"), "logprob": pytest.approx(logprob, abs=1e-4),
            "bytes": list(raw)}


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_leave_out_the_tokens_a_stop_string_was_cut_from(base_url, stream):
    """As llama.cpp's server: the reply's logprobs are those of its text's tokens, not of the stop string's."""
    gbnf = 'root ::= " jumps over the lazy dog."'
    for path, body, text_of in (
            ("/v1/completions", {"prompt": "The quick brown fox", "logprobs": 0},
             lambda choice: choice.get("text", "")),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "logprobs": True},
             lambda choice: (choice.get("delta") or choice.get("message") or {}).get("content") or "")):
        body = {"model": MODEL_ID, "max_tokens": 16, "grammar": gbnf, "stop": [" lazy"], "stream": stream, **body}
        choices = ([event["choices"][0] for event in _sse_events(base_url, path, body)[:-1] if event.get("choices")]
                   if stream else [_raw_post(base_url, path, json.dumps(body).encode())[1]["choices"][0]])
        text = "".join(text_of(choice) for choice in choices)
        assert text.strip() == "jumps over the", (path, choices)
        logprobs = [choice["logprobs"] for choice in choices if choice.get("logprobs")]
        if path == "/v1/completions":
            tokens = [t for lp in logprobs for t in lp["tokens"]]
            offsets = [o for lp in logprobs for o in lp["text_offset"]]
            assert max(offsets) < len(text), (offsets, text)
        else:
            tokens = [entry["token"] for lp in logprobs for entry in lp["content"]]
        assert "".join(tokens) == text, (path, tokens, text)


def test_chat_logprobs_whole_and_streamed_are_the_runtimes_for_the_answers_tokens(base_url, model):
    messages = [{"role": "user", "content": "Tell me a story."}]
    body = {"model": MODEL_ID, "messages": messages, "max_tokens": 12, "temperature": 0, "logprobs": True,
            "top_logprobs": 2}
    expected = model.generate(messages, 12, temperature=0, logprobs=2)
    content = [{**_entry(model, s.token_id, s.logprob), "top_logprobs": [_entry(model, i, lp) for i, lp in s.top]}
               for s in expected.logprobs]
    whole = client(base_url).chat.completions.create(**body)
    choice = whole.choices[0]
    assert choice.message.content == expected.text and whole.usage.completion_tokens == len(content) == 12
    assert [entry.model_dump() for entry in choice.logprobs.content] == content
    events = _sse_events(base_url, "/v1/chat/completions", body)
    # A token that ends inside a character waits for the chunk that completes the character.
    streamed = [entry for event in events[:-1] for entry in ((event["choices"][0]["logprobs"] or {}).get("content")
                                                             or [])]
    assert streamed == content
    plain = client(base_url).chat.completions.create(**{**body, "logprobs": None, "top_logprobs": None})
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == expected.text


def _legacy_token(model, token_id: int) -> str:
    raw = model.token_text.bytes_of(token_id)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # a part of a character: its bytes, as OpenAI's legacy API writes them
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def test_completion_logprobs_hold_the_sampled_token_and_offsets_into_the_text(base_url, model):
    from nomoat.runtime.detokenizer import IncrementalDetokenizer

    prompt = "Small models run"
    plain = model.generate(prompt, 10, raw=True, temperature=0)
    # A stop string that begins like the third token's text and then never matches: the stream holds that
    # text back for a token, which must not move the tokens' offsets.
    stop = model.tokenizer.decode(plain.token_ids[2:3]) + "\u2603never"
    body = {"model": MODEL_ID, "prompt": prompt, "max_tokens": 10, "temperature": 0, "logprobs": 1, "stop": [stop]}
    events = list(model.stream(prompt, 10, raw=True, temperature=0, logprobs=1, stop=[stop]))
    assert any(event.text == "" for event in events[2:4])  # the premise: some text was held back
    tokens, logprobs, tops, offsets, length = [], [], [], [], 0
    detokenizer = IncrementalDetokenizer(model.tokenizer)
    for event in events:
        if event.logprob is not None:
            scored = event.logprob
            tokens.append(_legacy_token(model, scored.token_id))
            logprobs.append(pytest.approx(scored.logprob, abs=1e-4))
            # OpenAI's layout: the alternatives and the sampled token, text to logprob
            tops.append({_legacy_token(model, i): pytest.approx(lp, abs=1e-4)
                         for i, lp in (*scored.top, (scored.token_id, scored.logprob))})
            offsets.append(length)
            length += len(detokenizer.add(scored.token_id))
    choice = client(base_url).completions.create(**body).choices[0]
    assert choice.text == "".join(e.text for e in events) and len(tokens) == 10
    assert choice.logprobs.model_dump() == {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops,
                                            "text_offset": offsets}
    streamed = [event["choices"][0]["logprobs"] for event in _sse_events(base_url, "/v1/completions", body)[:-1]
                if event["choices"][0]["logprobs"]]
    for key in ("tokens", "token_logprobs", "text_offset"):
        assert sum((part[key] for part in streamed), []) == choice.logprobs.model_dump()[key]


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_nan_and_infinity_are_invalid_json(base_url, literal):
    body = b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": ' + literal + b"}"
    status, payload = _raw_post(base_url, "/v1/chat/completions", body)
    assert status == 400
    _assert_openai_error(payload, "invalid_json")
    assert literal.decode().lstrip("-") in payload["error"]["message"]


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a \udc80 b"}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]},
     "messages[0].content"),
    ("/v1/completions", {"prompt": "x\udfff"}, "prompt"),
    ("/v1/completions", {"prompt": "x", "stop": ["\ud83d"]}, "stop"),
])
def test_a_lone_surrogate_is_a_400_naming_the_field(base_url, path, body, param):
    status, payload = _raw_post(base_url, path, json.dumps({"model": MODEL_ID, "max_tokens": 2, **body}).encode())
    assert status == 400
    _assert_openai_error(payload, None, param)
    assert "surrogate" in payload["error"]["message"] and "Unicode" in payload["error"]["message"]


def _sse_events(base_url: str, path: str, body: dict) -> list:
    """The data lines of a streamed answer, parsed (the last one is "[DONE]")."""
    sock = raw_request(base_url, path, {"stream": True, **body})
    with sock, sock.makefile("rb") as f:
        response = http.client.HTTPResponse(sock)
        response.fp = f
        response.begin()
        text = response.read().decode()
    return [json.loads(line[6:]) if line[6:] != "[DONE]" else "[DONE]"
            for line in text.splitlines() if line.startswith("data: ")]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_with_include_usage_every_other_chunk_has_a_null_usage(base_url, path):
    body = ({"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"}) | {
        "max_tokens": 6, "temperature": 0}
    events = _sse_events(base_url, path, {**body, "stream_options": {"include_usage": True}})
    *chunks, last, done = events
    assert done == "[DONE]" and not last["choices"] and last["usage"]["completion_tokens"] > 0
    assert len(chunks) > 2 and all("usage" in c and c["usage"] is None for c in chunks)  # as OpenAI's docs say
    assert all("usage" not in c for c in _sse_events(base_url, path, body)[:-1])  # without it: no usage field


# -- the command line ---------------------------------------------------------------------------------


def test_serve_command_binds_loopback_takes_the_key_from_the_environment_and_stops_on_sigterm(bundle):
    env = {**os.environ, "NOMOAT_API_KEY": "from-env",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "pi_demo", "serve", str(bundle), "--port", "0", "--model-id", MODEL_ID,
           "--prompt-lookup", "4", "--ort-options", "session.intra_op.allow_spinning=0", "--no-cache-prompt"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = ""
        while "serving" not in line:
            line = proc.stderr.readline()
            assert line, "the server exited before serving"
        assert "greedy requests draft up to 4 tokens by prompt lookup" in line
        assert "prompts run from an empty cache unless a request says cache_prompt" in line
        url = line.split(" on ")[1].split("/v1")[0]
        assert url.startswith("http://127.0.0.1:")
        assert ask_with_key(url, "from-env")
        again = client(url, "from-env").chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0)
        assert again.usage.prompt_tokens_details.cached_tokens == 0  # --no-cache-prompt
        with pytest.raises(openai.AuthenticationError):
            ask_with_key(url, KEY)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert "stopped" in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


def ask_with_key(url: str, key: str) -> str:
    return client(url, key).chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}],
                                                    max_tokens=4, temperature=0).choices[0].message.content


def test_help_says_each_default_once(capsys):
    from pi_demo.__main__ import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--prompt-lookup N" in text and "(default: 0)" in text
    assert re.search(r"\(default[^)]*\) \(default", text) is None, text


def test_threads_below_one_is_a_usage_error_before_the_model_loads(capsys):
    from pi_demo.__main__ import main

    # 0 would quietly mean ONNX Runtime's default (all cores), as in `nomoat generate`
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "/nonexistent-bundle", "--threads", "0"])
    assert exit_info.value.code == 2
    assert "'0' is not a number of threads: give 1 or more" in capsys.readouterr().err


@pytest.mark.parametrize("port", ["70000", "-1", "http"])
def test_a_port_outside_0_to_65535_is_a_usage_error_before_the_model_loads(port, capsys):
    from pi_demo.__main__ import main

    with pytest.raises(SystemExit) as exit_info:  # was an OverflowError's traceback, after the load
        main(["serve", "/nonexistent-bundle", "--port", port])
    assert exit_info.value.code == 2
    assert f"{port!r} is not a TCP port: give 0 to 65535" in capsys.readouterr().err


def test_a_port_in_use_is_said_before_the_model_loads(capsys):
    """On a Pi the load takes seconds, and systemd repeats it at every restart: the port comes first."""
    from pi_demo.__main__ import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "/nonexistent-bundle", "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert err == f"pi_demo serve: error: cannot listen on 127.0.0.1:{port}: Address already in use\n", err


@pytest.mark.parametrize("host", ["\u00e9" * 64, "a..b\u00e9"])  # idna refuses a label over 63 characters, or empty
def test_a_host_name_the_socket_module_cannot_encode_is_a_usage_error(host, capsys):
    from pi_demo.__main__ import main

    with pytest.raises(SystemExit) as exit_info:  # was bind()'s TypeError traceback
        main(["serve", "/nonexistent-bundle", "--host", host])
    assert exit_info.value.code == 2
    assert f"{host!r} is not a valid host name" in capsys.readouterr().err


@contextmanager
def serve_main_with_a_slow_load(bundle, monkeypatch, argv: list[str]) -> Iterator[tuple[dict, threading.Event]]:
    """`python -m pi_demo serve` in this (main) thread, as the command runs it, with Model.load held
    until the yielded event is set. The body of the with-block runs in a second thread (a client): it
    gets {"server": the PiServer, "exit": main's return value once it returns}."""
    from nomoat.runtime import Model

    from pi_demo.__main__ import main

    release, made, state = threading.Event(), threading.Event(), {}
    real_load, real_init = Model.load, PiServer.__init__

    def held_load(*args, **kwargs):
        assert release.wait(60), "the test never released the load"
        return real_load(*args, **kwargs)

    def recorded_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        state["server"] = self
        made.set()

    monkeypatch.setattr(Model, "load", held_load)
    monkeypatch.setattr(PiServer, "__init__", recorded_init)
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    # Ctrl-C raising KeyboardInterrupt, as in a terminal, whatever the run inherited (a run started in the
    # background by a shell without job control ignores SIGINT, and interrupt_main then does nothing).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield state, release, made
        state["exit"] = main(["serve", str(bundle), "--port", "0", "--threads", "1", *argv])
    finally:
        release.set()
        for signum, handler in saved.items():  # serve's SIGTERM handler, which stops its server, included
            signal.signal(signum, handler)


def _json_exchange(url: str, method: str, path: str, body: dict | None = None, key: str | None = None):
    status, headers, data = _response(url, method, path, {"Authorization": f"Bearer {key}"} if key else {},
                                      None if body is None else json.dumps(body).encode())
    return status, headers, json.loads(data)


def test_while_the_model_loads_requests_get_a_503_to_retry_then_answers(bundle, monkeypatch):
    """As llama.cpp's server: the port answers at once (a health check, a chat UI), not a connection that hangs
    for the seconds of a load on a Pi; OpenAI's clients retry a 503 after Retry-After by themselves."""
    seen: dict[str, object] = {}

    def client_side(state, release, made):
        assert made.wait(30)
        server = state["server"]
        url = url_of(server)
        seen["health"] = _json_exchange(url, "GET", "/health")
        seen["chat"] = _json_exchange(url, "POST", "/v1/chat/completions", {
            "model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        seen["models"] = _json_exchange(url, "GET", "/v1/models", key=KEY)
        seen["loading"] = server.app.loading
        release.set()
        retrying = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=5, timeout=60)
        seen["answer"] = retrying.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0)
        seen["health after"] = _json_exchange(url, "GET", "/health")
        server.shutdown()

    with serve_main_with_a_slow_load(bundle, monkeypatch, ["--model-id", MODEL_ID, "--api-key", KEY]) as (
            state, release, made):
        worker = threading.Thread(target=client_side, args=(state, release, made), daemon=True)
        worker.start()
    worker.join(60)
    assert state["exit"] == 0
    assert seen["loading"] is True
    for name in ("health", "chat"):  # before the key check, as llama.cpp's: it tells nothing
        status, headers, body = seen[name]
        assert status == 503 and headers["retry-after"] == "1", (name, status, headers)
        assert body["error"]["code"] == "model_loading" and body["error"]["type"] == "unavailable_error"
    status, _, body = seen["models"]  # the model's name is known before its weights
    assert status == 200 and body["data"][0]["id"] == MODEL_ID
    assert seen["answer"].usage.completion_tokens > 0
    assert seen["health after"][0] == 200 and seen["health after"][2]["status"] == "ok"


def test_a_stop_while_the_model_loads_attaches_nothing_and_ctrl_c_is_130(bundle, monkeypatch):
    import _thread

    def client_side(state, release, made):
        assert made.wait(30)
        _thread.interrupt_main()  # Ctrl-C, delivered to the main thread that serves

    with serve_main_with_a_slow_load(bundle, monkeypatch, []) as (state, release, made):
        threading.Thread(target=client_side, args=(state, release, made), daemon=True).start()
    server = state["server"]
    assert state["exit"] == 128 + signal.SIGINT
    assert not server.app.attach(object())  # a load finishing after the stop starts no worker
    assert server.app.loading


def test_a_bundle_that_fails_to_load_is_said_once_the_server_stops(tmp_path, capsys):
    from pi_demo.__main__ import main

    handler = signal.getsignal(signal.SIGTERM)
    assert main(["serve", str(tmp_path / "missing"), "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pi_demo serve: error: ") and "missing" in err and "Traceback" not in err, err
    assert signal.getsignal(signal.SIGTERM) is handler  # serve's, which stops its server, does not outlive it


def test_listening_on_every_interface_without_a_key_names_the_address(bundle, monkeypatch, caplog):
    from pi_demo.__main__ import main
    from pi_demo.server import PiServer

    monkeypatch.delenv("NOMOAT_API_KEY", raising=False)
    monkeypatch.setattr(PiServer, "serve_forever", lambda self: None)  # started, then stopped at once
    handler = signal.getsignal(signal.SIGTERM)
    try:
        with caplog.at_level("INFO", logger="pi_demo.serve"):
            assert main(["serve", str(bundle), "--host", "", "--port", "0", "--threads", "1"]) == 0
    finally:
        signal.signal(signal.SIGTERM, handler)  # serve's, which stops its server, would outlive the test
    assert "listening on 0.0.0.0 (every IPv4 interface) without an API key" in caplog.text, caplog.text


def test_ctrl_c_while_onnxruntime_imports_stops_serve_with_130(bundle, monkeypatch, capsys):
    from nomoat.runtime import Model

    from pi_demo.__main__ import main

    def interrupted_import(*args, **kwargs):  # pybind11 turns Ctrl-C in a module's init into this
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            raise ImportError("initialization failed") from e

    monkeypatch.setattr(Model, "load", interrupted_import)
    assert main(["serve", str(bundle), "--port", "0"]) == 128 + signal.SIGINT
    assert capsys.readouterr().err == "\n"


def test_the_service_gives_up_after_repeated_failures():
    """Restart=on-failure alone restarts a service whose bundle is missing every 5 s for ever."""
    import configparser

    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read_string((REPO / "pi_demo" / "nomoat.service").read_text())
    assert unit["Service"]["Restart"] == "on-failure"
    interval, burst = int(unit["Unit"]["StartLimitIntervalSec"]), int(unit["Unit"]["StartLimitBurst"])
    assert burst * int(unit["Service"]["RestartSec"]) < interval  # quick failures do reach the limit
    # ... and slow ones: a start that fails after a minute of checksums, as a large bundle's on a Pi 4's SD card
    assert burst * (int(unit["Service"]["RestartSec"]) + 60) < interval
