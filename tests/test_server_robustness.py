"""pi_demo serve: what a review found. Bad input gets an error body, never a dropped connection; a
large max_tokens is cut to the cap; more stop strings; IPv6 hosts; a full line refused before the work."""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import socket
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # pi_demo is a folder copied to the Pi, not installed

from test_pi_server import (  # noqa: E402  (skips this file too when OpenAI's client is not installed)
    KEY,
    LIMITS,
    MODEL_ID,
    _assert_openai_error,
    _raw_post,
    ask,
    client,
    health,
    jobs_of,
    model_held,
    raw_request,
    running_server,
    url_of,
    wait_for,
)

from pi_demo.openai_api import MAX_STOP_STRINGS, ApiError, Limits, Reply, parse_chat, parse_completion  # noqa: E402
from pi_demo.serve import host_port  # noqa: E402
from pi_demo.server import App, Handler, PiServer, ServerConfig  # noqa: E402

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from tiny_models import tiny_fp32_bundle

    return tiny_fp32_bundle(tmp_path_factory, max_context=256)


@pytest.fixture(scope="module")
def model(bundle):
    from nomoat.runtime import Model

    return Model.load(bundle, threads=1)


@pytest.fixture(scope="module")
def base_url(model) -> Iterator[str]:
    with running_server(model) as server:
        yield url_of(server)


def _refused(body: dict, parse=parse_chat) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse({**(CHAT if parse is parse_chat else {"prompt": "hi"}), **body}, MODEL_ID, LIMITS, 16)
    assert info.value.status == 400
    return info.value


def _exchange(base_url: str, head: str, body: bytes = b"") -> tuple[int, dict[str, str], dict]:
    """Send a request written by hand (headers http.client would not write); the status, headers and JSON
    body of the answer. A connection dropped without one fails the test here."""
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock, sock.makefile("rb") as f:
        sock.sendall(head.encode("latin-1") + b"\r\n\r\n" + body)
        response = http.client.HTTPResponse(sock)
        response.fp = f
        try:
            response.begin()
        except http.client.RemoteDisconnected:
            pytest.fail("the server closed the connection without an answer")
        return response.status, dict(response.getheaders()), json.loads(response.read() or b"{}")


# -- bad input is a 4xx with OpenAI's error body -------------------------------------------------------


@pytest.mark.parametrize("role", [["user"], {"name": "user"}])
def test_a_role_of_the_wrong_type_is_a_400_naming_it(base_url, role):
    assert _refused({"messages": [{"role": role, "content": "hi"}]}).param == "messages[0].role"
    body = json.dumps({"model": MODEL_ID, "messages": [{"role": role, "content": "hi"}]}).encode()
    status, payload = _raw_post(base_url, "/v1/chat/completions", body)
    assert status == 400
    _assert_openai_error(payload, None, "messages[0].role")


def test_an_integer_too_large_for_a_float_is_a_400_naming_its_field():
    for field in ("temperature", "top_p", "repetition_penalty"):
        error = _refused({field: 10**400})  # valid JSON; float() of it raises OverflowError
        assert error.param == field and "finite" in error.message, error.message


def test_deeply_nested_json_is_invalid_json(base_url):
    body = b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    status, payload = _raw_post(base_url, "/v1/chat/completions", body)
    assert status == 400
    _assert_openai_error(payload, "invalid_json")
    assert "deep" in payload["error"]["message"]


@pytest.mark.parametrize("length", ["\u00b2", "9" * 5000])  # str.isdigit says yes to both; int() refuses them
def test_a_content_length_int_cannot_read_is_a_400(base_url, length):
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}")
    status, headers, payload = _exchange(base_url, head)
    assert status == 400 and headers["Connection"] == "close"
    _assert_openai_error(payload, None)
    assert "Content-Length" in payload["error"]["message"]


def _chat_head(*lengths: str) -> str:
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json" + "".join(f"\r\nContent-Length: {n}" for n in lengths))


def test_content_lengths_that_disagree_are_a_400_and_close(base_url):
    # RFC 9112 6.3: behind a proxy that takes the other one, the rest of the body would be read as a
    # request of its own (request smuggling). Repeats of one value are one length (RFC 9110 8.6).
    body = json.dumps({**CHAT, "max_tokens": 1}).encode()
    status, headers, payload = _exchange(base_url, _chat_head(str(len(body)), str(len(body) + 24)), body)
    assert status == 400 and headers["Connection"] == "close"
    _assert_openai_error(payload, None)
    assert "Content-Length" in payload["error"]["message"] and "disagree" in payload["error"]["message"]
    status, _, payload = _exchange(base_url, _chat_head(str(len(body)), f"{len(body)} "), body)
    assert status == 200 and payload["choices"], payload


