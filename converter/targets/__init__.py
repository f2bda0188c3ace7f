"""The device registry: one TOML file per device, plus `host` detected at run time.

A target records facts (SoC, cores, ISA, RAM, the share of RAM an app may use) and the
recipe derived from them. Derived fields live in code, next to the reason for them:
int8 activations (MatMulNBits accuracy_level=4) only where the ISA has int8 dot products.
"""

from __future__ import annotations

import os
import platform
import tomllib
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import TYPE_CHECKING, Any

from nomoat.runtime.manifest import KV_DTYPES as RUNTIME_KV_DTYPES

from ..errors import ConversionError

if TYPE_CHECKING:
    from ..quantize import QuantRecipe

# Short names users type; each points at the most common variant.
ALIASES = {"rpi4": "rpi4-4gb", "rpi5": "rpi5-8gb"}

# ISA features whose int8 dot-product instructions ONNX Runtime's MatMulNBits int8 path uses
# (MLAS: sdot/smmla on arm64, vpmaddubsw/VNNI on x86). Without one of them the int8 kernel is
# not faster than the fp32 one, and accuracy level 4 only costs precision.
INT8_DOT_FEATURES = frozenset({"dotprod", "i8mm", "avx2", "avxvnni", "avx512vnni"})

# The KV cache's element types are the ones nomoat.runtime can allocate.
KV_DTYPES = RUNTIME_KV_DTYPES
FORMATS = ("onnx",)
# The shortest context a bundle may have: verify's eval windows and a chat turn need some room.
MIN_CONTEXT = 16


