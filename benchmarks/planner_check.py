"""Does `baton plan` predict what the deployment it recommends then does? One run:

1. profile one instance (`deploy.profile.profile`, in a child process, as `baton profile` does);
2. plan: search prefill/decode splits within `--max-devices` by simulation, take the best;
3. deploy that split (goodput placement, the profile seeding the router's latency models) and
   run the planner's workload (same length distribution, gamma arrivals, same SLOs) at a few
   fractions of the predicted maximum rate;
4. print the predicted and the measured SLO attainment side by side, and per rate how the
   prefill worker's steps compare with the profile (`benchmarks/step_report.py`: requests per
   step, budget filled, time stepping, step time / profile for fresh and continued chunks, time
   between steps) and the request overhead the router measured (its part of TTFT).

`--calibrate F`: before measuring, run the workload at F x the predicted max rate, take the
latency models and request overhead the router fitted online from it (`live_profile`), plan
the deployed split again with them, and measure at fractions of that plan's max rate (or, with
`--fractions-of calibrated`, of the calibrated prediction's max rate, below). A third
prediction keeps the offline profile's forms and takes from the calibration run only the
request overhead and the prefill steps' measured-over-predicted ratio per kind of step
(`fit_step_scales`: fresh prompts only, or a continued chunk): "calib pred". All three are
printed.

`--repeats N`: N runs a rate, each with its own arrivals and prompts; the measured attainment
is their mean. One run of ~250 requests is one draw of the arrival process: on 2x H200 two
seeds of the same check measured 99% / 84% at half load and 92% / 81% at the knee (RESULTS.md,
session 9), where the prediction is already a mean over 5 simulated draws.

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
import os
import statistics
import tempfile
from pathlib import Path

import ray
import torch

from benchmarks.gpu_common import SMALL_SERVING_SHAPE, bench_config, describe_run, serving_model
from benchmarks.serving import bench_in_child, run_load, synthetic
from benchmarks.step_report import format_summary, summarize_steps
from deploy.launcher import deploy, kv_bytes_per_token
from deploy.planner import Workload, max_rate, plan, simulate
from deploy.profile import profile_in_child
from engine.config import ModelConfig
from router.latency_model import fit_step_scales, new_instance_model


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
    # (Prefill workers capture no decode CUDA graphs: they never decode. PrefillWorker's default.)
    return bench_config(
        model_dir,
        profile_path,
        args.gpu,
        engine_args(args),
        split,
        prefill_args={},
        max_tokens_limit=2 * args.output_len,
        slo_ms=(args.ttft_slo_ms, args.tpot_slo_ms),
        worker_call_timeout_s=120.0,
    )


async def run_rate(deployment, i: int, rate: float, workload, args) -> dict:
    """One `baton bench` run at `rate`; its summary, with the prefill workers' steps over it
    against the profile and the router's request overhead."""
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
    target = f"localhost:{deployment.grpc_port}"
    router = deployment.router
    queue_before = _reserve_waits(router)
    await _take_step_logs(deployment)  # what ran before this rate
    report = await bench_in_child(target, bench_args, str(Path(args.tmp) / f"{i}.json"))
    summary = report["runs"][0]
    waited_s, queued = (now - before for now, before in zip(_reserve_waits(router), queue_before))
    summary["reserve_wait_ms"] = 1e3 * waited_s / max(queued, 1)
    summary["prefill_steps"] = {}
    logs = await _take_step_logs(deployment)
    for wid, records in logs.items():
        summary["prefill_steps"][wid] = summarize_steps(records, args.model)
    summary["prefill_step_scale"] = fit_step_scales(
        [r for records in logs.values() for r in records], args.model
    )
    overheads = [
        router.placement._p(w).model.request_overhead for w in router.workers if w.role == "prefill"
    ]
    summary["request_overhead_ms"] = 1e3 * statistics.mean(overheads)
    # Other processes on the machine slow every worker (on CPU they share its cores).
    summary["load_average"] = os.getloadavg()[0]
    ttft, tpot = summary["ttft_ms"]["p50"], summary["tpot_ms"]["p50"]
    print(
        f"  measured at {rate:.2f} req/s: attainment {summary['slo_attainment']:.0%}, "
        f"TTFT p50 {ttft or float('nan'):.0f} ms, TPOT p50 {tpot or float('nan'):.1f} ms; "
        f"request overhead (p50 of the last 256) {summary['request_overhead_ms']:.1f} ms, "
        f"decode reservation wait mean {summary['reserve_wait_ms']:.1f} ms; "
        f"1-min load average {summary['load_average']:.1f}",
        flush=True,
    )
    for wid, steps in summary["prefill_steps"].items():
        print(f"    {wid}: {format_summary(steps)}", flush=True)
    return summary


