"""How a byte-level BPE GGUF splits text before its merges: chosen here by `tokenizer.ggml.pre`.

A GGUF stores the vocabulary and merges but not the split; llama.cpp picks it by the pre-tokenizer
name its converter wrote. transformers' GGUF rebuild does so only from 5.x on, and falls back to
GPT-2's split for a name it does not know; either way a Llama 3 or Qwen2 vocabulary would cut
text into pieces its merges were never learnt on, and the verify stage could not tell, since the
reference and the bundle share the rebuilt tokenizer. So nomoat owns the table, and refuses a
name it does not know instead of guessing.
"""

from __future__ import annotations

from typing import Any

from .errors import ConversionError

# The split regexes of the original tokenizers (their tokenizer.json), as llama.cpp's llama-vocab.cpp
# also has them for these names.
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")

_SPLITS = {
    "llama-bpe": _LLAMA3, "llama3": _LLAMA3, "llama-v3": _LLAMA3, "smaug-bpe": _LLAMA3, "falcon3": _LLAMA3,
    "qwen2": _QWEN2, "deepseek-r1-qwen": _QWEN2,
    "tekken": _TEKKEN,  # Mistral Nemo
}
# GPT-2's own split (ByteLevel's built-in regex); SmolLM's tokenizer splits digits one by one first.
_GPT2 = {"default", "gpt-2", "gpt2"}
_GPT2_WITH_DIGITS = {"smollm"}
# Qwen2's tokenizer.json normalizes to NFC before splitting (llama.cpp does not; the original does).
_NFC = {"qwen2", "deepseek-r1-qwen"}
# What llama.cpp's vocabulary loader (llama-vocab.cpp) sets for these names besides their split:
# ignore_merges, as Llama 3's and Tekken's own tokenizer.json have it (a word the vocabulary holds
# whole is one token, where the merges alone would cut " Việt" into seven), and a BOS token when
# the GGUF does not say (no tokenizer.ggml.add_bos_token, as in older Llama 3 GGUFs).
_LLAMA3_LIKE = {"llama3", "llama-v3", "llama-bpe", "falcon3", "tekken"}


def adds_bos_by_default(pre: str | None) -> bool:
    """Does llama.cpp add a BOS token for this byte-level vocabulary when its GGUF has no flag?"""
    return pre in _LLAMA3_LIKE


def known_pre_tokenizers() -> list[str]:
    return sorted({*_SPLITS, *_GPT2, *_GPT2_WITH_DIGITS})


def set_pre_tokenizer(tokenizer: Any, pre: str | None) -> None:
    """Give a rebuilt byte-level BPE `tokenizers.Tokenizer` the split of GGUF pre-tokenizer `pre`."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre is None or pre in _GPT2:
        # A GGUF without the key predates llama.cpp's pre-tokenizer names: GPT-2's split, as llama.cpp assumes.
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif pre in _GPT2_WITH_DIGITS:
        # llama.cpp's first regex for it, \p{N} isolated: what Digits(individual_digits=True) does, in a
        # form the Android app's tokenizer (Split + ByteLevel only) also runs.
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    elif pre in _SPLITS:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"), byte_level])
        if pre in _NFC:
            tokenizer.normalizer = normalizers.NFC()
        if pre in _LLAMA3_LIKE:
            tokenizer.model.ignore_merges = True
    else:
        raise ConversionError(
            f"the GGUF's tokenizer splits text as {pre!r} (tokenizer.ggml.pre), which nomoat does not know "
            f"(it knows {', '.join(known_pre_tokenizers())}); a guessed split would feed the model token "
            "sequences it never saw. Convert from the model's Hugging Face folder, whose tokenizer.json says "
            "how it splits."
        )
