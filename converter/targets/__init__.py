"""The device registry: one TOML file per device, plus `host` detected at run time.

A target records facts (SoC, cores, ISA, RAM, the share of RAM an app may use) and the
recipe derived from them. Derived fields live in code, next to the reason for them:
int8 activations (MatMulNBits accuracy_level=4) only where the ISA has int8 dot products.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any

import tomllib

from ..errors import ConversionError

# Short names users type; each points at the most common variant.
ALIASES = {"rpi4": "rpi4-4gb", "rpi5": "rpi5-8gb"}

INT8_DOT_FEATURES = {"dotprod", "i8mm", "avx2", "avxvnni", "avx512vnni"}


@dataclass(frozen=True)
class Recipe:
    """How to build a bundle for a device. Every field can be overridden on the CLI."""

    formats: tuple[str, ...] = ("onnx",)
    weights: str = "int4"
    block_size: int = 32
    accuracy_level: int = 4
    quantize_embedding: bool = True
    threads: int = 4
    max_context: int = 2048
    kv_dtype: str = "float32"
    overrides: tuple[str, ...] = ()  # names of fields the user set by hand, for the manifest

    def with_overrides(self, **values: Any) -> Recipe:
        given = {k: v for k, v in values.items() if v is not None}
        unknown = set(given) - set(self.__dataclass_fields__)
        if unknown:
            raise ConversionError(f"unknown recipe fields: {', '.join(sorted(unknown))}")
        return replace(self, **given, overrides=tuple(sorted(set(self.overrides) | set(given))))

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["formats"], d["overrides"] = list(self.formats), list(self.overrides)
        return d


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    os: str
    soc: str
    cores: dict[str, list[str]]
    isa: tuple[str, ...]
    ram_gb: float
    app_memory_share: float
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
            "cores": self.cores, "isa": list(self.isa), "ram_gb": self.ram_gb,
            "app_memory_share": self.app_memory_share, "memory_budget_bytes": self.memory_budget_bytes,
            "recipe": self.recipe.to_dict(),
        }


def _recipe_from_toml(d: dict[str, Any], isa: set[str]) -> Recipe:
    return Recipe(
        formats=tuple(d.get("format", ["onnx"])),
        weights=d.get("weights", "int4"),
        block_size=int(d.get("block_size", 32)),
        # Without int8 dot products the int8-activation kernels fall back to fp32 math anyway.
        accuracy_level=int(d.get("accuracy_level", 4 if INT8_DOT_FEATURES & isa else 0)),
        quantize_embedding=bool(d.get("quantize_embedding", True)),
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


def detect_host() -> Target:
    """This machine, read from /proc: cores we may use, ISA flags, RAM."""
    isa = _host_isa()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    ram_gb = _host_ram_bytes() / 2**30
    recipe = Recipe(threads=cores, accuracy_level=4 if INT8_DOT_FEATURES & set(isa) else 0)
    return Target(name="host", description=f"this machine ({platform.machine()}, {cores} cores)", os="linux",
                  soc=_host_cpu_name(), cores={"big": ["host"] * cores}, isa=tuple(isa), ram_gb=round(ram_gb, 1),
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
    wanted = ["avx2", "avx512f", "avxvnni", "avx512vnni", "fma", "f16c", "neon", "asimd", "asimddp", "i8mm",
              "fphp"]
    isa = [f for f in wanted if f in flags]
    if "asimddp" in flags:
        isa.append("dotprod")  # the kernel calls ARM's int8 dot product "asimddp"
    return [platform.machine(), *isa]


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
