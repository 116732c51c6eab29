"""A model's chat template: Jinja2 source rendered in a sandbox, as Hugging Face tokenizers do.

Templates come with the model (tokenizer_config.json "chat_template", chat_template.jinja, or a
GGUF's tokenizer.chat_template) or from an operator's file (--chat-template). They are untrusted
code, so they run in Jinja2's ImmutableSandboxedEnvironment with the same globals the Hugging
Face renderer gives them: `messages`, `add_generation_prompt`, `bos_token`, `eos_token` (and the
other special tokens), `raise_exception(msg)`, `strftime_now(fmt)`, a `tojson` filter that does
not HTML-escape; blocks are trimmed (`trim_blocks`, `lstrip_blocks`) and `{% break %}` /
`{% continue %}` work.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")


class ChatTemplateError(ValueError):
    """The template refused the conversation (raise_exception) or failed while rendering."""


@dataclass(slots=True, frozen=True)
class ChatMessage:
    role: str
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {self.role!r}")


def template_from_tokenizer_config(model_dir: Path) -> str | None:
    """The chat template shipped in a Hugging Face model directory, or None."""
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    config_file = model_dir / "tokenizer_config.json"
    if not config_file.is_file():
        return None
    template = json.loads(config_file.read_text(encoding="utf-8")).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def special_tokens_from_tokenizer_config(model_dir: Path) -> dict[str, str]:
    """bos_token / eos_token / unk_token / pad_token strings from tokenizer_config.json."""
    config_file = model_dir / "tokenizer_config.json"
    if not config_file.is_file():
        return {}
    config = json.loads(config_file.read_text(encoding="utf-8"))
    out = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            out[name] = value
    return out


class ChatTemplate:
    """One compiled template; `render` is thread-safe (the compiled template is immutable)."""

    def __init__(self, source: str, special_tokens: dict[str, str | None] | None = None) -> None:
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
                   separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        def strftime_now(fmt: str) -> str:
            return datetime.now().strftime(fmt)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        self._jinja_errors = (jinja2.exceptions.TemplateError,)
        try:
            self._template = env.from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as exc:
            raise ChatTemplateError(f"the chat template does not compile: {exc}") from exc
        self.source = source
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}

    def render(self, messages: list[ChatMessage], add_generation_prompt: bool = True) -> str:
        try:
            return self._template.render(
                messages=[{"role": m.role, "content": m.content} for m in messages], tools=None,
                documents=None, add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except self._jinja_errors as exc:
            raise ChatTemplateError(str(exc)[:512]) from exc
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
            raise ChatTemplateError(f"the chat template failed: {type(exc).__name__}: {str(exc)[:400]}") from exc


_PROBE = "\x00tokenrelay-probe\x00"


def end_of_turn_token(template: ChatTemplate, special_tokens: set[str]) -> str | None:
    """The special token the template writes right after an assistant turn (e.g. <|im_end|>).

    Found by rendering a probe conversation and reading what follows the assistant's content;
    None when nothing special follows it (the model's eos then ends the turn).
    """
    try:
        text = template.render([ChatMessage("user", "hi"), ChatMessage("assistant", _PROBE)],
                               add_generation_prompt=False)
    except ChatTemplateError:
        return None
    at = text.find(_PROBE)
    if at < 0:
        return None
    rest = text[at + len(_PROBE):].lstrip()
    for token in sorted(special_tokens, key=len, reverse=True):
        if token and rest.startswith(token):
            return token
    return None
