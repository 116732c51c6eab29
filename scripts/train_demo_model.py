"""Train tokenrelay's embedded demo model: a tiny Llama that adds integers 0..999.

The model answers prompts like "123+456=" with "579" then <eos>. It is a standard Hugging Face
Llama directory (LlamaForCausalLM, safetensors, a character-level tokenizer.json) so any Llama
loader can serve it; `tokenrelay serve --model demo` serves it.

Training is a plain, seeded, CPU-deterministic torch loop: the loss covers only the answer tokens
(digits and <eos>). At the end the model is checked greedily on every one of the 1,000,000 pairs
with a batched teacher-forced forward (with a causal model, every answer position's argmax being
right is exactly "greedy generation produces the right answer").

    python scripts/train_demo_model.py --out engines/torch/demo_model
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, processors
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
CHARS = "0123456789+="
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
MAX_OPERAND = 999
# <bos> + 3 digits + "+" + 3 digits + "=" + 4 digits + <eos>
MAX_LEN = 1 + 3 + 1 + 3 + 1 + 4 + 1
EDGE_CASES = [(0, 0), (999, 999), (1, 99), (500, 500), (999, 1), (1, 999), (0, 999), (999, 0),
              (9, 991), (99, 901), (5, 5), (50, 50), (10, 90), (0, 1), (1, 0), (123, 456)]


@dataclass(slots=True, frozen=True)
class TrainConfig:
    out: Path
    steps: int = 7500
    seed: int = 0
    batch_size: int = 128
    lr: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 3
    num_heads: int = 4
    num_kv_heads: int = 4
    eval_every: int = 250
    eval_sample: int = 2000  # per distribution (uniform, digit-count balanced), during training
    final_eval: int = 100_000  # greedy check at the end: that many random pairs; 0: all 1,000,000
    threads: int = 1  # a shared 2-core machine: one thread is faster than two fighting
    uniform_fraction: float = 0.35  # operands uniform over 0..999; the rest digit-count balanced
    carry_fraction: float = 0.2  # problems pushed towards a carry into the thousands

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.warmup_steps < 0:
            raise ValueError("steps and batch_size must be positive, warmup_steps >= 0")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("hidden_size must divide by num_heads, num_heads by num_kv_heads")
        if not (0 <= self.uniform_fraction <= 1 and 0 <= self.carry_fraction <= 1):
            raise ValueError("uniform_fraction and carry_fraction must be in [0, 1]")


def build_tokenizer() -> Tokenizer:
    """Character level: one token per digit, '+' and '='; <bos> prepended by the post-processor."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: len(SPECIAL_TOKENS) + i for i, ch in enumerate(CHARS)})
    # A BPE model without merges and without a pre-tokenizer splits text into single characters;
    # any character outside the alphabet becomes <unk> (one per character) instead of an error.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", BOS_ID)])
    tok.decoder = decoders.Fuse()  # join characters without spaces
    return tok


def char_ids(tok: Tokenizer) -> dict[str, int]:
    return {ch: tok.token_to_id(ch) for ch in CHARS}


