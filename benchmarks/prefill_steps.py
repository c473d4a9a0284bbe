"""One prefill engine's steps against the latency model the planner uses (issue 5), with no Ray
and no KV transfer: is the excess of continued-chunk steps in the engine or in serving?

On two H100s (RESULTS.md, "Session 4: the planner on two H100s"), the serving prefill worker's
steps holding a continued chunk (a chunk of a prompt whose earlier chunk ran in an earlier step)
took 1.74-1.93x the profile's prediction, steps of fresh prompts only 0.51-0.82x. This runs the
same workload on ONE engine in this process: prompts of `--input-len` +-`--range-ratio` tokens
(random ids), one output token each (a prefill worker samples one), the token budget, prefix
caching on and no decode graphs (the prefill pool's config), either all queued at once
(`--mode backlog`: back-to-back steps) or arriving as a Poisson process (`--mode poisson`,
added between steps by the wall clock). The latency model is fitted first by
`deploy.profile.profile` on the same engine arguments, in this process, as `baton profile` and
`planner_check` fit it (or read from `--latency-profile`).

Per step it records what the engine measured and what the device did:

    duration   StepStats.duration_s: launch to tokens read (the serving worker's step log)
    wall       the whole `engine.step()` call (what `baton profile`'s loaded samples time)
    period     end to end with the previous step, when that one left work waiting (the
               worker's metric: max(duration, period))
    device     CUDA events: from the step's start (or the end of the previous step's kernels,
               if they still run) to the end of its last kernel; on CPU, the wall time
    host       step start to the model's forward call (scheduling, input packing)
    gpu wait   device time from the step's start to its forward call (host work the GPU
               waited for)

and reports, per kind of step (fresh prompts only / with a continued chunk, and whether some
prompt ended in it), the medians of each time over the model's prediction for the step's
tokens and attention pairs; then the continued-chunk steps binned by the continued chunk's
length; then `benchmarks/step_report.py`'s summary (what planner_check prints per rate).

NOTE: a step in which no prompt reaches its last token samples nothing and never waits for the
device: its kernels may still run while the next step is scheduled and launched, and the next
step that reads tokens waits for both; that step's duration then holds the earlier one's device
time. The `device` column puts each kernel's time in the step that launched it.

`--attention paged,gathered` runs the workload once per choice of the Triton backend's path for
chunks over a cached prefix (`TritonAttentionBackend.sdpa_prefill_min_tokens`): `paged` = every
such chunk through `paged_prefill` (as serving ran at d2c1279), `gathered` = every one gathered
then flash (gathered_prefill.py), `auto` = the backend's rule. Same lengths and arrivals in each
pass, other token ids. `--profile N`: afterwards, per attention choice, 4N + 2 prompts (half
queued at once, half one by one) stepped one step at a time (each synchronized) under
torch.profiler; per kind of step, of its first N, the kernels' busy time against the model and
the top kernels (CPU: ops by self time). `--reference-prefill A,B,C` also compares every pass
with another prefill form (e.g. the profile serving was measured against).

    python -m benchmarks.prefill_steps --cpu --mode backlog,poisson --profile 2   # smoke run
    BATON_COMMIT=... PYTHONPATH=. python3 -m benchmarks.prefill_steps --mode backlog,poisson \\
        --rate 10 --attention paged,gathered --profile 3 \\
        --reference-prefill 0.0137,1.52e-05,3.34e-09             # one GPU, Llama-3-8B shape
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.gpu_common import (
    LLAMA3_8B,
    SMALL_SERVING_SHAPE,
    describe_run,
    release_gpu_memory,
    serving_model,
    write_config_only,
)
from benchmarks.step_report import format_summary, summarize_steps
from deploy.profile import profile
from engine import EngineConfig, LLMEngine, SamplingParams
from router.latency_model import InstanceModel, load_profile, new_instance_model

# --attention: TritonAttentionBackend.sdpa_prefill_min_tokens for each choice ("auto": as built).
ATTENTION_THRESHOLDS = {"paged": None, "gathered": 0}
SHAPE_ARGS = {
    "layers": "num_hidden_layers",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "vocab_size": "vocab_size",
}


@dataclass
class MeasuredStep:
    """One prefill step. The first seven fields are what step_report.summarize_steps reads.
    NOTE: StepStats counts a one-token chunk as a decode, not in num_prefill_tokens; `chunks`
    holds every chunk."""

    end: float  # perf_counter when engine.step() returned
    seconds: float  # StepStats.duration_s
    num_seqs: int
    num_prefill_tokens: int
    attention_pairs: int
    num_context_tokens: int
    backlog: int  # requests waiting or running after it
    wall_s: float
    period_s: float
    host_s: float  # step start -> the model's forward call
    chunks: list[tuple[int, int, bool]]  # (new tokens, context after, ends the prompt) per seq
    device_s: float = 0.0
    gpu_wait_s: float = 0.0
    _events: tuple | None = field(default=None, repr=False)

    @property
    def continued(self) -> bool:
        return self.num_context_tokens > self.num_prefill_tokens

    @property
    def reads_tokens(self) -> bool:
        return any(ends for _, _, ends in self.chunks)

    @property
    def kind(self) -> str:
        chunk = "continued chunk" if self.continued else "fresh only"
        return f"{chunk}, {'reads tokens' if self.reads_tokens else 'no token read'}"


class StepProbe:
    """Hooks on one engine that see what each step scheduled and when its forward pass began;
    `step` runs one engine step and measures it."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.cuda = engine.runner.device.type == "cuda"
        self._chunks: list[tuple[int, int, bool]] = []
        self._forward: tuple[float, torch.cuda.Event | None] | None = None
        self._last: MeasuredStep | None = None
        schedule = engine.scheduler.schedule

        def schedule_and_keep():
            sched = schedule()
            # seq_len and samples read num_computed_tokens: take them before the update.
            self._chunks = [(s.num_tokens, s.seq_len, s.samples) for s in sched.scheduled]
            return sched

        engine.scheduler.schedule = schedule_and_keep
        engine.runner.model.register_forward_pre_hook(self._on_forward)

    def _on_forward(self, module, args) -> None:
        self._forward = (time.perf_counter(), self._event())

    def _event(self) -> torch.cuda.Event | None:
        if not self.cuda:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def step(self) -> MeasuredStep | None:
        """One engine step; None if it scheduled nothing. Device times are filled in by `resolve`
        (reading them here would wait for the device)."""
        self._chunks, self._forward = [], None
        begin_event = self._event()
        start = time.perf_counter()
        self.engine.step()
        end = time.perf_counter()
        end_event = self._event()
        stats, scheduler = self.engine.last_step, self.engine.scheduler
        if not self._chunks:
            return None
        last = self._last
        period = stats.duration_s
        if last is not None and last.backlog:
            period = max(period, end - last.end)
        forward_at, forward_event = self._forward or (end, end_event)
        self._last = MeasuredStep(
            end,
            stats.duration_s,
            stats.num_seqs,
            stats.num_prefill_tokens,
            stats.attention_pairs,
            stats.num_context_tokens,
            len(scheduler.waiting) + len(scheduler.running),
            wall_s=end - start,
            period_s=period,
            host_s=forward_at - start,
            chunks=self._chunks,
            _events=(begin_event, forward_event, end_event) if self.cuda else None,
        )
        return self._last

    def resolve(self, steps: list[MeasuredStep]) -> None:
        """Fill in the device times (waits for the device once)."""
        if self.cuda:
            torch.cuda.synchronize()
        for s in steps:
            if not self.cuda:
                s.device_s = s.wall_s
                continue
            if s._events is None:  # resolved before
                continue
            begin, forward, end = s._events
            s.device_s = begin.elapsed_time(end) / 1e3
            s.gpu_wait_s = begin.elapsed_time(forward) / 1e3
            s._events = None

    def forget_last(self) -> None:
        """The next step does not follow this one back to back (after a pause or a warm-up)."""
        self._last = None


