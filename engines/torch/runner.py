"""The model runner: one step's SchedulerOutput -> flattened batch -> model -> sampled tokens.

Host side builds every index array of the step (input ids, positions, slot mapping, block
tables, sampling parameters) from persistent per-request rows (engines/torch/input_batch.py:
written when a request joins, only new blocks and tokens each step) into ONE byte buffer,
copied to the device once; the sampled ids and logprobs come back in ONE tensor. Inputs are
not validated here: admission and the block manager guarantee them.

Overlap: on CUDA the host -> device copy, the forward pass and sampling are queued
asynchronously, and the host work after the launch (sampling flags and seeds) runs while the
device computes; the host waits only at the one device -> host copy of the sampled ids. The
next step's preparation is not overlapped with this step's forward pass: it needs this step's
sampled tokens (that takes asynchronous scheduling in the engine loop). On CPU the forward pass
runs on the calling thread (its matmuls on torch's intra-op threads), so nothing overlaps it.
"""

from __future__ import annotations

import numpy as np
import torch
from tokenizers import Tokenizer

from tokenrelay_engines.base import ModelInfo, TokenLogprob
from tokenrelay_engines.config import TorchEngineConfig
from tokenrelay_engines.scheduler.sequence import RunnerOutput, SchedulerOutput
from tokenrelay_engines.torch.attention import AttentionBackend, AttentionMetadata
from tokenrelay_engines.torch.backends import default_attention, resolve_device
from tokenrelay_engines.torch.cpu import configure_threads, cpu_has_native_bf16
from tokenrelay_engines.torch.input_batch import InputBatch, StepInputs
from tokenrelay_engines.torch.kv_cache import KVCache, size_num_blocks
from tokenrelay_engines.torch.kernels.native import load_kernels
from tokenrelay_engines.torch.loader import load_model, resolve_dtype
from tokenrelay_engines.torch.sampler import Sampler, SamplingBatch


_TORCH_DTYPES = {np.dtype(np.int64): torch.int64, np.dtype(np.float32): torch.float32}


