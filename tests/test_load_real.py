"""The load stage on the real SmolLM2-135M-Instruct GGUF, cross-checked against transformers.

transformers reads GGUF files with its own code (its own dequantization and its own
undoing of llama.cpp's q/k permutation), so agreeing with it checks ours independently.
"""

from __future__ import annotations

import jinja2
import pytest
import torch
from nomoat.converter.load import load_checkpoint
from real_model import smollm2_gguf_path
from tiny_models import model_from_checkpoint
from tokenizers import Tokenizer

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def gguf_path():
    return smollm2_gguf_path()


@pytest.fixture(scope="module")
def checkpoint(gguf_path):
    return load_checkpoint(gguf_path)


@pytest.fixture(scope="module")
def our_model(checkpoint):
    return model_from_checkpoint(checkpoint)


def test_spec_of_smollm2(checkpoint):
    s = checkpoint.spec
    assert (s.architecture, s.num_layers, s.num_heads, s.num_kv_heads) == ("llama", 30, 9, 3)
    assert (s.hidden_size, s.head_dim, s.intermediate_size, s.vocab_size) == (576, 64, 1536, 49152)
    assert s.tie_word_embeddings and "lm_head.weight" not in checkpoint.tensors
    assert (s.rope_theta, s.rms_norm_eps) == (100000.0, 1e-5)
    assert checkpoint.source["file_type"] == "MOSTLY_Q4_1"


def test_tokenizer_matches_transformers_gguf_tokenizer(gguf_path, checkpoint):
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    ours = Tokenizer.from_str(checkpoint.tokenizer.tokenizer_json)
    for text in (QUESTION, "<|im_start|>user\nHi 😀 你好<|im_end|>\n"):
        assert ours.encode(text, add_special_tokens=False).ids == theirs.encode(
            text, add_special_tokens=False
        )
    tok = checkpoint.tokenizer
    assert tok.eos_token_ids == [ours.token_to_id("<|im_end|>")]
    assert tok.add_bos_token is False and "<|im_start|>" in tok.chat_template


def test_logits_match_transformers_reading_of_the_gguf(gguf_path, checkpoint, our_model):
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    ids = torch.tensor([Tokenizer.from_str(checkpoint.tokenizer.tokenizer_json).encode(QUESTION).ids])
    with torch.no_grad():
        expected, got = theirs.eval()(ids).logits, our_model(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_greedy_answer_mentions_paris(checkpoint, our_model):
    tok = checkpoint.tokenizer
    prompt = (
        jinja2.Environment()
        .from_string(tok.chat_template)
        .render(messages=[{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    )
    tokenizer = Tokenizer.from_str(tok.tokenizer_json)
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False).ids])
    with torch.no_grad():
        out = our_model.generate(
            ids,
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=tok.eos_token_ids,
            pad_token_id=tok.eos_token_ids[0],
        )
    answer = tokenizer.decode(out[0, ids.shape[1] :].tolist())
    assert "Paris" in answer, answer


_PEAK_OF_LOADING = """
import re, sys
def kib(key):
    return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))
from tokenizers import Tokenizer
before = kib("VmRSS")
Tokenizer.from_file(sys.argv[1])
print(kib("VmHWM") - before)
"""


def test_the_bundles_tokenizer_loads_with_a_lower_peak_and_encodes_the_same(checkpoint, tmp_path):
    """The string-merges form (converter/tokenizer_json.py) is what a device loads: same ids on the
    eval text, and a lower memory peak while loading (measured 20 vs 39 MB)."""
    import subprocess
    import sys

    from nomoat.converter.tokenizer_json import bundle_tokenizer_json
    from nomoat.converter.verify import default_eval_text

    original = checkpoint.tokenizer.tokenizer_json
    paths = {"pairs": tmp_path / "pairs.json", "strings": tmp_path / "strings.json"}
    paths["pairs"].write_text(original, encoding="utf-8")
    paths["strings"].write_text(bundle_tokenizer_json(original), encoding="utf-8")
    text = default_eval_text()
    ids = {form: Tokenizer.from_file(str(p)).encode(text, add_special_tokens=False).ids for form, p in paths.items()}
    assert ids["strings"] == ids["pairs"] and len(ids["pairs"]) > 1000
    peak_kib = {form: int(subprocess.run([sys.executable, "-c", _PEAK_OF_LOADING, str(p)], check=True,
                                         capture_output=True, text=True).stdout)
                for form, p in paths.items()}
    assert peak_kib["strings"] < 0.75 * peak_kib["pairs"], peak_kib