def test_a_content_length_list_is_one_length_when_its_values_agree(base_url):
    # RFC 9110 8.6: "Content-Length: 42, 42" (a proxy folding two headers into one) is a length of 42;
    # "42, 66" disagrees with itself, as two headers would.
    body = json.dumps({**CHAT, "max_tokens": 1}).encode()
    status, _, payload = _exchange(base_url, _chat_head(f"{len(body)}, {len(body)}"), body)
    assert status == 200 and payload["choices"], payload
    status, headers, payload = _exchange(base_url, _chat_head(f"{len(body)},{len(body) + 24}"), body)
    assert status == 400 and headers["Connection"] == "close"
    assert "disagree" in payload["error"]["message"]


@pytest.mark.parametrize("pad", [" ", "\t", " \t "])
def test_whitespace_after_a_content_length_is_not_part_of_it(base_url, pad):
    # RFC 9110 5.5: the whitespace around a field's value is not part of it (the parser drops the leading one).
    body = json.dumps({**CHAT, "max_tokens": 1}).encode()
    status, _, payload = _exchange(base_url, _chat_head(f"{len(body)}{pad}"), body)
    assert status == 200 and payload["choices"], payload


def test_a_get_with_an_unreadable_content_length_is_answered(base_url):
    # The answer drops a body it does not read; an unreadable length says how much there is to drop.
    status, headers, payload = _exchange(base_url, "GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: \u00b2")
    assert status == 200 and payload["status"] == "ok" and headers["Connection"] == "close"


def test_a_request_target_urlsplit_cannot_read_is_a_400(base_url):
    status, _, payload = _exchange(base_url, "GET http://[x/health HTTP/1.1\r\nHost: x")
    assert status == 400
    _assert_openai_error(payload, None)


# -- a bug is a 500, logged once ---------------------------------------------------------------------


@pytest.fixture
def bug_server(model, monkeypatch, caplog) -> Iterator[tuple[PiServer, list]]:
    """A server of its own; yields it and the calls to its handle_error (socketserver's traceback printer)."""
    caplog.set_level(logging.INFO, logger="pi_demo.serve")
    with running_server(model) as server:
        handled: list = []
        monkeypatch.setattr(server, "handle_error", lambda request, address: handled.append(address))
        yield server, handled


def _tracebacks(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.exc_info]


def test_an_unexpected_error_is_a_500_with_openais_body_and_one_logged_traceback(bug_server, caplog):
    server, handled = bug_server

    def broken(request):
        raise RuntimeError("a bug in prepare")

    server.app.prepare = broken
    status, payload = _raw_post(url_of(server), "/v1/chat/completions", json.dumps(CHAT).encode())
    assert status == 500
    _assert_openai_error(payload, "internal_error")
    assert payload["error"]["type"] == "server_error"
    assert [str(r.exc_info[1]) for r in _tracebacks(caplog)] == ["a bug in prepare"] and handled == []
    assert health(url_of(server))["status"] == "ok"  # the server goes on


def test_an_error_after_the_status_line_only_closes_the_connection(bug_server, caplog, monkeypatch):
    server, handled = bug_server

    def broken(self):
        raise RuntimeError("a bug in the stream")

    monkeypatch.setattr(Reply, "first_chunk", broken)  # runs after the 200 went out
    body = json.dumps({**CHAT, "stream": True, "max_tokens": 2}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Length: {len(body)}")
    host, port = url_of(server).removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head.encode() + b"\r\n\r\n" + body)
        received = b"".join(iter(lambda: sock.recv(1 << 16), b""))  # to the close
    assert received.startswith(b"HTTP/1.1 200") and received.count(b"HTTP/1.1") == 1
    assert [str(r.exc_info[1]) for r in _tracebacks(caplog)] == ["a bug in the stream"] and handled == []


def test_a_client_gone_while_its_error_is_sent_logs_no_traceback(bug_server, caplog, monkeypatch):
    server, handled = bug_server

    def hung_up(self, status, body, headers=None):
        raise BrokenPipeError("the client hung up")

    monkeypatch.setattr(Handler, "_send_json", hung_up)
    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=30) as sock:
        sock.sendall(b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")  # a 404, whose sending fails
        assert sock.recv(1) == b""  # closed after the handler is done (socketserver's handle_error included)
    assert handled == [] and _tracebacks(caplog) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="only Linux's POLLRDHUP tells a hang-up behind unread bytes")
