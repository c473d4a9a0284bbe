"""The `baton` command line."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import sys
import time

from deploy.admin_cli import add_apply_args
from deploy.admin_cli import add_commands as add_admin_commands


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")


_API_KEY_HELP = "Bearer token for HTTP and gRPC (default: $BATON_API_KEY; unset: no key)"
_QUANT_HELP = "weight quantization (engine/quantization): int8, int4 (group 128) or fp8"


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from deploy.launcher import deploy, load_config

    config = load_config(args.config, args.model)
    if args.quantization:
        from engine.quantization.config import QuantConfig

        QuantConfig.parse(args.quantization)  # a bad name fails here, not in every worker
        for tier in config.tiers.values():
            tier.engine_args["quantization"] = args.quantization
    overrides = {
        "http_port": args.http_port,
        "api_key": args.api_key,
        "admin_api_key": args.admin_api_key,
    }
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})

    async def serve() -> None:
        deployment = await deploy(config, args.grpc_port, args.metrics_port)
        print(
            f"Baton serving {sorted(config.tiers)} on port {deployment.grpc_port} "
            f"({len(deployment.actors)} workers), metrics on :{deployment.metrics_port}/metrics. "
            f"Try: baton generate --target "
            f'localhost:{deployment.grpc_port} "Hello"',
            flush=True,
        )
        if deployment.http_server is not None:
            key_note = " (API key required)" if config.api_key else ""
            print(f"OpenAI API on http://localhost:{deployment.http_port}/v1{key_note}", flush=True)
        # SIGTERM (a process manager stopping the service) ends it as Ctrl-C does: in-flight
        # streams are cancelled, workers stopped, ports closed.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            ended = asyncio.ensure_future(deployment.grpc_server.wait_for_termination())
            stopped = asyncio.ensure_future(stop.wait())
            await asyncio.wait({ended, stopped}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()  # NOTE: not `ended`: it shares its future with the server's stop
        finally:
            print("Baton stopping", flush=True)
            await deployment.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
    return 0


def cmd_generate_remote(args: argparse.Namespace) -> int:
    import grpc

    from proto import serving_pb2, serving_pb2_grpc

    sampling = serving_pb2.SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
    )
    if args.seed is not None:
        sampling.seed = args.seed
    request = serving_pb2.GenerateRequest(
        prompt=" ".join(args.prompt), sampling=sampling, model=args.tier
    )
    with grpc.insecure_channel(args.target) as channel:
        stub = serving_pb2_grpc.BatonStub(channel)
        try:
            last = None
            metadata = [("authorization", f"Bearer {args.api_key}")] if args.api_key else None
            for last in stub.Generate(request, timeout=args.timeout, metadata=metadata):
                sys.stdout.write(last.text)
                sys.stdout.flush()
        except grpc.RpcError as e:
            print(f"\nbaton: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    sys.stdout.write("\n")
    if last is not None:
        print(
            f"[{last.usage.completion_tokens} tokens, finish_reason={last.finish_reason}, "
            f"ttft={last.timings.ttft_ms:.1f}ms, e2e={last.timings.e2e_ms:.1f}ms, "
            f"tier={last.model}, prefill={last.prefill_instance}, decode={last.decode_instance}]",
            file=sys.stderr,
        )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from benchmarks.serving import main as bench_main

    return bench_main(args)


def cmd_profile(args: argparse.Namespace) -> int:
    from deploy.profile import main as profile_main

    return profile_main(args)


def cmd_plan(args: argparse.Namespace) -> int:
    from deploy.planner import main as plan_main

    if args.apply:
        from deploy.admin_cli import plan_and_apply

        return plan_and_apply(args, plan_main)
    return plan_main(args)


def cmd_generate(args: argparse.Namespace) -> int:
    if args.target:
        return cmd_generate_remote(args)
    from engine import EngineConfig, LLMEngine, SamplingParams
    from engine.testing import ensure_default_model

    model = args.model or str(ensure_default_model())
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        seed=args.seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
    )
    engine = LLMEngine(
        EngineConfig(
            model=model,
            dtype=args.dtype,
            num_blocks=args.num_blocks,
            quantization=args.quantization,
        )
    )
    prompt = " ".join(args.prompt)
    engine.add_request("cli", prompt, params)
    start = time.perf_counter()
    sys.stdout.write(prompt)
    out = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            sys.stdout.write(out.new_text)
            sys.stdout.flush()
    elapsed = time.perf_counter() - start
    sys.stdout.write("\n")
    print(
        f"[{len(out.token_ids)} tokens in {elapsed:.2f}s, finish_reason={out.finish_reason}, "
        f"model={model}]",
        file=sys.stderr,
    )
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from engine.quantization.checkpoint import save_quantized

    quantization = {"method": args.quantization}
    if args.quantization == "int4":
        quantization.update(group_size=args.group_size, symmetric=not args.asymmetric)
    out = save_quantized(args.model, args.output, quantization, dtype=args.dtype)
    print(f"wrote {out} ({args.quantization}); serve it as any model folder")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="baton", description="Baton: disaggregated LLM serving")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate a completion (offline, or from --target)")
    gen.add_argument("prompt", nargs="+", help="the prompt text")
    gen.add_argument(
        "--model", default=None, help="Hugging Face model folder (default: the small demo model)"
    )
    gen.add_argument("--target", default=None, help="HOST:PORT of a Baton server (else: offline)")
    gen.add_argument("--tier", default="", help="model tier on the server (default: auto)")
    gen.add_argument("--api-key", default=os.environ.get("BATON_API_KEY"), help=_API_KEY_HELP)
    gen.add_argument("--timeout", type=float, default=300.0)
    gen.add_argument("--dtype", default="auto")
    gen.add_argument("--num-blocks", type=int, default=None)
    gen.add_argument("--quantization", default=None, help=_QUANT_HELP)
    _add_sampling_args(gen)
    gen.set_defaults(func=cmd_generate)

    serve = sub.add_parser("serve", help="run the router and workers (default: embedded demo)")
    serve.add_argument("--config", default=None, help="YAML config (default: embedded demo)")
    serve.add_argument("--model", default=None, help="model folder for every tier")
    serve.add_argument("--grpc-port", type=int, default=None)
    serve.add_argument("--metrics-port", type=int, default=None, help="default 9400")
    serve.add_argument("--http-port", type=int, default=None, help="OpenAI API; default 8000")
    serve.add_argument("--api-key", default=os.environ.get("BATON_API_KEY"), help=_API_KEY_HELP)
    serve.add_argument(
        "--admin-api-key",
        default=os.environ.get("BATON_ADMIN_API_KEY"),
        help="key of the admin service (baton scale, ...); default: $BATON_ADMIN_API_KEY, "
        "else the API key",
    )
    serve.add_argument("--quantization", default=None, help="every tier's " + _QUANT_HELP)
    serve.set_defaults(func=cmd_serve)

    quant = sub.add_parser("quantize", help="write a pre-quantized copy of a model folder")
    quant.add_argument("model", help="Hugging Face model folder (unquantized)")
    quant.add_argument("output", help="folder to write")
    quant.add_argument("--quantization", required=True, help=_QUANT_HELP)
    quant.add_argument("--group-size", type=int, default=128, help="int4: inputs per scale")
    quant.add_argument("--asymmetric", action="store_true", help="int4: a zero point per group")
    quant.add_argument("--dtype", default="auto", help="of the unquantized rest")
    quant.set_defaults(func=cmd_quantize)

    bench = sub.add_parser("bench", help="load-test a running server (gRPC)")
    bench.add_argument("--target", default="localhost:50051", help="HOST:PORT")
    bench.add_argument("--tier", default="", help="model tier (default: the server's default)")
    bench.add_argument("--rate", default="4", help="requests/s, or a comma list to sweep; inf")
    bench.add_argument("--burstiness", type=float, default=1.0, help="gamma shape; 1 = Poisson")
    bench.add_argument("--num-requests", type=int, default=100)
    bench.add_argument(
        "--min-duration-s",
        type=float,
        default=0.0,
        help="at least this many seconds of arrivals per rate (more requests at higher rates)",
    )
    bench.add_argument("--max-concurrency", type=int, default=None)
    bench.add_argument(
        "--dataset", choices=["synthetic", "shared-prefix", "jsonl"], default="synthetic"
    )
    bench.add_argument("--input-len", type=int, default=128)
    bench.add_argument("--output-len", type=int, default=64)
    bench.add_argument("--range-ratio", type=float, default=0.0, help="length spread, 0..1")
    bench.add_argument("--prefix-len", type=int, default=256, help="shared-prefix dataset")
    bench.add_argument("--num-prefixes", type=int, default=4, help="shared-prefix dataset")
    bench.add_argument("--jsonl", default=None, help="prompts file for --dataset jsonl")
    bench.add_argument("--ttft-slo-ms", type=float, default=1000.0)
    bench.add_argument("--tpot-slo-ms", type=float, default=100.0)
    bench.add_argument(
        "--find-max-rate",
        action="store_true",
        help="binary-search the highest rate with >= 90%% SLO attainment",
    )
    bench.add_argument("--max-rate", type=float, default=64.0, help="search upper bound")
    bench.add_argument("--iterations", type=int, default=6, help="binary search steps")
    bench.add_argument("--num-gpus", type=int, default=None, help="default: instances served")
    bench.add_argument("--output", default=None, help="write results as JSON here")
    bench.add_argument("--plot", default=None, help="latency percentiles vs rate, PNG")
    bench.add_argument("--seed", type=int, default=0)
    bench.set_defaults(func=cmd_bench)

    prof = sub.add_parser("profile", help="measure an engine instance; write a latency profile")
    prof.add_argument("--model", default=None, help="model folder (default: the demo model)")
    prof.add_argument("--dtype", default="auto")
    prof.add_argument("--device", default="auto")
    prof.add_argument("--num-blocks", type=int, default=None)
    prof.add_argument("--max-num-batched-tokens", type=int, default=2048)
    prof.add_argument("--repeats", type=int, default=3)
    prof.add_argument("--output", default="profile.json")
    prof.set_defaults(func=cmd_profile)

    pl = sub.add_parser("plan", help="choose prefill/decode instance counts by simulation")
    pl.add_argument(
        "--profile",
        required=True,
        action="append",
        help="from `baton profile`; TYPE=FILE, repeated, for pools on several GPU types",
    )
    pl.add_argument(
        "--cost",
        action="append",
        default=[],
        help="TYPE=DOLLARS: a GPU type's cost per instance-hour (ranks plans per dollar)",
    )
    pl.add_argument(
        "--config", default=None, help="a deployment config: its pools' gpu_type cost_per_hour"
    )
    pl.add_argument("--input-len", type=int, default=512)
    pl.add_argument("--output-len", type=int, default=128)
    pl.add_argument("--range-ratio", type=float, default=0.5)
    pl.add_argument("--num-requests", type=int, default=400)
    pl.add_argument("--burstiness", type=float, default=1.0)
    pl.add_argument(
        "--min-duration-s", type=float, default=60.0, help="simulate at least this long a run"
    )
    pl.add_argument("--ttft-slo-ms", type=float, default=500.0)
    pl.add_argument("--tpot-slo-ms", type=float, default=50.0)
    pl.add_argument("--max-gpus", type=int, default=8)
    pl.add_argument("--rate", type=float, default=None, help="target rate: cheapest split")
    pl.add_argument("--kv-bytes-per-token", type=int, default=0)
    pl.add_argument("--output", default=None)
    add_apply_args(pl)
    pl.set_defaults(func=cmd_plan)

    add_admin_commands(sub)  # workers, scale, switch-role

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    try:
        return args.func(args)
    except (ValueError, OSError) as e:  # OSError: a port in use, a missing file
        print(f"baton: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
