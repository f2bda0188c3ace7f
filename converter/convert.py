"""`nomoat convert`: the whole pipeline, one stage per module.

    plan -> fit (from the model's metadata) -> load -> merge -> fit -> calibrate -> export -> verify -> package

The first fit check reads only the model's config or GGUF header, so a model that cannot
fit the device is refused before gigabytes of weights are read.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConversionError
from .merge import AdapterRef, notice

if TYPE_CHECKING:
    from .fit import MemoryEstimate
    from .spec import ModelSpec
    from .targets import Recipe, Target

# Test hook: when set, the quantization scales of the staged model are scrambled before
# verify, so tests can check that the quality gate refuses a broken export.
CORRUPT_WEIGHTS_ENV = "NOMOAT_TEST_CORRUPT_WEIGHTS"


@dataclass(frozen=True)
class ConvertOptions:
    model: str
    out: Path
    target: str = "host"
    loras: tuple[AdapterRef, ...] = ()
    quant: str | None = None  # overrides the target's recipe when set
    block_size: int | None = None
    lm_head_bits: int | None = None
    algorithm: str | None = None
    smoothing: bool | None = None
    symmetric: tuple[str, ...] | None = None  # linear roles without zero points (quantize.LINEAR_ROLES)
    kv_dtype: str | None = None  # float32 | float16
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


def plan(opts: ConvertOptions) -> tuple[Target, Recipe]:
    """The target and its recipe with the user's overrides (recorded as such)."""
    from .targets import load_target

    if opts.fit not in ("strict", "shrink-context"):
        raise ConversionError(f"--fit {opts.fit!r} is unknown; use 'strict' or 'shrink-context'.")
    _check_max_ppl_increase(opts.max_ppl_increase)
    target = load_target(opts.target)
    recipe = target.recipe.with_overrides(weights=opts.quant, block_size=opts.block_size,
                                          lm_head_bits=opts.lm_head_bits, algorithm=opts.algorithm,
                                          smoothing=opts.smoothing, symmetric=opts.symmetric,
                                          max_context=opts.max_context, threads=opts.threads,
                                          kv_dtype=opts.kv_dtype)
    recipe.quant_recipe()  # validates --quant / --block-size before any work
    if target.os == "android" and recipe.kv_dtype != "float32":
        raise ConversionError(f"--kv-dtype {recipe.kv_dtype} makes a bundle the Android app cannot load (it keeps "
                              f"the KV cache in float32), and --target {target.name} is a phone. Drop --kv-dtype, "
                              "or convert for a Pi or this machine (e.g. --target rpi5-8gb, or host).")
    _refuse_idle_verify_flags(opts)
    return target, recipe


def _refuse_idle_verify_flags(opts: ConvertOptions) -> None:
    """--skip-verify leaves the quality gate out: a text or limit for it would be recorded as if applied."""
    idle = [flag for flag, value in (("--eval-text", opts.eval_text), ("--max-ppl-increase", opts.max_ppl_increase))
            if value is not None]
    if opts.skip_verify and idle:
        raise ConversionError(f"{' and '.join(idle)} {'has' if len(idle) == 1 else 'have'} no effect with "
                              f"--skip-verify: nothing is measured. Drop {' and '.join(idle)}, or --skip-verify.")


def _check_max_ppl_increase(limit: float | None) -> None:
    """A limit below zero fails every bundle, and nan or inf none: both only after the whole conversion, so
    they are refused before any work."""
    import math

    if limit is not None and not (math.isfinite(limit) and limit >= 0):
        raise ConversionError(f"--max-ppl-increase {limit:g} is not a percentage the gate can use; give a number "
                              "of percent, 0 or more (e.g. 30), or leave it out for the default.")