@dataclass(frozen=True)
class Recipe:
    """How to build a bundle for a device. Every field can be overridden on the CLI."""

    formats: tuple[str, ...] = ("onnx",)
    weights: str = "int4"
    block_size: int = 32
    accuracy_level: int = 4
    quantize_embedding: bool = True
    # The LM head (vocab x hidden, the largest matmul of a small model): 4-bit decodes faster,
    # 8-bit keeps more quality. Measured on SmolLM2-135M, see README "The graph".
    lm_head_bits: int = 4
    algorithm: str = "imatrix"  # see quantize.py
    # Rescale input channels by their activations before rounding (smooth.py): lower KL, higher top-1,
    # but not lower perplexity on a LoRA-merged model, which is issue #5's quality bar; opt-in.
    smoothing: bool = False
    # Linear layers stored without zero points (quantize.py): faster MatMulNBits; README "The graph".
    symmetric: tuple[str, ...] = ("gate_up",)
    threads: int = 4
    max_context: int = 2048
    kv_dtype: str = "float32"
    overrides: tuple[str, ...] = ()  # fields the user set by hand (--quant, --max-context, ...)
    adjustments: tuple[str, ...] = ()  # changes the converter made itself, each with its reason

    def __post_init__(self) -> None:
        if self.kv_dtype not in KV_DTYPES:
            raise ConversionError(f"KV cache dtype {self.kv_dtype!r} is not supported by nomoat.runtime; "
                                  f"use one of {', '.join(KV_DTYPES)}.")
        if not set(self.formats) <= set(FORMATS):
            raise ConversionError(f"format(s) {', '.join(self.formats)} unknown; this build exports "
                                  f"{', '.join(FORMATS)}.")
        if self.threads < 1:
            raise ConversionError(f"--threads {self.threads} must be at least 1.")
        if self.max_context < MIN_CONTEXT:
            raise ConversionError(f"--max-context {self.max_context} is too small; give at least {MIN_CONTEXT} tokens.")

    def with_overrides(self, **values: Any) -> Recipe:
        """The recipe with the user's non-None values, remembering which fields they set."""
        given = {k: v for k, v in values.items() if v is not None}
        unknown = set(given) - set(self.__dataclass_fields__)
        if unknown:
            raise ConversionError(f"unknown recipe fields: {', '.join(sorted(unknown))}")
        recipe = replace(self, **given, overrides=tuple(sorted(set(self.overrides) | set(given))))
        recipe._refuse_idle_flags(set(given))
        return recipe

    def _refuse_idle_flags(self, given: set[str]) -> None:
        """A flag the user gave that would do nothing with the rest of the recipe is refused, not recorded
        as if applied (the recipe's own defaults are left alone: an int8 model keeps an 8-bit head)."""
        from ..quantize import SMOOTHING_ALGORITHMS

        self.quant_recipe()  # a bad value (--block-size 48, --lm-head-bits 3) gets its own message first
        weights = f"--quant {self.weights}" if "weights" in given else f"the recipe's {self.weights} weights"
        if self.weights == "fp32":
            idle = {"algorithm": f"--algorithm {self.algorithm}", "block_size": f"--block-size {self.block_size}",
                    "lm_head_bits": f"--lm-head-bits {self.lm_head_bits}",
                    "smoothing": "--smoothing" if self.smoothing else "",
                    "symmetric": f"--symmetric {','.join(self.symmetric)}" if self.symmetric else ""}
            flags = [flag for name, flag in idle.items() if name in given and flag]
            if flags:
                names = " and ".join(flag.split()[0] for flag in flags)
                raise ConversionError(f"{' and '.join(flags)} {'has' if len(flags) == 1 else 'have'} no effect with "
                                      f"{weights}: nothing is rounded. Drop {names}, or choose --quant int8 or int4.")
        if "smoothing" in given and self.smoothing and self.weights == "int8":
            raise ConversionError(f"--smoothing has no effect with {weights}: it smooths only 4-bit weights, where a "
                                  "block's grid is coarse. Drop --smoothing, or use --quant int4.")
        if "smoothing" in given and self.smoothing and self.algorithm not in SMOOTHING_ALGORITHMS:
            algorithm = f"--algorithm {self.algorithm}" if "algorithm" in given else \
                f"the recipe's algorithm {self.algorithm}"
            raise ConversionError(f"--smoothing has no effect with {algorithm}: it scales channels by the "
                                  f"activations only {' and '.join(SMOOTHING_ALGORITHMS)} calibrate. Drop --smoothing, "
                                  "or use --algorithm imatrix.")
        if "lm_head_bits" in given and self.weights == "int8" and self.lm_head_bits < 8:
            raise ConversionError(f"--lm-head-bits {self.lm_head_bits} has no effect with {weights}: an int8 model's "
                                  "LM head is never below 8 bits. Drop --lm-head-bits, or use --quant int4.")

    def adjusted(self, reason: str, **values: Any) -> Recipe:
        """The recipe with values the converter chose (not the user), and why."""
        notes = [f"{k} {getattr(self, k)} -> {v}: {reason}" for k, v in values.items() if getattr(self, k) != v]
        return replace(self, **values, adjustments=(*self.adjustments, *notes)) if notes else self

    def quant_recipe(self) -> QuantRecipe:
        """The quantizer's view of this recipe."""
        from ..quantize import QuantRecipe

        return QuantRecipe(weights=self.weights, block_size=self.block_size, accuracy_level=self.accuracy_level,
                           quantize_embedding=self.quantize_embedding, lm_head_bits=self.lm_head_bits,
                           algorithm=self.algorithm, smoothing=self.smoothing,
                           symmetric=self.symmetric)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["formats"], d["overrides"], d["adjustments"] = list(self.formats), list(self.overrides), \
            list(self.adjustments)
        d["symmetric"] = list(self.symmetric)
        return d


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    os: str
    soc: str
    cores: dict[str, list[str]]  # cluster (big / mid / little) -> one entry per core
    isa: tuple[str, ...]
    ram_gb: float
    app_memory_share: float  # the share of RAM one app can use before the OS kills or swaps it
    recipe: Recipe = field(default_factory=Recipe)

    @property
    def memory_budget_bytes(self) -> int:
        return int(self.ram_gb * self.app_memory_share * 2**30)

    @property
    def has_int8_dot(self) -> bool:
        return bool(INT8_DOT_FEATURES & set(self.isa))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "description": self.description, "os": self.os, "soc": self.soc,
            "cores": self.cores, "isa": list(self.isa), "int8_dot_product": self.has_int8_dot,
            "ram_gb": self.ram_gb, "app_memory_share": self.app_memory_share,
            "memory_budget_bytes": self.memory_budget_bytes, "recipe": self.recipe.to_dict(),
        }


