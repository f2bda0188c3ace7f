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
# DeepSeek-R1-Distill's, verbatim (tokenizer_config.json): an earlier answer without its reasoning,
# the system prompt first, and a generation prompt ("<｜Assistant｜><think>\n") that an answered turn
# does not repeat (it renders as "<｜Assistant｜>" and the answer).
DEEPSEEK_R1_TEMPLATE = (
    '{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}'
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}{{bos_token}}{{ns.system_prompt}}"
    "{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}"
    "{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is none %}{%- set ns.is_tool = false -%}"
    "{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}"
    "{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + "
    "tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + "
    "'<｜tool▁call▁end｜>'}}{%- set ns.is_first = true -%}{%- else %}{{'\\n' + '<｜tool▁call▁begin｜>' + "
    "tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + "
    "tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor %}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}{%- if ns.is_tool %}"
    "{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}"
    "{%- else %}{% set content = message['content'] %}{% if '</think>' in content %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}{{'<｜Assistant｜>' + content + "
    "'<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}{%- if message['role'] == 'tool' %}"
    "{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + "
    "message['content'] + '<｜tool▁output▁end｜>'}}{%- set ns.is_output_first = false %}{%- else %}"
    "{{'\\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}"
    "{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}"
)
# Qwen3's shape: the same, and the newlines after the reasoning dropped too.
QWEN3_STYLE_TEMPLATE = (
    "{% for m in messages %}{% set content = m['content'] %}"
    "{% if m['role'] == 'assistant' and '</think>' in content %}"
    "{% set content = content.split('</think>')[-1].lstrip('\n') %}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + content + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama-2-chat's, verbatim: the user's and the answer's content trimmed, the system message trimmed
# together with the first user message (not fixed text around it: no system turn).
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    '{% set system_message = false %}{% endif %}{% for message in loop_messages %}'
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    '{% endfor %}'
)
# Mistral-7B-Instruct-v0.1's: no system role at all.
MISTRAL_V01_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
# Mistral-7B-Instruct-v0.3's, without its tool calls: answers trimmed, the system message put in the
# last user turn (not fixed text: no system turn).
MISTRAL_V03_TEMPLATE = (
    '{%- if messages[0]["role"] == "system" %}\n'
    '    {%- set system_message = messages[0]["content"] %}\n'
    '    {%- set loop_messages = messages[1:] %}\n'
    '{%- else %}\n'
    '    {%- set loop_messages = messages %}\n'
    '{%- endif %}\n'
    '{%- if not tools is defined %}\n'
    '    {%- set tools = none %}\n'
    '{%- endif %}\n'
    '{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}\n'
    '{%- set ns = namespace() %}\n'
    '{%- set ns.index = 0 %}\n'
    '{%- for message in loop_messages %}\n'
    '    {%- if not (message.role == "tool" or message.role == "tool_results" or '
    '(message.tool_calls is defined and message.tool_calls is not none)) %}\n'
    '        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}\n'
    '            {{- raise_exception("After the optional system message, conversation roles must '
    'alternate user/assistant/user/assistant/...") }}\n'
    '        {%- endif %}\n'
    '        {%- set ns.index = ns.index + 1 %}\n'
    '    {%- endif %}\n'
    '{%- endfor %}\n'
    '{{- bos_token }}\n'
    '{%- for message in loop_messages %}\n'
    '    {%- if message["role"] == "user" %}\n'
    '        {%- if loop.last and system_message is defined %}\n'
    '            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}\n'
    '        {%- else %}\n'
    '            {{- "[INST] " + message["content"] + "[/INST]" }}\n'
    '        {%- endif %}\n'
    '    {%- elif message["role"] == "assistant" %}\n'
    '        {{- " " + message["content"]|trim + eos_token}}\n'
    '    {%- else %}\n'
    '        {{- raise_exception("Only user and assistant roles are supported, with the exception '
    'of an initial optional system message!") }}\n'
    '    {%- endif %}\n'
    '{%- endfor %}\n'
)
# Phi-3.5-mini-instruct's: an empty system message left out, so not fixed text around its content.
PHI35_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}{{'<|system|>\n' + "
    "message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + "
    "'<|end|>\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}"
    '{{ eos_token }}{% endif %}'
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


@pytest.mark.parametrize(("source", "content", "system"), [
    (SMOLLM2_TEMPLATE, None, True), (FALLBACK_CHATML_TEMPLATE, None, True), (LLAMA3_UNTRIMMED, None, True),
    (LLAMA3_TEMPLATE, {"system": ["strip"], "user": ["strip"], "assistant": ["strip"]}, True),
    (LLAMA32_TEMPLATE, {"system": ["strip"], "user": ["strip"], "assistant": ["strip"]}, True),
    (DEEPSEEK_R1_TEMPLATE, {"assistant": ["after_think"]}, True),
    (QWEN3_STYLE_TEMPLATE, {"assistant": ["after_think_lstrip"]}, True),
    (LLAMA2_TEMPLATE, {"user": ["strip"], "assistant": ["strip"]}, False),
    (MISTRAL_V01_TEMPLATE, None, False), (NO_SYSTEM_TEMPLATE, None, False),
    (MISTRAL_V03_TEMPLATE, {"assistant": ["strip"]}, False),
    (PHI35_TEMPLATE, None, False),
], ids=["smollm2", "chatml", "llama3-untrimmed", "llama3-trims", "llama32-date", "deepseek-r1", "qwen3", "llama2",
        "mistral-v0.1", "no-system-role", "mistral-v0.3", "phi3.5-empty-system"])
def test_pieces_render_like_the_template(source, content, system):
    template = ChatTemplate(source, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    fmt = derive_chat_format(template)
    assert fmt is not None
    assert fmt.get("content") == content
    assert (fmt["first_turn_with_system"] is not None) is system
    for conversation in CONVERSATIONS + [[{"role": "system", "content": ""}, *CONVERSATIONS[0]]]:
        if conversation[0]["role"] == "system" and not system:
            # No system turn: refused, rather than rendered otherwise than the template would.
            with pytest.raises(ValueError, match="no system turn.*leave out the system message"):
                render_pieces(fmt, conversation, now=DAY)
            continue
        assert render_pieces(fmt, conversation, now=DAY) == template.render(
            conversation, add_generation_prompt=True, strftime_now=DAY.strftime)


def test_deepseek_r1s_generation_prompt_ends_the_prompt_only():
    # An answered turn renders as "<｜Assistant｜>" and the answer: the "<think>\n" that opened it
    # is not in the next prompt, so it is a piece of its own, put after the last turn.
    fmt = derive_chat_format(ChatTemplate(DEEPSEEK_R1_TEMPLATE, bos_token="<s>"))
    assert fmt["generation_prompt"] == "<think>\n"
    assert fmt["first_turn"] == ["<s><｜User｜>", "user", "<｜Assistant｜>"]
    assert fmt["next_turn"] == ["", "assistant", "<｜end▁of▁sentence｜><｜User｜>", "user", "<｜Assistant｜>"]
    assert "generation_prompt" not in derive_chat_format(ChatTemplate(SMOLLM2_TEMPLATE))  # nothing to add


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


@pytest.mark.parametrize("source", [NUMBERED_TEMPLATE, DATE_CODE_TEMPLATE, DATE_FILTERED_TEMPLATE],
                         ids=["numbered-turns", "date-code", "date-filtered"])
def test_templates_that_are_not_fixed_pieces_get_none(source):
    # The app then says it cannot chat with this bundle, instead of prompting the model wrong.
    assert derive_chat_format(ChatTemplate(source, bos_token="<s>")) is None


def test_convert_says_when_the_app_cannot_chat_with_the_bundle(capsys):
    from types import SimpleNamespace

    from nomoat.converter.convert import _chat_format

    assert _chat_format(SimpleNamespace(chat_template=NUMBERED_TEMPLATE, special_tokens={})) is None
    assert "no chat_format: the Android app cannot chat with it" in capsys.readouterr().err
    assert _chat_format(SimpleNamespace(chat_template=SMOLLM2_TEMPLATE, special_tokens={})) is not None
    assert capsys.readouterr().err == ""


def test_the_manifest_carries_the_pieces_of_the_bundles_template(tmp_path):
    hf = make_tiny_hf_dir(tmp_path / "hf")
    out = convert(ConvertOptions(model=str(hf), out=tmp_path / "bundle", quant="fp32", max_context=64,
                                 progress=False, skip_verify=True))
    fmt = json.loads((out / "manifest.json").read_text())["chat_format"]
    model = Model.load(out)
    assert model.manifest.chat_format == fmt
    for conversation in CONVERSATIONS:
        assert render_pieces(fmt, conversation) == model.template.render(conversation, add_generation_prompt=True)


def test_inspect_says_when_the_pieces_have_no_system_turn(tmp_path):
    from nomoat.converter.cli_inspect import describe

    hf = make_tiny_hf_dir(tmp_path / "hf")
    out = convert(ConvertOptions(model=str(hf), out=tmp_path / "bundle", quant="fp32", max_context=64,
                                 progress=False, skip_verify=True))
    manifest = json.loads((out / "manifest.json").read_text())
    assert "the Android app can chat)" in describe(out, manifest, {}, None)
    llama2 = derive_chat_format(ChatTemplate(LLAMA2_TEMPLATE, bos_token="<s>"))
    assert llama2 is not None and llama2["first_turn_with_system"] is None
    text = describe(out, {**manifest, "chat_format": llama2}, {}, None)
    assert "the Android app can chat; without a system message)" in text
