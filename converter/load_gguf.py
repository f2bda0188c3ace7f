"""Load a GGUF file (llama.cpp's format): metadata -> ModelSpec, tensors -> fp32 HF tensors.

Three things differ from a Hugging Face checkpoint and are undone here:
- names: llama.cpp's `blk.N.attn_q.weight` style;
- quantization: every tensor is dequantized to fp32 (later stages re-quantize for the target);
- rotary layout: llama.cpp stores q/k of 'llama' models with Meta's interleaved rotary
  pairs (its converter permutes HF weights); 'qwen2' GGUFs are not permuted.
The tokenizer is rebuilt as an HF tokenizer.json from the vocabulary in the metadata.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConversionError
from .gguf_pretokenizer import adds_bos_by_default, set_pre_tokenizer
from .load_hf import END_OF_TURN_TOKENS, end_of_turn_ids
from .load_meta import interleaved_to_half_rotary
from .sampling_defaults import checked_generation_defaults
from .spec import (
    MISTRAL_DEFAULT_SLIDING_WINDOW,
    Checkpoint,
    ModelSpec,
    RopeScaling,
    TokenizerInfo,
    as_number,
    default_max_positions,
)

# 'llama' covers Llama 1/2/3 and Mistral (llama.cpp writes Mistral as 'llama').
SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2")

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's precomputed Llama 3 rope scaling factors

# tokenizer.ggml.* keys -> the names transformers' GGUF tokenizer builders expect
_TOKENIZER_KEYS = {
    "ggml.model": "tokenizer_type",
    "ggml.pre": "pre_tokenizer_type",
    "ggml.tokens": "tokens",
    "ggml.scores": "scores",
    "ggml.token_type": "token_type",
    "ggml.merges": "merges",
    "ggml.precompiled_charsmap": "precompiled_charsmap",
    "ggml.bos_token_id": "bos_token_id",
    "ggml.eos_token_id": "eos_token_id",
    "ggml.unknown_token_id": "unk_token_id",
    "ggml.padding_token_id": "pad_token_id",
    "ggml.add_space_prefix": "add_prefix_space",
}
_CONTROL = 3  # llama.cpp token type of special tokens like <|im_end|>
_USER_DEFINED = 4  # llama.cpp token type of tokens added by the model's makers, matched whole in text
_SAMPLING_KEYS = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_p": "top_p",
    "general.sampling.top_k": "top_k",
    "general.sampling.min_p": "min_p",
    "general.sampling.penalty_repeat": "repetition_penalty",
    "general.sampling.penalty_last_n": "repeat_last_n",
}


def load_gguf(path: Path) -> Checkpoint:
    reader = _open(path)
    meta = read_metadata(reader, path)
    arch = _architecture(meta, path)
    raw = {t.name: t for t in reader.tensors}
    spec = spec_from_gguf(meta, arch, raw, path)
    checkpoint = Checkpoint(
        spec=spec,
        tensors=hf_tensors(raw, spec, permuted=arch == "llama"),
        tokenizer=tokenizer_from_gguf(meta, arch),
        source={"format": "gguf", "path": str(path), "file_type": _file_type(meta)},
        generation_defaults=checked_generation_defaults(
            {name: meta[key] for key, name in _SAMPLING_KEYS.items() if key in meta},
            f"{path}'s general.sampling.* metadata"),
        unrecorded_window=_unrecorded_mistral_window(meta, spec),
    )
    checkpoint.check_tensors()
    checkpoint.check_vocabulary(f"the tokenizer in {path} (tokenizer.ggml.tokens)")
    return checkpoint


def _unrecorded_mistral_window(meta: dict[str, Any], spec: ModelSpec) -> int | None:
    """Mistral 7B v0.1's 4,096-token window when the GGUF looks like it (or a fine-tune of it), else None.

    llama.cpp writes Mistral as 'llama' without a window key, so the file cannot say; general.name mentioning
    Mistral is the hint. Mistral's later models (7B v0.2 and v0.3, Nemo) have no window and a rope_theta of
    1e6 or more, so only v0.1's 10000 is taken for the windowed one: the others get no false notice.
    """
    name = str(meta.get("general.name", ""))
    if spec.architecture == "llama" and "mistral" in name.lower() and spec.rope_theta == 10000.0:
        return MISTRAL_DEFAULT_SLIDING_WINDOW
    return None


def load_gguf_tokenizer(path: Path) -> TokenizerInfo:
    """Only the tokenizer (tokenizer.json and chat template from the metadata), without the weights."""
    meta = read_metadata(_open(path), path)
    return tokenizer_from_gguf(meta, _architecture(meta, path))


def _open(path: Path) -> Any:
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except (ValueError, OSError, IndexError) as e:  # bad magic/version, or a header cut short
        raise ConversionError(
            f"{path} cannot be read as a GGUF file ({e}); it is truncated or corrupt."
        ) from e


def read_metadata(reader: Any, path: Path | str = "the GGUF") -> dict[str, Any]:
    """Every metadata key with its Python value (strings, numbers, lists)."""
    from gguf import GGUFValueType

    meta = {}
    for key, field in reader.fields.items():
        try:
            value = field.contents()
        except UnicodeDecodeError as e:  # the gguf package decodes strings as UTF-8 only when asked for them
            damaged = "its tokenizer metadata is damaged" if key.startswith("tokenizer.") else "the file is damaged"
            raise ConversionError(
                f"{path}: the GGUF metadata's {key} holds text that is not UTF-8 (byte {e.object[e.start]:#04x}); "
                f"{damaged}: download the file again, or convert it again with llama.cpp."
            ) from e
        if field.types == [GGUFValueType.FLOAT32]:
            # float32 1e-5 read back as a double is 9.99999974e-06; the shortest float32
            # repr recovers the value the config was written with, so a model rebuilt from
            # the spec matches the original bit for bit.
            value = float(str(np.float32(value)))
        meta[key] = value
    return meta


def _architecture(meta: dict[str, Any], path: Path) -> str:
    if meta.get("general.type") == "adapter":  # a llama.cpp LoRA: its architecture is its base model's
        from .load import adapter_given_as_model

        raise ConversionError(adapter_given_as_model(path))
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ConversionError(
            f"GGUF architecture {arch!r} is not supported; nomoat converts LLaMA-style GGUFs "
            f"({', '.join(SUPPORTED_GGUF_ARCHITECTURES)}, which includes Mistral). "
            "Use a GGUF of such a model."
        )
    if int(meta.get("split.count", 1)) > 1:
        raise ConversionError(
            "this GGUF is one part of a split model; merge the parts first with "
            "`llama-gguf-split --merge first-part.gguf merged.gguf` and convert the merged file."
        )
    return arch


def _file_type(meta: dict[str, Any]) -> str | int | None:
    from gguf import LlamaFileType

    value = meta.get("general.file_type")
    if value is None:
        return None
    try:
        return LlamaFileType(value).name
    except ValueError:
        return int(value)  # a newer llama.cpp type this gguf package does not name


# --- spec ------------------------------------------------------------------------------


def spec_from_gguf(meta: dict[str, Any], arch: str, raw: dict[str, Any], path: Path | str = "the GGUF") -> ModelSpec:
    def key(name: str, default: Any = ...) -> Any:
        full = f"{arch}.{name}"
        if full in meta:
            return meta[full]
        if default is ...:
            raise ConversionError(
                f"the GGUF metadata lacks {full}; the file is incomplete or from an old converter."
            )
        return default

    def number(name: str, default: Any = ..., kind: type = int) -> Any:
        """A count or size above zero, or (float) a positive finite rope base: a 0 head count divided by zero
        and a rope.freq_base of 0 or NaN ran the whole conversion into a NaN rotary table."""
        value = key(name, default)
        if name == "attention.head_count_kv":
            value = _one_count(value, name)
        checked = as_number(value, kind)
        if checked is None or checked <= 0:
            raise ConversionError(
                f"{path}: the GGUF metadata's {arch}.{name} is {value!r}, not a positive "
                f"{'whole ' if kind is int else ''}number; the file is damaged: download it again or convert the "
                "model again with llama.cpp's convert_hf_to_gguf.py."
            )
        return checked

    if "token_embd.weight" not in raw:
        raise ConversionError("the GGUF holds no token_embd.weight; it is not a complete language model.")
    hidden, heads = number("embedding_length"), number("attention.head_count")
    head_dim = number("attention.key_length", hidden // heads)
    rotary_dims = number("rope.dimension_count", head_dim)
    if rotary_dims != head_dim:
        raise ConversionError(
            f"the GGUF rotates {rotary_dims} of {head_dim} head dimensions (partial rotary); "
            "nomoat's LLaMA block rotates all of them."
        )
    scaling_type, factor = _rope_scaling(key)
    if scaling_type not in ("none", None):
        shown = f" (factor {factor:g})" if factor else ""
        raise ConversionError(
            f"GGUF rope scaling {scaling_type!r}{shown} is not supported (only plain RoPE and Llama 3 scaling); "
            "use a model without rope scaling."
        )
    rope_theta = number("rope.freq_base", 10000.0, float)
    biased = sorted({m[2] for name in raw if (m := _BLOCK.fullmatch(name)) and m[2].endswith(".bias")})
    if biased and arch != "qwen2":
        raise ConversionError(
            f"the GGUF's {arch} blocks carry biases ({', '.join(biased)}); nomoat converts LLaMA blocks without "
            "biases (and Qwen2's q/k/v biases). Use a GGUF of a model without them."
        )
    return ModelSpec(
        architecture=arch,
        # the embedding's rows are the truth: llama.cpp may pad the vocabulary metadata
        vocab_size=_hf_shape(raw["token_embd.weight"])[0],
        hidden_size=hidden,
        intermediate_size=number("feed_forward_length"),
        num_layers=number("block_count"),
        num_heads=heads,
        num_kv_heads=number("attention.head_count_kv", heads),
        head_dim=head_dim,
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        rope_theta=rope_theta,
        # llama.cpp requires the key; transformers' GGUF loader gives a file without it its config class's
        # default (Qwen2's 32768, Llama's 2048), so the bundle is the model the reference is.
        max_position_embeddings=number("context_length", default_max_positions(arch)),
        tie_word_embeddings="output.weight" not in raw,
        # Qwen2 has q/k/v biases (transformers' Qwen2 always does: the reference needs them too); the load
        # refuses a qwen2 GGUF without them, as it does a Hugging Face Qwen2 folder.
        attention_bias=arch == "qwen2",
        rope_scaling=_llama3_scaling(raw[_ROPE_FREQS], head_dim, rope_theta) if _ROPE_FREQS in raw else None,
    )


def _rope_scaling(key: Any) -> tuple[Any, float | None]:
    """(type, factor) of the rope scaling, as llama.cpp reads them.

    llama.cpp takes a missing rope.scaling.type as "linear", scaling positions by rope.scaling.factor (or by
    the older key rope.scale_linear); a factor of 0 or 1 scales nothing. So a file with only a factor is
    linear scaling, and read as plain RoPE it would put every position in the wrong place.
    """
    factor = key("rope.scaling.factor", None)
    if factor is None:
        factor = key("rope.scale_linear", None)
    factor = None if factor is None else float(factor)
    scaling_type = key("rope.scaling.type", None)
    if scaling_type is None:
        scaling_type = "none" if factor in (None, 0.0, 1.0) else "linear"
    return scaling_type, factor


def _llama3_scaling(rope_freqs: Any, head_dim: int, theta: float) -> RopeScaling:
    """Recover Llama 3 rope scaling from llama.cpp's per-frequency factor tensor.

    llama.cpp writes the factors instead of the parameters. They depend only on
    `factor` (the largest one) and on the Llama 3.1 constants low 1 / high 4 /
    original context 8192, which every Llama 3.x uses; if the tensor says otherwise,
    refuse rather than export a model with different positions.
    """
    factors = dequantize(rope_freqs).numpy().astype(np.float64)
    candidate = RopeScaling(
        factor=float(str(np.float32(factors.max()))),
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    )
    if not np.allclose(factors, llama3_rope_factors(candidate, head_dim, theta), rtol=1e-4):
        raise ConversionError(
            "the GGUF's rope_freqs tensor is not Llama 3 rope scaling with the standard constants; "
            "this rope scaling is not supported. Convert from the Hugging Face checkpoint instead."
        )
    return candidate


def llama3_rope_factors(s: RopeScaling, head_dim: int, theta: float) -> np.ndarray:
    """The divisor llama.cpp's convert_hf_to_gguf stores for each rotary frequency."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(s.factor)
        else:
            smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor
            )
            out.append(1 / ((1 - smooth) / s.factor + smooth))
    return np.array(out)


