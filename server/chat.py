"""Chat messages as a prompt: checked against the input limits, rendered with the model's
chat template (engines.chat_template), then tokenized.

`ChatPrompts` is the one owner of the compiled template for a server: built lazily from the
engine's ModelInfo (the template only exists once the model is loaded) and reused. `encode`
is CPU work (Jinja rendering + tokenization): servicers call it off the event loop.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from tokenrelay_engines.base import AsyncEngine
from tokenrelay_engines.chat_template import ROLES, ChatMessage, ChatTemplate, ChatTemplateError
from tokenrelay_server.errors import FailedPrecondition, InvalidRequests

MAX_CHAT_MESSAGES = 1024
FIELD = "params.messages"

ChatEncoder = Callable[[list[ChatMessage]], list[int]]


def chat_prompt(pairs: list[tuple[str, str]], bad: list[tuple[str, str]], encode: ChatEncoder | None,
                max_prompt_bytes: int) -> list[int]:
    """Validate (role, content) pairs, then render + tokenize them with `encode`.

    Bad fields are appended to `bad` (nothing is rendered then). Without an encoder, or when the
    model has no chat template, raises FailedPrecondition; a template that refuses the
    conversation (raise_exception) raises InvalidRequests on params.messages.
    """
    if not pairs:
        bad.append((f"{FIELD}.messages", "at least one chat message is required"))
        return []
    if len(pairs) > MAX_CHAT_MESSAGES:
        bad.append((f"{FIELD}.messages", f"at most {MAX_CHAT_MESSAGES} messages, got {len(pairs)}"))
        return []
    roles_ok = True
    for i, (role, _) in enumerate(pairs):
        if role not in ROLES and roles_ok:
            bad.append((f"{FIELD}.messages[{i}].role", f"must be one of {', '.join(ROLES)}"))
            roles_ok = False  # one violation is enough: details stay bounded
    if sum(len(c.encode("utf-8", "surrogatepass")) for _, c in pairs) > max_prompt_bytes:
        bad.append((f"{FIELD}.messages", f"at most {max_prompt_bytes} bytes of message content in all"))
    if bad:
        return []
    if encode is None:
        raise FailedPrecondition("this server's model has no chat template: send text or token_ids")
    return encode([ChatMessage(role, content) for role, content in pairs])


class ChatPrompts:
    """Renders conversations with the engine's chat template and tokenizes them."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._compiled: tuple[str, ChatTemplate] | None = None

    def _template(self) -> ChatTemplate:
        info = self._engine.info()
        if not info.chat_template:
            raise FailedPrecondition(f"model {info.name!r} has no chat template: send text or token_ids, "
                                     "or start the server with --chat-template FILE")
        with self._lock:
            if self._compiled is None or self._compiled[0] != info.chat_template:
                try:
                    self._compiled = (info.chat_template, ChatTemplate(info.chat_template, dict(info.special_tokens)))
                except ChatTemplateError as exc:
                    raise FailedPrecondition(f"the model's chat template is unusable: {str(exc)[:200]}") from exc
            return self._compiled[1]

    def render(self, messages: list[ChatMessage]) -> str:
        try:
            return self._template().render(messages, add_generation_prompt=True)
        except ChatTemplateError as exc:
            raise InvalidRequests([(FIELD, f"the chat template refused the conversation: {str(exc)[:200]}")]) from exc

    def encode(self, messages: list[ChatMessage]) -> list[int]:
        """Rendered prompt -> token ids (the template writes any BOS itself: no special tokens added)."""
        return self._engine.tokenize(self.render(messages), add_special_tokens=False)
