"""ExecuTorch as a bench peer: its own LLM export (XNNPACK, 8da4w) and its Python runtime.

The export is ExecuTorch's documented path for Llama-architecture models,
`python -m executorch.extension.llm.export.export_llm` with `base.model_class=smollm2` (a
Llama2Model), fed a Meta-format checkpoint + params.json written here from the Hugging Face
folder, the way ExecuTorch's own smollm2/convert_weights.py does it (that script needs
torchtune, which the bench venv does not have). The bench workers import this module as
`peer_executorch:ExecuTorchEngine` with benchmarks/ on PYTHONPATH, like peers.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

# 576 (SmolLM2-135M's width) is not a multiple of 128, and 8da4w silently leaves a linear
# whose in_features the group size does not divide in fp32; 32 divides 576 and 1536.
GROUP_SIZE = 32
# ExecuTorch's llama_xnnpack.yaml quantizes the embedding table to 4 bits, groups of 32.
EMBEDDING_QUANTIZE = "4,32"
# The KV cache (max_context_length) and the longest single forward call (max_seq_length).
MAX_CONTEXT = 2048

# HF LlamaForCausalLM names -> the Meta names ExecuTorch's llama_transformer loads.
_META_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
}


# -- export --------------------------------------------------------------------------------


def meta_name(hf_name: str) -> str:
    """The Meta-format name of one HF tensor name (a layer index stands in for `{}`)."""
    parts = hf_name.split(".")
    layer = next((p for p in parts if p.isdigit()), None)
    key = hf_name.replace(f".{layer}.", ".{}.", 1) if layer is not None else hf_name
    if key not in _META_NAMES:
        raise ValueError(f"no Meta-format name for the Hugging Face tensor {hf_name!r}")
    return _META_NAMES[key].replace("{}", layer) if layer is not None else _META_NAMES[key]


def unpermute_rope(weight, n_heads: int):
    """q/k rows from HF's rotate-half RoPE order to Meta's interleaved pairs (torchtune's
    hf_to_tune permutation), as ExecuTorch's RoPE with use_hf_rope=false expects."""
    rows, dim = weight.shape
    head_dim = rows // n_heads
    return weight.view(n_heads, 2, head_dim // 2, dim).transpose(1, 2).reshape(rows, dim)


def meta_params(config: dict) -> dict:
    """ExecuTorch's params.json for a Llama-architecture HF config (cf. smollm2/135M_config.json)."""
    rope = config.get("rope_parameters") or {}
    return {
        "dim": config["hidden_size"],
        "hidden_dim": config["intermediate_size"],
        "ffn_dim_multiplier": 1,
        "n_heads": config["num_attention_heads"],
        "n_kv_heads": config.get("num_key_value_heads", config["num_attention_heads"]),
        "n_layers": config["num_hidden_layers"],
        "norm_eps": config["rms_norm_eps"],
        "rope_theta": float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
        "use_scaled_rope": False,
        "vocab_size": config["vocab_size"],
        "use_hf_rope": False,
        "attention_qkv_bias": bool(config.get("attention_bias", False)),
    }


def meta_state_dict(hf: Path, config: dict) -> dict:
    """The HF safetensors as the Meta-format state dict ExecuTorch's Llama model loads."""
    from safetensors.torch import load_file

    heads = {"wq": config["num_attention_heads"],
             "wk": config.get("num_key_value_heads", config["num_attention_heads"])}
    state = {}
    for hf_name, tensor in load_file(str(hf / "model.safetensors")).items():
        name = meta_name(hf_name)
        proj = name.split(".")[-2]
        state[name] = unpermute_rope(tensor, heads[proj]) if proj in heads else tensor
    # Tied embeddings: the llama transformer still has its own output layer.
    state.setdefault("output.weight", state["tok_embeddings.weight"])
    return state


def export_metadata(config: dict) -> str:
    """The BOS/EOS ids ExecuTorch's runners read from the .pte (unused by the bench)."""
    eos = config.get("eos_token_id")
    return json.dumps({"get_bos_id": config.get("bos_token_id"),
                       "get_eos_ids": eos if isinstance(eos, list) else [eos]})


def export_command(config: dict) -> list[str]:
    """export_llm with CLI overrides; paths are relative to the working folder it runs in."""
    return [
        sys.executable, "-m", "executorch.extension.llm.export.export_llm",
        "base.model_class=smollm2",
        # Relative on purpose: ExecuTorch treats a checkpoint whose *path* contains "8da4w"
        # or "int8" as already quantized, and the cache folder's name may well contain one.
        "base.checkpoint=checkpoint.pth",
        "base.params=params.json",
        f"base.metadata='{export_metadata(config)}'",
        "model.use_kv_cache=True",
        "model.use_sdpa_with_kv_cache=True",
        "model.enable_dynamic_shape=True",
        "model.dtype_override=fp32",
        "quantization.qmode=8da4w",
        f"quantization.group_size={GROUP_SIZE}",
        f"quantization.embedding_quantize='{EMBEDDING_QUANTIZE}'",
        "backend.xnnpack.enabled=True",
        "backend.xnnpack.extended_ops=True",
        f"export.max_seq_length={MAX_CONTEXT}",
        f"export.max_context_length={MAX_CONTEXT}",
        "export.output_dir=.",
        "export.output_name=model.pte",
        # Hydra would otherwise keep its logs and config under outputs/ in the working folder.
        "hydra.run.dir=.",
        "hydra.output_subdir=null",
    ]


def executorch_8da4w(hf: Path, out: Path) -> Path:
    """out/model.pte: the HF folder exported by ExecuTorch's export_llm for XNNPACK, 8da4w.

    Everything is written inside `out` (the work folder out/work is removed afterwards, the
    540 MB Meta checkpoint with it); the command and its output go to out/export.log.
    """
    pte = out / "model.pte"
    if pte.is_file():
        return pte
    import torch

    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    config = json.loads((hf / "config.json").read_text())
    (work / "params.json").write_text(json.dumps(meta_params(config), indent=2))
    torch.save(meta_state_dict(hf, config), work / "checkpoint.pth")
    cmd = export_command(config)
    # One core: the machine is shared. TMPDIR keeps stray temporary files inside `out`.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TMPDIR": str(work.resolve())}
    log = out / "export.log"
    print(f"[bench] ExecuTorch: {' '.join(cmd[1:])} (log: {log})", file=sys.stderr)
    start = time.perf_counter()
    with open(log, "w") as f:
        f.write(f"cwd: {work.resolve()}\n$ {' '.join(cmd)}\n\n")
        f.flush()
        done = subprocess.run(cmd, cwd=work, env=env, stdout=f, stderr=subprocess.STDOUT)
        f.write(f"\nexit {done.returncode} after {time.perf_counter() - start:.0f} s\n")
    if done.returncode != 0 or not (work / "model.pte").is_file():
        raise SystemExit(f"ExecuTorch's export_llm failed (exit {done.returncode}); "
                         f"its log ends with:\n{log.read_text()[-3000:]}")
    # The rename is the commit point: a model.pte that exists is whole.
    (work / "model.pte").rename(pte)
    shutil.rmtree(work, ignore_errors=True)
    return pte


# -- the engine ----------------------------------------------------------------------------


def argmax(logits) -> int:
    """The greedy token of the last position's logits ([1, vocab] or [1, seq, vocab])."""
    return int(logits.reshape(-1, logits.shape[-1])[-1].argmax())


def _register_llm_kernels() -> None:
    """Load the kernels the export refers to outside XNNPACK: the KV-cache update and SDPA
    (llama::update_cache, llama::custom_sdpa) and the 4-bit embedding lookup. Importing the
    modules registers them with the runtime, which must already be loaded (as ExecuTorch's
    own llama runner/native.py does it)."""
    from executorch.extension.pybindings import portable_lib  # noqa: F401, I001  (first, on purpose)
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
    from executorch.kernels import quantized  # noqa: F401


class ExecuTorchEngine:
    """ExecuTorch's Python runtime (executorch.runtime, XNNPACK delegate) on the export above.

    The exported `forward(tokens[1, n], input_pos[1])` has a dynamic sequence length, so the
    whole prompt is prefilled in one call (at most max_seq_length - 1 = 2047 tokens) and each decode
    step is one call with n = 1; it returns the last position's logits, argmax'ed here.
    The KV cache is a buffer inside the method; `reset` restarts at position 0, after which
    ExecuTorch's SDPA reads only positions below the current one, so nothing stale is used.
    Threads: ExecuTorch's process-wide threadpool (which XNNPACK uses) is resized with the
    pybindings' `_unsafe_reset_threadpool` before the method is loaded, and torch's intra-op
    pool (which some of the kernels outside XNNPACK use in this Python runtime) to the same.
    """

    libraries = ("executorch", "torch")

    def __init__(self, pte: str, threads: int, context: int, name: str = "ExecuTorch 8da4w"):
        self.pte = Path(pte)
        self.threads = threads
        self.context = context
        self.name = name
        self.method = None
        self.position = 0

    def import_library(self) -> None:
        # torch comes with ExecuTorch's Python bindings: ~320 MB of the worker's RSS before any model.
        import torch  # noqa: F401

        _register_llm_kernels()

    def prepare(self) -> None:
        import torch
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime

        _register_llm_kernels()
        # Two pools: XNNPACK runs on ExecuTorch's threadpool, but with only that one set, a
        # 1-thread prefill still used ~1.9 cores (OMP_NUM_THREADS=1 brought it to 1.0), so
        # some kernel runs on torch's intra-op pool: cap both.
        torch.set_num_threads(self.threads)
        portable_lib._unsafe_reset_threadpool(self.threads)
        if portable_lib._threadpool_get_thread_count() != self.threads:
            raise RuntimeError(f"ExecuTorch kept {portable_lib._threadpool_get_thread_count()} threads, "
                               f"not the {self.threads} asked for")
        program = Runtime.get().load_program(self.pte)
        # The KV cache is sized at export time; past it ExecuTorch fails mid-run, so refuse here.
        exported = int(program.load_method("get_max_context_len").execute([])[0])
        if self.context > exported:
            raise ValueError(f"{self.pte} was exported with a context of {exported} tokens, "
                             f"smaller than the {self.context} asked for")
        self.method = program.load_method("forward")
        self.reset()

    def run(self, prompt_ids: Sequence[int], new_tokens: int) -> Iterator[int]:
        if len(prompt_ids) + new_tokens > self.context:
            raise ValueError(f"{len(prompt_ids)} prompt + {new_tokens} new tokens exceed the context "
                             f"of {self.context}")
        token = self._forward(prompt_ids)
        yield token
        for _ in range(new_tokens - 1):
            token = self._forward([token])
            yield token

    def reset(self) -> None:
        self.position = 0

    def model_bytes(self) -> int | None:
        return self.pte.stat().st_size

    def _forward(self, ids: Sequence[int]) -> int:
        """Run ids at the current position (extending the KV cache) and pick the next token."""
        import torch

        tokens = torch.tensor([list(ids)], dtype=torch.long)
        input_pos = torch.tensor([self.position], dtype=torch.long)
        logits = self.method.execute([tokens, input_pos])[0]
        self.position += len(ids)
        return argmax(logits)
