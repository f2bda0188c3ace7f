"""Serve a bundle over OpenAI's HTTP API: /v1/chat/completions and /v1/completions (streamed
or not), /v1/models, /health. One answer is generated at a time; requests wait in line, up to
--max-queue of them. Binds to 127.0.0.1 unless told otherwise: put it on the network only
with --api-key (or the NOMOAT_API_KEY environment variable, which keeps the key out of `ps`)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from nomoat.runtime.cli_generate import add_prompt_lookup_argument, ort_options, refused_ort_options, thread_count

log = logging.getLogger("pi_demo.serve")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", type=Path, help="bundle folder written by `nomoat convert`")
    p.add_argument("--host", default="127.0.0.1", type=host_name,
                   help="address to listen on (0.0.0.0 = every IPv4 interface, :: = every interface, ::1 = IPv6 "
                        "loopback)")
    p.add_argument("--port", type=port_number, default=8000, help="TCP port (0 = any free port)")
    p.add_argument("--model-id", default=None,
                   help="the model name clients send (default: the bundle's folder name)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: $NOMOAT_API_KEY if set, else no key)")
    p.add_argument("--max-tokens", type=int, default=1024,
                   help="the most tokens one answer may have: a larger max_tokens is cut to this (finish_reason "
                        "\"length\"); a chat that leaves max_tokens out runs to this or the context's end")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body accepted")
    p.add_argument("--max-queue", type=int, default=16, help="requests that may wait behind the running one")
    p.add_argument("--max-connections", type=int, default=64,
                   help="open connections at once (a thread each, idle keep-alive ones included); more wait "
                        "to be accepted until one closes")
    p.add_argument("--threads", type=thread_count, default=None, help="CPU threads (default: the bundle's target)")
    p.add_argument("--ort-options", type=ort_options, default={}, metavar="KEY=VALUE[,...]",
                   help="ONNX Runtime session config entries, e.g. mlas.disable_kleidiai=1 (default: none)")
    p.add_argument("--no-cache-prompt", dest="cache_prompt", action="store_false",
                   help="compute each prompt from an empty KV cache unless the request says \"cache_prompt\": "
                        "true: the same request gets the same answer whatever ran before (a cached prompt can "
                        "flip an int4 bundle's near-ties), at the cost of a whole prefill every time "
                        "(default: off, a request's prompt reuses the cache unless it says false)")
    p.add_argument("--cors-origin", type=cors_origin, default=None, metavar="ORIGIN",
                   help="let web pages from ORIGIN (e.g. http://localhost:3000, or * for any) call the API from "
                        "a browser: CORS headers and preflight answers (default: none; a browser chat UI that "
                        "calls the server through its own backend needs none)")
    add_prompt_lookup_argument(p, when="for greedy requests without a penalty, logprobs or a grammar (the others "
                                       "run plain)")


def port_number(value: str) -> int:
    """argparse type for --port: 0 to 65535, refused at start rather than by the socket after the load."""
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not a TCP port: give 0 to 65535 (0 = any free port)")
    return port


def host_name(value: str) -> str:
    """argparse type: a name or address the socket module can encode. It encodes names with the idna
    codec, which refuses an empty label or one over 63 characters; bind() then raised a bare TypeError."""
    try:
        value.encode("idna")
    except UnicodeError as e:
        raise argparse.ArgumentTypeError(f"{value[:80]!r} is not a valid host name ({e}): give this machine's "
                                         "address (e.g. 127.0.0.1, 0.0.0.0, ::) or a name of it") from None
    return value


def cors_origin(value: str) -> str:
    """argparse type: "*" or a web origin, scheme://host[:port] with nothing after it (what a browser
    sends as Origin, and compares the answer's Access-Control-Allow-Origin with, character for character)."""
    from urllib.parse import urlsplit

    if value == "*":
        return value
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc or value != f"{parts.scheme}://{parts.netloc}":
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a web origin: give scheme://host[:port] with no path or trailing slash "
            "(e.g. http://localhost:3000), or * for any origin")
    return value


