"""Disaggregated serving against colocated serving on the same devices and workload, one run.

    disaggregated  1 prefill worker + 1 decode worker, KV over NCCL (gloo on CPU)
    colocated      2 workers, each prefilling and decoding its own requests (no handoff)

For each mode and each request rate: TTFT and ITL percentiles, SLO attainment, and goodput per
device (requests per second meeting both SLOs, over the number of devices). Poisson arrivals,
fixed-length random prompts (`--input-len`, `--output-len`, `ignore_eos`), the same prompts and
arrival times for both modes.

    python -m benchmarks.online_disagg                          # CPU smoke run, tiny model
    PYTHONPATH=/tmp/site:. python -m benchmarks.online_disagg --gpu --rates 2,4,8,12
        # 2 GPUs, Llama-3-8B shape in bf16 with random weights (Ray from a carried wheel)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import subprocess
import tempfile
from pathlib import Path

import ray
import torch

from benchmarks.gpu_common import serving_model
from benchmarks.serving import run_load, summarize, synthetic
from deploy.config import BatonConfig
from deploy.launcher import deploy

MODES = ("disaggregated", "colocated")


def config(model_dir: str, mode: str, args) -> BatonConfig:
    device = {"GPU": 1, "CPU": 4} if args.gpu else {"CPU": 1}
    if mode == "disaggregated":
        pools = [
            {"tier": "bench", "role": "prefill", "count": 1, "resources": device},
            {"tier": "bench", "role": "decode", "count": 1, "resources": device},
        ]
    else:
        pools = [{"tier": "bench", "role": "colocated", "count": 2, "resources": device}]
    engine_args = {
        "max_num_batched_tokens": args.max_batched_tokens,
        "max_model_len": args.input_len + args.output_len + 64,
    }
    if args.gpu:
        engine_args["extra"] = {"random_weights": True}
    return BatonConfig.from_dict(
        {
            "tiers": {
                "bench": {
                    "model": model_dir,
                    "dtype": "bfloat16" if args.gpu else "float32",
                    "engine_args": engine_args,
                    "max_tokens_limit": args.output_len,
                    "max_queued_requests": 100000,
                }
            },
            "pools": pools,
            "placement": "least_loaded",
            "http_port": None,
            "metrics_port": None,
            "worker_call_timeout_s": 120.0,
        }
    )


async def measure(model_dir: str, mode: str, args, slo) -> list[dict]:
    deployment = await deploy(config(model_dir, mode, args), 0, 0)
    target = f"localhost:{deployment.grpc_port}"
    try:
        warm = synthetic(8, args.vocab, args.input_len, args.output_len, 0.0, seed=99)
        await run_load(target, warm, float("inf"), slo=slo, progress=False)
        rows = []
        for rate in args.rates:
            prompts = synthetic(
                args.num_requests, args.vocab, args.input_len, args.output_len, 0.0, args.seed
            )
            results, elapsed = await run_load(
                target, prompts, rate, slo=slo, seed=args.seed, progress=False
            )
            summary = summarize(results, elapsed, rate, slo)
            summary["mode"] = mode
            summary["goodput_per_device"] = summary["goodput"] / 2
            rows.append(summary)
            print(row_text(summary), flush=True)
        return rows
    finally:
        await deployment.stop()


def row_text(s: dict) -> str:
    def ms(name, q):
        value = s[name][q]
        return "-" if value is None else f"{value:.0f}"

    return (
        f"{s['mode']:13} {s['request_rate']:6.2f} {s['completed']:4d}/{s['num_requests']:<4d} "
        f"{ms('ttft_ms', 'p50'):>8} {ms('ttft_ms', 'p90'):>8} {ms('itl_ms', 'p50'):>7} "
        f"{ms('itl_ms', 'p90'):>7} {s['slo_attainment']:7.0%} {s['goodput_per_device']:9.2f}"
    )


def model_folder(tmp: str, args) -> str:
    model_dir, args.vocab = serving_model(
        Path(tmp),
        args.gpu,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    return model_dir


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--gpu", action="store_true", help="2 GPUs, Llama-3-8B shape, bf16")
    p.add_argument("--rates", default=None, help="requests/s, comma separated")
    p.add_argument("--num-requests", type=int, default=None)
    p.add_argument("--input-len", type=int, default=None)
    p.add_argument("--output-len", type=int, default=None)
    p.add_argument("--max-batched-tokens", type=int, default=None)
    p.add_argument("--ttft-slo-ms", type=float, default=None)
    p.add_argument("--itl-slo-ms", type=float, default=None)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="write every row as JSON here")
    args = p.parse_args()
    # GPU defaults: the SLOs (TTFT 0.5 s, ITL 50 ms); CPU: a quick smoke run.
    defaults = dict(
        rates="2,4,8" if args.gpu else "1,2",
        num_requests=200 if args.gpu else 16,
        input_len=1024 if args.gpu else 128,
        output_len=128 if args.gpu else 16,
        max_batched_tokens=2048 if args.gpu else 256,
        ttft_slo_ms=500.0 if args.gpu else 2000.0,
        itl_slo_ms=50.0 if args.gpu else 500.0,
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.rates = [float(r) for r in args.rates.split(",")]
    slo = (args.ttft_slo_ms / 1e3, args.itl_slo_ms / 1e3)
    if args.gpu:
        ray.init(num_cpus=16, num_gpus=2, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    header = (
        f"{'mode':13} {'rate':>6} {'ok':>9} {'TTFT p50':>8} {'TTFT p90':>8} {'ITL p50':>7} "
        f"{'ITL p90':>7} {'attain':>7} {'goodput/dev':>9}"
    )
    print(header, flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = model_folder(tmp, args)
        for mode in args.modes.split(","):
            rows += asyncio.run(measure(model_dir, mode, args, slo))
    ray.shutdown()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    device = torch.cuda.get_device_name(0) if args.gpu else f"{platform.machine()} CPU"
    print(
        f"\ncommit {commit or 'unknown'}, 2 x {device}, torch {torch.__version__}; "
        f"{args.num_requests} requests of {args.input_len} in / {args.output_len} out per rate, "
        f"Poisson arrivals; SLO TTFT {args.ttft_slo_ms:.0f} ms, ITL {args.itl_slo_ms:.0f} ms "
        f"(goodput counts TPOT against the ITL SLO); goodput/dev = goodput / 2 devices"
    )
    print(header)
    for row in rows:
        print(row_text(row))
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
