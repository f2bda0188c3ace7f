"""Tiny random LLaMA-style models in every source layout the load stage reads.

make_tiny_hf_dir writes the reference: a transformers model saved with save_pretrained
plus a small byte-level BPE tokenizer. The other writers re-encode *those same weights*
the way llama.cpp (write_gguf_from_hf) and Meta (write_meta_from_hf) store them, so a
loader is right exactly when it gives the reference tensors back.
"""

from __future__ import annotations

import json
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>"]  # <s>: a Llama-2-style BOS
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Small models run on phones and on the Raspberry Pi.",
    "def hello(name):\n    return f'hello {name}'\n",
    "Numbers like 12345 and 3.14159 appear in text too.",
    "Emoji 😀🚀 and 中文字符 and café need bytes.",
] * 4

TINY = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
}


@lru_cache(maxsize=1)
def tokenizer_json() -> str:
    """A byte-level BPE (like GPT-2 / SmolLM / Qwen) trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    return tok.to_str()


def make_tiny_hf_dir(
    path: str | Path,
    arch: str = "llama",
    tie: bool = False,
    seed: int = 0,
    sharded: bool = False,
    **config_overrides: Any,
) -> Path:
    """A saved transformers model (random weights) with tokenizer files; returns the directory."""
    from tokenizers import Tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok_json = tokenizer_json()
    vocab = Tokenizer.from_str(tok_json)
    im_end = vocab.token_to_id("<|im_end|>")
    settings = {
        **TINY,
        "vocab_size": vocab.get_vocab_size(),
        "tie_word_embeddings": tie,
        "bos_token_id": None,
        "eos_token_id": im_end,
        **config_overrides,
    }
    config = AutoConfig.for_model(arch, **settings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    _randomize(model)
    model.save_pretrained(path, max_shard_size="40KB" if sharded else "5GB")

    (path / "tokenizer.json").write_text(tok_json, encoding="utf-8")
    tokenizer_config = {
        "chat_template": CHATML_TEMPLATE,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "add_bos_token": False,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2), encoding="utf-8")
    generation = {"eos_token_id": im_end, "do_sample": True, "temperature": 0.7, "top_p": 0.9}
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2), encoding="utf-8")
    return path


def _randomize(model: torch.nn.Module) -> None:
    """Give norms and biases distinct values: default init leaves them at exactly 1 and 0,
    which would hide a swapped norm or a dropped bias. Matrices keep transformers' init
    (std 0.02), so the model behaves like a trained one under quantization."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))


def hf_state_dict(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        state |= load_file(f)
    return state


def read_config(hf_dir: Path) -> dict[str, Any]:
    return json.loads((Path(hf_dir) / "config.json").read_text())


def half_to_interleaved_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate-half rows -> Meta/llama.cpp interleaved rows.

    Written the way llama.cpp's convert_hf_to_gguf writes it (an independent spelling of
    the inverse of the loader's interleaved_to_half_rotary).
    """
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@lru_cache(maxsize=1)
def sentencepiece_model() -> bytes:
    """A Llama-2-style SentencePiece BPE (byte fallback, <unk>/<s>/</s> = 0/1/2), serialized."""
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS),
        model_writer=buf,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        # Llama 2's settings: text is kept as is, whitespace included
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        minloglevel=2,
    )
    return buf.getvalue()


def sentencepiece_gguf_metadata() -> dict[str, Any]:
    """The tokenizer.* metadata llama.cpp writes for a SentencePiece ('llama') vocabulary."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=sentencepiece_model())
    ids = range(sp.get_piece_size())
    # llama.cpp token types: 1 normal, 2 unknown, 3 control, 6 byte
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in ids]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in ids],
        "tokenizer.ggml.scores": [sp.get_score(i) for i in ids],
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.unknown_token_id": sp.unk_id(),
        "tokenizer.ggml.bos_token_id": sp.bos_id(),
        "tokenizer.ggml.eos_token_id": sp.eos_id(),
    }