def run(args: argparse.Namespace) -> int:
    from .openai_api import Limits
    from .server import App, PiServer, ServerConfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    for name in ("max_tokens", "max_body_bytes", "max_connections"):
        if getattr(args, name) < 1:
            return _fail(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_queue < 0:
        return _fail("--max-queue must be 0 or more")
    config = ServerConfig(model_id=args.model_id or bundle_name(args.bundle),
                          api_key=args.api_key or os.environ.get("NOMOAT_API_KEY") or None,
                          limits=Limits(args.max_tokens, args.max_body_bytes, args.max_queue, args.max_connections),
                          prompt_lookup=args.prompt_lookup, cache_prompt=args.cache_prompt,
                          cors_origin=args.cors_origin)
    try:
        # Before the model loads (seconds on a Pi): a port in use or a host that is not this machine's is
        # said at once, not after each load of a service that systemd restarts; and while it loads,
        # clients (a health check, a chat UI) get a 503 to retry rather than a connection that hangs.
        server = PiServer((args.host, args.port), App(None, config))
    except OSError as e:
        return _fail(f"cannot listen on {host_port(args.host, args.port)}: {e.strerror or e}")
    return _serve(server, _Loader(server, args))


class _Loader(threading.Thread):
    """Loads the model while the main thread serves (503s until attached), then says "serving"; a
    load that fails stops the server and leaves its error to the main thread, which says it."""

    def __init__(self, server, args: argparse.Namespace):
        super().__init__(name="load-model", daemon=True)  # a stop during the load does not wait for it
        self.server, self.args = server, args
        self.error: Exception | None = None

    def run(self) -> None:
        from nomoat.runtime import Model

        host, port = self.server.server_address[:2]
        log.info("loading %s (requests get 503 until it is ready) on http://%s", self.args.bundle,
                 host_port(host, port))
        try:
            model = Model.load(self.args.bundle, threads=self.args.threads, ort_options=self.args.ort_options)
            structured = _prepare_structured_output(model)
        except Exception as e:  # BundleError, OrtOptionsError, or Ctrl-C as pybind11's ImportError: main says it
            self.error = e
            self.server.shutdown()
            return
        if self.server.app.attach(model):
            _log_serving(self.server, structured)


def _prepare_structured_output(model) -> str:
    """Build llguidance's view of the tokenizer now, not while the first response_format request waits
    (and holds up an answer under way); what the serving line says of structured output."""
    try:
        return "on" if model.prepare_grammars() else "off: pip install llguidance"
    except ValueError as e:  # a bundle without a stop token: said to each such request, not a reason to stop
        return f"off: {e}"


def _warn_if_open(server, config) -> None:
    host = server.server_address[0]  # as bound: "" is 0.0.0.0, a name its address
    if config.api_key is None and not _is_loopback(host):
        log.warning("listening on %s without an API key: anyone who reaches this port can use the model",
                    _address_words(host))
    if config.api_key is None and config.cors_origin == "*":
        log.warning("--cors-origin * without an API key: any web page open in a browser that reaches this port "
                    "can use the model")


def _log_serving(server, structured: str) -> None:
    config = server.app.config
    host, port = server.server_address[:2]
    log.info("serving %s on http://%s/v1 (max %d tokens per request, %d may wait; structured output %s%s%s)",
             config.model_id, host_port(host, port), config.limits.max_tokens, config.limits.max_queue,
             structured,
             f"; greedy requests draft up to {config.prompt_lookup} tokens by prompt lookup"
             if config.prompt_lookup else "",
             "; prompts run from an empty cache unless a request says cache_prompt" if not config.cache_prompt else "")


def _serve(server, loader: _Loader) -> int:
    from nomoat.runtime import BundleError, OrtOptionsError

    # systemd stops the service with SIGTERM: finish like Ctrl-C. shutdown() waits for serve_forever
    # to return, so it must run outside the (main) thread that serve_forever blocks. The old handler comes
    # back after: a caller of run() in its own process (a test, an SDK user) keeps its own.
    previous = signal.signal(signal.SIGTERM,
                             lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    interrupted = False
    try:  # from here on the port is closed on every way out, Ctrl-C before serve_forever included
        _warn_if_open(server, server.app.config)
        loader.start()
        server.serve_forever()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        server.server_close()
        signal.signal(signal.SIGTERM, previous)
    error = loader.error
    if isinstance(error, (BundleError, OrtOptionsError)):
        return _fail(refused_ort_options(error) if isinstance(error, OrtOptionsError) else str(error))
    if error is not None:
        raise error  # a bug's traceback, or Ctrl-C during onnxruntime's import: __main__ makes that 130
    if interrupted and server.app.loading:
        raise KeyboardInterrupt  # Ctrl-C before the model was ready: 130, as for `nomoat chat`
    log.info("stopped")
    return 0


def bundle_name(bundle: Path) -> str:
    """The bundle's folder name as given: a link's own name (`current -> v3` serves "current", not "v3"),
    "." and a trailing slash read as the folder they name."""
    return Path(os.path.abspath(bundle)).name or Path(bundle).resolve().name or "bundle"


def host_port(host: str, port: int) -> str:
    """host:port as a URL writes it: an IPv6 address in brackets ([::1]:8000), so a client can use it."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _address_words(host: str) -> str:
    """The address bound, and what it means when it is a wildcard ("" binds 0.0.0.0)."""
    if host == "0.0.0.0":
        return "0.0.0.0 (every IPv4 interface)"
    if host == "::":
        return ":: (every interface)"
    return host


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _fail(message: str) -> int:
    print(f"pi_demo serve: error: {message}", file=sys.stderr)
    return 1