def accuracy_level_for(isa: set[str] | frozenset[str]) -> int:
    """MatMulNBits accuracy level: 4 (int8 activations) only where int8 dot products exist, else 0 (fp32)."""
    return 4 if INT8_DOT_FEATURES & set(isa) else 0


def _recipe_from_toml(d: dict[str, Any], isa: set[str]) -> Recipe:
    return Recipe(
        formats=tuple(d.get("format", ["onnx"])),
        weights=d.get("weights", "int4"),
        block_size=int(d.get("block_size", 32)),
        accuracy_level=int(d.get("accuracy_level", accuracy_level_for(isa))),
        quantize_embedding=bool(d.get("quantize_embedding", True)),
        lm_head_bits=int(d.get("lm_head_bits", Recipe.lm_head_bits)),
        algorithm=d.get("algorithm", Recipe.algorithm),
        smoothing=bool(d.get("smoothing", Recipe.smoothing)),
        symmetric=tuple(d.get("symmetric", Recipe.symmetric)),
        threads=int(d["threads"]),
        max_context=int(d["max_context"]),
        kv_dtype=d.get("kv_dtype", "float32"),
    )


def _target_from_toml(d: dict[str, Any]) -> Target:
    isa = tuple(d["isa"])
    return Target(name=d["name"], description=d["description"], os=d["os"], soc=d["soc"], cores=d["cores"],
                  isa=isa, ram_gb=float(d["ram_gb"]), app_memory_share=float(d["app_memory_share"]),
                  recipe=_recipe_from_toml(d.get("recipe", {}), set(isa)))


def registry_names() -> list[str]:
    files = resources.files(__package__).iterdir()
    return sorted([f.name[:-5] for f in files if f.name.endswith(".toml")] + ["host"])


def load_target(name: str) -> Target:
    name = ALIASES.get(name, name)
    if name == "host":
        return detect_host()
    path = resources.files(__package__) / f"{name}.toml"
    if not path.is_file():
        raise ConversionError(
            f"unknown target {name!r}. Known targets: {', '.join(registry_names())} "
            f"(aliases: {', '.join(f'{k}={v}' for k, v in ALIASES.items())}). `nomoat targets` lists them."
        )
    return _target_from_toml(tomllib.loads(path.read_text()))


# --- host --------------------------------------------------------------------------------

# /proc/cpuinfo flag -> the feature name the registry uses (x86 "flags", arm64 "Features").
_CPUINFO_FEATURES = {
    "avx2": "avx2", "avx512f": "avx512f", "avx_vnni": "avxvnni", "avx512_vnni": "avx512vnni", "fma": "fma",
    "f16c": "f16c", "asimd": "neon", "asimddp": "dotprod", "i8mm": "i8mm", "asimdhp": "fp16", "sve2": "sve2",
    "bf16": "bf16",
}


def detect_host() -> Target:
    """This machine, read from /proc: the cores we may use, ISA flags, RAM."""
    isa = _host_isa()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cpu = _host_cpu_name()
    # The cache stays float32 here too: a float16 one (x86-64, F16C) halves it and prefills 5-10 % faster,
    # but decoded 10 % slower after 1,024 tokens at 2 threads (A/B, README "Targets").
    recipe = Recipe(threads=cores, accuracy_level=accuracy_level_for(set(isa)))
    return Target(name="host", description=f"this machine ({platform.machine()}, {cores} cores)", os="linux",
                  soc=cpu, cores={"big": [cpu] * cores}, isa=tuple(isa), ram_gb=round(_host_ram_bytes() / 2**30, 1),
                  # a workstation runs other programs too: half its RAM for the model
                  app_memory_share=0.5, recipe=recipe)


def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def _host_isa() -> list[str]:
    flags: set[str] = set()
    for line in _cpuinfo().splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags |= set(value.split())
    return [platform.machine(), *sorted({name for flag, name in _CPUINFO_FEATURES.items() if flag in flags})]


def _host_cpu_name() -> str:
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _host_ram_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 2**30