# --- GGUF ------------------------------------------------------------------------------

_GGUF_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_GGUF_BLOCK = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf_name: str) -> str:
    if hf_name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)  # model.layers.N.<rest>
    return f"blk.{layer}.{_GGUF_BLOCK[rest]}"


def write_gguf_from_hf(
    hf_dir: str | Path, out_path: str | Path, qtype: str = "F32", architecture: str | None = None,
    penalty: tuple[float, int] | None = None, name: str = "tiny test model",
) -> Path:
    """The HF model as llama.cpp's convert_hf_to_gguf would write it (q/k permuted for 'llama').

    `qtype` (F32, F16, Q8_0, Q4_0, ...) applies to 2-D weights; norms and biases stay F32
    as in llama.cpp. `architecture` overrides general.architecture (to write a bad file).
    `penalty` writes llama.cpp's repeat penalty and its window (general.sampling.penalty_*). `name` is
    general.name (llama.cpp writes the model's, e.g. "Mistral 7B v0.1").
    """
    import gguf

    hf_dir, out_path = Path(hf_dir), Path(out_path)
    cfg = read_config(hf_dir)
    arch = {"mistral": "llama"}.get(cfg["model_type"], cfg["model_type"])
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    rope = cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))

    w = gguf.GGUFWriter(out_path, architecture or arch)
    w.add_name(name)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(cfg["vocab_size"])
    qtype_enum = gguf.GGMLQuantizationType[qtype]
    w.add_file_type(_FILE_TYPE[qtype])
    w.add_sampling_temp(0.7)  # newer llama.cpp copies generation_config.json's sampling here
    w.add_sampling_top_p(0.9)
    if penalty is not None:
        w.add_sampling_penalty_repeat(penalty[0])
        w.add_sampling_penalty_last_n(penalty[1])
    _add_tokenizer(w, hf_dir)

    state = hf_state_dict(hf_dir)
    if cfg.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    for hf_name, t in state.items():
        if arch == "llama" and hf_name.endswith("q_proj.weight"):
            t = half_to_interleaved_rotary(t, heads)
        elif arch == "llama" and hf_name.endswith("k_proj.weight"):
            t = half_to_interleaved_rotary(t, kv_heads)
        _add_tensor(w, gguf_name(hf_name), t.float().numpy(), qtype_enum if t.dim() == 2 else None)
    if rope.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", _llama3_rope_factors(rope, head_dim, theta))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_path


_FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "BF16": 32, "I8": 1024}


def _add_tensor(w: Any, name: str, data: np.ndarray, qtype: Any) -> None:
    import gguf

    if qtype is None or qtype == gguf.GGMLQuantizationType.F32:
        w.add_tensor(name, data.astype(np.float32))
    elif qtype == gguf.GGMLQuantizationType.F16:
        w.add_tensor(name, data.astype(np.float16))
    elif qtype == gguf.GGMLQuantizationType.I8:  # a type no loader should accept for weights
        w.add_tensor(name, np.round(data * 100).astype(np.int8))
    else:
        w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


def _add_tokenizer(w: Any, hf_dir: Path) -> None:
    """The vocabulary the way llama.cpp stores a byte-level BPE ('gpt2') tokenizer."""
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    specials = {t["content"]: t["id"] for t in tok["added_tokens"]}
    tokens = [""] * (max(vocab.values()) + 1)
    for text, i in {**vocab, **specials}.items():
        tokens[i] = text
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])  # 3 = CONTROL
    w.add_token_merges(merges)
    # Like many base-model GGUFs, eos is <|endoftext|>; the chat template ends turns
    # with <|im_end|>, which the loader must add to the stop tokens.
    w.add_eos_token_id(specials["<|endoftext|>"])
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML_TEMPLATE)


