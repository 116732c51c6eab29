"""Chat templates rendered by engines.chat_template exactly as transformers' apply_chat_template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokenrelay_engines.chat_template import (
    ChatMessage, ChatTemplate, ChatTemplateError, end_of_turn_token, template_from_tokenizer_config,
)

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
# Whitespace control, namespace(), loop controls and the tojson filter (non-ASCII kept as is).
FANCY = """{%- set ns = namespace(system='') -%}
{%- for m in messages -%}
  {%- if m.role == 'system' -%}{%- set ns.system = m.content -%}{%- continue -%}{%- endif -%}
  {%- if loop.index > 50 -%}{%- break -%}{%- endif %}
<{{ m.role }}> {{ m.content | tojson }}
  {% if m.role == 'assistant' %}{{ eos_token }}{% endif %}
{%- endfor %}
{% if ns.system %}[system: {{ ns.system }}]{% endif %}
{%- if add_generation_prompt %}
<assistant>{% endif %}"""
TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "mistral": MISTRAL, "fancy": FANCY}

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "  Tell me a joke.\n"}],
    [{"role": "user", "content": "héllo 日本語 🤖 \"quoted\" <b>"}, {"role": "assistant", "content": "ok\n\nsure"},
     {"role": "user", "content": ""}, {"role": "assistant", "content": "…"}, {"role": "user", "content": "end"}],
]
SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import PreTrainedTokenizerFast

    from tokenrelay_engines.torch.loader import DEMO_MODEL_DIR

    demo = Path(__file__).resolve().parents[2] / "engines" / "torch" / DEMO_MODEL_DIR
    return PreTrainedTokenizerFast(tokenizer_file=str(demo / "tokenizer.json"), **SPECIALS)


def _messages(conversation: list[dict[str, str]]) -> list[ChatMessage]:
    return [ChatMessage(m["role"], m["content"]) for m in conversation]


@pytest.mark.parametrize("name", TEMPLATES)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_rendering_matches_apply_chat_template(hf_tokenizer, name: str, add_generation_prompt: bool) -> None:
    template = ChatTemplate(TEMPLATES[name], SPECIALS)
    rendered = 0
    for conversation in CONVERSATIONS:
        try:
            expected = hf_tokenizer.apply_chat_template(conversation, chat_template=TEMPLATES[name], tokenize=False,
                                                        add_generation_prompt=add_generation_prompt)
        except Exception as exc:  # noqa: BLE001 - the template refused: ours must refuse too
            with pytest.raises(ChatTemplateError, match="alternate|roles"):
                template.render(_messages(conversation), add_generation_prompt=add_generation_prompt)
            assert "alternate" in str(exc) or "roles" in str(exc)
            continue
        assert template.render(_messages(conversation), add_generation_prompt=add_generation_prompt) == expected
        rendered += 1
    assert rendered >= 2


def test_template_refusal_and_syntax_errors_are_chat_template_errors() -> None:
    with pytest.raises(ChatTemplateError, match="alternate"):
        ChatTemplate(MISTRAL, SPECIALS).render(_messages([{"role": "assistant", "content": "first"}]))
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for m in messages %}", SPECIALS)


def test_the_sandbox_blocks_attribute_escapes() -> None:
    escape = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ChatTemplateError):
        ChatTemplate(escape, SPECIALS).render(_messages([{"role": "user", "content": "x"}]))


def test_end_of_turn_token_is_what_follows_an_assistant_turn() -> None:
    specials = {"<|im_start|>", "<|im_end|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>",
                "<s>", "</s>"}
    assert end_of_turn_token(ChatTemplate(CHATML, SPECIALS), specials) == "<|im_end|>"
    assert end_of_turn_token(ChatTemplate(LLAMA3, SPECIALS), specials) == "<|eot_id|>"
    assert end_of_turn_token(ChatTemplate(MISTRAL, SPECIALS), specials) == "</s>"
    assert end_of_turn_token(ChatTemplate("{{ messages[-1].content }}", SPECIALS), specials) is None


def test_template_sources_in_a_model_directory(tmp_path: Path) -> None:
    assert template_from_tokenizer_config(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": CHATML}]}))
    assert template_from_tokenizer_config(tmp_path) == CHATML
    (tmp_path / "chat_template.jinja").write_text(LLAMA3)
    assert template_from_tokenizer_config(tmp_path) == LLAMA3  # the .jinja file wins, as in transformers
