"""`baton plan`: how many prefill and decode instances to run, by simulating the workload against
the latency models of a profile (DistServe's approach: simulate, then search).

The simulation: Poisson (or gamma) arrivals; a request reaches its prefill instance after the
profile's request overhead (the router's part of TTFT: placement, the decode reservation, the
calls' round trips; measured by a live deployment, 0 in an offline profile). Each prefill
instance steps as the engine schedules a prefill worker: every step takes requests first come
first served, each chunk cut to the token budget left (chunked prefill; several prompts per
step), and costs the profile's prefill form on the step's tokens and attention pairs; a request
arriving during a step joins the next; its first token is out when the step computing its last
prompt token ends and its KV has left (the transfer's exposed time). Each decode instance runs
continuous batching, every step costing the profile's decode step time for its batch and
context; requests go to the prefill instance with the least prompt work queued and to the decode
instance with the smallest batch. A request meets the SLOs when its TTFT and its TPOT are
within them. A profile without a token budget runs one whole prompt per step.

For each split (prefill, decode) within the GPU budget it finds the highest rate with ≥ 90%
attainment (binary search), and recommends the split with the best rate per GPU — or, given a
target rate, the cheapest split that sustains it.

GPU types: given a profile per type (`GpuType`: its latency models, measured on that card, and
its cost per hour), the search also chooses each pool's type — the prefill pool's type sets the
prefill steps, the request overhead and the transfer time (the sender's profile measured it),
the decode pool's sets the decode steps — and ranks splits by requests per dollar when every
type has a cost (per GPU otherwise); with a target rate, the split of least cost per hour.
"""

from __future__ import annotations

import heapq
import json
import math
import random
from collections import deque
from dataclasses import dataclass

from router.latency_model import InstanceModel, load_profile, new_instance_model


@dataclass
class Workload:
    input_len: int = 512
    output_len: int = 128
    range_ratio: float = 0.5
    num_requests: int = 400
    burstiness: float = 1.0
    # At least this long a run of arrivals: a fixed count of requests at a high rate is a short
    # burst that a backlog absorbs, and the search then finds rates no instance sustains.
    min_duration_s: float = 60.0

    def count(self, rate: float) -> int:
        """Requests in a run at `rate`."""
        return max(self.num_requests, math.ceil(rate * self.min_duration_s))

    def sample(self, rate: float, rng: random.Random) -> list[tuple[float, int, int]]:
        t, out = 0.0, []
        for _ in range(self.count(rate)):
            t += rng.gammavariate(self.burstiness, 1.0 / (rate * self.burstiness))

            def length(mean: int) -> int:
                spread = int(mean * self.range_ratio)
                return max(1, rng.randint(mean - spread, mean + spread))

            out.append((t, length(self.input_len), length(self.output_len)))
        return out


class PrefillInstance:
    """One prefill worker's engine, step by step (engine/scheduler.py in the prefill role: the
    request in progress first, then waiting ones first come first served, each chunk cut to the
    budget left; a request whose last prompt token is computed leaves at the step's end)."""

    def __init__(self, model: InstanceModel):
        self.model = model
        self.budget = model.max_num_batched_tokens or math.inf
        self.whole_prompts = not model.max_num_batched_tokens  # one prompt per step
        self.clock = 0.0  # when the running step ends (or the last one ended)
        self.queue: deque[list[int]] = deque()  # [request, prompt length, computed], FCFS
        self.backlog_tokens = 0

    def add(self, request: int, length: int, now: float) -> None:
        """`now` >= the running step's start: call `run_until(now)` first."""
        if not self.queue:
            self.clock = max(self.clock, now)
        self.queue.append([request, length, 0])
        self.backlog_tokens += length

    def run_until(self, t: float, done: dict[int, float]) -> None:
        """Run the steps that start before `t`; `done[request]` = the end of its last step."""
        while self.queue and self.clock < t:
            budget, chunks = self.budget, []
            for entry in self.queue:
                if budget <= 0 or (self.whole_prompts and chunks):
                    break
                n = min(entry[1] - entry[2], budget)
                chunks.append((entry, n))
                budget -= n
            self.clock += self.model.prefill_step_time([(n, e[2] + n) for e, n in chunks])
            for entry, n in chunks:
                entry[2] += n
                self.backlog_tokens -= n
            while self.queue and self.queue[0][2] == self.queue[0][1]:
                done[self.queue.popleft()[0]] = self.clock


@dataclass
class GpuType:
    """A kind of GPU a pool may run on: the latency models of an instance on it (its profile)
    and what one costs per hour (0: unknown)."""

    name: str
    model: InstanceModel
    cost_per_hour: float = 0.0


