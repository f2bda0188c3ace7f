"""Model: load a bundle, stream text, keep chats.

    model = Model.load("build/pixel6")
    for event in model.stream("Why is the sky blue?", max_new_tokens=64):
        print(event.text, end="", flush=True)

Generation is prefill (all new prompt tokens in one forward) then one forward per token.
The KV cache remembers which tokens it holds, so any request that shares a prefix with the
previous one (the next turn of a chat, the same system prompt) only prefills what is new.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .detokenizer import IncrementalDetokenizer
from .errors import BundleError, ContextOverflowError, OrtOptionsError
from .logprobs import TokenLogprob, TokenText, token_logprob
from .manifest import Manifest, read_manifest
from .messages import as_messages
from .onnx_session import DecoderSession, SessionOptions, check_ort_option, format_ort_options, is_onnxruntime_error
from .pages import trim_heap
from .sampling import Sampler, SamplingParams, greedy_token
from .stops import StopMatcher

if TYPE_CHECKING:
    from .chat_template import ChatTemplate
    from .structured import Constraint, Grammar

Messages = Sequence[Mapping[str, str]]
# What stream() returns: a generator, so that its close() (stop an answer early) is part of its type.
EventStream = Generator["StreamEvent", None, None]


@dataclass
class GenerationStats:
    """What one request cost; prefill counts only tokens actually run (not cache hits)."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    generated_tokens: int = 0
    decode_seconds: float = 0.0
    drafted_tokens: int = 0  # prompt-lookup decoding: tokens proposed ...
    accepted_tokens: int = 0  # ... and confirmed by the model
    # The answer ended at a stop token (finish_reason "stop"), not at max_new_tokens or a full
    # context ("length", as OpenAI's API says for both).
    stop_token: bool = False
    # should_stop said yes between prefill chunks: no token was generated, and the stream ended
    # without a finish_reason (the cache keeps the chunks that ran).
    stopped_in_prefill: bool = False
    # The prompt and the answer filled the context: the answer could go no further (finish_reason
    # "length", as at max_new_tokens) and in a chat no next message fits (GenerationStats.contextFull in
    # the Android core).
    context_full: bool = False

    @property
    def time_to_first_token(self) -> float:
        return self.prefill_seconds

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        # The first generated token comes out of prefill; decode rate counts the rest.
        n = self.generated_tokens - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds else 0.0


@dataclass
class StreamEvent:
    text: str  # new text since the previous event (may be empty while a character is incomplete)
    token_id: int | None
    finish_reason: str | None = None  # "stop" | "length" on the last event
    stats: GenerationStats | None = None  # on the last event: this request's own (last_stats may be another's)
    logprob: TokenLogprob | None = None  # token_id's log-probability, when the stream was asked for logprobs


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: GenerationStats = field(default_factory=GenerationStats)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token id, when asked for


# Prompts run through the graph this many tokens at a time. ONNX Runtime's attention sizes its
# scratch by (heads x new tokens x KV capacity) and its arena keeps the largest run's buffers, so
# one 1,024-token pass held ~80 MB more at its peak than chunks do. Chunks of 64 prefill as fast as
# 128 or a whole prompt (measured at 1 and 2 threads, 128- and 1,024-token prompts) and hold ~6 MB
# less than 128 (README, "Memory").
PREFILL_CHUNK = 64


