"""Prompt sources for the load generator (its named datasets): random token ids of fixed or
ranged length, a file of prompts, or a ShareGPT conversation file."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

Prompt = str | list[int]
DATASETS = ("random", "file", "sharegpt")


@dataclass(slots=True, frozen=True)
class LengthRange:
    """A token length, fixed ("128") or drawn uniformly from an inclusive range ("64:256")."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if self.low < 1 or self.high < self.low:
            raise ValueError(f"need 1 <= low <= high, got {self.low}:{self.high}")

    @classmethod
    def parse(cls, text: str) -> LengthRange:
        try:
            low, sep, high = text.partition(":")
            return cls(int(low), int(high) if sep else int(low))
        except ValueError as exc:
            raise ValueError(f"bad length {text!r}: expected N or LOW:HIGH with 1 <= LOW <= HIGH "
                             f"({exc})") from None

    def draw(self, rng: random.Random) -> int:
        return self.low if self.low == self.high else rng.randint(self.low, self.high)

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}:{self.high}"


def random_token_prompts(count: int, length: LengthRange, vocab_size: int,
                         avoid: Sequence[int], rng: random.Random) -> list[list[int]]:
    """`count` prompts of random token ids in [1, vocab_size), skipping the `avoid` ids (eos)."""
    banned = set(avoid) | {0}
    allowed = [t for t in range(min(vocab_size, 1 << 20)) if t not in banned]
    if not allowed:
        raise ValueError(f"vocab of size {vocab_size} leaves no token id to build prompts from")
    return [[rng.choice(allowed) for _ in range(length.draw(rng))] for _ in range(count)]


def load_prompt_file(path: str | Path) -> list[Prompt]:
    """Prompts from a file: JSONL (objects with "prompt", "text" or "token_ids", or bare JSON
    strings / id lists) when every line parses as JSON, else one plain-text prompt per line."""
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path}: no prompts")
    try:
        parsed = [json.loads(line) for line in lines]
    except json.JSONDecodeError:
        return list(lines)
    prompts: list[Prompt] = []
    for number, item in enumerate(parsed, 1):
        if isinstance(item, dict):
            item = item.get("prompt", item.get("text", item.get("token_ids")))
        if isinstance(item, str) and item:
            prompts.append(item)
        elif isinstance(item, list) and item and all(isinstance(t, int) for t in item):
            prompts.append(list(item))
        else:
            raise ValueError(f"{path}:{number}: expected a prompt string, a token id list, or an "
                             "object with 'prompt', 'text' or 'token_ids'")
    return prompts


def load_sharegpt(path: str | Path) -> list[Prompt]:
    """The first human turn of each conversation in a ShareGPT JSON file (a list of
    {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}, ...]})."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not a ShareGPT JSON file ({exc})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: a ShareGPT file is a JSON list of conversations")
    prompts: list[Prompt] = []
    for item in data:
        turns = item.get("conversations") if isinstance(item, dict) else None
        for turn in turns if isinstance(turns, list) else ():
            if isinstance(turn, dict) and turn.get("from") == "human" and isinstance(turn.get("value"), str):
                if turn["value"]:
                    prompts.append(turn["value"])
                break
    if not prompts:
        raise ValueError(f"{path}: no conversation with a human turn")
    return prompts


def load_dataset(name: str, path: str | Path | None) -> list[Prompt] | None:
    """The prompts of a named dataset; None for `random` (drawn per point from the vocabulary)."""
    if name == "random":
        return None
    if path is None:
        raise ValueError(f"the {name} dataset needs a file")
    if name == "file":
        return load_prompt_file(path)
    if name == "sharegpt":
        return load_sharegpt(path)
    raise ValueError(f"unknown dataset {name!r}; one of {', '.join(DATASETS)}")