def simulate(
    model: InstanceModel,
    num_prefill: int,
    num_decode: int,
    rate: float,
    workload: Workload,
    slo: tuple[float, float],
    kv_bytes_per_token: int = 0,
    seed: int = 0,
    decode_model: InstanceModel | None = None,
) -> float:
    """SLO attainment (share of requests meeting TTFT and TPOT) of one simulated run. `model`
    prices prefill, the request overhead and the transfer; `decode_model` (default `model`)
    the decode steps, when the decode pool runs on another GPU type."""
    decode_model = decode_model or model
    rng = random.Random(seed)
    requests = workload.sample(rate, rng)
    instances = [PrefillInstance(model) for _ in range(num_prefill)]
    done: dict[int, float] = {}
    for i, (arrival, length, _) in enumerate(requests):
        at_worker = arrival + model.request_overhead
        for instance in instances:
            instance.run_until(at_worker, done)
        p = min(range(num_prefill), key=lambda k: instances[k].backlog_tokens)
        instances[p].add(i, length, at_worker)
    for instance in instances:
        instance.run_until(math.inf, done)
    ready = []  # (time the first token is out and the KV on the decode side, request index)
    ttft = {}
    for i, (arrival, length, _) in enumerate(requests):
        # The prefill call answers once the KV has left (prefill_worker/worker.py).
        ttft[i] = done[i] + model.transfer_time(length * kv_bytes_per_token) - arrival
        heapq.heappush(ready, (arrival + ttft[i], i))
    # Decode: each instance steps its batch; arrivals join at the next step boundary.
    clocks = [0.0] * num_decode
    batches: list[dict[int, list]] = [{} for _ in range(num_decode)]  # i -> [ctx, left, t_first]
    tpot = {}
    while ready or any(batches):
        d = min(range(num_decode), key=lambda k: clocks[k] if batches[k] else float("inf"))
        if ready and (not batches[d] or ready[0][0] <= clocks[d]):
            t, i = heapq.heappop(ready)
            d = min(range(num_decode), key=lambda k: (len(batches[k]), k))
            clocks[d] = max(clocks[d], t) if not batches[d] else clocks[d]
            _, length, out_len = requests[i]
            if out_len <= 1:
                tpot[i] = 0.0
                continue
            batches[d][i] = [length + 1, out_len - 1, clocks[d]]
            continue
        batch = batches[d]
        step = decode_model.decode_step(len(batch), sum(v[0] for v in batch.values()))
        clocks[d] += step
        for i in list(batch):
            entry = batch[i]
            entry[0] += 1
            entry[1] -= 1
            if entry[1] == 0:
                tpot[i] = (clocks[d] - entry[2]) / (requests[i][2] - 1)
                del batch[i]
    met = sum(ttft[i] <= slo[0] and tpot.get(i, 0.0) <= slo[1] for i in range(len(requests)))
    return met / len(requests)


def max_rate(
    model,
    num_prefill,
    num_decode,
    workload,
    slo,
    kv_bytes_per_token=0,
    high: float = 256.0,
    iterations: int = 14,
    decode_model=None,
) -> float:
    """Highest rate with ≥ 90% attainment in the simulation (binary search)."""
    # No split sustains more than its prefill instances serve: search below that. A prompt
    # costs at least its tokens, its share of full steps' fixed cost, and its attention pairs
    # (at least length² / 2 however it is chunked); a cost convex in the length, so the mean
    # length gives an upper bound.
    prefill_s = _least_prefill_cost(model, workload.input_len)
    if prefill_s > 0:
        high = min(high, 1.5 * num_prefill / prefill_s)
    low = 0.0
    for _ in range(iterations):
        mid = (low + high) / 2
        attainment = simulate(
            model, num_prefill, num_decode, mid, workload, slo, kv_bytes_per_token, 0, decode_model
        )
        if attainment >= 0.9:
            low = mid
        else:
            high = mid
    return low


def _least_prefill_cost(model: InstanceModel, length: int) -> float:
    if not model.max_num_batched_tokens:
        return model.prefill_time(length, length)
    a, b, c = model.prefill.coef
    return a * length / model.max_num_batched_tokens + b * length + c * length * length / 2


def plan(
    types: InstanceModel | list[GpuType],
    workload,
    slo,
    max_gpus: int,
    target_rate: float | None = None,
    kv_bytes_per_token: int = 0,
) -> list[dict]:
    """Every split within the budget, best first: each pool's GPU type among `types` (one
    InstanceModel: a single, unnamed type) and the instance counts."""
    if isinstance(types, InstanceModel):
        types = [GpuType("gpu", types)]
    priced = all(t.cost_per_hour > 0 for t in types)
    rows = []
    for p_type in types:
        for d_type in types:
            for num_prefill in range(1, max_gpus):
                for num_decode in range(1, max_gpus - num_prefill + 1):
                    rate = max_rate(
                        p_type.model,
                        num_prefill,
                        num_decode,
                        workload,
                        slo,
                        kv_bytes_per_token,
                        decode_model=d_type.model,
                    )
                    gpus = num_prefill + num_decode
                    cost = num_prefill * p_type.cost_per_hour + num_decode * d_type.cost_per_hour
                    rows.append(
                        {
                            "prefill_type": p_type.name,
                            "decode_type": d_type.name,
                            "prefill": num_prefill,
                            "decode": num_decode,
                            "gpus": gpus,
                            "cost_per_hour": cost,
                            "max_rate": rate,
                            "per_gpu": rate / gpus,
                            # Requests served per dollar at the max rate.
                            "per_dollar": rate * 3600 / cost if priced else None,
                        }
                    )
    by_name = {t.name: t for t in types}
    if target_rate is not None:
        ok = [r for r in rows if r["max_rate"] >= target_rate]
        for r in ok:
            r["attainment_at_target"] = attainment_of(
                r, by_name, target_rate, workload, slo, kv_bytes_per_token
            )
        cheapest = (lambda r: r["cost_per_hour"]) if priced else (lambda r: r["gpus"])
        return sorted(ok, key=lambda r: (cheapest(r), -r["max_rate"]))
    if priced:
        return sorted(rows, key=lambda r: (-r["per_dollar"], r["gpus"]))
    return sorted(rows, key=lambda r: (-r["per_gpu"], r["gpus"]))


