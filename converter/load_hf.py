"""Load a Hugging Face model directory: config.json, *.safetensors and the tokenizer files.

The tokenizer readers here also serve the Meta loader, which ships the same HF
tokenizer files next to its weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import ConversionError
from .spec import Checkpoint, ModelSpec, TokenizerInfo

# Tokens a chat template writes to close a turn. A model finishes its answer with one of
# these rather than with the tokenizer's eos, so generation must stop on them too.
END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
)
# Used only when no file names the token (Meta checkpoints carry no config).
_WELL_KNOWN_EOS = ("</s>", "<|end_of_text|>", "<|eot_id|>", "<|endoftext|>", "<|im_end|>")
_WELL_KNOWN_BOS = ("<s>", "<|begin_of_text|>")

# repeat_last_n is no key of transformers' (its penalty reads the whole sequence): `nomoat merge` keeps
# there a GGUF's llama.cpp window of the penalty (general.sampling.penalty_last_n).
GENERATION_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "repeat_last_n")
PENALTY_KEYS = ("repetition_penalty", "repeat_last_n")  # applied with or without do_sample
# What transformers' GenerationConfig samples with when do_sample is set and a key is not.
_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}


def load_hf_dir(path: Path) -> Checkpoint:
    config = read_json(path / "config.json")
    spec = ModelSpec.from_hf_config(config, source=str(path / "config.json"))
    tensors = model_tensors(read_safetensors(safetensors_files(path)), spec)
    if not spec.tie_word_embeddings and "lm_head.weight" not in tensors:
        raise ConversionError(
            f"{path / 'config.json'} says tie_word_embeddings=false but the weights hold no lm_head.weight. "
            "If this model shares its embedding with the output layer, set tie_word_embeddings to true; "
            "otherwise the lm_head shard is missing: download it."
        )
    checkpoint = Checkpoint(
        spec=spec,
        tensors=tensors,
        tokenizer=read_hf_tokenizer(path, model_config=config),
        source={"format": "safetensors", "path": str(path)},
        generation_defaults=read_generation_defaults(path),
    )
    checkpoint.check_tensors()
    checkpoint.check_vocabulary(str(path / "tokenizer.json"))
    return checkpoint


# --- weights ---------------------------------------------------------------------------


def safetensors_files(path: Path) -> list[Path]:
    """The weight files of the model, in the order the index (if any) lists them."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map") or {}
        if not isinstance(weight_map, dict):
            raise ConversionError(f"{index}'s weight_map is not an object of tensor names to shard files; the index "
                                  "is damaged: download it again.")
        for tensor, name in weight_map.items():
            # a shard is a file in the model folder itself: an index naming "/elsewhere/x" or "../x" had the
            # converter read (and bundle) weights from outside the folder
            if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\\0"):
                raise ConversionError(f"{index}'s weight_map gives {tensor} the shard {json.dumps(name)}, which is "
                                      f"not the name of a file in {path}; the index is damaged or hand-edited: "
                                      "download it again.")
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise ConversionError(
                f"{index} lists shards that are not in the directory: {', '.join(missing)}. "
                "The download is incomplete: fetch the missing files."
            )
        if not files:
            raise ConversionError(f"{index} has an empty weight_map; download the model again.")
        return files
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    # Adapter and Mistral-native ("consolidated") files can sit in the same directory and
    # are not the model's HF weights.
    files = sorted(
        f for f in path.glob("*.safetensors") if not f.name.startswith(("adapter_", "consolidated"))
    )
    if not files:
        raise ConversionError(
            f"{path} has no model weights (model.safetensors or model-*.safetensors); download them."
        )
    return files


def read_safetensors(files: list[Path]) -> dict[str, Any]:
    """All tensors of the files, cast to fp32 (the merge and quantize stages work in fp32)."""
    import torch
    from safetensors import SafetensorError, safe_open

    tensors: dict[str, Any] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                for name in sf.keys():
                    tensor = sf.get_tensor(name)
                    if not tensor.is_floating_point():
                        # int8 / packed weights under the usual names (a quantized export): read as numbers
                        # they would be nonsense, not an error.
                        raise ConversionError(
                            f"{f} stores {name} as {str(tensor.dtype).removeprefix('torch.')}, not as floating-point "
                            "weights: the checkpoint is quantized. Convert the unquantized model (float32, "
                            "float16 or bfloat16 safetensors) or its GGUF.")
                    tensors[name] = tensor.to(torch.float32)
        except (SafetensorError, OSError) as e:
            raise ConversionError(
                f"{f} is not a readable safetensors file ({e}). It is probably truncated or corrupt: "
                "download it again."
            ) from e
    return tensors


