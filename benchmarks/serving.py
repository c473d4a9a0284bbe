"""`baton bench`: an async load generator against Baton's gRPC API.

Arrivals are a Poisson process at `rate` requests/s (gamma-distributed gaps with shape
`burstiness`: 1 is Poisson, < 1 burstier). Metrics use `vllm bench serve`'s definitions:

    TTFT  request sent → first token received
    TPOT  (E2E − TTFT) / (output tokens − 1), per request
    ITL   every gap between received chunks
    E2E   request sent → last token received
    goodput  requests/s that met every given SLO (TTFT, and TPOT); attainment = their share

`find_max_rate` binary-searches the highest rate at which ≥ 90% of requests meet both the TTFT
and the TPOT SLO; divided by the GPUs serving, that is DistServe's per-GPU goodput. With
`--min-duration-s`, a run at a higher rate sends more requests: a fixed count at a high rate is
a short burst that a backlog absorbs, and the search would pass rates nobody sustains.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from proto import serving_pb2, serving_pb2_grpc


@dataclass
class Prompt:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    max_tokens: int = 64


@dataclass
class RequestResult:
    ok: bool
    prompt_len: int = 0
    output_len: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.output_len - 1) if self.output_len > 1 else None


# -- workloads -----------------------------------------------------------------------------


def synthetic(
    num: int, vocab: int, input_len: int, output_len: int, range_ratio: float, seed: int
) -> list[Prompt]:
    """Random token ids; lengths uniform in [len·(1−r), len·(1+r)]."""
    rng = random.Random(seed)

    def length(mean: int) -> int:
        return max(1, rng.randint(int(mean * (1 - range_ratio)), int(mean * (1 + range_ratio))))

    return [
        Prompt([rng.randrange(3, vocab) for _ in range(length(input_len))], "", length(output_len))
        for _ in range(num)
    ]


def shared_prefix(
    num: int,
    vocab: int,
    num_prefixes: int,
    prefix_len: int,
    input_len: int,
    output_len: int,
    seed: int,
) -> list[Prompt]:
    """`num_prefixes` system prompts of `prefix_len` tokens, each request one of them plus a
    distinct suffix of `input_len` tokens: the prefix cache's workload."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(3, vocab) for _ in range(prefix_len)] for _ in range(num_prefixes)]
    return [
        Prompt(
            rng.choice(prefixes) + [rng.randrange(3, vocab) for _ in range(input_len)],
            "",
            output_len,
        )
        for _ in range(num)
    ]


def from_jsonl(path: str, num: int, output_len: int) -> list[Prompt]:
    """One JSON object per line: `prompt` (text) or `prompt_token_ids`, optional `max_tokens`."""
    prompts = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        prompts.append(
            Prompt(
                row.get("prompt_token_ids", []),
                row.get("prompt", ""),
                row.get("max_tokens", output_len),
            )
        )
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return [prompts[i % len(prompts)] for i in range(num)]


# -- running -------------------------------------------------------------------------------


async def _one(stub, prompt: Prompt, tier: str, slo: tuple[float, float]) -> RequestResult:
    sampling = serving_pb2.SamplingParams(
        max_tokens=prompt.max_tokens, temperature=0.0, ignore_eos=True
    )
    request = serving_pb2.GenerateRequest(
        prompt=prompt.text,
        prompt_token_ids=prompt.token_ids,
        sampling=sampling,
        model=tier,
        ttft_slo_ms=slo[0] * 1e3,
        itl_slo_ms=slo[1] * 1e3,
    )
    start = time.perf_counter()
    result = RequestResult(ok=False, prompt_len=len(prompt.token_ids))
    last = None
    try:
        async for message in stub.Generate(request):
            now = time.perf_counter()
            if not message.token_ids:
                continue
            if last is None:
                result.ttft = now - start
            else:
                result.itl.append(now - last)
            last = now
            result.output_len += len(message.token_ids)
            if message.usage.prompt_tokens:
                result.prompt_len = message.usage.prompt_tokens
        result.e2e = time.perf_counter() - start
        result.ok = True
    except grpc.aio.AioRpcError as e:
        result.error = f"{e.code().name}: {e.details()}"
    return result


