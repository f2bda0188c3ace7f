"""Build the fp32 decoder graph on ONNX Runtime's CPU contrib ops.

One graph serves prefill and decode:

    input_ids [1, S] -> Gather(embedding)
      per layer: (Skip)SimplifiedLayerNormalization -> MatMul(packed q|k|v)
                 -> GroupQueryAttention(rotary inside, KV cache of `max_context` shared
                    between past and present) -> MatMul(o) -> SkipSimplifiedLayerNormalization
                 -> MatMul(packed gate|up) -> SiLU * up -> MatMul(down)
      Gather(logits_index) -> SkipSimplifiedLayerNormalization -> MatMul(lm_head) -> logits

Linear weights stay plain `MatMul` with fp32 initializers here; the quantize stage turns
them (and the embedding Gather) into MatMulNBits / GatherBlockQuantized with ONNX
Runtime's own quantizer. Keeping the two stages apart means the fp32 graph is the exact
float reference of the quantized one.

The large weights (the linears and the embedding table) are not copied into the graph when it
is built: their initializers are placeholders (name, type and shape, no data) and `Weights`
makes each fp32 array from the checkpoint when a later stage asks for it. A protobuf copy of
every fp32 weight, next to the loaded checkpoint, was the bulk of the converter's memory (an
int4 export held ~3 extra fp32 copies of the model); now the quantize stage rounds one weight
at a time and the export writes each initializer to the data file as soon as it is final.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from nomoat.runtime.manifest import KV_DTYPES

from .rope import cos_sin_cache
from .spec import Checkpoint, ModelSpec

OPSET = 21  # int4 initializers (MatMulNBits packing) need opset 21 and IR 10
MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class GraphIO:
    """Names of the graph's inputs and outputs; recorded in the manifest for the runtimes."""

    input_ids: str = "input_ids"
    seqlens_k: str = "seqlens_k"
    total_sequence_length: str = "total_sequence_length"
    logits_index: str = "logits_index"
    logits: str = "logits"
    past_key: str = "past_key_values.{layer}.key"
    past_value: str = "past_key_values.{layer}.value"
    present_key: str = "present.{layer}.key"
    present_value: str = "present.{layer}.value"

    def to_dict(self) -> dict[str, str]:
        return dict(self.__dict__)


class Weights(dict[str, Callable[[], np.ndarray]]):
    """The graph's large fp32 initializers, by name: each a function making the array from the checkpoint.

    The graph holds a placeholder for each (an initializer without data); an array is made only when a
    stage asks for it, and is a view of the checkpoint's tensor where the layout allows (the
    embedding table, a tied LM head), so no more than one weight's copy is alive at a time.
    """

    def array(self, name: str) -> np.ndarray:
        return self[name]()

    def tensor(self, name: str):
        """The fp32 TensorProto the graph would hold under `name` (a copy of the data)."""
        from onnx import numpy_helper

        return numpy_helper.from_array(np.ascontiguousarray(self.array(name)), name)


