"""The model runner: one step's SchedulerOutput -> flattened batch -> model -> sampled tokens.

Host side builds every index tensor of the step (input ids, positions, slot mapping, block
tables, sampling parameters) into ONE byte buffer, copied to the device once; the sampled ids
and logprobs come back in ONE tensor. The runner keeps no per-request state: the KV pool is
its only state across steps.
"""

from __future__ import annotations

import numpy as np
import torch
from tokenizers import Tokenizer

from tokenrelay_engines.base import InvalidRequest, ModelInfo, TokenLogprob
from tokenrelay_engines.config import TorchEngineConfig
from tokenrelay_engines.scheduler.sequence import RunnerOutput, ScheduledChunk, SchedulerOutput
from tokenrelay_engines.torch.attention import AttentionBackend, AttentionMetadata
from tokenrelay_engines.torch.backends import default_attention, resolve_device
from tokenrelay_engines.torch.cpu import configure_threads, cpu_has_native_bf16
from tokenrelay_engines.torch.kv_cache import KVCache, size_num_blocks
from tokenrelay_engines.torch.loader import load_model, resolve_dtype
from tokenrelay_engines.torch.sampler import Sampler, SamplingBatch, step_seed


_TORCH_DTYPES = {np.dtype(np.int64): torch.int64, np.dtype(np.float32): torch.float32}


class _HostPack:
    """Arrays appended on the host, shipped to the device as one buffer, then viewed back."""

    _ALIGN = 8

    def __init__(self) -> None:
        self._parts: list[np.ndarray] = []
        self._layout: list[tuple[int, int, np.dtype, tuple[int, ...]]] = []
        self._nbytes = 0

    def add(self, values, dtype) -> int:
        arr = np.ascontiguousarray(np.asarray(values, dtype=dtype))
        pad = (-self._nbytes) % self._ALIGN
        if pad:
            self._parts.append(np.zeros(pad, dtype=np.uint8))
            self._nbytes += pad
        self._layout.append((self._nbytes, arr.nbytes, arr.dtype, arr.shape))
        self._parts.append(arr.reshape(-1).view(np.uint8))
        self._nbytes += arr.nbytes
        return len(self._layout) - 1

    def to(self, device: torch.device) -> list[torch.Tensor]:
        host = torch.from_numpy(np.concatenate(self._parts) if self._parts else np.zeros(0, np.uint8))
        if device.type == "cuda":
            host = host.pin_memory()
        buf = host.to(device, non_blocking=True)
        out = []
        for offset, nbytes, dtype, shape in self._layout:
            out.append(buf[offset:offset + nbytes].view(_TORCH_DTYPES[dtype]).view(shape))
        return out


