"""Goodput placement vs the baselines, same workers, same workload, one run.

Workload: mixed prompt lengths over a few long shared prefixes (system prompts), bursty
arrivals (gamma, shape 0.5). The prefill instances' KV pools are sized so one instance cannot
cache every prefix: routing by prefix keeps each prefix hot on one instance, while round-robin
makes both instances cycle through all of them.

    python -m benchmarks.placement                      # CPU, tiny model, local Ray
    python -m benchmarks.placement --policies round_robin,least_loaded,goodput --rate 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import subprocess
import tempfile

import ray
import torch

from benchmarks.serving import Prompt, find_max_rate, run_load, summarize
from deploy.config import BatonConfig
from deploy.launcher import deploy
from engine.testing import write_test_checkpoint


def workload(num: int, vocab: int, num_prefixes: int, prefix_len: int, seed: int) -> list[Prompt]:
    rng = random.Random(seed)
    prefixes = [[rng.randrange(3, vocab) for _ in range(prefix_len)] for _ in range(num_prefixes)]
    prompts = []
    for _ in range(num):
        suffix = [rng.randrange(3, vocab) for _ in range(rng.randint(8, 96))]
        prompts.append(Prompt(rng.choice(prefixes) + suffix, "", rng.randint(8, 32)))
    return prompts


def config(model_dir: str, policy: str, prefill_blocks: int) -> BatonConfig:
    engine_args = {"max_num_batched_tokens": 512, "max_model_len": 2048}
    return BatonConfig.from_dict(
        {
            "tiers": {
                "bench": {
                    "model": model_dir,
                    "dtype": "float32",
                    "engine_args": {**engine_args, "num_blocks": prefill_blocks},
                }
            },
            "pools": [
                {"tier": "bench", "role": "prefill", "count": 2},
                {"tier": "bench", "role": "decode", "count": 2},
            ],
            "placement": policy,
        "http_port": None,  # gRPC only: the benchmark drives it with baton bench's client
        }
    )


async def measure(model_dir, policy, args, slo) -> dict:
    deployment = await deploy(config(model_dir, policy, args.prefill_blocks), 0, 0)
    target = f"localhost:{deployment.grpc_port}"
    try:
        warm = workload(8, args.vocab, args.num_prefixes, args.prefix_len, seed=99)
        await run_load(target, warm, 4.0, slo=slo, progress=False)  # let the models fit
        await asyncio.sleep(1.5)
        prompts = workload(
            args.num_requests, args.vocab, args.num_prefixes, args.prefix_len, args.seed
        )
        results, elapsed = await run_load(
            target, prompts, args.rate, burstiness=0.5, slo=slo, seed=args.seed, progress=False
        )
        fixed = summarize(results, elapsed, args.rate, slo)
        stats = await deployment.router.stats()
        hit_rate = [
            round(s.get("prefix_cache_hit_rate", 0.0), 3)
            for s in stats
            if s.get("role") == "prefill"
        ]
        best = None
        if args.find_max_rate:
            best, _ = await find_max_rate(
                target,
                lambda: workload(
                    args.search_requests,
                    args.vocab,
                    args.num_prefixes,
                    args.prefix_len,
                    args.seed + 1,
                ),
                slo,
                tier="",
                low=0.0,
                high=args.max_rate,
                iterations=args.iterations,
                burstiness=0.5,
                seed=args.seed,
            )
        return {
            "policy": policy,
            "fixed_rate": fixed,
            "prefill_hit_rates": hit_rate,
            "max_rate": best,
        }
    finally:
        await deployment.stop()


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--policies", default="round_robin,goodput")
    p.add_argument("--rate", type=float, default=3.0)
    p.add_argument("--num-requests", type=int, default=80)
    p.add_argument("--num-prefixes", type=int, default=6)
    p.add_argument("--prefix-len", type=int, default=384)
    p.add_argument("--prefill-blocks", type=int, default=112, help="KV blocks per instance")
    p.add_argument("--ttft-slo-ms", type=float, default=400.0)
    p.add_argument("--tpot-slo-ms", type=float, default=60.0)
    p.add_argument("--find-max-rate", action="store_true")
    p.add_argument("--max-rate", type=float, default=12.0)
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--search-requests", type=int, default=50)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None)
    args = p.parse_args()
    args.vocab = 2048
    slo = (args.ttft_slo_ms / 1e3, args.tpot_slo_ms / 1e3)

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(
            write_test_checkpoint(
                tmp,
                vocab_size=args.vocab,
                hidden_size=args.hidden_size,
                intermediate_size=args.hidden_size * 3,
                num_hidden_layers=args.layers,
                num_attention_heads=args.hidden_size // 64,
                num_key_value_heads=2,
                max_position_embeddings=2048,
                with_tokenizer=False,
            )
        )
        for policy in args.policies.split(","):
            rows.append(asyncio.run(measure(model_dir, policy, args, slo)))
    ray.shutdown()

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    print(
        f"commit {commit}, {platform.machine()} CPU, torch {torch.__version__}; 2 prefill + 2 "
        f"decode workers; {args.num_requests} requests, {args.num_prefixes} prefixes of "
        f"{args.prefix_len} tokens + 8-96, output 8-32, gamma(0.5) arrivals at {args.rate}/s; "
        f"SLO TTFT {args.ttft_slo_ms:.0f} ms, TPOT {args.tpot_slo_ms:.0f} ms"
    )
    print(
        f"{'policy':14} {'attain':>7} {'goodput':>8} {'TTFT p50':>9} {'TTFT p90':>9} "
        f"{'TPOT p50':>9} {'P hit rates':>14} {'max rate':>9}"
    )
    for r in rows:
        f = r["fixed_rate"]
        max_rate = "-" if r["max_rate"] is None else f"{r['max_rate']:.2f}"
        print(
            f"{r['policy']:14} {f['slo_attainment']:7.0%} {f['goodput']:8.2f} "
            f"{f['ttft_ms']['p50']:9.1f} {f['ttft_ms']['p90']:9.1f} {f['tpot_ms']['p50']:9.1f} "
            f"{str(r['prefill_hit_rates']):>14} {max_rate:>9}"
        )
    base, smart = rows[0], rows[-1]
    print(
        f"attainment {smart['policy']} / {base['policy']}: "
        f"{smart['fixed_rate']['slo_attainment']:.0%} vs {base['fixed_rate']['slo_attainment']:.0%}"
    )
    if args.find_max_rate and base["max_rate"]:
        print(f"max rate ratio: {smart['max_rate'] / base['max_rate']:.2f}x")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