class _Graph:
    """Collects nodes and initializers under unique names (a thin wrapper, no model logic)."""

    def __init__(self) -> None:
        self.nodes: list = []
        self.initializers: list = []
        self.weights = Weights()
        self._count = 0

    def const(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def weight(self, name: str, shape: tuple[int, ...], make: Callable[[], np.ndarray]) -> str:
        """A large fp32 initializer left as a placeholder: `make` builds it when a stage needs it."""
        from onnx import TensorProto

        # Name, type and shape only: the graph's structure is complete, its data comes later.
        self.initializers.append(TensorProto(name=name, data_type=TensorProto.FLOAT, dims=shape))
        self.weights[name] = make
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, name: str | None = None,
           domain: str = "", outputs: list[str] | None = None, **attrs) -> list[str]:
        from onnx import helper

        self._count += 1
        name = name or f"{op_type}_{self._count}"
        outputs = outputs or [f"{name}/out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs


def _linear_weight(w) -> np.ndarray:
    """HF stores linears as [out, in]; MatMul wants B as [in, out]."""
    return w.detach().float().numpy().T


def _linear(graph: _Graph, name: str, parts: list) -> str:
    """The MatMul weight of HF linears [out, in] stacked along out (q|k|v, gate|up), as a placeholder:
    the stacked copy is made when a stage asks for it, one layer at a time."""
    import torch

    def make() -> np.ndarray:
        return _linear_weight(torch.cat(parts, dim=0) if len(parts) > 1 else parts[0])

    shape = (int(parts[0].shape[1]), sum(int(w.shape[0]) for w in parts))
    return graph.weight(name, shape, make)


def _norm(graph: _Graph, x: str, residual: str | None, gamma: str, eps: float, name: str) -> tuple[str, str]:
    """RMSNorm of (x + residual); returns (normed, new residual).

    The first norm has no residual yet: plain SimplifiedLayerNormalization, residual = x.
    """
    if residual is None:
        (out,) = graph.op("SimplifiedLayerNormalization", [x, gamma], name=name, axis=-1, epsilon=eps,
                          stash_type=1)
        return out, x
    outs = graph.op("SkipSimplifiedLayerNormalization", [x, residual, gamma], name=name, domain=MS_DOMAIN,
                    outputs=[f"{name}/out0", "", "", f"{name}/residual"], epsilon=eps)
    return outs[0], outs[3]


def _attention(graph: _Graph, ckpt: Checkpoint, layer: int, h: str, io: GraphIO,
               cos: str, sin: str, kv_dtype: str, max_context: int) -> str:
    import torch

    spec, t = ckpt.spec, ckpt.tensors
    p = f"model.layers.{layer}.self_attn."
    # q, k and v packed into one weight: one MatMul (one MatMulNBits after quantization)
    # instead of three; GroupQueryAttention accepts the packed layout directly.
    qkv_w = _linear(graph, f"layers.{layer}.attn.qkv_proj.weight", [t[p + f"{x}_proj.weight"] for x in "qkv"])
    (qkv,) = graph.op("MatMul", [h, qkv_w], name=f"layers.{layer}.attn.qkv_proj")
    if spec.attention_bias:
        qkv_b = torch.cat([t[p + "q_proj.bias"], t[p + "k_proj.bias"], t[p + "v_proj.bias"]]).float().numpy()
        (qkv,) = graph.op("Add", [qkv, graph.const(f"layers.{layer}.attn.qkv_proj.bias", qkv_b)],
                          name=f"layers.{layer}.attn.qkv_bias")
    half = kv_dtype == "float16"
    if half:
        # GroupQueryAttention takes one element type for q, k, v and the cache: an fp16 cache
        # means fp16 attention (ONNX Runtime computes the products in fp32 inside).
        (qkv,) = graph.op("Cast", [qkv], name=f"layers.{layer}.attn.to_fp16", to=_onnx_type(kv_dtype))
    attn_out = graph.op(
        "GroupQueryAttention",
        [qkv, "", "", io.past_key.format(layer=layer), io.past_value.format(layer=layer),
         io.seqlens_k, io.total_sequence_length, cos, sin],
        name=f"layers.{layer}.attn.gqa", domain=MS_DOMAIN,
        outputs=[f"layers.{layer}.attn.gqa/out0", io.present_key.format(layer=layer),
                 io.present_value.format(layer=layer)],
        num_heads=spec.num_heads, kv_num_heads=spec.num_kv_heads, do_rotary=1, rotary_interleaved=0,
        **_window_attribute(spec, max_context),
    )
    attn = attn_out[0]
    if half:
        (attn,) = graph.op("Cast", [attn], name=f"layers.{layer}.attn.to_fp32", to=_onnx_type("float32"))
    (o,) = graph.op("MatMul", [attn, _linear(graph, f"layers.{layer}.attn.o_proj.weight", [t[p + "o_proj.weight"]])],
                    name=f"layers.{layer}.attn.o_proj")
    return o


def _window_attribute(spec: ModelSpec, max_context: int) -> dict[str, int]:
    """GroupQueryAttention's local_window_size for a sliding-window model, when the window is shorter
    than the cache (otherwise every position is within it: plain causal attention, the same numbers).

    Since ONNX Runtime 1.24 the attribute counts the window as transformers' sliding_window does (the
    position itself and the window - 1 before it); 1.23 and older attend to one position more, so a
    graph with it needs 1.24 (converter/ort_floor.py)."""
    window = spec.sliding_window
    if window is None or window >= max_context:
        return {}
    return {"local_window_size": window}


def _mlp(graph: _Graph, ckpt: Checkpoint, layer: int, h: str) -> str:
    t = ckpt.tensors
    p = f"model.layers.{layer}.mlp."
    gate_up_w = _linear(graph, f"layers.{layer}.mlp.gate_up_proj.weight", [t[p + "gate_proj.weight"],
                                                                          t[p + "up_proj.weight"]])
    (gu,) = graph.op("MatMul", [h, gate_up_w], name=f"layers.{layer}.mlp.gate_up_proj")
    inter = ckpt.spec.intermediate_size
    gate, up = graph.op("Split", [gu, graph.const(f"layers.{layer}.mlp.split", np.array([inter, inter]))],
                        n_out=2, name=f"layers.{layer}.mlp.split", axis=-1)
    (sig,) = graph.op("Sigmoid", [gate], name=f"layers.{layer}.mlp.sigmoid")
    (silu,) = graph.op("Mul", [gate, sig], name=f"layers.{layer}.mlp.silu")
    (act,) = graph.op("Mul", [silu, up], name=f"layers.{layer}.mlp.act")
    (down,) = graph.op("MatMul", [act, _linear(graph, f"layers.{layer}.mlp.down_proj.weight",
                                               [t[p + "down_proj.weight"]])], name=f"layers.{layer}.mlp.down_proj")
    return down


def _onnx_type(dtype: str) -> int:
    from onnx import TensorProto

    return {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}[dtype]


def build_graph(ckpt: Checkpoint, max_context: int, io: GraphIO = GraphIO(), kv_dtype: str = "float32"):
    """(onnx.ModelProto, Weights): the whole decoder with fp32 weights and a KV cache of kv_dtype ("float32"
    or "float16": half the cache's memory, attention in fp16 around fp32 layers). The large weights are
    placeholders in the graph, made from the checkpoint by Weights when a stage asks for them."""
    from onnx import TensorProto, helper

    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"KV cache dtype {kv_dtype!r}: use one of {', '.join(KV_DTYPES)}")
    spec: ModelSpec = ckpt.spec
    t = ckpt.tensors
    g = _Graph()
    eps = spec.rms_norm_eps

    cos_np, sin_np = cos_sin_cache(spec, max_context)
    # The rotary tables go into GroupQueryAttention, so they take the cache's element type.
    cos, sin = (g.const("rotary.cos_cache", cos_np.astype(kv_dtype)),
                g.const("rotary.sin_cache", sin_np.astype(kv_dtype)))
    table = t["model.embed_tokens.weight"]
    # A view of the checkpoint's table (no copy) when it is fp32 already.
    embed = g.weight("model.embed_tokens.weight", tuple(table.shape), lambda: table.float().numpy())
    (x,) = g.op("Gather", [embed, io.input_ids], name="embed_tokens", axis=0)

    residual = None
    for layer in range(spec.num_layers):
        p = f"model.layers.{layer}."
        h, residual = _norm(g, x, residual, g.const(p + "input_layernorm.weight",
                                                     t[p + "input_layernorm.weight"].float().numpy()),
                            eps, name=f"layers.{layer}.input_norm")
        attn = _attention(g, ckpt, layer, h, io, cos, sin, kv_dtype, max_context)
        h, residual = _norm(g, attn, residual, g.const(p + "post_attention_layernorm.weight",
                                                        t[p + "post_attention_layernorm.weight"].float().numpy()),
                            eps, name=f"layers.{layer}.post_attention_norm")
        x = _mlp(g, ckpt, layer, h)

    # Only the positions the caller asks for go through the final norm and the LM head
    # (the largest matmul): the last one while generating, all of them for perplexity.
    (x_sel,) = g.op("Gather", [x, io.logits_index], name="select_positions.mlp", axis=1)
    (r_sel,) = g.op("Gather", [residual, io.logits_index], name="select_positions.residual", axis=1)
    h, _ = _norm(g, x_sel, r_sel, g.const("model.norm.weight", t["model.norm.weight"].float().numpy()), eps,
                 name="final_norm")
    lm_head = t["model.embed_tokens.weight"] if spec.tie_word_embeddings else t["lm_head.weight"]
    g.op("MatMul", [h, _linear(g, "lm_head.weight", [lm_head])], name="lm_head", outputs=[io.logits])

    kv_shape = ["batch_size", spec.num_kv_heads, "kv_capacity", spec.head_dim]
    inputs = [
        helper.make_tensor_value_info(io.input_ids, TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info(io.seqlens_k, TensorProto.INT32, ["batch_size"]),
        helper.make_tensor_value_info(io.total_sequence_length, TensorProto.INT32, []),
        helper.make_tensor_value_info(io.logits_index, TensorProto.INT64, ["num_logits"]),
    ]
    outputs = [helper.make_tensor_value_info(io.logits, TensorProto.FLOAT,
                                             ["batch_size", "num_logits", spec.vocab_size])]
    for layer in range(spec.num_layers):
        for past, present in ((io.past_key, io.present_key), (io.past_value, io.present_value)):
            inputs.append(helper.make_tensor_value_info(past.format(layer=layer), _onnx_type(kv_dtype), kv_shape))
            outputs.append(helper.make_tensor_value_info(present.format(layer=layer), _onnx_type(kv_dtype),
                                                         kv_shape))

    graph = helper.make_graph(g.nodes, "nomoat_decoder", inputs, outputs, initializer=g.initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
        producer_name="nomoat",
    )
    model.ir_version = 10
    return model, g.weights
