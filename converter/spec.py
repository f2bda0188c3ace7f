"""ModelSpec and Checkpoint: the canonical in-memory model every loader produces.

Tensors use Hugging Face LLaMA names (`model.layers.N.self_attn.q_proj.weight`, ...)
and the HF rotary layout (rotate-half), in fp32. PEFT adapters key on these names,
and the GGUF and Meta loaders map into them.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import ConversionError

# model_type values whose decoder is the LLaMA block we export (RMSNorm, rotate-half
# RoPE, SwiGLU MLP, grouped-query attention). Anything else is refused by name.
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
# ONNX Runtime's GroupQueryAttention (CPU, rotary inside), which every bundle runs attention with, takes
# head sizes that are multiples of 16 only: with onnxruntime 1.32, head_dim 8, 20, 24 and 40 fail at run
# time ("head_size shall be a multiple of 16"), 16, 32, 48, 64, 80, 96, 112, 128, 160, 256 and 512 run.
ONNX_HEAD_DIM_MULTIPLE = 16

_REQUIRED = object()


class ConfigFile:
    """A model's config.json or params.json, read key by key.

    A hand-edited or damaged file must be a one-line error that names the file and the key, not a
    KeyError or TypeError from deep inside the loader. A key that is absent or null takes its default
    when it has one (as transformers does); otherwise, and for a value that is not a number, it is refused.
    """

    def __init__(self, data: dict[str, Any], name: str, prefix: str = "") -> None:
        self.data, self.name, self.prefix = data, name, prefix

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def int(self, key: str, default: Any = _REQUIRED, positive: bool = True) -> Any:
        """An integer (a count or a size: above zero unless `positive` is false)."""
        value = self.data.get(key)
        if value is None and default is not _REQUIRED:
            return default
        number = as_number(value, int)
        if number is None or (positive and number <= 0):
            raise self.invalid(key)
        return number

    def float(self, key: str, default: Any = _REQUIRED, positive: bool = False) -> Any:
        """A finite number (above zero when `positive`: a rope_theta, the base of every rotary wavelength)."""
        value = self.data.get(key)
        if value is None and default is not _REQUIRED:
            return default
        number = as_number(value, float)
        if number is None or (positive and number <= 0):
            raise self.invalid(key)
        return number

    def section(self, key: str) -> ConfigFile | None:
        """A nested object such as rope_scaling; None when absent or null."""
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.invalid(key)
        return ConfigFile(value, self.name, f"{self.prefix}{key}.")

    def invalid(self, key: str) -> ConversionError:
        shown = f" ({json.dumps(self.data[key])})" if key in self.data else ""
        return ConversionError(f"{self.name} lacks or has an invalid {self.prefix}{key}{shown}; the file is damaged "
                               "or hand-edited: download it again with the weights, or correct that value.")


def as_number(value: Any, kind: type) -> Any:
    """value as an int or a finite float; None when it is not one (a bool, a string of words, 64.5 as an int)."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(number) or (kind is int and not number.is_integer()):
        return None
    return int(number) if kind is int else number


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.x frequency scaling ("rope_type": "llama3"); absent for plain RoPE."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    @classmethod
    def from_config(cls, d: ConfigFile | None, top: ConfigFile | None = None) -> RopeScaling | None:
        """From config.json's rope_scaling (or rope_parameters) object; `top` is the whole config.json, whose
        top-level original_max_position_embeddings transformers 5 reads too."""
        if d is None or not d.data:
            return None
        kind = d.get("rope_type", d.get("type"))
        if kind in (None, "default"):
            return None
        if kind != "llama3":
            raise ConversionError(
                f"rope scaling type {kind!r} is not supported (only plain RoPE and 'llama3'). "
                "Convert a model without rope_scaling or ask for this rope type in an issue."
            )
        return cls(
            factor=d.float("factor"),
            low_freq_factor=d.float("low_freq_factor"),
            high_freq_factor=d.float("high_freq_factor"),
            original_max_position_embeddings=_original_max_positions(d, top),
        )


