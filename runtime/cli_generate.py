"""Generate text from a bundle for one prompt. Only the generated text goes to stdout;
the prompt is wrapped in the bundle's chat template as one user turn unless --raw."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from pathlib import Path


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    # "the bundle's": its manifest's generation_defaults; a setting they leave out is SamplingParams' own
    # default (off for the filters and penalties)
    p.add_argument("--max-new-tokens", type=token_count, default=None,
                   help="most tokens to generate (default: the bundle's)")
    p.add_argument("--temperature", type=sampling_value("temperature", float), default=None,
                   help="0 = greedy (default: the bundle's)")
    p.add_argument("--top-k", type=sampling_value("top_k", int), default=None,
                   help="sample from the k most likely tokens (0 = off; default: the bundle's, else off)")
    p.add_argument("--top-p", type=sampling_value("top_p", float), default=None,
                   help="nucleus sampling mass (1 = off; default: the bundle's, else off)")
    p.add_argument("--min-p", type=sampling_value("min_p", float), default=None,
                   help="drop tokens below min-p x the top probability (default: the bundle's, else off)")
    p.add_argument("--repetition-penalty", type=sampling_value("repetition_penalty", float), default=None,
                   help="1 = off; 1.1 discourages repeats (default: the bundle's, else off)")
    p.add_argument("--repeat-last-n", type=sampling_value("repeat_last_n", int), default=None,
                   help="how many of the last tokens the penalties look at (-1 = all; 0 = none; default: the "
                        "bundle's, else -1)")
    p.add_argument("--frequency-penalty", type=sampling_value("frequency_penalty", float), default=None,
                   help="OpenAI's: lower a token's logit by this much per time it occurs (0 = off; default: the "
                        "bundle's, else off)")
    p.add_argument("--presence-penalty", type=sampling_value("presence_penalty", float), default=None,
                   help="OpenAI's: lower the logit of every token that occurred by this much (0 = off; default: "
                        "the bundle's, else off)")
    p.add_argument("--seed", type=sampling_value("seed", int), default=None,
                   help="seed for reproducible sampling (default: the bundle's, else a fresh random one)")
    p.add_argument("--stop", type=stop_text, action="append", default=[], metavar="TEXT",
                   help="stop when TEXT appears; repeatable")
    p.add_argument("--threads", type=thread_count, default=None, help="CPU threads (default: the bundle's target)")
    p.add_argument("--ort-options", type=ort_options, default={}, metavar="KEY=VALUE[,...]",
                   help="ONNX Runtime session config entries, e.g. mlas.disable_kleidiai=1 (default: none)")
    add_prompt_lookup_argument(p)
    add_grammar_arguments(p)


def add_grammar_arguments(p: argparse.ArgumentParser) -> None:
    """Structured output, with llama.cpp's flags: one of a JSON schema or a GBNF grammar, inline or in a file."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("--json-schema", dest="grammar", type=grammar_from("json"), metavar="SCHEMA",
                       help="answer in JSON that matches this JSON schema ('{}': any JSON; needs llguidance)")
    group.add_argument("--json-schema-file", dest="grammar", type=grammar_from("json", in_file=True), metavar="FILE",
                       help="as --json-schema, the schema read from FILE")
    group.add_argument("--grammar", dest="grammar", type=grammar_from("gbnf"), metavar="GBNF",
                       help="answer in text that matches this llama.cpp GBNF grammar (needs llguidance)")
    group.add_argument("--grammar-file", dest="grammar", type=grammar_from("gbnf", in_file=True), metavar="FILE",
                       help="as --grammar, the grammar read from FILE")
    p.set_defaults(grammar=None)


