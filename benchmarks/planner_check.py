"""Does `baton plan` predict what the deployment it recommends then does? One run:

1. profile one instance (`deploy.profile.profile`, in a child process, as `baton profile` does);
2. plan: search prefill/decode splits within `--max-devices` by simulation, take the best;
3. deploy that split (goodput placement, the profile seeding the router's latency models) and
   run the planner's workload (same length distribution, gamma arrivals, same SLOs) at a few
   fractions of the predicted maximum rate;
4. print the predicted and the measured SLO attainment side by side.

    python -m benchmarks.planner_check                       # CPU: tiny model, 1 thread/worker
    PYTHONPATH=/tmp/site:. python -m benchmarks.planner_check --gpu --max-devices 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import platform
import statistics
import subprocess
import tempfile
from pathlib import Path

import ray
import torch

from benchmarks.gpu_common import serving_model
from benchmarks.serving import run_load, summarize, synthetic
from deploy.config import BatonConfig
from deploy.launcher import deploy
from deploy.planner import Workload, plan, simulate
from router.latency_model import new_instance_model


def engine_args(model_dir: str, args) -> dict:
    base = {"max_num_batched_tokens": args.max_batched_tokens, "max_model_len": 2048}
    if args.gpu:
        return {**base, "extra": {"random_weights": True}}
    return base


def _profile_child(model_dir: str, eargs: dict, dtype: str, device: str, out) -> None:
    from deploy.profile import profile

    if device == "cpu":
        torch.set_num_threads(1)  # as a CPU worker runs (launcher: torch_threads=1)
    out.put(profile({"model": model_dir, "dtype": dtype, "device": device, **eargs}, repeats=3))


def measure_profile(model_dir: str, args) -> dict:
    """In a child process: on a GPU its memory must be free again for the workers."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    dtype, device = ("bfloat16", "cuda") if args.gpu else ("float32", "cpu")
    child = ctx.Process(
        target=_profile_child, args=(model_dir, engine_args(model_dir, args), dtype, device, out)
    )
    child.start()
    result = out.get(timeout=900)
    child.join()
    return result


def config(model_dir: str, profile_path: str, split: tuple[int, int], args) -> BatonConfig:
    device = {"GPU": 1, "CPU": 4} if args.gpu else {"CPU": 1}
    return BatonConfig.from_dict(
        {
            "tiers": {
                "bench": {
                    "model": model_dir,
                    "dtype": "bfloat16" if args.gpu else "float32",
                    "engine_args": engine_args(model_dir, args),
                    "profile": profile_path,
                    "max_tokens_limit": 2 * args.output_len,
                    "max_queued_requests": 100000,
                    "ttft_slo_ms": args.ttft_slo_ms,
                    "tpot_slo_ms": args.tpot_slo_ms,
                }
            },
            "pools": [
                {"tier": "bench", "role": "prefill", "count": split[0], "resources": device},
                {"tier": "bench", "role": "decode", "count": split[1], "resources": device},
            ],
            "http_port": None,
            "worker_call_timeout_s": 120.0,
        }
    )


async def measure(model_dir, profile_path, split, rates, workload, slo, args) -> list[float]:
    deployment = await deploy(config(model_dir, profile_path, split, args), 0, 0)
    target = f"localhost:{deployment.grpc_port}"
    attainments = []
    try:
        warm = synthetic(8, args.vocab, workload.input_len, workload.output_len, 0.5, seed=99)
        await run_load(target, warm, 2.0, slo=slo, progress=False)
        for i, rate in enumerate(rates):
            prompts = synthetic(
                workload.count(rate),
                args.vocab,
                workload.input_len,
                workload.output_len,
                workload.range_ratio,
                seed=args.seed + i,
            )
            results, elapsed = await run_load(
                target,
                prompts,
                rate,
                burstiness=workload.burstiness,
                slo=slo,
                seed=args.seed + i,
                progress=False,
            )
            summary = summarize(results, elapsed, rate, slo)
            attainments.append(summary["slo_attainment"])
            print(
                f"  measured at {rate:.2f} req/s: attainment {summary['slo_attainment']:.0%}, "
                f"TTFT p50 {summary['ttft_ms']['p50']:.0f} ms, TPOT p50 "
                f"{summary['tpot_ms']['p50']:.1f} ms",
                flush=True,
            )
        return attainments
    finally:
        await deployment.stop()