def _reserve_waits(router) -> tuple[float, float]:
    """(seconds, requests) the router's decode reservations waited so far."""
    name, labels = "baton_request_queue_time_seconds", {"tier": "bench"}
    get = router.metrics.registry.get_sample_value
    return get(f"{name}_sum", labels) or 0.0, get(f"{name}_count", labels) or 0.0


async def _take_step_logs(deployment) -> dict[str, list]:
    prefills = [w.worker_id for w in deployment.router.workers if w.role == "prefill"]
    logs = await asyncio.gather(
        *(deployment.actors[wid].take_step_log.remote() for wid in prefills)
    )
    return dict(zip(prefills, logs))


async def measure(model_dir, profile_path, split, rates, workload, slo, args) -> dict:
    """Deploy `split`, optionally calibrate (then `rates` are fractions of the live plan's max
    rate), and measure at each rate."""
    deployment = await deploy(config(model_dir, profile_path, split, args), 0, 0)
    target = f"localhost:{deployment.grpc_port}"
    out = {"rates": rates, "summaries": []}
    try:
        warm = synthetic(8, args.vocab, workload.input_len, workload.output_len, 0.5, seed=99)
        await run_load(target, warm, 2.0, slo=slo, progress=False)
        if args.calibrate:
            rate = args.calibrate * args.offline_max_rate
            print(f"calibrating at {rate:.2f} req/s", flush=True)
            out["calibration"] = await run_rate(deployment, 1000, rate, workload, args)
            router = deployment.router
            live = router.placement.live_profile(router.workers, "bench")
            live["max_num_batched_tokens"] = args.max_batched_tokens
            out["live_profile"] = live
            live_model = new_instance_model(live)
            live_max = max_rate(live_model, *split, workload, slo, args.kv_bytes_per_token)
            print(
                f"live profile: prefill {_short(live['prefill'])}, decode "
                f"{_short(live['decode'])}, request overhead "
                f"{1e3 * live['request_overhead_s']:.1f} ms; max rate {live_max:.2f} req/s",
                flush=True,
            )
            out["live_max_rate"] = live_max
            # The offline profile with the calibration run's prefill step scales and request
            # overhead: the profile's form, as serving runs it.
            calibrated = {
                **json.loads(Path(profile_path).read_text()),
                "request_overhead_s": live["request_overhead_s"],
                "prefill_step_scale": out["calibration"]["prefill_step_scale"],
            }
            out["calibrated_profile"] = calibrated
            calibrated_model = new_instance_model(calibrated)
            calibrated_max = max_rate(
                calibrated_model, *split, workload, slo, args.kv_bytes_per_token
            )
            print(
                f"calibrated profile: prefill step scale {calibrated['prefill_step_scale']}; "
                f"max rate {calibrated_max:.2f} req/s",
                flush=True,
            )
            out["calibrated_max_rate"] = calibrated_max
            base = calibrated_max if args.fractions_of == "calibrated" else live_max
            out["rates"] = rates = [f * base for f in args.fraction_list]
            out["live_predicted"] = predict(live_model, split, rates, workload, slo, args)
            out["calibrated_predicted"] = predict(
                calibrated_model, split, rates, workload, slo, args
            )
        # Each rate's runs in turn, `--repeats` rounds: drift in the machine hits all alike.
        out["runs"] = [[] for _ in rates]
        for repeat in range(args.repeats):
            for i, rate in enumerate(rates):
                summary = await run_rate(deployment, i + 100 * repeat, rate, workload, args)
                out["summaries"].append(summary)
                out["runs"][i].append(summary["slo_attainment"])
        return out
    finally:
        await deployment.stop()


