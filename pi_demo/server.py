"""OpenAI's routes on the standard library's ThreadingHTTPServer.

The standard library because it comes with Python on every Pi (nothing to build, nothing to
keep patched) and because the handler threads do little: they parse, tokenize, check limits
and wait for the Worker, which does the one thing that costs (see worker.py).

Routes: POST /v1/chat/completions, POST /v1/completions (both with `stream: true` as
server-sent events), GET /v1/models, GET /v1/models/{id}, GET /health (no key needed); HEAD
wherever GET goes. Any other method is a 405 (or a 404 off the routes) with OpenAI's error body.
While the model loads, every route but /v1/models answers 503 "loading" with Retry-After, as
llama.cpp's server does (OpenAI's clients retry it by themselves).
"""

from __future__ import annotations

import hmac
import json
import logging
import select
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from email.message import Message
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import chain
from typing import Any
from urllib.parse import unquote, urlsplit

from jinja2 import TemplateError
from nomoat.runtime import ContextOverflowError, Grammar, Model, StreamEvent
from nomoat.runtime.cli_generate import drafts_note
from nomoat.runtime.detokenizer import IncrementalDetokenizer
from nomoat.runtime.structured import StructuredOutputUnavailable

from .openai_api import (
    ApiError,
    GenerationRequest,
    Limits,
    Reply,
    bad_request,
    chat_logprobs,
    completion_logprobs,
    parse_chat,
    parse_completion,
    usage,
)
from .worker import Cancelled, ClientGone, Job, QueueFull, ShuttingDown, Worker

log = logging.getLogger("pi_demo.serve")

ROUTES = {"/health": "GET, HEAD", "/v1/models": "GET, HEAD", "/v1/chat/completions": "POST",
          "/v1/completions": "POST"}  # path -> the methods it takes (the Allow header of a 405)
DRAIN_LIMIT = 16 << 20  # a refused body up to this size is read and dropped, so the client sees our error
CLOSE_WAIT = 10.0  # seconds shutdown waits for the worker, then as long again for the answers to be written


@dataclass(frozen=True)
class ServerConfig:
    model_id: str
    limits: Limits = field(default_factory=Limits)
    api_key: str | None = None
    prompt_lookup: int = 0  # most drafted tokens per pass for greedy requests; 0 = off
    cache_prompt: bool = True  # a request's default for llama.cpp's "cache_prompt" (--no-cache-prompt: False)
    # --cors-origin: the web origin ("*": any) whose pages may call the API from a browser; None: no
    # page may (a browser's preflight gets 405, as without CORS). Off by default: with "*" and no
    # API key any page a user visits could use the model.
    cors_origin: str | None = None