def fit_recipe(spec: ModelSpec, recipe: Recipe, target: Target, mode: str) -> tuple[Recipe, MemoryEstimate]:
    """Clamp the context to what the model was trained for, shrink it if allowed, then check the budget."""
    from .fit import check_fit, estimate_memory, largest_fitting_context
    from .targets import MIN_CONTEXT

    if spec.max_position_embeddings < MIN_CONTEXT:
        raise ConversionError(f"the model was trained for only {spec.max_position_embeddings} positions "
                              f"(max_position_embeddings), fewer than the {MIN_CONTEXT} a bundle needs; it is not a "
                              "model to chat with. Check the model's config.")
    if recipe.max_context > spec.max_position_embeddings:
        recipe = recipe.adjusted(f"the model was trained for {spec.max_position_embeddings} positions",
                                 max_context=spec.max_position_embeddings)
    if mode == "shrink-context" and not estimate_memory(spec, recipe, target).fits:
        ctx = largest_fitting_context(spec, recipe, target)
        if 0 < ctx < recipe.max_context:
            recipe = recipe.adjusted(f"--fit shrink-context: the largest context that fits {target.name}",
                                     max_context=ctx)
    return recipe, check_fit(spec, recipe, target)


def convert(opts: ConvertOptions) -> Path:
    """Run every stage and return the bundle path (where --out points, absolute). Raises ConversionError on bad
    input, and KeyboardInterrupt on Ctrl-C (bundle.Interrupted, a subclass, on SIGTERM/SIGHUP) with nothing written."""
    from .bundle import signals_interrupt

    with signals_interrupt():  # SIGTERM/SIGHUP unwind like Ctrl-C: the staging folder goes with them
        return _convert(opts)


def _convert(opts: ConvertOptions) -> Path:
    import time

    from .bundle import BUNDLE_OUTPUT, check_destination, remove_stale_staging, staging_dir
    from .load import load_checkpoint
    from .merge import merge_adapters, require_adapter_paths
    from .peek import peek_spec
    from .verify import check_eval_text, read_eval_text

    sources = [("--model", opts.model), *(("--lora", ref.path) for ref in opts.loras)]
    out = check_destination(Path(opts.out), opts.force, sources=sources, replaces=BUNDLE_OUTPUT)
    require_adapter_paths(opts.loras)
    target, recipe = plan(opts)
    eval_text = None if opts.skip_verify else read_eval_text(opts.eval_text)  # a bad path fails before any work
    t0 = _T0[0] = time.perf_counter()
    for stale in remove_stale_staging(out):
        _stage(f"removed {stale.name}, left behind by a conversion that was killed", opts.progress)
    _stage(f"plan for {target.name}: {_describe(recipe)}", opts.progress)

    spec = peek_spec(opts.model)
    if spec is not None:  # refuse what cannot fit before reading any weights
        spec.check_exportable()
        recipe, _ = fit_recipe(spec, recipe, target, opts.fit)
        _notice_padded_blocks(spec, recipe)

    _stage(f"load {opts.model}", opts.progress)
    ckpt = load_checkpoint(opts.model)
    ckpt.spec.check_exportable()
    _check_chat_template(ckpt.tokenizer)
    if eval_text is not None:
        check_eval_text(eval_text, ckpt.tokenizer)  # a text too short for verify fails before calibrate
    adapters = []
    if opts.loras:
        _stage(f"merge {len(opts.loras)} LoRA adapter(s) in fp32", opts.progress)
        adapters = merge_adapters(ckpt, list(opts.loras))

    recipe, estimate = fit_recipe(ckpt.spec, recipe, target, opts.fit)
    for note in recipe.adjustments:
        _stage(f"fit: {note}", opts.progress)
    window = ckpt.unrecorded_window
    if window is not None and recipe.max_context > window:
        # not an error: llama.cpp runs these files the same way, and within the window the outputs agree
        notice(f"{opts.model} looks like Mistral 7B v0.1 or a fine-tune of it (its general.name says Mistral), "
                f"which attends within a {window:,}-token sliding window that a GGUF does not record: the bundle "
                f"attends to all {recipe.max_context:,} positions, as llama.cpp does, so past {window:,} tokens it "
                "differs from the model. To keep the window, convert the Hugging Face folder instead, or pass "
                f"--max-context {window}.")
    _stage(f"fit: estimated peak {estimate.summary()}", opts.progress)

    try:
        with staging_dir(out) as staging:
            manifest, report = _build(ckpt, adapters, recipe, target, estimate, staging, eval_text, opts)
            report["seconds"] = round(time.perf_counter() - t0, 1)
            _package(staging, manifest, report, out, opts.force)
    except OSError as e:  # a full disk, a quota, a folder made read-only meanwhile: staging_dir removed what was staged
        raise ConversionError(_write_failure(e, out, estimate)) from e
    _stage(f"wrote {out}", opts.progress)
    if opts.progress:
        from .verify import format_quality_table

        print(format_quality_table(report["quality"]), file=sys.stderr, flush=True)
    return out