def model_tensors(tensors: dict[str, Any], spec: ModelSpec) -> dict[str, Any]:
    """Keep the tensors the spec uses; refuse ones that mean the model is something else."""
    expected = spec.expected_shapes()
    kept, unexpected = {}, []
    for name, t in tensors.items():
        if name in expected:
            kept[name] = t
        elif name.endswith("rotary_emb.inv_freq"):
            continue  # old checkpoints saved a buffer recomputed from rope_theta
        elif name == "lm_head.weight" and spec.tie_word_embeddings:
            continue  # tied: transformers ignores a stored copy, and so do we
        else:
            unexpected.append(name)
    if unexpected:
        shown = ", ".join(sorted(unexpected)[:5])
        raise ConversionError(
            f"the weights hold {len(unexpected)} tensors a plain {spec.architecture} model does not have "
            f"(e.g. {shown}). The checkpoint is pre-quantized (GPTQ/AWQ/...) or another architecture; "
            "use the original fp16/bf16 safetensors."
        )
    return kept


# --- tokenizer -------------------------------------------------------------------------


def read_hf_tokenizer(
    tok_dir: Path, model_config: dict[str, Any] | None = None, default_add_bos: bool = False,
    own_eos: tuple[str, ...] = (),
) -> TokenizerInfo:
    """TokenizerInfo from tokenizer.json (+ tokenizer_config, generation_config, chat template).
    own_eos: tokens of which the first the vocabulary has is an end of sequence whatever the files name
    (the checkpoint's own tokenizer stops there, as Meta's does at its eos_id)."""
    tokenizer_json = _read_tokenizer_json(tok_dir)
    vocab = _TokenLookup(tokenizer_json)
    tok_cfg = read_json_if_exists(tok_dir / "tokenizer_config.json")
    gen_cfg = read_json_if_exists(tok_dir / "generation_config.json")
    model_config = model_config or {}
    chat_template = read_chat_template(tok_dir, tok_cfg)

    bos_id = _first(
        vocab.id_of(_token_text(tok_cfg.get("bos_token")), "bos_token"),
        _first_id(model_config.get("bos_token_id")),
        _first_id(gen_cfg.get("bos_token_id")),
        vocab.post_processor_prefix_id(),
    )
    if bos_id is None and default_add_bos:
        # The caller's format always starts with BOS (Meta) but no file names it.
        bos_id = next((vocab.special[t] for t in _WELL_KNOWN_BOS if t in vocab.special), None)
    eos_ids = _unique(
        _ids(gen_cfg.get("eos_token_id"))
        + _ids(model_config.get("eos_token_id"))
        + [i for i in [vocab.id_of(_token_text(tok_cfg.get("eos_token")), "eos_token")] if i is not None]
        + end_of_turn_ids(vocab.special, chat_template)
        + [vocab.special[t] for t in own_eos if t in vocab.special][:1]
    )
    if not eos_ids:
        eos_ids = [vocab.special[t] for t in _WELL_KNOWN_EOS if t in vocab.special]
    if not eos_ids:
        raise ConversionError(
            f"no end-of-sequence token is named in {tok_dir} (config.json, generation_config.json or "
            'tokenizer_config.json), so generation could never stop. Add "eos_token" to '
            'tokenizer_config.json or "eos_token_id" to generation_config.json.'
        )
    return TokenizerInfo(
        tokenizer_json=tokenizer_json,
        chat_template=chat_template,
        bos_token_id=bos_id,
        eos_token_ids=eos_ids,
        # a BOS the vocabulary does not have cannot be added
        add_bos_token=bos_id is not None and _add_bos_token(tok_cfg, vocab, default_add_bos),
        special_tokens=_special_token_texts(tok_cfg, vocab, bos_id, eos_ids),
    )


def end_of_turn_ids(special: dict[str, int], chat_template: str | None) -> list[int]:
    """Ids of the special tokens the chat template writes to close a turn."""
    if not chat_template:
        return []
    return [special[t] for t in END_OF_TURN_TOKENS if t in special and t in chat_template]


def read_chat_template(tok_dir: Path, tok_cfg: dict[str, Any]) -> str | None:
    """chat_template.jinja wins (transformers >= 4.43 writes it), else tokenizer_config's."""
    jinja = tok_dir / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text(encoding="utf-8")
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template or None


def read_generation_defaults(path: Path) -> dict[str, Any]:
    """Sampling settings the model's authors recommend, from generation_config.json, resolved as
    transformers' generate() resolves them: without do_sample it decodes greedily whatever the
    temperature says (keeping a repetition penalty, a logits processor it applies either way); with
    it, a key left out is GenerationConfig's default (temperature 1.0, top_k 50, top_p 1.0)."""
    from .sampling_defaults import checked_generation_defaults

    gen_cfg = read_json_if_exists(path / "generation_config.json")
    given = {k: gen_cfg[k] for k in GENERATION_KEYS if gen_cfg.get(k) is not None}
    if not gen_cfg.get("do_sample"):
        defaults = {"temperature": 0.0, **{k: v for k, v in given.items() if k in PENALTY_KEYS}}
    else:
        defaults = {**_SAMPLING_DEFAULTS, **given}
    return checked_generation_defaults(defaults, str(path / "generation_config.json"))


