from __future__ import annotations

import datetime

import pytest
from jinja2.exceptions import TemplateError, TemplateSyntaxError
from jinja2.sandbox import SecurityError
from nomoat.runtime.chat_template import (
    FALLBACK_STOP_STRING,
    ChatTemplate,
    ChatTemplateError,
    as_messages,
)

# SmolLM2-Instruct's template, verbatim from its tokenizer_config.json.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)


def test_smollm2_template_with_default_system_prompt():
    rendered = ChatTemplate(SMOLLM2_TEMPLATE).render(as_messages("What is 2+2?"))
    assert rendered == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_smollm2_template_with_system_and_history_without_generation_prompt():
    messages = as_messages(
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! 👋"},
            {"role": "user", "content": "你好"},
        ],
        system="Be terse.",
    )
    rendered = ChatTemplate(SMOLLM2_TEMPLATE).render(messages, add_generation_prompt=False)
    assert rendered == (
        "<|im_start|>system\nBe terse.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello! 👋<|im_end|>\n"
        "<|im_start|>user\n你好<|im_end|>\n"
    )


def test_trim_and_lstrip_blocks_like_transformers():
    # Without trim_blocks/lstrip_blocks this renders "\n    a|\n    \n".
    source = "{% for m in messages %}\n    {% if m %}{{ m['content'] }}|\n    {% endif %}\n{% endfor %}"
    assert ChatTemplate(source).render(as_messages("a"), add_generation_prompt=False) == "a|\n"


def test_bos_eos_and_extra_variables():
    source = (
        "{{ bos_token }}{{ messages[0]['content'] }}{{ eos_token }}"
        "{% if tools %}{{ tools|length }}{% endif %}"
    )
    template = ChatTemplate(source, bos_token="<s>", eos_token="</s>")
    assert template.render(as_messages("x")) == "<s>x</s>"
    assert template.render(as_messages("x"), tools=[{"name": "f"}]) == "<s>x</s>1"
    with pytest.raises(ValueError, match="bos_token"):
        template.render(as_messages("x"), bos_token="<other>")


def test_raise_exception_surfaces_the_template_message():
    source = (
        "{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
        "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
    )
    with pytest.raises(ChatTemplateError, match="Only user and assistant roles are supported!") as info:
        ChatTemplate(source).render(as_messages("hi", system="sys"))
    assert isinstance(info.value, TemplateError)


def test_tojson_keeps_non_ascii_and_supports_indent():
    template = ChatTemplate("{{ tools|tojson }}|{{ tools|tojson(indent=2) }}")
    tools = [{"name": "météo", "description": "天气 <b>&'"}]
    compact, indented = template.render(as_messages("x"), tools=tools).split("|", 1)
    assert compact == '[{"name": "météo", "description": "天气 <b>&\'"}]'
    assert indented.startswith('[\n  {\n    "name": "météo"')


def test_strftime_now():
    rendered = ChatTemplate("{{ strftime_now('%Y-%m-%d') }}").render([])
    assert abs(datetime.date.fromisoformat(rendered) - datetime.date.today()) <= datetime.timedelta(days=1)


def test_generation_block_and_loop_controls_parse():
    source = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}{% endif %}"
        "{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}"
    )
    assert ChatTemplate(source).render(as_messages("body", system="skip me")) == "body"


@pytest.mark.parametrize(
    "source",
    [
        "{{ ().__class__.__bases__ }}",
        "{{ ().__class__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages|attr('__class__') }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ messages.append({'role': 'user', 'content': 'injected'}) }}",
        "{% set d = {} %}{{ d.update(a=1) }}",
    ],
)
def test_sandbox_escapes_and_mutation_raise_security_error(source):
    with pytest.raises(SecurityError):
        ChatTemplate(source).render(as_messages("x"))


def test_syntax_errors_surface_at_construction():
    with pytest.raises(TemplateSyntaxError):
        ChatTemplate("{% for m in messages %}")