class App:
    """What every request needs, shared by the handler threads. Made without a model (None) while it
    loads: the port is open and answers at once, then attach() hands it the model."""

    def __init__(self, model: Model | None, config: ServerConfig):
        self.config = config
        self.model: Model | None = None
        self.worker: Worker | None = None
        self._attaching = threading.Lock()
        self._closed = False
        self.created = int(time.time())
        # A chat that leaves max_tokens out runs until a stop, the server's cap or the context's end,
        # as OpenAI's API and llama.cpp's (n_predict -1) do, not to the bundle's max_new_tokens (256):
        # generation stops at a full context by itself. /v1/completions keeps OpenAI's 16 (parse_completion).
        self.default_max_tokens = config.limits.max_tokens
        self._answering = 0  # requests between their parse and their last byte written
        self._answered = threading.Condition()
        if model is not None:
            self.attach(model)

    @property
    def loading(self) -> bool:
        return self.worker is None

    def attach(self, model: Model) -> bool:
        """Answer with model from now on. False, and nothing started, if the server closed meanwhile
        (stopped while the model loaded)."""
        with self._attaching:
            if self._closed:
                return False
            self.model = model
            self.worker = Worker(model, self.config.limits.max_queue)
            return True

    def close(self, timeout: float) -> bool:
        """Cancel the running and waiting jobs and wait (bounded) until their clients have their answers;
        a model that finishes loading after this is not attached. False if answers are still unwritten."""
        with self._attaching:
            self._closed = True
        if self.worker is not None:
            self.worker.close(timeout=timeout)
        return self.wait_answered(timeout)

    @contextmanager
    def answering(self) -> Iterator[None]:
        """Count a request while its handler works on it, so shutdown can wait for its answer."""
        with self._answered:
            self._answering += 1
        try:
            yield
        finally:
            with self._answered:
                self._answering -= 1
                self._answered.notify_all()

    @contextmanager
    def waiting_on_client(self) -> Iterator[None]:
        """Within answering(): leave the request out of the count while it waits for its client's
        bytes (a body sent slowly, or never finished). Shutdown waits for answers to be written, not
        for a client to finish sending: a stalled body would hold a SIGTERM for CLOSE_WAIT. The price: a
        body still arriving when shutdown looks loses its 503 with the process, as an idle connection does."""
        with self._answered:
            self._answering -= 1
            self._answered.notify_all()
        try:
            yield
        finally:
            with self._answered:
                self._answering += 1

    def wait_answered(self, timeout: float) -> bool:
        """Wait until no request is being answered; False if some still are after timeout seconds."""
        with self._answered:
            return self._answered.wait_for(lambda: self._answering == 0, timeout)

    def prepare(self, request: GenerationRequest) -> Job:
        """Tokenize and check in the caller's thread, so a bad request is refused before it waits in line."""
        model = self.model
        param = "messages" if request.kind == "chat" else "prompt"
        try:
            ids = model.prompt_ids(request.prompt, raw=request.kind == "completion")
            params = model.sampling_params(**request.sampling)
        except (ValueError, TypeError, TemplateError) as e:  # the chat template's own checks raise TemplateError
            raise bad_request(str(e), param) from e
        if len(ids) >= model.max_context:
            # Not "prompt and answer together": the last answer token never enters the cache, so usage can
            # say one more than the context.
            raise bad_request(f"the prompt is {len(ids)} tokens; this model's context holds {model.max_context}, "
                              f"with room needed for an answer (at most {model.max_context - 1} prompt tokens): "
                              "shorten the conversation", param,
                              "context_length_exceeded")
        cache_prompt = self.config.cache_prompt if request.cache_prompt is None else request.cache_prompt
        return Job(ids, request.max_tokens, params, request.stop, prompt_lookup=self.config.prompt_lookup,
                   cache_prompt=cache_prompt, logprobs=request.logprobs, grammar=self.grammar(request),
                   continues_prompt=request.kind == "completion")

    def grammar(self, request: GenerationRequest) -> Grammar | None:
        """The request's structured-output grammar, checked against the model's tokenizer now, so a bad
        schema or grammar is a 400 before the request waits in line."""
        if request.grammar is None:
            return None
        kind, value = request.grammar
        try:
            grammar = Grammar.json(value) if kind == "json" else Grammar.gbnf(value)
            self.model.constraint(grammar)
        except StructuredOutputUnavailable as e:
            raise bad_request(f"this server cannot constrain answers: {e}", request.grammar_param,
                              "unsupported_parameter") from e
        except ValueError as e:
            raise bad_request(str(e), request.grammar_param) from e
        return grammar

    def check_room(self) -> None:
        """Refuse a request the line has no room for before prepare() tokenizes it and builds its
        grammar: a burst past --max-queue costs the server no more than reading the bodies.
        submit() checks again, for real: the line may fill up in between."""
        with _worker_refusals():
            self.worker.check_room()

    def submit(self, job: Job) -> None:
        with _worker_refusals():
            self.worker.submit(job)

    def model_object(self) -> dict[str, Any]:
        return {"id": self.config.model_id, "object": "model", "created": self.created, "owned_by": "nomoat"}


