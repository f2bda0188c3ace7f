"""The OpenAI wire format, without I/O: request bodies in, response bodies and stream chunks out.

Parsing follows what OpenAI's API accepts and how it refuses: a field of the wrong type or out of
range is a 400 naming the field (`param`), an unknown model a 404 `model_not_found`. Fields this
server cannot honour (n > 1, echo, logit_bias, tools, ...) are refused rather than silently
ignored, so a client never gets an answer to a question it did not ask. Sampling fields the
client leaves out take the bundle's generation defaults (a bundle converted from an instruct
model says greedy), not OpenAI's temperature 1.0.

logprobs are the model's own (the log-softmax of its raw logits, before penalties, temperature and
filters), as OpenAI's and vLLM's are; chat takes `logprobs` and `top_logprobs`, a text completion
`logprobs` as a count, and both at most MAX_TOP_LOGPROBS alternatives.

Structured output: response_format json_object (any JSON object) or json_schema, and llama.cpp's
`json_schema` (a schema) and `grammar` (GBNF) fields; one of them per request.

Beyond OpenAI, the fields llama.cpp's and vLLM's servers take are accepted too: top_k, min_p,
repetition_penalty, repeat_last_n (llama.cpp's window of that penalty; -1 = the whole history),
cache_prompt (OpenAI's client sends them with `extra_body`); a top_k of 0 or
less (vLLM's -1) means off and a seed of -1 means none (random), as in llama.cpp's server.
"""

from __future__ import annotations

import math
import secrets
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from nomoat.runtime import TokenLogprob

MAX_STOP_STRINGS = 16  # OpenAI takes 4; llama.cpp and vLLM more (each string is checked on every token)
MAX_TOP_LOGPROBS = 20  # as OpenAI's chat API (its legacy completions stop at 5, vLLM's at 20 for both)


