"""What dynamic speculation's bookkeeping costs a step where the rule leaves it plain: each of
the engine's speculation methods timed on the host (wrapped), per engine step and as a share
of the step, over one run of `benchmarks.speculative`'s workloads.

Where drafts fail (the `random` model on `random` prompts: no lookup finds any) everything
listed is overhead against plain decoding; at batch 64 on an H200 a decode step of the 0.9B
shape is ~2.5 ms, so 25 us here is 1% there (if the hosts are alike).

    python -m benchmarks.speculative_bookkeeping          # CPU, tiny model, vocab 32000
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.speculative import (
    add_shape_args,
    make_models,
    output_lengths,
    random_prompts,
    shuffled,
)
from engine import LLM, SamplingParams

# The engine's methods that exist for speculation only (the proposer's lookup is timed too);
# TOP: those not called from another of them, whose sum is the bookkeeping's whole.
TOP = ("_propose", "_shadow_lookups", "_score_shadows", "_observe_step_cost", "_retain_proposals")
ENGINE_METHODS = (
    "_propose",
    "_step_num_drafts",
    "_propose_for",
    "_shadow_lookups",
    "_score_shadows",
    "_observe_step_cost",
    "_retain_proposals",
)


def timed_run(llm: LLM, prompts, params) -> tuple[int, dict[str, tuple[int, float]]]:
    """One `generate` with the speculation methods and `step` timed. Returns (steps, {name:
    (calls, seconds)})."""
    engine = llm.engine
    seconds, calls = collections.Counter(), collections.Counter()

    def wrap(obj, name):
        inner = getattr(obj, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                seconds[name] += time.perf_counter() - start
                calls[name] += 1

        setattr(obj, name, timed)
        return inner

    originals = {name: wrap(engine, name) for name in ("step", *ENGINE_METHODS)}
    lookup = wrap(engine.proposer, "lookup")
    try:
        llm.generate(prompts, params)
    finally:
        for name, fn in originals.items():
            setattr(engine, name, fn)
        engine.proposer.lookup = lookup
    return calls["step"], {name: (calls[name], seconds[name]) for name in seconds}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="random", choices=["random", "markov"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--waves", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--length-spread", type=float, default=0.5)
    add_shape_args(ap, hidden=64, layers=2, heads=2, kv_heads=1, vocab=32000)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.models = [args.model]
    model_dir = make_models(Path(tempfile.mkdtemp(prefix="baton-spec-book-")), args)[args.model]
    num = args.batch * args.waves
    prompts = random_prompts(num, 256 + args.max_tokens, args.vocab_size, 2)
    lengths = shuffled(output_lengths(args.max_tokens, args.length_spread, num), 0)
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in lengths]
    spec = {"method": "ngram", "num_speculative_tokens": 4, "adaptive": True}
    llm = LLM(
        model_dir,
        dtype=args.dtype,
        max_num_seqs=args.batch,
        num_blocks=48 * args.batch,
        enable_prefix_caching=False,
        speculative={**spec, "max_batch_size": 1 << 16, "saturation_tokens": 256},
    )
    warm = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[: args.batch], warm)
    llm.engine.reset_speculation()
    steps, times = timed_run(llm, prompts, params)
    step_s = times["step"][1]
    engine = llm.engine
    print(
        f"{args.model} model, random prompts, batch {args.batch}, {args.waves} waves, "
        f"{engine.runner.device}: {steps} steps, {step_s / steps * 1e6:.0f} us a step; "
        f"drafts verified {engine.num_draft_tokens}, hit rate {engine.hits.rate:.3f}"
    )
    for name in (*ENGINE_METHODS, "lookup"):
        count, seconds = times.get(name, (0, 0.0))
        print(
            f"  {name:<20} {count:>6} calls {seconds / steps * 1e6:>9.1f} us a step "
            f"{100 * seconds / step_s:>6.2f}%"
        )
    own = sum(times.get(name, (0, 0.0))[1] for name in TOP)
    print(f"  {'all':<20} {'':>12} {own / steps * 1e6:>9.1f} us a step {100 * own / step_s:>6.2f}%")


if __name__ == "__main__":
    main()
