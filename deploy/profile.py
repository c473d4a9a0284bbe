"""`baton profile`: measure one engine instance and write the latency profile that seeds the
router's models (router/latency_model.py) before live samples arrive.

It runs the engine in this process on the given device with synthetic requests: prefill steps
of several prompt lengths, alone and as a loaded prefill worker runs them (a queue of prompts,
so steps fill the token budget with several prompts and chunks of longer ones), then decode
steps at several batch sizes and context lengths, and fits the same linear forms the router
refits online. The profile records the token budget it measured at: the planner simulates the
prefill engine's steps under it.
"""

from __future__ import annotations

import json
import random
import time

import numpy as np
import torch

from engine import EngineConfig, LLMEngine, SamplingParams
from router.latency_model import LinearModel

PREFILL_LENGTHS = (16, 64, 128, 256, 512, 1024, 2048)
DECODE_BATCHES = (1, 2, 4, 8, 16, 32, 64)


def _prefill_samples(engine: LLMEngine, vocab: int, repeats: int, rng: random.Random):
    samples = []
    limit = min(engine.max_model_len - 1, engine.config.max_num_batched_tokens)
    for length in [n for n in PREFILL_LENGTHS if n <= limit]:
        for r in range(repeats + 1):
            prompt = [rng.randrange(3, vocab) for _ in range(length)]
            engine.add_request(f"p{length}-{r}", prompt, SamplingParams(max_tokens=1))
            while engine.has_unfinished_requests():
                engine.step()
                step = engine.last_step
                if r and step.num_prefill_tokens and not step.num_decode_tokens:  # r=0 warms up
                    samples.append((step.num_prefill_tokens, step.attention_pairs, step.duration_s))
    return samples


# Prompt lengths for the loaded runs, as shares of the token budget: a queue of equal prompts
# fills each step with whole prompts and a chunk of the next, and those longer than the budget
# continue over their cached part, so the attention pairs per token vary at a full budget
# (single prompts cannot tell the linear term from the quadratic one: their pairs are
# tokens²).
PACKED_SHARES = (1 / 8, 1 / 4, 3 / 8, 5 / 8, 3 / 4, 1, 3 / 2)