class Model:
    """A loaded bundle. Not safe for concurrent use: requests are serialized by a lock."""

    def __init__(self, bundle: Path, manifest: Manifest, session: DecoderSession, tokenizer,
                 template: ChatTemplate | None = None, prefill_chunk: int = PREFILL_CHUNK,
                 template_source: str | None = None):
        check_count("prefill_chunk", prefill_chunk)
        self.prefill_chunk = prefill_chunk
        self.bundle = bundle
        self.manifest = manifest
        self.session = session
        self.tokenizer = tokenizer
        self._template = template  # None: built from the bundle on first use (see `template`)
        self._template_source = template_source  # the template file's text, as read at load
        self._token_text: TokenText | None = None
        self._grammar_tokenizer: Any = None  # llguidance's tokenizer, built when a grammar is first used
        self.stop_token_ids = frozenset(manifest.stop_token_ids)
        self.last_stats = GenerationStats()
        self._lock = threading.Lock()
        self._lock_owner: int | None = None  # the thread that last ran the request holding the lock
        # A tokenizer that prepends a space to each piece of text between special tokens encodes a
        # chat turn's suffix on its own differently from the same text inside the whole rendering.
        self._prepends_space = prepends_space(tokenizer)
        self._added_tokens = tuple(t.content for t in tokenizer.get_added_tokens_decoder().values())

    @classmethod
    def load(cls, bundle: str | Path, threads: int | None = None, verify_checksums: bool = True,
             prefill_chunk: int = PREFILL_CHUNK, ort_options: Mapping[str, str] | None = None) -> Model:
        """Open a bundle folder written by `nomoat convert`.

        prefill_chunk: prompt tokens per graph run (peak memory grows with it; see PREFILL_CHUNK).
        ort_options: ONNX Runtime session config entries, e.g. {"mlas.disable_kleidiai": "1"}
        (applied after nomoat's own settings). Keys are checked for ONNX Runtime's dotted shape, as
        --ort-options checks them (it ignores a misspelt one silently): a bad entry, or a value ONNX
        Runtime refuses, raises OrtOptionsError (a ValueError).
        """
        from tokenizers import Tokenizer

        check_count("prefill_chunk", prefill_chunk)  # here, not after a session load of seconds
        if threads is not None:
            check_count("threads", threads)
        ort_config = tuple((ort_options or {}).items())
        for key, value in ort_config:
            # As --ort-options checks them: ONNX Runtime would take a misspelt key without a word.
            try:
                check_ort_option(key, value)
            except ValueError as e:
                raise OrtOptionsError(format_ort_options(ort_config), str(e), refused_by="nomoat") from None
        bundle = Path(bundle).expanduser()  # "~/rpi5" quoted in a script, as `nomoat convert --out` takes it
        manifest = read_manifest(bundle, verify_files=verify_checksums)
        if manifest.onnx is None:
            raise BundleError(f"{bundle} holds no ONNX model; this runtime runs ONNX bundles.")
        threads = threads if threads is not None else manifest.target.get("threads")
        # The session first: pre-packing the weights is the load's memory peak, and it should not
        # stack on the tokenizer's (parsing tokenizer.json leaves heap holes: ~6 MB for SmolLM2, trimmed below).
        try:
            session = DecoderSession(bundle, manifest, SessionOptions(threads=threads, ort_config=ort_config))
        except Exception as e:
            if not is_onnxruntime_error(e):
                raise
            reason = " ".join(str(e).split())
            if ort_config:
                raise OrtOptionsError(format_ort_options(ort_config), reason) from e
            # The files passed their checksums, or were not checked (verify_checksums=False): a damaged
            # copy is the likely cause, and ONNX Runtime's own words say which tensor.
            raise BundleError(f"ONNX Runtime could not load {bundle / manifest.onnx.model_file}: {reason[:300]}. "
                              "Copy the bundle again (Model.load checks every file's sha256 unless "
                              "verify_checksums=False), or re-convert the model.") from e
        tokenizer = Tokenizer.from_file(str(bundle / manifest.tokenizer.tokenizer_file))
        trim_heap()
        # Read now, with the files whose checksums were just checked; compiled on first use. Read at the
        # first chat instead, it could be another bundle's (a deploy swaps the folder under a running
        # server) or gone: the old weights chatting through the new template, or a 500 at every chat.
        return cls(bundle, manifest, session, tokenizer, prefill_chunk=prefill_chunk,
                   template_source=_template_source(bundle, manifest))

    def close(self) -> None:
        """Free the model now: the ONNX Runtime session (weights, KV cache) goes, and the memory freed is
        handed back to the system (glibc keeps a freed heap otherwise: five load-and-del cycles of
        SmolLM2 grew the process from 195 to 280 MB). The Model cannot run after it; closing twice is fine.
        `with Model.load(...) as model:` closes it at the block's end. Refused while a stream of this
        model is open on this thread (close() that first)."""
        with self._exclusive():
            self.session = _ClosedSession()  # type: ignore[assignment]
        trim_heap()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def template(self) -> ChatTemplate:
        """The bundle's chat template, compiled on first use: Jinja costs ~3 MB of resident memory,
        which a process that only runs token ids (a benchmark, perplexity) need not pay. The
        converter compiled this template before writing the bundle, and the manifest's checksum
        says the file is unchanged since (Model.load reads it with the files it checks)."""
        if self._template is None:
            from .chat_template import ChatTemplate

            source = self._template_source
            if source is None:  # a Model made by hand, not by load
                source = _template_source(self.bundle, self.manifest)
            self._template = ChatTemplate.for_tokenizer(source, self.manifest.tokenizer.special_tokens)
        return self._template

    @property
    def token_text(self) -> TokenText:
        """Each token's exact bytes and its text, for showing logprobs (built on first use)."""
        if self._token_text is None:
            self._token_text = TokenText(self.tokenizer)
        return self._token_text

    def constraint(self, grammar: Grammar) -> Constraint:
        """A matcher for one answer held to `grammar` (ValueError if the grammar cannot be used)."""
        from .structured import Constraint

        return Constraint(self._grammars(), grammar)

    def prepare_grammars(self) -> bool:
        """Build llguidance's view of the tokenizer now (a server: not while the first such request waits,
        holding the GIL from an answer under way); False if llguidance is not installed."""
        from .structured import StructuredOutputUnavailable

        try:
            self._grammars()
        except StructuredOutputUnavailable:
            return False
        return True

    def _grammars(self) -> Any:
        from .structured import grammar_tokenizer

        if self._grammar_tokenizer is None:
            self._grammar_tokenizer = grammar_tokenizer(self.tokenizer.to_str(), self.manifest.model.vocab_size,
                                                        self.stop_token_ids)
        return self._grammar_tokenizer

    @property
    def max_context(self) -> int:
        return self.manifest.max_context

    # -- text <-> ids ---------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Tokenize text; special-token strings in it (from a chat template) become their ids."""
        check_utf8(text, "the prompt")
        try:
            ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        except BaseException as e:
            # tokenizers' Rust panics reach Python as pyo3's PanicException, a BaseException that every
            # `except Exception` lets by: a bundle's pre-tokenizer regex that backtracks past Oniguruma's
            # retry limit on this text dropped the server's connection without an answer.
            if type(e).__name__ != "PanicException":
                raise
            raise ValueError(f"the bundle's tokenizer failed on this text ({str(e)[:200]}); its tokenizer.json "
                             "may be damaged or hostile: re-convert the model") from None
        tok = self.manifest.tokenizer
        add_bos = tok.add_bos_token if add_bos is None else add_bos
        if add_bos and tok.bos_token_id is not None and (not ids or ids[0] != tok.bos_token_id):
            ids = [tok.bos_token_id, *ids]
        return ids

    def render(self, prompt: str | Messages, system: str | None = None, raw: bool = False) -> str:
        """The text the model sees: the chat template applied, unless raw."""
        if raw:
            if not isinstance(prompt, str):
                raise TypeError("raw=True takes a plain string prompt, not a list of messages")
            if system is not None:
                # The system message goes into the chat template, which raw skips: it would be dropped without a word.
                raise ValueError("system= needs the chat template, which raw=True skips; drop one of them "
                                 "(with raw=True, write the instructions into the prompt itself)")
            check_utf8(prompt, "the prompt")
            return prompt
        messages = as_messages(prompt, system=system)
        # Checked here, where a position is one in the caller's own text, not in the rendered prompt.
        for index, message in enumerate(messages):
            check_utf8(message["content"], _content_name(prompt, system, index))
        return self.template.render(messages, add_generation_prompt=True)

    def prompt_ids(self, prompt: str | Messages, system: str | None = None, raw: bool = False) -> list[int]:
        return self.encode(self.render(prompt, system=system, raw=raw))

    def encodes_alone(self, suffix: str) -> bool:
        """Whether `suffix` tokenizes on its own as it does after the text before it. Not when the
        tokenizer prepends a space to each piece between special tokens (a legacy SentencePiece
        tokenizer.json: " </s><s>[INST]" alone would gain a "▁") and the suffix starts inside a piece;
        a suffix that starts with an added token starts a piece of its own either way."""
        return not self._prepends_space or not suffix or suffix.startswith(self._added_tokens)

    # -- generation -----------------------------------------------------------------------

    def sampling_params(self, **overrides: Any) -> SamplingParams:
        """The bundle's generation defaults, with the caller's non-None values on top."""
        return SamplingParams.over_defaults(self.manifest.generation_defaults, overrides)

    def generate_tokens(self, prompt_ids: Sequence[int], max_new_tokens: int, params: SamplingParams | None = None,
                        ignore_eos: bool = False, stats: GenerationStats | None = None,
                        extra_stop_ids: frozenset[int] = frozenset(), *, cache_prompt: bool = True,
                        should_stop: Callable[[], bool] | None = None,
                        seen: Callable[[int, np.ndarray], None] | None = None,
                        constraint: Constraint | None = None) -> Iterator[int]:
        """Yield generated token ids. The KV cache is reused for the longest common prefix
        (cache_prompt=False: the prompt runs from an empty cache, see _prefill). seen(token, logits)
        is called with each token before it is yielded, and the raw logits it was drawn from.
        With a constraint, only tokens that keep its match possible are sampled, and the answer
        ends (as at a stop token) once the match is complete.

        Stops at a stop token (the bundle's, or one of extra_stop_ids; not yielded) unless
        ignore_eos, at max_new_tokens, or when the context is full; yields nothing if should_stop
        says yes between prefill chunks. Hold the model's lock while iterating (stream/generate do).
        """
        params = params or SamplingParams()
        stats = stats if stats is not None else GenerationStats()
        prompt_ids = list(prompt_ids)
        check_count("max_new_tokens", max_new_tokens)
        if not prompt_ids:
            raise ValueError("the prompt is empty: give at least one token")
        self._check_token_ids(prompt_ids)
        if len(prompt_ids) >= self.max_context:
            raise ContextOverflowError(
                f"the prompt has {len(prompt_ids)} tokens and the bundle's context holds {self.max_context}, with "
                f"room needed for at least one answer token (at most {self.max_context - 1} prompt tokens); "
                "shorten the prompt, reset the conversation, or convert with a larger --max-context."
            )
        sampler = Sampler(params)
        stop_ids = self.stop_token_ids | extra_stop_ids
        session = self.session
        start = time.perf_counter()
        logits = self._prefill(prompt_ids, stats, cache_prompt, should_stop)
        if logits is None:
            return
        history = np.asarray(prompt_ids, dtype=np.int64)  # the repetition penalty looks at the prompt too
        generated: list[int] = []
        stats.prefill_seconds = time.perf_counter() - start
        t_first = time.perf_counter()
        while True:
            token = sampler.sample(constraint.mask(logits) if constraint else logits,
                                   np.concatenate([history, np.asarray(generated, np.int64)])
                                   if params.penalized else history, prompt_length=len(prompt_ids))
            if token in stop_ids and not ignore_eos:
                stats.stop_token = True
                break
            if constraint is not None:
                constraint.accept(token)
            if seen is not None:
                seen(token, logits)
            generated.append(token)
            stats.generated_tokens = len(generated)
            stats.decode_seconds = time.perf_counter() - t_first
            yield token
            if constraint is not None and constraint.complete:
                stats.stop_token = True  # the match is whole: as if the model had stopped there
                break
            if len(generated) >= max_new_tokens or session.length >= self.max_context:
                break
            logits = session.forward([token])
        stats.decode_seconds = time.perf_counter() - t_first

    def generate_tokens_lookahead(self, prompt_ids: Sequence[int], max_new_tokens: int, draft_tokens: int = 4,
                                  ignore_eos: bool = False, stats: GenerationStats | None = None,
                                  extra_stop_ids: frozenset[int] = frozenset(), *, cache_prompt: bool = True,
                                  should_stop: Callable[[], bool] | None = None) -> Iterator[int]:
        """Greedy generation with prompt-lookup speculative decoding: generate_tokens' tokens at
        temperature 0 (up to near-ties: the batched check can round differently from a one-token
        step), in fewer forward passes when the text repeats its context.

        Each step feeds the last token plus up to `draft_tokens` drafted ones in one pass, keeps
        the drafts the model's argmax confirms and one more token of its own, and rewinds the
        cache (a position counter) past the rejected drafts. How many it drafts follows how
        well drafts from that kind of match have done so far (lookup.Drafter): checking a draft
        costs a share of a decode step, so on text that does not repeat it drafts little.
        """
        from .lookup import Drafter, accepted_prefix

        stats = stats if stats is not None else GenerationStats()
        prompt_ids = list(prompt_ids)
        check_count("max_new_tokens", max_new_tokens)
        if not prompt_ids or len(prompt_ids) >= self.max_context:
            yield from self.generate_tokens(prompt_ids, max_new_tokens, ignore_eos=ignore_eos, stats=stats,
                                            extra_stop_ids=extra_stop_ids, cache_prompt=cache_prompt,
                                            should_stop=should_stop)
            return
        self._check_token_ids(prompt_ids)
        stop_ids = self.stop_token_ids | extra_stop_ids
        session = self.session
        start = time.perf_counter()
        logits = self._prefill(prompt_ids, stats, cache_prompt, should_stop)
        if logits is None:
            return
        next_token = greedy_token(logits)
        stats.prefill_seconds = time.perf_counter() - start
        t_first = time.perf_counter()
        context = list(prompt_ids)
        drafter = Drafter(draft_tokens)
        produced = 0
        while True:
            if next_token in stop_ids and not ignore_eos:
                stats.stop_token = True
                break
            context.append(next_token)
            produced += 1
            stats.generated_tokens = produced
            stats.decode_seconds = time.perf_counter() - t_first
            yield next_token
            # Positions left for drafts once next_token is in the cache; with none left next_token
            # still runs alone, as plain decoding's last step does.
            room = self.max_context - session.length - 1
            if produced >= max_new_tokens or room < 0:
                break
            draft = drafter.propose(context, min(room, max_new_tokens - produced))
            logits = session.forward([next_token, *draft], all_logits=bool(draft))
            predicted = [greedy_token(row) for row in np.atleast_2d(logits)]
            n_ok = accepted_prefix(draft, predicted)
            drafter.update(len(draft), n_ok)
            stats.drafted_tokens += len(draft)
            session.truncate(session.length - (len(draft) - n_ok))
            stats.decode_seconds = time.perf_counter() - t_first  # the pass that confirmed the drafts
            for token in draft[:n_ok]:
                if token in stop_ids and not ignore_eos:
                    stats.stop_token = True
                    return
                context.append(token)
                produced += 1
                stats.generated_tokens = produced
                # Counted as each reaches the answer: the confirmed ones after its end are not in it.
                stats.accepted_tokens += 1
                yield token
            if produced >= max_new_tokens:
                break
            next_token = predicted[n_ok]
        stats.decode_seconds = time.perf_counter() - t_first

    def _check_token_ids(self, ids: list[int]) -> None:
        """Every id must be a row of the embedding: the graph's Gather reads a negative one from the end
        of the table without a word, and one past it fails inside ONNX Runtime with a logged ERROR."""
        vocab = self.manifest.model.vocab_size
        array = np.asarray(ids) if ids else np.zeros(0, np.int64)
        if array.ndim != 1 or array.dtype.kind not in "iu":
            raise TypeError(f"token ids must be a flat sequence of integers, got {ids[:8]!r}"
                            f"{'...' if len(ids) > 8 else ''}; encode text with model.encode() first")
        bad = np.flatnonzero((array < 0) | (array >= vocab))
        if bad.size:
            position = int(bad[0])
            raise ValueError(f"token id {ids[position]} at position {position} is not in the vocabulary "
                             f"(0 to {vocab - 1}); give ids from this bundle's tokenizer (model.encode)")

    def _prefill(self, prompt_ids: list[int], stats: GenerationStats, cache_prompt: bool = True,
                 should_stop: Callable[[], bool] | None = None) -> np.ndarray | None:
        """Run the part of the prompt the cache does not already hold; return last logits.

        cache_prompt=False runs the whole prompt from an empty cache: with a quantized bundle the
        tokens after a cache hit run in other batches than a fresh prefill's (the last prompt
        token alone in a decode-shaped step), which rounds int8 activations differently and can
        flip a near-tie; from an empty cache the same request always gets the same answer.
        should_stop is asked between chunks (a long prompt takes seconds on a Pi, and a server's
        client may be gone): yes leaves the cache with the chunks that ran and returns None.
        """
        session = self.session
        common = _common_prefix(session.tokens, prompt_ids) if cache_prompt else 0
        # At least one token must run to produce the next-token logits.
        common = min(common, len(prompt_ids) - 1)
        session.truncate(common)
        stats.prompt_tokens = len(prompt_ids)
        stats.cached_tokens = common
        stats.prefill_tokens = len(prompt_ids) - common
        new = prompt_ids[common:]
        for start in range(0, len(new), self.prefill_chunk):
            if start and should_stop is not None and should_stop():
                stats.stopped_in_prefill = True
                stats.prefill_tokens = start  # the chunks that ran (their positions stay in the cache)
                return None
            logits = session.forward(new[start:start + self.prefill_chunk])  # the last chunk's are the answer
        return logits

    def stream(self, prompt: str | Messages, max_new_tokens: int | None = None, *, system: str | None = None,
               raw: bool = False, stop: str | Sequence[str] | None = None, temperature: float | None = None,
               top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
               repetition_penalty: float | None = None, repeat_last_n: int | None = None,
               frequency_penalty: float | None = None, presence_penalty: float | None = None,
               seed: int | None = None, prompt_lookup: int = 0, logprobs: int | None = None,
               grammar: Grammar | None = None, cache_prompt: bool = True) -> EventStream:
        """Stream the answer to a prompt (a string, wrapped in the chat template unless raw,
        or a list of {"role", "content"} messages) as text deltas.

        prompt_lookup=N drafts up to N tokens from the context per step (greedy's output up to
        near-ties, fewer forward passes on text that repeats its context). Plain greedy only: with a
        temperature above 0 or a penalty (given, or the bundle's default), logprobs or a grammar it
        raises ValueError rather than drafting nothing.
        logprobs=N gives each event its token's log-probability and the N most likely tokens at
        that position (0: the token's alone; see stream_ids). grammar= holds the answer to a
        structured.Grammar (a JSON schema, a regex, a Lark or GBNF grammar). cache_prompt=False
        computes the prompt from an empty KV cache: the same answer whatever ran before (a prompt
        continued from the cache can flip a quantized bundle's near-ties), for a whole prefill."""
        given = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                     repetition_penalty=repetition_penalty, repeat_last_n=repeat_last_n,
                     frequency_penalty=frequency_penalty, presence_penalty=presence_penalty, seed=seed)
        params = self.sampling_params(**given)
        check_lookup_applies(prompt_lookup, params, logprobs, grammar, given)
        ids = self.prompt_ids(prompt, system=system, raw=raw)
        yield from self.stream_ids(ids, max_new_tokens, params=params, stop=stop, prompt_lookup=prompt_lookup,
                                   cache_prompt=cache_prompt, logprobs=logprobs, grammar=grammar,
                                   continues_prompt=raw)

    def stream_ids(self, prompt_ids: Sequence[int], max_new_tokens: int | None = None,
                   params: SamplingParams | None = None, stop: str | Sequence[str] | None = None,
                   prompt_lookup: int = 0, *, cache_prompt: bool = True,
                   should_stop: Callable[[], bool] | None = None, logprobs: int | None = None,
                   grammar: Grammar | None = None, continues_prompt: bool = False) -> EventStream:
        """Stream the answer to prompt ids (see stream).

        params=None decodes greedily (stream() fills in the bundle's generation defaults; this one
        does not, for callers that choose every setting themselves, as the server and the bench do).
        continues_prompt: the text goes on from the prompt's (a raw prompt, a text completion), so
        its first word keeps the leading space it has there (a SentencePiece tokenizer drops it from
        the first token decoded alone; a chat answer is decoded alone, as transformers decodes it).

        cache_prompt=False computes the prompt from an empty KV cache (the same answer whatever ran
        before; see _prefill). should_stop is asked between prefill chunks; when it says yes the
        stream ends with no event (to stop while decoding, stop reading and close() it).
        logprobs=N (0 or more; None = off) puts a TokenLogprob on each event with a token: the
        log-softmax of the raw logits (before penalties, temperature and filters) at that token
        and at the N most likely ones. Such a stream decodes without prompt lookup, one token a step.
        grammar: only answers that match it are sampled (structured.Grammar; needs llguidance), the
        answer ends where the match is complete (finish_reason "stop"); also without prompt lookup.
        prompt_lookup drafts for greedy params without penalties only; other requests run plain, as a server
        applying one --prompt-lookup to every request wants (stream and Chat refuse them: check_lookup_applies).
        """
        max_new = max_new_tokens if max_new_tokens is not None else int(
            self.manifest.generation_defaults.get("max_new_tokens", 256))
        check_count("max_new_tokens", max_new)
        check_count("prompt_lookup", prompt_lookup, minimum=0)
        if logprobs is not None:
            check_count("logprobs", logprobs, minimum=0)
        from .structured import Grammar

        if grammar is not None and not isinstance(grammar, Grammar):  # "json" failed deep inside, on .source
            raise TypeError(f"grammar must be a Grammar (Grammar.json(schema), Grammar.regex(...), ...), "
                            f"got {type(grammar).__name__}")
        if params is not None and not isinstance(params, SamplingParams):
            raise TypeError("params must be a SamplingParams (model.sampling_params(...)), "
                            f"got {type(params).__name__}")
        constraint = self.constraint(grammar) if grammar is not None else None  # a bad grammar fails here
        stats = GenerationStats()
        detok = IncrementalDetokenizer(self.tokenizer, context=prompt_ids if continues_prompt else ())
        stops = StopMatcher(stop)  # None is none; a bare string is one stop string
        # The detokenizer drops special tokens from the text, so a stop string that is one
        # ("<|im_start|>", "<|endoftext|>") would never match there: it stops as a token instead.
        special_stops = self._special_token_ids(stops.strings)
        last: StreamEvent | None = None  # the event with the finish_reason, yielded after the lock is let go
        with self._exclusive():
            try:
                drafts = prompt_lookup > 0 and lookup_obstacle(params or SamplingParams(), logprobs, constraint) is None
                prefill = {"cache_prompt": cache_prompt, "should_stop": should_stop}
                scored: list[TokenLogprob] = []  # the token about to be yielded, with its logprobs
                if logprobs is not None:
                    prefill["seen"] = lambda token, logits: scored.append(token_logprob(logits, token, logprobs))
                if constraint is not None:
                    prefill["constraint"] = constraint
                tokens = (self.generate_tokens_lookahead(prompt_ids, max_new, prompt_lookup, stats=stats,
                                                         extra_stop_ids=special_stops, **prefill)
                          if drafts
                          else self.generate_tokens(prompt_ids, max_new, params, stats=stats,
                                                    extra_stop_ids=special_stops, **prefill))
                try:
                    for token in tokens:
                        logprob = scored.pop() if scored else None
                        text, stopped = stops.feed(detok.add(token))
                        if stopped:
                            last = StreamEvent(text, token, "stop", stats, logprob)
                            break
                        yield StreamEvent(text, token, logprob=logprob)
                        self._resumed()
                finally:
                    tokens.close()  # a stop string ended it: the decoding is over before the lock is let go
                if last is None and not stats.stopped_in_prefill:
                    text, stopped = stops.feed(detok.flush())
                    tail = "" if stopped else stops.flush()
                    # "length" at max_new_tokens and at a full context alike, as OpenAI's API has it.
                    reason = "stop" if stopped or stats.stop_token else "length"
                    last = StreamEvent(text + tail, None, reason, stats)
                stats.context_full = self.session.length >= self.max_context
            finally:
                # A request refused before its prefill (a prompt too long, a bad grammar) leaves the last
                # one's stats: /stats after a refused message showed zeros.
                if stats.prompt_tokens:
                    self.last_stats = stats
        # The answer is whole: a caller that stops reading at its finish_reason (Chat keeps the turn by
        # then) and keeps the stream must not hold the model; the next request, on any thread, runs.
        if last is not None:
            yield last

    def _special_token_ids(self, strings: Sequence[str]) -> frozenset[int]:
        """The ids of those strings that are each one special token (dropped from decoded text)."""
        ids = set()
        for text in strings:
            token = self.tokenizer.token_to_id(text)
            if token is not None and self.tokenizer.decode([token], skip_special_tokens=True) == "":
                ids.add(token)
        return frozenset(ids)

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """The model's lock, for one request at a time. The thread that last ran the request holding it
        asking again (a stream left open, then another request) would wait for itself forever: refused.
        A thread pool (Starlette iterating a sync generator) resumes a stream on whichever worker is
        free, so the owner is the thread that last resumed it (see _resumed), not the one that started
        it: a request on the starting thread then waits for the stream's new thread to finish it."""
        if self._lock_owner == threading.get_ident():
            raise RuntimeError("this thread has a stream of this model still open: read it to the end or "
                               "close() it before the next request (a stream that another thread has read "
                               "from since is waited for instead)")
        with self._lock:
            self._lock_owner = threading.get_ident()
            try:
                yield
            finally:
                self._lock_owner = None

    def _resumed(self) -> None:
        """A stream holding the lock runs again, on the thread that called next(): it owns the lock now."""
        self._lock_owner = threading.get_ident()

    def generate(self, prompt: str | Messages, max_new_tokens: int | None = None, **kwargs: Any) -> Completion:
        """Like stream(), but return the whole completion at once."""
        return _collect(self.stream(prompt, max_new_tokens, **kwargs), self)

    def logits(self, ids: Sequence[int], decode_tail: int | None = None) -> np.ndarray:
        """Logits for every position of `ids` from an empty cache: [len(ids), vocab] (for perplexity).

        In one graph run by default. With decode_tail the way generation gets them: the head in
        prefill_chunk-sized runs on the growing cache, then the last decode_tail tokens one decode
        step each, so these paths (the cache, the one-token binding) are what is measured; the
        verify stage checks them against the reference this way."""
        ids = list(ids)
        self._check_token_ids(ids)
        with self._exclusive():
            session = self.session
            session.reset()
            try:
                if decode_tail is None:
                    return session.forward(ids, all_logits=True)
                head = max(1, len(ids) - decode_tail)
                parts = [session.forward(ids[i:min(i + self.prefill_chunk, head)], all_logits=True)
                         for i in range(0, head, self.prefill_chunk)]
                # a decode step writes into a buffer it reuses: copied out
                parts += [session.forward([t])[None].copy() for t in ids[head:]]
                return np.concatenate(parts)
            finally:
                session.reset()

    def chat(self, system: str | None = None) -> Chat:
        return Chat(self, system)