def encode_batch(pairs: list[tuple[int, int]], ids: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and labels (answer digits and <eos> only; -100 elsewhere)."""
    input_ids = torch.full((len(pairs), MAX_LEN), PAD_ID, dtype=torch.long)
    labels = torch.full((len(pairs), MAX_LEN), -100, dtype=torch.long)
    for row, (a, b) in enumerate(pairs):
        prompt = [BOS_ID] + [ids[c] for c in f"{a}+{b}="]
        answer = [ids[c] for c in str(a + b)] + [EOS_ID]
        seq = prompt + answer
        input_ids[row, : len(seq)] = torch.tensor(seq)
        # labels[t] is the token predicted at position t (i.e. the token at t + 1)
        labels[row, len(prompt) - 1 : len(seq) - 1] = torch.tensor(answer)
    return input_ids, labels


def sample_pair(rng: random.Random, cfg: TrainConfig) -> tuple[int, int]:
    """A training problem. A `carry_fraction` are pushed towards a carry into the thousands with
    operands of mixed length (977+69): rare under uniform sampling, and the last cases learnt."""
    a, b = sample_operand(rng, cfg.uniform_fraction), sample_operand(rng, cfg.uniform_fraction)
    if rng.random() < cfg.carry_fraction:
        a = rng.randint(max(0, 950 - b), MAX_OPERAND)
        if rng.random() < 0.5:
            a, b = b, a
    return a, b


def sample_operand(rng: random.Random, uniform_fraction: float) -> int:
    """Uniform over 0..999, or (the rest) with the digit count drawn uniformly: short numbers matter."""
    if rng.random() < uniform_fraction:
        return rng.randint(0, MAX_OPERAND)
    digits = rng.randint(1, 3)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def build_model(cfg: TrainConfig) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(SPECIAL_TOKENS) + len(CHARS),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.hidden_size // cfg.num_heads,
        hidden_act="silu",
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    # eager attention is the fastest on CPU at these sizes; same math as sdpa
    return LlamaForCausalLM._from_config(config, attn_implementation="eager")


@torch.no_grad()
def evaluate(model: LlamaForCausalLM, pairs: list[tuple[int, int]], ids: dict[str, int],
             batch_size: int = 4096) -> tuple[float, list[tuple[int, int]]]:
    """Greedy exact-match accuracy via teacher forcing; returns (accuracy, failing pairs)."""
    model.eval()
    failures: list[tuple[int, int]] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        input_ids, labels = encode_batch(chunk, ids)
        pred = model(input_ids=input_ids).logits.argmax(-1)
        wrong = ((pred != labels) & (labels != -100)).any(dim=1)
        failures.extend(chunk[i] for i in wrong.nonzero().flatten().tolist())
    model.train()
    return 1.0 - len(failures) / len(pairs), failures


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def train(cfg: TrainConfig) -> None:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(True)
    rng = random.Random(cfg.seed)
    tok = build_tokenizer()
    ids = char_ids(tok)
    model = build_model(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters ({n_params * 4 / 2**20:.2f} MiB float32)", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.98))
    eval_rng = random.Random(cfg.seed + 1)
    eval_pairs = [(eval_rng.randint(0, MAX_OPERAND), eval_rng.randint(0, MAX_OPERAND))
                  for _ in range(cfg.eval_sample)]
    eval_pairs += [(sample_operand(eval_rng, cfg.uniform_fraction), sample_operand(eval_rng, cfg.uniform_fraction))
                   for _ in range(cfg.eval_sample)]
    model.train()
    t0 = time.monotonic()
    running = 0.0
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        pairs = [sample_pair(rng, cfg) for _ in range(cfg.batch_size)]
        input_ids, labels = encode_batch(pairs, ids)
        logits = model(input_ids=input_ids).logits
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1),
                                                 ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running = loss.item() if step == 0 else 0.98 * running + 0.02 * loss.item()
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            acc, _ = evaluate(model, eval_pairs, ids)
            print(f"step {step + 1:6d}  loss {running:.5f}  lr {lr_at(step, cfg):.2e}  "
                  f"sample acc {acc:.4%}  {time.monotonic() - t0:.0f}s", flush=True)
    if cfg.final_eval:
        final_rng = random.Random(cfg.seed + 2)
        all_pairs = [(final_rng.randint(0, MAX_OPERAND), final_rng.randint(0, MAX_OPERAND))
                     for _ in range(cfg.final_eval)]
        all_pairs += [(sample_operand(final_rng, cfg.uniform_fraction),
                       sample_operand(final_rng, cfg.uniform_fraction)) for _ in range(cfg.final_eval // 5)]
        all_pairs += EDGE_CASES
    else:
        all_pairs = [(a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]
    acc, failures = evaluate(model, all_pairs, ids)
    print(f"final greedy accuracy on all {len(all_pairs):,} pairs: {acc:.6%} "
          f"({len(failures)} wrong){' e.g. ' + str(failures[:10]) if failures else ''}", flush=True)
    save(model, tok, cfg, acc, len(failures), len(all_pairs))


README = """# tokenrelay demo model

The model `tokenrelay serve --model demo` serves: a tiny Llama that adds two integers.
Prompt `123+456=` and it answers `579` followed by `<eos>` (greedy decoding). Operands are
0..999 written without leading zeros; the answer is in normal digit order.

It is a standard Hugging Face Llama directory: `LlamaForCausalLM` ({params:,} parameters,
{layers} layers, hidden {hidden}, {heads} heads, MLP {inter}, RoPE, RMSNorm, SiLU), float32
safetensors, and a character-level `tokenizer.json` (`<pad>`=0, `<bos>`=1, `<eos>`=2, `<unk>`=3,
then `0`-`9`, `+`, `=`; `<bos>` is prepended by the post-processor). Load it with
`transformers.AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`, or with
tokenrelay's own runner. Anything outside its task (other text, sampling at high temperature)
gives arbitrary digits: it is a demo and a test fixture, not a language model.

## How it was made

    python scripts/train_demo_model.py --out engines/torch/demo_model --steps {steps} --seed {seed} --final-eval {final_eval} \\
        --uniform-fraction {uniform_fraction} --carry-fraction {carry_fraction}

A plain, seeded torch loop on CPU ({threads} thread): {steps} AdamW steps of {batch} random
problems (operands uniform over 0..999 with probability {uniform_fraction}, else with the digit count
drawn uniformly; a fraction {carry_fraction} pushed towards a carry into the thousands), learning rate
{lr} with warm-up and cosine decay, cross-entropy on the answer digits and `<eos>` only.

## Measured accuracy

Greedy exact match (answer digits and `<eos>`, token for token), checked with a batched
teacher-forced forward, which for a causal model equals greedy generation:
**{acc:.4%}** on {n_total:,} {sample} ({n_wrong} wrong).
"""


def save(model: LlamaForCausalLM, tok: Tokenizer, cfg: TrainConfig, acc: float,
         n_wrong: int, n_total: int) -> None:
    cfg.out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, do_sample=False,
        max_new_tokens=8)
    model.save_pretrained(cfg.out, safe_serialization=True)
    # Also spell rope_theta at the top level, as Llama loaders that predate rope_parameters read it.
    config_path = cfg.out / "config.json"
    config = json.loads(config_path.read_text())
    config.setdefault("rope_theta", config.get("rope_parameters", {}).get("rope_theta", 10000.0))
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tok.save(str(cfg.out / "tokenizer.json"))
    (cfg.out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
        "model_max_length": 64, "clean_up_tokenization_spaces": False,
    }, indent=2) + "\n")
    (cfg.out / "README.md").write_text(README.format(
        params=sum(p.numel() for p in model.parameters()), layers=cfg.num_layers,
        hidden=cfg.hidden_size, heads=cfg.num_heads, inter=cfg.intermediate_size, steps=cfg.steps,
        batch=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, threads=cfg.threads,
        examples=cfg.steps * cfg.batch_size, n_total=n_total, n_wrong=n_wrong, acc=acc,
        sample="all pairs" if not cfg.final_eval else "random pairs (uniform, digit-count balanced and edge cases)",
        final_eval=cfg.final_eval, uniform_fraction=cfg.uniform_fraction,
        carry_fraction=cfg.carry_fraction))
    print(f"saved to {cfg.out}", flush=True)


def main() -> None:
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "engines/torch/demo_model")
    p.add_argument("--steps", type=int, default=defaults["steps"])
    p.add_argument("--seed", type=int, default=defaults["seed"])
    p.add_argument("--batch-size", type=int, default=defaults["batch_size"])
    p.add_argument("--lr", type=float, default=defaults["lr"])
    p.add_argument("--eval-every", type=int, default=defaults["eval_every"])
    p.add_argument("--final-eval", type=int, default=defaults["final_eval"],
                   help="random pairs checked at the end; 0 checks all 1,000,000")
    p.add_argument("--threads", type=int, default=defaults["threads"])
    p.add_argument("--uniform-fraction", type=float, default=defaults["uniform_fraction"])
    p.add_argument("--carry-fraction", type=float, default=defaults["carry_fraction"])
    a = p.parse_args()
    train(TrainConfig(out=a.out, steps=a.steps, seed=a.seed, batch_size=a.batch_size, lr=a.lr,
                      eval_every=a.eval_every, final_eval=a.final_eval, threads=a.threads,
                      uniform_fraction=a.uniform_fraction, carry_fraction=a.carry_fraction))


if __name__ == "__main__":
    main()