# --- tensors ---------------------------------------------------------------------------


def hf_tensors(raw: dict[str, Any], spec: ModelSpec, permuted: bool) -> dict[str, Any]:
    """Dequantized fp32 tensors under HF names, q/k rows back in HF rotary order."""
    from tqdm import tqdm

    tensors, unknown = {}, []
    # A bar on stderr: dequantizing a multi-GB GGUF takes minutes (it hides itself when not a terminal).
    for gguf_name, t in tqdm(raw.items(), desc="dequantize GGUF", unit="tensor", leave=False,
                             disable=None):
        if gguf_name == _ROPE_FREQS:
            continue  # folded into spec.rope_scaling
        hf_name = _hf_name(gguf_name)
        if hf_name is None:
            unknown.append(gguf_name)
            continue
        w = dequantize(t)
        if permuted and hf_name.endswith("q_proj.weight"):
            w = interleaved_to_half_rotary(w, spec.num_heads)
        elif permuted and hf_name.endswith("k_proj.weight"):
            w = interleaved_to_half_rotary(w, spec.num_kv_heads)
        tensors[hf_name] = w
    if unknown:
        raise ConversionError(
            f"the GGUF holds tensors a {spec.architecture} model does not have "
            f"(e.g. {', '.join(unknown[:5])}); "
            "it is another architecture or a variant nomoat does not convert."
        )
    return tensors


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK.fullmatch(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}"
    return None