def _write_failure(e: OSError, out: Path, estimate: MemoryEstimate) -> str:
    import errno

    where = f"beside {out}" if e.filename is None else f"writing {e.filename}"
    what = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        need = estimate.weights / 2**20
        fix = f"free at least {need:,.0f} MB on that disk (the bundle's weights alone), or choose another --out"
    else:
        fix = "check that the folder of --out is writable, or choose another --out"
    return f"{what} ({where}); {fix}. Nothing was written."


def _notice_padded_blocks(spec, recipe: Recipe) -> None:
    """A block size that does not divide a row pads every row to whole blocks: SmolLM2 (hidden 576) at
    --block-size 256 was larger than at 32 (90.6 vs 88.5 MB), and worse, where a larger block was meant to save."""
    if recipe.weights == "fp32":
        return
    rows = {"hidden": spec.hidden_size, "intermediate": spec.intermediate_size}
    uneven = [f"{name} size {size}" for name, size in rows.items() if size % recipe.block_size]
    if uneven:
        notice(f"--block-size {recipe.block_size} does not divide the model's {' or '.join(uneven)}: each row is "
               "padded to whole blocks, so the bundle is larger than the block size suggests; a block size that "
               "divides them (e.g. 32 or 64) is smaller.")


def _describe(recipe: Recipe) -> str:
    head = f", LM head {recipe.lm_head_bits}-bit" if recipe.weights == "int4" else ""
    head += f", {recipe.algorithm}" if recipe.weights != "fp32" else ""
    head += " + smoothing" if recipe.quant_recipe().smooths else ""
    head += f", symmetric {'/'.join(recipe.symmetric)}" if recipe.weights != "fp32" and recipe.symmetric else ""
    # fp32 weights are plain MatMuls: no blocks, no int8 activations to set an accuracy level for
    blocks = "" if recipe.weights == "fp32" else f", block {recipe.block_size}"
    level = "" if recipe.weights == "fp32" else f", accuracy level {recipe.accuracy_level}"
    text = (f"{recipe.weights}{blocks}{head}{level}, "
            f"{recipe.threads} thread{'s' if recipe.threads != 1 else ''}, context {recipe.max_context}"
            + (f", KV cache {recipe.kv_dtype}" if recipe.kv_dtype != "float32" else ""))
    return text + (f" (set by hand: {', '.join(recipe.overrides)})" if recipe.overrides else "")


def _check_chat_template(tok) -> None:
    """Compile the model's chat template now: the runtime compiles it on first use, so a template
    that does not parse must be refused here, not in the middle of a user's first chat."""
    if not tok.chat_template:
        return
    from jinja2 import TemplateError
    from nomoat.runtime.chat_template import ChatTemplate

    try:
        ChatTemplate(tok.chat_template)
    except TemplateError as e:
        raise ConversionError(
            f"the model's chat template does not compile: {e}. Fix chat_template in the model's "
            "tokenizer_config.json or chat_template.jinja (for a GGUF: tokenizer.chat_template)."
        ) from e