class ApiError(Exception):
    """An HTTP error with OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass(frozen=True)
class Limits:
    max_tokens: int = 1024  # the most tokens one request may ask for
    max_body_bytes: int = 1 << 20
    max_queue: int = 16  # requests waiting behind the one being generated
    max_connections: int = 64  # open connections (a handler thread each); more wait to be accepted


@dataclass
class GenerationRequest:
    """What a chat or text completion request asks for, checked."""

    kind: str  # "chat" | "completion"
    prompt: str | list[dict[str, str]]  # raw text (completion) or messages (chat)
    max_tokens: int
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the token counts
    stop: list[str] = field(default_factory=list)
    sampling: dict[str, Any] = field(default_factory=dict)  # SamplingParams fields the client set
    cache_prompt: bool | None = None  # llama.cpp's field: reuse the KV cache's prefix; None = the server's default
    logprobs: int | None = None  # None: no logprobs; N: each token's, with the N most likely alternatives
    grammar: tuple[str, Any] | None = None  # ("json", schema or None for any object) | ("gbnf", text), and its field
    grammar_param: str | None = None  # the request field it came from, for errors


# Fields that change what OpenAI would answer -> the values that mean "not used" (accepted).
# function_call goes with functions: without its own entry it passed, and was ignored, when functions was absent.
# Its "none" (call no function) is tool_choice's "none", accepted likewise.
_NEUTRAL = {"echo": (None, False), "tools": (None, []), "functions": (None, []), "function_call": (None, "none"),
            "n": (None, 1), "best_of": (None, 1), "suffix": (None, ""), "logit_bias": (None, {})}
_ROLES = {"system", "user", "assistant", "developer"}


def parse_chat(body: dict[str, Any], model_id: str, limits: Limits, default_max_tokens: int) -> GenerationRequest:
    _check_common(body, model_id)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list of {role, content} objects", "messages")
    prompt = [_message(m, i) for i, m in enumerate(messages)]
    max_tokens = _max_tokens(body, ("max_completion_tokens", "max_tokens"), limits, default_max_tokens)
    return _request("chat", prompt, max_tokens, body, _chat_logprobs(body))


def parse_completion(body: dict[str, Any], model_id: str, limits: Limits,
                     default_max_tokens: int) -> GenerationRequest:
    _check_common(body, model_id)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # OpenAI's batch form, with a batch of one
    if not isinstance(prompt, str) or not prompt:
        raise bad_request("'prompt' must be a non-empty string (batches of prompts are not supported)", "prompt")
    _check_unicode(prompt, "prompt")
    max_tokens = _max_tokens(body, ("max_tokens",), limits, min(16, default_max_tokens))  # OpenAI's default: 16
    # The legacy API's logprobs is the count of alternatives; false (as a chat client would send it) is none.
    logprobs = None if body.get("logprobs") is False else _top_count(body, "logprobs")
    if body.get("top_logprobs") not in (None, 0):
        raise bad_request("'top_logprobs' is the chat API's; a text completion takes 'logprobs': N for N alternatives",
                          "top_logprobs", "unsupported_parameter")
    return _request("completion", prompt, max_tokens, body, logprobs)


def _chat_logprobs(body: dict[str, Any]) -> int | None:
    """Chat's logprobs: true asks for them, top_logprobs for that many alternatives (OpenAI refuses
    top_logprobs without logprobs: true)."""
    wanted = _optional(body, "logprobs", bool)
    top = _top_count(body, "top_logprobs")
    if top and not wanted:
        raise bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return (top or 0) if wanted else None


def _top_count(body: dict[str, Any], name: str) -> int | None:
    value = _optional(body, name, int)
    if value is not None and not 0 <= value <= MAX_TOP_LOGPROBS:
        raise bad_request(f"'{name}' must be between 0 and {MAX_TOP_LOGPROBS}, got {value}", name)
    return value


def _request(kind: str, prompt: str | list[dict[str, str]], max_tokens: int, body: dict[str, Any],
             logprobs: int | None) -> GenerationRequest:
    stream = _optional(body, "stream", bool) or False
    options = _optional(body, "stream_options", dict) or {}
    if options and not stream:
        raise bad_request("'stream_options' is only allowed when 'stream' is true", "stream_options")
    # Checked as any field is: the string "false" must not turn usage on.
    include_usage = _optional(options, "include_usage", bool, "stream_options.include_usage") or False
    grammar, grammar_param = _grammar(body)
    return GenerationRequest(kind=kind, prompt=prompt, max_tokens=max_tokens, stream=stream,
                             include_usage=include_usage, stop=_stop(body),
                             sampling=_sampling(body), cache_prompt=_optional(body, "cache_prompt", bool),
                             logprobs=logprobs, grammar=grammar, grammar_param=grammar_param)


def _grammar(body: dict[str, Any]) -> tuple[tuple[str, Any] | None, str | None]:
    """What the answer must match, from OpenAI's response_format or llama.cpp's json_schema / grammar."""
    given = [name for name in ("response_format", "json_schema", "grammar") if body.get(name) is not None]
    if body.get("response_format") == {"type": "text"}:
        given.remove("response_format")  # OpenAI's default: no constraint
    if len(given) > 1:
        raise bad_request(f"give one of 'response_format', 'json_schema' and 'grammar', not {' and '.join(given)}",
                          given[1])
    if not given:
        return None, None
    name = given[0]
    value = body[name]
    if name == "grammar":
        if not isinstance(value, str) or not value.strip():
            raise bad_request("'grammar' must be a GBNF grammar as a non-empty string", name)
        return ("gbnf", value), name
    if name == "json_schema":
        if not isinstance(value, dict):
            raise bad_request("'json_schema' must be a JSON schema object", name)
        return ("json", value), name
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "json_object":
        schema = value.get("schema")  # llama.cpp's server reads a schema here too
        if schema is not None and not isinstance(schema, dict):
            raise bad_request("response_format's 'schema' must be a JSON schema object", "response_format")
        return ("json", schema), name
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise bad_request("response_format json_schema needs 'json_schema': {'name': ..., 'schema': {...}}",
                              "response_format")
        return ("json", schema), name
    raise bad_request("response_format must be {'type': 'text'}, {'type': 'json_object'} or "
                      "{'type': 'json_schema', 'json_schema': {...}}", "response_format")


def _check_common(body: dict[str, Any], model_id: str) -> None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request("'model' must be a string (the id /v1/models lists)", "model")
    if model is not None and model != model_id:
        raise ApiError(404, f"The model '{model}' does not exist; this server serves '{model_id}'.",
                       param="model", code="model_not_found")
    for name, neutral in _NEUTRAL.items():
        if name in body and not _is_neutral(body[name], neutral):
            raise bad_request(f"'{name}' is not supported by this server (leave it out)", name, "unsupported_parameter")
    if body.get("tool_choice") not in (None, "none"):
        raise bad_request("'tool_choice' is not supported by this server (leave it out)", "tool_choice",
                          "unsupported_parameter")


def _is_neutral(value: Any, neutral: tuple[Any, ...]) -> bool:
    """Is value one of the neutral ones, as JSON has it? In Python 0 == False and 1 == True, but a
    completion's "logprobs": 0 asks for the sampled token's logprob, and "n": true is not 1."""
    return any(value == n and isinstance(value, bool) == isinstance(n, bool) for n in neutral)


def _message(message: Any, index: int) -> dict[str, str]:
    param = f"messages[{index}]"
    if not isinstance(message, dict):
        raise bad_request(f"{param} must be an object with 'role' and 'content'", param)
    role = message.get("role")
    if not (isinstance(role, str) and role in _ROLES):  # a list or an object is unhashable: no set lookup
        raise bad_request(f"{param}.role must be one of {sorted(_ROLES)}, got {role!r}", f"{param}.role")
    content = message.get("content")
    if isinstance(content, list):  # content parts: only text is understood by a text model
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
            raise bad_request(f"{param}.content: only text parts are supported", f"{param}.content")
        # One part per line, as vLLM and llama.cpp's server join them: clients that send a question
        # and an attached document as two parts would otherwise run their words together.
        content = "\n".join(texts)
    if not isinstance(content, str):
        raise bad_request(f"{param}.content must be a string", f"{param}.content")
    _check_unicode(content, f"{param}.content")
    # "developer" is OpenAI's newer name for the system role; chat templates know "system".
    return {"role": "system" if role == "developer" else role, "content": content}


def _max_tokens(body: dict[str, Any], names: tuple[str, ...], limits: Limits, default: int) -> int:
    for name in names:
        value = _optional(body, name, int)
        if value is None:
            continue
        if value < 1:
            raise bad_request(f"'{name}' must be at least 1, got {value}", name)
        # Clients such as chat UIs send one large max_tokens with every request: cut it to the server's
        # cap, as llama.cpp does (finish_reason "length" tells the client it was cut), rather than refuse.
        return min(value, limits.max_tokens)
    return min(default, limits.max_tokens)


def _stop(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise bad_request("'stop' must be a non-empty string or a list of them", "stop")
    if len(stop) > MAX_STOP_STRINGS:
        raise bad_request(f"'stop' takes at most {MAX_STOP_STRINGS} strings, got {len(stop)}", "stop")
    for s in stop:
        _check_unicode(s, "stop")
    return stop


def _check_unicode(text: str, param: str) -> None:
    """JSON's \\uXXXX escapes can spell half of a surrogate pair, which is no character: the tokenizer
    would refuse it with a message of its own ("TextInputSequence must be str")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise bad_request(f"{param} is not valid Unicode text: it holds a lone surrogate "
                          f"\\u{ord(text[e.start]):04x} at character {e.start} (send a character as itself or "
                          "as a whole \\uD8xx\\uDCxx pair)", param) from e


