"""benchmarks/peers.py's GenAIGraphEngine on a toy graph with ONNX Runtime GenAI's inputs and outputs.

The toy's next token is (last input id + attention-mask length) mod V, and each present output is
its past input: the tokens show that the engine feeds the prompt once, then one token a step, with
a mask one longer each step, over KV buffers bound as both past and present.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import peers  # noqa: E402  (benchmarks/ is not a package)

VOCAB = 64


def toy_genai_model(folder: Path, layers: int = 2) -> Path:
    kv = lambda name, dims: helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)  # noqa: E731
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "S"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [1, "T"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "S", VOCAB])]
    nodes = [
        helper.make_node("Shape", ["attention_mask"], ["mask_shape"]),
        helper.make_node("Gather", ["mask_shape", "one"], ["total"], axis=0),
        helper.make_node("Add", ["input_ids", "total"], ["shifted"]),
        helper.make_node("Mod", ["shifted", "vocab"], ["next_ids"]),
        helper.make_node("OneHot", ["next_ids", "vocab", "off_on"], ["logits"], axis=-1),
    ]
    for layer in range(layers):
        for part in ("key", "value"):
            past, present = f"past_key_values.{layer}.{part}", f"present.{layer}.{part}"
            inputs.append(kv(past, [1, 1, "P", 2]))
            outputs.append(kv(present, [1, 1, "P", 2]))
            nodes.append(helper.make_node("Identity", [past], [present]))
    init = [helper.make_tensor("one", TensorProto.INT64, [], [1]),
            helper.make_tensor("vocab", TensorProto.INT64, [], [VOCAB]),
            helper.make_tensor("off_on", TensorProto.FLOAT, [2], [0.0, 1.0])]
    graph = helper.make_graph(nodes, "toy", inputs, outputs, init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, folder / "model.onnx")
    config = {"model": {"decoder": {"filename": "model.onnx", "num_key_value_heads": 1, "head_size": 2}}}
    (folder / "genai_config.json").write_text(json.dumps(config))
    return folder


def expected(prompt: list[int], new_tokens: int) -> list[int]:
    last, total, out = prompt[-1], len(prompt), []
    for _ in range(new_tokens):
        last = (last + total) % VOCAB
        out.append(last)
        total += 1
    return out


def test_genai_graph_engine_feeds_prompt_then_one_token_with_a_growing_mask(tmp_path):
    engine = peers.GenAIGraphEngine(str(toy_genai_model(tmp_path)), threads=1, context=16)
    engine.prepare()
    prompt = [5, 6, 7]
    assert list(engine.run(prompt, 6)) == expected(prompt, 6) == [10, 14, 19, 25, 32, 40]
    engine.reset()
    assert list(engine.run(prompt, 6)) == expected(prompt, 6)  # a new run starts at position 0 again
    assert engine.model_bytes() == (tmp_path / "model.onnx").stat().st_size


def test_genai_graph_engine_refuses_to_run_past_its_kv_buffer(tmp_path):
    engine = peers.GenAIGraphEngine(str(toy_genai_model(tmp_path)), threads=1, context=8)
    engine.prepare()
    with pytest.raises(ValueError, match="exceed the KV buffer of 8"):
        list(engine.run([1, 2, 3, 4, 5, 6], 4))


# -- how the peers are configured: what makes the comparison fair, checked without the libraries --


def test_llama_cpp_runs_as_llama_cpp_does_by_default_and_holds_its_weights_in_memory(monkeypatch, tmp_path):
    """Flash attention on (llama.cpp's own "auto" turns it on here; llama-cpp-python's default is off),
    no mmap (else the GGUF's file pages count in its RSS), the bench's threads for batches and tokens."""
    import types

    made = {}
    module = types.ModuleType("llama_cpp")
    module.Llama = lambda **kwargs: made.update(kwargs)
    speculative = types.ModuleType("llama_cpp.llama_speculative")
    speculative.LlamaPromptLookupDecoding = lambda num_pred_tokens: ("drafter", num_pred_tokens)
    monkeypatch.setitem(sys.modules, "llama_cpp", module)
    monkeypatch.setitem(sys.modules, "llama_cpp.llama_speculative", speculative)
    peers.LlamaCppEngine(str(tmp_path / "m.gguf"), threads=2, context=2048, prompt_lookup=8).prepare()
    assert made["flash_attn"] is True and made["use_mmap"] is False
    assert (made["n_threads"], made["n_threads_batch"], made["n_ctx"]) == (2, 2, 2048)
    assert made["draft_model"].drafter == ("drafter", 8)  # llama-cpp-python's own, counted (CountedDrafts)


def test_genai_runs_with_the_benchs_threads(monkeypatch, tmp_path):
    import types

    overlays = []

    class Config:
        def __init__(self, folder):
            self.folder = folder

        def overlay(self, text):
            overlays.append(json.loads(text))

    module = types.ModuleType("onnxruntime_genai")
    module.Config, module.Model = Config, lambda config: config
    module.GeneratorParams = lambda model: types.SimpleNamespace(set_search_options=lambda **kw: None)
    module.Generator = lambda model, params: None
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", module)
    peers.OrtGenAIEngine(str(tmp_path), threads=2, context=2048).prepare()
    assert overlays == [{"model": {"decoder": {"session_options": {"intra_op_num_threads": 2,
                                                                   "inter_op_num_threads": 1}}}}]


def test_genai_says_how_its_drafts_did_from_its_own_counters(tmp_path):
    import types

    engine = peers.OrtGenAIEngine(str(tmp_path), threads=1, context=64, prompt_lookup=8)
    engine.generator = types.SimpleNamespace(get_speculative_stats=lambda: {
        "draft_tokens_proposed": 197, "draft_tokens_evaluated": 115, "draft_tokens_accepted": 97})
    assert engine.draft_counts() == (115, 97)
    assert peers.OrtGenAIEngine(str(tmp_path), threads=1, context=64).draft_counts() is None


# -- llama.cpp's drafts, counted: llama-cpp-python does not count them itself --


class _ScriptedDrafter:
    """Hands out the drafts it was given, one list a call, then none."""

    def __init__(self, drafts: list[list[int]]):
        self.drafts, self.calls = list(drafts), []

    def __call__(self, input_ids):
        self.calls.append(list(input_ids))
        return self.drafts.pop(0) if self.drafts else []


class _CountingLlama:
    """llama-cpp-python's Llama.generate as far as drafting goes: the model counts up (next = last + 1
    mod 10); after each token it samples itself it asks the drafter for what follows the sequence so far,
    and the leading drafted tokens it agrees with come out next without asking again."""

    def __init__(self, draft_model=None, **kwargs):
        self.draft_model = draft_model

    def reset(self):
        pass

    def generate(self, tokens, **kwargs):
        seq = list(tokens)
        while True:
            seq.append((seq[-1] + 1) % 10)
            yield seq[-1]
            for drafted in (self.draft_model(list(seq)) if self.draft_model else []):
                if drafted != (seq[-1] + 1) % 10:
                    break
                seq.append(drafted)
                yield drafted


def _llama_cpp_with(monkeypatch, drafter):
    import types

    module = types.ModuleType("llama_cpp")
    module.Llama = _CountingLlama
    speculative = types.ModuleType("llama_cpp.llama_speculative")
    speculative.LlamaPromptLookupDecoding = lambda num_pred_tokens: drafter
    monkeypatch.setitem(sys.modules, "llama_cpp", module)
    monkeypatch.setitem(sys.modules, "llama_cpp.llama_speculative", speculative)


def test_llama_cpp_rounds_count_the_drafts_its_drafter_proposed_and_the_model_kept(monkeypatch, tmp_path):
    from nomoat.runtime.bench import measure_once

    # After 4: 5 and 6 kept, 0 refused (the model says 7); after 7: 8 and 9 kept, then the count of 6
    # stops the run, so the 5 drafted after 9 was checked but is no token of the output.
    drafter = _ScriptedDrafter([[5, 6, 0], [8, 9, 5]])
    _llama_cpp_with(monkeypatch, drafter)
    engine = peers.LlamaCppEngine(str(tmp_path / "m.gguf"), threads=1, context=64, prompt_lookup=3)
    engine.prepare()
    result = measure_once(engine, [1, 2, 3], 6)
    assert drafter.calls == [[1, 2, 3, 4], [1, 2, 3, 4, 5, 6, 7]]
    assert (result.drafted_tokens, result.accepted_tokens) == (6, 4)
    # the next round counts its own drafts only
    drafter.drafts = [[5, 0, 0]]
    assert engine.draft_counts() == (6, 4)
    result = measure_once(engine, [1, 2, 3], 3)
    assert (result.drafted_tokens, result.accepted_tokens) == (3, 1)


def test_plain_llama_cpp_has_no_drafts_to_count(monkeypatch, tmp_path):
    _llama_cpp_with(monkeypatch, _ScriptedDrafter([]))
    engine = peers.LlamaCppEngine(str(tmp_path / "m.gguf"), threads=1, context=64)
    engine.prepare()
    assert list(engine.run([1, 2], 3)) == [3, 4, 5] and engine.draft_counts() is None


def test_counted_drafts_keep_the_leading_tokens_the_sequence_holds_where_they_were_drafted():
    drafts = peers.CountedDrafts(_ScriptedDrafter([[7, 8, 9], [1, 2], []]))
    assert drafts([0, 7]) == [7, 8, 9] and drafts([0, 7, 8, 3]) == [1, 2] and drafts([0]) == []
    # drafted after 2 tokens: 7, 8 at positions 2 and 3 -> 1 kept (position 3 holds 3);
    # after 4 tokens: 1, 2 at positions 4, 5 -> both kept
    assert drafts.counts([0, 7, 7, 3, 1, 2]) == (5, 3)
    assert drafts.counts([0, 7, 7, 3, 1]) == (5, 2)  # a draft past the end of the output is not kept
    drafts.clear()
    assert drafts.counts([0, 7]) == (0, 0)