def _original_max_positions(d: ConfigFile, top: ConfigFile | None) -> int:
    """llama3 rope's original_max_position_embeddings: the context the model was pretrained with, which the
    scaling counts wavelengths against.

    transformers 4 reads it from rope_scaling only; transformers 5 (standardize_rope_params) lets a top-level
    key in config.json override the one in rope_scaling/rope_parameters. When only the top-level one is there,
    it is used, as transformers 5 does (4 cannot load such a file at all). When both are there and differ, the
    two versions build different models, and the reference verify rebuilds from our spec would agree with
    whichever we picked: refused, so the user decides.
    """
    inner = d.int("original_max_position_embeddings", None)
    outer = top.int("original_max_position_embeddings", None) if top is not None else None
    if inner is not None and outer is not None and inner != outer:
        raise ConversionError(
            f"{d.name} sets original_max_position_embeddings twice: {outer} at the top level and {inner} in "
            f"{d.prefix.rstrip('.')}; transformers 5 uses the top-level one and transformers 4 the other, so the "
            f"model's llama3 rope is ambiguous: edit {d.name} so the two agree (the context the model was "
            "pretrained with, 8192 for Meta's Llama 3.1 to 3.3), or remove the top-level one."
        )
    if inner is None and outer is None:
        # transformers 5 would fall back to max_position_embeddings, which is not the pretraining context for the
        # models that use llama3 rope (Llama 3.1: 8192, not 131072) and scales every wavelength wrong; 4 refuses.
        raise ConversionError(
            f"{d.name} sets llama3 rope scaling without {d.prefix}original_max_position_embeddings, which llama3 "
            "rope needs: it is the context the model was pretrained with, which the scaling counts wavelengths "
            f"against. Add it to {d.prefix.rstrip('.')} in {d.name} (8192 for Meta's Llama 3.1 to 3.3; see the "
            "config.json the model was published with)."
        )
    return inner if outer is None else outer