def _build(ckpt, adapters, recipe: Recipe, target: Target, estimate: MemoryEstimate, staging: Path,
           eval_text: tuple[str, str] | None, opts: ConvertOptions) -> tuple[dict[str, Any], dict[str, Any]]:
    """Export, write the staged manifest, verify; return the manifest and the report (without timing)."""
    from .bundle import CHAT_TEMPLATE_FILE, TOKENIZER_FILE
    from .export_onnx import MODEL_FILE, export_onnx
    from .tokenizer_json import bundle_tokenizer_json
    from .weight_bytes import weight_bytes_per_token

    quant = recipe.quant_recipe()
    reference = _Reference(ckpt)  # the fp32 transformers model, built once for calibrate and verify
    importance = None
    if quant.weights != "fp32" and quant.algorithm in ("imatrix", "gptq"):
        from .calibrate import calibrate

        _stage("calibrate: activation importance from text the model writes itself", opts.progress)
        importance = calibrate(ckpt, reference.model, grams=quant.algorithm == "gptq")
    smoothing = None
    if importance is not None and quant.smooths:
        from .smooth import smooth

        _stage("smooth: scale input channels by their activations before rounding", opts.progress)
        # The reference keeps the unsmoothed weights: verify compares against the model as given.
        ckpt, importance, smoothing = smooth(ckpt, importance, quant)
    _stage(f"export ONNX ({quant.weights})", opts.progress)
    exported = export_onnx(ckpt, staging, quant, recipe.max_context, progress=opts.progress, importance=importance,
                           kv_dtype=recipe.kv_dtype)
    (staging / TOKENIZER_FILE).write_text(bundle_tokenizer_json(ckpt.tokenizer.tokenizer_json), encoding="utf-8")
    template_file = None
    if ckpt.tokenizer.chat_template:
        (staging / CHAT_TEMPLATE_FILE).write_text(ckpt.tokenizer.chat_template, encoding="utf-8")
        template_file = CHAT_TEMPLATE_FILE
    manifest = _manifest_dict(ckpt, adapters, recipe, target, estimate, template_file, exported.min_onnxruntime, opts)
    manifest["onnx"]["weight_bytes_per_token"] = weight_bytes_per_token(staging / MODEL_FILE)
    _write_manifest(staging, manifest)  # without hashes yet: verify loads the staged bundle

    report: dict[str, Any] = {"memory_estimate": estimate.to_dict(), "ops": exported.ops,
                              "adapters": [a.to_dict() for a in adapters],
                              "calibration_tokens": importance.tokens if importance else 0,
                              "smoothing_alpha": smoothing}
    if eval_text is None:
        report["quality"] = {"skipped": True}
        return manifest, report
    if os.environ.get(CORRUPT_WEIGHTS_ENV):
        _stage(f"{CORRUPT_WEIGHTS_ENV}: scrambled {corrupt_scales(staging)} scale tensors", opts.progress)
    report["quality"] = _verify(reference.model, staging, quant.weights, eval_text, opts, quant.algorithm)
    return manifest, report


def _manifest_dict(ckpt, adapters, recipe: Recipe, target: Target, estimate: MemoryEstimate,
                   template_file: str | None, min_onnxruntime: str, opts: ConvertOptions) -> dict[str, Any]:
    from nomoat.runtime.manifest import FORMAT_VERSION

    from .bundle import TOKENIZER_FILE
    from .export_onnx import DATA_FILE, MODEL_FILE
    from .onnx_graph import GraphIO

    tok = ckpt.tokenizer
    params = sum(int(t.numel()) for t in ckpt.tensors.values())
    return {
        "format_version": FORMAT_VERSION,
        "model": {**ckpt.spec.to_dict(), "parameters": params},
        "onnx": {"model_file": MODEL_FILE, "data_file": DATA_FILE, "io": GraphIO().to_dict(),
                 "kv_dtype": recipe.kv_dtype, "min_onnxruntime": min_onnxruntime},
        "tokenizer": {"tokenizer_file": TOKENIZER_FILE, "chat_template_file": template_file,
                      "bos_token_id": tok.bos_token_id, "add_bos_token": tok.add_bos_token,
                      "special_tokens": tok.special_tokens},
        "max_context": recipe.max_context,
        "stop_token_ids": sorted(set(tok.eos_token_ids)),
        "generation_defaults": {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 256,
                                **ckpt.generation_defaults},
        "quantization": recipe.quant_recipe().to_dict(),
        # The runtime's Manifest keeps only the keys it knows and `target` as a free-form dict,
        # so the memory estimate lives inside `target`, next to the recipe it was computed for.
        "target": {**target.to_dict(), "recipe": recipe.to_dict(), "threads": recipe.threads,
                   "memory_estimate": estimate.to_dict()},
        "files": {},
        "source": {**ckpt.source, "loras": [a.to_dict() for a in adapters], **opts.extra_source},
        "chat_format": _chat_format(tok),
    }


