"""Block-quantized GGUF weights on the CPU (engines/torch/kernels/): the kernels against a numpy
model of the arithmetic they promise, blocks against gguf's own dequantization, and whole GGUF
models with `quantization="auto"` against the same files dequantized."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from tokenrelay_engines.config import SchedulerConfig, TorchEngineConfig  # noqa: E402
from tokenrelay_engines.torch.gguf_loader import unpermute_qk  # noqa: E402
from tokenrelay_engines.torch.models.llama import PackedLinear  # noqa: E402
from tokenrelay_engines.torch.kernels import native  # noqa: E402
from tokenrelay_engines.torch.kernels.blocks import BlockQuantEmbedding, BlockQuantLinear, BlockWeight  # noqa: E402
from tokenrelay_engines.torch.runner import ModelRunner  # noqa: E402

from .gguf_factory import tokenizer_json_of, write_gguf  # noqa: E402
from .model_factory import build_model_dir  # noqa: E402

KINDS = ("Q4_1", "Q8_0")


def _blocks(kind: str, rows: int, cols: int, seed: int = 0) -> tuple[BlockWeight, np.ndarray]:
    """Random weights quantized by gguf itself; returns the blocks and gguf's dequantized floats."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32) * 0.05
    qtype = gguf.GGMLQuantizationType[kind]
    raw = gguf.quants.quantize(w, qtype)
    return BlockWeight.from_gguf(kind, raw, rows), gguf.quants.dequantize(raw, qtype).astype(np.float32)


def _linear(weight: BlockWeight, kernels: native.CpuKernels, bias: torch.Tensor | None = None) -> BlockQuantLinear:
    return BlockQuantLinear(weight, kernels, bias=bias)


def _kernel(kernels: native.CpuKernels, weight: BlockWeight, x: torch.Tensor) -> torch.Tensor:
    """The C entry itself, as the layer calls it."""
    y = torch.empty(x.shape[0], weight.out_features)
    args = (weight.qs, weight.d) if weight.m is None else (weight.qs, weight.d, weight.m)
    status = kernels.linear_fn(weight.kind)(x.data_ptr(), x.shape[0], x.shape[1], *(t.data_ptr() for t in args),
                                            weight.out_features, y.data_ptr())
    assert status == 0
    return y


def _integer_reference(x: np.ndarray, weight: BlockWeight) -> np.ndarray:
    """The integer path's arithmetic in numpy: x to int16 per block of 32 (scale max|x|/32767, round half
    to even, in float32 as the kernel does), integer block dot products, scales applied per block."""
    m_rows, k = x.shape
    xb = x.reshape(m_rows, -1, 32)
    amax = np.abs(xb).max(-1)
    inv = np.where(amax > 0, np.float32(32767) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    xq = np.rint((xb * inv[..., None]).astype(np.float32)).astype(np.int64)
    dx = (amax / np.float32(32767)).astype(np.float64)
    n = weight.out_features
    d = weight.d.numpy().astype(np.float64)
    if weight.kind == "Q8_0":
        q = weight.qs.numpy().astype(np.int64).reshape(n, -1, 32)
    else:
        nib = weight.qs.numpy().reshape(n, -1, 16)
        q = np.concatenate((nib & 0x0F, nib >> 4), axis=-1).astype(np.int64)
    dots = np.einsum("rbj,nbj->rnb", xq, q).astype(np.float64)  # exact integers
    y = np.einsum("rnb,nb,rb->rn", dots, d, dx)
    if weight.kind == "Q4_1":
        sx = dx * xq.sum(-1)
        y += np.einsum("nb,rb->rn", weight.m.numpy().astype(np.float64), sx)
    return y


@pytest.mark.parametrize("kind", KINDS)
def test_blocks_dequantize_exactly_as_gguf_does(kind: str) -> None:
    weight, ref = _blocks(kind, 37, 96)
    assert torch.equal(weight.dequantize(), torch.from_numpy(ref))
    rows = torch.tensor([5, 0, 36, 5])
    assert torch.equal(weight.dequantize(rows), torch.from_numpy(ref[rows.numpy()]))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("m", "n", "k"), [(1, 1, 32), (1, 7, 96), (2, 64, 576), (3, 33, 64), (4, 16, 160),
                                           (5, 9, 32), (7, 3, 64), (8, 7, 64), (9, 1, 32), (11, 16, 96),
                                           (32, 33, 576), (63, 17, 96), (64, 5, 64), (65, 31, 96), (130, 8, 1536)])
