"""List the device targets nomoat knows, with the recipe each one gets."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the full registry as JSON")


def run(args: argparse.Namespace) -> int:
    from .targets import load_target, registry_names

    targets = [load_target(n) for n in registry_names()]
    if args.json:
        print(json.dumps([t.to_dict() for t in targets], indent=2))
        return 0
    print(f"{'target':15} {'RAM':>6} {'budget':>7}  {'quant':5} {'acc':>3} {'thr':>3} {'ctx':>5}  description")
    for t in targets:
        r = t.recipe
        print(f"{t.name:15} {t.ram_gb:5.0f}G {t.memory_budget_bytes / 2**30:6.1f}G  {r.weights:5} "
              f"{r.accuracy_level:>3} {r.threads:>3} {r.max_context:>5}  {t.description}")
    return 0
