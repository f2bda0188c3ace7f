"""The chat template as text pieces (manifest `chat_format`, for the Android app, which has no Jinja)."""

from __future__ import annotations

import json

import pytest
from nomoat.converter.chat_format import derive_chat_format, render_pieces
from nomoat.converter.convert import ConvertOptions, convert
from nomoat.runtime import Model
from nomoat.runtime.chat_template import FALLBACK_CHATML_TEMPLATE, ChatTemplate
from test_chat_template import SMOLLM2_TEMPLATE
from tiny_models import make_tiny_hf_dir

# Llama-3.x's shape: BOS from the template, headers per role, content trimmed.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Llama-3 without the trim: fixed text around each message.
LLAMA3_UNTRIMMED = LLAMA3_TEMPLATE.replace(" | trim", "")
# Mistral-style: no system role at all.
NO_SYSTEM_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + '</s>' }}{% endif %}{% endfor %}"
)
# The turn number inside the text: not fixed pieces.
NUMBERED_TEMPLATE = (
    "{% for message in messages %}{{ loop.index ~ '. ' + message['role'] + ': ' + message['content'] + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! 👋"},
     {"role": "user", "content": "你好  \n"}, {"role": "assistant", "content": "  {user} "},
     {"role": "user", "content": "{% raw %} {{x}}"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "c"}],
]


@pytest.mark.parametrize("source", [SMOLLM2_TEMPLATE, FALLBACK_CHATML_TEMPLATE, LLAMA3_UNTRIMMED],
                         ids=["smollm2", "chatml", "llama3-untrimmed"])
def test_pieces_render_like_the_template(source):
    template = ChatTemplate(source, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    fmt = derive_chat_format(template)
    assert fmt is not None
    for conversation in CONVERSATIONS:
        assert render_pieces(fmt, conversation) == template.render(conversation, add_generation_prompt=True)


def test_smollm2_pieces_carry_its_default_system_prompt():
    fmt = derive_chat_format(ChatTemplate(SMOLLM2_TEMPLATE))
    assert fmt["first_turn"] == [
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\n", "user", "<|im_end|>\n<|im_start|>assistant\n"]
    assert fmt["first_turn_with_system"][1::2] == ["system", "user"]
    assert fmt["next_turn"] == ["", "assistant", "<|im_end|>\n<|im_start|>user\n", "user",
                                "<|im_end|>\n<|im_start|>assistant\n"]


@pytest.mark.parametrize("source", [LLAMA3_TEMPLATE, NO_SYSTEM_TEMPLATE, NUMBERED_TEMPLATE],
                         ids=["trims-content", "no-system-role", "numbered-turns"])
def test_templates_that_are_not_fixed_pieces_get_none(source):
    # The app then says it cannot chat with this bundle, instead of prompting the model wrong.
    assert derive_chat_format(ChatTemplate(source, bos_token="<s>")) is None


def test_the_manifest_carries_the_pieces_of_the_bundles_template(tmp_path):
    hf = make_tiny_hf_dir(tmp_path / "hf")
    out = convert(ConvertOptions(model=str(hf), out=tmp_path / "bundle", quant="fp32", max_context=64,
                                 progress=False, skip_verify=True))
    fmt = json.loads((out / "manifest.json").read_text())["chat_format"]
    model = Model.load(out)
    assert model.manifest.chat_format == fmt
    for conversation in CONVERSATIONS:
        assert render_pieces(fmt, conversation) == model.template.render(conversation, add_generation_prompt=True)
