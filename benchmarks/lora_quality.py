"""How much a LoRA-merged model loses in int4: nomoat against llama.cpp Q4_0, same merged weights.

    python benchmarks/lora_quality.py [--lora ADAPTER] [--rank 16] [--rel-norm 0.03] [--json out.json]

SmolLM2-135M-Instruct ships on llama.cpp's Q4_1 grid, so quantizing the base model to 4 bits
again measures little. Merging a LoRA moves every adapted weight off that grid, which gives an
honest number. Steps, all in one run:

1. the adapter: --lora, or a random-but-plausible one (rank 16 on q/k/v/o/gate/up/down, each
   update's Frobenius norm --rel-norm of its weight's, as fine-tuning typically moves weights);
2. `nomoat merge`: the merged fp32 model as a Hugging Face folder;
3. the fp32 reference: transformers on that folder;
4. nomoat int4: `nomoat convert` of that folder for --target, logits through nomoat.runtime;
5. llama.cpp: an F32 GGUF of the same merged weights (the source GGUF's metadata, q/k permuted
   back to llama.cpp's layout), quantized to Q4_0 by llama.cpp itself (artifacts.py); its F32
   file is measured too, as a check that the GGUF holds the reference weights.

Every system scores the same token ids (the converter's eval text, as the verify stage uses);
perplexity, KL(fp32 || system) and top-1 agreement are computed by the converter's own
compare_logits. Outputs go to build/lora-quality/ and are rebuilt every run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from artifacts import default_gguf, llamacpp_q4_0
from nomoat.runtime.bench import BenchError
from nomoat.runtime.bench_plot import check_writable

ROOT = Path(__file__).resolve().parents[1]
LINEAR = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="source GGUF (default: SmolLM2-135M-Instruct)")
    p.add_argument("--lora", type=Path, default=None, help="adapter to merge (default: a random one, see above)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--rel-norm", type=float, default=0.03, help="||update|| / ||weight|| of the random adapter")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", default="host", help="nomoat target whose int4 recipe is used")
    p.add_argument("--symmetric", default=None, metavar="LAYERS",
                   help="layers without zero points, as `nomoat convert --symmetric` (default: the recipe's)")
    p.add_argument("--eval-tokens", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "build" / "lora-quality")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write every number here")
    return p.parse_args(argv)


def log(message: str) -> None:
    print(f"[lora-quality] {message}", file=sys.stderr, flush=True)


# --- the adapter -----------------------------------------------------------------------


def random_adapter(source: Path, out: Path, rank: int, rel_norm: float, seed: int) -> Path:
    """A PEFT folder with a rank-`rank` update on every linear weight, sized relative to the weight."""
    import torch
    from nomoat.converter.load import load_checkpoint
    from safetensors.torch import save_file

    ckpt = load_checkpoint(source)
    g = torch.Generator().manual_seed(seed)
    alpha = 2 * rank
    tensors = {}
    for layer in range(ckpt.spec.num_layers):
        for module in LINEAR:
            name = f"model.layers.{layer}.{module}"
            w = ckpt.tensors[f"{name}.weight"]
            a = torch.randn(rank, w.shape[1], generator=g) / w.shape[1] ** 0.5
            b = torch.randn(w.shape[0], rank, generator=g)
            # scale B so that ||(alpha / r) B A|| = rel_norm ||W||
            b *= rel_norm * w.norm() / ((alpha / rank) * (b @ a).norm())
            tensors[f"base_model.model.{name}.lora_A.weight"] = a.contiguous()
            tensors[f"base_model.model.{name}.lora_B.weight"] = b.contiguous()
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "base_model_name_or_path": source.stem,
              "target_modules": sorted({m.rsplit(".", 1)[1] for m in LINEAR}), "task_type": "CAUSAL_LM"}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


# --- llama.cpp's files of the merged model ---------------------------------------------


def half_to_interleaved_rotary(w: Any, n_heads: int) -> Any:
    """HF rotate-half q/k rows -> llama.cpp's interleaved rows (its convert_hf_to_gguf permute)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_f32_gguf(source: Path, merged_dir: Path, out: Path) -> Path:
    """The merged weights in a GGUF with the source's metadata (tokenizer, rope, ...), all F32."""
    import gguf
    from nomoat.converter.load import load_checkpoint
    from nomoat.converter.load_gguf import _hf_name

    ckpt = load_checkpoint(merged_dir)
    reader = gguf.GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(out), arch)
    for field in reader.fields.values():
        if field.name in ("general.architecture", "general.file_type") or field.name.startswith("GGUF."):
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    names = [t.name for t in reader.tensors]
    if "lm_head.weight" in ckpt.tensors and "output.weight" not in names:
        names.append("output.weight")  # an adapter untied the LM head
    for name in names:
        if name == "rope_freqs.weight":
            writer.add_tensor(name, np.array(next(t for t in reader.tensors if t.name == name).data, np.float32))
            continue
        w = ckpt.tensors[_hf_name(name)]
        if arch == "llama" and name.endswith("attn_q.weight"):
            w = half_to_interleaved_rotary(w, ckpt.spec.num_heads)
        elif arch == "llama" and name.endswith("attn_k.weight"):
            w = half_to_interleaved_rotary(w, ckpt.spec.num_kv_heads)
        writer.add_tensor(name, np.ascontiguousarray(w.numpy(), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def llamacpp_logits(gguf_file: Path, ids: list[int], threads: int) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_file), n_ctx=len(ids), n_batch=len(ids), logits_all=True,
                n_threads=threads, n_threads_batch=threads, verbose=False)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