class ModelRunner:
    def __init__(self, config: TorchEngineConfig, attention: AttentionBackend | None = None) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        dtype = config.dtype
        if self.device.type == "cpu":
            self.num_threads = configure_threads(config.num_threads)
            if dtype == "auto" and cpu_has_native_bf16():
                dtype = "bfloat16"  # AMX / AVX-512 BF16: bf16 matmuls beat fp32 here
        self.dtype = resolve_dtype(dtype, self.device)
        with torch.inference_mode():
            loaded = load_model(config, self.device, self.dtype)
            loaded.model.fuse_projections(packed=self.device.type == "cpu")
        self.model = loaded.model
        self.model_config = loaded.config
        self.tokenizer: Tokenizer = loaded.tokenizer
        self.block_size = config.scheduler.block_size
        self.num_blocks = size_num_blocks(self.model_config, self.block_size, self.dtype, self.device,
                                          config.kv_cache_memory_fraction, config.scheduler.num_blocks)
        self.kv_cache = KVCache(self.model_config, self.num_blocks, self.block_size, self.device, self.dtype)
        self.attention: AttentionBackend = attention or default_attention(self.device)
        self.sampler = Sampler(self.device)
        context = self.model_config.context_length
        if config.scheduler.max_model_len:
            context = min(context, config.scheduler.max_model_len)
        self.model_info = ModelInfo(name=loaded.name, context_length=context,
                                    vocab_size=self.model_config.vocab_size,
                                    eos_token_ids=loaded.eos_token_ids, engine="torch",
                                    chat_template=loaded.chat_template,
                                    special_tokens=tuple(sorted(loaded.special_tokens.items())))
        self.cuda_graphs = None  # CUDA-graph hook: engines/torch/cuda_graphs.py
        if config.cuda_graphs and self.device.type == "cuda" and attention is None:
            from tokenrelay_engines.torch.cuda_graphs import DecodeGraphs
            self.cuda_graphs = DecodeGraphs(self.model, self.kv_cache.kv, max_batch=config.scheduler.max_num_seqs,
                                            max_context_len=context, block_size=self.block_size,
                                            hidden_size=self.model_config.hidden_size, device=self.device,
                                            dtype=self.dtype)
            self.cuda_graphs.capture()

    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        chunks = scheduler_output.chunks
        if not chunks:
            return RunnerOutput()
        pack = _HostPack()
        idx = self._prepare_inputs(chunks, pack)
        sample_chunks = [c for c in chunks if c.sample]
        sidx = self._prepare_sampling(sample_chunks, pack) if sample_chunks else None
        dev = pack.to(self.device)  # the step's single host -> device copy
        meta = AttentionMetadata(
            positions=dev[idx["positions"]], slot_mapping=dev[idx["slots"]], block_tables=dev[idx["tables"]],
            context_lens=dev[idx["ctx"]], cu_seqlens_q=dev[idx["cu"]], decode_seqs=dev[idx["decode"]],
            query_lens_host=[c.num_new_tokens for c in chunks], context_lens_host=[c.end for c in chunks],
            block_size=self.block_size)
        if self.cuda_graphs is not None and self.cuda_graphs.can_run(meta):
            hidden = self.cuda_graphs.run(dev[idx["input_ids"]], meta)
        else:
            hidden = self.model(dev[idx["input_ids"]], meta.positions, self.kv_cache.kv, meta, self.attention)
        if sidx is None:
            return RunnerOutput()
        logits = self.model.compute_logits(hidden[dev[idx["logits_idx"]]])
        batch = self._sampling_batch(sample_chunks, dev, sidx)
        token_ids, chosen, top_ids, top_vals = self.sampler(logits, batch)
        return self._collect(sample_chunks, token_ids, chosen, top_ids, top_vals)

    def _prepare_inputs(self, chunks: list[ScheduledChunk], pack: _HostPack) -> dict[str, int]:
        """Whole-batch numpy: the Python loop only reads each chunk's fields and block table."""
        bs = self.block_size
        n = len(chunks)
        starts = np.fromiter((c.start for c in chunks), np.int64, n)
        ends = np.fromiter((c.end for c in chunks), np.int64, n)
        q_lens = ends - starts
        blocks_needed = -(-ends // bs)
        tables = np.zeros((n, int(blocks_needed.max())), dtype=np.int64)
        token_lists = []
        for row, c in enumerate(chunks):
            seq = c.seq
            if c.num_new_tokens < 1 or c.start < 0 or c.end > seq.num_tokens:
                raise ValueError(f"{seq.request_id}: chunk [{c.start}, {c.end}) outside its {seq.num_tokens} tokens")
            nb = int(blocks_needed[row])
            if len(seq.block_table) < nb:
                raise ValueError(f"{seq.request_id}: block table has {len(seq.block_table)} blocks, "
                                 f"{nb} needed for {c.end} tokens")
            tables[row, :nb] = seq.block_table[:nb]
            token_lists.append(seq.token_ids[c.start] if c.num_new_tokens == 1 else seq.token_ids[c.start:c.end])
        if tables.min() < 0 or tables.max() >= self.num_blocks:
            bad = int(np.nonzero((tables < 0).any(1) | (tables >= self.num_blocks).any(1))[0][0])
            raise ValueError(f"{chunks[bad].seq.request_id}: block id outside the pool of {self.num_blocks}")
        if all(isinstance(t, int) for t in token_lists):
            input_ids = np.array(token_lists, dtype=np.int64)
        else:
            input_ids = np.concatenate([np.asarray([t] if isinstance(t, int) else t, dtype=np.int64)
                                        for t in token_lists])
        vocab = self.model_config.vocab_size
        if input_ids.min() < 0 or input_ids.max() >= vocab:
            raise InvalidRequest("prompt", f"token ids must be in [0, {vocab})")
        cu = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(q_lens, out=cu[1:])
        row_of = np.repeat(np.arange(n), q_lens)
        positions = np.arange(cu[-1], dtype=np.int64) - np.repeat(cu[:-1] - starts, q_lens)
        slots = tables[row_of, positions // bs] * bs + positions % bs
        sample = np.fromiter((c.sample for c in chunks), bool, n)
        return {
            "input_ids": pack.add(input_ids, np.int64),
            "positions": pack.add(positions, np.int64),
            "slots": pack.add(slots, np.int64),
            "tables": pack.add(tables, np.int64),
            "ctx": pack.add(ends, np.int64),
            "cu": pack.add(cu, np.int64),
            "decode": pack.add(np.nonzero(q_lens == 1)[0], np.int64),
            "logits_idx": pack.add(cu[1:][sample] - 1, np.int64),
        }

    def _prepare_sampling(self, chunks: list[ScheduledChunk], pack: _HostPack) -> dict[str, int]:
        params = [c.seq.request.sampling for c in chunks]
        seen_rows, seen_tokens, out_rows, out_tokens, ban_rows, ban_tokens = [], [], [], [], [], []
        vocab = self.model_config.vocab_size
        for row, c in enumerate(chunks):
            seq, sp = c.seq, params[row]
            if sp.repetition_penalty != 1.0:
                uniq = set(seq.token_ids)
                seen_rows += [row] * len(uniq)
                seen_tokens += sorted(uniq)
            if sp.presence_penalty or sp.frequency_penalty:
                out = seq.output_token_ids
                out_rows += [row] * len(out)
                out_tokens += out
            stopping = seq.request.stopping
            if seq.num_output_tokens < stopping.min_tokens:
                banned = set(stopping.stop_token_ids)
                if not stopping.ignore_eos:
                    banned.update(self.model_info.eos_token_ids)
                banned = sorted(t for t in banned if 0 <= t < vocab)
                ban_rows += [row] * len(banned)
                ban_tokens += banned
        return {
            "temperature": pack.add([p.temperature for p in params], np.float32),
            "top_k": pack.add([p.top_k for p in params], np.int64),
            "top_p": pack.add([p.top_p for p in params], np.float32),
            "min_p": pack.add([p.min_p for p in params], np.float32),
            "rep": pack.add([p.repetition_penalty for p in params], np.float32),
            "pres": pack.add([p.presence_penalty for p in params], np.float32),
            "freq": pack.add([p.frequency_penalty for p in params], np.float32),
            "seen_rows": pack.add(seen_rows, np.int64), "seen_tokens": pack.add(seen_tokens, np.int64),
            "out_rows": pack.add(out_rows, np.int64), "out_tokens": pack.add(out_tokens, np.int64),
            "ban_rows": pack.add(ban_rows, np.int64), "ban_tokens": pack.add(ban_tokens, np.int64),
        }

    def _sampling_batch(self, chunks: list[ScheduledChunk], dev: list[torch.Tensor],
                        sidx: dict[str, int]) -> SamplingBatch:
        params = [c.seq.request.sampling for c in chunks]
        wanted = [p.logprobs for p in params if p.logprobs is not None]
        return SamplingBatch(
            temperature=dev[sidx["temperature"]], top_k=dev[sidx["top_k"]], top_p=dev[sidx["top_p"]],
            min_p=dev[sidx["min_p"]], repetition_penalty=dev[sidx["rep"]],
            presence_penalty=dev[sidx["pres"]], frequency_penalty=dev[sidx["freq"]],
            seen_rows=dev[sidx["seen_rows"]], seen_tokens=dev[sidx["seen_tokens"]],
            output_rows=dev[sidx["out_rows"]], output_tokens=dev[sidx["out_tokens"]],
            banned_rows=dev[sidx["ban_rows"]], banned_tokens=dev[sidx["ban_tokens"]],
            step_seeds=[step_seed(c.seq.seed, c.seq.num_output_tokens) for c in chunks],
            all_greedy=all(p.greedy for p in params),
            any_top_k_top_p=any(not p.greedy and (p.top_k > 0 or p.top_p < 1) for p in params),
            any_min_p=any(not p.greedy and p.min_p > 0 for p in params),
            any_repetition=any(p.repetition_penalty != 1.0 for p in params),
            any_presence_frequency=any(p.presence_penalty or p.frequency_penalty for p in params),
            max_logprobs=min(max(wanted), self.model_config.vocab_size) if wanted else -1,
        )

    def _collect(self, chunks: list[ScheduledChunk], token_ids: torch.Tensor, chosen: torch.Tensor | None,
                 top_ids: torch.Tensor | None, top_vals: torch.Tensor | None) -> RunnerOutput:
        rows = len(chunks)
        parts = [token_ids.double()[:, None]]
        if chosen is not None:
            parts += [chosen.double()[:, None], top_ids.double(), top_vals.double()]
        host = torch.cat(parts, dim=1).cpu().tolist()  # the step's single device -> host copy
        n = top_ids.shape[1] if top_ids is not None else 0
        out = RunnerOutput()
        for row in range(rows):
            seq = chunks[row].seq
            values = host[row]
            token = int(values[0])
            out.token_ids[seq.request_id] = token
            want = seq.request.sampling.logprobs
            if want is not None and chosen is not None:
                top = tuple((int(values[2 + j]), values[2 + n + j]) for j in range(min(want, n)))
                out.logprobs[seq.request_id] = TokenLogprob(token_id=token, logprob=values[1], top=top)
        return out
