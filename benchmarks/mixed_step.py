"""What a step that admits one new prompt beside running decodes costs, against a pure decode
step and the prompt alone, and where its time goes.

With requests arriving (a server, or offline waves with spread output lengths) every finish
frees a slot that the next step fills: a step of one prompt chunk beside B - 1 decodes. Those
steps cannot replay a decode CUDA graph. On an H200 with a 0.9B model at batch 64 they took
~9 ms against ~2.4 ms for a decode step, and made up over half of plain decoding's time in
`speculative_steps --waves 4 --length-spread 0.5` (RESULTS.md, session 9).

One engine, one run, per step kind (median of --steps steps, after warm-up):

    decode   B requests decoding (a graph replay on CUDA)
    mixed    B - 1 decoding and one new --prompt-len prompt (max_tokens 1: it finishes in the
             step that prefills it, so every step admits one)
    prompt   the same prompt, nothing decoding

Each is timed on the host around `Engine.step` (the tokens read back, so the device's time is
in it) and, with --profile, one more step of each under torch.profiler: device busy time and
the host operators with the most self time.

    PYTHONPATH=. python -m benchmarks.mixed_step --dtype bfloat16 --hidden-size 2048 --layers 16 \\
        --heads 16 --kv-heads 8 --vocab-size 32000 --profile
    python -m benchmarks.mixed_step --batch 8 --steps 5          # CPU smoke run
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.speculative import add_shape_args, model_shape
from engine import LLM, SamplingParams
from engine.testing import write_test_checkpoint


def _prompt(vocab: int, length: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (length,), generator=g).tolist()


def _sync(llm: LLM) -> None:
    if llm.engine.runner.device.type == "cuda":
        torch.cuda.synchronize()


class StepKinds:
    """Drives one engine through the three kinds of step."""

    def __init__(self, llm: LLM, batch: int, prompt_len: int, context_len: int, steps: int):
        self.llm, self.engine = llm, llm.engine
        self.batch, self.prompt_len = batch, prompt_len
        self.vocab = self.engine.model_config.vocab_size
        self._next = 0
        # Decoders with room for every step of the run (warm-ups and profiles included).
        params = SamplingParams(max_tokens=4 * steps + 64, temperature=0.0, ignore_eos=True)
        for i in range(batch - 1):
            self.engine.add_request(f"dec-{i}", _prompt(self.vocab, context_len, i), params)
        while any(r.num_output_tokens == 0 for r in self.engine.scheduler.requests.values()):
            self.engine.step()
        # The B-th decoder exists only for the decode steps (added and removed around them).
        self._extra = SamplingParams(max_tokens=4 * steps + 64, temperature=0.0, ignore_eos=True)
        self._one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)

    def _admit(self) -> None:
        self._next += 1
        prompt = _prompt(self.vocab, self.prompt_len, 1000 + self._next)
        self.engine.add_request(f"new-{self._next}", prompt, self._one)

    def decode(self) -> None:
        self.engine.step()

    def mixed(self) -> None:
        self._admit()
        outputs = self.engine.step()
        assert any(o.request_id.startswith("new-") for o in outputs), "the prompt was not run"

    def with_full_batch(self):
        """Add the B-th decoder (prefilled) for the decode steps; returns its id."""
        rid = "dec-extra"
        self.engine.add_request(rid, _prompt(self.vocab, self.prompt_len, 99), self._extra)
        while self.engine.scheduler.requests[rid].num_output_tokens == 0:
            self.engine.step()
        return rid

    def drop_decoders(self) -> None:
        for rid in list(self.engine.scheduler.requests):
            self.engine.abort_request(rid)


def time_steps(
    kinds: StepKinds, step, steps: int, warmup: int, prepare: list[float] | None = None
) -> list[float]:
    """Each step's wall time; with `prepare`, also the host time of its input packing
    (`ModelRunner._prepare`) appended there."""
    for _ in range(warmup):
        step()
    _sync(kinds.llm)
    runner = kinds.engine.runner
    if prepare is not None:
        original = runner._prepare

        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = original(*args, **kwargs)
            prepare.append(time.perf_counter() - start)
            return out

        runner._prepare = timed
    times = []
    try:
        for _ in range(steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    finally:
        if prepare is not None:
            del runner._prepare  # the instance attribute shadowed the method
    return times


def profile_step(kinds: StepKinds, step, top: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    on_cuda = kinds.engine.runner.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    _sync(kinds.llm)
    with profile(activities=activities) as prof:
        step()
        _sync(kinds.llm)
    averages = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in averages) if on_cuda else 0.0
    lines = [f"  device busy {device_us / 1e3:.2f} ms (kernels, summed); top host operators:"]
    table = averages.table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=48)
    lines += ["  " + line for line in table.splitlines()]
    return "\n".join(lines)


def cprofile_steps(kinds: StepKinds, step, steps: int, top: int) -> str:
    import cProfile
    import io
    import pstats

    _sync(kinds.llm)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    return f"  {steps} steps\n" + out.getvalue()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=384)
    p.add_argument("--context-len", type=int, default=384, help="the decoders' prompts")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--top", type=int, default=25)
    p.add_argument(
        "--cprofile", action="store_true", help="also cProfile --steps mixed steps (host time)"
    )
    add_shape_args(p, hidden=256, heads=4)
    p.add_argument("--eager", action="store_true", help="no CUDA graphs at all")
    p.add_argument(
        "--no-prefill-graphs",
        action="store_true",
        help="steps with prompt tokens eagerly (decode steps keep their graphs)",
    )
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as root:
        shape = {**model_shape(args), "max_position_embeddings": 4096}
        model_dir = write_test_checkpoint(Path(root) / "model", **shape, dtype=args.dtype)
        extra = {"enforce_eager": True} if args.eager else {}
        if args.no_prefill_graphs:
            extra["prefill_graphs"] = False
        llm = LLM(str(model_dir), dtype=args.dtype, enable_prefix_caching=False, **extra)
        device = llm.engine.runner.device
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
        graphs = "piecewise graphs" if llm.engine.runner.prefill_graphs else "eager"
        print(
            f"batch {args.batch}, prompt {args.prompt_len}, context {args.context_len}, "
            f"steps with prompts: {graphs}; "
            f"{args.layers} layers x {args.hidden_size}, {args.dtype}, {device} ({name}), "
            f"torch {torch.__version__}"
        )
        kinds = StepKinds(llm, args.batch, args.prompt_len, args.context_len, args.steps)
        results, profiles = {}, {}
        prepare: list[float] = []
        results["mixed"] = time_steps(kinds, kinds.mixed, args.steps, args.warmup, prepare)
        if args.profile:
            profiles["mixed"] = profile_step(kinds, kinds.mixed, args.top)
        if args.cprofile:
            profiles["mixed, cProfile"] = cprofile_steps(kinds, kinds.mixed, args.steps, args.top)
        extra_id = kinds.with_full_batch()
        results["decode"] = time_steps(kinds, kinds.decode, args.steps, args.warmup)
        if args.profile:
            profiles["decode"] = profile_step(kinds, kinds.decode, args.top)
        kinds.drop_decoders()
        del extra_id
        results["prompt"] = time_steps(kinds, kinds.mixed, args.steps, args.warmup)
        if args.profile:
            profiles["prompt"] = profile_step(kinds, kinds.mixed, args.top)
        decode_ms = 1e3 * statistics.median(results["decode"])
        for kind, times in results.items():
            ms = 1e3 * statistics.median(times)
            print(
                f"{kind:7s} {ms:7.2f} ms median of {len(times)} "
                f"(min {1e3 * min(times):.2f}), {ms / decode_ms:.2f}x a decode step"
            )
        print(
            f"mixed steps' input packing (ModelRunner._prepare): median "
            f"{1e6 * statistics.median(prepare):.0f} us"
        )
        for kind, text in profiles.items():
            print(f"\n-- {kind} step under the profiler\n{text}")


if __name__ == "__main__":
    main()
