"""Incremental detokenization over real `tokenizers` tokenizers built here (no downloads)."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tokenrelay_engines.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello café 日本語 world 🎉🙂 done",
    "naïve résumé — 日本 and ünïcödé 🚀 in one line",
    "the quick brown fox, 日本 é é 🙂🙂🙂 end.",
]
PROMPT = "the café "


def _byte_level() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world the café is open", "日本 is a country",
                             "the quick brown fox"] * 20, trainer)
    return tok


def _byte_fallback() -> Tokenizer:
    vocab = {f"<0x{b:02X}>": b for b in range(256)}
    for i, ch in enumerate("abcdefghijklmnopqrstuvwxyzHé.,—▁"):
        vocab[ch] = 256 + i
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(["<eos>"])
    return tok


@pytest.fixture(scope="module", params=["byte_level", "byte_fallback"])
def tokenizer(request) -> Tokenizer:
    return _byte_level() if request.param == "byte_level" else _byte_fallback()


def _stream(tok: Tokenizer, ids: list[int], stop=(), include=False, min_tokens=0) -> tuple[list[str], str | None]:
    detok = IncrementalDetokenizer(tok, tok.encode(PROMPT).ids, stop, include)
    deltas: list[str] = []
    matched = None
    for i, t in enumerate(ids):
        matched = detok.append(t, allow_stop=i + 1 > min_tokens)
        deltas.append(detok.take_text())
        if matched is not None:
            break
    if matched is None:
        detok.finish()
    deltas.append(detok.take_text())
    return deltas, matched


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_decode_and_never_emit_partial_characters(tokenizer, text) -> None:
    ids = tokenizer.encode(text).ids
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids), "test text must split characters"
    deltas, matched = _stream(tokenizer, ids)
    assert matched is None
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(ids) == text


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("include", [False, True])
def test_stop_string_is_cut_and_never_leaks(tokenizer, text, include) -> None:
    ids = tokenizer.encode(text).ids
    full = tokenizer.decode(ids)
    rng = random.Random(hash(text) & 0xFFFF)
    stops = {"日本", "🙂", "é", " world", "ne", "fox,"} | {full[i:i + rng.randint(1, 4)] for i in range(0, len(full), 5)}
    for stop in sorted(s for s in stops if s in full and s.strip()):
        deltas, matched = _stream(tokenizer, ids, (stop,), include)
        cut = full.index(stop) + (len(stop) if include else 0)
        assert matched == stop
        assert "".join(deltas) == full[:cut], stop
        assert all("\ufffd" not in d for d in deltas)


def test_text_that_could_start_a_stop_is_held_then_released(tokenizer) -> None:
    text = "the café is open"
    ids = tokenizer.encode(text).ids
    deltas, matched = _stream(tokenizer, ids, ("café!",))
    assert matched is None and "".join(deltas) == text
    detok = IncrementalDetokenizer(tokenizer, [], ("café!",))
    released = ""
    for t in ids:
        detok.append(t)
        released += detok.take_text()
        assert not released.endswith(("c", "ca", "caf", "café")), released  # held back
    detok.finish()
    assert released + detok.take_text() == text


def test_earliest_completed_stop_wins_and_text_after_it_is_dropped(tokenizer) -> None:
    ids = tokenizer.encode("hello world the café is open").ids
    deltas, matched = _stream(tokenizer, ids, ("open", "the"))
    assert matched == "the" and "".join(deltas) == "hello world "
    deltas, matched = _stream(tokenizer, ids, ("nope", "zzz"))
    assert matched is None and "".join(deltas) == "hello world the café is open"


def test_min_tokens_defers_stop_matching(tokenizer) -> None:
    ids = tokenizer.encode("hello hello hello").ids
    deltas, matched = _stream(tokenizer, ids, ("hello",), min_tokens=len(ids))
    assert matched is None and "".join(deltas) == "hello hello hello"


def test_special_tokens_are_skipped(tokenizer) -> None:
    eos = tokenizer.token_to_id("<eos>")
    ids = tokenizer.encode("hello é").ids + [eos]
    deltas, _ = _stream(tokenizer, ids)
    assert "".join(deltas) == "hello é"


def test_prompt_context_does_not_leak_into_output(tokenizer) -> None:
    prompt = tokenizer.encode("日本 is").ids
    detok = IncrementalDetokenizer(tokenizer, prompt)
    for t in tokenizer.encode(" a country").ids:
        detok.append(t)
    detok.finish()
    assert detok.take_text() == " a country"


class _RefusingStream:
    """Stands in for a DecodeStream that refuses a token (tokenizers raises InvalidPrefix when a
    window's text does not extend its prefix, huggingface/tokenizers#1705)."""

    def step(self, tokenizer, token_id):
        raise Exception("InvalidPrefix")


@pytest.mark.parametrize("text", TEXTS)
def test_a_stream_that_refuses_a_token_is_restarted_without_losing_text(tokenizer, text) -> None:
    ids = tokenizer.encode(text).ids
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode(PROMPT).ids)
    deltas = []
    for i, t in enumerate(ids):
        if i == len(ids) // 2:
            detok._stream = _RefusingStream()  # one refusal mid-output
        assert detok.append(t) is None
        deltas.append(detok.take_text())
    detok.finish()
    deltas.append(detok.take_text())
    assert "".join(deltas) == text