@contextmanager
def _worker_refusals() -> Iterator[None]:
    """The worker's refusals as HTTP errors: a full line is a 429 to retry, a shutdown a 503."""
    try:
        yield
    except QueueFull as e:
        raise ApiError(429, f"the server is busy: {e}", "rate_limit_error", code="rate_limit_exceeded",
                       headers={"Retry-After": "2"}) from e
    except ShuttingDown as e:
        raise ApiError(503, str(e), "server_error", code="shutting_down") from e


class Scored:
    """The logprobs of a reply's tokens not sent yet, in the reply's layout (None when not asked for).

    A token that ends inside a character has no text of its own yet; its logprob goes out with
    the next chunk that has text, as the text it is part of does. The tokens a stop string was cut
    from (those that start at or after the cut) are dropped, as llama.cpp's server drops them: their
    text is not in the reply."""

    def __init__(self, reply: Reply, job: Job, model: Model):
        self.wanted = job.logprobs is not None
        self._reply = reply
        self._model = model
        self._scored: list = []
        self._offsets: list[int] = []
        # Where each token starts in the tokens' own text, before stop strings hold any back (the
        # events' text is after): a text completion's text_offset, as the legacy API counts, and
        # for both kinds the way to tell the tokens past a stop string's cut.
        self._text = (IncrementalDetokenizer(model.tokenizer, context=job.prompt_ids if job.continues_prompt else ())
                      if self.wanted else None)
        self._length = 0
        self._emitted = 0  # characters of the reply's text so far (the events' text)

    def add(self, event: StreamEvent) -> None:
        self._emitted += len(event.text)
        if event.logprob is not None and self._text is not None:
            self._scored.append(event.logprob)
            self._offsets.append(self._length)
            self._length += len(self._text.add(event.logprob.token_id))
        if event.finish_reason == "stop" and self._emitted < self._length:  # a stop string cut the text
            kept = sum(start < self._emitted for start in self._offsets)
            del self._scored[kept:], self._offsets[kept:]

    def take(self) -> dict[str, Any] | None:
        """For a stream's chunk: those not sent yet, or None if there are none."""
        return self.whole() if self._scored else None

    def whole(self) -> dict[str, Any] | None:
        """For a whole answer: all of them (empty lists when no token came), None if not asked for."""
        if not self.wanted:
            return None
        tokens = self._model.token_text
        body = (chat_logprobs(self._scored, tokens) if self._reply.kind == "chat"
                else completion_logprobs(self._scored, self._offsets, tokens))
        self._scored, self._offsets = [], []
        return body