def _llama3_rope_factors(rope: dict[str, Any], head_dim: int, theta: float) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf LlamaModel.generate_extra_tensors, transcribed."""
    import math

    base_freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_context_len = 8192  # llama.cpp reads it from the top-level config, which lacks it
    low_wavelen, high_wavelen = old_context_len / low, old_context_len / high
    factors = []
    for freq in base_freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


# --- Meta ------------------------------------------------------------------------------

_META_LAYER = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
# Llama 2's model parallelism: the dimension each tensor is split on across shards.
_META_SPLIT = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "wo": 1, "w2": 1}


def write_meta_from_hf(
    hf_dir: str | Path, out_dir: str | Path, shards: int = 1, dtype: torch.dtype = torch.float32
) -> Path:
    """The HF model as Meta's llama reference code stores it: params.json + consolidated.NN.pth.

    Real Meta checkpoints are bf16; fp32 (the default) keeps the weights exact for tests.
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = read_config(hf_dir)
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hf = hf_state_dict(hf_dir)
    meta = {
        "tok_embeddings.weight": hf["model.embed_tokens.weight"],
        "norm.weight": hf["model.norm.weight"],
        "output.weight": hf.get("lm_head.weight", hf["model.embed_tokens.weight"]),
    }
    for name, t in hf.items():
        if not name.startswith("model.layers."):
            continue
        _, _, layer, rest = name.split(".", 3)
        if rest == "self_attn.q_proj.weight":
            t = half_to_interleaved_rotary(t, heads)
        elif rest == "self_attn.k_proj.weight":
            t = half_to_interleaved_rotary(t, kv_heads)
        meta[f"layers.{layer}.{_META_LAYER[rest]}"] = t

    for i in range(shards):
        shard = {name: _meta_slice(name, t, i, shards).to(dtype).clone() for name, t in meta.items()}
        torch.save(shard, out_dir / f"consolidated.{i:02d}.pth")
    params = {
        "dim": cfg["hidden_size"],
        "n_layers": cfg["num_hidden_layers"],
        "n_heads": heads,
        "n_kv_heads": kv_heads,
        "vocab_size": -1,
        "multiple_of": 32,
        "norm_eps": cfg["rms_norm_eps"],
        "rope_theta": (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0),
    }
    (out_dir / "params.json").write_text(json.dumps(params), encoding="utf-8")
    shutil.copy(hf_dir / "tokenizer.json", out_dir / "tokenizer.json")
    return out_dir


def _meta_slice(name: str, t: torch.Tensor, i: int, n: int) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return t  # replicated
    if name == "tok_embeddings.weight":
        return t.chunk(n, dim=1)[i]  # Llama 2 splits the embedding on the hidden size
    if name == "output.weight":
        return t.chunk(n, dim=0)[i]
    return t.chunk(n, dim=_META_SPLIT[name.split(".")[-2]])[i]