def model_folder(tmp: str, args) -> str:
    model_dir, args.vocab = serving_model(
        Path(tmp),
        args.gpu,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return model_dir


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--gpu", action="store_true", help="Llama-3-8B shape, bf16, one GPU each")
    p.add_argument("--max-devices", type=int, default=2, help="the plan's budget")
    p.add_argument("--fractions", default="0.5,0.8,1.0", help="of the predicted max rate")
    p.add_argument("--input-len", type=int, default=None)
    p.add_argument("--output-len", type=int, default=None)
    p.add_argument("--num-requests", type=int, default=None)
    p.add_argument("--ttft-slo-ms", type=float, default=None)
    p.add_argument("--tpot-slo-ms", type=float, default=None)
    p.add_argument("--max-batched-tokens", type=int, default=None)
    p.add_argument(
        "--min-duration-s", type=float, default=30.0, help="of arrivals per rate, at least"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None)
    args = p.parse_args()
    defaults = dict(
        input_len=1024 if args.gpu else 192,
        output_len=128 if args.gpu else 24,
        num_requests=200 if args.gpu else 100,
        ttft_slo_ms=500.0 if args.gpu else 1000.0,
        tpot_slo_ms=50.0 if args.gpu else 100.0,
        max_batched_tokens=2048 if args.gpu else 512,
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    workload = Workload(
        args.input_len, args.output_len, 0.5, args.num_requests, 1.0, args.min_duration_s
    )
    slo = (args.ttft_slo_ms / 1e3, args.tpot_slo_ms / 1e3)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = model_folder(tmp, args)
        profile = measure_profile(model_dir, args)
        profile_path = str(Path(tmp) / "profile.json")
        Path(profile_path).write_text(json.dumps(profile))
        model = new_instance_model(profile)
        rows = plan(model, workload, slo, args.max_devices)
        best = rows[0]
        split = (best["prefill"], best["decode"])
        rates = [float(f) * best["max_rate"] for f in args.fractions.split(",")]
        # The simulation's attainment, averaged over seeds (one run is as noisy as the real one).
        predicted = [
            statistics.mean(simulate(model, *split, rate, workload, slo, seed=s) for s in range(5))
            for rate in rates
        ]
        print(
            f"plan: {split[0]} prefill + {split[1]} decode, predicted max rate "
            f"{best['max_rate']:.2f} req/s",
            flush=True,
        )
        if args.gpu:
            ray.init(num_cpus=16, num_gpus=args.max_devices, include_dashboard=False)
        else:
            ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        measured = asyncio.run(measure(model_dir, profile_path, split, rates, workload, slo, args))
        ray.shutdown()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    device = torch.cuda.get_device_name(0) if args.gpu else f"{platform.machine()} CPU"
    print(
        f"\ncommit {commit or 'unknown'}, {device}, torch {torch.__version__}; budget "
        f"{args.max_devices} devices; workload {args.input_len}+-50% in / {args.output_len}+-50% "
        f"out, >= {args.num_requests} requests and {args.min_duration_s:.0f} s of arrivals per "
        f"rate, Poisson; SLO TTFT {args.ttft_slo_ms:.0f} "
        f"ms, TPOT {args.tpot_slo_ms:.0f} ms"
    )
    print(f"profile: prefill {profile['prefill']}, decode {profile['decode']}")
    print(f"plan: {split[0]} prefill + {split[1]} decode")
    print(f"{'rate':>7} {'predicted':>9} {'measured':>9} {'diff pts':>9}")
    for rate, pred, meas in zip(rates, predicted, measured):
        print(f"{rate:7.2f} {pred:9.0%} {meas:9.0%} {100 * (meas - pred):+9.0f}")
    if args.output:
        Path(args.output).write_text(
            json.dumps(
                {"plan": best, "rates": rates, "predicted": predicted, "measured": measured},
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
