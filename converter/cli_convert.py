"""Convert a Hugging Face safetensors folder, a GGUF file or a Meta checkpoint (plus optional
PEFT LoRA adapters, merged in fp32) into a bundle for a device: quantized, exported to ONNX
on ONNX Runtime's contrib kernels, checked against the fp32 reference, sized for the device."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import ConversionError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="PATH",
                   help="HF model folder (config.json + *.safetensors), a .gguf file, or a Meta folder "
                        "(consolidated*.pth + params.json)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:WEIGHT]",
                   help="PEFT LoRA adapter folder to merge before quantization; repeat to apply several in "
                        "order, each with an optional weight (default 1.0)")
    p.add_argument("--target", default="host", help="device to build for (see `nomoat targets`)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="bundle folder to write")
    p.add_argument("--quant", choices=["fp32", "int8", "int4"], default=None,
                   help="weight precision; default: the target's recipe (int4)")
    p.add_argument("--block-size", type=int, default=None, help="quantization block size (default: recipe, 32)")
    p.add_argument("--max-context", type=int, default=None,
                   help="tokens the KV cache holds; default: the target's recipe")
    p.add_argument("--threads", type=int, default=None, help="threads the runtime uses; default: the recipe")
    p.add_argument("--fit", choices=["strict", "shrink-context"], default="strict",
                   help="when the model does not fit the device: fail (strict) or use the largest context that fits")
    p.add_argument("--eval-text", type=Path, default=None,
                   help="plain-text file for the quality check; default: the text shipped with nomoat")
    p.add_argument("--max-ppl-increase", type=float, default=None,
                   help="fail when perplexity rises by more than this many percent (default per quant: "
                        "fp32 0.5, int8 5, int4 25)")
    p.add_argument("--skip-verify", action="store_true", help="skip the quality check (recorded in report.json)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")


def run(args: argparse.Namespace) -> int:
    from .convert import ConvertOptions, convert
    from .merge import AdapterRef

    opts = ConvertOptions(
        model=args.model, out=args.out, target=args.target, loras=tuple(AdapterRef.parse(x) for x in args.lora),
        quant=args.quant, block_size=args.block_size, max_context=args.max_context, threads=args.threads,
        fit=args.fit, force=args.force, skip_verify=args.skip_verify, eval_text=args.eval_text,
        max_ppl_increase=args.max_ppl_increase, progress=not args.quiet,
    )
    try:
        convert(opts)
    except ConversionError as e:
        print(f"nomoat convert: error: {e}", file=sys.stderr)
        return 1
    return 0
