"""`tokenrelay chat`: an interactive terminal chat over GenerateStream with chat messages.

Each line typed is a user message; the reply streams as its tokens arrive, and both join the
conversation, which is sent whole every turn (the server renders it with the model's chat
template). Commands: /reset starts over, /exit (or Ctrl-D) quits; Ctrl-C stops a reply early.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from tokenrelay import Client

DEFAULT_CHAT_MAX_TOKENS = 256
USER_PROMPT = "> "


def chat_loop(client: Client, options: dict[str, Any], *, system: str | None = None,
              stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    options = dict(options)
    options.setdefault("max_tokens", DEFAULT_CHAT_MAX_TOKENS)
    opening = [{"role": "system", "content": system}] if system else []
    messages: list[dict[str, str]] = list(opening)
    interactive = stdin.isatty()
    if interactive:
        stdout.write("Chatting with the server's model. /reset starts over, /exit or Ctrl-D quits.\n")
    while True:
        line = _read_line(stdin, stdout, interactive)
        if line is None:
            stdout.write("\n" if interactive else "")
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            messages = list(opening)
            stdout.write("(conversation cleared)\n")
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        reply = _stream_reply(client, messages, options, stdout)
        if reply is None:  # interrupted: forget the unanswered turn
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": reply})


def _read_line(stdin: TextIO, stdout: TextIO, interactive: bool) -> str | None:
    if interactive and stdin is sys.stdin:
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
        try:
            return input(USER_PROMPT)
        except EOFError:
            return None
    stdout.write(USER_PROMPT)
    stdout.flush()
    line = stdin.readline()
    return line if line else None


def _stream_reply(client: Client, messages: list[dict[str, str]], options: dict[str, Any],
                  stdout: TextIO) -> str | None:
    parts: list[str] = []
    try:
        with client.chat_stream(messages, **options) as stream:
            for delta in stream:
                if delta.text:
                    parts.append(delta.text)
                    stdout.write(delta.text)
                    stdout.flush()
    except KeyboardInterrupt:
        stdout.write("\n(interrupted)\n")
        stdout.flush()
        return None
    stdout.write("\n")
    stdout.flush()
    return "".join(parts)
