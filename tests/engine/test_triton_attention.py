"""The Triton paged-attention kernels against TorchAttention (fp32, within 1e-3).

On CPU they run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before triton
is imported); on a GPU the same tests run on CUDA. Block tables are random permutations of the
pool; batches mix prefill chunks (with and without cached prefixes) and decode tokens; contexts
sit on, just before and just after block boundaries, and past one decode partition.
"""

from __future__ import annotations


import pytest
import torch

pytest.importorskip("triton")

from tokenrelay_engines.torch.attention import TorchAttention  # noqa: E402
from tokenrelay_engines.torch.triton_attention import PARTITION, TritonAttention  # noqa: E402

from .attention_batches import make_batch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = 1e-3


def check(seqs, *, block_size=16, heads=4, kv_heads=2, head_dim=32, seed=0, backend=None) -> None:
    query, kv, meta = make_batch(seqs, block_size=block_size, heads=heads, kv_heads=kv_heads,
                                 head_dim=head_dim, seed=seed, device=DEVICE)
    scale = head_dim ** -0.5
    want = TorchAttention().attend(query, kv, meta, scale)
    got = (backend or TritonAttention()).attend(query, kv, meta, scale)
    assert got.shape == want.shape and got.dtype == want.dtype
    err = (got - want).abs().max().item()
    assert err < ATOL, f"max abs error {err} for {seqs}"


@pytest.mark.parametrize("ctxs", [[1, 15, 16, 17], [31, 32, 33, 48], [5, 64, 7, 2]])
def test_decode_at_block_boundaries(ctxs) -> None:
    check([(1, c) for c in ctxs], seed=sum(ctxs))


def test_decode_across_partitions_and_gqa_groups() -> None:
    check([(1, PARTITION), (1, PARTITION + 1), (1, 2 * PARTITION + 17), (1, 3)],
          heads=8, kv_heads=2, head_dim=16, seed=3)


def test_decode_with_a_fixed_partition_count_for_cuda_graphs() -> None:
    check([(1, 40), (1, 3)], head_dim=16, seed=4, backend=TritonAttention(max_context_len=3 * PARTITION))


def test_mha_and_a_head_dim_that_is_not_a_power_of_two() -> None:
    check([(1, 20), (6, 20), (1, 9)], heads=3, kv_heads=3, head_dim=24, block_size=8, seed=5)


@pytest.mark.parametrize("seed", [0, 1])
def test_mixed_prefill_and_decode_batch(seed) -> None:
    # a whole prompt, a chunk after a cached prefix, decode tokens, a chunk ending on a block boundary
    check([(20, 20), (1, 33), (9, 41), (1, 16), (17, 32), (16, 16)], block_size=16, seed=seed)


def test_prefill_only_with_long_chunks_and_small_blocks() -> None:
    check([(37, 37), (40, 70)], block_size=4, heads=2, kv_heads=1, head_dim=16, seed=7)


def test_runner_with_triton_attention_matches_transformers(tiny_models) -> None:
    """The whole runner on the Triton backend: chunked prefill + batched decode, greedy tokens exact."""
    from tokenrelay_engines.torch.runner import ModelRunner

    from .driver import make_seq, run_to_completion
    from .helpers import reference_greedy, runner_config

    runner = ModelRunner(runner_config(tiny_models.path("llama"), block_size=4), attention=TritonAttention())
    prompts = {"a": [1, 4, 5, 6, 7, 8, 9], "b": [1, 10, 11]}
    got = run_to_completion(runner, [make_seq(k, p, max_tokens=4) for k, p in prompts.items()], chunk_size=3)
    for key, prompt in prompts.items():
        assert [t for t, _ in got[key]] == reference_greedy(tiny_models.reference("llama"), prompt, 4), key
