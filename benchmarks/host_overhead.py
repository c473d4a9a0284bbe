"""Host time of one decode step, broken down by stage (issue 6: batch-1 decode on a GPU waits on
the host between graph replays).

With a tiny model on the CPU the forward pass is nearly free, so what remains is the Python and
PyTorch host work each engine step does: scheduling, input packing, the forward's launches, the
output head, sampling, the scheduler's update, and the engine's output processing
(detokenization, stop strings, `RequestOutput`s). Each stage is timed by wrapping the method
that does it; "launch other" is the rest of `ModelRunner.launch` (structured output's check,
the token copy's start, the fast path's checks), "engine other" what the step spends outside
the runner and the scheduler (stats, detokenization, stop strings, `RequestOutput`s).

On a GPU the same stages are host times too, except that the stage that waits for the step's
tokens ("read tokens", or before it existed the sampler) also holds the GPU's time. With
`--async-scheduling` the next step is launched before a step's tokens are read.

    PYTHONPATH=. python -m benchmarks.host_overhead                     # tiny model, CPU
    PYTHONPATH=. python -m benchmarks.host_overhead --device cuda --shape llama3-8b
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import pstats
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from benchmarks.gpu_decode import start_decoding
from engine import LLM

STAGES = ("schedule", "prepare", "attn meta", "forward", "head", "sampler", "launch other",
          "read tokens", "update", "engine other")  # fmt: skip


class _Timers:
    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, obj, name: str, stage: str) -> None:
        """Time `obj.name` (an instance attribute that shadows the method) under `stage`."""
        fn = getattr(obj, name)

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[stage] += time.perf_counter() - start

        setattr(obj, name, timed)


class _TimedSampler:
    """The runner calls `self.sampler(...)`: special methods are looked up on the type, so the
    sampler is wrapped whole."""

    def __init__(self, sampler, timers: _Timers):
        self._sampler, self._timers = sampler, timers

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self._sampler(*args, **kwargs)
        finally:
            self._timers.seconds["sampler"] += time.perf_counter() - start

    def __getattr__(self, name):
        return getattr(self._sampler, name)


def instrument(llm: LLM) -> _Timers:
    engine = llm.engine
    runner = engine.runner
    timers = _Timers()
    timers.wrap(engine, "step", "step")
    timers.wrap(engine.scheduler, "schedule", "schedule")
    timers.wrap(engine.scheduler, "update", "update")
    if hasattr(runner, "launch"):
        timers.wrap(runner, "launch", "launch")
        timers.wrap(runner, "finish", "read tokens")
    else:  # older commits, for before/after figures: one call ran the whole step
        timers.wrap(runner, "execute", "launch")
    timers.wrap(runner, "_prepare", "prepare")
    timers.wrap(runner.backend, "prepare", "attn meta")
    timers.wrap(runner.model, "forward", "forward")
    timers.wrap(runner.model, "compute_logits", "head")
    if runner.graphs is not None:
        timers.wrap(runner.graphs, "replay", "forward")
    runner.sampler = _TimedSampler(runner.sampler, timers)
    return timers


def uninstrument(llm: LLM) -> None:
    engine, runner = llm.engine, llm.engine.runner
    for obj in (engine, engine.scheduler, runner, runner.model, runner.backend, runner.graphs):
        for name in [n for n in vars(obj or object) if n in _WRAPPED]:
            delattr(obj, name)  # the instance attribute shadowed the class's method
    runner.sampler = runner.sampler._sampler


_WRAPPED = ("step", "schedule", "update", "launch", "finish", "execute", "_prepare", "prepare",
            "forward", "compute_logits", "replay")  # fmt: skip


def breakdown(timers: _Timers, steps: int) -> dict[str, float]:
    """Microseconds per step for each stage."""
    s = dict(timers.seconds)
    runner_parts = sum(
        s.get(k, 0.0) for k in ("prepare", "attn meta", "forward", "head", "sampler")
    )
    s["launch other"] = s.get("launch", 0.0) - runner_parts
    engine_parts = sum(s.get(k, 0.0) for k in ("schedule", "launch", "read tokens", "update"))
    s["engine other"] = s.get("step", 0.0) - engine_parts
    out = {k: 1e6 * s.get(k, 0.0) / steps for k in STAGES}
    out["step"] = 1e6 * s.get("step", 0.0) / steps
    return out


def measure(llm: LLM, batch: int, steps: int, warmup: int, prompt_len: int, profile: bool):
    engine = llm.engine
    start_decoding(llm, batch, prompt_len, steps, warmup)
    if engine.runner.device.type == "cuda":
        torch.cuda.synchronize()
    timers = instrument(llm)
    profiler = cProfile.Profile() if profile else None
    if profiler:
        profiler.enable()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    elapsed = time.perf_counter() - start
    if profiler:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    uninstrument(llm)
    for rid in list(engine.scheduler.requests):
        engine.abort_request(rid)
    return breakdown(timers, steps), 1e6 * elapsed / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape", choices=("tiny", "llama3-8b"), default="tiny")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--async-scheduling", action="store_true")
    p.add_argument("--profile", action="store_true", help="also print cProfile's top functions")
    p.add_argument(
        "--repeat", type=int, default=1, help="measure this many times, print each stage's min"
    )
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    torch.set_num_threads(1)  # a tiny model's ops are faster on one thread, and less noisy

    with tempfile.TemporaryDirectory() as tmp:
        kwargs = dict(device=args.device, max_num_seqs=max(batches), enforce_eager=args.eager)
        if args.async_scheduling:
            kwargs["async_scheduling"] = True
        if args.shape == "tiny":
            from engine.testing import write_test_checkpoint

            model_dir = write_test_checkpoint(Path(tmp) / "tiny")
            kwargs.update(num_blocks=64 * max(batches), max_model_len=1024)
        else:
            from benchmarks.gpu_common import write_config_only

            model_dir = write_config_only(Path(tmp) / "llama3-8b-shape")
            kwargs.update(dtype="bfloat16", max_model_len=4096, extra={"random_weights": True})
        llm = LLM(model_dir, **kwargs)
        graphs = llm.engine.runner.graphs is not None
        print(f"{args.shape} model on {args.device}, CUDA graphs {'on' if graphs else 'off'}, "
              f"async scheduling {'on' if args.async_scheduling else 'off'}; microseconds per "
              f"decode step (host time; on a GPU, 'read tokens' waits for the device)")  # fmt: skip
        print(f"{'batch':>5s} {'step':>8s} " + " ".join(f"{s:>12s}" for s in STAGES))
        for batch in batches:
            runs = [
                measure(llm, batch, args.steps, args.warmup, args.prompt_len, args.profile)
                for _ in range(args.repeat)
            ]
            # On a shared machine the least disturbed run is the closest to the real cost.
            parts = {stage: min(r[0][stage] for r in runs) for stage in STAGES}
            per_step = min(r[1] for r in runs)
            cells = " ".join(f"{parts[s]:12.1f}" for s in STAGES)
            print(f"{batch:5d} {per_step:8.1f} {cells}")


if __name__ == "__main__":
    main()