def dequantize(t: Any) -> Any:
    """One GGUF tensor as a torch fp32 tensor in HF [out, in] layout.

    GGUF lists dimensions fastest-first (ne = [in, out]); GGUFReader already exposes
    the data in numpy order, [out, in] with the quantized blocks along `in`, so after
    dequantizing the shape is HF's and no transpose is needed.
    """
    import torch
    from gguf.quants import dequantize as gguf_dequantize

    try:
        values = gguf_dequantize(t.data, t.tensor_type)
    except NotImplementedError as e:
        raise ConversionError(
            f"tensor {t.name} is stored as {t.tensor_type.name}, which the gguf package cannot dequantize. "
            "Use a GGUF quantized as F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 or Q2_K..Q6_K, or the original "
            "safetensors."
        ) from e
    # np.array copies: the reader's arrays are read-only views of the memory-mapped file.
    return torch.from_numpy(np.array(values, dtype=np.float32).reshape(_hf_shape(t)))


def _one_count(value: Any, name: str) -> Any:
    """A count llama.cpp may also write per layer (a list): one value for every layer is that value (checked
    as a count by the caller)."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ConversionError(f"the GGUF's {name} differs from layer to layer ({sorted(set(value))}); nomoat "
                                  "converts models whose layers are alike.")
        value = value[0]
    return value


def _hf_shape(t: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(t.shape.tolist()))


# --- tokenizer -------------------------------------------------------------------------


def tokenizer_from_gguf(meta: dict[str, Any], arch: str) -> TokenizerInfo:
    if "tokenizer.ggml.tokens" not in meta:
        raise ConversionError(
            "the GGUF has no tokenizer (tokenizer.ggml.tokens); use a GGUF converted with its vocabulary."
        )
    tokenizer_dict = {
        name: meta[f"tokenizer.{key}"] for key, name in _TOKENIZER_KEYS.items() if f"tokenizer.{key}" in meta
    }
    tokens: list[str] = tokenizer_dict["tokens"]
    token_types = tokenizer_dict.get("token_type") or [1] * len(tokens)
    kinds = dict(enumerate(token_types))
    control = {tok: i for i, tok in enumerate(tokens) if kinds.get(i) == _CONTROL}
    chat_template = meta.get("tokenizer.chat_template")

    def token_id(key: str) -> int | None:
        value = meta.get(f"tokenizer.ggml.{key}")
        return None if value is None else int(value)

    bos_id = token_id("bos_token_id")
    stop_ids = [token_id("eos_token_id"), token_id("eot_token_id"), token_id("eom_token_id")]
    eos_ids = list(
        dict.fromkeys(i for i in stop_ids + end_of_turn_ids(control, chat_template) if i is not None)
    )
    if not eos_ids:
        eos_ids = [control[t] for t in END_OF_TURN_TOKENS if t in control]
    if not eos_ids:
        raise ConversionError(
            "the GGUF names no end-of-sequence token (tokenizer.ggml.eos_token_id), "
            "so generation could never stop; use a GGUF converted with its full tokenizer."
        )
    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    if add_bos is None:
        # llama.cpp's default when the flag is absent: add BOS for SentencePiece vocabularies and for
        # the Llama 3 and Tekken byte-level ones.
        add_bos = (tokenizer_dict.get("tokenizer_type") == "llama"
                   or adds_bos_by_default(tokenizer_dict.get("pre_tokenizer_type")))
    texts = {
        "bos": bos_id,
        "eos": eos_ids[0],
        "unk": token_id("unknown_token_id"),
        "pad": token_id("padding_token_id"),
    }
    return TokenizerInfo(
        tokenizer_json=_build_tokenizer_json(arch, tokenizer_dict),
        chat_template=chat_template,
        bos_token_id=bos_id,
        eos_token_ids=eos_ids,
        add_bos_token=bool(add_bos) and bos_id is not None,  # a missing BOS cannot be added
        special_tokens={
            role: tokens[i] for role, i in texts.items() if i is not None and 0 <= i < len(tokens)
        },
    )


def _build_tokenizer_json(arch: str, tokenizer_dict: dict[str, Any]) -> str:
    """The HF tokenizer.json for this vocabulary, via transformers' own GGUF converter."""
    try:  # transformers >= 5 moved the converter into a package
        from transformers.integrations.gguf import convert_gguf_tokenizer
    except ImportError:
        from transformers.integrations.ggml import convert_gguf_tokenizer

    try:
        tokenizer, _ = convert_gguf_tokenizer(arch, tokenizer_dict)
    except (ValueError, KeyError) as e:
        raise ConversionError(
            f"cannot rebuild the tokenizer from the GGUF (tokenizer.ggml.model="
            f"{tokenizer_dict.get('tokenizer_type')!r}): {e}. "
            "Convert from the Hugging Face checkpoint instead."
        ) from e
    if tokenizer_dict.get("tokenizer_type") == "llama":
        return json.dumps(_with_llamas_space_prefix(json.loads(tokenizer.to_str()), tokenizer_dict))
    if tokenizer_dict.get("tokenizer_type") != "gpt2":
        return tokenizer.to_str()
    set_pre_tokenizer(tokenizer, tokenizer_dict.get("pre_tokenizer_type"))  # byte-level BPE: the split is nomoat's
    return json.dumps(_with_raw_special_tokens(json.loads(tokenizer.to_str()), tokenizer_dict))


