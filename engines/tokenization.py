"""Tokenizer calls that leave the event loop free.

`tokenizers`' `encode` / `decode` hold the GIL for their whole run (measured: a 1 MiB prompt
blocked an asyncio loop for 1-2 s even from a worker thread); the batch forms release it while
they work. The engines tokenize through these two functions, and the servers call them on worker
threads for large inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer


def encode(tokenizer: Tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    return tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids


def decode(tokenizer: Tokenizer, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    return tokenizer.decode_batch([list(token_ids)], skip_special_tokens=skip_special_tokens)[0]