# field -> (type, lowest, highest); None = unbounded on that side
_SAMPLING = {"temperature": (float, 0.0, 2.0), "top_p": (float, 0.0, 1.0), "top_k": (int, 0, None),
             "min_p": (float, 0.0, 1.0), "repetition_penalty": (float, 0.0, None), "repeat_last_n": (int, -1, None),
             "frequency_penalty": (float, -2.0, 2.0), "presence_penalty": (float, -2.0, 2.0),  # OpenAI's ranges
             "seed": (int, -(2**63), 2**63 - 1)}  # llama.cpp's and vLLM's range: an int64
NO_SEED = -1  # llama.cpp's "seed": -1, a random one


def _sampling(body: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name, (type_, low, high) in _SAMPLING.items():
        value = _optional(body, name, type_)
        if value is None:
            continue
        if name == "top_k" and value < 0:
            value = 0  # vLLM's "off" is -1, llama.cpp's server takes any value <= 0; ours is 0
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise bad_request(f"'{name}' must be {bounds}, got {value}", name)
        if name == "seed":
            if value == NO_SEED:
                continue
            value %= 2**64  # numpy takes no negative seed; this keeps each int64 its own (repeatable) stream
        out[name] = value
    if out.get("repetition_penalty") == 0.0:
        raise bad_request("'repetition_penalty' must be greater than 0", "repetition_penalty")
    return out


def _optional(body: dict[str, Any], name: str, type_: type, param: str | None = None) -> Any:
    """body[name] checked to be of type_, or None if absent; param names it in errors (default: name)."""
    param = param or name
    value = body.get(name)
    if value is None:
        return None
    # bool is an int in Python; JSON true must not pass as max_tokens=1.
    ok = isinstance(value, type_) and not (type_ is not bool and isinstance(value, bool))
    if type_ is float and isinstance(value, int) and not isinstance(value, bool):
        if abs(value) > sys.float_info.max:  # JSON integers may have hundreds of digits: float() would raise
            raise bad_request(f"'{param}' must be a finite number, got an integer of {len(str(abs(value)))} digits",
                              param)
        value, ok = float(value), True
    if type_ is int and isinstance(value, float) and value.is_integer():
        value, ok = int(value), True  # 40.0 (as JavaScript clients send numbers), as vLLM's pydantic takes it
    if not ok:
        raise bad_request(f"'{param}' must be {_TYPE_NAMES[type_]}, got {type(value).__name__}", param)
    if type_ is float and not math.isfinite(value):  # 1e400 is valid JSON that Python reads as inf
        raise bad_request(f"'{param}' must be a finite number, got {value}", param)
    return value


_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", dict: "an object"}


# -- responses ---------------------------------------------------------------------------------------


class TokenBytes(Protocol):
    def bytes_of(self, token_id: int) -> bytes: ...  # a token's exact bytes (runtime.logprobs.TokenText)


def chat_logprobs(scored: Sequence[TokenLogprob], tokens: TokenBytes) -> dict[str, Any]:
    """A chat choice's "logprobs": each token with its bytes (a part of a character shows as U+FFFD
    in "token"; "bytes" say which) and its top_logprobs, most likely first."""
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        raw = tokens.bytes_of(token_id)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    return {"content": [{**entry(s.token_id, s.logprob), "top_logprobs": [entry(i, lp) for i, lp in s.top]}
                        for s in scored], "refusal": None}


def completion_logprobs(scored: Sequence[TokenLogprob], offsets: Sequence[int], tokens: TokenBytes) -> dict[str, Any]:
    """A text completion's "logprobs", the legacy layout: parallel lists; each top_logprobs entry maps
    token text to logprob and holds the sampled token too, as OpenAI's does (so up to N + 1 keys);
    text_offset is each token's character offset in the completion's text. A token that is part of a
    character is written as its bytes, "bytes:\\xf0\\x9f", as OpenAI's legacy API writes one, so such
    tokens stay apart as keys."""
    def text(token_id: int) -> str:
        raw = tokens.bytes_of(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    return {"tokens": [text(s.token_id) for s in scored], "token_logprobs": [s.logprob for s in scored],
            "top_logprobs": [{**{text(i): lp for i, lp in s.top}, text(s.token_id): s.logprob} for s in scored],
            "text_offset": list(offsets)}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


@dataclass(frozen=True)
class Reply:
    """The envelope of one answer: chat.completion / text_completion bodies and their stream chunks."""

    kind: str  # "chat" | "completion"
    model: str
    id: str = ""
    created: int = 0
    # stream_options.include_usage: OpenAI's docs say "All other chunks will also include a usage
    # field, but with a null value"; a client may read chunk["usage"] on every chunk.
    include_usage: bool = False

    @classmethod
    def new(cls, kind: str, model: str, include_usage: bool = False) -> Reply:
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        return cls(kind, model, f"{prefix}-{secrets.token_hex(12)}", int(time.time()), include_usage)

    def _envelope(self, object_: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices}

    def whole(self, text: str, finish_reason: str, usage_: dict[str, Any],
              logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                      "finish_reason": finish_reason}
            return {**self._envelope("chat.completion", [choice]), "usage": usage_}
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        return {**self._envelope("text_completion", [choice]), "usage": usage_}

    def first_chunk(self) -> dict[str, Any] | None:
        """Chat streams open with the role, as OpenAI's do; text completions have none."""
        if self.kind != "chat":
            return None
        return self._chunk({"role": "assistant", "content": ""}, None)

    def chunk(self, text: str, finish_reason: str | None = None,
              logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        if self.kind == "chat":
            return self._chunk({"content": text} if text else {}, finish_reason, logprobs)
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        return self._with_null_usage(self._envelope("text_completion", [choice]))

    def _chunk(self, delta: dict[str, str], finish_reason: str | None,
               logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return self._with_null_usage(self._envelope("chat.completion.chunk", [choice]))

    def _with_null_usage(self, chunk: dict[str, Any]) -> dict[str, Any]:
        return {**chunk, "usage": None} if self.include_usage else chunk

    def usage_chunk(self, usage_: dict[str, Any]) -> dict[str, Any]:
        object_ = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._envelope(object_, []), "usage": usage_}