async def run_load(
    target: str,
    prompts: list[Prompt],
    rate: float,
    *,
    tier: str = "",
    burstiness: float = 1.0,
    max_concurrency: int | None = None,
    slo: tuple[float, float] = (1.0, 0.1),
    seed: int = 0,
    progress: bool = True,
) -> tuple[list[RequestResult], float]:
    """Send every prompt at the given rate; returns the results and the wall time."""
    rng = np.random.default_rng(seed)
    semaphore = asyncio.Semaphore(max_concurrency or len(prompts))
    done = 0
    async with grpc.aio.insecure_channel(target) as channel:
        stub = serving_pb2_grpc.BatonStub(channel)

        async def fire(prompt: Prompt) -> RequestResult:
            nonlocal done
            async with semaphore:
                result = await _one(stub, prompt, tier, slo)
            done += 1
            if progress:
                print(f"\r  {done}/{len(prompts)} requests", end="", file=sys.stderr, flush=True)
            return result

        start = time.perf_counter()
        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.create_task(fire(prompt)))
            if rate != float("inf"):
                # Gamma gaps with mean 1/rate; shape 1 gives exponential gaps (Poisson).
                await asyncio.sleep(rng.gamma(burstiness, 1.0 / (rate * burstiness)))
        results = await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    if progress:
        print(file=sys.stderr)
    return results, elapsed