class Chat:
    """A conversation that keeps its KV cache: each turn prefills only its new tokens.

    The next prompt is built from the tokens the model actually saw and generated, plus the
    tokenized text the chat template adds after them; re-tokenizing the whole conversation
    could split an earlier answer differently and force a re-prefill from that point. When a
    template rewrites earlier turns, the whole prompt is rendered instead and the model's
    prefix cache still reuses what matches.
    """

    def __init__(self, model: Model, system: str | None = None):
        self.model = model
        self.reset(system)

    def reset(self, system: str | None = None) -> None:
        # "" is an empty system turn, as Model.stream(system="") renders it; only None leaves the turn
        # out (and lets the template put in its default persona, if it has one).
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system is not None else []
        self._text = ""  # the conversation as the model saw it, as text ...
        self._ids: list[int] = []  # ... and as tokens

    def _prompt_ids(self, rendered: str) -> list[int]:
        if self._ids and rendered.startswith(self._text):
            suffix = rendered[len(self._text):]
            if self.model.encodes_alone(suffix):
                return self._ids + self.model.encode(suffix, add_bos=False)
        # The whole rendering: _prefill still reuses the cache up to the first token that differs
        # from what it holds (the earlier turns, unless re-tokenizing an answer split it otherwise).
        return self.model.encode(rendered)

    def stream(self, text: str, max_new_tokens: int | None = None, *, stop: str | Sequence[str] | None = None,
               prompt_lookup: int = 0, logprobs: int | None = None, grammar: Grammar | None = None,
               **sampling: Any) -> EventStream:
        """Stream the answer to the next user message. prompt_lookup=N drafts from the whole
        conversation, as Model.stream does from its prompt (plain greedy only, as there);
        logprobs and grammar as in Model.stream."""
        check_utf8(text, "the message")  # here, at a position in this message rather than in the conversation
        message = {"role": "user", "content": text}
        self.messages.append(message)
        parts: list[str] = []
        answer: list[int] = []
        done = False
        try:
            rendered = self.model.render(self.messages)
            ids = self._prompt_ids(rendered)
            params = self.model.sampling_params(**sampling)
            check_lookup_applies(prompt_lookup, params, logprobs, grammar, sampling)
            for event in self.model.stream_ids(ids, max_new_tokens, params=params, stop=stop,
                                               prompt_lookup=prompt_lookup, logprobs=logprobs, grammar=grammar):
                parts.append(event.text)
                if event.token_id is not None:
                    answer.append(event.token_id)
                if event.finish_reason is not None:
                    # The answer is whole: kept before the caller sees its end, so a caller that
                    # stops reading at the finish_reason still has the turn in the history.
                    done = True
                    if self._is_last(message):  # not after a reset() made while this answer streamed
                        self._keep_turn(rendered, ids, answer, "".join(parts))
                yield event
        except BaseException:
            # An interrupted or failed turn leaves no half-answer in the history: its own message
            # is taken back, not whatever is last after a reset() made meanwhile.
            if not done and self._is_last(message):
                self.messages.pop()
            raise

    def _is_last(self, message: dict[str, str]) -> bool:
        return bool(self.messages) and self.messages[-1] is message

    def _keep_turn(self, rendered: str, ids: list[int], answer: list[int], content: str) -> None:
        self.messages.append({"role": "assistant", "content": content})
        if self.model.tokenizer.decode(answer, skip_special_tokens=True) == content:
            self._ids = ids + answer
            self._text = rendered + self.model.tokenizer.decode(answer, skip_special_tokens=False)
        else:
            # Cut by a stop string: the tokens hold text the history does not (the stop string and
            # what followed it in its token), which the next rendering may happen to begin with
            # ("<" before "<|im_end|>") and would then leave as plain text. The next prompt starts
            # from this turn's prompt instead; _prefill still reuses the answer's matching tokens.
            self._ids, self._text = ids, rendered

    def send(self, text: str, max_new_tokens: int | None = None, **kwargs: Any) -> Completion:
        return _collect(self.stream(text, max_new_tokens, **kwargs), self.model)

    @property
    def stats(self) -> GenerationStats:
        return self.model.last_stats


