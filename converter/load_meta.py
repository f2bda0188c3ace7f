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
_SHARD = re.compile(r"consolidated(?:\.(\d+))?\.pth")
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
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


# The eos_id of Meta's tokenizers: Llama 3's tiktoken model, Llama 1 and 2's SentencePiece model.
META_EOS = ("<|end_of_text|>", "</s>")


def load_meta_dir(path: Path) -> Checkpoint:
    params_file = path / "params.json"
    params = read_json(params_file)
    check_params(params, params_file)
    p = ConfigFile(params, str(params_file))
    files = shard_files(path)
    if not files:
        raise ConversionError(
            f"{path} has no consolidated*.pth weights; copy the Meta weights next to params.json."
        )
    shards = [_load_shard(f) for f in files]
    check_shard_count(files, shards[0])
    state = merge_shards(shards, files, dim=p.int("dim"))
    check_layers(state, p)
    spec = spec_from_params(params, state, source=str(params_file))
    tok_dir = find_tokenizer_dir(path)
    checkpoint = Checkpoint(
        spec=spec,
        tensors=hf_tensors(state, spec),
        # Meta's reference generate() always starts a prompt with BOS.
        # ... and its tokenizer's eos_id ends a sequence, whatever tokenizer_config.json names (an
        # Instruct model's names <|eot_id|>): transformers' converter writes both, as a Hugging Face repo has.
        tokenizer=read_hf_tokenizer(
            tok_dir, read_json_if_exists(tok_dir / "config.json"), default_add_bos=True, own_eos=META_EOS
        ),
        source={"format": "meta", "path": str(path), "shards": len(files)},
        generation_defaults=read_generation_defaults(tok_dir),
    )
    checkpoint.check_tensors(config="params.json")
    checkpoint.check_vocabulary(str(tok_dir / "tokenizer.json"))
    return checkpoint


def is_shard_name(name: str) -> bool:
    """consolidated.pth (one file) or consolidated.NN.pth: the names load.folder_kind recognises a Meta
    folder by, and the only ones loaded, so a folder is never recognised and then found empty."""
    return _SHARD.fullmatch(name) is not None


def shard_files(path: Path) -> list[Path]:
    """The folder's shards in model-parallel order; a gap in their numbering is refused by name."""
    numbered = {}
    for f in path.iterdir():
        m = _SHARD.fullmatch(f.name)
        if m and m.group(1) is not None:
            numbered[int(m.group(1))] = f
    single = path / "consolidated.pth"
    if single.is_file() and numbered:
        raise ConversionError(
            f"{path} holds both consolidated.pth and consolidated.NN.pth shards: two checkpoints; keep one."
        )
    if not numbered:
        return [single] if single.is_file() else []
    missing = [i for i in range(max(numbered)) if i not in numbered]
    if missing:
        raise _missing_shards(path, [f"consolidated.{i:02d}.pth" for i in missing], max(numbered) + 1)
    return [numbered[i] for i in sorted(numbered)]


def check_shard_count(files: list[Path], first: dict[str, Any]) -> None:
    """A missing last shard leaves no gap in the numbering; the slice sizes still say how many there are.

    wq is dim x dim in every Llama (n_heads * head_dim == dim) and is split on its rows, so each shard
    holds dim / shards of them. Both sizes come from the tensor: a wrong params.json cannot fake a gap.
    """
    shape = getattr(first.get("layers.0.attention.wq.weight"), "shape", None)
    if shape is None or len(shape) != 2 or not shape[0] or shape[1] % shape[0]:
        return  # not a Llama wq: merge_shards and spec_from_params name what is wrong
    count = shape[1] // shape[0]
    if count > len(files):
        names = [f"consolidated.{i:02d}.pth" for i in range(len(files), count)]
        raise _missing_shards(files[0].parent, names, count)


def _missing_shards(path: Path, names: list[str], count: int) -> ConversionError:
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    verb = "is" if len(names) == 1 else "are"
    return ConversionError(
        f"{shown} {verb} missing: {path} holds a Meta checkpoint split into {count} shards, each a slice of "
        "every matrix, and none can be left out. Download the missing ones again."
    )


def check_layers(names: Any, params: ConfigFile) -> None:
    """The layers the weights hold must be params.json's n_layers: extra ones would be cut off silently.

    A Hugging Face folder refuses tensors its config.json has no place for (load_hf.model_tensors); these
    are the same, and a missing layer is named here too rather than as one of its tensors.
    """
    found = sorted({int(m.group(1)) for name in names if (m := _LAYER.fullmatch(name))})
    n_layers = params.int("n_layers")
    if found != list(range(n_layers)):
        held = f"{len(found)} layers (layers.{found[0]} to layers.{found[-1]})" if found else "no layers"
        raise ConversionError(
            f"{params.name} says n_layers {n_layers} but the weights hold {held}; the weights and params.json "
            "do not belong together."
        )


