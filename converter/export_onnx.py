"""Export stage: fp32 graph -> quantized graph -> model.onnx + model.onnx.data.

The graph is built with its large fp32 weights as placeholders (onnx_graph.build_graph): the
quantize stage makes and rounds them one at a time, and what is left in fp32 (all of an fp32
model, an int8 model's embedding table) is made as it is written. So the export holds the
loaded checkpoint, the quantized weights and one weight's transient copies, never a second
fp32 copy of the model.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConversionError
from .onnx_graph import GraphIO, Weights, build_graph
from .ort_floor import required_onnxruntime
from .quantize import QuantRecipe, quantize_graph
from .spec import Checkpoint

if TYPE_CHECKING:
    from .calibrate import Importance

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"


@dataclass(frozen=True)
class ExportedGraph:
    ops: dict[str, int]  # op type -> node count, checked by check_fast_ops
    min_onnxruntime: str  # the oldest ONNX Runtime that runs it (ort_floor.py)


def export_onnx(ckpt: Checkpoint, out_dir: Path, recipe: QuantRecipe, max_context: int,
                io: GraphIO | None = None, progress: bool = False, importance: Importance | None = None,
                kv_dtype: str = "float32") -> ExportedGraph:
    """Write the decoder graph into out_dir; return its op counts (already checked) and the
    ONNX Runtime release it needs."""
    from tqdm import tqdm

    model, weights = build_graph(ckpt, max_context, io or GraphIO(), kv_dtype=kv_dtype)
    # disable=None: tqdm shows the bar only on a terminal, so logs and CI stay clean.
    show = None if progress and recipe.weights != "fp32" else True
    with tqdm(desc=f"quantize {recipe.weights}", unit="weight", disable=show, leave=False) as bar:
        model = quantize_graph(model, recipe, progress=bar, importance=importance, weights=weights)
    ops = check_fast_ops(model, ckpt.spec.num_layers, recipe)
    floor = required_onnxruntime(model)
    save_model(model, weights, out_dir)
    return ExportedGraph(ops=ops, min_onnxruntime=floor)


# Initializers of at least this many bytes go to the data file (onnx.save_model's size_threshold).
EXTERNAL_THRESHOLD = 1024


def save_model(model, weights: Weights, out_dir: Path) -> None:
    """Write model.onnx and model.onnx.data as onnx.save_model(save_as_external_data=True,
    all_tensors_to_one_file=True, size_threshold=EXTERNAL_THRESHOLD) does, with its own helpers,
    but one initializer at a time: each placeholder's fp32 array is made, written and dropped
    before the next is made, and each other tensor's data leaves memory once written.

    One difference: a tensor whose bytes equal an earlier one's points at those bytes rather than
    writing them again. A tied embedding's scales are the LM head's, stored in the rank
    GatherBlockQuantized demands, which MatMulNBits refuses (3.5 MB of SmolLM2's file).

    Weights go to one external file: the protobuf stays small (no 2 GB limit) and ONNX Runtime can
    memory-map the data.
    """
    import hashlib

    import onnx
    from onnx.external_data_helper import save_external_data, set_external_data

    (out_dir / DATA_FILE).unlink(missing_ok=True)  # the data is appended to the file
    written_at: dict[bytes, tuple[int, int]] = {}  # sha256 of bytes written -> their offset and length
    for tensor in model.graph.initializer:
        if tensor.name in weights:
            # Written from a tensor of its own: the graph never holds this fp32 data at all.
            written = weights.tensor(tensor.name)
            del weights[tensor.name]
        else:
            written = tensor
        # The test onnx.external_data_helper.convert_model_to_external_data applies.
        if written.HasField("raw_data") and sys.getsizeof(written.raw_data) >= EXTERNAL_THRESHOLD:
            digest = hashlib.sha256(written.raw_data).digest()
            if digest in written_at:
                set_external_data(written, DATA_FILE, *written_at[digest])
            else:
                set_external_data(written, DATA_FILE)
                save_external_data(written, str(out_dir))  # appends, and records the offset and length
                where = {e.key: e.value for e in written.external_data}
                written_at[digest] = int(where["offset"]), int(where["length"])
            written.ClearField("raw_data")
        if written is not tensor:
            tensor.CopyFrom(written)
    onnx.save_model(model, str(out_dir / MODEL_FILE))


def check_fast_ops(model, num_layers: int, recipe: QuantRecipe) -> dict[str, int]:
    """Fail loudly if the exported graph lost the contrib ops that make it fast."""
    ops = Counter(n.op_type for n in model.graph.node)
    linears_per_layer = 4  # packed qkv, o, packed gate|up, down
    expected = {
        "GroupQueryAttention": num_layers,
        "SkipSimplifiedLayerNormalization": 2 * num_layers,
        "SimplifiedLayerNormalization": 1,
    }
    if recipe.weights == "fp32":
        expected["MatMul"] = linears_per_layer * num_layers + 1
    else:
        expected["MatMulNBits"] = linears_per_layer * num_layers + 1  # + LM head
        if recipe.quantize_embedding and recipe.weights == "int4":
            expected["GatherBlockQuantized"] = 1
        if ops.get("MatMul"):
            raise ConversionError(f"{ops['MatMul']} MatMul nodes were left unquantized; the export is incomplete.")
    wrong = {op: (n, ops.get(op, 0)) for op, n in expected.items() if ops.get(op, 0) != n}
    if wrong:
        detail = ", ".join(f"{op}: expected {n}, found {got}" for op, (n, got) in wrong.items())
        raise ConversionError(f"the exported graph does not hold the expected fast ops ({detail}); this is a "
                              "nomoat bug, please report it with the model's config.json.")
    return dict(ops)
