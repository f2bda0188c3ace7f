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