@dataclass(frozen=True)
class ModelSpec:
    """Shape and hyper-parameters of a LLaMA-family decoder."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False  # Qwen2: q/k/v projections carry a bias
    rope_scaling: RopeScaling | None = None
    # Mistral: each position attends to itself and the sliding_window - 1 before it; None: all before it
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ConversionError(
                f"architecture {self.architecture!r} is not supported; nomoat converts "
                f"{', '.join(SUPPORTED_ARCHITECTURES)} models."
            )
        # the loaders refuse these naming their file; this keeps a spec built another way from dividing by zero
        # (num_heads % num_kv_heads) or exporting a NaN rotary table (rope_theta <= 0)
        counts = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                  "head_dim", "max_position_embeddings")
        bad = [f"{name} {getattr(self, name)}" for name in counts if getattr(self, name) <= 0]
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):  # NaN fails `> 0`
            bad.append(f"rope_theta {self.rope_theta}")
        if bad:
            raise ConversionError(f"the model's config gives {', '.join(bad)}, which must be positive; the file is "
                                  "damaged or hand-edited: download it again with the weights.")
        if self.num_heads % self.num_kv_heads:
            raise ConversionError(
                f"num_attention_heads ({self.num_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_kv_heads}); the config is inconsistent."
            )
        if self.head_dim % 2:
            raise ConversionError(f"head_dim {self.head_dim} is odd; rotary embeddings need an even size.")

    def check_exportable(self) -> None:
        """Refuse a model the ONNX export cannot run, before any weights are read (`nomoat merge` needs no ONNX)."""
        if self.head_dim % ONNX_HEAD_DIM_MULTIPLE:
            raise ConversionError(
                f"head_dim {self.head_dim} is not supported: ONNX Runtime's GroupQueryAttention, which a bundle "
                f"runs attention with, takes head sizes that are multiples of {ONNX_HEAD_DIM_MULTIPLE} only "
                "(16, 32, 48, 64, 80, 96, 128, ...; LLaMA, Mistral and Qwen2 models use 64 or 128). "
                "This model cannot be converted."
            )

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], source: str = "config.json") -> ModelSpec:
        """Build from a Hugging Face config.json dict (read from `source`), refusing what we cannot export."""
        arch = cfg.get("model_type")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConversionError(
                f"model_type {arch!r} is not supported; nomoat converts "
                f"{', '.join(SUPPORTED_ARCHITECTURES)} models (LLaMA-style decoders)."
            )
        if cfg.get("mlp_bias") or (arch == "llama" and cfg.get("attention_bias")):
            raise ConversionError("LLaMA variants with biases in attention or MLP are not supported.")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ConversionError(f"hidden_act {act!r} is not supported (LLaMA-style models use 'silu').")
        c = ConfigFile(cfg, source)
        heads = c.int("num_attention_heads")
        hidden = c.int("hidden_size")
        layers = c.int("num_hidden_layers")
        defaults = _TRANSFORMERS_DEFAULTS[arch]
        if arch == "qwen2":
            _refuse_qwen2_sliding_layers(c, layers)
        # transformers 5 moved the rope settings into `rope_parameters`; read either
        rope_params = c.section("rope_parameters")
        theta = c.float("rope_theta", 10000.0, positive=True)
        return cls(
            architecture=arch,
            vocab_size=c.int("vocab_size"),
            hidden_size=hidden,
            intermediate_size=c.int("intermediate_size"),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=c.int("num_key_value_heads", _default_kv_heads(cfg, defaults, heads)),
            head_dim=c.int("head_dim", hidden // heads),
            rms_norm_eps=c.float("rms_norm_eps", 1e-6),
            # transformers 5 reads rope_parameters first when a config has both
            rope_theta=(rope_params.float("rope_theta", theta, positive=True) if rope_params else theta),
            max_position_embeddings=c.int("max_position_embeddings", defaults["max_position_embeddings"]),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=arch == "qwen2",
            rope_scaling=RopeScaling.from_config(_rope_scaling_section(c, rope_params), c),
            sliding_window=_mistral_sliding_window(c) if arch == "mistral" else None,
        )

    def to_hf_config(self) -> dict[str, Any]:
        """The config.json that makes transformers build this exact model (used as reference)."""
        cfg: dict[str, Any] = {
            "model_type": self.architecture,
            "architectures": [_HF_CLASS[self.architecture]],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        }
        if self.rope_scaling:
            cfg["rope_scaling"] = {"rope_type": "llama3", **asdict(self.rope_scaling)}
        if self.architecture == "mistral":
            cfg["sliding_window"] = self.sliding_window
        if self.architecture == "qwen2":
            cfg["use_sliding_window"] = False
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        d = dict(d)
        d["rope_scaling"] = RopeScaling(**d["rope_scaling"]) if d.get("rope_scaling") else None
        return cls(**d)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the exporter reads, with its HF shape ([out, in] for linears)."""
        h, i, hd = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_heads * hd, self.num_kv_heads * hd
        shapes: dict[str, tuple[int, ...]] = {
            "model.embed_tokens.weight": (self.vocab_size, h),
            "model.norm.weight": (h,),
        }
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, h)
        for n in range(self.num_layers):
            p = f"model.layers.{n}."
            shapes |= {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (q, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, q),
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
            }
            if self.attention_bias:
                shapes |= {
                    p + "self_attn.q_proj.bias": (q,),
                    p + "self_attn.k_proj.bias": (kv,),
                    p + "self_attn.v_proj.bias": (kv,),
                }
        return shapes


# transformers' MistralConfig default (4.x and 5.x): what a config.json without the key gets
MISTRAL_DEFAULT_SLIDING_WINDOW = 4096

# What transformers' LlamaConfig, MistralConfig and Qwen2Config (4.x and 5.25 alike) give a config.json that
# lacks the key, so the bundle is the model transformers loads from the same file. Written out rather than
# read from transformers, whose import costs seconds in `nomoat convert`'s first step. None: as many KV heads
# as query heads.
_TRANSFORMERS_DEFAULTS: dict[str, dict[str, int | None]] = {
    "llama": {"max_position_embeddings": 2048, "num_key_value_heads": None},
    "mistral": {"max_position_embeddings": 4096 * 32, "num_key_value_heads": 8},
    "qwen2": {"max_position_embeddings": 32768, "num_key_value_heads": 32},
}