def generation_error(error: Exception) -> ApiError:
    """An error the worker hit while generating for this request, as an HTTP error."""
    if isinstance(error, ContextOverflowError):
        return bad_request(str(error), None, "context_length_exceeded")
    if isinstance(error, Cancelled):  # only a shutdown cancels a request whose client is still there
        return ApiError(503, f"the server is shutting down; the request was {error}", "server_error",
                        code="shutting_down")
    log.error("generation failed: %r", error)
    return ApiError(500, f"generation failed: {error}", "server_error", code="internal_error")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: OpenAI's client reuses its connections
    server_version = "nomoat-pi"
    timeout = 60  # seconds a client may stall mid-request before its thread gives up on it
    server: PiServer

    def do_GET(self) -> None:
        self._route({"/health": self._health, "/v1/models": self._models})

    do_HEAD = do_GET  # the same answer without its body (_send_json leaves it out)

    def do_POST(self) -> None:
        self._route({"/v1/chat/completions": partial(self._generate, parse_chat),
                     "/v1/completions": partial(self._generate, parse_completion)})

    def __getattr__(self, name: str) -> Any:
        # http.server answers a method without a do_<METHOD> with its own 501 HTML page; ours get
        # the JSON error of a wrong method (405 with Allow) or of an unknown path (404).
        if name.startswith("do_"):
            return partial(self._route, {})
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)

    # -- plumbing ----------------------------------------------------------------------------------

    def send_response(self, code: int, message: str | None = None) -> None:
        self._responded = True  # a status line is out (or buffered): an error found now cannot be a second one
        super().send_response(code, message)

    def end_headers(self) -> None:
        # Every answer, errors and event streams included: a browser hides from the page any response
        # without it, so an error would look like a network failure.
        origin = self.server.app.config.cors_origin
        if origin is not None:
            self.send_header("Access-Control-Allow-Origin", origin)
        super().end_headers()

    def _route(self, routes: dict[str, Callable[[], None]]) -> None:
        self._body_read = False
        self._responded = False
        with self.server.app.answering():
            self._answer(routes)

    def _answer(self, routes: dict[str, Callable[[], None]]) -> None:
        try:
            self._dispatch(routes)
        except ApiError as e:
            self._send_error(e)
        except (ConnectionError, TimeoutError):  # BrokenPipeError, ConnectionResetError, ClientGone, ...
            self.close_connection = True  # the client went away or stalled: nobody to answer, nothing more to write
        except Exception:
            # A bug. Left to socketserver, it would print the traceback and drop the connection without a
            # word: the client gets OpenAI's error body instead, and the log the traceback, once.
            log.exception("%s %.200s failed", self.command, self.path)
            self.close_connection = True  # what the request left unread or half-done is unknown
            self._send_error(ApiError(500, "the server failed on this request (a bug; its log has the traceback)",
                                      "server_error", code="internal_error"))

    def _send_error(self, error: ApiError) -> None:
        """The error's JSON body, if no answer has started; else only the close (a second status line
        would be read as part of the first answer)."""
        if self._responded:
            self.close_connection = True
            return
        try:
            self._send_json(error.status, error.body(), error.headers)
        except (ConnectionError, TimeoutError):  # the client left before its error reached it: nobody to tell
            self.close_connection = True

    def _dispatch(self, routes: dict[str, Callable[[], None]]) -> None:
        path = _route_path(self.path)
        action, allowed = routes.get(path), ROUTES.get(path)
        if path.startswith("/v1/models/"):
            allowed = ROUTES["/v1/models"]
            if self.command in ("GET", "HEAD"):  # OpenAI's client percent-encodes the id ("org%2Fmodel")
                action = partial(self._model, unquote(path.removeprefix("/v1/models/")))
        if self.command == "OPTIONS" and allowed and self.server.app.config.cors_origin is not None:
            self._preflight(allowed)  # a browser asks before its cross-origin request, without the key
            return
        if action is None and allowed:
            raise ApiError(405, f"{path} takes {allowed}, not {self.command}", code="method_not_allowed",
                           headers={"Allow": allowed})
        if action is None:
            raise ApiError(404, f"no route {self.command} {path}", code="not_found")
        if self.server.app.loading and not path.startswith("/v1/models"):  # the model's name needs no model
            # Before the key check, as llama.cpp: it says nothing a client could not learn from a timeout.
            raise ApiError(503, "the model is loading; retry in a moment", "unavailable_error", code="model_loading",
                           headers={"Retry-After": "1"})
        if path != "/health":  # monitoring needs no key
            self._authorize()
        action()

    def _preflight(self, allowed: str) -> None:
        """CORS preflight: the methods the route takes and the headers the page wants to send (OpenAI's
        JavaScript client sends x-stainless-* ones besides Authorization and Content-Type)."""
        self._drop_unread_body()
        self.send_response(204)
        self.send_header("Access-Control-Allow-Methods", f"{allowed}, OPTIONS")
        self.send_header("Access-Control-Allow-Headers",
                         self.headers.get("Access-Control-Request-Headers") or "Authorization, Content-Type")
        self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Content-Length", "0")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()

    def _authorize(self) -> None:
        key = self.server.app.config.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        # compare_digest: the time taken does not tell an attacker how much of the key matched.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "Incorrect API key provided. Send it as 'Authorization: Bearer <key>'.",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def _read_json(self) -> dict[str, Any]:
        limit = self.server.app.config.limits.max_body_bytes
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise ApiError(411, "send the body with a Content-Length; chunked request bodies are not supported",
                           code="length_required")
        lengths = _content_lengths(self.headers)
        if not lengths:
            raise ApiError(411, "a Content-Length header is required", code="length_required")
        if len(lengths) > 1:
            raise bad_request(f"the request's Content-Length headers disagree ({', '.join(map(repr, lengths))}): "
                              "send one, the body's size in bytes")
        length = lengths[0]
        size = _content_length(length)
        if size is None:
            raise bad_request(f"invalid Content-Length {length[:40]!r}: send the body's size in bytes, "
                              "as ASCII digits")
        if size > limit:
            raise ApiError(413, f"the request body is {size} bytes; this server takes at most {limit}",
                           code="request_too_large")
        with self.server.app.waiting_on_client():
            raw = self.rfile.read(size)
        self._body_read = True
        if len(raw) < size:
            raise ConnectionResetError("the client closed the connection mid-body")
        try:
            body = json.loads(raw, parse_constant=_refuse_constant)
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, and NaN / Infinity
            raise bad_request(f"the request body is not valid JSON: {e}", code="invalid_json") from e
        except RecursionError as e:  # json recurses per bracket: ~1000 nested ones pass Python's limit
            raise bad_request("the request body nests too deeply to parse (hundreds of brackets deep); flatten it",
                              code="invalid_json") from e
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object", code="invalid_json")
        return body

    def _drop_unread_body(self) -> None:
        declares_body = "Content-Length" in self.headers or "Transfer-Encoding" in self.headers
        if (self.command == "POST" or declares_body) and not self._body_read:
            self._discard_body()

    def _send_json(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        self._drop_unread_body()
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":  # HEAD: GET's headers, Content-Length included, and no body
            self.wfile.write(data)

    def _discard_body(self) -> None:
        """Read and drop a body we refuse (wrong key, too large) before answering.

        Left in the socket it would be parsed as the next request; and closing a socket with
        unread data makes the kernel send a reset that can destroy our error reply before the
        client reads it. Bodies too large to be worth reading get the close anyway.
        """
        lengths = _content_lengths(self.headers)
        # Lengths that disagree: where this body ends is anyone's guess, so the connection goes with it.
        remaining = _content_length(lengths[0]) if len(lengths) == 1 else None
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        if chunked or remaining is None or remaining > DRAIN_LIMIT:
            self.close_connection = True
            return
        with self.server.app.waiting_on_client():
            while remaining:
                chunk = self.rfile.read(min(remaining, 1 << 16))
                if not chunk:
                    break
                remaining -= len(chunk)
        self._body_read = True

    def _send_event(self, data: dict[str, Any] | str) -> None:
        payload = data if isinstance(data, str) else json.dumps(data)
        self.wfile.write(f"data: {payload}\n\n".encode())

    def _client_gone(self) -> bool:
        """Has the client closed its end?

        Linux's POLLRDHUP says so even with bytes unread before the close (a keep-alive client's next
        request, sent before it gave up): peeking would see those bytes and take the client for still there.
        Elsewhere, a peek: a client waiting for its answer sends nothing, so a readable socket with
        nothing to read is the end of the connection.
        """
        try:
            if HANG_UP_EVENTS:
                poller = select.poll()
                poller.register(self.connection, select.POLLIN | POLLRDHUP)
                return any(events & HANG_UP_EVENTS for _, events in poller.poll(0))
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):  # reset by the peer, or already closed
            return True

    # -- routes ------------------------------------------------------------------------------------

    def _health(self) -> None:
        app = self.server.app
        self._send_json(200, {"status": "ok", "model": app.config.model_id, **app.worker.status()})

    def _models(self) -> None:
        self._send_json(200, {"object": "list", "data": [self.server.app.model_object()]})

    def _model(self, model_id: str) -> None:
        app = self.server.app
        if model_id != app.config.model_id:
            raise ApiError(404, f"The model '{model_id}' does not exist; this server serves "
                           f"'{app.config.model_id}'.", param="model", code="model_not_found")
        self._send_json(200, app.model_object())

    def _generate(self, parse: Callable[..., GenerationRequest]) -> None:
        app = self.server.app
        request = parse(self._read_json(), app.config.model_id, app.config.limits, app.default_max_tokens)
        app.check_room()
        job = app.prepare(request)
        reply = Reply.new(request.kind, app.config.model_id, request.include_usage)
        queued = time.perf_counter()
        app.submit(job)
        gone = False
        try:
            if request.stream:
                self._stream(job, reply, request.include_usage)
            else:
                self._whole(job, reply)
        except ConnectionError:  # the client hung up: noticed while waiting, or a write to it failed
            gone = True
            raise
        finally:
            job.cancel()  # stops the generation if we left early (client gone); harmless after the end
            _log_generation(reply, job, time.perf_counter() - queued, gone)

    def _whole(self, job: Job, reply: Reply) -> None:
        parts, reason = [], "length"
        scored = Scored(reply, job, self.server.app.model)
        try:
            for event in job.results(self._client_gone):
                parts.append(event.text)
                scored.add(event)
                reason = event.finish_reason or reason
        except ClientGone:
            raise
        except Exception as e:  # raised in the worker on this request's behalf
            raise generation_error(e) from e
        self._send_json(200, reply.whole("".join(parts), reason, _usage(job), scored.whole()))

    def _stream(self, job: Job, reply: Reply, include_usage: bool) -> None:
        events = job.results(self._client_gone)  # a client that leaves while in line is noticed before its prefill
        try:
            # Wait for the first event before the 200 goes out: an error in prefill is still an HTTP error.
            first = next(events, None)
        except ClientGone:
            raise
        except Exception as e:  # raised in the worker on this request's behalf
            raise generation_error(e) from e
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # no Content-Length: the stream ends when the connection does
        self.end_headers()
        self.close_connection = True
        opening = reply.first_chunk()
        if opening:
            self._send_event(opening)
        reason = "length"
        scored = Scored(reply, job, self.server.app.model)
        try:
            for event in chain([first] if first else [], events):
                scored.add(event)
                if event.text:
                    self._send_event(reply.chunk(event.text, logprobs=scored.take()))
                reason = event.finish_reason or reason
        except ConnectionError:  # the client hung up (a write failed, or ClientGone): nothing more to write
            raise
        except Exception as e:  # the 200 is out: report the error in the stream, as OpenAI does
            self._send_event(generation_error(e).body())
            self._send_event("[DONE]")  # the stream's end, so a client knows it has all there is
            return
        self._send_event(reply.chunk("", reason, scored.take()))
        if include_usage:
            self._send_event(reply.usage_chunk(_usage(job)))
        self._send_event("[DONE]")


