"""List the device targets nomoat knows, with the facts and the recipe each one gets."""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="show one target in full (aliases such as rpi5 work too)")
    p.add_argument("--json", action="store_true", help="print as JSON")


def run(args: argparse.Namespace) -> int:
    from .errors import ConversionError
    from .targets import ALIASES, load_target, registry_names

    try:
        targets = [load_target(args.name)] if args.name else [load_target(n) for n in registry_names()]
    except ConversionError as e:
        print(f"nomoat targets: error: {e}", file=sys.stderr)
        return 1
    if args.json:
        data = [t.to_dict() for t in targets]
        print(json.dumps(data[0] if args.name else data, indent=2))
    elif args.name:
        print(describe(targets[0]))
    else:
        print(table(targets))
        print(f"\naliases: {', '.join(f'{k} -> {v}' for k, v in ALIASES.items())}. "
              "acc 4 = int8 activations (the ISA has int8 dot products), 0 = fp32.")
    return 0


def table(targets) -> str:
    lines = [f"{'target':14} {'RAM':>5} {'budget':>7}  {'quant':5} {'acc':>3} {'thr':>3} {'ctx':>5}  "
             f"{'int8 dot':8}  description"]
    for t in targets:
        r = t.recipe
        lines.append(f"{t.name:14} {t.ram_gb:4.0f}G {t.memory_budget_bytes / 2**30:6.1f}G  {r.weights:5} "
                     f"{r.accuracy_level:>3} {r.threads:>3} {r.max_context:>5}  {'yes' if t.has_int8_dot else 'no':8}  "
                     f"{t.description}")
    return "\n".join(lines)


def describe(t) -> str:
    """One target in full: facts, then the recipe."""
    r = t.recipe
    symmetric = f", no zero points in {'/'.join(r.symmetric)}" if r.symmetric and r.weights != "fp32" else ""
    return "\n".join([
        f"{t.name}: {t.description}",
        f"  soc        {t.soc} ({t.os})",
        f"  cores      {format_cores(t.cores)}",
        f"  isa        {' '.join(t.isa)} (int8 dot products: {'yes' if t.has_int8_dot else 'no'})",
        f"  memory     {t.ram_gb:g} GB RAM, an app may use {t.app_memory_share:.0%}: budget "
        f"{t.memory_budget_bytes / 2**20:.0f} MiB",
        f"  recipe     {', '.join(r.formats)}, {r.weights} weights in blocks of {r.block_size}{symmetric}, "
        f"accuracy level "
        f"{r.accuracy_level}, embedding {'int4' if r.quantize_embedding and r.weights == 'int4' else 'fp32'}, "
        f"{r.threads} threads, context {r.max_context}, KV cache {r.kv_dtype}",
    ])


def format_cores(cores: dict[str, list[str]]) -> str:
    """{"big": ["X1", "X1"], "little": [...]} -> "2x X1 (big), 4x A55 (little)"."""
    parts = []
    for cluster, names in cores.items():
        for name in dict.fromkeys(names):
            parts.append(f"{names.count(name)}x {name} ({cluster})")
    return ", ".join(parts)