def default_max_positions(arch: str) -> int:
    """The context length transformers gives a model of `arch` whose config (or GGUF) does not say."""
    return int(_TRANSFORMERS_DEFAULTS[arch]["max_position_embeddings"])


def _default_kv_heads(cfg: dict[str, Any], defaults: dict[str, int | None], heads: int) -> int:
    """What transformers takes for a num_key_value_heads config.json lacks: absent, the config class's default
    (Qwen2's 32, Mistral's 8); null, as many as the query heads (its __post_init__), as is Llama's default."""
    if "num_key_value_heads" in cfg:
        return heads
    return defaults["num_key_value_heads"] or heads


# Qwen2Config's defaults for its per-layer window: with use_sliding_window, layers from max_window_layers on
# attend within sliding_window
QWEN2_DEFAULT_SLIDING_WINDOW = 4096
QWEN2_DEFAULT_MAX_WINDOW_LAYERS = 28


def _refuse_qwen2_sliding_layers(c: ConfigFile, layers: int) -> None:
    """Refuse a Qwen2 config in which transformers would run some layer with sliding-window attention.

    Qwen2 slides only when use_sliding_window is true and sliding_window is not null, and then only in the
    layers `layer_types` marks "sliding_attention", or without that list, layers max_window_layers and up.
    A config with use_sliding_window true whose max_window_layers covers every layer attends fully
    everywhere, so it is plain attention and exported as such. nomoat exports one kind of attention for
    all layers, so any sliding layer is refused.
    """
    if not c.get("use_sliding_window") or c.data.get("sliding_window", QWEN2_DEFAULT_SLIDING_WINDOW) is None:
        return
    window = c.int("sliding_window", QWEN2_DEFAULT_SLIDING_WINDOW)
    layer_types = c.get("layer_types")
    if layer_types is not None:
        if not isinstance(layer_types, list):
            raise c.invalid("layer_types")
        sliding = [n for n, kind in enumerate(layer_types[:layers]) if kind == "sliding_attention"]
        setting = f"layer_types marks layer(s) {_ranges(sliding)} as sliding_attention"
    else:
        first = c.int("max_window_layers", QWEN2_DEFAULT_MAX_WINDOW_LAYERS, positive=False)
        sliding = list(range(max(first, 0), layers))
        shown = "" if "max_window_layers" in c.data else " (Qwen2Config's default)"
        setting = (f"max_window_layers {first}{shown} is below num_hidden_layers {layers}, so layer(s) "
                   f"{_ranges(sliding)} attend within the window")
    if sliding:
        raise ConversionError(
            f"{c.name} sets use_sliding_window=true with sliding_window {window}, and {setting}; nomoat exports "
            "one kind of attention for every layer, so this Qwen2 cannot be converted. If the model was trained "
            "without the window (Qwen2 and Qwen2.5 ship use_sliding_window false), set it to false in "
            f"{c.name}."
        )


def _ranges(numbers: list[int]) -> str:
    """[2, 3, 4, 7] -> '2-4, 7'."""
    parts: list[str] = []
    for n in numbers:
        if parts and parts[-1].split("-")[-1] == str(n - 1):
            parts[-1] = f"{parts[-1].split('-')[0]}-{n}"
        else:
            parts.append(str(n))
    return ", ".join(parts)


def _mistral_sliding_window(c: ConfigFile) -> int | None:
    """Mistral's sliding attention window in tokens, or None when each position attends to all before it.

    As transformers reads config.json: without the key, MistralConfig's default window (Mistral 7B
    v0.1's 4096); an explicit null means no window (v0.2 and later). 0 is taken as no window too,
    as a window of nothing would attend to nothing (not false or 0.0: those are refused, as transformers
    refuses them). A `layer_types` list mixing full and sliding layers is Ministral's alternating
    attention, which transformers' Mistral classes do not run either: refused."""
    value = c.data.get("sliding_window", MISTRAL_DEFAULT_SLIDING_WINDOW)
    if value is None or (type(value) is int and value == 0):
        return None
    window = c.int("sliding_window", MISTRAL_DEFAULT_SLIDING_WINDOW)
    layer_types = c.get("layer_types")
    if layer_types is not None and (not isinstance(layer_types, list) or set(layer_types) != {"sliding_attention"}):
        raise ConversionError(
            f"{c.name} sets layer_types, attention that differs from layer to layer (Ministral's alternating "
            "full and sliding-window layers), which nomoat does not export: it applies one sliding_window to "
            "every layer. Convert a model whose layers all attend alike."
        )
    return window