def _packed_prefill_samples(engine: LLMEngine, vocab: int, repeats: int, rng: random.Random):
    samples = []
    budget = engine.config.max_num_batched_tokens
    lengths = {int(budget * share) for share in PACKED_SHARES}
    for length in sorted(n for n in lengths if 16 <= n < engine.max_model_len):
        count = -(-2 * budget // length) + 1  # about three steps' worth
        for r in range(repeats):
            for i in range(count):
                prompt = [rng.randrange(3, vocab) for _ in range(length)]
                engine.add_request(f"q{length}-{r}-{i}", prompt, SamplingParams(max_tokens=1))
            while engine.has_unfinished_requests():
                # Back to back, as a loaded prefill worker steps: the sample is the whole step,
                # scheduling and outputs included (what the worker reports in serving).
                start = time.perf_counter()
                outputs = engine.step()
                if not outputs and engine.runner.device.type == "cuda":
                    # A step that sampled nothing did not wait for the GPU (see the prefill
                    # worker's _on_outputs): wait here, or the next step's sample holds it.
                    torch.cuda.current_stream(engine.runner.device).synchronize()
                seconds = time.perf_counter() - start
                step = engine.last_step
                if step.num_prefill_tokens and not step.num_decode_tokens:
                    samples.append((step.num_prefill_tokens, step.attention_pairs, seconds))
    return samples


def _decode_samples(engine: LLMEngine, vocab: int, steps: int, rng: random.Random):
    samples = []
    for batch in [b for b in DECODE_BATCHES if b <= engine.config.max_num_seqs]:
        for context in (64, 512):
            if context + steps + 1 >= engine.max_model_len:
                continue
            params = SamplingParams(max_tokens=steps + 1, ignore_eos=True, temperature=0.0)
            ids = [f"d{batch}-{context}-{i}" for i in range(batch)]
            try:
                for rid in ids:
                    prompt = [rng.randrange(3, vocab) for _ in range(context)]
                    engine.add_request(rid, prompt, params)
            except ValueError:  # the pool cannot hold this batch: stop here
                for rid in ids:
                    engine.abort_request(rid)
                return samples
            while engine.has_unfinished_requests():
                engine.step()
                step = engine.last_step
                if step.num_decode_tokens == batch and not step.num_prefill_tokens:
                    samples.append(
                        (step.num_decode_tokens, step.num_context_tokens, step.duration_s)
                    )
    return samples


def fit(samples) -> list[float]:
    """Least squares over the median time of each distinct (x1, x2): one stalled step (another
    process on the cores, a collection) must not become the whole intercept."""
    times: dict[tuple[int, int], list[float]] = {}
    for x1, x2, seconds in samples:
        times.setdefault((x1, x2), []).append(seconds)
    model = LinearModel(np.zeros(3))
    for (x1, x2), values in times.items():
        model.add(x1, x2, float(np.median(values)))
    model.fit()
    return [float(c) for c in model.coef]


def profile(engine_args: dict, repeats: int = 3, decode_steps: int = 8, seed: int = 0) -> dict:
    engine = LLMEngine(EngineConfig(enable_prefix_caching=False, **engine_args))
    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    prefill = _prefill_samples(engine, vocab, repeats, rng)
    prefill += _packed_prefill_samples(engine, vocab, repeats, rng)
    decode = _decode_samples(engine, vocab, decode_steps, rng)
    # KV transfer: what it adds to TTFT after the forward pass (earlier layers leave while later
    # ones compute; the last layer travels alone). Without two devices to measure: 1 ms plus the
    # last layer's share of the bytes over a conservative 10 GB/s link (the router refits from
    # real transfers).
    per_byte = 1e-10 / engine.model_config.num_kv_layers
    return {
        "model": engine_args["model"],
        "device": str(engine.runner.device),
        "dtype": str(engine.dtype),
        "prefill": fit(prefill),
        "decode": fit(decode),
        "transfer": [1e-3, per_byte, 0.0],
        "max_num_batched_tokens": engine.config.max_num_batched_tokens,
        "num_samples": {"prefill": len(prefill), "decode": len(decode)},
    }


def _profile_child(engine_args: dict, repeats: int, torch_threads: int | None, out) -> None:
    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)
    out.put(profile(engine_args, repeats=repeats))


def profile_in_child(
    engine_args: dict, repeats: int = 3, torch_threads: int | None = None, timeout_s: float = 900
) -> dict:
    """`profile` in a spawned child process, for callers that deploy workers next: on a GPU the
    profiled engine's memory must be free again. `torch_threads`: as a CPU worker runs (1)."""
    import multiprocessing
    import queue
    import time

    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    child = ctx.Process(target=_profile_child, args=(engine_args, repeats, torch_threads, out))
    child.start()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            try:
                return out.get(timeout=1.0)
            except queue.Empty:
                if not child.is_alive():
                    raise RuntimeError(f"profiling failed (exit code {child.exitcode})") from None
        raise TimeoutError(f"profiling took over {timeout_s:.0f} s")
    finally:
        child.join(timeout=60)
        if child.is_alive():
            child.kill()


def main(args) -> int:
    from engine.testing import ensure_default_model

    engine_args = {
        "model": args.model or str(ensure_default_model()),
        "dtype": args.dtype,
        "device": args.device,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "max_num_seqs": 64,
    }
    if args.num_blocks:
        engine_args["num_blocks"] = args.num_blocks
    result = profile(engine_args, repeats=args.repeats)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: result[k] for k in ("prefill", "decode", "num_samples")}))
    print(f"profile written to {args.output}; use it as `profile:` of a tier in the config")
    return 0
