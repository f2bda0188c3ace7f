"""`nomoat convert`: the whole pipeline, one stage per module.

    load -> merge -> plan -> fit -> export -> verify -> package
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConversionError
from .merge import AdapterRef


@dataclass(frozen=True)
class ConvertOptions:
    model: str
    out: Path
    target: str = "host"
    loras: tuple[AdapterRef, ...] = ()
    quant: str | None = None  # overrides the target's recipe when set
    block_size: int | None = None
    max_context: int | None = None
    threads: int | None = None
    fit: str = "strict"  # strict | shrink-context
    force: bool = False
    skip_verify: bool = False
    eval_text: Path | None = None
    max_ppl_increase: float | None = None
    progress: bool = True
    extra_source: dict[str, Any] = field(default_factory=dict)


_T0 = [0.0]


def _stage(name: str, enabled: bool) -> None:
    """One progress line per stage on stderr, with the time since the conversion started."""
    import time

    if enabled:
        print(f"[nomoat {time.perf_counter() - _T0[0]:6.1f}s] {name}", file=sys.stderr, flush=True)


def convert(opts: ConvertOptions) -> Path:
    """Run every stage and return the bundle path. Raises ConversionError on bad input."""
    import time

    from nomoat.runtime.manifest import FORMAT_VERSION, Manifest

    from .bundle import (
        CHAT_TEMPLATE_FILE,
        REPORT_FILE,
        TOKENIZER_FILE,
        check_destination,
        file_hashes,
        finalize,
        staging_dir,
        write_json,
    )
    from .export_onnx import DATA_FILE, MODEL_FILE, export_onnx
    from .fit import check_fit, largest_fitting_context
    from .load import load_checkpoint
    from .merge import merge_adapters
    from .onnx_graph import GraphIO
    from .quantize import QuantRecipe
    from .targets import load_target

    out = Path(opts.out)
    check_destination(out, opts.force)
    if opts.fit not in ("strict", "shrink-context"):
        raise ConversionError(f"--fit {opts.fit!r} is unknown; use 'strict' or 'shrink-context'.")
    target = load_target(opts.target)
    recipe = target.recipe.with_overrides(weights=opts.quant, block_size=opts.block_size,
                                          max_context=opts.max_context, threads=opts.threads)
    if recipe.formats != ("onnx",):
        raise ConversionError(f"target {target.name} asks for {recipe.formats}; this build exports ONNX only.")
    quant = QuantRecipe(weights=recipe.weights, block_size=recipe.block_size, accuracy_level=recipe.accuracy_level,
                        quantize_embedding=recipe.quantize_embedding)
    t0 = _T0[0] = time.perf_counter()

    _stage(f"load {opts.model}", opts.progress)
    ckpt = load_checkpoint(opts.model)
    spec = ckpt.spec

    adapters = []
    if opts.loras:
        _stage(f"merge {len(opts.loras)} LoRA adapter(s) in fp32", opts.progress)
        adapters = merge_adapters(ckpt, list(opts.loras))

    _stage(f"plan for {target.name}: {recipe.weights}, block {recipe.block_size}, accuracy level "
           f"{recipe.accuracy_level}, context {recipe.max_context}", opts.progress)
    max_ctx = min(recipe.max_context, spec.max_position_embeddings)
    if max_ctx != recipe.max_context:
        recipe = recipe.with_overrides(max_context=max_ctx)
    if opts.fit == "shrink-context":
        ctx = largest_fitting_context(spec, recipe, target)
        if ctx and ctx < recipe.max_context:
            _stage(f"fit: shrinking the context to {ctx} tokens to fit {target.name}", opts.progress)
            recipe = recipe.with_overrides(max_context=ctx)
    estimate = check_fit(spec, recipe, target)

    with staging_dir(out) as staging:
        _stage(f"export ONNX ({quant.weights})", opts.progress)
        ops = export_onnx(ckpt, staging, quant, recipe.max_context, progress=opts.progress)
        (staging / TOKENIZER_FILE).write_text(ckpt.tokenizer.tokenizer_json)
        template_file = None
        if ckpt.tokenizer.chat_template:
            (staging / CHAT_TEMPLATE_FILE).write_text(ckpt.tokenizer.chat_template)
            template_file = CHAT_TEMPLATE_FILE
        tok = ckpt.tokenizer
        params = sum(int(t.numel()) for t in ckpt.tensors.values())
        manifest_dict = {
            "format_version": FORMAT_VERSION,
            "model": {**{k: v for k, v in spec.to_dict().items()}, "parameters": params},
            "onnx": {"model_file": MODEL_FILE, "data_file": DATA_FILE, "io": GraphIO().to_dict(),
                     "kv_dtype": recipe.kv_dtype},
            "tokenizer": {"tokenizer_file": TOKENIZER_FILE, "chat_template_file": template_file,
                          "bos_token_id": tok.bos_token_id, "add_bos_token": tok.add_bos_token,
                          "special_tokens": tok.special_tokens},
            "max_context": recipe.max_context,
            "stop_token_ids": sorted(set(tok.eos_token_ids)),
            "generation_defaults": {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 256,
                                    **ckpt.generation_defaults},
            "quantization": quant.to_dict(),
            "target": {**target.to_dict(), "recipe": recipe.to_dict(), "threads": recipe.threads},
            "files": {},
            "source": {**ckpt.source, "loras": [a.to_dict() for a in adapters], **opts.extra_source},
        }
        # A manifest without hashes lets verify load the staged bundle through the runtime.
        manifest = Manifest.from_dict(manifest_dict)
        write_json(staging / "manifest.json", manifest.to_dict())

        report: dict[str, Any] = {"memory_estimate": estimate.to_dict(), "ops": ops, "adapters":
                                  [a.to_dict() for a in adapters]}
        if opts.skip_verify:
            report["quality"] = {"skipped": True}
        else:
            _stage("verify against the fp32 reference", opts.progress)
            from .reference import reference_model
            from .verify import verify_bundle

            quality = verify_bundle(
                staging, reference_model(ckpt), quant.weights,
                eval_text=opts.eval_text.read_text() if opts.eval_text else None,
                max_ppl_increase=opts.max_ppl_increase,
            )
            report["quality"] = quality.to_dict()
            q = quality
            _stage(f"quality: ppl {q.ppl_reference:.3f} -> {q.ppl_bundle:.3f} ({q.ppl_increase_percent:+.2f}%), "
                   f"KL {q.mean_kl:.4f}, top-1 {q.top1_agreement:.1%}, greedy {q.greedy_agreement:.0%}",
                   opts.progress)
        report["seconds"] = round(time.perf_counter() - t0, 1)
        write_json(staging / REPORT_FILE, report)
        manifest_dict["files"] = file_hashes(staging)
        finalize(staging, Manifest.from_dict(manifest_dict), out, opts.force)
    _stage(f"wrote {out}", opts.progress)
    return out