def grammar_from(kind: str, in_file: bool = False) -> Callable[[str], object]:
    """argparse type for the grammar flags: a structured.Grammar, or a usage error that says why (the
    schema is not JSON, llguidance is not installed) before the bundle loads."""

    def parse(value: str) -> object:
        from .structured import Grammar, StructuredOutputUnavailable

        if in_file:
            try:
                value = Path(value).expanduser().read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise argparse.ArgumentTypeError(f"cannot read {value}: {getattr(e, 'strerror', None) or e}") from None
        try:
            return Grammar.json(value) if kind == "json" else Grammar.gbnf(value)
        except (StructuredOutputUnavailable, ValueError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def add_prompt_lookup_argument(p: argparse.ArgumentParser,
                               when: str = "greedy only (--temperature 0, or a greedy bundle default; no penalty "
                                           "or grammar)") -> None:
    p.add_argument("--prompt-lookup", type=prompt_lookup, default=0, metavar="N",
                   help=f"{when}: draft up to N tokens per step from the context (speculative decoding; greedy's "
                        "output up to near-ties, faster on text that repeats its context; 0 = off)")


def prompt_lookup(value: str) -> int:
    """argparse type for --prompt-lookup: a count of drafted tokens, 0 for off."""
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of drafted tokens: give 0 (off) or more, e.g. 8")
    return n


def stop_text(value: str) -> str:
    """argparse type for --stop: text that can appear in an answer, refused at start rather than at
    the first answer (an empty string would match everywhere)."""
    from .model import check_utf8

    if not value:
        raise argparse.ArgumentTypeError("a stop string cannot be empty: give the text to stop at, e.g. --stop 'User:'")
    try:
        check_utf8(value, "the stop string")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def _at_least_one(value: str, what: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of {what}: give 1 or more")
    return n


def token_count(value: str) -> int:
    """argparse type for --max-new-tokens: 1 or more."""
    return _at_least_one(value, "tokens")


def thread_count(value: str) -> int:
    """argparse type for --threads: 1 or more (0 would quietly mean ONNX Runtime's default, all cores; as in
    `nomoat bench`, it is refused)."""
    return _at_least_one(value, "threads")


def sampling_value(name: str, kind: type) -> Callable[[str], float | int]:
    """argparse type for a sampling flag: a value SamplingParams refuses (--temperature -1) is a
    usage error that says why, at start rather than at the first answer."""

    def parse(value: str) -> float | int:
        from .sampling import SamplingParams

        try:
            number = kind(value)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{value!r} is not {what}") from None
        try:
            SamplingParams(**{name: number})
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return number

    return parse


def ort_options(spec: str) -> dict[str, str]:
    """argparse type for --ort-options: a bad entry is a usage error that says why."""
    from .onnx_session import parse_ort_options

    try:
        return parse_ort_options(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def load_model(command: str, args: argparse.Namespace):
    """Model.load with the CLI's --threads and --ort-options; an option ONNX Runtime refuses when it
    creates the session (the key has the right shape, the value is not one it takes) is a one-line
    usage error, exit 2 like the --ort-options argparse refuses, rather than its traceback. command
    ("nomoat chat", "pi_demo chat") starts the error."""
    from .errors import OrtOptionsError
    from .model import Model

    try:
        return Model.load(args.bundle, threads=args.threads, ort_options=args.ort_options)
    except OrtOptionsError as e:
        print(f"{command}: error: {refused_ort_options(e)}", file=sys.stderr)
        raise SystemExit(2) from None


def refused_ort_options(error) -> str:
    """The CLIs' words for an OrtOptionsError."""
    return f"{error.refused_by} refused --ort-options {error.options}: {error.reason}"


def sampling_kwargs(args: argparse.Namespace) -> dict:
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                repetition_penalty=args.repetition_penalty, repeat_last_n=args.repeat_last_n,
                frequency_penalty=args.frequency_penalty, presence_penalty=args.presence_penalty, seed=args.seed,
                stop=args.stop, grammar=args.grammar)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", type=Path, help="bundle folder written by `nomoat convert`")
    p.add_argument("--prompt", required=True, help="the prompt ('-' reads it from stdin)")
    p.add_argument("--system", default=None, help="system message for the chat template")
    p.add_argument("--raw", action="store_true", help="feed the prompt as-is, without the chat template")
    p.add_argument("--stats", action="store_true", help="print tokens/s to stderr")
    add_sampling_arguments(p)


def run(args: argparse.Namespace) -> int:
    try:
        return generate(args)
    except KeyboardInterrupt:
        # Ctrl-C stops the answer, as in `nomoat chat`: no traceback, the shell's status for SIGINT.
        # The newline ends the partial answer's line after the terminal's echoed ^C.
        print(file=sys.stderr)
        return 128 + signal.SIGINT


def generate(args: argparse.Namespace) -> int:
    from .errors import BundleError, ContextOverflowError
    from .model import check_utf8

    if args.raw and args.system is not None:
        # The system message goes into the chat template, which --raw skips: it would be dropped without a word.
        print("nomoat generate: error: --system needs the chat template, which --raw skips; drop one of them "
              "(with --raw, write the instructions into the prompt itself)", file=sys.stderr)
        return 2
    if args.prompt == "-" and sys.stdin is None:  # started with stdin closed (`<&-`)
        print("nomoat generate: error: --prompt - reads the prompt from standard input, which is closed; pipe "
              "the prompt in, or give it as --prompt TEXT", file=sys.stderr)
        return 2
    prompt = read_stdin() if args.prompt == "-" else args.prompt
    answer = AnswerWriter()
    try:
        # Text the tokenizer cannot take is refused before the (slow) load, not after it.
        check_utf8(prompt, "the prompt")
        if args.system is not None:
            check_utf8(args.system, "the system message")
        if refusal := lookup_refusal(args):
            print(f"nomoat generate: error: {refusal}", file=sys.stderr)
            return 2
        model = load_model("nomoat generate", args)
        end = None
        for event in model.stream(prompt, args.max_new_tokens, system=args.system, raw=args.raw,
                                  prompt_lookup=args.prompt_lookup, **sampling_kwargs(args)):
            answer.write(event.text)
            end = event if event.finish_reason is not None else end
    except (BundleError, ContextOverflowError, ValueError) as e:
        print(f"{answer.line_break()}nomoat generate: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        if not is_template_error(e):
            raise
        # A template that refuses a system message says so in its own words ("roles must alternate"):
        # name the likely cause and the way out.
        hint = (" (this model's template may not accept a system message: leave out --system)"
                if args.system is not None else "")
        print(f"{answer.line_break()}nomoat generate: error: the chat template failed: {e}{hint}", file=sys.stderr)
        return 1
    sys.stdout.write("\n")
    if end is not None and end.finish_reason == "length" and end.stats is not None and end.stats.context_full:
        sys.stdout.flush()  # the note after the answer it is about
        print(f"[the prompt and the answer filled the bundle's context of {model.max_context} tokens, which cut "
              "the answer off]", file=sys.stderr)
    if args.stats:
        s = model.last_stats
        print(f"prefill {s.prefill_tokens} tok @ {s.prefill_tokens_per_second:.1f} tok/s, decode "
              f"{s.generated_tokens} tok @ {s.decode_tokens_per_second:.1f} tok/s"
              + drafts_note(s), file=sys.stderr)
    return 0


class AnswerWriter:
    """Streams an answer to stdout and remembers whether its last line is unfinished: an error after
    part of an answer (on stderr, the same terminal) would otherwise be glued to the answer's text."""

    def __init__(self) -> None:
        self.open_line = False

    def write(self, text: str) -> None:
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()
            self.open_line = not text.endswith("\n")

    def line_break(self) -> str:
        """What an error message starts with: a newline when the answer's last line is unfinished."""
        return "\n" if self.open_line else ""


def lookup_refusal(args: argparse.Namespace) -> str | None:
    """Why --prompt-lookup cannot apply, or None: it checks drafts against the argmax of the raw logits,
    so a sampled or penalized answer, or one held to a grammar, would draft nothing, without a word. The
    bundle's default sampling counts; it is read from the manifest alone, before the (slow) load."""
    if not args.prompt_lookup:
        return None
    from .manifest import read_manifest
    from .model import PENALTIES, lookup_obstacle
    from .sampling import SamplingParams

    fields = SamplingParams.__dataclass_fields__
    given = {k: v for k, v in sampling_kwargs(args).items() if k in fields and v is not None}
    defaults = read_manifest(args.bundle, verify_files=False).generation_defaults
    try:
        params = SamplingParams.over_defaults(defaults, given)
    except ValueError:
        return None  # a bad value: the runtime's own check names it
    obstacle = lookup_obstacle(params, grammar=args.grammar)
    if obstacle is None:
        return None
    flag = "--" + obstacle.replace("_", "-")
    whose = flag if obstacle in given else f"the bundle's default {obstacle.replace('_', ' ')}"
    if obstacle == "temperature":
        return (f"--prompt-lookup drafts only when decoding is greedy, and {whose} is {params.temperature:g}: "
                "add --temperature 0 (or drop --prompt-lookup)")
    if obstacle in PENALTIES:
        return (f"--prompt-lookup drafts only without penalties, and {whose} is {getattr(params, obstacle):g}: "
                f"add {flag} {PENALTIES[obstacle]:g} (or drop --prompt-lookup)")
    return ("--prompt-lookup does not draft under a grammar (--json-schema, --grammar): the answer is built a "
            "token at a time; drop one of them")


def read_stdin() -> str:
    """All of stdin, bytes that are not in its encoding kept as surrogates (as Python keeps them in
    argv) whatever the locale says, so that the runtime's check names the byte instead of the
    decoder failing with a traceback."""
    tolerate_undecodable_stdin()
    return sys.stdin.read()


def tolerate_undecodable_stdin() -> None:
    if hasattr(sys.stdin, "reconfigure"):  # a TextIOWrapper (not a test's StringIO)
        sys.stdin.reconfigure(errors="surrogateescape")


def is_template_error(error: BaseException) -> bool:
    """Did the bundle's chat template fail (its own raise_exception, e.g. "System role not
    supported", or a Jinja error)? Without importing jinja2 (~3 MB) when nothing rendered."""
    jinja2 = sys.modules.get("jinja2")
    return jinja2 is not None and isinstance(error, jinja2.TemplateError)


def drafts_note(stats) -> str:
    """', A/D drafted tokens accepted' after prompt-lookup decoding; '' when nothing was drafted."""
    return f", {stats.accepted_tokens}/{stats.drafted_tokens} drafted tokens accepted" if stats.drafted_tokens else ""
