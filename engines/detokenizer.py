"""Incremental, UTF-8 safe detokenization with stop strings.

Decoding token by token breaks multi-byte characters: a byte-level BPE (or byte-fallback)
token may carry only part of a character, which decodes to U+FFFD. The field's
prefix_offset / read_offset scheme decodes a short window of ids twice — up to `read_offset`
(already emitted) and up to the end — and emits the difference only once it no longer ends in
an incomplete character; `tokenizers.decoders.DecodeStream` runs exactly that in the tokenizer's
own code, one call per token, seeded with the last prompt tokens as left context.

Stop strings: text that may be the start of a stop string is held back until it is not. A
matched stop string never reaches the output (or ends it, with include_stop_in_output), and
everything after the match is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

_REPLACEMENT = "\ufffd"
_CONTEXT_TOKENS = 5  # prompt tokens decoded as left context (spacing, merges)


def decode_output(tokenizer: Tokenizer, prompt_token_ids: Seq[int], output_ids: Seq[int],
                  skip_special_tokens: bool = True) -> str:
    """The text of a whole output at once: what `IncrementalDetokenizer` releases token by token
    (with no stop strings), in two decode calls (the same prompt tokens as left context)."""
    context = list(prompt_token_ids[-_CONTEXT_TOKENS:])
    prefix = tokenizer.decode(context, skip_special_tokens=skip_special_tokens)
    full = tokenizer.decode(context + list(output_ids), skip_special_tokens=skip_special_tokens)
    return full[len(prefix):] if len(full) > len(prefix) else ""


class IncrementalDetokenizer:
    """Text view of one sequence's output tokens, with its stop strings (the front end's output processor)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Seq[int],
        stop: Seq[str] = (),
        include_stop_in_output: bool = False,
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._stop = tuple(s for s in stop if s)
        self._include_stop = include_stop_in_output
        self._max_stop_len = max((len(s) for s in self._stop), default=0)
        self._context = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        # The prefix_offset / read_offset window, in the tokenizer's own code: one call per token.
        self._stream: DecodeStream | None = DecodeStream(self._context, skip_special_tokens)
        self._output_ids: list[int] = []
        self._pending = False  # the stream holds ids it has not turned into text yet
        self._decoded_chars = 0  # chars of output text decoded so far
        self._text = ""  # decoded output text, not yet released (with what it may still match)
        self._released = 0  # chars of _text handed out through take_text()
        self._emittable = 0  # chars of _text that may be released
        self.stopped: str | None = None  # the stop string matched, once one is

    # ---- decoding -----------------------------------------------------------------------

    def _decode_pending(self) -> str:
        """The end of the output: text of ids the stream still holds (an incomplete character
        decodes to U+FFFD), from the whole output decoded at once."""
        if not self._pending:
            return ""
        self._pending = False
        full = decode_output(self._tokenizer, self._context, self._output_ids, self._skip_special)
        return full[self._decoded_chars:]

    def _restart(self) -> str | None:
        """The stream refused a token: take the new text from the whole output decoded at once
        (None while it ends in an incomplete character: this repeats on the next token), then go
        on with a fresh stream whose left context is the last output tokens."""
        full = decode_output(self._tokenizer, self._context, self._output_ids, self._skip_special)
        if full.endswith(_REPLACEMENT):
            self._stream = None
            return None
        # the longest tail of the output (up to _CONTEXT_TOKENS) that is whole characters
        context: list[int] = []
        for k in range(min(_CONTEXT_TOKENS, len(self._output_ids)), 0, -1):
            tail = self._output_ids[-k:]
            if _REPLACEMENT not in self._tokenizer.decode(tail, skip_special_tokens=self._skip_special):
                context = tail
                break
        self._stream = DecodeStream(context, self._skip_special)
        return full[self._decoded_chars:]

    # ---- taking tokens (the output processor) -------------------------------------------

    def append(self, token_id: int, allow_stop: bool = True) -> str | None:
        """Take one output token; return the stop string it completed, if any."""
        if self.stopped is not None:
            return self.stopped
        self._output_ids.append(token_id)
        if self._stream is None:  # restarting after a refusal
            new_text = self._restart()
        else:
            try:
                new_text = self._stream.step(self._tokenizer, token_id)
            except Exception:  # noqa: BLE001 - the window's text no longer extends its prefix (tokenizers#1705)
                new_text = self._restart()
        if new_text is None:
            self._pending = True
            return None
        self._pending = False
        self._decoded_chars += len(new_text)
        self._absorb(new_text, allow_stop)
        return self.stopped

    def finish(self) -> None:
        """No more tokens: decode what is pending and release held-back text."""
        if self.stopped is None:
            self._absorb(self._decode_pending(), allow_stop=True)
        if self.stopped is None:
            self._emittable = len(self._text)

    def _absorb(self, new_text: str, allow_stop: bool) -> None:
        if not new_text:
            return
        search_from = self._emittable
        self._text += new_text
        if not self._stop:
            self._emittable = len(self._text)
            return
        if allow_stop:
            match = self._find_stop(search_from)
            if match is not None:
                pos, stop = match
                end = pos + len(stop) if self._include_stop else pos
                self._text = self._text[:end]
                self._emittable = end
                self.stopped = stop
                return
        self._emittable = len(self._text) - self._held_back()

    def _find_stop(self, start: int) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for stop in self._stop:
            pos = self._text.find(stop, start)
            if pos >= 0 and (best is None or pos < best[0] or (pos == best[0] and len(stop) > len(best[1]))):
                best = (pos, stop)
        return best

    def _held_back(self) -> int:
        """Length of the longest tail of the pending text that starts some stop string."""
        tail = self._text[self._emittable:]
        held = 0
        for stop in self._stop:
            for k in range(min(len(stop) - 1, len(tail)), held, -1):
                if tail.endswith(stop[:k]):
                    held = k
                    break
        return held

    # ---- the publishing side ------------------------------------------------------------

    def take_text(self) -> str:
        """Text released since the previous call."""
        out = self._text[self._released:self._emittable]
        self._released = self._emittable
        # Keep only what stop matching can still need.
        if self._released > self._max_stop_len:
            cut = self._released - self._max_stop_len
            self._text = self._text[cut:]
            self._released -= cut
            self._emittable -= cut
        return out

    @property
    def output_text_len(self) -> int:
        return self._emittable
