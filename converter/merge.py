"""Fold PEFT LoRA adapters into the fp32 weights, before any quantization.

    W' = W + weight * scale * (B @ A)      scale = alpha / r   (alpha / sqrt(r) with rsLoRA)

The math is a few lines; what matters is refusing adapters that do not fit the model, so
every module and shape is validated before a single weight changes.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConversionError
from .spec import Checkpoint

_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class AdapterRef:
    """`--lora PATH[:WEIGHT]`"""

    path: Path
    weight: float = 1.0

    @classmethod
    def parse(cls, text: str) -> AdapterRef:
        path, sep, weight = text.rpartition(":")
        if sep and not Path(text).exists():
            try:
                return cls(Path(path), float(weight))
            except ValueError:
                pass
        return cls(Path(text), 1.0)


@dataclass
class AdapterReport:
    path: str
    sha256: str
    rank: int
    alpha: float
    weight: float
    use_rslora: bool
    use_dora: bool
    modules: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def merge_adapters(ckpt: Checkpoint, adapters: list[AdapterRef]) -> list[AdapterReport]:
    """Merge every adapter in order into ckpt.tensors (in place); return what was applied."""
    return [merge_adapter(ckpt, ref) for ref in adapters]


def merge_adapter(ckpt: Checkpoint, ref: AdapterRef) -> AdapterReport:
    import torch

    config, tensors, weights_file = _read_adapter(ref.path)
    pairs = _lora_pairs(tensors, ref.path)
    report = AdapterReport(
        path=str(ref.path), sha256=_sha256(weights_file), rank=int(config.get("r", 8)),
        alpha=float(config.get("lora_alpha", 8)), weight=ref.weight,
        use_rslora=bool(config.get("use_rslora", False)), use_dora=bool(config.get("use_dora", False)),
    )
    if report.use_dora:
        raise ConversionError(f"{ref.path}: DoRA adapters (use_dora=true) are not supported yet; merge it with "
                              "PEFT's merge_and_unload() and pass the merged model instead.")
    # Validate everything first: a bad adapter must not leave half-merged weights behind.
    plan = []
    for module, (a, b) in pairs.items():
        target = f"{module}.weight"
        base = ckpt.tensors.get(target)
        if base is None:
            raise ConversionError(
                f"{ref.path}: adapter module {module!r} matches no weight of this model; is the adapter for "
                f"another base model ({config.get('base_model_name_or_path', 'unknown')})?"
            )
        if config.get("fan_in_fan_out"):
            a, b = b.T, a.T
        r = a.shape[0]
        if b.shape[1] != r:
            raise ConversionError(f"{ref.path}: {module} has lora_A rank {r} but lora_B rank {b.shape[1]}.")
        expected = (b.shape[0], a.shape[1])
        if tuple(base.shape) != expected:
            raise ConversionError(
                f"{ref.path}: {module} expects a weight of shape {tuple(base.shape)} but the adapter's update has "
                f"shape {expected}; the adapter was trained for another model."
            )
        rank, alpha = _rank_alpha(config, module, r)
        if rank != r:
            raise ConversionError(
                f"{ref.path}: {module} has rank {r} in its weights but {rank} in adapter_config.json; the config "
                "and weights do not belong together."
            )
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise ConversionError(f"{ref.path}: {module} holds NaN or Inf values; the adapter is corrupt.")
        scale = alpha / (math.sqrt(r) if report.use_rslora else r)
        plan.append((target, a, b, scale))
    if not plan:
        raise ConversionError(f"{ref.path}: the adapter holds no LoRA weights (lora_A/lora_B pairs).")
    for target, a, b, scale in plan:
        base = ckpt.tensors[target]
        ckpt.tensors[target] = base + (ref.weight * scale) * (b.double() @ a.double()).to(base.dtype)
        report.modules.append(target.removesuffix(".weight"))
    return report


def _read_adapter(path: Path) -> tuple[dict[str, Any], dict[str, Any], Path]:
    import torch

    if not path.is_dir():
        raise ConversionError(f"LoRA adapter {path} is not a directory; pass a PEFT adapter folder "
                              "(adapter_config.json + adapter_model.safetensors).")
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise ConversionError(f"{path} has no adapter_config.json; it is not a PEFT adapter folder.")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{config_file} is not valid JSON: {e}") from e
    if config.get("peft_type", "LORA") != "LORA":
        raise ConversionError(f"{path}: peft_type {config.get('peft_type')!r} is not LoRA; only LoRA merges.")
    st, binf = path / "adapter_model.safetensors", path / "adapter_model.bin"
    if st.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(st))
        except (SafetensorError, OSError) as e:
            raise ConversionError(f"{st} cannot be read ({e}); the adapter file is damaged.") from e
        return config, tensors, st
    if binf.is_file():
        tensors = torch.load(binf, map_location="cpu", weights_only=True)
        return config, tensors, binf
    raise ConversionError(f"{path} has neither adapter_model.safetensors nor adapter_model.bin.")


_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def _lora_pairs(tensors: dict[str, Any], path: Path) -> dict[str, tuple[Any, Any]]:
    """{hf module name: (A [r, in], B [out, r])} in fp32, from PEFT's saved keys."""
    found: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        m = _KEY.match(key)
        if not m:
            raise ConversionError(
                f"{path}: adapter key {key!r} is not a LoRA A/B weight this converter understands "
                "(embedding LoRA, modules_to_save and DoRA arrive with issue #3)."
            )
        found.setdefault(m["module"], {})[m["ab"]] = value.float()
    pairs = {}
    for module, ab in found.items():
        if set(ab) != {"A", "B"}:
            raise ConversionError(f"{path}: {module} has lora_{''.join(ab)} but not its partner.")
        if module.rsplit(".", 1)[-1] not in _LINEAR_MODULES:
            raise ConversionError(f"{path}: LoRA on {module!r} is not supported (supported: "
                                  f"{', '.join(_LINEAR_MODULES)}).")
        pairs[module] = (ab["A"], ab["B"])
    return pairs


def _rank_alpha(config: dict[str, Any], module: str, default_r: int) -> tuple[int, float]:
    """Per-module rank/alpha from rank_pattern/alpha_pattern (PEFT matches a suffix of the name)."""
    r = int(config.get("r", default_r))
    alpha = float(config.get("lora_alpha", r))
    for pattern, value in (config.get("rank_pattern") or {}).items():
        if re.match(rf"(.*\.)?{pattern}$", module):
            r = int(value)
            break
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?{pattern}$", module):
            alpha = float(value)
            break
    return r, alpha


def _sha256(path: Path) -> str:
    from nomoat.runtime.manifest import sha256_file

    return sha256_file(path)
