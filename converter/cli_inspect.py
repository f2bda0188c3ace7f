"""Show what a bundle holds: model, source, target and recipe (with the fields set by hand),
the memory estimate, the graph's ops and the quality report verify measured.

Reads only manifest.json and report.json (and hashes the files): no torch, no model load.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from nomoat.runtime.manifest import OnnxBackend

MiB = 2**20


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", type=Path, help="bundle folder written by `nomoat convert`")
    p.add_argument("--json", action="store_true", help="print the manifest and report.json as one JSON object")
    p.add_argument("--no-check", action="store_true", help="do not check the files' sha256")


def run(args: argparse.Namespace) -> int:
    from nomoat.runtime.errors import BundleError

    try:
        manifest, report, sha_ok, report_ok, problems = read_bundle(args.bundle, check=not args.no_check)
    except BundleError as e:
        print(f"nomoat inspect: error: {e}", file=sys.stderr)
        return 1
    manifest_ok = not any(p.startswith("manifest.json's ") for p in problems)
    files_ok = False if not (report_ok and manifest_ok) else sha_ok
    if args.json:
        print(json.dumps({"manifest": manifest, "report": report, "files_ok": files_ok}, indent=2))
    else:
        print(describe(args.bundle, manifest, report, sha_ok, checked=not args.no_check, report_ok=report_ok,
                       manifest_ok=manifest_ok))
    if files_ok is False:  # shown above, and an exit status a script can test
        print(f"nomoat inspect: error: {args.bundle} is damaged: {' '.join(problems)}", file=sys.stderr)
        return 1
    return 0


def read_bundle(bundle: Path, check: bool = True) -> tuple[dict[str, Any], dict[str, Any], bool | None, bool,
                                                           list[str]]:
    """(manifest, report, sha_ok, report_ok, problems): sha_ok is False when a file does not match its sha256,
    None when the sha256 were not checked; report_ok is False when report.json cannot be read (then report is
    {}) or holds a field of the wrong type (then that field is left out); problems says what is damaged.
    Raises BundleError for a manifest it cannot read."""
    from nomoat.runtime.errors import BundleError
    from nomoat.runtime.manifest import check_files, read_manifest

    manifest = read_manifest(bundle, verify_files=False)  # refuses unknown format versions and a bad manifest
    raw = json.loads((Path(bundle) / "manifest.json").read_text())
    sha_ok, report_ok, problems = None, True, []
    # Fields only inspect shows (the runtime reads none of them, and no sha256 covers manifest.json).
    for (section, name), why in manifest_damage(raw).items():
        del raw[section][name]  # said as damage, not drawn from
        problems.append(f"manifest.json's {why}; re-convert the model.")
    if check:  # before report.json is read: a truncated one is a damaged file, not a parse error
        try:
            manifest.check_runtime_files_listed()  # a file the runtime opens but no sha256 covers
            check_files(Path(bundle), manifest.files)
            sha_ok = True
        except BundleError as e:
            sha_ok, problems = False, [str(e)]
    report_file = Path(bundle) / "report.json"
    report: dict[str, Any] = {}
    if not report_file.is_file() and "report.json" in raw.get("files", {}):
        if not problems:  # unchecked: else check_files named it
            problems.append("report.json is missing; copy the bundle again.")
        report_ok = False
    elif report_file.is_file():
        advice = "" if problems else "; copy the bundle again or re-convert."  # said once is enough
        try:
            report = json.loads(report_file.read_text())
            if not isinstance(report, dict):
                raise ValueError("not a JSON object")
        except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            problems.append(f"report.json cannot be read ({e}){advice}")
            report, report_ok = {}, False
        damage = report_damage(report)
        for name, why in damage.items():
            del report[name]  # said as damage, not drawn from
            problems.append(f"report.json's {why}")
        if damage:
            problems[-1] += advice
            report_ok = False
    return raw, report, sha_ok, report_ok, problems


def report_damage(report: dict[str, Any]) -> dict[str, str]:
    """report.json's fields that describe reads but are of the wrong type (another nomoat version wrote them,
    or an edit), each with what is wrong: {field: problem}. Shown, they would fail with a traceback."""
    from .verify import is_number, json_kind, quality_damage

    damage = {}
    if "quality" in report and (why := quality_damage(report["quality"])):
        damage["quality"] = why
    ops = report.get("ops")
    if ops and not (isinstance(ops, dict) and all(is_number(n) for n in ops.values())):
        damage["ops"] = f"ops is {json_kind(ops)}, not an object of op counts"
    estimate = report.get("memory_estimate")
    if estimate and not _is_estimate(estimate):
        damage["memory_estimate"] = (f"memory_estimate is {json_kind(estimate)}, not an object of byte counts "
                                     f"({', '.join(_ESTIMATE_BYTES)})")
    return damage


def manifest_damage(raw: dict[str, Any]) -> dict[tuple[str, str], str]:
    """manifest.json's target and source fields (what inspect shows) of the wrong type, each with what is
    wrong: {(section, field): problem}. The runtime checks the fields it reads; these it never reads."""
    from .verify import is_number, json_kind

    def strings(value: object) -> bool:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)

    def adapters(value: object) -> bool:
        return isinstance(value, list) and all(isinstance(a, dict) and is_number(a.get("weight", 1.0)) for a in value)

    expected = {
        ("target", "memory_estimate"): (_is_estimate, "an object of byte counts"),
        ("target", "memory_budget_bytes"): (is_number, "a number"),
        ("target", "isa"): (strings, "a list of strings"),
        ("target", "recipe"): (lambda v: isinstance(v, dict), "an object"),
        ("source", "loras"): (adapters, "a list of adapters, each an object with a number as its weight"),
    }
    damage = {}
    # Both sections are objects: read_manifest refuses the bundle otherwise.
    for (section, name), (ok, kind) in expected.items():
        value = raw.get(section, {}).get(name)
        if value is not None and not ok(value):
            damage[(section, name)] = f"{section}.{name} is {json_kind(value)}, not {kind}"
    recipe = raw.get("target", {}).get("recipe")
    for name in ("overrides", "adjustments") if isinstance(recipe, dict) else ():
        if name in recipe and not strings(recipe[name]):
            damage[("target", "recipe")] = f"target.recipe.{name} is {json_kind(recipe[name])}, not a list of strings"
    return damage


# The byte counts _memory_line shows: these in every estimate, the optional ones in some.
_ESTIMATE_BYTES = ("total_bytes", "budget_bytes", "weights_bytes", "kv_cache_bytes", "activations_bytes")
_ESTIMATE_OPTIONAL = ("resident_weights_bytes", "runtime_bytes", "overhead_bytes")


def _is_estimate(estimate: object) -> bool:
    from .verify import is_number

    return isinstance(estimate, dict) and all(is_number(estimate.get(k)) for k in _ESTIMATE_BYTES) \
        and all(is_number(estimate[k]) for k in _ESTIMATE_OPTIONAL if k in estimate)


def _chat_line(chat_format: Any) -> str:
    # The Android app has no Jinja: it chats only with bundles whose template is fixed text pieces.
    if not chat_format:
        return "template needs Jinja (the Android app cannot chat with this bundle; raw prompts only)"
    if isinstance(chat_format, dict) and chat_format.get("first_turn_with_system") is None:
        # Llama-2-chat's and Mistral's templates: a system message is not fixed text around its content.
        return "template as text pieces too (the Android app can chat; without a system message)"
    return "template as text pieces too (the Android app can chat)"


def describe(bundle: Path, m: dict[str, Any], report: dict[str, Any], files_ok: bool | None,
             checked: bool = True, report_ok: bool = True, manifest_ok: bool = True) -> str:
    from .verify import format_quality_table

    target = m.get("target", {})
    recipe = target.get("recipe", {})
    estimate = target.get("memory_estimate") or report.get("memory_estimate")
    lines = [
        f"bundle     {bundle} (format {m['format_version']}, {len(m['files'])} files, "
        f"{_files_status(files_ok, checked, report_ok, manifest_ok)})",
        f"model      {_model_line(m['model'], m['max_context'])}",
        f"source     {_source_line(m.get('source', {}))}",
        f"target     {target.get('name', '?')}: {target.get('description', '')}",
        f"           {target.get('soc', '?')}; ISA {' '.join(target.get('isa', []))}; {target.get('ram_gb', '?')} GB "
        f"RAM, budget {target.get('memory_budget_bytes', 0) / MiB:.0f} MiB",
        f"recipe     {_recipe_line(recipe, m.get('quantization', {}))}",
        f"overrides  {_overrides_line(recipe)}",
        f"chat       {_chat_line(m.get('chat_format'))}",
    ]
    kv_dtype = (m.get("onnx") or {}).get("kv_dtype", "float32")
    if kv_dtype != "float32":
        # OrtForward.kt binds float buffers; a float16 cache is for nomoat.runtime (Pi, workstation) only.
        lines.append(f"KV cache   {kv_dtype} (the Android app refuses it: it keeps the cache in float32)")
    lines += [f"adjusted   {note}" for note in recipe.get("adjustments", [])]
    if estimate:
        lines.append(f"memory     {_memory_line({'max_context': m['max_context'], **estimate})}")
    if report.get("ops"):
        ops = sorted(report["ops"].items(), key=lambda item: -item[1])
        lines.append("graph      " + ", ".join(f"{n} {op}" for op, n in ops))
    if (m.get("onnx") or {}).get("min_onnxruntime"):
        # What the runtime asks for (a bundle written before 2026-12-07 names 1.18.0, below the runtime's own floor).
        floor = OnnxBackend.from_dict(m["onnx"]).required_onnxruntime()
        lines.append(f"runs on    onnxruntime >= {floor} (older releases fail on this graph or compute it wrong)")
    if "quality" in report or report_ok:
        lines.append(format_quality_table(report.get("quality", {"skipped": True})))
    else:  # not "not verified": what verify measured is in report.json, damaged or missing
        state = "damaged" if (bundle / "report.json").is_file() else "missing"
        lines.append(f"quality    not shown: report.json is {state}")
    return "\n".join(lines)


def _files_status(sha_ok: bool | None, checked: bool, report_ok: bool = True, manifest_ok: bool = True) -> str:
    if sha_ok is False:
        return "SHA256 MISMATCH: copy the bundle again"
    if not manifest_ok:  # fields only inspect reads, of the wrong type: an edit, or another nomoat version
        return "DAMAGED: manifest.json's target or source fields, re-convert"
    if not report_ok:  # unchecked, or its sha256 matches: another nomoat version wrote it, or an edit did
        return "DAMAGED: report.json unreadable, copy the bundle again" + (" or re-convert" if checked else "")
    return {True: "sha256 ok", None: "sha256 not checked"}[sha_ok]


def _model_line(model: dict[str, Any], max_context: int) -> str:
    params = model.get("parameters", 0)
    return (f"{model['architecture']}, {params / 1e6:.1f}M parameters, {model['num_layers']} layers, hidden "
            f"{model['hidden_size']}, heads {model['num_heads']} (KV {model['num_kv_heads']}) x {model['head_dim']}, "
            f"vocab {model['vocab_size']}{_window_text(model.get('sliding_window'), max_context)}")


def _window_text(window: int | None, max_context: int) -> str:
    if not window:
        return ""
    if window >= max_context:
        return f", sliding window {window} (not reached within the {max_context}-token context)"
    return f", sliding window {window}"


def _source_line(source: dict[str, Any]) -> str:
    kind = source.get("format", "?")
    extra = f" ({source['file_type']})" if source.get("file_type") else ""
    loras = source.get("loras") or []
    lora_text = ", ".join(f"{a.get('path')} (weight {a.get('weight', 1.0):g}, rank {a.get('rank', '?')})"
                          for a in loras) if loras else "none"
    return f"{kind} {source.get('path', '')}{extra}; LoRA: {lora_text}"


def _recipe_line(recipe: dict[str, Any], quant: dict[str, Any]) -> str:
    if not recipe:
        return "(not recorded)"
    weights = recipe.get("weights", quant.get("weights", "?"))
    head = quant.get("lm_head_bits")
    head_text = f", LM head {max(head, 8 if weights == 'int8' else 4)}-bit" if head and weights != "fp32" else ""
    embedding = "int4" if recipe.get("quantize_embedding") and weights == "int4" else "fp32"
    smoothing = " + smoothing" if quant.get("smoothing") and weights == "int4" and \
        quant.get("algorithm") in ("imatrix", "gptq") else ""
    algorithm = f" ({quant['algorithm']}{smoothing})" if quant.get("algorithm") and weights != "fp32" else ""
    symmetric = quant.get("symmetric") if weights != "fp32" else None
    symmetric_text = f", no zero points in {'/'.join(symmetric)}" if symmetric else ""
    # fp32 weights are plain MatMuls: no blocks, no int8 activations to set an accuracy level for
    blocks = "" if weights == "fp32" else f" in blocks of {recipe.get('block_size')}"
    level = "" if weights == "fp32" else f"accuracy level {recipe.get('accuracy_level')}, "
    threads = recipe.get("threads")
    return (f"{', '.join(recipe.get('formats', []))}, {weights} weights{algorithm}{blocks}{head_text}"
            f"{symmetric_text}, embedding {embedding}, {level}"
            f"{threads} thread{'' if threads == 1 else 's'}, context {recipe.get('max_context')}, "
            f"KV cache {recipe.get('kv_dtype')}")


def _overrides_line(recipe: dict[str, Any]) -> str:
    names = recipe.get("overrides", [])
    if not names:
        return "none (the target's recipe as is)"
    return ", ".join(f"{name}={recipe.get(name)}" for name in names)


def _memory_line(e: dict[str, Any]) -> str:
    share = e["total_bytes"] / e["budget_bytes"] if e.get("budget_bytes") else 0
    weights = e.get("resident_weights_bytes", e["weights_bytes"])  # bundles before 2026-11-26 lack it
    return (f"peak ~{e['total_bytes'] / MiB:.0f} MiB of {e['budget_bytes'] / MiB:.0f} MiB budget ({share:.0%}): "
            f"weights {weights / MiB:.0f}, KV cache {e['kv_cache_bytes'] / MiB:.0f} at "
            f"{e.get('max_context', '?')} tokens, activations {e['activations_bytes'] / MiB:.0f}, runtime "
            f"{e.get('runtime_bytes', e.get('overhead_bytes', 0)) / MiB:.0f}")