def predict(model, split, rates, workload, slo, args) -> list[float]:
    """The simulation's attainment, averaged over seeds (one run is as noisy as the real one)."""
    return [
        statistics.mean(
            simulate(model, *split, rate, workload, slo, args.kv_bytes_per_token, seed=s)
            for s in range(5)
        )
        for rate in rates
    ]


def _short(coef) -> str:
    return "[" + ", ".join(f"{c:.3g}" for c in coef) + "]"


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
    p.add_argument(
        "--fractions-of",
        choices=["live", "calibrated"],
        default="live",
        help="with --calibrate: measure at fractions of the live models' max rate, or of the "
        "calibrated profile's (the highest rate that plan would be recommended for)",
    )
    p.add_argument(
        "--calibrate",
        type=float,
        default=0.0,
        metavar="F",
        help="plan again from the router's live models after a run at F x the predicted max",
    )
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
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs a rate, each with its own arrivals (seed); measured = their mean attainment "
        "(the prediction is already a mean over 5 simulated ones)",
    )
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
    args.fraction_list = [float(f) for f in args.fractions.split(",")]
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
        args.model = model = new_instance_model(profile)
        # What one prompt token's KV costs to send, as the router counts it for the transfer.
        model_config = ModelConfig.from_pretrained(model_dir)
        args.kv_bytes_per_token = kv_bytes_per_token(model_config, 2 if args.gpu else 4, {})
        rows = plan(model, workload, slo, args.max_devices, None, args.kv_bytes_per_token)
        best = rows[0]
        split = (best["prefill"], best["decode"])
        args.offline_max_rate = best["max_rate"]
        rates = [f * best["max_rate"] for f in args.fraction_list]
        print(
            f"profile: prefill {_short(profile['prefill'])}, decode {_short(profile['decode'])}"
            f"\nplan: {split[0]} prefill + {split[1]} decode, predicted max rate "
            f"{best['max_rate']:.2f} req/s",
            flush=True,
        )
        if args.gpu:
            ray.init(num_cpus=16, num_gpus=args.max_devices, include_dashboard=False)
        else:
            ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        try:
            result = asyncio.run(
                measure(model_dir, profile_path, split, rates, workload, slo, args)
            )
        finally:
            ray.shutdown()
    rates = result["rates"]
    predicted = predict(model, split, rates, workload, slo, args)
    runs = result["runs"]
    measured = [statistics.mean(r) for r in runs]
    print(
        f"\n{describe_run()}; budget "
        f"{args.max_devices} devices; workload {args.input_len}+-50% in / {args.output_len}+-50% "
        f"out, >= {args.num_requests} requests and {args.min_duration_s:.0f} s of arrivals per "
        f"rate ({args.repeats} run(s) a rate, each its own arrivals: measured = their mean), "
        f"Poisson; SLO TTFT {args.ttft_slo_ms:.0f} "
        f"ms, TPOT {args.tpot_slo_ms:.0f} ms; token budget {args.max_batched_tokens}"
    )
    print(f"profile: prefill {profile['prefill']}, decode {profile['decode']}")
    print(f"plan: {split[0]} prefill + {split[1]} decode")
    live, calibrated = result.get("live_predicted"), result.get("calibrated_predicted")
    header = f"{'rate':>7} {'predicted':>9} {'measured':>9} {'diff pts':>9}"
    if live:
        header += f" {'live pred':>9} {'diff pts':>9} {'calib pred':>10} {'diff pts':>9}"
    print(header)
    for k, (rate, pred, meas) in enumerate(zip(rates, predicted, measured)):
        line = f"{rate:7.2f} {pred:9.0%} {meas:9.0%} {100 * (meas - pred):+9.0f}"
        if live:
            line += f" {live[k]:9.0%} {100 * (meas - live[k]):+9.0f}"
            line += f" {calibrated[k]:10.0%} {100 * (meas - calibrated[k]):+9.0f}"
        if len(runs[k]) > 1:
            line += "   runs " + " ".join(f"{a:.0%}" for a in runs[k])
        print(line)
    if args.output:
        Path(args.output).write_text(
            json.dumps(
                {
                    "plan": best,
                    "profile": profile,
                    "rates": rates,
                    "predicted": predicted,
                    "measured": measured,
                    **{k: v for k, v in result.items() if k != "rates"},
                },
                indent=1,
                default=str,
            )
        )


if __name__ == "__main__":
    main()
