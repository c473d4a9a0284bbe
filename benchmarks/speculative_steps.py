"""Where a speculative engine's time goes, step by step: plain, static and dynamic n-gram
speculation on one cell of `benchmarks.speculative` (same models and workloads), every step
timed on the host and put in a class:

    plain      a step that verified nothing and proposed nothing
    +chain     launched before the previous step's tokens were read (async scheduling)
    +shadow    shadow lookups ran while it was on the device (dynamic n-gram speculation)
    proposed   the proposer looked requests up, but no draft was verified
    verify     drafts were verified
    +prompt    (suffix) the step held prompt tokens too

Per engine and run: tok/s, and per class the steps, their median and total milliseconds; then
the proposer's time, the cost meter's factor and the measured acceptance. A speculative engine
that loses to plain decoding shows here which steps lose it (session 7 found the learning
verify steps, the steps that broke async scheduling's chain and then ran plain, and the first
proposals' index builds this way).

    python -m benchmarks.speculative_steps --model markov --workload copy --batch 64 \\
        --dtype bfloat16 --hidden-size 2048 --layers 16 --heads 16 --kv-heads 8 --vocab-size 32000
"""

from __future__ import annotations

import argparse
import collections
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.speculative import (
    add_shape_args,
    copy_workload,
    make_models,
    output_lengths,
    random_prompts,
    shuffled,
)
from engine import LLM, SamplingParams


def trace_run(llm: LLM, prompts, params) -> dict:
    """One timed `generate` with every engine step classified (see the module's docstring)."""
    engine = llm.engine
    counters = collections.Counter()
    proposer, runner = engine.proposer, engine.runner
    originals = {}
    if proposer is not None:
        originals["propose_batch"], originals["lookup"] = proposer.propose_batch, proposer.lookup

        def propose_batch(requests, counts):
            counters["proposals"] += 1
            start = time.perf_counter()
            originals["propose_batch"](requests, counts)
            counters["propose_s"] += time.perf_counter() - start

        def lookup(request, k):
            counters["lookups"] += 1
            return originals["lookup"](request, k)

        proposer.propose_batch, proposer.lookup = propose_batch, lookup
    launch = runner.launch

    def counting_launch(sched, prev=None):
        counters["chained"] += prev is not None
        return launch(sched, prev)

    runner.launch = counting_launch
    step_once, steps = engine.step, []

    def traced_step():
        before = dict(counters)
        start = time.perf_counter()
        outputs = step_once()
        seconds = time.perf_counter() - start
        delta = {k: counters[k] - before.get(k, 0) for k in counters}
        # Lookups outside a proposal are shadow lookups (propose_batch calls lookup per request).
        shadow = delta.get("lookups", 0) > 0 and not delta.get("proposals", 0)
        if engine.last_step.num_draft_tokens:
            kind = "verify"
        elif delta.get("proposals", 0):
            kind = "proposed"
        else:
            kind = "plain" + ("+chain" if delta.get("chained", 0) else "")
            kind += "+shadow" if shadow else ""
        if engine.last_step.num_prefill_tokens:
            kind += "+prompt"  # the step held prompt tokens (an admission, a chunk)
        steps.append((kind, seconds))
        return outputs

    engine.step = traced_step
    try:
        if engine.runner.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        outputs = llm.generate(prompts, params)
        if engine.runner.device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    finally:
        engine.step, runner.launch = step_once, launch
        for name, fn in originals.items():
            setattr(proposer, name, fn)
    groups = collections.defaultdict(list)
    for kind, seconds in steps:
        groups[kind].append(seconds)
    return {
        "tok_s": sum(len(o.token_ids) for o in outputs) / wall,
        "classes": {
            kind: (len(times), statistics.median(times), sum(times))
            for kind, times in sorted(groups.items())
        },
        "propose_s": counters["propose_s"],
        "lookups": counters["lookups"],
        "factor": engine.step_cost.factor,
        "acceptance": engine.acceptance.acceptance,
        "drafted": engine.num_draft_tokens,
        "accepted": engine.num_accepted_tokens,
    }


def report(name: str, run: dict) -> str:
    classes = ", ".join(
        f"{kind} {count} x {1e3 * median:.2f} ms = {1e3 * total:.1f} ms"
        for kind, (count, median, total) in run["classes"].items()
    )
    return (
        f"{name:8s} {run['tok_s']:9.1f} tok/s | {classes} | proposer {1e3 * run['propose_s']:.1f}"
        f" ms, {run['lookups']} lookups, drafts {run['drafted']} accepted {run['accepted']},"
        f" factor {run['factor']:.2f}, acceptance {run['acceptance']:.2f}"
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="markov", choices=["random", "markov"])
    ap.add_argument("--workload", default="copy", choices=["copy", "brief", "random"])
    ap.add_argument("--copy-tokens", type=int, default=16, help="`brief`: benchmarks.speculative")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--waves", type=int, default=1, help="prompts: this many times the batch")
    ap.add_argument("--length-spread", type=float, default=0.0, help="see benchmarks.speculative")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument(
        "--shuffle-lengths", action="store_true", help="see benchmarks.speculative.shuffled"
    )
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument(
        "--engines", nargs="+", default=["static", "dynamic"], choices=["static", "dynamic"]
    )
    ap.add_argument("--async-scheduling", action="store_true")
    ap.add_argument("--saturation-tokens", type=int, default=None)
    add_shape_args(ap)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.models = [args.model]
    root = Path(tempfile.mkdtemp(prefix="baton-spec-steps-"))
    model_dir = make_models(root, args)[args.model]
    num = args.batch * args.waves
    if args.workload in ("copy", "brief"):
        copied = args.copy_tokens if args.workload == "brief" else None
        prompts = copy_workload(model_dir, num, args.vocab_size, args, 1, copied)
    else:
        prompts = random_prompts(num, 256 + args.max_tokens, args.vocab_size, 2)
    rule = {"saturation_tokens": args.saturation_tokens} if args.saturation_tokens else {}
    common = {"method": "ngram", "num_speculative_tokens": args.k, "max_batch_size": 1 << 16}
    specs = {
        "plain": None,
        "static": {**common, **rule, "adaptive": False},
        "dynamic": {**common, **rule, "adaptive": True},
    }
    specs = {name: spec for name, spec in specs.items() if name in ("plain", *args.engines)}
    llms = {
        name: LLM(
            model_dir,
            dtype=args.dtype,
            max_num_seqs=args.batch,
            num_blocks=48 * args.batch,
            enable_prefix_caching=False,
            speculative=spec,
            async_scheduling=args.async_scheduling,
        )
        for name, spec in specs.items()
    }
    lengths = output_lengths(args.max_tokens, args.length_spread, len(prompts))
    for llm in llms.values():  # warm-up
        llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    print(
        f"{args.model} / {args.workload}, batch {args.batch}, {args.max_tokens} tokens, "
        f"{'async' if args.async_scheduling else 'sync'}, {args.layers} layers x "
        f"{args.hidden_size}, {args.dtype}, {llms['plain'].engine.runner.device}"
    )
    for repeat in range(args.repeats):
        order = shuffled(lengths, repeat) if args.shuffle_lengths else lengths
        params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in order]
        for name, llm in llms.items():
            llm.engine.reset_speculation()
            print(f"[{repeat}] " + report(name, trace_run(llm, prompts, params)), flush=True)


if __name__ == "__main__":
    main()