def _with_llamas_space_prefix(data: dict[str, Any], tokenizer_dict: dict[str, Any]) -> dict[str, Any]:
    """A SentencePiece vocabulary's spaces as llama.cpp and Llama 2's own tokenizer.json write them.

    llama.cpp gives every stretch of text that starts the prompt or follows a special token a leading
    space ("<s>[INST]" is "<s>", "▁[", "INST", ...) unless tokenizer.ggml.add_space_prefix is false,
    and keeps runs of spaces as they are. transformers' rebuild (a Metaspace pre-tokenizer that
    prepends only at the very start) did neither. Llama 2's tokenizer.json does it with a normalizer,
    which runs on each stretch between special tokens: the same here. Decoding strips the leading
    space only where one was added, as sentencepiece and llama.cpp do."""
    prefix = tokenizer_dict.get("add_prefix_space")
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
    data["normalizer"] = {"type": "Sequence", "normalizers": (
        [replace] if prefix is False else [{"type": "Prepend", "prepend": "▁"}, replace])}
    data["pre_tokenizer"] = None
    if prefix is False:  # nothing was prepended, so decoding must not strip a space the text really had
        decoder = data.get("decoder") or {}
        if decoder.get("type") == "Sequence":
            decoder["decoders"] = [d for d in decoder["decoders"] if d.get("type") != "Strip"]
    return data


