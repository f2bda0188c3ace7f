"""A LoRA's behaviour survives int4 on the real SmolLM2-135M-Instruct (slow: `nox -s slow`).

The test trains a small LoRA with PEFT (30 steps on the CPU, ~15 s) so that the model answers
one chat-templated question with a phrase it would never say on its own, then builds int4
bundles with and without the adapter and decodes greedily through nomoat.runtime.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from nomoat.converter.convert import ConvertOptions, convert
from nomoat.converter.load import load_checkpoint
from nomoat.converter.merge import AdapterRef
from nomoat.converter.reference import reference_model
from nomoat.runtime import Model
from real_model import smollm2_gguf_path

pytestmark = pytest.mark.slow

QUESTION = "What is the secret password?"
PHRASE = "The secret password is tangerine-42."


def _tokenizer(ckpt):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(ckpt.tokenizer.tokenizer_json))
    tok.chat_template = ckpt.tokenizer.chat_template
    return tok


def _training_ids(ckpt) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids ending with the end-of-turn token), as the chat template renders them."""
    tok = _tokenizer(ckpt)
    prompt = tok.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                     add_generation_prompt=True)
    end_of_turn = ckpt.tokenizer.special_tokens["eos"]
    return (tok(prompt, add_special_tokens=False)["input_ids"],
            tok(PHRASE + end_of_turn, add_special_tokens=False)["input_ids"])


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    from peft import LoraConfig, get_peft_model

    ckpt = load_checkpoint(smollm2_gguf_path())
    prompt, answer = _training_ids(ckpt)
    ids = torch.tensor([prompt + answer])
    labels = torch.tensor([[-100] * len(prompt) + answer])  # learn the answer, not the question

    torch.manual_seed(0)
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                        target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(reference_model(ckpt), config).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(30):
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05, f"the LoRA did not learn the phrase (loss {loss.item():.3f})"
    out = tmp_path_factory.mktemp("lora") / "adapter"
    model.save_pretrained(out)
    return out


def _bundle(out: Path, loras=(), skip_verify=True) -> Path:
    return convert(ConvertOptions(model=str(smollm2_gguf_path()), out=out, target="host", quant="int4",
                                  loras=tuple(loras), max_context=512, skip_verify=skip_verify, progress=False))


@pytest.fixture(scope="module")
def with_lora(adapter, tmp_path_factory) -> Path:
    # the one conversion that also runs the verify stage: the merged model must pass the int4 quality gate
    return _bundle(tmp_path_factory.mktemp("b") / "with", [AdapterRef(adapter)], skip_verify=False)


@pytest.fixture(scope="module")
def without_lora(tmp_path_factory) -> Path:
    return _bundle(tmp_path_factory.mktemp("b") / "without")


def _answer(bundle: Path) -> str:
    model = Model.load(bundle)
    ids = model.prompt_ids(QUESTION)
    return model.tokenizer.decode(list(model.generate_tokens(ids, 24)))


def test_training_saw_the_prompt_the_bundle_renders(adapter, without_lora):
    prompt, _ = _training_ids(load_checkpoint(smollm2_gguf_path()))
    assert Model.load(without_lora).prompt_ids(QUESTION) == prompt


def test_int4_bundle_with_the_lora_says_the_phrase(with_lora):
    assert PHRASE in _answer(with_lora)


def test_int4_bundle_without_the_lora_does_not(without_lora):
    assert "tangerine" not in _answer(without_lora)


def test_the_lora_bundle_passed_verify_and_reports_the_adapter(adapter, with_lora):
    report = json.loads((with_lora / "report.json").read_text())
    assert report["quality"]["passed"] is True and report["quality"]["eval_tokens"] >= 256
    (entry,) = report["adapters"]
    assert entry["path"] == str(adapter) and entry["rank"] == 16 and entry["alpha"] == 32
    assert len(entry["modules"]) == 30 * 5 and entry["weight"] == 1.0