class _HostPack:
    """Arrays appended on the host, shipped to the device as one buffer, then viewed back.

    On CPU there is no copy to make: each array is wrapped as a tensor in place (torch.from_numpy;
    the input batch writes no array a step uses while that step runs).
    """

    _ALIGN = 8

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._direct: list[torch.Tensor] | None = [] if device.type == "cpu" else None
        self._parts: list[np.ndarray] = []
        self._layout: list[tuple[int, int, np.dtype, tuple[int, ...]]] = []
        self._nbytes = 0

    def add(self, values: np.ndarray) -> int:
        arr = np.ascontiguousarray(values)
        if self._direct is not None:
            self._direct.append(torch.from_numpy(arr))
            return len(self._direct) - 1
        pad = (-self._nbytes) % self._ALIGN
        if pad:
            self._parts.append(np.zeros(pad, dtype=np.uint8))
            self._nbytes += pad
        self._layout.append((self._nbytes, arr.nbytes, arr.dtype, arr.shape))
        self._parts.append(arr.reshape(-1).view(np.uint8))
        self._nbytes += arr.nbytes
        return len(self._layout) - 1

    def to_device(self) -> list[torch.Tensor]:
        if self._direct is not None:
            return self._direct
        host = torch.from_numpy(np.concatenate(self._parts) if self._parts else np.zeros(0, np.uint8))
        if self._device.type == "cuda":
            host = host.pin_memory()
        buf = host.to(self._device, non_blocking=True)
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
            self.num_threads = configure_threads(config.num_threads, config.reserved_cores)
            if dtype == "auto" and cpu_has_native_bf16():
                dtype = "bfloat16"  # AMX / AVX-512 BF16: bf16 matmuls beat fp32 here
        self.dtype = resolve_dtype(dtype, self.device)
        # C kernels (engines/torch/kernels/) for float32 CPU steps: GGUF block weights, RMSNorm,
        # decode attention; None where they cannot run (then torch operators do it all)
        self.kernels = load_kernels() if self.device.type == "cpu" and config.cpu_kernels else None
        with torch.inference_mode():
            loaded = load_model(config, self.device, self.dtype, self.kernels)
            loaded.model.fuse_projections(packed=self.device.type == "cpu")
            if self.kernels is not None and self.dtype == torch.float32:
                loaded.model.use_cpu_kernels(self.kernels)
        self.model = loaded.model
        self.model_config = loaded.config
        self.tokenizer: Tokenizer = loaded.tokenizer
        self.block_size = config.scheduler.block_size
        self.num_blocks = size_num_blocks(self.model_config, self.block_size, self.dtype, self.device,
                                          config.kv_cache_memory_fraction, config.scheduler.num_blocks)
        self.kv_cache = KVCache(self.model_config, self.num_blocks, self.block_size, self.device, self.dtype)
        self.attention: AttentionBackend = attention or default_attention(
            self.device, self.kernels if self.dtype == torch.float32 else None)
        self.sampler = Sampler(self.device)
        context = self.model_config.context_length
        if config.scheduler.max_model_len:
            context = min(context, config.scheduler.max_model_len)
        self.model_info = ModelInfo(name=loaded.name, context_length=context,
                                    vocab_size=self.model_config.vocab_size,
                                    eos_token_ids=loaded.eos_token_ids, engine="torch",
                                    chat_template=loaded.chat_template,
                                    special_tokens=tuple(sorted(loaded.special_tokens.items())))
        self.input_batch = InputBatch(config.scheduler.max_num_seqs, -(-context // self.block_size) + 1,
                                      self.block_size, loaded.eos_token_ids, self.model_config.vocab_size)
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
        self.input_batch.remove(scheduler_output.finished_req_ids)
        chunks = scheduler_output.chunks
        if not chunks:
            return RunnerOutput()
        step = self.input_batch.prepare(chunks, scheduler_output.decode_continues)
        pack = _HostPack(self.device)
        idx = {name: pack.add(getattr(step, name)) for name in (
            "input_ids", "positions", "slots", "tables", "context_lens", "cu_seqlens_q", "decode_idx", "logits_idx")}
        # Every row greedy, no penalties, no logprobs (the common case): argmax needs no parameters.
        plain = not self.input_batch.nonplain
        sampling = self.input_batch.sampling_arrays(step) if step.sample_chunks and not plain else None
        sidx = {name: pack.add(arr) for name, arr in sampling.items()} if sampling is not None else None
        dev = pack.to_device()  # the step's single host -> device copy (none on CPU)
        meta = AttentionMetadata(
            positions=dev[idx["positions"]], slot_mapping=dev[idx["slots"]], block_tables=dev[idx["tables"]],
            context_lens=dev[idx["context_lens"]], cu_seqlens_q=dev[idx["cu_seqlens_q"]],
            decode_seqs=dev[idx["decode_idx"]], query_lens_host=step.query_lens,
            context_lens_host=step.context_lens_host, block_size=self.block_size, decode_only=step.decode_only)
        if self.cuda_graphs is not None and self.cuda_graphs.can_run(meta):
            hidden = self.cuda_graphs.run(dev[idx["input_ids"]], meta)
        else:
            hidden = self.model(dev[idx["input_ids"]], meta.positions, self.kv_cache.kv, meta, self.attention)
        if not step.sample_chunks:
            return RunnerOutput()
        if not (step.decode_only and len(step.sample_chunks) == len(step.query_lens)):
            hidden = hidden[dev[idx["logits_idx"]]]  # else every row samples: the gather is the identity
        logits = self.model.compute_logits(hidden)
        if sidx is None:  # the argmax's ids are the step's single device -> host copy
            return self._collect_tokens(step, self.sampler.greedy_host(logits))
        batch = self._sampling_batch(step, sampling, dev, sidx)
        token_ids, chosen, top_ids, top_vals = self.sampler(logits, batch)
        if chosen is None:
            return self._collect_tokens(step, token_ids.cpu().numpy())  # the step's single device -> host copy
        return self._collect_logprobs(step, sampling["logprobs"], token_ids, chosen, top_ids, top_vals)

    def _sampling_batch(self, step: StepInputs, sampling: dict[str, np.ndarray], dev: list[torch.Tensor],
                        sidx: dict[str, int]) -> SamplingBatch:
        """Branch flags from the host arrays (no device sync); seeds only when a row draws. Only
        for batches with a row that is not plain greedy (`execute` argmaxes those directly)."""
        temp = sampling["temperature"]
        drawn = temp != 0
        all_greedy = not drawn.any()
        wanted = sampling["logprobs"]
        max_logprobs = int(wanted.max()) if len(wanted) else -1
        flags = dict(
            step_seeds=[0] * len(temp) if all_greedy else self.input_batch.step_seeds(step),
            all_greedy=bool(all_greedy),
            any_top_k_top_p=bool((drawn & ((sampling["top_k"] > 0) | (sampling["top_p"] < 1))).any()),
            any_min_p=bool((drawn & (sampling["min_p"] > 0)).any()),
            any_repetition=bool((sampling["repetition_penalty"] != 1.0).any()),
            any_presence_frequency=bool(((sampling["presence_penalty"] != 0)
                                         | (sampling["frequency_penalty"] != 0)).any()),
            max_logprobs=min(max_logprobs, self.model_config.vocab_size) if max_logprobs >= 0 else -1)
        return SamplingBatch(
            temperature=dev[sidx["temperature"]], top_k=dev[sidx["top_k"]], top_p=dev[sidx["top_p"]],
            min_p=dev[sidx["min_p"]], repetition_penalty=dev[sidx["repetition_penalty"]],
            presence_penalty=dev[sidx["presence_penalty"]], frequency_penalty=dev[sidx["frequency_penalty"]],
            seen_rows=dev[sidx["seen_rows"]], seen_tokens=dev[sidx["seen_tokens"]],
            output_rows=dev[sidx["out_rows"]], output_tokens=dev[sidx["out_tokens"]],
            banned_rows=dev[sidx["ban_rows"]], banned_tokens=dev[sidx["ban_tokens"]], **flags)

    @staticmethod
    def _request_ids(step: StepInputs) -> list[str]:
        rids = step.sample_request_ids
        return [c.seq.request_id for c in step.sample_chunks] if rids is None else rids

    def _collect_tokens(self, step: StepInputs, sampled: np.ndarray) -> RunnerOutput:
        """The sampled ids (on the host, one per sampling chunk) as the runner's answer."""
        self.input_batch.record_sampled(sampled)
        return RunnerOutput(dict(zip(self._request_ids(step), sampled.tolist())))

    def _collect_logprobs(self, step: StepInputs, wanted: np.ndarray, token_ids: torch.Tensor, chosen: torch.Tensor,
                          top_ids: torch.Tensor, top_vals: torch.Tensor) -> RunnerOutput:
        rids = self._request_ids(step)
        out = RunnerOutput()
        parts = [token_ids.double()[:, None], chosen.double()[:, None], top_ids.double(), top_vals.double()]
        host = torch.cat(parts, dim=1).cpu().tolist()  # the step's single device -> host copy
        n = top_ids.shape[1]
        for row, rid in enumerate(rids):
            values = host[row]
            token = int(values[0])
            out.token_ids[rid] = token
            want = int(wanted[row])
            if want >= 0:
                top = tuple((int(values[2 + j]), values[2 + n + j]) for j in range(min(want, n)))
                out.logprobs[rid] = TokenLogprob(token_id=token, logprob=values[1], top=top)
        self.input_batch.record_sampled(np.fromiter(out.token_ids.values(), np.int64, len(rids)))
        return out
