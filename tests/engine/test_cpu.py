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


def test_reserved_cores_are_left_to_the_front_ends_and_one_thread_always_remains(monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        assert configure_threads(0, reserved_cores=physical_cores() + 4) == 1 == torch.get_num_threads()
        assert configure_threads(0, reserved_cores=1) == max(1, physical_cores() - 1)
        assert configure_threads(0) == physical_cores()
        assert configure_threads(1, reserved_cores=8) == 1  # an explicit count wins
    finally:
        torch.set_num_threads(before)


def test_main_reserves_one_core_per_front_end_only_for_the_engine_process() -> None:
    import argparse

    from tokenrelay_server import main as server_main

    def reserved(*flags: str) -> int:
        parser = argparse.ArgumentParser()
        server_main.add_serve_arguments(parser)
        return server_main.config_from_args(parser.parse_args(["--model", "demo", *flags])).torch.reserved_cores

    assert reserved() == 1 and reserved("--api-server-count", "2") == 2
    assert reserved("--engine-process", "off") == 0


def test_auto_dtype_on_cpu_follows_the_hardware() -> None:
    config = TorchEngineConfig(load_format="dummy", dummy_shape="tiny", num_threads=torch.get_num_threads(),
                               scheduler=SchedulerConfig(block_size=8, num_blocks=8))
    runner = ModelRunner(config)
    expected = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert runner.dtype == expected == runner.kv_cache.kv.dtype