def _route_path(target: str) -> str:
    """The path a request target names, without a trailing slash."""
    try:
        path = urlsplit(target).path
    except ValueError as e:  # "http://[x/health": a bracket that opens an IPv6 host and never closes
        raise bad_request(f"cannot read the request target {target[:200]!r} ({e}); send a path such as "
                          "/v1/chat/completions") from e
    return path.rstrip("/") or "/"


# Linux's peer-closed-its-end event: older Pythons lack the constant, the kernel has had it since 2.6.17.
POLLRDHUP = getattr(select, "POLLRDHUP", 0x2000)
HANG_UP_EVENTS = (POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL
                  if sys.platform.startswith("linux") and hasattr(select, "poll") else 0)


MAX_LENGTH_DIGITS = 19  # an int64's; a Content-Length longer than that is no body anyone sends


def _content_lengths(headers: Message) -> list[str]:
    """The request's Content-Length values, each once and in order. The spaces and tabs around a value
    are not part of it (RFC 9110 5.5); a value repeated, in a header of its own or in a comma-separated
    list ("42, 42", as some proxies fold them), is one length (RFC 9110 8.6); two that disagree are a
    request to refuse (RFC 9112 6.3: behind a proxy that took the other, the rest of the body would be
    read as a request of its own)."""
    return list(dict.fromkeys(part.strip(" \t") for value in headers.get_all("Content-Length", [])
                              for part in value.split(",")))


