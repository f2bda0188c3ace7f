"""The bundle's tokenizer.json: merges as "left right" strings when exact, and the same tokenizer."""

from __future__ import annotations

import json

import pytest
from nomoat.converter.tokenizer_json import bundle_tokenizer_json
from tiny_models import _CORPUS, tokenizer_json
from tokenizers import Tokenizer

TEXTS = [*_CORPUS, "Hi 😀 你好, don't   stop!\n\t<|im_start|>user\nx<|im_end|>", " leading space", ""]


def test_pair_merges_become_strings_and_the_tokenizer_is_unchanged():
    original = tokenizer_json()
    assert isinstance(json.loads(original)["model"]["merges"][0], list)  # tokenizers writes pairs
    compact = bundle_tokenizer_json(original)
    merges = json.loads(compact)["model"]["merges"]
    assert merges and all(isinstance(m, str) and m.count(" ") == 1 for m in merges)
    ours, theirs = Tokenizer.from_str(compact), Tokenizer.from_str(original)
    assert ours.get_vocab() == theirs.get_vocab()
    for text in TEXTS:
        ids = theirs.encode(text, add_special_tokens=False).ids
        assert ours.encode(text, add_special_tokens=False).ids == ids
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids, skip_special_tokens=False)


def test_a_merge_with_a_space_keeps_the_pair_form():
    data = json.loads(tokenizer_json())
    data["model"]["vocab"]["a b"] = len(data["model"]["vocab"])
    data["model"]["merges"].append(["a b", "c"])  # "a b c" would split in three
    text = json.dumps(data)
    assert bundle_tokenizer_json(text) == text


@pytest.mark.parametrize("model", [
    {"type": "WordLevel", "vocab": {"a": 0}, "unk_token": "a"},
    {"type": "BPE", "vocab": {"a": 0}, "merges": []},
    {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]},  # already strings
])
def test_other_tokenizers_are_left_as_they_are(model):
    text = json.dumps({"version": "1.0", "model": model})
    assert bundle_tokenizer_json(text) == text