# --- the run ---------------------------------------------------------------------------


def fresh(path: Path) -> Path:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    return path


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from nomoat.converter.cli_merge import merge_to_hf_dir
    from nomoat.converter.convert import ConvertOptions, convert
    from nomoat.converter.load import load_checkpoint
    from nomoat.converter.merge import AdapterRef
    from nomoat.converter.quantize import parse_symmetric
    from nomoat.converter.reference import reference_model
    from nomoat.converter.verify import compare_logits, default_eval_text
    from nomoat.runtime import Model
    from transformers import AutoModelForCausalLM

    source = args.model or default_gguf()
    args.out.mkdir(parents=True, exist_ok=True)
    adapter = args.lora or random_adapter(source, fresh(args.out / "adapter"), args.rank, args.rel_norm, args.seed)
    log(f"merging {adapter} into {source.name}")
    merged = merge_to_hf_dir(source, [AdapterRef(adapter)], args.out / "merged", force=True, progress=False)
    log(f"converting the merged model to int4 for {args.target}")
    bundle = convert(ConvertOptions(model=str(merged), out=args.out / "nomoat-int4", target=args.target,
                                    quant="int4",
                                    symmetric=None if args.symmetric is None else parse_symmetric(args.symmetric),
                                    max_context=max(args.eval_tokens, 64), skip_verify=True,
                                    force=True, progress=False))
    nomoat = Model.load(bundle, threads=args.threads)
    ids = nomoat.encode(default_eval_text(), add_bos=None)[: args.eval_tokens]

    log("llama.cpp: F32 GGUF of the merged model, then Q4_0 with llama.cpp's quantizer")
    f32 = write_f32_gguf(source, merged, fresh(args.out / "merged-F32.gguf"))
    q4_0 = llamacpp_q4_0(f32, fresh(args.out / "merged-Q4_0.gguf"))

    torch.set_num_threads(args.threads)
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
        ref_logits = reference(torch.tensor([ids])).logits[0].numpy()
        base_logits = reference_model(load_checkpoint(source))(torch.tensor([ids])).logits[0].numpy()
    systems = {
        "nomoat int4": (nomoat.logits(ids), sum(f.stat().st_size for f in bundle.glob("model.onnx*"))),
        "llama.cpp Q4_0": (llamacpp_logits(q4_0, ids, args.threads), q4_0.stat().st_size),
        "llama.cpp F32 (check)": (llamacpp_logits(f32, ids, args.threads), f32.stat().st_size),
    }
    targets = np.asarray(ids[1:])
    ppl_ref, ppl_base, _, _ = compare_logits(ref_logits[:-1], base_logits[:-1], targets)
    rows = []
    for name, (logits, size) in systems.items():
        _, ppl, kl, top1 = compare_logits(ref_logits[:-1], logits[:-1], targets)
        rows.append({"system": name, "ppl": ppl, "delta_ppl_percent": 100 * (ppl - ppl_ref) / ppl_ref, "kl": kl,
                     "top1": top1, "size_mb": size / 1e6})
    return {"source": str(source), "adapter": str(adapter), "rank": args.rank if args.lora is None else None,
            "rel_norm": args.rel_norm if args.lora is None else None, "target": args.target,
            "recipe": json.loads((bundle / "manifest.json").read_text())["quantization"], "eval_tokens": len(ids),
            "ppl_fp32_merged": ppl_ref, "ppl_fp32_base": ppl_base, "systems": rows}


def table(result: dict[str, Any]) -> str:
    lines = [
        f"fp32 merged model (transformers): ppl {result['ppl_fp32_merged']:.3f} over {result['eval_tokens']} tokens "
        f"(base model without the LoRA: {result['ppl_fp32_base']:.3f}); nomoat recipe: {result['recipe']}",
        "",
        "| system | ppl | Δppl vs fp32 merged | KL(fp32 ‖ system) | top-1 agreement | weights file |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["systems"]:
        lines.append(f"| {r['system']} | {r['ppl']:.3f} | {r['delta_ppl_percent']:+.2f} % | {r['kl']:.4f} | "
                     f"{r['top1']:.1%} | {r['size_mb']:.0f} MB |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.json:  # before minutes of merging, converting and scoring, not after
        try:
            check_writable(args.json, "--json", "lora-quality.json")
        except BenchError as e:
            raise SystemExit(f"benchmarks/lora_quality.py: {e}") from None
    t0 = time.perf_counter()
    result = measure(args)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(table(result))
    if args.json:
        try:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        except OSError as e:  # the disk filled or the folder went since the check
            raise SystemExit(f"benchmarks/lora_quality.py: --json {args.json}: the numbers cannot be written "
                             f"({e.strerror or e}); the table is printed above") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
