"""The embedded demo model: a standard HF Llama directory that adds integers 0..999 exactly.

Loads the committed files with transformers and tokenizers (no tokenrelay code involved), so a
broken or retrained model directory fails here before it fails in the server tests.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer  # noqa: E402

import tokenrelay_engines  # noqa: E402

DEMO_DIR = Path(tokenrelay_engines.__file__).resolve().parent / "torch" / "demo_model"
EDGE_CASES = [(0, 0), (999, 999), (1, 99), (500, 500), (999, 1), (1, 999), (0, 7), (9, 1)]
PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"


def _random_pairs(n: int, seed: int = 1234) -> list[tuple[int, int]]:
    """Half uniform over 0..999, half with digit counts drawn uniformly (short operands too)."""
    rng = random.Random(seed)
    pairs = [(rng.randint(0, 999), rng.randint(0, 999)) for _ in range(n // 2)]
    for _ in range(n - n // 2):
        a, b = (rng.randint(0 if d == 1 else 10 ** (d - 1), 10**d - 1)
                for d in (rng.randint(1, 3), rng.randint(1, 3)))
        pairs.append((a, b))
    return pairs


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(DEMO_DIR / "tokenizer.json"))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_pretrained(DEMO_DIR, dtype=torch.float32)
    return m.eval()


def test_directory_is_a_small_standard_llama() -> None:
    config = json.loads((DEMO_DIR / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 0)
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "README.md"):
        assert (DEMO_DIR / name).is_file(), name
    assert (DEMO_DIR / "model.safetensors").stat().st_size < 10 * 2**20


def test_tokenizer_special_ids_match_config(tokenizer: Tokenizer) -> None:
    config = json.loads((DEMO_DIR / "config.json").read_text())
    assert tokenizer.token_to_id(PAD) == config["pad_token_id"]
    assert tokenizer.token_to_id(BOS) == config["bos_token_id"]
    assert tokenizer.token_to_id(EOS) == config["eos_token_id"]
    assert tokenizer.get_vocab_size() <= config["vocab_size"]


@pytest.mark.parametrize("text", ["123+456=", "0+0=", "999+999=1998", "7", "+=", ""])
def test_tokenizer_round_trip(tokenizer: Tokenizer, text: str) -> None:
    enc = tokenizer.encode(text)
    assert enc.ids[0] == tokenizer.token_to_id(BOS)
    assert len(enc.ids) == len(text) + 1  # one token per character
    assert tokenizer.decode(enc.ids, skip_special_tokens=True) == text
    assert tokenizer.decode(enc.ids, skip_special_tokens=False).startswith(BOS)


def test_tokenizer_maps_foreign_characters_to_unk_instead_of_failing(tokenizer: Tokenizer) -> None:
    enc = tokenizer.encode("1 + x")
    assert len(enc.ids) == 6
    assert tokenizer.token_to_id("<unk>") in enc.ids


def test_transformers_tokenizer_loads(tokenizer: Tokenizer) -> None:
    fast = transformers.AutoTokenizer.from_pretrained(DEMO_DIR)
    assert fast("123+456=")["input_ids"] == tokenizer.encode("123+456=").ids
    assert fast.eos_token == EOS and fast.pad_token == PAD and fast.bos_token == BOS


def _greedy_answers(model, tokenizer: Tokenizer, pairs: list[tuple[int, int]]) -> list[list[int]]:
    """Batched greedy generation (left padded), returning the new token ids of each row."""
    prompts = [tokenizer.encode(f"{a}+{b}=").ids for a, b in pairs]
    width = max(map(len, prompts))
    pad_id = tokenizer.token_to_id(PAD)
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                             max_new_tokens=6, pad_token_id=pad_id,
                             eos_token_id=tokenizer.token_to_id(EOS))
    return [row[width:].tolist() for row in out]


def test_greedy_generation_adds_correctly_token_for_token(model, tokenizer: Tokenizer) -> None:
    pairs = _random_pairs(50) + EDGE_CASES
    eos, pad = tokenizer.token_to_id(EOS), tokenizer.token_to_id(PAD)
    wrong = []
    for (a, b), new_ids in zip(pairs, _greedy_answers(model, tokenizer, pairs)):
        expected = tokenizer.encode(str(a + b), add_special_tokens=False).ids + [eos]
        got = new_ids[: len(expected)]
        if got != expected or any(t != pad for t in new_ids[len(expected):]):
            wrong.append((f"{a}+{b}=", tokenizer.decode(new_ids, skip_special_tokens=False)))
    assert not wrong, f"{len(wrong)} wrong answers: {wrong[:10]}"


def test_unpadded_generation_matches_the_documented_example(model, tokenizer: Tokenizer) -> None:
    ids = torch.tensor([tokenizer.encode("123+456=").ids])
    with torch.no_grad():
        out = model.generate(input_ids=ids, do_sample=False, max_new_tokens=6)
    new = out[0, ids.shape[1]:].tolist()
    assert new[-1] == tokenizer.token_to_id(EOS)
    assert tokenizer.decode(new, skip_special_tokens=True) == "579"