def summarize(
    results: list[RequestResult], elapsed: float, rate: float, slo: tuple[float, float]
) -> dict:
    ok = [r for r in results if r.ok]
    ttft_slo, tpot_slo = slo

    def stats(values: list[float]) -> dict:
        if not values:
            return {k: None for k in ("mean", "p50", "p90", "p99")}
        arr = np.asarray(values) * 1e3
        return {
            "mean": float(arr.mean()),
            "p50": float(np.percentile(arr, 50)),
            "p90": float(np.percentile(arr, 90)),
            "p99": float(np.percentile(arr, 99)),
        }

    good = [r for r in ok if r.ttft <= ttft_slo and (r.tpot is None or r.tpot <= tpot_slo)]
    output_tokens = sum(r.output_len for r in ok)
    return {
        "request_rate": rate,
        "num_requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": elapsed,
        "request_throughput": len(ok) / elapsed,
        "output_throughput": output_tokens / elapsed,
        "total_token_throughput": (output_tokens + sum(r.prompt_len for r in ok)) / elapsed,
        "goodput": len(good) / elapsed,
        "slo_attainment": len(good) / len(results) if results else 0.0,
        "slo_ms": {"ttft": ttft_slo * 1e3, "tpot": tpot_slo * 1e3},
        "ttft_ms": stats([r.ttft for r in ok]),
        "tpot_ms": stats([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": stats([gap for r in ok for gap in r.itl]),
        "e2e_ms": stats([r.e2e for r in ok]),
    }


def print_summary(s: dict) -> None:
    print(
        f"rate {s['request_rate']:.2f} req/s: {s['completed']}/{s['num_requests']} ok "
        f"in {s['duration_s']:.1f}s | {s['request_throughput']:.2f} req/s, "
        f"{s['output_throughput']:.1f} out tok/s | goodput {s['goodput']:.2f} req/s, "
        f"attainment {s['slo_attainment']:.0%}"
    )
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        v = s[name]
        if v["mean"] is not None:
            print(
                f"  {name[:-3].upper():5} mean {v['mean']:8.1f}  p50 {v['p50']:8.1f}  "
                f"p90 {v['p90']:8.1f}  p99 {v['p99']:8.1f} ms"
            )
    for error in s["errors"]:
        print(f"  error: {error}")


async def find_max_rate(
    target: str,
    make_prompts,
    slo: tuple[float, float],
    *,
    tier: str,
    low: float,
    high: float,
    iterations: int,
    burstiness: float,
    seed: int,
) -> tuple[float, list[dict]]:
    """Highest rate with ≥ 90% of requests meeting both SLOs (binary search in [low, high]).
    `make_prompts(rate)`: the prompts of one run at that rate."""
    tried = []
    best = 0.0
    for _ in range(iterations):
        rate = (low + high) / 2
        results, elapsed = await run_load(
            target, make_prompts(rate), rate, tier=tier, burstiness=burstiness, slo=slo, seed=seed
        )
        summary = summarize(results, elapsed, rate, slo)
        tried.append(summary)
        print_summary(summary)
        if summary["slo_attainment"] >= 0.9:
            best, low = rate, rate
        else:
            high = rate
    return best, tried


def plot(summaries: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib (pip install 'baton-serve[bench]')", file=sys.stderr)
        return
    rows = sorted(summaries, key=lambda s: s["request_rate"])
    rates = [s["request_rate"] for s in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, metric in zip(axes, ("ttft_ms", "tpot_ms", "e2e_ms")):
        for pct in ("p50", "p90", "p99"):
            ax.plot(rates, [s[metric][pct] for s in rows], marker="o", label=pct)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(f"{metric[:-3].upper()} (ms)")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot written to {path}")


async def bench_in_child(target: str, bench_args: list[str], output: str) -> dict:
    """Run `baton bench --target target *bench_args` in a child process and return its JSON
    report. For benchmarks that host the router in their own process: a load generator on the
    router's event loop would take the CPU time it needs to stream tokens, and measure that."""
    cmd = [sys.executable, "-m", "deploy.cli", "bench", "--target", target, "--output", output]
    child = await asyncio.create_subprocess_exec(
        *cmd, *bench_args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await child.communicate()
    for line in stdout.decode().splitlines():
        if line.startswith(("rate ", "max rate")):
            print(f"    {line}", flush=True)
    if not Path(output).exists():
        tail = "\n".join(stderr.decode().splitlines()[-20:])
        raise RuntimeError(f"baton bench exited with {child.returncode}:\n{tail}")
    return json.loads(Path(output).read_text())


def model_info(target: str, tier: str) -> serving_pb2.ModelInfo:
    with grpc.insecure_channel(target) as channel:
        models = serving_pb2_grpc.BatonStub(channel).ListModels(
            serving_pb2.ListModelsRequest(), timeout=10
        )
    name = tier or models.default_model
    for info in models.models:
        if info.name == name:
            return info
    raise ValueError(f"the server has no tier {name!r}")


def main(args) -> int:
    """Entry point of `baton bench` (arguments defined in deploy/cli.py)."""
    info = model_info(args.target, args.tier)
    vocab = info.vocab_size or 32000
    slo = (args.ttft_slo_ms / 1e3, args.tpot_slo_ms / 1e3)

    def make_prompts(rate: float) -> list[Prompt]:
        num = args.num_requests
        if args.min_duration_s and rate != float("inf"):
            num = max(num, math.ceil(rate * args.min_duration_s))
        if args.dataset == "jsonl":
            return from_jsonl(args.jsonl, num, args.output_len)
        if args.dataset == "shared-prefix":
            return shared_prefix(
                num,
                vocab,
                args.num_prefixes,
                args.prefix_len,
                args.input_len,
                args.output_len,
                args.seed,
            )
        return synthetic(num, vocab, args.input_len, args.output_len, args.range_ratio, args.seed)

    report: dict = {"target": args.target, "tier": info.name, "dataset": args.dataset}
    if args.find_max_rate:
        num_gpus = args.num_gpus or (info.prefill_instances + info.decode_instances)
        best, tried = asyncio.run(
            find_max_rate(
                args.target,
                make_prompts,
                slo,
                tier=args.tier,
                low=0.0,
                high=args.max_rate,
                iterations=args.iterations,
                burstiness=args.burstiness,
                seed=args.seed,
            )
        )
        report |= {
            "max_rate": best,
            "num_gpus": num_gpus,
            "per_gpu_goodput": best / num_gpus,
            "runs": tried,
        }
        print(
            f"max rate with >= 90% SLO attainment: {best:.2f} req/s; "
            f"per GPU ({num_gpus}): {best / num_gpus:.3f} req/s"
        )
        summaries = tried
    else:
        rates = [float(r) for r in str(args.rate).split(",")]
        summaries = []
        for rate in rates:
            results, elapsed = asyncio.run(
                run_load(
                    args.target,
                    make_prompts(rate),
                    rate,
                    tier=args.tier,
                    burstiness=args.burstiness,
                    max_concurrency=args.max_concurrency,
                    slo=slo,
                    seed=args.seed,
                )
            )
            summary = summarize(results, elapsed, rate, slo)
            print_summary(summary)
            summaries.append(summary)
        report["runs"] = summaries
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2))
        print(f"results written to {args.output}")
    if args.plot:
        plot(summaries, args.plot)
    return 0 if all(s["completed"] for s in summaries) else 1
