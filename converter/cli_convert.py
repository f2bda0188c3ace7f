"""Convert a Hugging Face safetensors folder, a GGUF file or a Meta checkpoint (plus optional
PEFT LoRA adapters, merged in fp32) into a bundle for a device: quantized, exported to ONNX
on ONNX Runtime's contrib kernels, checked against the fp32 reference, sized for the device."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import ConversionError


def add_arguments(p: argparse.ArgumentParser) -> None:
    from nomoat.runtime.manifest import KV_DTYPES

    from .quantize import ALGORITHMS, parse_symmetric

    p.add_argument("--model", required=True, metavar="PATH",
                   help="HF model folder (config.json + *.safetensors), a .gguf file, or a Meta folder "
                        "(consolidated*.pth + params.json)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:WEIGHT]",
                   help="PEFT adapter folder or llama.cpp LoRA .gguf to merge (in fp32) before quantization; repeat "
                        "to apply several in order, each with an optional weight (default 1.0)")
    p.add_argument("--target", default="host", help="device to build for (see `nomoat targets`)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="bundle folder to write")
    p.add_argument("--quant", choices=["fp32", "int8", "int4"], default=None,
                   help="weight precision; default: the target's recipe (int4). Like --block-size, --max-context "
                        "and --threads, it overrides one recipe field and is recorded in the manifest")
    p.add_argument("--block-size", type=int, default=None, help="quantization block size (default: recipe, 32)")
    p.add_argument("--lm-head-bits", type=int, choices=[4, 8], default=None,
                   help="precision of the LM head (the vocab x hidden output matmul) in an int4 model: 4 decodes "
                        "faster, 8 keeps more quality (SmolLM2-135M: ~6 points less perplexity increase, "
                        "~7 %% slower decode, +14 MB); default: the recipe, 4")
    p.add_argument("--algorithm", choices=ALGORITHMS, default=None,
                   help="how weights are rounded: imatrix searches each block's scale for the least error weighted "
                        "by activations the model produces on text it writes itself (~17 s more for a 135M model "
                        "on 2 cores), gptq also pushes each channel's rounding error onto the channels not yet "
                        "rounded (GPTQ; ~2 min more; on SmolLM2 lower KL but higher perplexity than imatrix), mse "
                        "the imatrix search unweighted, rtn plain min/max rounding; default: the recipe, imatrix")
    p.add_argument("--smoothing", action=argparse.BooleanOptionalAction, default=None,
                   help="scale each 4-bit linear's input channels by the activations they carry before rounding, "
                        "folded into the RMSNorm or up projection in front of it (AWQ's idea; exact in fp32; "
                        "imatrix/gptq only). On SmolLM2-135M: KL to the fp32 model -35 %%, top-1 agreement +5 "
                        "points, but perplexity on a LoRA-merged model +1-2 points, so not the default; "
                        "~6 s more; default: the recipe, off")
    p.add_argument("--symmetric", type=parse_symmetric, default=None, metavar="LAYERS",
                   help="linear layers stored without a zero point per block (each block's grid centred on zero, "
                        "like llama.cpp's Q4_0): a comma list of qkv, o, gate_up, down, lm_head, or all / none. "
                        "ONNX Runtime's int8 MatMulNBits kernel then skips its zero-point work (~15 %% less "
                        "time per layer); SmolLM2-135M: gate_up costs up to a point of perplexity, all layers "
                        "+5 points of perplexity and ~5 %% more decode speed (on AVX2; none on AVX-512 VNNI); default: "
                        "the recipe, gate_up")
    p.add_argument("--max-context", type=int, default=None,
                   help="tokens the KV cache holds; default: the target's recipe")
    p.add_argument("--kv-dtype", choices=KV_DTYPES, default=None,
                   help="element type of the KV cache: float16 halves its memory (SmolLM2-135M at 2,048 "
                        "positions: 47 instead of 94 MB) and runs attention in fp16 (prefill 4-8 %% faster on x86, "
                        "decode 2-15 %% slower, most after long prompts); the Android app reads float32 "
                        "caches only; default: the recipe, float32")
    p.add_argument("--threads", type=int, default=None, help="threads the runtime uses; default: the recipe")
    p.add_argument("--fit", choices=["strict", "shrink-context"], default="strict",
                   help="when the model does not fit the device: fail (strict) or use the largest context that fits")
    p.add_argument("--eval-text", type=Path, default=None,
                   help="UTF-8 text for the quality check (its first 8,192 tokens); default: ~4,750 tokens of prose "
                        "shipped with nomoat")
    p.add_argument("--max-ppl-increase", type=float, default=None, metavar="PERCENT",
                   help="fail when perplexity rises by more than this many percent over the fp32 reference "
                        f"(default per quant: {_gate_defaults()})")
    p.add_argument("--skip-verify", action="store_true",
                   help="skip the quality check (recorded in report.json and shown by `nomoat inspect`)")
    p.add_argument("--force", action="store_true",
                   help="replace --out if it is a bundle (holds manifest.json) or an empty folder")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")


def _gate_defaults() -> str:
    from .verify import DEFAULT_MAX_PPL_INCREASE

    return ", ".join(f"{quant} {limit:g}" for quant, limit in DEFAULT_MAX_PPL_INCREASE.items())


def run(args: argparse.Namespace) -> int:
    from nomoat.runtime.errors import BundleError

    from .convert import ConvertOptions, convert
    from .merge import AdapterRef

    try:  # parsing --lora PATH:WEIGHT can refuse a weight already
        opts = ConvertOptions(
            model=args.model, out=args.out, target=args.target, loras=tuple(AdapterRef.parse(x) for x in args.lora),
            quant=args.quant, block_size=args.block_size, lm_head_bits=args.lm_head_bits,
            algorithm=args.algorithm, smoothing=args.smoothing, symmetric=args.symmetric,
            max_context=args.max_context, threads=args.threads, kv_dtype=args.kv_dtype,
            fit=args.fit, force=args.force, skip_verify=args.skip_verify, eval_text=args.eval_text,
            max_ppl_increase=args.max_ppl_increase, progress=not args.quiet,
        )
        convert(opts)
    except ConversionError as e:
        print(f"nomoat convert: error: {e}", file=sys.stderr)
        return 1
    except BundleError as e:  # the runtime's own checks refused what was written: a converter bug, not bad input
        print(f"nomoat convert: error: the bundle it made would not load ({e}); this is a bug in nomoat's "
              "converter: please report it with the command you ran. Nothing was written.", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM/SIGHUP (bundle.Interrupted): the staging folder is gone
        from .bundle import report_interrupt

        return report_interrupt("convert", e)
    return 0