def test_kernels_compute_the_promised_arithmetic(kernels, kind: str, m: int, n: int, k: int) -> None:
    """Rows of x under float_min_rows: the integer path's arithmetic; from there on: float32 products
    of the exactly dequantized weights (tiles of 4 rows x 2 columns, odd n and row tails included)."""
    weight, dense = _blocks(kind, n, k, seed=m * 1000 + n)
    x = torch.from_numpy(np.random.default_rng(k).standard_normal((m, k)).astype(np.float32))
    x[0, :32] = 0.0  # an all-zero block quantizes to zeros, not NaN
    y = _kernel(kernels, weight, x)
    bound = np.abs(x.numpy()) @ np.abs(dense).T  # the size of the sums: float rounding is relative to it
    exact = x.numpy().astype(np.float64) @ dense.T.astype(np.float64)
    assert y.shape == (m, n) and y.dtype == torch.float32
    if m < kernels.float_min_rows:
        ref = _integer_reference(x.numpy(), weight)
        assert np.all(np.abs(y.numpy() - ref) <= 1e-5 * bound + 1e-6), np.abs(y.numpy() - ref).max()
        # and as close to the float product as 16-bit activations allow
        assert np.all(np.abs(y.numpy() - exact) <= 1e-4 * bound + 1e-6), np.abs(y.numpy() - exact).max()
    else:  # float32 sums of k products: rounding well under 1e-6 of their size
        assert np.all(np.abs(y.numpy() - exact) <= 1e-6 * bound + 1e-7), np.abs(y.numpy() - exact).max()


@pytest.mark.parametrize("kind", KINDS)
def test_the_layer_is_the_kernel_at_every_row_count(kernels, kind: str) -> None:
    weight, _ = _blocks(kind, 40, 96)
    lin = _linear(weight, kernels)
    for rows in (1, kernels.float_min_rows - 1, kernels.float_min_rows, 64, 130):
        x = torch.randn(rows, 96)
        assert torch.equal(lin(x), _kernel(kernels, weight, x))


