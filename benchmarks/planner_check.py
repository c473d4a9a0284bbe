"""Does `baton plan` predict what the deployment it recommends then does? One run:

1. profile one instance (`deploy.profile.profile`, in a child process, as `baton profile` does);
2. plan: search prefill/decode splits within `--max-devices` by simulation, take the best;
3. deploy that split (goodput placement, the profile seeding the router's latency models) and
   run the planner's workload (same length distribution, gamma arrivals, same SLOs) at a few
   fractions of the predicted maximum rate;
4. print the predicted and the measured SLO attainment side by side.

The load generator is `baton bench` in a child process, off the router's event loop.

    python -m benchmarks.planner_check                       # CPU: tiny model, 1 thread/worker
    python -m benchmarks.planner_check --quick               # CPU smoke run of the same path
    BATON_COMMIT=... PYTHONPATH=/tmp/site:. python -m benchmarks.planner_check --gpu --max-devices 4

GPU defaults: Llama-3-8B shape, prompts of 2048 +-50% tokens and 64 +-50% out, so that the token
rate at the predicted maximum stays within what the router streams (every token passes through
its Python event loop, which the planner does not model): a check of the latency models, not of
the router.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
from pathlib import Path

import ray
import torch

from benchmarks.gpu_common import SMALL_SERVING_SHAPE, bench_config, describe_run, serving_model
from benchmarks.serving import bench_in_child, run_load, synthetic
from deploy.launcher import deploy
from deploy.planner import Workload, plan, simulate
from deploy.profile import profile_in_child
from router.latency_model import new_instance_model


def engine_args(args) -> dict:
    longest = int(1.5 * args.input_len) + int(1.5 * args.output_len) + 1
    base = {
        "max_num_batched_tokens": args.max_batched_tokens,
        "max_model_len": max(2048, -(-longest // 256) * 256),
    }
    if args.gpu:
        return {**base, "extra": {"random_weights": True}}
    return base


def measure_profile(model_dir: str, args) -> dict:
    dtype, device = ("bfloat16", "cuda") if args.gpu else ("float32", "cpu")
    return profile_in_child(
        {"model": model_dir, "dtype": dtype, "device": device, **engine_args(args)},
        repeats=3,
        torch_threads=None if args.gpu else 1,  # as a CPU worker runs (launcher: 1 thread)
    )


def config(model_dir: str, profile_path: str, split: tuple[int, int], args):
    # Prefill workers never decode: no decode CUDA graphs to capture (faster start).
    return bench_config(
        model_dir,
        profile_path,
        args.gpu,
        engine_args(args),
        split,
        prefill_args={"enforce_eager": True} if args.gpu else {},
        max_tokens_limit=2 * args.output_len,
        slo_ms=(args.ttft_slo_ms, args.tpot_slo_ms),
        worker_call_timeout_s=120.0,
    )


async def measure(model_dir, profile_path, split, rates, workload, slo, args) -> list[float]:
    deployment = await deploy(config(model_dir, profile_path, split, args), 0, 0)
    target = f"localhost:{deployment.grpc_port}"
    attainments = []
    try:
        warm = synthetic(8, args.vocab, workload.input_len, workload.output_len, 0.5, seed=99)
        await run_load(target, warm, 2.0, slo=slo, progress=False)
        for i, rate in enumerate(rates):
            bench_args = [
                "--dataset", "synthetic",
                "--input-len", str(workload.input_len),
                "--output-len", str(workload.output_len),
                "--range-ratio", str(workload.range_ratio),
                "--num-requests", str(workload.count(rate)),
                "--rate", f"{rate:.4f}",
                "--burstiness", str(workload.burstiness),
                "--ttft-slo-ms", str(args.ttft_slo_ms),
                "--tpot-slo-ms", str(args.tpot_slo_ms),
                "--seed", str(args.seed + i),
            ]  # fmt: skip
            report = await bench_in_child(target, bench_args, str(Path(args.tmp) / f"{i}.json"))
            summary = report["runs"][0]
            attainments.append(summary["slo_attainment"])
            ttft, tpot = summary["ttft_ms"]["p50"], summary["tpot_ms"]["p50"]
            print(
                f"  measured at {rate:.2f} req/s: attainment {summary['slo_attainment']:.0%}, "
                f"TTFT p50 {ttft or float('nan'):.0f} ms, TPOT p50 {tpot or float('nan'):.1f} ms",
                flush=True,
            )
        return attainments
    finally:
        await deployment.stop()


def model_folder(tmp: str, args) -> str:
    model_dir, args.vocab = serving_model(Path(tmp), args.gpu, **SMALL_SERVING_SHAPE)
    return model_dir


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--gpu", action="store_true", help="Llama-3-8B shape, bf16, one GPU each")
    mode.add_argument("--quick", action="store_true", help="a short CPU smoke run")
    p.add_argument("--max-devices", type=int, default=2, help="the plan's budget")
    p.add_argument("--fractions", default=None, help="of the predicted max rate")
    p.add_argument("--input-len", type=int, default=None)
    p.add_argument("--output-len", type=int, default=None)
    p.add_argument("--num-requests", type=int, default=None)
    p.add_argument("--ttft-slo-ms", type=float, default=None)
    p.add_argument("--tpot-slo-ms", type=float, default=None)
    p.add_argument("--max-batched-tokens", type=int, default=None)
    p.add_argument(
        "--min-duration-s", type=float, default=None, help="of arrivals per rate, at least"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None)
    args = p.parse_args()
    defaults = dict(
        input_len=2048 if args.gpu else 192,
        output_len=64 if args.gpu else 24,
        num_requests=200 if args.gpu else 100,
        ttft_slo_ms=500.0 if args.gpu else 1000.0,
        tpot_slo_ms=50.0 if args.gpu else 100.0,
        max_batched_tokens=2048 if args.gpu else 512,
        min_duration_s=30.0,
        fractions="0.5,0.8,1.0",
    )
    if args.quick:
        defaults.update(input_len=96, output_len=12, num_requests=10, min_duration_s=3.0)
        defaults.update(fractions="0.1,0.2")
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.gpu and torch.cuda.device_count() < args.max_devices:
        raise SystemExit(
            f"--max-devices {args.max_devices}: this machine has {torch.cuda.device_count()} GPUs"
        )
    workload = Workload(
        args.input_len, args.output_len, 0.5, args.num_requests, 1.0, args.min_duration_s
    )
    slo = (args.ttft_slo_ms / 1e3, args.tpot_slo_ms / 1e3)
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
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
        try:
            measured = asyncio.run(
                measure(model_dir, profile_path, split, rates, workload, slo, args)
            )
        finally:
            ray.shutdown()
    print(
        f"\n{describe_run()}; budget "
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