def workload(num: int, input_len: int, range_ratio: float, rate: float | None, seed: int):
    """(prompt lengths, arrival times in s): lengths uniform in [len(1-r), len(1+r)] as
    benchmarks.serving.synthetic draws them; arrivals all at 0 (rate None) or Poisson."""
    rng = random.Random(seed)
    low, high = int(input_len * (1 - range_ratio)), int(input_len * (1 + range_ratio))
    lengths = [max(1, rng.randint(low, high)) for _ in range(num)]
    arrivals, t = [], 0.0
    for _ in range(num):
        arrivals.append(t)
        if rate:
            t += rng.expovariate(rate)
    return lengths, arrivals


def random_prompts(lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def run_workload(
    probe: StepProbe, prompts: list[list[int]], arrivals: list[float], tag: str
) -> list[MeasuredStep]:
    """Each prompt added once the wall clock passes its arrival (before the next step), then
    steps until all are done; the prefill steps, device times resolved."""
    engine = probe.engine
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    steps, added = [], 0
    probe.forget_last()
    start = time.perf_counter()
    while added < len(prompts) or engine.has_unfinished_requests():
        now = time.perf_counter() - start
        while added < len(prompts) and arrivals[added] <= now:
            engine.add_request(f"{tag}-{added}", prompts[added], params)
            added += 1
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, arrivals[added] - now))
            probe.forget_last()
            continue
        step = probe.step()
        if step is not None:
            steps.append(step)
    probe.resolve(steps)
    return steps


