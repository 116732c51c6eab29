"""A `tokenizers` Tokenizer built from a GGUF file's tokenizer metadata.

A GGUF carries no tokenizer.json: the vocabulary (`tokenizer.ggml.tokens`), merges, token types,
special token ids and flags are metadata under llama.cpp's key names. Two vocabulary kinds cover
the Llama family:

- "gpt2": byte-level BPE (Llama 3, Qwen2/3, SmolLM). Text is split by the pre-tokenizer regex the
  vocabulary was trained with (`tokenizer.ggml.pre` names it), mapped to the byte alphabet, merged.
- "llama": sentencepiece-style BPE (Llama 2, Mistral): spaces become "▁", a "▁" is prepended to
  the text (`tokenizer.ggml.add_space_prefix`), unknown bytes fall back to <0xNN> tokens.

Control and unknown tokens (types 3, 2) become special added tokens (matched whole, skipped on decode when
asked); user-defined tokens (type 4) become plain added tokens. BOS is prepended when
`tokenizer.ggml.add_bos_token` says so (sentencepiece vocabularies default to yes, as llama.cpp).
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from tokenrelay_engines.torch.gguf_loader import GGUFFile

UNKNOWN, CONTROL, USER_DEFINED = 2, 3, 4  # llama.cpp token types

# `tokenizer.ggml.pre` -> the split regex of that vocabulary (as in its original tokenizer.json).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT, "falcon3": _LLAMA3_SPLIT, "pixtral": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}


@dataclass(slots=True, frozen=True)
class GGUFTokenizerInfo:
    """What the server needs beside the Tokenizer: special token strings and the chat template."""

    bos_token: str | None
    eos_token: str | None
    chat_template: str | None
    add_bos_token: bool


def byte_alphabet() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte 0..255 (byte-level BPE), in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _merges(gguf: GGUFFile) -> list[tuple[str, str]]:
    merges = gguf.get("tokenizer.ggml.merges")
    if merges is None:
        raise ValueError(f"{gguf.path.name}: the BPE vocabulary has no tokenizer.ggml.merges")
    out = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep:
            raise ValueError(f"{gguf.path.name}: malformed merge {m!r}")
        out.append((a, b))
    return out


def _byte_level(gguf: GGUFFile, tokens: list[str]) -> Tokenizer:
    alphabet = byte_alphabet()
    spelled = set(alphabet.values())
    # A token written outside the byte alphabet is spelled byte by byte, so BPE can reach it.
    vocab = {}
    for i, tok in enumerate(tokens):
        key = tok if set(tok) <= spelled else "".join(alphabet[b] for b in tok.encode("utf-8"))
        vocab.setdefault(key, i)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=_merges(gguf), fuse_unk=False, byte_fallback=False))
    split = PRE_TOKENIZER_SPLITS.get(str(gguf.get("tokenizer.ggml.pre", "")))
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece(gguf: GGUFFile, tokens: list[str]) -> Tokenizer:
    vocab = {t: i for i, t in reversed(list(enumerate(tokens)))}
    if "tokenizer.ggml.merges" in gguf:
        merges = _merges(gguf)
    else:  # older files: recover merges from the vocabulary, best score first
        merges = _merges_from_scores(tokens, gguf.get("tokenizer.ggml.scores") or [0.0] * len(tokens), vocab)
    unk_id = gguf.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None and 0 <= int(unk_id) < len(tokens) else None
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    prefix = bool(gguf.get("tokenizer.ggml.add_space_prefix", True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if prefix else "never",
                                                 split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _merges_from_scores(tokens: list[str], scores: list[float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    found: list[tuple[float, int, int, tuple[str, str]]] = []
    for tok in tokens:
        if len(tok) < 2:
            continue
        for cut in range(1, len(tok)):
            a, b = tok[:cut], tok[cut:]
            if a in vocab and b in vocab:
                found.append((-float(scores[vocab[tok]]), vocab[a], vocab[b], (a, b)))
    found.sort()
    return [pair for *_, pair in found]


def tokenizer_from_gguf(gguf: GGUFFile) -> tuple[Tokenizer, GGUFTokenizerInfo]:
    kind = gguf.get("tokenizer.ggml.model")
    tokens = gguf.get("tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise ValueError(f"{gguf.path.name} has no tokenizer metadata (tokenizer.ggml.model / tokens)")
    tokens = [str(t) for t in tokens]
    if kind == "gpt2":
        tok = _byte_level(gguf, tokens)
        spelled = set(byte_alphabet().values())
    elif kind == "llama":
        tok = _sentencepiece(gguf, tokens)
        spelled = None
    else:
        raise ValueError(f"{gguf.path.name}: tokenizer model {kind!r} is not supported (gpt2, llama)")
    types = gguf.raw_array("tokenizer.ggml.token_type")
    types = [] if types is None else types.tolist()
    vocab = tok.get_vocab()
    # A control token spelled outside the byte alphabet of a byte-level vocabulary is not a real
    # token of it (a converter's mislabel); adding it would grow the vocabulary past the model's.
    special = [AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types)
               if ty in (UNKNOWN, CONTROL) and (spelled is None or set(t) <= spelled)]
    if special:
        tok.add_special_tokens(special)
    plain = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types)
             if ty == USER_DEFINED and t in vocab]
    if plain:
        tok.add_tokens(plain)

    def token(key: str) -> str | None:
        tid = gguf.get(key)
        return tokens[int(tid)] if tid is not None and 0 <= int(tid) < len(tokens) else None

    bos, eos = token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id")
    add_bos = bool(gguf.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    add_eos = bool(gguf.get("tokenizer.ggml.add_eos_token", False))
    single, specials = ["$A"], []
    if add_bos and bos is not None:
        single.insert(0, bos)
        specials.append((bos, tok.token_to_id(bos)))
    if add_eos and eos is not None:
        single.append(eos)
        if eos != bos or not add_bos:
            specials.append((eos, tok.token_to_id(eos)))
    if len(single) > 1:
        tok.post_processor = processors.TemplateProcessing(single=" ".join(single), special_tokens=specials)
    template = gguf.get("tokenizer.chat_template")
    info = GGUFTokenizerInfo(bos_token=bos, eos_token=eos, chat_template=str(template) if template else None,
                             add_bos_token=add_bos)
    return tok, info
