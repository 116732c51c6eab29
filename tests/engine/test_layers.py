"""The CPU-lean forms of RMSNorm and RoPE against the reference formulas, bit for bit in fp32."""

from __future__ import annotations

import torch

from tokenrelay_engines.torch.models.llama import RMSNorm, RotaryEmbedding, apply_rope
from tokenrelay_engines.torch.shapes import ModelConfig


def _config() -> ModelConfig:
    return ModelConfig(model_type="llama", vocab_size=64, hidden_size=96, intermediate_size=128,
                       num_hidden_layers=1, num_attention_heads=6, num_key_value_heads=2, head_dim=16,
                       max_position_embeddings=128)


def test_fused_rms_norm_is_bit_identical_to_the_reference_in_fp32() -> None:
    gen = torch.Generator().manual_seed(0)
    norm = RMSNorm(96, 1e-5)
    norm.weight.data = torch.randn(96, generator=gen)
    for rows in (1, 7, 33):
        x = torch.randn(rows, 96, generator=gen) * 4
        ref = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
        assert torch.equal(norm(x), ref)


def test_folded_sin_rope_is_bit_identical_to_rotate_half() -> None:
    cfg = _config()
    rotary = RotaryEmbedding(cfg, "cpu")
    positions = torch.tensor([0, 1, 5, 17, 127])
    cos, sin_folded = rotary(positions, torch.float32)
    freqs = positions.float()[:, None] * rotary.inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    sin = emb.sin()[:, None, :]
    assert torch.equal(sin_folded[..., cfg.head_dim // 2:], sin[..., cfg.head_dim // 2:])
    assert torch.equal(sin_folded[..., :cfg.head_dim // 2], -sin[..., :cfg.head_dim // 2])
    x = torch.randn(5, 8, cfg.head_dim, generator=torch.Generator().manual_seed(1))
    half = cfg.head_dim // 2
    ref = x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
    assert torch.equal(apply_rope(x, cos, sin_folded), ref)