def check_params(params: dict[str, Any], params_file: Path) -> None:
    """The keys every Llama params.json has; without them the file is something else."""
    if "quantization_args" in params:
        # Meta's int4 QLoRA / SpinQuant Llama 3.2 releases: int8-stored weights with scales (and LoRA
        # adaptors), a layout of their own; read as a plain Llama they would be another architecture.
        raise ConversionError(
            f"{params_file} has quantization_args: this is Meta's quantized release (int4 QLoRA or SpinQuant, "
            "e.g. Llama3.2-1B-Instruct-QLORA_INT4_EO8), which nomoat does not read. Download the bf16 one "
            "(e.g. Llama3.2-1B-Instruct) and convert that; nomoat quantizes it itself."
        )
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

    zipped = is_zip_format(f)
    try:
        # weights_only: a .pth is a pickle, and only plain tensors may come out of it. mmap: the data is
        # read once, when merged; torch maps only the zip format torch.save writes since 1.6, so a file
        # in the older format is read whole.
        state = torch.load(f, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as e:
        if "WeightsUnpickler" in str(e):
            raise _pickled_objects(f, e) from e
        raise _unreadable(f, e, zipped) from e
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as e:
        raise _unreadable(f, e, zipped) from e
    if not isinstance(state, dict):
        raise ConversionError(
            f"{f} holds a {type(state).__name__}, not a state dict (a weight name -> tensor mapping); it is not a "
            "Meta checkpoint."
        )
    for name, t in state.items():  # here, not in merge_shards: the fit pre-check (peek.py) reads shards this way too
        _check_weight(f, name, t)
    return state


def is_zip_format(f: Path) -> bool:
    """Whether torch.save wrote f in its zip format (the default since torch 1.6), which torch can memory-map."""
    try:
        with open(f, "rb") as fh:
            return fh.read(4) == b"PK\x03\x04"
    except OSError:
        return True  # torch.load reports the error


def _pickled_objects(f: Path, e: Exception) -> ConversionError:
    # torch's own text is a dozen lines about add_safe_globals; the object's class is the useful part
    found = _REFUSED_GLOBAL.search(str(e))
    what = f" ({found.group(1)})" if found else ""
    return ConversionError(
        f"{f} holds pickled Python objects{what} besides tensors, and nomoat loads .pth files with "
        "weights_only=True because unpickling them can run code. Meta's checkpoints hold tensors only: if you "
        "trust this file, re-save just its tensors with torch.save."
    )


def _unreadable(f: Path, e: Exception, zipped: bool) -> ConversionError:
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if zipped:
        return ConversionError(
            f"{f} cannot be read as a PyTorch checkpoint ({reason}). It is truncated or corrupt: download it again."
        )
    return ConversionError(
        f"{f} cannot be read as a PyTorch checkpoint ({reason}): it is in no format torch.save writes, or "
        "truncated. Download it again; if an old PyTorch saved it, load it there and re-save it with torch.save."
    )


def merge_shards(shards: list[dict[str, Any]], files: list[Path], dim: int) -> dict[str, Any]:
    """One state dict from the model-parallel shards (read from files, in order), in fp32."""
    import torch

    names = shards[0].keys()
    for f, s in zip(files[1:], shards[1:], strict=True):
        if s.keys() != names:
            raise ConversionError(
                f"{files[0].name} and {f.name} hold different tensor names; the shards come from different "
                "downloads, not one model: download the checkpoint again."
            )
    merged = {}
    for name in names:
        parts = [s[name] for s in shards]  # each a float tensor: _load_shard checked
        _check_parts_match(name, parts, files)
        axis = _split_axis(name, parts[0], dim) if len(parts) > 1 else None
        merged[name] = (parts[0] if axis is None else torch.cat(parts, dim=axis)).to(torch.float32)
    return merged


def _check_weight(f: Path, name: str, t: Any) -> None:
    import torch

    if not isinstance(t, torch.Tensor):
        raise ConversionError(
            f"{f} holds {name!r} as a {type(t).__name__}, not a tensor; it is not a Meta state dict "
            "(consolidated*.pth maps each weight's name to its tensor)."
        )
    if not t.is_floating_point():
        # int8 / packed weights under the usual names (a quantized export): read as numbers they would be
        # nonsense, not an error. The words are load_hf's for safetensors.
        raise ConversionError(
            f"{f} stores {name} as {str(t.dtype).removeprefix('torch.')}, not as floating-point weights: the "
            "checkpoint is quantized. Convert the unquantized model (float32, float16 or bfloat16 "
            "consolidated*.pth) or its GGUF."
        )


def _check_parts_match(name: str, parts: list[Any], files: list[Path]) -> None:
    """Every shard's slice of a tensor has the same shape and dtype.

    Meta's model-parallel layers (fairscale) divide every split size evenly, and replicated tensors are
    copies, so parts that differ come from two checkpoints; concatenated, they would be a model that
    never existed, or a torch error.
    """
    first = parts[0]
    for f, t in zip(files[1:], parts[1:], strict=True):
        if t.shape != first.shape or t.dtype != first.dtype:
            raise ConversionError(
                f"tensor {name} is {_describe(first)} in {files[0].name} but {_describe(t)} in {f.name}; the "
                "shards come from different downloads: download the checkpoint again, all from one place."
            )


def _describe(t: Any) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"


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
    rope_theta = p.float("rope_theta", 10000.0, positive=True)
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
        max_position_embeddings=_max_positions(p, rope_theta, vocab),
        tie_word_embeddings="output.weight" not in state,
        rope_scaling=_rope_scaling(p),
    )


def _max_positions(params: ConfigFile, rope_theta: float, vocab: int) -> int:
    """params.json rarely says; these are the trained lengths of the Llama generations.

    transformers' convert_llama_weights_to_hf tells them apart the same way: Llama 3 (its 128,256-token
    vocabulary) has its own lengths; a Llama 2-family model with a raised rope_theta (CodeLlama's 1e6,
    which rope_theta alone would take for Llama 3's 5e5) was trained on 16,384 positions.
    """
    if params.get("max_seq_len"):
        return params.int("max_seq_len")
    if params.get("use_scaled_rope"):
        return 131072  # Llama 3.1 / 3.2
    if vocab >= 128000:
        return 8192  # Llama 3
    return 16384 if rope_theta > 10000 else 4096  # CodeLlama / Llama 2


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
        ".save_pretrained(<dir>)`, and put it next to consolidated*.pth."
    )
