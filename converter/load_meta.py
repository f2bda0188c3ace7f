"""Load a Meta (llama reference code) checkpoint: params.json + consolidated.NN.pth.

Meta shards are model-parallel slices of one model, not layer ranges: each holds a
slice of every matrix, so they are concatenated tensor by tensor. The tokenizer is the
Hugging Face tokenizer.json, which the user puts next to the weights.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

from .errors import ConversionError
from .load_hf import read_generation_defaults, read_hf_tokenizer, read_json, read_json_if_exists
from .spec import Checkpoint, ConfigFile, ModelSpec, RopeScaling

_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_GLOBAL_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Column-parallel layers are split on their output rows, row-parallel ones on their inputs.
_ROW_SPLIT = (
    "attention.wq.weight",
    "attention.wk.weight",
    "attention.wv.weight",
    "feed_forward.w1.weight",
    "feed_forward.w3.weight",
)
_COLUMN_SPLIT = ("attention.wo.weight", "feed_forward.w2.weight")


def load_meta_dir(path: Path) -> Checkpoint:
    params_file = path / "params.json"
    params = read_json(params_file)
    check_params(params, params_file)
    shards = sorted(path.glob("consolidated.*.pth"))
    if not shards:
        raise ConversionError(
            f"{path} has no consolidated.*.pth weights; copy the Meta weights next to params.json."
        )
    state = merge_shards([_load_shard(f) for f in shards], dim=ConfigFile(params, str(params_file)).int("dim"))
    spec = spec_from_params(params, state, source=str(params_file))
    tok_dir = find_tokenizer_dir(path)
    checkpoint = Checkpoint(
        spec=spec,
        tensors=hf_tensors(state, spec),
        # Meta's reference generate() always starts a prompt with BOS.
        tokenizer=read_hf_tokenizer(
            tok_dir, read_json_if_exists(tok_dir / "config.json"), default_add_bos=True
        ),
        source={"format": "meta", "path": str(path), "shards": len(shards)},
        generation_defaults=read_generation_defaults(tok_dir),
    )
    checkpoint.check_tensors()
    checkpoint.check_vocabulary(str(tok_dir / "tokenizer.json"))
    return checkpoint


def check_params(params: dict[str, Any], params_file: Path) -> None:
    """The keys every Llama params.json has; without them the file is something else."""
    missing = [k for k in ("dim", "n_layers", "n_heads") if k not in params]
    if missing:
        raise ConversionError(f"{params_file} lacks {', '.join(missing)}; it is not a Llama params.json.")


def interleaved_to_half_rotary(w: Any, n_heads: int) -> Any:
    """Reorder q/k projection rows from the interleaved rotary layout to HF's rotate-half.

    Meta's code (and llama.cpp, which kept it) rotates adjacent pairs (x0, x1), (x2, x3)...
    of each head; HF rotates (x_i, x_{i+d/2}). Same model, different row order: per head,
    rows [p0a, p0b, p1a, p1b, ...] become [p0a, p1a, ..., p0b, p1b, ...]. This is the
    `permute` of transformers' convert_llama_weights_to_hf and the inverse of
    llama.cpp's convert_hf_to_gguf permute.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _load_shard(f: Path) -> dict[str, Any]:
    import torch

    try:
        # weights_only: a .pth is a pickle, and only plain tensors may come out of it.
        return torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, zipfile.BadZipFile) as e:
        raise ConversionError(
            f"{f} cannot be read as a PyTorch checkpoint of plain tensors ({e}). It is truncated, "
            "corrupt or holds pickled objects: download it again."
        ) from e


def merge_shards(shards: list[dict[str, Any]], dim: int) -> dict[str, Any]:
    """One state dict from the model-parallel shards, in fp32."""
    import torch

    names = shards[0].keys()
    if any(s.keys() != names for s in shards[1:]):
        raise ConversionError(
            "the consolidated.*.pth shards hold different tensor names; they are not one model."
        )
    merged = {}
    for name in names:
        parts = [s[name] for s in shards]
        axis = _split_axis(name, parts[0], dim) if len(parts) > 1 else None
        merged[name] = (parts[0] if axis is None else torch.cat(parts, dim=axis)).to(torch.float32)
    return merged


def _split_axis(name: str, first: Any, dim: int) -> int | None:
    if name.endswith(_ROW_SPLIT) or name == "output.weight":
        return 0
    if name.endswith(_COLUMN_SPLIT):
        return 1
    if name == "tok_embeddings.weight":
        # Llama 3 splits the vocabulary across shards, Llama 1/2 the hidden size.
        return 0 if first.shape[1] == dim else 1
    return None  # norms and rope.freqs are replicated on every shard


