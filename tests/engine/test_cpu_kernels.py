"""The CPU C kernels for RMSNorm and decode attention (engines/torch/kernels/ops.c) against the
torch operators they replace, and a whole model stepped with and without them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenrelay_engines.torch.attention import CpuKernelAttention, TorchAttention

from .attention_batches import make_batch


@pytest.mark.parametrize(("rows", "hidden"), [(1, 8), (3, 576), (70, 64), (300, 2048)])
def test_rms_norm_and_the_fused_residual_add(kernels, rows: int, hidden: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    x, r, w = torch.randn(rows, hidden, generator=gen) * 3, torch.randn(rows, hidden, generator=gen), torch.rand(hidden)
    want = F.rms_norm(x, (hidden,), w, 1e-5)
    assert torch.allclose(kernels.rms_norm(x, w, 1e-5), want, rtol=1e-5, atol=1e-6)
    stream = x.clone()
    got = kernels.rms_norm(stream, w, 1e-5, residual=r)
    assert torch.equal(stream, x + r)  # the residual stream is updated in place, exactly
    assert torch.allclose(got, F.rms_norm(x + r, (hidden,), w, 1e-5), rtol=1e-5, atol=1e-6)


def check(kernels, seqs, *, block_size=16, heads=4, kv_heads=2, head_dim=32, seed=0) -> None:
    query, kv, meta = make_batch(seqs, block_size=block_size, heads=heads, kv_heads=kv_heads,
                                 head_dim=head_dim, seed=seed)
    scale = head_dim ** -0.5
    want = TorchAttention().attend(query, kv, meta, scale)
    got = CpuKernelAttention(kernels).attend(query, kv, meta, scale)
    assert got.shape == want.shape and got.dtype == want.dtype
    err = (got - want).abs().max().item()
    assert err < 1e-5, f"max abs error {err} for {seqs}"


@pytest.mark.parametrize("ctxs", [[1, 15, 16, 17], [31, 32, 33, 48], [5, 64, 7, 2], [1000, 9]])
def test_paged_attention_at_block_boundaries(kernels, ctxs) -> None:
    check(kernels, [(1, c) for c in ctxs], seed=sum(ctxs))


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(9, 3, 64), (8, 8, 16), (4, 1, 128)])
def test_paged_attention_with_grouped_query_heads(kernels, heads: int, kv_heads: int, head_dim: int) -> None:
    check(kernels, [(1, 40), (1, 3), (1, 129)], heads=heads, kv_heads=kv_heads, head_dim=head_dim, seed=heads)


def test_decode_rows_mixed_with_prefill_chunks(kernels) -> None:
    check(kernels, [(5, 20), (1, 17), (12, 12), (1, 1), (3, 40)], block_size=4, seed=7)


def test_softmax_is_stable_for_large_scores(kernels) -> None:
    query, kv, meta = make_batch([(1, 50), (1, 7)], block_size=8, heads=2, kv_heads=1, head_dim=16, seed=1)
    query *= 300  # scores of thousands: e^x would overflow without the max subtracted
    want = TorchAttention().attend(query, kv, meta, 0.25)
    got = CpuKernelAttention(kernels).attend(query, kv, meta, 0.25)
    assert torch.isfinite(got).all()
    assert (got - want).abs().max().item() < 1e-4


@pytest.mark.parametrize(("rows", "inter"), [(1, 8), (5, 1536), (64, 256)])
def test_silu_mul_of_the_fused_gate_up_projection(kernels, rows: int, inter: int) -> None:
    gate_up = torch.randn(rows, 2 * inter, generator=torch.Generator().manual_seed(inter)) * 8
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # saturated and zero gates
    gate, up = gate_up.chunk(2, dim=-1)
    got = kernels.silu_mul(gate_up)
    assert torch.isfinite(got).all()
    assert torch.allclose(got, F.silu(gate) * up, rtol=1e-5, atol=1e-6)


def test_rope_and_kv_store_match_the_torch_path(kernels) -> None:
    from tokenrelay_engines.torch.models.llama import RotaryEmbedding, apply_rope
    from tokenrelay_engines.torch.shapes import ModelConfig

    heads, kv_heads, dim, blocks, block_size = 4, 2, 32, 6, 4
    config = ModelConfig(model_type="llama", vocab_size=16, hidden_size=heads * dim, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=dim, max_position_embeddings=64)
    positions = torch.tensor([0, 5, 17, 3])
    cos, sin = RotaryEmbedding(config, "cpu")(positions, torch.float32)
    qkv = torch.randn(4, (heads + 2 * kv_heads) * dim)
    slots = torch.tensor([2, 9, 23, 0])
    got_cache = torch.zeros(2, blocks, block_size, kv_heads, dim)
    q = kernels.rope_store_kv(qkv, heads, kv_heads, cos, sin, slots, got_cache)
    qw, kw, vw = qkv.split((heads * dim, kv_heads * dim, kv_heads * dim), dim=-1)
    assert torch.equal(q, apply_rope(qw.reshape(4, heads, dim), cos, sin))  # same operations, same floats
    want_cache = torch.zeros_like(got_cache)
    flat = want_cache.view(2, blocks * block_size, kv_heads, dim)
    flat[0, slots] = apply_rope(kw.reshape(4, kv_heads, dim), cos, sin)
    flat[1, slots] = vw.reshape(4, kv_heads, dim)
    assert torch.equal(got_cache, want_cache)


def test_a_model_steps_the_same_with_and_without_the_kernels(kernels, tmp_path) -> None:
    from tokenrelay_engines.base import SamplingParams
    from tokenrelay_engines.config import SchedulerConfig, TorchEngineConfig
    from tokenrelay_engines.torch.runner import ModelRunner

    from .driver import make_seq, run_to_completion
    from .model_factory import build_model_dir

    build_model_dir(tmp_path / "tiny", "llama")
    prompts = [[1, 17, 33, 99, 200, 7, 8], [1, *range(60, 97)], [1, 300]]

    def run(cpu_kernels: bool) -> tuple[ModelRunner, list[list[tuple[int, float]]]]:
        runner = ModelRunner(TorchEngineConfig(model=str(tmp_path / "tiny"), device="cpu", dtype="float32",
                                               cpu_kernels=cpu_kernels,
                                               scheduler=SchedulerConfig(block_size=4, num_blocks=96)))
        seqs = [make_seq(f"r{i}", p, SamplingParams(temperature=0.0, logprobs=1), max_tokens=12)
                for i, p in enumerate(prompts)]
        out = run_to_completion(runner, seqs, chunk_size=5)
        return runner, [out[f"r{i}"] for i in range(len(prompts))]

    fast, with_kernels = run(True)
    slow, without = run(False)
    assert isinstance(fast.attention, CpuKernelAttention) and not isinstance(slow.attention, CpuKernelAttention)
    assert fast.model.model.layers[0].self_attn.kernels is not None  # the fused rope + cache write ran
    assert slow.model.model.layers[0].self_attn.kernels is None
    for a, b in zip(with_kernels, without):
        assert [t for t, _ in a] == [t for t, _ in b]
        assert all(abs(x.logprob - y.logprob) < 1e-4 for (_, x), (_, y) in zip(a, b))
