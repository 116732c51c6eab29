"""A few hundred strings that stress a tokenizer: unicode, whitespace runs, digits, code, special tokens."""

from __future__ import annotations

import random

BASE = [
    "", " ", "  ", "\n", "\n\n", "\t", " \t\n ", "a", " a", "a ", "Hello world", "Hello  world",
    " Hello world", "Hello world ", "hello\nworld", "hello\r\nworld", "HELLO WORLD", "Hello, World!",
    "The capital of France is Paris.", "What is 2+2? It's 4.", "I'm, you're, we've, they'll, she'd",
    "12345", "3.14159", "1,000,000", "2024-12-03T08:30:00Z", "0x1F600", " 42 ", "a1b2c3", "٣٤٥", "¹²³",
    "héllo wörld", "naïve café résumé", "Ünïcödé", "日本語のテキスト", "中文字符测试", "한국어 텍스트",
    "Привет, мир!", "مرحبا بالعالم", "שלום עולם", "ελληνικά", "हिन्दी", "ไทย", "🤖🚀✨", "👨‍👩‍👧‍👦 family",
    "🇫🇷 flag", "e\u0301 combining", "zero\u200bwidth", "nbsp\u00a0space", "tab\tseparated\tvalues",
    "def f(x):\n    return x * 2\n", "for (int i = 0; i < n; ++i) { sum += a[i]; }", "<html><body></body></html>",
    "SELECT * FROM jobs WHERE state = 'queued';", "{\"key\": [1, 2, 3], \"nested\": {\"a\": null}}",
    "https://example.org/path?q=1&r=two#frag", "user@example.org", "C:\\Windows\\System32",
    "   leading spaces", "trailing spaces   ", "multiple   inner   spaces", "\n\n\nthree newlines",
    "mixed \t \n whitespace", "!!!???...", "--- *** ___", "~`@#$%^&*()_+-=[]{}|;':\",./<>?",
    "a" * 64, "ab" * 40, " " * 17, "\n" * 9, "😀" * 8, "The the THE tHe", "don't DON'T Don't",
    "<s>", "</s>", "<unk>", "<pad>", "<|endoftext|>", "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>assistant\n", "text <s> inside </s> text", "<<s>>", "< s >", "<|im_start|><|im_end|>",
]


def tokenizer_strings(special_tokens: list[str], count: int = 320, seed: int = 0) -> list[str]:
    """BASE, simple variations of it, then seeded random mixes (special tokens included)."""
    rng = random.Random(seed)
    out = list(BASE)
    out += [" " + s for s in BASE[:40]] + [s.upper() for s in BASE[20:50]] + [s + "\n" for s in BASE[10:40]]
    out += [f"{a} {special} {b}" for a, special, b in zip(BASE[17:30], special_tokens * 13, BASE[30:43])]
    pool = (list("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789 .,;:!?'\"-_/\\()[]{}") + [" ", "  ", "\n", "\t", "\r\n"]
            + list("éüßøñçåœ日本語中文한국어Привет") + ["🤖", "👍🏽", "\u200d", "\u0301"] + special_tokens)
    while len(out) < count:
        out.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 40))))
    return out