_HF_CLASS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def _rope_scaling_section(c: ConfigFile, rope_params: ConfigFile | None) -> ConfigFile | None:
    """`rope_scaling`, or transformers 5's `rope_parameters` when it names a scaling type."""
    scaling = c.section("rope_scaling")
    if scaling is not None and scaling.data:
        return scaling
    if rope_params is not None and rope_params.get("rope_type") not in (None, "default"):
        return rope_params
    return None


@dataclass
class TokenizerInfo:
    """Everything the runtime needs to turn text into ids and back."""

    tokenizer_json: str  # HF tokenizers JSON
    chat_template: str | None
    bos_token_id: int | None
    eos_token_ids: list[int]  # tokens that end generation
    add_bos_token: bool
    special_tokens: dict[str, str] = field(default_factory=dict)  # role -> token text (bos, eos, pad, unk)


@dataclass
class Checkpoint:
    """A loaded model: spec + fp32 tensors under HF names + tokenizer.

    `tensors` values are torch.float32 tensors; `source` records where it came from
    for the manifest.
    """

    spec: ModelSpec
    tensors: dict[str, Any]
    tokenizer: TokenizerInfo
    source: dict[str, Any] = field(default_factory=dict)
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    # a sliding window (in tokens) the model was likely trained with that its file does not record, so the bundle
    # attends past it: a GGUF of Mistral 7B v0.1, which llama.cpp writes as 'llama' with no window key
    unrecorded_window: int | None = None

    def check_tensors(self, config: str = "config.json") -> None:
        """Refuse a checkpoint with missing, extra-shaped or non-finite tensors.

        `config` names the file the shapes come from in the messages (a Meta folder's is params.json).
        """
        import torch

        for name, shape in self.spec.expected_shapes().items():
            t = self.tensors.get(name)
            if t is None:
                raise ConversionError(
                    f"tensor {name!r} is missing from the checkpoint; the weights are incomplete "
                    "or belong to another architecture."
                )
            if tuple(t.shape) != shape:
                raise ConversionError(
                    f"tensor {name!r} has shape {tuple(t.shape)} but {config} says {shape}; "
                    f"the weights and {config} do not belong together."
                )
            if not torch.isfinite(t).all():
                raise ConversionError(f"tensor {name!r} contains NaN or Inf values; the checkpoint is corrupt.")

    def check_vocabulary(self, tokenizer_source: str) -> None:
        """Refuse a tokenizer that makes ids the embedding has no row for (one copied from another model).

        Such an id crashes calibration, or, with rtn and --skip-verify, indexes past the table in the
        bundle and the model answers with garbage. Fewer tokens than rows is fine: models pad their
        embedding (Qwen2's 151,936 rows for 151,665 tokens) and never produce the padding rows.
        """
        from tokenizers import Tokenizer

        rows = self.spec.vocab_size
        ids = Tokenizer.from_str(self.tokenizer.tokenizer_json).get_vocab(with_added_tokens=True).values()
        tokens = max(ids, default=-1) + 1  # the highest id indexes the embedding, whatever the gaps below it
        if tokens > rows:
            raise ConversionError(f"{tokenizer_source} has {tokens} tokens but the model's embedding has {rows} rows; "
                                  "the tokenizer belongs to another model: use the tokenizer files that came with "
                                  "the weights.")
        tok = self.tokenizer
        named = [("bos_token_id", tok.bos_token_id)] if tok.bos_token_id is not None else []
        for role, token_id in named + [("eos_token_id", i) for i in tok.eos_token_ids]:
            if not 0 <= token_id < rows:
                raise ConversionError(f"{role} {token_id} lies past the model's vocabulary of {rows} tokens "
                                      "(its embedding rows); the config or tokenizer files that name it belong to "
                                      "another model: use the ones that came with the weights.")
