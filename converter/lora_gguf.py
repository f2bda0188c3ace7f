"""Read a llama.cpp LoRA adapter (what its convert_lora_to_gguf.py writes) as merge updates.

Such a file says general.type = "adapter", adapter.type = "lora", adapter.lora.alpha, and
holds `<gguf tensor>.lora_a` / `.lora_b` per adapted weight. Read back in torch order
(GGUFReader gives ggml's ne reversed):

    linear weights   lora_a [r, in], lora_b [out, r]
    token_embd       lora_a [vocab, r] (the converter writes it transposed), lora_b [hidden, r]

For 'llama' models llama.cpp's converter permutes the q/k rows into Meta's interleaved rotary
layout. The permutation acts on the rows of the update, so only lora_b carries it, and its
rows go back to HF order with the same helper that un-permutes the base weights.
llama.cpp scales an update by alpha / r (r read from the tensors; alpha 0 means scale 1); so
do we. mergekit-extract-lora may add full norm weights (`*_norm.weight`): they replace the
model's (llama.cpp itself skips them).
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

from .errors import ConversionError
from .load_gguf import _hf_name, _open, dequantize, read_metadata
from .load_meta import interleaved_to_half_rotary
from .merge import AdapterReport, LoraUpdate, Replacement, Update, _sha256
from .spec import ModelSpec
from .verify import is_number

# the GGUF architecture name llama.cpp writes for each of our architectures
_GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}


def read_lora_gguf(path: Path, spec: ModelSpec) -> tuple[AdapterReport, list[Update]]:
    reader = _open(path)
    meta = read_metadata(reader, path)
    arch = _check_header(meta, spec, path)
    alpha = meta.get("adapter.lora.alpha") or 0.0
    # a NaN alpha scaled every update to NaN, past the check of the tensors' values
    if not is_number(alpha) or not math.isfinite(alpha):
        raise ConversionError(f"{path}: adapter.lora.alpha is {alpha!r}, not a finite number; the adapter file is "
                              "damaged: convert the PEFT adapter again with llama.cpp's convert_lora_to_gguf.py.")
    alpha = float(alpha)
    pairs, updates = _group_tensors(reader.tensors, path)
    for name, (a, b) in pairs.items():
        updates.append(_lora_update(name, a, b, alpha, spec, permuted=arch == "llama", path=path))
    ranks = Counter(u.rank for u in updates if isinstance(u, LoraUpdate))
    report = AdapterReport(
        path=str(path), format="llama.cpp-gguf", sha256=_sha256(path),
        rank=ranks.most_common(1)[0][0] if ranks else 0, alpha=alpha, weight=1.0,
        base_model=meta.get("general.base_model.0.name") or meta.get("general.name"),
    )
    return report, updates


def _check_header(meta: dict[str, Any], spec: ModelSpec, path: Path) -> str:
    if meta.get("general.type") != "adapter":
        raise ConversionError(f"{path} is a GGUF model, not a LoRA adapter (general.type is "
                              f"{meta.get('general.type')!r}, not 'adapter'); pass it as --model instead.")
    if meta.get("adapter.type") != "lora":
        raise ConversionError(f"{path}: adapter.type {meta.get('adapter.type')!r} is not 'lora'; only LoRA merges.")
    if meta.get("adapter.alora.invocation_tokens") is not None:
        raise ConversionError(f"{path}: an activated LoRA (aLoRA) only acts after its invocation tokens, which a "
                              "merged model cannot do.")
    arch, expected = meta.get("general.architecture"), _GGUF_ARCH[spec.architecture]
    if arch != expected:
        raise ConversionError(f"{path} is a LoRA for a {arch!r} model, but this model is {spec.architecture!r} "
                              f"(llama.cpp calls it {expected!r}); the adapter is for another model.")
    return arch


def _group_tensors(tensors: list[Any], path: Path) -> tuple[dict[str, tuple[Any, Any]], list[Update]]:
    """({gguf weight name: (lora_a, lora_b)}, [norm replacements]) with fp32 torch tensors."""
    parts: dict[str, dict[str, Any]] = {}
    replacements: list[Update] = []
    for t in tensors:
        base, dot, suffix = t.name.rpartition(".")
        if dot and suffix in ("lora_a", "lora_b"):
            parts.setdefault(base, {})[suffix] = dequantize(t)
        elif t.name.endswith("_norm.weight"):
            replacements.append(Replacement(_hf_target(t.name, path), dequantize(t)))
        else:
            raise ConversionError(f"{path}: tensor {t.name!r} is neither a .lora_a/.lora_b half nor a norm weight; "
                                  "this is not a LoRA adapter llama.cpp writes.")
    pairs = {}
    for base, ab in parts.items():
        if set(ab) != {"lora_a", "lora_b"}:
            raise ConversionError(f"{path}: {base} has {next(iter(ab))} but not its partner; the file is incomplete.")
        pairs[base] = (ab["lora_a"], ab["lora_b"])
    return pairs, replacements


def _hf_target(gguf_name: str, path: Path) -> str:
    name = _hf_name(gguf_name)
    if name is None:
        raise ConversionError(f"{path}: adapter tensor {gguf_name!r} matches no weight of a LLaMA-style model "
                              "(unknown target module); the adapter was made for another model.")
    return name


def _lora_update(gguf_name: str, lora_a: Any, lora_b: Any, alpha: float, spec: ModelSpec, permuted: bool,
                 path: Path) -> LoraUpdate:
    target = _hf_target(gguf_name, path)
    embedding = gguf_name == "token_embd.weight"
    a = lora_a.T.contiguous() if embedding else lora_a
    b = lora_b
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise ConversionError(f"{path}: {gguf_name} has lora_a {tuple(lora_a.shape)} and lora_b {tuple(lora_b.shape)}"
                              " (torch order); their ranks disagree.")
    heads = {"q_proj": spec.num_heads, "k_proj": spec.num_kv_heads}.get(target.removesuffix(".weight").rsplit(".")[-1])
    # A mis-shaped update is left as is: validation names it with both shapes.
    if permuted and heads and b.shape[0] == heads * spec.head_dim:
        b = interleaved_to_half_rotary(b, heads)
    rank = int(a.shape[0])
    return LoraUpdate(target=target, a=a, b=b, scale=alpha / rank if alpha else 1.0, transposed=embedding)