def _content_length(value: str) -> int | None:
    """A Content-Length's value, or None if it is not a plain decimal number. str.isdigit alone takes
    "²" and other Unicode digits, which int() refuses, and thousands of digits, which it refuses too."""
    if value.isascii() and value.isdigit() and len(value) <= MAX_LENGTH_DIGITS:
        return int(value)
    return None


def _refuse_constant(name: str) -> Any:
    # Python's json takes NaN, Infinity and -Infinity, which JSON has not: a NaN temperature
    # would get past every range check (NaN < 0 and NaN > 2 are both false).
    raise ValueError(f"{name} is not a JSON value (numbers must be finite)")


def _usage(job: Job) -> dict[str, Any]:
    s = job.stats
    return usage(s.prompt_tokens, s.generated_tokens, s.cached_tokens) if s else usage(len(job.prompt_ids), 0, 0)


def _log_generation(reply: Reply, job: Job, seconds: float, client_gone: bool = False) -> None:
    s = job.stats
    if s is None:
        why = "the client hung up; its generation is cancelled" if client_gone else "stopped early (error)"
        log.info("%s: %s after %.2f s", reply.id, why, seconds)
        return
    log.info("%s: prompt %d tokens (%d cached), %d generated; prefill %.0f tok/s, decode %.1f tok/s%s; %.2f s "
             "with queueing%s", reply.id, s.prompt_tokens, s.cached_tokens, s.generated_tokens,
             s.prefill_tokens_per_second, s.decode_tokens_per_second, drafts_note(s), seconds,
             "; the client hung up before the answer reached it" if client_gone else "")