class _ClosedSession:
    """A closed Model's session: any use says so, not an AttributeError on None deep inside."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError("this Model was closed (Model.close(), or the end of its with-block): "
                           "Model.load the bundle again to run it")


def _template_source(bundle: Path, manifest: Manifest) -> str | None:
    template_file = manifest.tokenizer.chat_template_file
    return (bundle / template_file).read_text(encoding="utf-8") if template_file else None


def _collect(events: Iterator[StreamEvent], model: Model) -> Completion:
    """Drain a stream into one Completion, with the stats its last event carries."""
    parts, ids, reason, stats, logprobs = [], [], "length", None, []
    for event in events:
        parts.append(event.text)
        if event.token_id is not None:
            ids.append(event.token_id)
        if event.logprob is not None:
            logprobs.append(event.logprob)
        reason = event.finish_reason or reason
        stats = event.stats or stats
    return Completion("".join(parts), ids, reason, stats or model.last_stats, logprobs)


def check_count(name: str, value: object, minimum: int = 1) -> None:
    """An SDK count (tokens, threads) must be an integer, as SamplingParams' are: 2.5 would be
    rounded somewhere unseen, '5' fail deep inside, and True pass as 1."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")


PENALTIES = {"repetition_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0}  # name -> its "off"


def lookup_obstacle(params: SamplingParams, logprobs: int | None = None, grammar: object = None) -> str | None:
    """What keeps prompt lookup from drafting, or None. It checks each draft against the argmax of the raw
    logits in one pass, so an answer that is sampled, penalized (by the tokens before each position),
    scored token by token for logprobs or held to a grammar runs plain: one token a step."""
    if not params.greedy:
        return "temperature"
    if params.penalized:
        return next(name for name, off in PENALTIES.items() if getattr(params, name) != off)
    if logprobs is not None:
        return "logprobs"
    if grammar is not None:
        return "grammar"
    return None


def check_lookup_applies(prompt_lookup: int, params: SamplingParams, logprobs: int | None = None,
                         grammar: object = None, given: Mapping[str, Any] | None = None) -> None:
    """For the SDK's stream and Chat: prompt lookup that would draft nothing, and say nothing, is a ValueError.
    stream_ids runs such a request plain (the server's --prompt-lookup applies to every request). given: the
    sampling settings the caller passed (None for those left to the bundle's defaults)."""
    check_count("prompt_lookup", prompt_lookup, minimum=0)  # a count first: "4" is no reason to talk of greedy
    if not prompt_lookup or (obstacle := lookup_obstacle(params, logprobs, grammar)) is None:
        return
    whose = "" if (given or {}).get(obstacle) is not None else " (the bundle's default)"
    if obstacle == "temperature":
        raise ValueError(f"prompt_lookup drafts only when decoding is greedy, and temperature is "
                         f"{params.temperature:g}{whose}: pass temperature=0, or prompt_lookup=0")
    if obstacle in PENALTIES:
        raise ValueError(f"prompt_lookup drafts only without penalties, and {obstacle} is "
                         f"{getattr(params, obstacle):g}{whose}: pass {obstacle}={PENALTIES[obstacle]:g}, or "
                         "prompt_lookup=0")
    raise ValueError(f"prompt_lookup does not draft with {obstacle} (each token is taken alone then): pass "
                     f"{obstacle}=None, or prompt_lookup=0")


def check_utf8(text: str, what: str) -> None:
    """Refuse text that has no UTF-8 form, naming where and how to fix it. Python holds bytes that
    were not UTF-8 in stdin or argv (a Latin-1 file) as lone surrogates (surrogateescape), which
    the tokenizer cannot take."""
    if not isinstance(text, str):
        return  # the callers' own type checks say what a non-string is
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        found = (f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF  # an undecodable byte, escaped
                 else f"a lone surrogate U+{code:04X}")
        raise ValueError(f"{what} is not valid UTF-8 text: {found} at character {e.start + 1}; convert it to "
                         "UTF-8, e.g. iconv -f LATIN1 -t UTF-8 for a Latin-1 file") from None


def prepends_space(tokenizer) -> bool:
    """Does the tokenizer put a space (or "▁") before each piece of text between special tokens: a
    Prepend normalizer, a Metaspace pre-tokenizer whose prepend_scheme is not "never", or ByteLevel's
    add_prefix_space? Read from their JSON config (the whole tokenizer's would copy the vocabulary)."""
    steps = []
    for component in (tokenizer.normalizer, tokenizer.pre_tokenizer):
        if component is not None:
            spec = json.loads(component.__getstate__())
            steps += spec.get("normalizers") or spec.get("pretokenizers") or [spec]
    for step in steps:
        kind = step.get("type")
        if kind == "Prepend" and step.get("prepend"):
            return True
        if kind == "Metaspace" and step.get("prepend_scheme", "always" if step.get("add_prefix_space", True)
                                            else "never") != "never":
            return True
        if kind == "ByteLevel" and step.get("add_prefix_space"):
            return True
    return False


def _content_name(prompt: str | Messages, system: str | None, index: int) -> str:
    """How an error names the text of as_messages(prompt, system)[index]: as the caller gave it."""
    if system is not None and index == 0:
        return "the system message"
    if isinstance(prompt, str):
        return "the prompt"
    return f"messages[{index - (system is not None)}]['content']"


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
