"""CPU facts for the torch engine: bf16 units from the cpuinfo flags, physical cores, threads."""

from __future__ import annotations

import torch

from tokenrelay_engines.config import SchedulerConfig, TorchEngineConfig
from tokenrelay_engines.torch.cpu import configure_threads, cpu_flags, cpu_has_native_bf16, physical_cores
from tokenrelay_engines.torch.runner import ModelRunner

AMD_ZEN1 = """processor\t: 0
physical id\t: 0
core id\t\t: 0
flags\t\t: fpu sse sse2 avx avx2 fma f16c
processor\t: 1
physical id\t: 0
core id\t\t: 1
flags\t\t: fpu sse sse2 avx avx2 fma f16c
"""

SAPPHIRE_RAPIDS_HT = """processor\t: 0
physical id\t: 0
core id\t\t: 0
flags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile
processor\t: 1
physical id\t: 0
core id\t\t: 0
flags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile
"""


def test_bf16_only_where_the_cpu_has_bf16_units() -> None:
    assert "avx2" in cpu_flags(AMD_ZEN1)
    assert not cpu_has_native_bf16(AMD_ZEN1)
    assert cpu_has_native_bf16(SAPPHIRE_RAPIDS_HT)
    assert not cpu_has_native_bf16("no flags line at all")


def test_hyper_threads_of_one_core_count_once() -> None:
    assert physical_cores(SAPPHIRE_RAPIDS_HT) == 1
    assert 1 <= physical_cores(AMD_ZEN1) <= 2  # also capped by this process's CPU affinity


def test_configure_threads_sets_intra_and_one_inter_op_thread() -> None:
    before = torch.get_num_threads()
    try:
        assert configure_threads(1) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_auto_dtype_on_cpu_follows_the_hardware() -> None:
    config = TorchEngineConfig(load_format="dummy", dummy_shape="tiny", num_threads=torch.get_num_threads(),
                               scheduler=SchedulerConfig(block_size=8, num_blocks=8))
    runner = ModelRunner(config)
    expected = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert runner.dtype == expected == runner.kv_cache.kv.dtype