def bf16_round(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What survives a trip through Meta's bf16 .pth files."""
    return {k: v.to(torch.bfloat16).float() for k, v in state.items()}


# --- reference models ------------------------------------------------------------------


def model_from_checkpoint(ckpt: Any) -> torch.nn.Module:
    """A transformers model built only from what the loader produced (spec + tensors)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = ckpt.spec.to_hf_config()
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    model = AutoModelForCausalLM.from_config(config).eval()
    missing, unexpected = model.load_state_dict(ckpt.tensors, strict=False)
    allowed_missing = {"lm_head.weight"} if ckpt.spec.tie_word_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise AssertionError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    if ckpt.spec.tie_word_embeddings:
        model.tie_weights()
    return model


def reference_model(hf_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


def logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def tiny_fp32_bundle(tmp_path_factory: Any, max_context: int, name: str = "bundle") -> Path:
    """A bundle of a fresh tiny model, fp32, unverified: the fixture the runtime-side tests share."""
    from nomoat.converter.convert import ConvertOptions, convert

    hf = make_tiny_hf_dir(tmp_path_factory.mktemp("tiny") / "hf")
    return convert(ConvertOptions(model=str(hf), out=tmp_path_factory.mktemp("b") / name, quant="fp32",
                                  max_context=max_context, progress=False, skip_verify=True))


def padded_copy(bundle: Path, out: Path, file_name: str, size: int) -> Path:
    """A copy of bundle at out with one more listed file of size random bytes: still a valid bundle,
    with other contents (deploy tests: a redeploy, a copy that fails midway on that file)."""
    import hashlib
    import os

    out = Path(shutil.copytree(bundle, out))
    extra = out / file_name
    extra.write_bytes(os.urandom(size))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"][file_name] = hashlib.sha256(extra.read_bytes()).hexdigest()
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


# -- A SentencePiece-style tokenizer (LLaMA-2 / Mistral: Metaspace BPE with byte fallback) --------------

# Text the tests' small tokenizers are trained on (tests/test_detokenizer.py trains a byte-level one on it too).
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello world, hello there!",
    "Streaming text one token at a time must never show half a character.",
    "你好世界。今天天气很好，我们去公园散步吧。中文分词很有意思。",
    "Emoji time: 👋🏽 hello 🎉 party 🚀 launch 😀 smile ❤️ love",
    "Mixed: naïve café, résumé — “quotes” and 東京 and Ünïcödé.\nNew line\n\n  indented",
]
SP_SPECIALS = ["<unk>", "<s>", "</s>"]


def llama2_decoder() -> Any:
    """The decoder chain LLaMA-2's tokenizer.json uses: the leading space is stripped from the whole text."""
    from tokenizers import decoders

    return decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )


@lru_cache(maxsize=1)
def sentencepiece_parts() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a Metaspace BPE, then prepend the specials and the 256 <0xNN> byte tokens to its vocab
    (the trainer would make them special, and decode would then skip them)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    base = Tokenizer(models.BPE())
    base.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=200, limit_alphabet=60, show_progress=False)
    base.train_from_iterator(CORPUS * 3, trainer)
    trained = json.loads(base.to_str())["model"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    vocab = {token: i for i, token in enumerate(SP_SPECIALS + byte_tokens)}
    for token in sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    return vocab, merges


def sentencepiece_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], decoder: Any) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers

    model = models.BPE(vocab=dict(vocab), merges=list(merges), byte_fallback=True, unk_token="<unk>")
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoder
    tokenizer.add_special_tokens(SP_SPECIALS)
    return tokenizer


def llama2_style_fp32_bundle(tmp_path_factory: Any, max_context: int = 128) -> Path:
    """A tiny fp32 bundle whose tokenizer decodes as LLaMA-2's does (a first word loses its space)."""
    from nomoat.converter.convert import ConvertOptions, convert

    vocab, merges = sentencepiece_parts()
    tokenizer = sentencepiece_tokenizer(vocab, merges, llama2_decoder())
    hf = make_tiny_hf_dir(tmp_path_factory.mktemp("llama2-style") / "hf", vocab_size=tokenizer.get_vocab_size(),
                          eos_token_id=vocab["</s>"])
    (hf / "tokenizer.json").write_text(tokenizer.to_str(), encoding="utf-8")
    config = json.loads((hf / "tokenizer_config.json").read_text())
    config.update({"eos_token": "</s>", "pad_token": "<unk>", "bos_token": "<s>", "add_bos_token": True})
    (hf / "tokenizer_config.json").write_text(json.dumps(config))
    generation = json.loads((hf / "generation_config.json").read_text())
    generation.update({"eos_token_id": vocab["</s>"], "bos_token_id": vocab["<s>"]})
    (hf / "generation_config.json").write_text(json.dumps(generation))
    return convert(ConvertOptions(model=str(hf), out=tmp_path_factory.mktemp("b") / "llama2-style", quant="fp32",
                                  max_context=max_context, progress=False, skip_verify=True))
