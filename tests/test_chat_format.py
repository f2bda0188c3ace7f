"""The chat template as text pieces (manifest `chat_format`, for the Android app, which has no Jinja)."""

from __future__ import annotations

import json
from datetime import datetime

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
# Llama-3.2's shape: every message trimmed, today's date in the system turn.
LLAMA32_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] | trim %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\n\nToday Date: ' + strftime_now('%d %b %Y') + '\n\n' + system"
    " + '<|eot_id|>' }}" + LLAMA3_TEMPLATE.replace("{{ bos_token }}", "")
)
# DeepSeek-R1-Distill's shape: an earlier answer without its reasoning, the system prompt first.
DEEPSEEK_R1_TEMPLATE = (
    "{% set ns = namespace(system='') %}{% for m in messages %}{% if m['role'] == 'system' %}"
    "{% set ns.system = m['content'] %}{% endif %}{% endfor %}{{ bos_token }}{{ ns.system }}"
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{% set content = m['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)
# Qwen3's shape: the same, and the newlines after the reasoning dropped too.
QWEN3_STYLE_TEMPLATE = (
    "{% for m in messages %}{% set content = m['content'] %}"
    "{% if m['role'] == 'assistant' and '</think>' in content %}"
    "{% set content = content.split('</think>')[-1].lstrip('\n') %}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + content + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# A date the app could not format as Python does, and one changed after formatting.
DATE_CODE_TEMPLATE = LLAMA32_TEMPLATE.replace("%d %b %Y", "%d %b %Y %Z")
DATE_FILTERED_TEMPLATE = LLAMA32_TEMPLATE.replace("strftime_now('%d %b %Y')", "(strftime_now('%d %b %Y') | upper)")
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
    [{"role": "user", "content": " Hi "}, {"role": "assistant", "content": "<think>\nHm.\n</think>\n\n Hello! "},
     {"role": "user", "content": "\u3000Bye\x1c"}, {"role": "assistant", "content": "\nNo reasoning</think"},
     {"role": "user", "content": "\n"}],
]
DAY = datetime(2025, 12, 31, 23, 59)


@pytest.mark.parametrize(("source", "content"), [
    (SMOLLM2_TEMPLATE, None), (FALLBACK_CHATML_TEMPLATE, None), (LLAMA3_UNTRIMMED, None),
    (LLAMA3_TEMPLATE, {"system": ["strip"], "user": ["strip"], "assistant": ["strip"]}),
    (LLAMA32_TEMPLATE, {"system": ["strip"], "user": ["strip"], "assistant": ["strip"]}),
    (DEEPSEEK_R1_TEMPLATE, {"assistant": ["after_think"]}),
    (QWEN3_STYLE_TEMPLATE, {"assistant": ["after_think_lstrip"]}),
], ids=["smollm2", "chatml", "llama3-untrimmed", "llama3-trims", "llama32-date", "deepseek-r1", "qwen3"])
def test_pieces_render_like_the_template(source, content):
    template = ChatTemplate(source, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    fmt = derive_chat_format(template)
    assert fmt is not None
    assert fmt.get("content") == content
    for conversation in CONVERSATIONS:
        assert render_pieces(fmt, conversation, now=DAY) == template.render(
            conversation, add_generation_prompt=True, strftime_now=DAY.strftime)


def test_a_templates_date_is_the_day_it_renders_on_not_the_day_it_was_converted():
    fmt = derive_chat_format(ChatTemplate(LLAMA32_TEMPLATE, bos_token="<s>"))
    assert fmt["dates"] == ["%d %b %Y"]
    hi = [{"role": "user", "content": "Hi"}]
    assert "Today Date: 31 Dec 2025\n" in render_pieces(fmt, hi, now=DAY)
    assert f"Today Date: {datetime.now():%d %b %Y}\n" in render_pieces(fmt, hi)


def test_smollm2_pieces_carry_its_default_system_prompt():
    fmt = derive_chat_format(ChatTemplate(SMOLLM2_TEMPLATE))
    assert fmt["first_turn"] == [
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\n", "user", "<|im_end|>\n<|im_start|>assistant\n"]
    assert fmt["first_turn_with_system"][1::2] == ["system", "user"]
    assert fmt["next_turn"] == ["", "assistant", "<|im_end|>\n<|im_start|>user\n", "user",
                                "<|im_end|>\n<|im_start|>assistant\n"]


@pytest.mark.parametrize("source", [NO_SYSTEM_TEMPLATE, NUMBERED_TEMPLATE, DATE_CODE_TEMPLATE, DATE_FILTERED_TEMPLATE],
                         ids=["no-system-role", "numbered-turns", "date-code", "date-filtered"])
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