class PiServer(ThreadingHTTPServer):
    # A stalled client or an idle keep-alive connection never blocks shutdown; the requests being
    # answered get a bounded wait in server_close instead.
    daemon_threads = True
    request_queue_size = 64  # listen backlog: many clients may connect at the same moment

    def __init__(self, address: tuple[str, int], app: App):
        """Listening once made. serve.py makes it with an app still loading its model: the port is
        taken (and a port in use said) before the seconds of the load."""
        self.app = app
        # A thread per connection, so a cap on connections is a cap on threads (each with its stack) that
        # idle keep-alive or stalled clients could otherwise pile up without limit. Past it, a new
        # connection waits unaccepted in the listen backlog until one closes, as llama.cpp's server
        # queues connections behind its HTTP thread pool.
        self._connection_slots = threading.BoundedSemaphore(app.config.limits.max_connections)
        self._stopping = threading.Event()
        # ThreadingHTTPServer is IPv4 whatever the host: "::1" would fail to resolve as an IPv4 address.
        # A name (localhost) stays IPv4, as before, so IPv4 clients still reach it.
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, Handler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            # "::" is every interface, the IPv4 ones too (as 0.0.0.0 is every IPv4 one), whatever the
            # system's net.ipv6.bindv6only default says.
            with suppress(OSError, AttributeError):
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def process_request(self, request: Any, client_address: Any) -> None:
        """Hand the connection to a thread of its own once there is a free slot. Waiting here keeps
        serve_forever from accepting more; shutdown() ends the wait."""
        while not self._connection_slots.acquire(timeout=0.2):
            if self._stopping.is_set():
                self.shutdown_request(request)
                return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._connection_slots.release()  # no thread started to release it
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connection_slots.release()

    def shutdown(self) -> None:
        self._stopping.set()
        super().shutdown()

    def server_close(self) -> None:
        """Stop listening, cancel the running and waiting jobs, and wait (bounded) until their
        clients have their answers: the 503s of the waiting ones, the running stream's error event
        and [DONE]. The process exits after this, and its daemon handler threads with it, so an
        answer not written by then would be lost (the client seeing the connection dropped)."""
        super().server_close()
        if not self.app.close(CLOSE_WAIT):
            log.warning("stopping with requests still unanswered after %.0f s (clients not reading?)", CLOSE_WAIT)