def spec_from_params(params: dict[str, Any], state: dict[str, Any], source: str = "params.json") -> ModelSpec:
    p = ConfigFile(params, source)
    dim, heads = p.int("dim"), p.int("n_heads")
    for name in ("tok_embeddings.weight", "layers.0.feed_forward.w1.weight"):
        if name not in state:
            raise ConversionError(
                f"the Meta checkpoint has no {name}; it is incomplete or not a Llama model."
            )
    vocab = int(state["tok_embeddings.weight"].shape[0])
    if p.int("vocab_size", -1, positive=False) not in (-1, vocab):  # Llama 2 writes -1: the tokenizer decides
        raise ConversionError(
            f"params.json says vocab_size {params['vocab_size']} but tok_embeddings has {vocab} rows; "
            "the weights and params.json do not belong together."
        )
    rope_theta = p.float("rope_theta", 10000.0)
    return ModelSpec(
        architecture="llama",
        vocab_size=vocab,
        hidden_size=dim,
        # Meta derives it from multiple_of / ffn_dim_multiplier; the tensor is the truth.
        intermediate_size=int(state["layers.0.feed_forward.w1.weight"].shape[0]),
        num_layers=p.int("n_layers"),
        num_heads=heads,
        num_kv_heads=p.int("n_kv_heads", heads),
        head_dim=dim // heads,
        rms_norm_eps=p.float("norm_eps", 1e-5),
        rope_theta=rope_theta,
        max_position_embeddings=_max_positions(p, rope_theta),
        tie_word_embeddings="output.weight" not in state,
        rope_scaling=_rope_scaling(p),
    )


def _max_positions(params: ConfigFile, rope_theta: float) -> int:
    """params.json rarely says; these are the trained lengths of the Llama generations."""
    if params.get("max_seq_len"):
        return params.int("max_seq_len")
    if params.get("use_scaled_rope"):
        return 131072  # Llama 3.1 / 3.2
    return 8192 if rope_theta >= 500000 else 4096  # Llama 3 / Llama 2


# (dim, n_layers) of Llama 3.2 1B and 3B: their params.json says only "use_scaled_rope", but they
# were trained with factor 32 (Hugging Face's config.json for them says so; Meta confirmed it in
# meta-llama/llama-models#166, whose reference code hard-codes 3.1's 8).
_LLAMA_3_2_SMALL = {(2048, 16), (3072, 28)}


def _rope_scaling(params: ConfigFile) -> RopeScaling | None:
    if not params.get("use_scaled_rope"):
        return None
    # The other defaults are llama-models' apply_scaling constants, the same for 3.1 and 3.2.
    return RopeScaling(
        factor=_rope_factor(params),
        low_freq_factor=params.float("low_freq_factor", 1.0),
        high_freq_factor=params.float("high_freq_factor", 4.0),
        original_max_position_embeddings=params.int("original_max_position_embeddings", 8192),
    )


def _rope_factor(params: ConfigFile) -> float:
    for key in ("rope_scaling_factor", "rope_scale_factor"):  # llama-models' and ExecuTorch's name
        if params.get(key):
            return params.float(key)
    if (params.int("dim"), params.int("n_layers")) in _LLAMA_3_2_SMALL:
        return 32.0
    return 8.0  # Llama 3.1, 3.2 11B / 90B, 3.3


def hf_tensors(state: dict[str, Any], spec: ModelSpec) -> dict[str, Any]:
    """Meta names -> HF names, with q/k rows in HF's rotary order."""
    tensors, unknown = {}, []
    for name, t in state.items():
        if name == "rope.freqs":
            continue  # precomputed from rope_theta; the exporter computes its own
        if name in _GLOBAL_NAMES:
            tensors[_GLOBAL_NAMES[name]] = t
            continue
        m = _LAYER.fullmatch(name)
        if not m or m.group(2) not in _LAYER_NAMES:
            unknown.append(name)
            continue
        layer, part = m.groups()
        if part == "attention.wq.weight":
            t = interleaved_to_half_rotary(t, spec.num_heads)
        elif part == "attention.wk.weight":
            t = interleaved_to_half_rotary(t, spec.num_kv_heads)
        tensors[f"model.layers.{layer}.{_LAYER_NAMES[part]}"] = t
    if unknown:
        raise ConversionError(
            f"the Meta checkpoint holds tensors a Llama model does not have (e.g. {', '.join(unknown[:5])}); "
            "it is another architecture."
        )
    return tensors


def find_tokenizer_dir(path: Path) -> Path:
    """Meta ships tokenizer.model; nomoat needs the HF tokenizer.json beside or above the weights."""
    for candidate in (path, path.parent):
        if (candidate / "tokenizer.json").exists():
            return candidate
    raise ConversionError(
        f"no tokenizer.json in {path} or {path.parent}. Meta checkpoints ship tokenizer.model, but the "
        "bundle needs the Hugging Face tokenizer.json: copy it (with tokenizer_config.json) from the "
        "model's Hugging Face repo, or create it with `AutoTokenizer.from_pretrained(<hf model>)"
        ".save_pretrained(<dir>)`, and put it next to consolidated.*.pth."
    )
