"""Export stage: fp32 graph -> quantized graph -> model.onnx + model.onnx.data."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConversionError
from .onnx_graph import GraphIO, build_fp32_graph
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
    import onnx
    from tqdm import tqdm

    model = build_fp32_graph(ckpt, max_context, io or GraphIO(), kv_dtype=kv_dtype)
    # disable=None: tqdm shows the bar only on a terminal, so logs and CI stay clean.
    show = None if progress and recipe.weights != "fp32" else True
    with tqdm(desc=f"quantize {recipe.weights}", unit="weight", disable=show, leave=False) as bar:
        model = quantize_graph(model, recipe, progress=bar, importance=importance)
    ops = check_fast_ops(model, ckpt.spec.num_layers, recipe)
    floor = required_onnxruntime(model)
    # Weights go to one external file: the protobuf stays small (no 2 GB limit) and ONNX
    # Runtime can memory-map the data.
    onnx.save_model(model, str(out_dir / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=1024)
    return ExportedGraph(ops=ops, min_onnxruntime=floor)


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