def _read_tokenizer_json(tok_dir: Path) -> str:
    f = tok_dir / "tokenizer.json"
    if not f.exists():
        raise ConversionError(
            f"{tok_dir} has no tokenizer.json (the HF tokenizers format the bundle ships). Create it with "
            "`AutoTokenizer.from_pretrained(<model>).save_pretrained(<dir>)`, which converts "
            "tokenizer.model, and put it next to the weights."
        )
    return f.read_text(encoding="utf-8")


def _add_bos_token(tok_cfg: dict[str, Any], vocab: _TokenLookup, default: bool) -> bool:
    if tok_cfg.get("add_bos_token") is not None:
        return bool(tok_cfg["add_bos_token"])
    if vocab.post_processor_prefix_id() is not None:
        return True  # e.g. Llama 3: the tokenizer.json itself prepends <|begin_of_text|>
    if tok_cfg.get("tokenizer_class") in ("LlamaTokenizer", "LlamaTokenizerFast"):
        return True  # the SentencePiece Llama tokenizer's default
    return default


def _special_token_texts(
    tok_cfg: dict[str, Any], vocab: _TokenLookup, bos_id: int | None, eos_ids: list[int]
) -> dict[str, str]:
    def named_or_of_id(key: str, token_id: int | None) -> str | None:
        # A tokenizer_config that says "bos_token": null (Qwen2's, beside a config.json bos_token_id) has none
        # for the chat template: transformers renders {{ bos_token }} as "", not as the id's text.
        if key in tok_cfg and tok_cfg[key] is None:
            return None
        return _token_text(tok_cfg.get(key)) or vocab.text_of(token_id)

    texts = {
        "bos": named_or_of_id("bos_token", bos_id),
        "eos": named_or_of_id("eos_token", eos_ids[0]),
        "pad": _token_text(tok_cfg.get("pad_token")),
        "unk": _token_text(tok_cfg.get("unk_token")),
    }
    return {role: text for role, text in texts.items() if text}


class _TokenLookup:
    """Token text <-> id over a tokenizer.json, special tokens included."""

    def __init__(self, tokenizer_json: str) -> None:
        from tokenizers import Tokenizer

        try:
            self._tokenizer = Tokenizer.from_str(tokenizer_json)
        except Exception as e:  # tokenizers raises a bare Exception for malformed JSON
            raise ConversionError(
                f"tokenizer.json cannot be read by `tokenizers` ({e}); download it again."
            ) from e
        self._json = json.loads(tokenizer_json)
        self.special = {t["content"]: t["id"] for t in self._json.get("added_tokens", []) if t.get("special")}

    def id_of(self, text: str | None, role: str) -> int | None:
        if text is None:
            return None
        token_id = self._tokenizer.token_to_id(text)
        if token_id is None:
            raise ConversionError(
                f"tokenizer_config.json names {role} {text!r}, which is not in tokenizer.json; "
                "the tokenizer files do not belong together: download them again."
            )
        return token_id

    def text_of(self, token_id: int | None) -> str | None:
        return None if token_id is None else self._tokenizer.id_to_token(token_id)

    def post_processor_prefix_id(self) -> int | None:
        """The special token the post-processor puts before every text (a BOS), if any."""
        processors = [self._json.get("post_processor") or {}]
        if processors[0].get("type") == "Sequence":
            processors = processors[0].get("processors", [])
        for proc in processors:
            if proc.get("type") == "TemplateProcessing" and proc.get("single"):
                first = proc["single"][0]
                if "SpecialToken" in first:
                    return self._tokenizer.token_to_id(first["SpecialToken"]["id"])
        return None


# --- small readers ---------------------------------------------------------------------


def read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConversionError(f"{path} is missing; the model directory is incomplete.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:  # json recurses per bracket
        raise ConversionError(f"{path} is not valid JSON ({e}); download or fix it.") from e
    if not isinstance(data, dict):
        raise ConversionError(f"{path} should hold a JSON object; download or fix it.")
    return data


def read_json_if_exists(path: Path) -> dict[str, Any]:
    return read_json(path) if path.exists() else {}


def _token_text(value: Any) -> str | None:
    """tokenizer_config writes special tokens as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _first_id(value: Any) -> int | None:
    ids = _ids(value)
    return ids[0] if ids else None


def _first(*values: int | None) -> int | None:
    return next((v for v in values if v is not None), None)


def _unique(ids: list[int]) -> list[int]:
    return list(dict.fromkeys(ids))
