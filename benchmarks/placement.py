"""Goodput placement vs round-robin on the same workers and workload, one run each.

Workload: a few long shared prefixes (system prompts) + distinct suffixes of mixed lengths, mixed
output lengths, bursty arrivals (gamma, shape 0.5). The prefill instances' KV pools are sized so
one instance cannot cache every prefix (it stands in for a prefix working set larger than HBM):
routing by prefix keeps each prefix hot on one instance, while round-robin makes both instances
cycle through all of them.

One deployment (2 prefill + 2 decode workers) serves every phase; between phases the router's
placement policy is swapped (a fresh policy object, seeded by the same `baton profile` run):

    search  round_robin, then goodput   `baton bench --find-max-rate` (one run each)
    fixed   round_robin, then goodput   `baton bench --rate R`, R midway between the two maxima
                                        unless --rate is given

Each phase starts with the same warm-up (it refills the prefill caches as this policy places and
lets the latency models fit). The load generator runs in a child process (`baton bench`), off
the router's event loop.

    python -m benchmarks.placement                  # CPU, tiny model, local Ray
    python -m benchmarks.placement --quick          # CPU smoke run of the same path (~3 min)
    BATON_COMMIT=... PYTHONPATH=/tmp/site:. python -m benchmarks.placement --gpu
        # 4 GPUs: 2 prefill + 2 decode, Llama-3-8B shape in bf16, random weights, KV over NCCL
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import random
import tempfile
from pathlib import Path

import ray
import torch

from benchmarks.gpu_common import SMALL_SERVING_SHAPE, bench_config, describe_run, serving_model
from benchmarks.serving import Prompt, bench_in_child, run_load
from deploy.launcher import deploy, make_placement
from deploy.profile import profile_in_child

POLICIES = ("round_robin", "goodput")

# Per mode: workload, pools, SLOs and the search. GPU: an 8B prefill of a 3.6k-token prompt
# takes ~0.1 s, of a cached prefix's suffix ~15-30 ms; outputs stay short so the router's
# streaming (Python) is not what saturates first.
DEFAULTS = {
    "gpu": dict(
        num_prefixes=8,
        prefix_len=3072,
        suffix_len="64,1024",
        output_len="16,64",
        prefill_blocks=1024,  # 16k tokens: about half the 8 prefixes
        max_batched_tokens=2048,
        ttft_slo_ms=500.0,
        tpot_slo_ms=50.0,
        max_rate=128.0,
        iterations=6,
        min_requests=200,
        min_duration_s=10.0,
        warmup_rate=16.0,
    ),
    "cpu": dict(
        num_prefixes=6,
        prefix_len=384,
        suffix_len="8,96",
        output_len="8,32",
        prefill_blocks=112,
        max_batched_tokens=512,
        ttft_slo_ms=400.0,
        tpot_slo_ms=60.0,
        max_rate=16.0,
        iterations=4,
        min_requests=50,
        min_duration_s=10.0,
        warmup_rate=4.0,
    ),
    "quick": dict(
        num_prefixes=4,
        prefix_len=128,
        suffix_len="8,48",
        output_len="4,12",
        prefill_blocks=40,
        max_batched_tokens=256,
        ttft_slo_ms=2000.0,
        tpot_slo_ms=500.0,
        max_rate=8.0,
        iterations=2,
        min_requests=12,
        min_duration_s=3.0,
        warmup_rate=4.0,
    ),
}


def span(text: str) -> tuple[int, int]:
    low, high = (int(x) for x in text.split(","))
    return low, high


def workload(num: int, vocab: int, args, seed: int) -> list[Prompt]:
    """Prefixes are the same for every seed (seed 0's); suffixes and lengths follow `seed`."""
    prefix_rng, rng = random.Random(0), random.Random(seed)
    prefixes = [
        [prefix_rng.randrange(3, vocab) for _ in range(args.prefix_len)]
        for _ in range(args.num_prefixes)
    ]
    prompts = []
    for _ in range(num):
        suffix = [rng.randrange(3, vocab) for _ in range(rng.randint(*span(args.suffix_len)))]
        max_tokens = rng.randint(*span(args.output_len))
        prompts.append(Prompt(rng.choice(prefixes) + suffix, "", max_tokens))
    return prompts


def write_jsonl(path: Path, prompts: list[Prompt]) -> str:
    with path.open("w") as f:
        for p in prompts:
            f.write(json.dumps({"prompt_token_ids": p.token_ids, "max_tokens": p.max_tokens}))
            f.write("\n")
    return str(path)


def max_model_len(args) -> int:
    longest = args.prefix_len + span(args.suffix_len)[1] + span(args.output_len)[1]
    return -(-longest // 256) * 256


def engine_args(args) -> dict:
    base = {"max_num_batched_tokens": args.max_batched_tokens, "max_model_len": max_model_len(args)}
    return {**base, "extra": {"random_weights": True}} if args.gpu else base


def config(model_dir: str, profile_path: str | None, args):
    # (Prefill workers capture no decode CUDA graphs: they never decode. PrefillWorker's default.)
    return bench_config(
        model_dir,
        profile_path,
        args.gpu,
        engine_args(args),
        (2, 2),
        prefill_args={"num_blocks": args.prefill_blocks},
        max_tokens_limit=span(args.output_len)[1],
        slo_ms=(args.ttft_slo_ms, args.tpot_slo_ms),
        placement="goodput",
        worker_call_timeout_s=60.0,
    )


async def prefill_cache_counters(deployment) -> dict[str, tuple[int, int]]:
    """Per prefill worker: (prefix-cache hit tokens, queried tokens) so far."""
    stats = await deployment.router.stats()
    return {
        s["worker_id"]: (s["prefix_cache_hit_tokens"], s["prefix_cache_queried_tokens"])
        for s in stats
        if s.get("role") == "prefill" and s.get("alive")
    }


def hit_rates(before: dict, after: dict) -> list[float]:
    rates = []
    for wid in sorted(after):
        hits = after[wid][0] - before.get(wid, (0, 0))[0]
        queried = after[wid][1] - before.get(wid, (0, 0))[1]
        rates.append(round(hits / queried, 3) if queried else 0.0)
    return rates


async def phase(deployment, policy: str, bench_args: list[str], args, out: Path) -> dict:
    """Swap in a fresh `policy`, warm up, run `baton bench` with `bench_args`."""
    cfg = dataclasses.replace(deployment.config, placement=policy)
    deployment.router.placement = make_placement(cfg)
    target = f"localhost:{deployment.grpc_port}"
    slo = (args.ttft_slo_ms / 1e3, args.tpot_slo_ms / 1e3)
    warm = workload(3 * args.num_prefixes, args.vocab, args, seed=99)
    await run_load(target, warm, args.warmup_rate, burstiness=0.5, slo=slo, progress=False)
    await asyncio.sleep(1.5)  # the router drains the workers' step samples once a second
    before = await prefill_cache_counters(deployment)
    common = [
        "--dataset", "jsonl",
        "--num-requests", str(args.min_requests),
        "--min-duration-s", str(args.min_duration_s),
        "--burstiness", "0.5",
        "--ttft-slo-ms", str(args.ttft_slo_ms),
        "--tpot-slo-ms", str(args.tpot_slo_ms),
        "--seed", str(args.seed),
    ]  # fmt: skip
    result = await bench_in_child(target, common + bench_args, str(out))
    result["policy"] = policy
    result["prefill_hit_rates"] = hit_rates(before, await prefill_cache_counters(deployment))
    return result


async def run_phases(model_dir: str, profile_path: str | None, files: dict, args) -> dict:
    deployment = await deploy(config(model_dir, profile_path, args), 0, 0)
    out = Path(files["dir"])
    try:
        search = {}
        search_args = [
            "--jsonl", files["search"],
            "--find-max-rate",
            "--max-rate", str(args.max_rate),
            "--iterations", str(args.iterations),
        ]  # fmt: skip
        for policy in POLICIES:
            print(f"{policy}: baton bench --find-max-rate", flush=True)
            search[policy] = await phase(
                deployment, policy, search_args, args, out / f"search-{policy}.json"
            )
        maxima = [search[p]["max_rate"] for p in POLICIES]
        rate = args.rate or sum(maxima) / 2 or args.max_rate / 2**args.iterations
        fixed = {}
        for policy in POLICIES:
            print(f"{policy}: baton bench --rate {rate:.2f}", flush=True)
            fixed[policy] = await phase(
                deployment,
                policy,
                ["--jsonl", files["fixed"], "--rate", f"{rate:.4f}"],
                args,
                out / f"fixed-{policy}.json",
            )
        return {"rate": rate, "search": search, "fixed": fixed}
    finally:
        await deployment.stop()


def report(results: dict, args) -> None:
    rate = results["rate"]
    print(
        f"\n{describe_run()}; {'4 GPUs' if args.gpu else 'CPU'}: 2 prefill + 2 decode workers, "
        f"one deployment, policy swapped between phases; prefill pools {args.prefill_blocks} "
        f"blocks. Workload: {args.num_prefixes} prefixes of {args.prefix_len} tokens + "
        f"{args.suffix_len.replace(',', '-')} distinct, output {args.output_len.replace(',', '-')}"
        f", gamma(0.5) arrivals, >= {args.min_requests} requests and {args.min_duration_s:.0f} s "
        f"per rate; SLO TTFT {args.ttft_slo_ms:.0f} ms, TPOT {args.tpot_slo_ms:.0f} ms"
    )
    print(
        f"{'policy':12} {'max rate':>8} | at {rate:6.2f} req/s: {'attain':>6} {'goodput':>7} "
        f"{'TTFT p50':>8} {'TTFT p90':>8} {'TPOT p50':>8} {'TPOT p90':>8} {'P hit rates':>15}"
    )
    for policy in POLICIES:
        best = results["search"][policy]["max_rate"]
        fixed = results["fixed"][policy]
        s = fixed["runs"][0]

        def ms(name, q, s=s):
            value = s[name][q]
            return "-" if value is None else f"{value:.1f}"

        print(
            f"{policy:12} {best:8.2f} | {'':17}{s['slo_attainment']:6.0%} {s['goodput']:7.2f} "
            f"{ms('ttft_ms', 'p50'):>8} {ms('ttft_ms', 'p90'):>8} {ms('tpot_ms', 'p50'):>8} "
            f"{ms('tpot_ms', 'p90'):>8} {str(fixed['prefill_hit_rates']):>15}"
        )
    base, smart = (results["search"][p]["max_rate"] for p in POLICIES)
    ratio = f"{smart / base:.2f}x" if base else "n/a (round_robin found no passing rate)"
    print(f"max rate ratio goodput / round_robin: {smart:.2f} / {base:.2f} = {ratio}")
    attain = [results["fixed"][p]["runs"][0]["slo_attainment"] for p in POLICIES]
    print(
        f"attainment at {rate:.2f} req/s: goodput {attain[1]:.0%} vs round_robin {attain[0]:.0%} "
        f"({100 * (attain[1] - attain[0]):+.0f} points)"
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--gpu", action="store_true", help="4 GPUs, Llama-3-8B shape, bf16")
    mode.add_argument("--quick", action="store_true", help="a short CPU smoke run")
    p.add_argument("--rate", type=float, default=None, help="fixed rate; default: between maxima")
    for name, value in DEFAULTS["cpu"].items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=None)
    p.add_argument("--no-profile", action="store_true", help="seed goodput with the CPU prior")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="write every phase's report as JSON here")
    args = p.parse_args()
    for name, value in DEFAULTS["gpu" if args.gpu else "quick" if args.quick else "cpu"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.gpu and torch.cuda.device_count() < 4:
        raise SystemExit(f"--gpu needs 4 GPUs, this machine has {torch.cuda.device_count()}")

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, args.vocab = serving_model(
            Path(tmp),
            args.gpu,
            **SMALL_SERVING_SHAPE,
            max_position_embeddings=max(2048, max_model_len(args)),
        )
        # Enough distinct prompts that no probe repeats one (the last probe is at most max_rate).
        count = max(args.min_requests, math.ceil(args.max_rate * args.min_duration_s))
        files = {
            "dir": tmp,
            "search": write_jsonl(Path(tmp) / "search.jsonl", workload(count, args.vocab, args, 1)),
            "fixed": write_jsonl(Path(tmp) / "fixed.jsonl", workload(count, args.vocab, args, 2)),
        }
        profile_path = None
        if not args.no_profile:
            profile = profile_in_child(
                {
                    "model": model_dir,
                    "dtype": "bfloat16" if args.gpu else "float32",
                    "device": "cuda" if args.gpu else "cpu",
                    **engine_args(args),
                },
                torch_threads=None if args.gpu else 1,  # as a CPU worker runs
            )
            profile_path = str(Path(tmp) / "profile.json")
            Path(profile_path).write_text(json.dumps(profile))
            print(f"profile: prefill {profile['prefill']}, decode {profile['decode']}", flush=True)
        if args.gpu:  # workers' logs shown: a CUDA or NCCL error surfaces in the output
            ray.init(num_cpus=16, num_gpus=4, include_dashboard=False)
        else:
            ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
        try:
            results = asyncio.run(run_phases(model_dir, profile_path, files, args))
        finally:
            ray.shutdown()
    report(results, args)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