def test_a_client_that_sent_more_than_its_body_and_hung_up_is_noticed(model):
    """A keep-alive client's next request (or any byte past its body) unread in the socket: its hang-up still
    cancels its generation, or its place in line, at once, and the model is not held up for it."""
    prompt = {"prompt": "Once upon a time", "max_tokens": 64, "temperature": 0}  # greedy: 64 tokens, no stop
    with running_server(model) as server:
        url, jobs = url_of(server), jobs_of(server)
        with model_held(model) as release:
            whole = raw_request(url, "/v1/completions", prompt)
            wait_for(lambda: health(url)["generating"])
            streamed = raw_request(url, "/v1/completions", {**prompt, "stream": True})
            wait_for(lambda: health(url)["waiting"] == 1)
            for sock in (whole, streamed):  # sent once each body is read: the bytes wait in the socket
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                sock.close()
            # Both noticed while the model is still held: neither waits for the worker to reach it.
            wait_for(lambda: len(jobs) == 2 and all(job.cancelled for job in jobs), timeout=10)
            release()
        wait_for(lambda: not health(url)["generating"] and health(url)["waiting"] == 0)
        assert model.last_stats.generated_tokens <= 2  # the first stopped at once; the second never ran


# -- limits ------------------------------------------------------------------------------------------


def test_max_tokens_over_the_cap_is_cut_to_it_and_below_one_is_refused():
    over = LIMITS.max_tokens * 100
    assert parse_chat({**CHAT, "max_tokens": over}, MODEL_ID, LIMITS, 16).max_tokens == LIMITS.max_tokens
    assert parse_chat({**CHAT, "max_completion_tokens": over}, MODEL_ID, LIMITS, 16).max_tokens == LIMITS.max_tokens
    assert parse_completion({"prompt": "hi", "max_tokens": over}, MODEL_ID, LIMITS, 16).max_tokens == LIMITS.max_tokens
    assert parse_chat({**CHAT, "max_tokens": 5}, MODEL_ID, LIMITS, 16).max_tokens == 5
    for value in (0, -1):  # OpenAI refuses 0 too
        error = _refused({"max_tokens": value})
        assert error.param == "max_tokens" and "at least 1" in error.message


def test_a_large_max_tokens_answers_up_to_the_cap_with_finish_reason_length(model):
    cap = 4
    with running_server(model, Limits(max_tokens=cap, max_body_bytes=16 << 10, max_queue=8)) as server:
        # greedy, this prompt runs 64 tokens without a stop (see test_pi_server)
        r = client(url_of(server)).completions.create(model=MODEL_ID, prompt="Once upon a time", max_tokens=100_000,
                                                      temperature=0)
    assert r.usage.completion_tokens == cap and r.choices[0].finish_reason == "length"


def test_up_to_sixteen_stop_strings_are_taken_and_more_refused_naming_the_limit():
    stops = [f"stop{i}" for i in range(MAX_STOP_STRINGS)]
    assert MAX_STOP_STRINGS == 16
    assert parse_chat({**CHAT, "stop": stops}, MODEL_ID, LIMITS, 16).stop == stops
    error = _refused({"stop": [*stops, "one more"]})
    assert error.param == "stop" and "16" in error.message, error.message


def test_include_usage_of_the_wrong_type_is_a_400_naming_it():
    def include_usage(value) -> bool:
        return parse_chat({**CHAT, "stream": True, "stream_options": {"include_usage": value}}, MODEL_ID, LIMITS,
                          16).include_usage

    assert include_usage(True) is True and include_usage(False) is False and include_usage(None) is False
    for value in ("false", 1, {}):
        error = _refused({"stream": True, "stream_options": {"include_usage": value}})
        assert error.param == "stream_options.include_usage" and "boolean" in error.message, error.message


def test_function_call_is_refused_as_functions_is():
    for value in ("auto", {"name": "f"}, "None"):
        error = _refused({"function_call": value})
        assert error.param == "function_call" and error.code == "unsupported_parameter"
    for value in (None, "none"):  # no function called: tool_choice "none" likewise
        assert parse_chat({**CHAT, "function_call": value}, MODEL_ID, LIMITS, 16).kind == "chat"


def test_a_full_line_is_refused_before_the_request_is_prepared(model):
    with running_server(model, Limits(max_tokens=64, max_body_bytes=16 << 10, max_queue=1)) as server:
        url, app = url_of(server), server.app
        prepared: list = []
        prepare = app.prepare
        app.prepare = lambda request: (prepared.append(request), prepare(request))[1]
        with model_held(model) as release, ThreadPoolExecutor(2) as pool:
            running = pool.submit(ask, url, "first", False)
            wait_for(lambda: health(url)["generating"])
            waiting = pool.submit(ask, url, "second", False)
            wait_for(lambda: health(url)["waiting"] == 1)
            status, payload = _raw_post(url, "/v1/chat/completions", json.dumps(CHAT).encode())
            release()
            assert running.result(timeout=60) and waiting.result(timeout=60)
    assert status == 429
    _assert_openai_error(payload, "rate_limit_exceeded")
    assert len(prepared) == 2  # the first two; the third was refused without tokenizing