def set_attention(engine: LLMEngine, choice: str, default: int | None) -> None:
    backend = engine.runner.backend
    if not hasattr(backend, "sdpa_prefill_min_tokens"):
        if choice != "auto":
            raise SystemExit(f"--attention {choice}: only the Triton backend (CUDA) has a choice")
        return
    # "<choice>-sdpa": fresh prompts through SDPA (cuDNN on CUDA) instead of varlen flash.
    choice, _, fresh = choice.partition("-")
    backend.sdpa_prefill_min_tokens = ATTENTION_THRESHOLDS.get(choice, default)
    backend.fresh_prefill_varlen = fresh != "sdpa"


def predicted(model: InstanceModel, step: MeasuredStep) -> float:
    return max(model.prefill.predict(step.num_prefill_tokens, step.attention_pairs), 1e-9)


def kind_summary(steps: list[MeasuredStep], model: InstanceModel) -> dict:
    """Medians of each measured time over the model's prediction, and the steps' sizes."""
    pred = [predicted(model, s) for s in steps]

    def over(attr: str) -> float:
        return statistics.median(getattr(s, attr) / p for s, p in zip(steps, pred))

    def ms(values) -> float:
        return 1e3 * statistics.median(values)

    return {
        "steps": len(steps),
        "seqs": statistics.mean(s.num_seqs for s in steps),
        "tokens": statistics.mean(s.num_prefill_tokens for s in steps),
        "pairs": statistics.mean(s.attention_pairs for s in steps),
        "predicted_ms": ms(pred),
        "duration_over_predicted": over("seconds"),
        "wall_over_predicted": over("wall_s"),
        "period_over_predicted": over("period_s"),
        "device_over_predicted": over("device_s"),
        "device_ms": ms(s.device_s for s in steps),
        "host_ms": ms(s.host_s for s in steps),
        "gpu_wait_ms": ms(s.gpu_wait_s for s in steps),
        # Sums: does the model hold the whole run's time, whatever each step's share?
        "device_sum_over_predicted_sum": sum(s.device_s for s in steps) / sum(pred),
    }


def by_kind(steps: list[MeasuredStep], model: InstanceModel) -> dict[str, dict]:
    groups: dict[str, list[MeasuredStep]] = defaultdict(list)
    for s in steps:
        groups["fresh only" if not s.continued else "continued chunk"].append(s)
        groups[s.kind].append(s)
    out = {"all": kind_summary(steps, model)} if steps else {}
    for name in sorted(groups):
        out[name] = kind_summary(groups[name], model)
    return out