def test_activations_round_to_int16_per_block(kernels) -> None:
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32))
    xq = torch.empty(3, 64, dtype=torch.int16)
    dx, sx = torch.empty(3, 2), torch.empty(3, 2)
    kernels.quantize_q16(x, xq, dx, sx)
    xb = x.numpy().reshape(3, 2, 32)
    amax = np.abs(xb).max(-1)
    expect = np.rint(xb * (np.float32(32767) / amax)[..., None]).astype(np.int16).reshape(3, 64)
    assert np.array_equal(xq.numpy(), expect)
    assert np.abs(xq.numpy()).max() == 32767
    assert np.allclose(dx.numpy(), amax / 32767, rtol=1e-7)
    assert np.allclose(sx.numpy(), dx.numpy() * expect.reshape(3, 2, 32).sum(-1), rtol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_each_row_is_independent_of_the_batch(kernels, kind: str) -> None:
    """Within each kernel path a row's result is bit-identical whatever the other rows are: alone or
    in any batch under float_min_rows, and in any batch from there on (tails of 1-3 rows and chunks
    of 64 rows included)."""
    weight, _ = _blocks(kind, 51, 192)
    lin = _linear(weight, kernels)
    low = kernels.float_min_rows
    x = torch.randn(150, 192)
    few = lin(x[:low - 1])
    for r in range(low - 1):
        assert torch.equal(lin(x[r:r + 1]), few[r:r + 1])
    together = lin(x)
    for start, rows in ((0, low), (3, low + 1), (5, low + 2), (9, low + 3), (1, 63), (70, 66)):
        assert torch.equal(lin(x[start:start + rows]), together[start:start + rows])


def test_bias_other_dtypes_and_leading_dims(kernels) -> None:
    weight, dense = _blocks("Q4_1", 24, 64)
    bias = torch.randn(24)
    lin = _linear(weight, kernels, bias=bias)
    x = torch.randn(2, 3, 64)
    y = lin(x)
    assert y.shape == (2, 3, 24)
    assert torch.allclose(y - bias, _linear(weight, kernels)(x), atol=1e-6)
    yb = lin(x.to(torch.bfloat16))
    assert yb.dtype == torch.bfloat16
    assert torch.allclose(yb.float(), y, rtol=2e-2, atol=5e-2)
    assert lin(torch.empty(0, 64)).shape == (0, 24)


def test_rows_permute_and_concatenate_on_the_blocks() -> None:
    a, da = _blocks("Q4_1", 8, 64, seed=1)
    b, db = _blocks("Q4_1", 4, 64, seed=2)
    both = BlockWeight.cat([a, b])
    assert torch.equal(both.dequantize(), torch.from_numpy(np.concatenate([da, db])))
    order = unpermute_qk(np.arange(8), 2)
    assert torch.equal(a.permute_rows(torch.from_numpy(order)).dequantize(), torch.from_numpy(unpermute_qk(da, 2)))
    c, _ = _blocks("Q8_0", 4, 64)
    assert BlockWeight.cat([a, c]) is None  # different formats do not fuse


def test_unsupported_machines_and_missing_compilers_are_reported(monkeypatch, tmp_path: Path) -> None:
    assert "avx2" in native.unsupported_reason(flags={"sse2", "fma"})
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    if native.unsupported_reason() is None:
        pytest.fail("a missing compiler must be a reason")
    assert native.load_kernels() is None


# ---- whole models: tiny GGUF files (gguf_factory) with quantization "auto" vs "none" ----------------------

PROMPT = [1, 17, 33, 99, 200, 7, 8, 250, 3, 45, 61, *range(60, 97)]


def _runner(path: Path, quantization: str) -> ModelRunner:
    return ModelRunner(TorchEngineConfig(model=str(path), device="cpu", dtype="float32", quantization=quantization,
                                         scheduler=SchedulerConfig(block_size=4, num_blocks=64)))


def _prefill_logits(runner: ModelRunner, prompt: list[int]) -> torch.Tensor:
    """Logits at every prompt position: one prefill forward pass into KV blocks 0, 1, 2, ..."""
    from tokenrelay_engines.torch.attention import AttentionMetadata

    n, block = len(prompt), runner.block_size
    i64 = dict(dtype=torch.int64)
    meta = AttentionMetadata(
        positions=torch.arange(n, **i64), slot_mapping=torch.arange(n, **i64),
        block_tables=torch.arange((n + block - 1) // block, **i64)[None], context_lens=torch.tensor([n], **i64),
        cu_seqlens_q=torch.tensor([0, n], **i64), decode_seqs=torch.zeros(0, **i64), query_lens_host=[n],
        context_lens_host=[n], block_size=block)
    with torch.inference_mode():
        hidden = runner.model(torch.tensor(prompt), meta.positions, runner.kv_cache.kv, meta, runner.attention)
        return runner.model.compute_logits(hidden)


@pytest.mark.parametrize(("variant", "qtype"), [("llama", "Q4_1"), ("qwen2", "Q8_0"), ("tied", "Q8_0")])
def test_gguf_models_keep_their_blocks_and_stay_close_to_dequantized(kernels, tmp_path: Path, variant: str,
                                                                     qtype: str) -> None:
    model_dir = tmp_path / f"hf-{variant}"
    hf = build_model_dir(model_dir, variant)
    path = write_gguf(tmp_path / f"{variant}-{qtype}.gguf", hf, variant, qtype, tokenizer_json_of(model_dir))
    fast, exact = _runner(path, "auto"), _runner(path, "none")
    model = fast.model
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, BlockQuantLinear) and layer.self_attn.qkv_proj.kind == qtype
    assert isinstance(layer.mlp.gate_up_proj, BlockQuantLinear) and isinstance(layer.mlp.down_proj, BlockQuantLinear)
    assert isinstance(model.model.embed_tokens, BlockQuantEmbedding)
    assert isinstance(model.lm_head, BlockQuantLinear)
    if variant == "tied":  # the output layer reads the embedding's blocks, no copy
        assert model.lm_head.qs.data_ptr() == model.model.embed_tokens.qs.data_ptr()
    assert isinstance(exact.model.model.layers[0].self_attn.qkv_proj, PackedLinear)
    got, ref = _prefill_logits(fast, PROMPT), _prefill_logits(exact, PROMPT)
    assert torch.isfinite(got).all()
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 1e-3, rel
    assert rel > 0.0  # the activations really went through 16-bit integers


def test_without_kernels_a_gguf_model_falls_back_to_float_weights(monkeypatch, tmp_path: Path) -> None:
    model_dir = tmp_path / "hf-llama"
    hf = build_model_dir(model_dir, "llama")
    path = write_gguf(tmp_path / "llama-Q4_1.gguf", hf, "llama", "Q4_1", tokenizer_json_of(model_dir))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_cache_dirs", lambda: [tmp_path / "cache"])
    runner = _runner(path, "auto")
    assert isinstance(runner.model.model.layers[0].self_attn.qkv_proj, PackedLinear)
    assert torch.equal(_prefill_logits(runner, PROMPT), _prefill_logits(_runner(path, "none"), PROMPT))
