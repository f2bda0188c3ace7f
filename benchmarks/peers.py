"""The peers nomoat is measured against, as bench Engines (see nomoat.runtime.bench).

Each engine decodes greedily, ignores end-of-sequence so it always runs the full count, and
yields every token the moment its library hands it over. The bench workers import this module
by name (`peers:LlamaCppEngine`) with benchmarks/ on PYTHONPATH (benchmarks/run.py sets it).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path


class CountedDrafts:
    """A drafter for llama-cpp-python's `Llama(draft_model=...)`, unchanged, that records each proposal:
    llama-cpp-python does not count its drafts, and the lookup table shows how many were kept.

    `Llama.generate` asks the drafter after each token it samples with the sequence so far (prompt and
    generated tokens, that one included), checks every drafted token in its next pass, and keeps the
    leading ones its model picks itself: so a draft is kept where the sequence later holds it."""

    def __init__(self, drafter):
        self.drafter = drafter
        self.proposals: list[tuple[int, list[int]]] = []  # (length of the sequence it drafted after, draft)

    def __call__(self, input_ids, /, **kwargs):
        draft = self.drafter(input_ids, **kwargs)
        self.proposals.append((len(input_ids), [int(t) for t in draft]))
        return draft

    def counts(self, sequence: Sequence[int]) -> tuple[int, int]:
        """(drafted, kept) over the proposals so far, against the whole sequence (prompt + output).
        Drafted tokens past the end of the output (the last pass's, when the count stops the run) were
        checked but are not kept; nomoat drafts no further than the count."""
        drafted = sum(len(draft) for _, draft in self.proposals)
        kept = sum(matching_prefix(draft, sequence[start:start + len(draft)]) for start, draft in self.proposals)
        return drafted, kept

    def clear(self) -> None:
        self.proposals.clear()


def matching_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens a and b share (also where a drafted text parts from the plain one: run.py)."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


class LlamaCppEngine:
    """llama.cpp through llama-cpp-python, as its users run it: `Llama.generate` at temperature 0.

    With prompt lookup, llama-cpp-python's own drafter (LlamaPromptLookupDecoding); given a draft model,
    llama-cpp-python also computes every position's logits (its Llama(): `logits_all = ... True` when
    draft_model is set), so its drafting row measures that too: benchmarks/run.py labels it so."""

    libraries = ("llama-cpp-python",)  # the report's versions (bench_worker.library_versions)

    def __init__(self, gguf: str, threads: int, context: int, name: str = "llama.cpp Q4_0",
                 prompt_lookup: int = 0):
        self.gguf = Path(gguf)
        self.threads = threads
        self.context = context
        self.name = name
        self.prompt_lookup = prompt_lookup
        self.llm = None
        self.drafts: CountedDrafts | None = None
        self._sequence: list[int] = []  # the last run's prompt and output, for draft_counts

    def import_library(self) -> None:
        import llama_cpp  # noqa: F401
        import llama_cpp.llama_speculative  # noqa: F401

    def prepare(self) -> None:
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        # llama-cpp-python's own prompt-lookup drafter, as its users turn it on, counted.
        if self.prompt_lookup:
            self.drafts = CountedDrafts(LlamaPromptLookupDecoding(num_pred_tokens=self.prompt_lookup))
        # The same thread count for prompt batches and single tokens, like the other systems.
        # flash_attn: llama.cpp's own default ("auto") turns flash attention on for this CPU, and it
        # prefills 1.2-1.5x faster so; llama-cpp-python's default is off. use_mmap off (llama.cpp's
        # --no-mmap): the weights are read into memory, as nomoat holds its own; mapped, the GGUF's
        # file pages (~107 MB) count in its RSS beside the repacked copies it runs on, which nomoat
        # avoids by handing its own file pages back (both measured, benchmarks/README.md).
        self.llm = Llama(model_path=str(self.gguf), n_ctx=self.context, n_threads=self.threads,
                         n_threads_batch=self.threads, n_batch=min(512, self.context), verbose=False,
                         draft_model=self.drafts, flash_attn=True, use_mmap=False)

    def run(self, prompt_ids: Sequence[int], new_tokens: int) -> Iterator[int]:
        self._sequence = list(prompt_ids)
        if self.drafts is not None:
            self.drafts.clear()
        # generate() never stops by itself (no end-of-sequence check): the count stops it.
        for token in self.llm.generate(list(prompt_ids), temp=0.0, repeat_penalty=1.0, reset=True):
            self._sequence.append(int(token))
            yield int(token)
            if len(self._sequence) == len(prompt_ids) + new_tokens:
                return

    def reset(self) -> None:
        # Forget the cached tokens; otherwise generate() reuses the matching prefix of the prompt.
        self.llm.reset()

    def draft_counts(self) -> tuple[int, int] | None:
        """(drafted, kept) tokens of the last run with prompt lookup; None for plain decoding."""
        return self.drafts.counts(self._sequence) if self.drafts is not None else None

    def model_bytes(self) -> int | None:
        return self.gguf.stat().st_size


class OrtGenAIEngine:
    """ONNX Runtime GenAI on the folder its model builder wrote (`-p int4 -e cpu`)."""

    libraries = ("onnxruntime-genai", "onnxruntime")  # GenAI runs the graph on the onnxruntime package's library

    def __init__(self, model_dir: str, threads: int, context: int, name: str = "ONNX Runtime GenAI int4",
                 prompt_lookup: int = 0):
        self.model_dir = Path(model_dir)
        self.threads = threads
        self.context = context
        self.name = name
        self.prompt_lookup = prompt_lookup
        self.model = None
        self.generator = None

    def import_library(self) -> None:
        import onnxruntime_genai  # noqa: F401

    def prepare(self) -> None:
        import onnxruntime_genai as og

        config = og.Config(str(self.model_dir))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": self.threads, "inter_op_num_threads": 1}}}}))
        self.model = og.Model(config)
        self.reset()

    def run(self, prompt_ids: Sequence[int], new_tokens: int) -> Iterator[int]:
        import numpy as np

        generator = self.generator
        # append_tokens runs the prompt; the first generate_next_token only picks from those
        # logits, each later one first runs the previous token: one decode step per yield.
        generator.append_tokens(np.asarray(prompt_ids, dtype=np.int32))
        for _ in range(new_tokens):
            generator.generate_next_token()
            yield int(generator.get_next_tokens()[0])

    def reset(self) -> None:
        import onnxruntime_genai as og

        # A fresh generator per round (created here, untimed) holds an empty KV cache.
        # max_length is the shared KV buffer's size, the same context as the other systems;
        # min_length = max_length keeps end-of-sequence from ending a run early.
        self.generator = None
        params = og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=self.context, min_length=self.context)
        if self.prompt_lookup:
            # GenAI's own n-gram speculative decoding (bigram matches, as llama-cpp-python's
            # drafter). It still hands out one token per generate_next_token call.
            params.set_speculative_options(ngram_size=2, max_draft_tokens=self.prompt_lookup)
        self.generator = og.Generator(self.model, params)

    def draft_counts(self) -> tuple[int, int] | None:
        """(drafted, kept) tokens of the last run with prompt lookup, from GenAI's own counters (its
        generator is fresh each round): the drafts it checked, as nomoat counts its own."""
        if not self.prompt_lookup:
            return None
        stats = self.generator.get_speculative_stats()
        return int(stats["draft_tokens_evaluated"]), int(stats["draft_tokens_accepted"])

    def model_bytes(self) -> int | None:
        return sum(f.stat().st_size for f in self.model_dir.glob("*.onnx*"))


class GenAIGraphEngine:
    """ONNX Runtime GenAI's exported graph (the same model.onnx OrtGenAIEngine runs) driven by
    nomoat's kind of loop: plain onnxruntime from Python, nomoat's session options, IOBinding
    with one past/present buffer per layer of `context` positions. Not a peer: a diagnostic
    (`benchmarks/run.py --genai-graph`). Next to the other two rows it tells the graph from the
    loop: if it decodes like GenAI, GenAI's C++ loop is not what makes the difference; if it
    decodes like nomoat, the two graphs cost the same per token."""

    libraries = ("nomoat", "onnxruntime")

    def __init__(self, model_dir: str, threads: int, context: int, name: str = "GenAI graph, nomoat loop"):
        self.model_dir = Path(model_dir)
        self.threads = threads
        self.context = context
        self.name = name
        self.session = None

    def import_library(self) -> None:
        import onnxruntime  # noqa: F401

    def prepare(self) -> None:
        import numpy as np
        import onnxruntime as ort
        from nomoat.runtime.onnx_session import SessionOptions, ort_session

        config = json.loads((self.model_dir / "genai_config.json").read_text())["model"]["decoder"]
        self.session = ort_session(self.model_dir / config["filename"], SessionOptions(threads=self.threads))
        self.binding = self.session.io_binding()
        # Logits first, so they stay output 0 whenever they are bound again.
        self.binding.bind_output("logits", "cpu")
        self.cache = []  # the OrtValues must outlive the binding's use of them
        shape = [1, config["num_key_value_heads"], self.context, config["head_size"]]
        for past in (i.name for i in self.session.get_inputs() if i.name.startswith("past_key_values.")):
            buffer = ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, "cpu", 0)
            self.binding.bind_ortvalue_input(past, buffer)
            self.binding.bind_ortvalue_output(past.replace("past_key_values.", "present."), buffer)
            self.cache.append(buffer)
        # GenAI's graph takes the attention mask and derives the positions from it.
        self.mask = np.ones((1, self.context), np.int64)

    def run(self, prompt_ids: Sequence[int], new_tokens: int) -> Iterator[int]:
        import numpy as np

        ids = np.asarray(prompt_ids, dtype=np.int64).reshape(1, -1)
        total = ids.shape[1]
        for _ in range(new_tokens):
            if total > self.context:
                raise ValueError(f"{total} tokens exceed the KV buffer of {self.context}")
            self.binding.bind_cpu_input("input_ids", ids)
            self.binding.bind_cpu_input("attention_mask", self.mask[:, :total])
            self.binding.bind_output("logits", "cpu")
            self.session.run_with_iobinding(self.binding)
            token = int(self.binding.get_outputs()[0].numpy()[0, -1].argmax())  # logits
            yield token
            ids = np.array([[token]], dtype=np.int64)
            total += 1

    def reset(self) -> None:
        pass  # positions come from the attention mask's length: a new run starts over at 0

    def model_bytes(self) -> int | None:
        return sum(f.stat().st_size for f in self.model_dir.glob("*.onnx*"))