def continued_bins(steps: list[MeasuredStep], model: InstanceModel, budget: int) -> list[dict]:
    """Continued-chunk steps by the continued chunk's length: [1, B/16), [B/16, B/4),
    [B/4, B/2), [B/2, B] for a budget of B tokens (a step's longest continued chunk)."""
    edges = sorted({1, budget + 1} | {max(1, budget // d) for d in (16, 4, 2)})
    binned: dict[int, list] = defaultdict(list)
    for s in steps:
        continued = [(n, ctx) for n, ctx, _ in s.chunks if ctx > n]
        if continued:
            n, ctx = max(continued)
            low = max(e for e in edges[:-1] if e <= n)
            binned[low].append((n, ctx, s, predicted(model, s)))
    rows = []
    for low, high in zip(edges, edges[1:]):
        members = binned.get(low)
        if not members:
            continue
        rows.append(
            {
                "chunk_tokens": f"{low}-{high - 1}",
                "steps": len(members),
                "chunk_mean": statistics.mean(n for n, _, _, _ in members),
                "context_mean": statistics.mean(ctx for _, ctx, _, _ in members),
                "other_tokens_mean": statistics.mean(
                    s.num_prefill_tokens - n for n, _, s, _ in members
                ),
                "predicted_ms": 1e3 * statistics.median(p for *_, p in members),
                "duration_over_predicted": statistics.median(s.seconds / p for *_, s, p in members),
                "device_over_predicted": statistics.median(s.device_s / p for *_, s, p in members),
                "device_minus_predicted_ms": 1e3
                * statistics.median(s.device_s - p for *_, s, p in members),
            }
        )
    return rows


def profile_kinds(
    probe: StepProbe, prompts: list[list[int]], model: InstanceModel, per_kind: int, tag: str
) -> dict[str, dict]:
    """Steps one at a time, synchronized before and after, each under torch.profiler: the first
    half of `prompts` queued at once (steps with continued chunks), then the rest one by one
    (fresh steps, and long prompts' chunks alone). Per kind, of its first `per_kind` steps: the
    kernels' mean busy time (CPU: ops' self time), their span, and the top kernels."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    engine = probe.engine
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if probe.cuda else [])
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    found: dict[str, list[tuple[MeasuredStep, dict[str, float], float]]] = defaultdict(list)
    queued = len(prompts) // 2
    for i in range(queued):
        engine.add_request(f"{tag}-{i}", prompts[i], params)
    while engine.has_unfinished_requests() or queued < len(prompts):
        if not engine.has_unfinished_requests():
            engine.add_request(f"{tag}-{queued}", prompts[queued], params)
            queued += 1
        _sync(probe)
        probe.forget_last()
        with torch_profile(activities=activities) as prof:
            step = probe.step()
            _sync(probe)
        if step is None:
            continue
        probe.resolve([step])
        if len(found[step.kind]) < per_kind:
            found[step.kind].append((step, *_busy_times(prof, probe.cuda)))
    return {kind: _profiled_summary(rows, model) for kind, rows in sorted(found.items())}


def _sync(probe: StepProbe) -> None:
    if probe.cuda:
        torch.cuda.synchronize()


def _busy_times(prof, cuda: bool) -> tuple[dict[str, float], float]:
    """({kernel name: us}, span in us) of one profiled step; on CPU ops' self CPU time."""
    times: dict[str, float] = defaultdict(float)
    if not cuda:
        for e in prof.key_averages():
            times[e.key[:80]] += e.self_cpu_time_total
        return times, sum(times.values())
    from torch.autograd import DeviceType

    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    for e in kernels:
        times[e.name[:80]] += e.time_range.elapsed_us()
    if not kernels:
        return times, 0.0
    span = max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels)
    return times, span


def _profiled_summary(rows, model: InstanceModel) -> dict:
    n = len(rows)
    pred = statistics.mean(predicted(model, s) for s, _, _ in rows)
    totals: dict[str, float] = defaultdict(float)
    for _, times, _ in rows:
        for name, us in times.items():
            totals[name] += us / n
    busy_ms = sum(totals.values()) / 1e3
    top = sorted(totals.items(), key=lambda kv: -kv[1])[:8]
    return {
        "steps": n,
        "tokens": statistics.mean(s.num_prefill_tokens for s, _, _ in rows),
        "pairs": statistics.mean(s.attention_pairs for s, _, _ in rows),
        "predicted_ms": 1e3 * pred,
        "busy_ms": busy_ms,
        "span_ms": statistics.mean(span for _, _, span in rows) / 1e3,
        "busy_over_predicted": busy_ms / (1e3 * pred),
        "top": [(name, us / 1e3) for name, us in top],
    }


def print_kinds(kinds: dict[str, dict]) -> None:
    print(
        f"  {'steps of':<33}{'n':>5}{'seqs':>6}{'tokens':>7}{'pairs M':>8}{'pred ms':>8} |"
        f"{'duration':>9}{'wall':>6}{'period':>7}{'device':>7} |{'dev ms':>7}{'host ms':>8}"
        f"{'gpu wait':>9}"
    )
    for name, k in kinds.items():
        print(
            f"  {name:<33}{k['steps']:5d}{k['seqs']:6.1f}{k['tokens']:7.0f}"
            f"{k['pairs'] / 1e6:8.2f}{k['predicted_ms']:8.1f} |"
            f"{k['duration_over_predicted']:9.2f}{k['wall_over_predicted']:6.2f}"
            f"{k['period_over_predicted']:7.2f}{k['device_over_predicted']:7.2f} |"
            f"{k['device_ms']:7.1f}{k['host_ms']:8.1f}{k['gpu_wait_ms']:9.1f}"
        )
    if "all" in kinds:
        ratio = kinds["all"]["device_sum_over_predicted_sum"]
        print(f"  all steps: device time summed / predictions summed {ratio:.2f}")
    fresh, cont = kinds.get("fresh only"), kinds.get("continued chunk")
    if fresh and cont:
        print(
            "  over the model, continued-chunk steps vs fresh-only ones: duration "
            f"{cont['duration_over_predicted']:.2f} vs {fresh['duration_over_predicted']:.2f}, "
            f"device {cont['device_over_predicted']:.2f} vs {fresh['device_over_predicted']:.2f}"
        )


def print_bins(bins: list[dict]) -> None:
    if not bins:
        return
    print(
        "  continued-chunk steps by the continued chunk's length (ratios: medians over predicted)"
    )
    print(
        f"  {'chunk':>10}{'n':>5}{'chunk':>7}{'context':>8}{'others':>7}{'pred ms':>8}"
        f"{'duration':>9}{'device':>7}{'device - pred ms':>17}"
    )
    for b in bins:
        print(
            f"  {b['chunk_tokens']:>10}{b['steps']:5d}{b['chunk_mean']:7.0f}"
            f"{b['context_mean']:8.0f}{b['other_tokens_mean']:7.0f}{b['predicted_ms']:8.1f}"
            f"{b['duration_over_predicted']:9.2f}{b['device_over_predicted']:7.2f}"
            f"{b['device_minus_predicted_ms']:17.1f}"
        )


def print_profiled(profiled: dict[str, dict], cuda: bool) -> None:
    what = "kernels" if cuda else "ops (self CPU time)"
    for name, p in profiled.items():
        print(
            f"  profiled {name}: {p['steps']} steps, {p['tokens']:.0f} tokens, "
            f"{p['pairs'] / 1e6:.2f} M pairs; {what} busy {p['busy_ms']:.1f} ms over a span of "
            f"{p['span_ms']:.1f} ms, predicted {p['predicted_ms']:.1f} ms "
            f"(busy / predicted {p['busy_over_predicted']:.2f}); top per step:"
        )
        for kernel, ms in p["top"]:
            print(f"    {ms:8.2f} ms  {kernel}")


def build_model(folder: Path, args) -> tuple[str, int]:
    """(model folder, vocabulary size): the GPU's Llama-3-8B shape (config only, weights drawn
    on the device) or a tiny checkpoint on CPU, either with the shape arguments over it."""
    shape = {key: getattr(args, arg) for arg, key in SHAPE_ARGS.items() if getattr(args, arg)}
    if args.cpu:
        shape = {**SMALL_SERVING_SHAPE, "max_position_embeddings": args.max_model_len, **shape}
        return serving_model(folder, False, **shape)
    config = {**LLAMA3_8B, **shape}
    config["max_position_embeddings"] = max(config["max_position_embeddings"], args.max_model_len)
    return str(write_config_only(folder / "model", config)), config["vocab_size"]


def engine_args(model_dir: str, args) -> dict:
    """As planner_check's profile and serving's prefill workers get them."""
    out = {
        "model": model_dir,
        "dtype": args.dtype,
        "device": "cpu" if args.cpu else "cuda",
        "max_num_batched_tokens": args.max_batched_tokens,
        "max_model_len": args.max_model_len,
    }
    if not args.cpu:
        out["extra"] = {"random_weights": True}
    if args.num_blocks:
        out["num_blocks"] = args.num_blocks
    return out


def latency_profile(base_args: dict, args) -> dict:
    if args.latency_profile:
        return load_profile(args.latency_profile)
    start = time.perf_counter()
    fitted = profile(base_args, repeats=args.repeats)
    if not args.cpu:
        release_gpu_memory()  # the profiled engine's weights and KV cache
    print(f"profile fitted in {time.perf_counter() - start:.0f} s", flush=True)
    return fitted


def run_passes(engine: LLMEngine, models: dict[str, InstanceModel], vocab: int, args) -> list:
    """One pass per (mode, attention choice): same lengths and arrivals, other token ids; then
    with `--profile`, the profiled steps per attention choice."""
    probe = StepProbe(engine)
    default = getattr(engine.runner.backend, "sdpa_prefill_min_tokens", None)
    passes = []
    for m, mode in enumerate(args.modes):
        rate = args.rate if mode == "poisson" else None
        lengths, arrivals = workload(
            args.num_prompts, args.input_len, args.range_ratio, rate, args.seed
        )
        for a, choice in enumerate(args.attentions):
            set_attention(engine, choice, default)
            seed = 1000 * (m + 1) + a
            warm = random_prompts(lengths[: args.warmup], vocab, seed + 500)
            run_workload(probe, warm, [0.0] * len(warm), f"warm-{mode}-{choice}")
            start = time.perf_counter()
            prompts = random_prompts(lengths, vocab, seed)
            steps = run_workload(probe, prompts, arrivals, f"{mode}-{choice}")
            seconds = time.perf_counter() - start
            print(
                f"\n{mode}{f' at {rate:g} req/s' if rate else ''}, attention {choice}: "
                f"{len(steps)} prefill steps in {seconds:.1f} s",
                flush=True,
            )
            result = {"mode": mode, "attention": choice, "rate": rate, "seconds": seconds}
            for name, model in models.items():
                if name != "profile":
                    coef = [float(c) for c in model.prefill.coef]
                    print(f"  against the {name} prefill form {coef}:")
                result[name] = summarize_pass(steps, model, args.max_batched_tokens)
            passes.append(result)
    if args.profile:
        lengths, _ = workload(4 * args.profile + 2, args.input_len, args.range_ratio, None, 7)
        for a, choice in enumerate(args.attentions):
            set_attention(engine, choice, default)
            prompts = random_prompts(lengths, vocab, 9000 + a)
            print(f"\nprofiled steps, attention {choice}:", flush=True)
            profiled = profile_kinds(probe, prompts, models["profile"], args.profile, f"p{a}")
            print_profiled(profiled, probe.cuda)
            passes.append({"mode": "profile", "attention": choice, "profiled": profiled})
    return passes


def summarize_pass(steps: list[MeasuredStep], model: InstanceModel, budget: int) -> dict:
    """The pass's steps against `model`, printed and returned."""
    result = {
        "kinds": by_kind(steps, model),
        "continued_bins": continued_bins(steps, model, budget),
        "step_report": summarize_steps(steps, model),
    }
    print_kinds(result["kinds"])
    print_bins(result["continued_bins"])
    print(f"  step report: {format_summary(result['step_report'])}", flush=True)
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--cpu", action="store_true", help="tiny model on CPU (a smoke run)")
    p.add_argument("--mode", default="backlog", help="backlog, poisson, or both (comma list)")
    p.add_argument("--rate", type=float, default=None, help="poisson arrivals per second")
    p.add_argument(
        "--attention",
        default="auto",
        help="auto, paged, gathered (comma list); with -sdpa (auto-sdpa, ...) fresh prompts go "
        "through SDPA (cuDNN on CUDA) instead of varlen flash",
    )
    p.add_argument("--profile", type=int, default=0, metavar="N", help="torch.profiler N steps")
    p.add_argument("--num-prompts", type=int, default=None)
    p.add_argument("--input-len", type=int, default=None)
    p.add_argument("--range-ratio", type=float, default=0.5)
    p.add_argument("--max-batched-tokens", type=int, default=None, help="the token budget")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--num-blocks", type=int, default=None, help="default: from free memory")
    p.add_argument("--warmup", type=int, default=4, help="prompts run before each pass")
    p.add_argument("--dtype", default=None)
    p.add_argument("--repeats", type=int, default=3, help="of the profile's samples")
    p.add_argument("--latency-profile", default=None, help="a profile JSON instead of fitting")
    p.add_argument(
        "--reference-prefill",
        default=None,
        metavar="A,B,C",
        help="another prefill form to compare with (e.g. the profile serving was measured on)",
    )
    for arg in SHAPE_ARGS:
        p.add_argument(f"--{arg.replace('_', '-')}", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    defaults = dict(
        num_prompts=24 if args.cpu else 200,
        input_len=384 if args.cpu else 2048,
        max_batched_tokens=512 if args.cpu else 2048,
        dtype="float32" if args.cpu else "bfloat16",
        rate=20.0 if args.cpu else 10.0,
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    longest = int(args.input_len * (1 + args.range_ratio)) + 1
    if args.max_model_len is None:  # planner_check's rounding
        args.max_model_len = max(2048, -(-longest // 256) * 256)
    args.modes = args.mode.split(",")
    args.attentions = args.attention.split(",")
    for mode in args.modes:
        if mode not in ("backlog", "poisson"):
            p.error(f"--mode {mode}: backlog or poisson")
    for choice in args.attentions:
        if choice.removesuffix("-sdpa") not in ("auto", *ATTENTION_THRESHOLDS):
            p.error(f"--attention {choice}: auto, paged or gathered")
    if not args.cpu and not torch.cuda.is_available():
        p.error("no CUDA device: pass --cpu for a smoke run")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, vocab = build_model(Path(tmp), args)
        base = engine_args(model_dir, args)
        fitted = latency_profile(base, args)
        print(f"{describe_run()}; profile: prefill {fitted['prefill']}", flush=True)
        models = {"profile": new_instance_model(fitted)}
        if args.reference_prefill:
            reference = [float(c) for c in args.reference_prefill.split(",")]
            models["reference"] = new_instance_model({**fitted, "prefill": reference})
        # The prefill pool's engine: prefix caching on (the default), no decode graphs, the
        # piecewise prefill graphs (PrefillWorker's defaults).
        engine = LLMEngine(EngineConfig(**base, decode_graphs=False))
        passes = run_passes(engine, models, vocab, args)
    result = {
        "bench": "prefill_steps",
        "run": describe_run(),
        "args": {k: v for k, v in vars(args).items() if k not in ("modes", "attentions")},
        "profile": fitted,
        "passes": passes,
    }
    print(json.dumps(result, default=str))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