def _chat_format(tok) -> dict[str, Any] | None:
    """The chat template as text pieces for runtimes without Jinja (the Android app); None when the
    template is not fixed text around each message. The template the Python runtime would use: the
    model's, or ChatML when it has none."""
    from nomoat.runtime.chat_template import ChatTemplate

    from .chat_format import derive_chat_format

    fmt = derive_chat_format(ChatTemplate.for_tokenizer(tok.chat_template, tok.special_tokens))
    if fmt is None:
        # Said now, not first on the phone: the runtime on the host uses the template itself and works.
        notice("the chat template is not fixed text around each message, so the bundle has no chat_format: "
                "the Android app cannot chat with it (raw prompts only); nomoat chat/generate/serve use the "
                "template and are not affected")
    return fmt


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    from nomoat.runtime.manifest import MANIFEST_NAME, Manifest

    from .bundle import write_json

    write_json(folder / MANIFEST_NAME, Manifest.from_dict(manifest).to_dict())


class _Reference:
    """The fp32 reference model, made on first use (a conversion may need it for calibrate, verify, both or neither)."""

    def __init__(self, ckpt) -> None:
        self._ckpt, self._model = ckpt, None

    @property
    def model(self):
        if self._model is None:
            from .reference import reference_model

            self._model = reference_model(self._ckpt)
        return self._model


def _verify(reference, staging: Path, quant: str, eval_text: tuple[str, str], opts: ConvertOptions,
            algorithm: str | None = None) -> dict[str, Any]:
    from .verify import greedy_same, verify_bundle

    _stage("verify against the fp32 reference", opts.progress)
    text, source = eval_text
    quality = verify_bundle(staging, reference, quant, eval_text=text, eval_source=source,
                            max_ppl_increase=opts.max_ppl_increase, algorithm=algorithm)
    q = quality
    _stage(f"quality: ppl {q.ppl_reference:.3f} -> {q.ppl_bundle:.3f} ({q.ppl_increase_percent:+.2f}%), "
           f"KL {q.mean_kl:.4f}, top-1 {q.top1_agreement:.1%}, greedy {greedy_same(q.to_dict())}", opts.progress)
    return quality.to_dict()


def _package(staging: Path, manifest: dict[str, Any], report: dict[str, Any], out: Path, force: bool) -> None:
    """report.json, then the manifest with every file's sha256, then the atomic rename."""
    from nomoat.runtime.manifest import Manifest

    from .bundle import REPORT_FILE, file_hashes, finalize, write_json

    write_json(staging / REPORT_FILE, report)
    finalize(staging, Manifest.from_dict({**manifest, "files": file_hashes(staging)}), out, force)


def corrupt_scales(bundle: Path, seed: int = 0) -> int:
    """Scramble every quantization scale of the model in `bundle` in place, as a broken quantizer
    would (each block's scale times a random factor in [0, 2)). Returns the number of tensors hit.

    Only for tests of the quality gate (see CORRUPT_WEIGHTS_ENV).
    """
    import numpy as np
    import onnx

    from .export_onnx import DATA_FILE, MODEL_FILE

    model = onnx.load(str(bundle / MODEL_FILE), load_external_data=False)
    rng = np.random.default_rng(seed)
    hit = 0
    with open(bundle / DATA_FILE, "r+b") as f:
        for t in model.graph.initializer:
            ext = {e.key: e.value for e in t.external_data}
            if not t.name.endswith("_scales") or t.data_type != onnx.TensorProto.FLOAT or "offset" not in ext:
                continue
            offset, length = int(ext["offset"]), int(ext["length"])
            f.seek(offset)
            scales = np.frombuffer(f.read(length), np.float32)
            f.seek(offset)
            f.write((scales * rng.uniform(0.0, 2.0, scales.shape)).astype(np.float32).tobytes())
            hit += 1
    if not hit:
        raise ConversionError(f"{CORRUPT_WEIGHTS_ENV} is set but the export holds no quantization scales; "
                              "use --quant int8 or int4.")
    return hit