# -- IPv6 --------------------------------------------------------------------------------------------


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback (::1) on this machine")


@needs_ipv6
def test_the_server_listens_on_ipv6_loopback(model):
    server = PiServer(("::1", 0), App(model, ServerConfig(MODEL_ID, LIMITS)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        conn = http.client.HTTPConnection("::1", server.server_address[1], timeout=30)
        conn.request("GET", "/health")
        response = conn.getresponse()
        assert response.status == 200 and json.loads(response.read())["model"] == MODEL_ID
        conn.close()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@needs_ipv6
def test_ipv6_any_takes_ipv4_clients_too(model):
    server = PiServer(("::", 0), App(model, ServerConfig(MODEL_ID, LIMITS)))
    try:
        assert server.socket.family == socket.AF_INET6
        with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10):
            pass  # the listen backlog takes it: the socket is bound for IPv4 too
    finally:
        server.server_close()


def test_an_ipv6_host_is_written_in_brackets_in_urls():
    assert host_port("::1", 8000) == "[::1]:8000"
    assert host_port("127.0.0.1", 8000) == "127.0.0.1:8000"


# -- connections are capped: a thread each --------------------------------------------------------------


def _health_answered(port: int, within: float) -> bool:
    """Whether GET /health is answered within so many seconds (a connection over the cap waits unaccepted)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=within)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except TimeoutError:
        return False
    finally:
        conn.close()


def test_connections_past_the_cap_wait_until_one_closes(model):
    with running_server(model, Limits(16, 1 << 20, 4, max_connections=2)) as server:
        port = server.server_address[1]
        idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
        try:
            assert not _health_answered(port, within=1.5)  # both slots held by clients that send nothing
            idle.pop().close()
            assert _health_answered(port, within=10)
        finally:
            for sock in idle:
                sock.close()


class _WatchedSlots:
    """The server's connection slots, telling the test once a connection has been accepted and is
    waiting for a slot: only then can shutdown hang on it. Before that the connection sits in the
    listen backlog, which server_close resets, and the test would prove nothing."""

    def __init__(self, slots: threading.BoundedSemaphore):
        self._slots = slots
        self.waited = threading.Event()

    def acquire(self, timeout: float) -> bool:
        got = self._slots.acquire(timeout=timeout)
        if not got:
            self.waited.set()
        return got

    def release(self) -> None:
        self._slots.release()


def test_shutdown_is_prompt_with_a_connection_waiting_past_the_cap(model):
    server = PiServer(("127.0.0.1", 0), App(model, ServerConfig(MODEL_ID, Limits(16, 1 << 20, 4, max_connections=1))))
    slots = server._connection_slots = _WatchedSlots(server._connection_slots)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    held = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    held.request("GET", "/health")
    held.getresponse().read()  # answered, and kept alive: its thread holds the one slot
    waiting = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        assert slots.waited.wait(10), "the server never took the second connection off the backlog"
        stopper = threading.Thread(target=server.shutdown, daemon=True)
        stopper.start()
        stopper.join(5)
        assert not stopper.is_alive(), "shutdown hung on the connection waiting for a slot"
        assert waiting.recv(1) == b""  # closed, not left hanging
    finally:
        held.close()
        waiting.close()
        server.server_close()
        thread.join(10)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/no-such-route"])  # read, or read to be dropped
def test_stopping_does_not_wait_for_a_client_stalled_mid_body(model, path):
    """SIGTERM with a client that sent its headers and half its body: the server stops at once, as with an
    idle connection; it waits only for answers it has to write."""
    server = PiServer(("127.0.0.1", 0), App(model, ServerConfig(MODEL_ID, Limits(16, 1 << 20, 4))))
    parsed = threading.Event()
    real_answering = server.app.answering

    @contextlib.contextmanager
    def answering():
        with real_answering():
            parsed.set()  # its headers are read: the handler now works on this request
            yield

    server.app.answering = answering
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    stalled = socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10)
    try:
        stalled.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        "Content-Length: 100\r\n\r\n{\"model\": ".encode())
        assert parsed.wait(10), "the server never started on the request"
        began = time.monotonic()
        server.shutdown()
        server.server_close()
        took = time.monotonic() - began
        assert took < 5, f"stopping waited {took:.1f} s for a client that never finished its body"
    finally:
        stalled.close()
        thread.join(10)


def test_max_connections_below_one_is_refused(bundle, capsys):
    from pi_demo.__main__ import main

    assert main(["serve", str(bundle), "--max-connections", "0"]) == 1
    assert "--max-connections must be at least 1" in capsys.readouterr().err
