"""Tier routing on a two-tier deployment: `auto` vs always-large, same workload, one run each.

Tiers: `small` (a 2-layer model, quality 0.6, $1 per instance-hour) and `large` (a 6-layer,
wider model, quality 0.9, $4 per instance-hour), one prefill and one decode instance each.
A share of the requests asks for `min_quality` 0.8 (only `large` qualifies); the rest set none.

Reported per mode: SLO attainment, measured cost per request (each instance's busy time, the sum
of its engine step times from its metrics, times its price, over completed requests), the tiers
used, and whether every quality floor was respected.

    python -m benchmarks.tiers
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import random
import subprocess
import tempfile
import time

import grpc
import ray
import torch
from prometheus_client.parser import text_string_to_metric_families

from deploy.config import BatonConfig
from deploy.launcher import deploy
from engine.testing import write_test_checkpoint
from proto import serving_pb2, serving_pb2_grpc

PRICES = {"small": 1.0, "large": 4.0}


def make_config(small: str, large: str, cost_weight: float) -> BatonConfig:
    engine_args = {"num_blocks": 512, "max_num_batched_tokens": 512, "max_model_len": 1024}
    tiers, pools = {}, []
    for name, path, quality in (("small", small, 0.6), ("large", large, 0.9)):
        tiers[name] = {
            "model": path,
            "dtype": "float32",
            "engine_args": engine_args,
            "quality": quality,
            "ttft_slo_ms": 1000,
            "tpot_slo_ms": 100,
        }
        for role in ("prefill", "decode"):
            pools.append({"tier": name, "role": role, "count": 1, "cost_per_hour": PRICES[name]})
    return BatonConfig.from_dict(
        {
            "tiers": tiers,
            "pools": pools,
            "default_tier": "large",
            "tier_cost_weight": cost_weight,
            "http_port": None,
        }
    )


def workload(num: int, floor_share: float, seed: int):
    rng = random.Random(seed)
    return [
        (
            [rng.randrange(3, 500) for _ in range(rng.randint(16, 200))],
            rng.randint(8, 32),
            0.8 if rng.random() < floor_share else 0.0,
        )
        for _ in range(num)
    ]


async def run(target: str, requests, model: str, rate: float, seed: int):
    rng = random.Random(seed)
    results = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = serving_pb2_grpc.BatonStub(channel)

        async def one(prompt, max_tokens, floor):
            sp = serving_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
            req = serving_pb2.GenerateRequest(
                prompt_token_ids=prompt, sampling=sp, model=model, min_quality=floor
            )
            start, first, last = time.perf_counter(), None, None
            async for m in stub.Generate(req):
                now = time.perf_counter()
                first = first or now
                last = m
            e2e = time.perf_counter() - start
            tpot = (e2e - (first - start)) / max(max_tokens - 1, 1)
            results.append(
                {
                    "tier": last.model,
                    "floor": floor,
                    "ttft": first - start,
                    "tpot": tpot,
                    "cost": last.estimated_cost,
                }
            )

        tasks = []
        for prompt, max_tokens, floor in requests:
            tasks.append(asyncio.create_task(one(prompt, max_tokens, floor)))
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
    return results


def busy_cost(text: str) -> float:
    """$ of busy time: Σ over instances of engine step seconds × the instance's price."""
    dollars = 0.0
    for family in text_string_to_metric_families(text):
        if family.name != "baton_engine_step_seconds":
            continue
        for s in family.samples:
            if s.name.endswith("_sum"):
                dollars += s.value * PRICES[s.labels["tier"]] / 3600
    return dollars


async def measure(config: BatonConfig, model: str, requests, rate: float, seed: int) -> dict:
    deployment = await deploy(config, 0, 0)
    try:
        target = f"localhost:{deployment.grpc_port}"
        await run(target, workload(6, 0.5, seed + 7), model, 4.0, seed)  # warm-up, models fit
        await asyncio.sleep(2.5)
        before = busy_cost(_scrape(deployment))
        results = await run(target, requests, model, rate, seed)
        await asyncio.sleep(2.5)  # the router refreshes worker metrics every second
        after = busy_cost(_scrape(deployment))
    finally:
        await deployment.stop()
    met = [r for r in results if r["ttft"] <= 1.0 and r["tpot"] <= 0.1]
    return {
        "mode": model or "auto",
        "attainment": len(met) / len(results),
        "cost_per_request": (after - before) / len(results),
        "tiers": {t: sum(r["tier"] == t for r in results) for t in ("small", "large")},
        "floor_respected": all(r["tier"] == "large" for r in results if r["floor"] >= 0.8),
        "num_floor": sum(r["floor"] >= 0.8 for r in results),
    }


def _scrape(deployment) -> str:
    from prometheus_client import generate_latest

    return generate_latest(deployment.router.metrics.registry).decode()


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--num-requests", type=int, default=60)
    p.add_argument("--rate", type=float, default=3.0)
    p.add_argument("--floor-share", type=float, default=0.3)
    p.add_argument(
        "--cost-weight", type=float, default=1000.0, help="quality points per $ of estimated cost"
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        small = str(
            write_test_checkpoint(
                f"{tmp}/small",
                vocab_size=512,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                with_tokenizer=False,
                seed=1,
            )
        )
        large = str(
            write_test_checkpoint(
                f"{tmp}/large",
                vocab_size=512,
                hidden_size=256,
                intermediate_size=768,
                num_hidden_layers=6,
                num_attention_heads=4,
                num_key_value_heads=2,
                with_tokenizer=False,
                seed=2,
            )
        )
        config = make_config(small, large, args.cost_weight)
        requests = workload(args.num_requests, args.floor_share, args.seed)
        for model in ("large", "auto"):
            rows.append(asyncio.run(measure(config, model, requests, args.rate, args.seed)))
    ray.shutdown()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    print(
        f"commit {commit}, {platform.machine()} CPU, torch {torch.__version__}; "
        f"{args.num_requests} requests at {args.rate}/s, {args.floor_share:.0%} with "
        f"min_quality 0.8; SLO TTFT 1 s, TPOT 100 ms; prices small $1/h, large $4/h"
    )
    print(
        f"{'mode':6} {'attainment':>10} {'$/request':>11} {'small':>6} {'large':>6} {'floor ok':>9}"
    )
    for r in rows:
        print(
            f"{r['mode']:6} {r['attainment']:10.0%} {r['cost_per_request']:11.2e} "
            f"{r['tiers']['small']:6d} {r['tiers']['large']:6d} "
            f"{str(r['floor_respected']):>9} ({r['num_floor']} with a floor)"
        )
    print(
        f"cost ratio auto / always-large: "
        f"{rows[1]['cost_per_request'] / rows[0]['cost_per_request']:.2f}"
    )


if __name__ == "__main__":
    main()