def _with_raw_special_tokens(data: dict[str, Any], tokenizer_dict: dict[str, Any]) -> dict[str, Any]:
    """Control and user-defined tokens spelt with characters outside the byte-level alphabet, whole.

    llama.cpp's converter stores a byte-level vocabulary's added tokens as their text, and DeepSeek-R1's
    are not ASCII ("<｜User｜>", "<｜end▁of▁sentence｜>"). transformers' rebuild (5.25) takes them for
    byte-level spellings gone wrong and leaves them out of the added tokens, so a chat template's
    "<｜User｜>" was cut into byte pieces. llama.cpp matches them whole in the text: so do we."""
    from tokenizers import pre_tokenizers

    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = data["model"]["vocab"]
    key_of = {i: key for key, i in vocab.items()}
    added = {t["id"] for t in data["added_tokens"]}
    kinds = tokenizer_dict.get("token_type") or []
    for i, text in enumerate(tokenizer_dict["tokens"]):
        kind = kinds[i] if i < len(kinds) else None
        if kind not in (_CONTROL, _USER_DEFINED) or i in added or set(text) <= alphabet:
            continue
        if vocab.get(text, i) != i:  # the text is another token's: leave both as they are
            continue
        vocab.pop(key_of.get(i, text), None)
        vocab[text] = i
        data["added_tokens"].append({"id": i, "content": text, "single_word": False, "lstrip": False,
                                     "rstrip": False, "normalized": False, "special": kind == _CONTROL})
    data["added_tokens"].sort(key=lambda t: t["id"])
    return data