def test_fallback_is_chatml():
    template = ChatTemplate.fallback()
    rendered = template.render(as_messages("Hi", system="S"))
    assert rendered == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert FALLBACK_STOP_STRING == "<|im_end|>"


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ("just a string", "must be a list"),
        ({"role": "user", "content": "x"}, "must be a list"),
        (["not a dict"], r"messages\[0\] must be a dict"),
        ([{"content": "x"}], r"messages\[0\] has no 'role' key"),
        ([{"role": "user"}], r"messages\[0\] has no 'content' key"),
        ([{"role": "user", "content": None}], r"messages\[0\]\['content'\] must be a string"),
        ([{"role": "user", "content": "ok"}, {"role": 1, "content": "x"}], r"messages\[1\]\['role'\]"),
    ],
)
def test_invalid_messages_are_rejected(messages, message):
    with pytest.raises(ValueError, match=message):
        ChatTemplate.fallback().render(messages)


def test_as_messages():
    assert as_messages("hi") == [{"role": "user", "content": "hi"}]
    assert as_messages("hi", system="s") == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "hi"},
    ]
    original = [{"role": "user", "content": "hi"}]
    copied = as_messages(original, system="s")
    assert original == [{"role": "user", "content": "hi"}] and copied[1] is not original[0]
    with pytest.raises(ValueError, match="already start with a system message"):
        as_messages([{"role": "system", "content": "a"}], system="b")
    with pytest.raises(ValueError, match="has no 'content'"):
        as_messages([{"role": "user"}])


def test_a_template_sees_what_transformers_gives_it(tmp_path):
    """tools and documents are None unless given, and every special token is set, as in apply_chat_template:
    a template that tests `tools is not none` without defining it renders no tool preamble."""
    from tiny_models import tokenizer_json
    from transformers import PreTrainedTokenizerFast

    source = ("{%- if tools is not none %}[TOOLS: {{ tools | tojson }}]{% endif %}"
              "{%- if documents is not none %}[DOCS]{% endif %}"
              "{% for m in messages %}{{ m.role }}: {{ m.content }}{{ pad_token }}{{ unk_token }}\n{% endfor %}")
    (tmp_path / "tokenizer.json").write_text(tokenizer_json(), encoding="utf-8")
    special = {"bos": "<|im_start|>", "eos": "<|im_end|>", "pad": "<|im_end|>", "unk": "<|endoftext|>"}
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"),
                                 **{f"{role}_token": text for role, text in special.items()})
    hf.chat_template = source
    ours = ChatTemplate.for_tokenizer(source, special)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    for extra in ({}, {"tools": tools}):
        messages = [{"role": "user", "content": "hi"}]
        assert ours.render(messages, add_generation_prompt=False, **extra) == hf.apply_chat_template(
            messages, tokenize=False, **extra)
    assert ours.render([{"role": "user", "content": "hi"}], add_generation_prompt=False) == \
        "user: hi<|im_end|><|endoftext|>\n"


@pytest.mark.parametrize("source, said", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x",
     "did not finish rendering within 0.3 s"),
    ("{{ 'x' * 100000000000 }}", "repeats a str into more than 1,000,000 items"),
    ("{{ [1] * 10 ** 9 }}", "repeats a list into more than"),
    ("{{ 2 ** 100000000 }}", "raises a number to the power 100000000"),
    ("{{ (7 ** 10000) ** 3000 }}", "raises a number of 28074 bits to the power 3000"),  # one 45 s step
    ("{{ '%50000000d' % 1 }}", "formats a string of more than 1,000,000 characters"),
])
def test_a_hostile_template_is_stopped_not_run_for_ever(source, said, monkeypatch):
    """A shared bundle's template that loops for ever held a server's request thread and its core until the
    process ended; one that builds a string of 100 GB asked for the memory. Jinja's sandbox caps range() alone."""
    import sys

    import nomoat.runtime.chat_template as chat_template

    monkeypatch.setattr(chat_template, "RENDER_SECONDS", 0.3)
    before = sys.gettrace()  # coverage's or a debugger's, if any: put back after the render
    with pytest.raises(TemplateError, match=said):
        ChatTemplate(source).render([{"role": "user", "content": "hi"}])
    assert sys.gettrace() is before
    assert ChatTemplate("{{ 'ab' * 3 }}{{ 2 ** 10 }}{{ '%03d' % 7 }}{{ 7 % 4 }}").render([]) == "ababab10240073"