def attainment_of(row: dict, types: dict[str, GpuType], rate, workload, slo, kv_bytes_per_token):
    """The simulated attainment of a `plan` row at `rate`."""
    return simulate(
        types[row["prefill_type"]].model,
        row["prefill"],
        row["decode"],
        rate,
        workload,
        slo,
        kv_bytes_per_token,
        decode_model=types[row["decode_type"]].model,
    )


def gpu_types(profiles: list[str], costs: list[str], config: str | None) -> list[GpuType]:
    """`baton plan`'s --profile [TYPE=]FILE arguments as GPU types, priced by --cost TYPE=$ and
    by the pools of --config (their gpu_type and cost_per_hour)."""
    prices: dict[str, float] = {}
    if config:
        from deploy.config import BatonConfig

        for pool in BatonConfig.load(config).pools:
            if pool.cost_per_hour > 0:
                prices.setdefault(pool.gpu_type, pool.cost_per_hour)
    for item in costs:
        name, _, value = item.partition("=")
        try:
            prices[name] = float(value)
        except ValueError:
            raise ValueError(f"--cost {item!r}: expected TYPE=DOLLARS_PER_HOUR") from None
    types = []
    for item in profiles:
        name, _, path = item.rpartition("=")
        name = name or "gpu"
        if any(t.name == name for t in types):
            raise ValueError(f"--profile: GPU type {name!r} given twice")
        types.append(GpuType(name, new_instance_model(load_profile(path)), prices.get(name, 0.0)))
    if len(types) > 1 and any(t.name == "gpu" for t in types):
        raise ValueError("--profile: with several profiles, name each one's GPU type (TYPE=FILE)")
    return types


def main(args) -> int:
    try:
        types = gpu_types(args.profile, args.cost, args.config)
    except (ValueError, OSError) as e:
        print(f"baton plan: {e}")
        return 2
    workload = Workload(
        args.input_len,
        args.output_len,
        args.range_ratio,
        args.num_requests,
        args.burstiness,
        args.min_duration_s,
    )
    slo = (args.ttft_slo_ms / 1e3, args.tpot_slo_ms / 1e3)
    rows = plan(types, workload, slo, args.max_gpus, args.rate, args.kv_bytes_per_token)
    if not rows or (not args.rate and rows[0]["max_rate"] <= 0):
        wanted = f"{args.rate} req/s" if args.rate else "any rate"
        print(f"no split within {args.max_gpus} GPUs sustains {wanted} at the SLOs")
        return 1
    best = rows[0]
    typed = len(types) > 1
    priced = best["per_dollar"] is not None
    print(
        (f"{'prefill on':>12} {'decode on':>12} " if typed else "")
        + f"{'prefill':>7} {'decode':>6} {'max rate':>9} {'per GPU':>8}"
        + (f" {'$/hour':>8} {'req/$':>8}" if priced else "")
    )
    for r in rows[:8]:
        print(
            (f"{r['prefill_type']:>12} {r['decode_type']:>12} " if typed else "")
            + f"{r['prefill']:7d} {r['decode']:6d} {r['max_rate']:9.2f} {r['per_gpu']:8.3f}"
            + (f" {r['cost_per_hour']:8.2f} {r['per_dollar']:8.0f}" if priced else "")
        )
    rate = args.rate or best["max_rate"]
    by_name = {t.name: t for t in types}
    attainment = attainment_of(best, by_name, rate, workload, slo, args.kv_bytes_per_token)
    where = f" ({best['prefill_type']} / {best['decode_type']})" if typed else ""
    cost = (
        f", ${best['cost_per_hour'] / rate / 3600 * 1000:.4f} per 1000 requests" if priced else ""
    )
    print(
        f"plan: {best['prefill']} prefill + {best['decode']} decode{where}; predicted SLO "
        f"attainment {attainment:.0%} at {rate:.2f} req/s ({rate / best['gpus']:.3f} req/s per "
        f"GPU{cost})"
    )
    if args.output:
        with open(args.output, "w") as f:
            json.dump(
                {
                    "plan": best,
                    "predicted_attainment": attainment,
                    "rate": rate,
                    "candidates": rows,
                },
                f,
                indent=2,
            )
    return 0
