"""server.chat.chat_prompt: the checks on chat messages before any rendering."""

from __future__ import annotations

import pytest

from tokenrelay_server.chat import MAX_CHAT_MESSAGES, chat_prompt
from tokenrelay_server.errors import FailedPrecondition


def _encode(messages):
    return [len(messages), *(len(m.content) for m in messages)]


def test_valid_messages_are_encoded() -> None:
    bad: list[tuple[str, str]] = []
    assert chat_prompt([("system", "be brief"), ("user", "hi")], bad, _encode, 1 << 20) == [2, 8, 2]
    assert bad == []


@pytest.mark.parametrize(("pairs", "field", "words"), [
    ([], "params.messages.messages", "at least one"),
    ([("user", "x")] * (MAX_CHAT_MESSAGES + 1), "params.messages.messages", f"at most {MAX_CHAT_MESSAGES}"),
    ([("user", "a"), ("tool", "b"), ("bot", "c")], "params.messages.messages[1].role", "must be one of"),
    ([("user", "é" * 600)], "params.messages.messages", "at most 1000 bytes"),  # 1200 UTF-8 bytes
])
def test_bad_messages_are_named_and_not_rendered(pairs, field: str, words: str) -> None:
    bad: list[tuple[str, str]] = []
    calls = []
    assert chat_prompt(pairs, bad, lambda m: calls.append(m) or [1], max_prompt_bytes=1000) == []
    assert len(bad) == 1 and bad[0][0] == field and words in bad[0][1]
    assert calls == []


def test_no_encoder_is_failed_precondition() -> None:
    with pytest.raises(FailedPrecondition, match="no chat template"):
        chat_prompt([("user", "hi")], [], None, 1 << 20)
