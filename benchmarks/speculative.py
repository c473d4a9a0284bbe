"""Speculative decoding vs plain decoding: output tokens per second, same model, same prompts,
same run, greedy (so every engine must produce identical tokens).

Methods and workloads:
- `ngram` (prompt lookup) on `copy` prompts (a document, the model's own continuation of it,
  and the document again: the answer is already in the prompt, as in code editing or quoting
  back), `brief` ones (the same with only the continuation's first `--copy-tokens`: drafts
  hold for those, then the lookups find none) and `random` ones, on two models (`make_models`:
  `random`, and `markov`, whose next token depends on the current one only).
- `draft`: a draft model that is the target's first `--draft-layers` layers with its embedding
  and head (`engine.testing.write_draft_pair`; the target's later layers damped by
  `--later-layer-scale`, so the truncation agrees with it as a trained draft would), on random
  prompts of 256 tokens.

Each runs at every `--batch-sizes` (max_num_seqs; as many prompts as the batch, at least 2,
times `--waves`: with several waves, finished requests' places go to waiting ones)
with three engines: plain, `static` (k drafts every step) and `dynamic` (the step's k from
the batch size and the measured acceptance: `engine.speculative.choose_num_drafts`), both
with the `max_batch_size` cap lifted so that the rule alone decides. Every engine first runs
the prompts for a few tokens (a warm-up), then forgets what dynamic speculation measured, so a
timed run pays the rule's learning phase as a new server does. Reported: each engine's output
tokens/s and the speculative ones' speed-up over plain, then static/dynamic: the acceptance rate
(accepted / drafted), the drafts a request verified per step it was in, the tokens it gained
per step, and (dynamic) the rule's measured cost factor at the end (`StepCostMeter`: ~1 when a
speculative step costs what the roofline says). "paired": per repeat, plain's time over the
engine's in that repeat (runs back to back, so host drift between repeats cancels): the median
over the repeats and its range. Read "not slower than plain" from it, not from the best runs.

    python -m benchmarks.speculative                              # CPU, small shapes
    python -m benchmarks.speculative --methods draft ngram --dtype bfloat16 --hidden-size 2048 \
        --layers 16 --heads 16 --kv-heads 8 --vocab-size 32000 --draft-layers 2 \
        --batch-sizes 1 64 --max-tokens 128 --repeats 2         # one GPU
    python -m benchmarks.speculative --methods ngram --hidden-size 64 --heads 2 --kv-heads 1 \
        --layers 2 --batch-sizes 64 --max-tokens 128 --saturation-tokens 256 --threads 1
                                          # CPU, host-bound: the GPU's rule, a tiny model
"""

from __future__ import annotations

import argparse
import gc
import platform
import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from engine import LLM, SamplingParams
from engine.testing import write_draft_pair, write_test_checkpoint


def copy_workload(
    model_dir, num_prompts, vocab, args, seed, copy_tokens: int | None = None
) -> list[list[int]]:
    """Prompts X + C + X, where C is the model's own greedy continuation of X: the answer is
    already in the prompt, as when editing code or quoting a document back. `copy_tokens`: only
    C's first that many tokens (the `brief` workload): a continuation that follows C, as the
    `markov` model's does, then runs past what the prompt holds, so its lookups find drafts for
    that many tokens, one wrong proposal, then (almost) none: drafts that hold briefly, as when
    an answer quotes a passage and goes on in its own words."""
    docs = random_prompts(num_prompts, 128, vocab, seed)
    llm = LLM(model_dir, dtype=args.dtype, num_blocks=1024, enable_prefix_caching=False)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    outputs = llm.generate(docs, params)
    return [x + out.token_ids[:copy_tokens] + x for x, out in zip(docs, outputs)]


def random_prompts(num_prompts, length, vocab, seed) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(num_prompts)]


def make_models(root: Path, args) -> dict[str, Path]:
    """Those of `args.models`: `random`, random weights; `markov`, the same with every
    attention output projection zeroed, so the next token is a fixed function of the current
    one (a stand-in for a model that continues text it has seen the way it did before; its
    attention is still computed)."""
    models = {}
    for name in args.models:
        models[name] = write_test_checkpoint(root / name, **model_shape(args), dtype=args.dtype)
    if "markov" not in models:
        return models
    weights = models["markov"] / "model.safetensors"
    tensors = load_file(weights)
    for key in tensors:
        if key.endswith("self_attn.o_proj.weight"):
            tensors[key].zero_()
    save_file(tensors, weights, metadata={"format": "pt"})
    return models


def run(
    model_dir,
    prompts,
    batch_size,
    max_tokens,
    specs,
    repeats,
    dtype,
    async_scheduling=False,
    shuffle_lengths=False,
):
    """Time a plain engine and one per speculative config on the same prompts, alternating runs
    so that drift in the machine's load hits all alike, in an order rotated each repeat (on a
    2-core CPU the dynamic engine's decode steps ran ~10% slower right after static
    speculation's run than first); the best run of each counts. `shuffle_lengths`: each repeat
    gives the requests the output lengths in its own order (`shuffled`), the same for every
    engine of the repeat. Returns (total tokens,
    [(tok/s, drafted, accepted, cost factor) per engine, plain first], [per repeat: each
    speculative engine's time over plain's in that repeat, the pairs run back to back])."""
    llms = [
        LLM(
            model_dir,
            dtype=dtype,
            max_num_seqs=batch_size,
            num_blocks=48 * batch_size,
            enable_prefix_caching=False,
            speculative=s,
            async_scheduling=async_scheduling,
        )
        for s in (None, *specs)
    ]
    lengths = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    best = [float("inf")] * len(llms)
    tokens = [None] * len(llms)
    counts = [(0, 0, 1.0)] * len(llms)
    paired, differing = [], []
    for llm in llms:  # kernels compiled and tuned for these shapes, allocators warm
        llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    for repeat in range(repeats):
        order = shuffled(lengths, repeat) if shuffle_lengths else lengths
        params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in order]
        times = [0.0] * len(llms)
        for i in [(repeat + j) % len(llms) for j in range(len(llms))]:
            llm = llms[i]
            engine = llm.engine
            engine.reset_speculation()  # the learning phase again, as in a new engine
            _sync(engine)
            start = time.perf_counter()
            outputs = llm.generate(prompts, params)
            _sync(engine)
            elapsed = time.perf_counter() - start
            times[i] = elapsed
            if elapsed < best[i]:
                best[i] = elapsed
                drafted, accepted = engine.num_draft_tokens, engine.num_accepted_tokens
                counts[i] = (drafted, accepted, engine.step_cost.factor)
            tokens[i] = [o.token_ids for o in outputs]
        differing.append(_count_differing(llms, tokens))
        paired.append([times[0] / t for t in times[1:]])
    if any(differing):
        print(
            f"  (speculative greedy output differed from plain in up to {max(differing)} of "
            f"{len(prompts)} requests, in {sum(map(bool, differing))} of {repeats} repeats: "
            f"{llms[0].engine.dtype} rounding)"
        )
    total = sum(map(len, tokens[0]))
    del llms
    _free_memory()  # before the next cell's engines (an 8B-shaped target: ~13 GB each)
    return total, [(total / t, *c) for t, c in zip(best, counts)], paired


def _count_differing(llms, tokens) -> int:
    """Requests whose greedy output differs between plain and a speculative engine (the most
    over the engines). In float32 a difference is a bug. In bf16/fp16 a verify pass (k + 1
    positions, other kernels) may round a near-tie differently from k + 1 single steps."""
    worst = 0
    for i in range(1, len(llms)):
        differ = sum(a != b for a, b in zip(tokens[i], tokens[0]))
        assert differ == 0 or llms[0].engine.dtype != torch.float32, (
            f"speculative greedy output differs from plain in {differ} of {len(tokens[0])} "
            "requests in float32"
        )
        worst = max(worst, differ)
    return worst


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync(engine) -> None:
    if engine.runner.device.type == "cuda":
        torch.cuda.synchronize(engine.runner.device)


def cells(args, root: Path):
    """(method, model, workload, model dir, prompts, spec config) for every row."""
    vocab = args.vocab_size
    num = max(args.batch_sizes) * args.waves
    rule = {"saturation_tokens": args.saturation_tokens} if args.saturation_tokens else {}
    if "ngram" in args.methods:
        models = make_models(root, args)
        for model, model_dir in models.items():
            work = {}
            if "copy" in args.workloads:
                work["copy"] = copy_workload(model_dir, num, vocab, args, seed=1)
                _free_memory()
            if "brief" in args.workloads:
                work["brief"] = copy_workload(model_dir, num, vocab, args, 1, args.copy_tokens)
                _free_memory()
            if "random" in args.workloads:
                length = 256 + args.max_tokens
                work["random"] = random_prompts(num, length, vocab, 2)
            for name, prompts in work.items():
                yield "ngram", model, name, model_dir, prompts, {"method": "ngram", **rule}
    if "draft" in args.methods:
        target, draft = write_draft_pair(
            root / "pair",
            args.draft_layers,
            args.later_layer_scale,
            **model_shape(args),
            dtype=args.dtype,
        )
        prompts = random_prompts(num, 256, vocab, 3)
        spec = {"method": "draft", "model": str(draft), **rule}
        yield "draft", "pair", "random", target, prompts, spec


def add_shape_args(ap, hidden=512, layers=4, heads=8, kv_heads=2, vocab=4096) -> None:
    """The target's shape and dtype flags (read by `model_shape`), with this benchmark's
    defaults."""
    ap.add_argument("--hidden-size", type=int, default=hidden)
    ap.add_argument("--layers", type=int, default=layers)
    ap.add_argument("--heads", type=int, default=heads)
    ap.add_argument("--kv-heads", type=int, default=kv_heads)
    ap.add_argument("--vocab-size", type=int, default=vocab)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def model_shape(args) -> dict:
    return dict(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=3 * args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=2048,
        with_tokenizer=False,
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=["ngram", "draft"], choices=["ngram", "draft"])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--models", nargs="+", default=["random", "markov"], help="n-gram cells")
    ap.add_argument(
        "--workloads",
        nargs="+",
        default=["copy", "random"],
        choices=["copy", "brief", "random"],
        help="n-gram cells",
    )
    ap.add_argument(
        "--copy-tokens",
        type=int,
        default=16,
        help="`brief`: the tokens of the continuation the prompt holds (copy_workload)",
    )
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument(
        "--waves",
        type=int,
        default=1,
        help="prompts per run: this many times the batch (max_num_seqs), so that continuous "
        "batching keeps the batch full as requests finish, as in a loaded server; 1: one wave, "
        "whose last steps run the requests that gained least",
    )
    ap.add_argument(
        "--length-spread",
        type=float,
        default=0.0,
        help="requests' max_tokens spread over max-tokens x (1 +- this) (output_lengths)",
    )
    ap.add_argument(
        "--engines",
        nargs="+",
        default=["static", "dynamic"],
        choices=["static", "dynamic"],
        help="the speculative engines timed against plain (leaving static out halves a "
        "many-repeat run of dynamic's paired ratio)",
    )
    ap.add_argument(
        "--shuffle-lengths",
        action="store_true",
        help="each repeat gives the requests the output lengths in its own order (`shuffled`)",
    )
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    add_shape_args(ap)
    ap.add_argument("--draft-layers", type=int, default=1, help="the draft: the target's first N")
    ap.add_argument(
        "--later-layer-scale",
        type=float,
        default=0.1,
        help="scale of the target's residual branches past the draft's layers (write_draft_pair)",
    )
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per cell; best is kept")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--saturation-tokens",
        type=int,
        default=None,
        help="the dynamic rule's roofline (SpeculativeConfig.saturation_tokens; default: 256 on "
        "CUDA, 8 on CPU); 256 on CPU prices verification as on a GPU",
    )
    ap.add_argument(
        "--async-scheduling",
        action="store_true",
        help="every engine (plain included) launches a greedy decode step before the previous "
        "one's tokens are read; dynamic speculation does so for steps its rule leaves plain",
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    device = (
        torch.cuda.get_device_name() if torch.cuda.is_available() else f"{platform.machine()} CPU"
    )
    print(
        f"commit {commit}, {device}, {torch.get_num_threads()} threads, torch {torch.__version__}"
        f"; target: {args.layers} layers, hidden {args.hidden_size}, vocab {args.vocab_size}, "
        f"{args.dtype}; draft: first {args.draft_layers} layer(s), later layers x"
        f"{args.later_layer_scale}; {args.max_tokens} output tokens per request, greedy, k={args.k}"
        + (f", saturation_tokens {args.saturation_tokens}" if args.saturation_tokens else "")
        + (", async scheduling" if args.async_scheduling else "")
        + (f", {args.waves} waves of prompts" if args.waves > 1 else "")
        + (f", output lengths x(1 +- {args.length_spread})" if args.length_spread else "")
        + (" in a new order each repeat" if args.shuffle_lengths else "")
    )
    print(
        f"{'method':<7}{'model':<8}{'workload':<9}{'batch':>6}{'plain tok/s':>12}"
        f"{'static tok/s':>19}{'dynamic tok/s':>20}{'accept s/d':>12}{'drafts/step s/d':>17}"
        f"{'tok/step s/d':>14}{'cost x':>8}{'static paired':>22}{'dynamic paired':>22}"
    )
    root = Path(tempfile.mkdtemp(prefix="baton-spec-"))
    for method, model, workload, model_dir, prompts, spec in cells(args, root):
        for batch in args.batch_sizes:
            common = {**spec, "num_speculative_tokens": args.k, "max_batch_size": 1 << 16}
            specs = {
                "static": {**common, "adaptive": False},
                "dynamic": {**common, "adaptive": True},
            }
            names = [name for name in specs if name in args.engines]
            num_prompts = max(batch, 2) * args.waves
            total, rows, paired = run(
                model_dir,
                prompts[:num_prompts],
                batch,
                output_lengths(args.max_tokens, args.length_spread, num_prompts),
                [specs[name] for name in names],
                args.repeats,
                args.dtype,
                args.async_scheduling,
                args.shuffle_lengths,
            )
            base = rows[0][0]
            cols = {name: _engine_columns(total, base, rows[1 + i], [r[i] for r in paired])
                    for i, name in enumerate(names)}  # fmt: skip
            none = {"tok": "-", "accept": "-", "drafts": "-", "per_step": "-", "paired": "-"}
            st, dy = cols.get("static", none), cols.get("dynamic", none)
            factor = f"{rows[-1][3]:.2f}" if "dynamic" in cols else "-"
            print(
                f"{method:<7}{model:<8}{workload:<9}{batch:>6}{base:>12.1f}{st['tok']:>19}"
                f"{dy['tok']:>20}{st['accept'] + '/' + dy['accept']:>12}"
                f"{st['drafts'] + '/' + dy['drafts']:>17}"
                f"{st['per_step'] + '/' + dy['per_step']:>14}{factor:>8}"
                f"{st['paired']:>22}{dy['paired']:>22}",
                flush=True,
            )
            for i, name in enumerate(names):  # every pair, for whoever tests the median
                pairs = [r[i] for r in paired]
                listed = " ".join(f"{x:.3f}" for x in pairs)
                print(f"  {name} pairs (mean {statistics.fmean(pairs):.3f}): {listed}")


def _engine_columns(total: int, base: float, row, paired: list[float]) -> dict[str, str]:
    """One speculative engine's report columns. A request gains its accepted drafts plus one
    target token per step it runs, so it ran (total - accepted) request-steps."""
    tok_s, drafted, accepted, _ = row
    steps = total - accepted
    return {
        "tok": f"{tok_s:.1f} ({tok_s / base:.2f}x)",
        "accept": f"{accepted / max(drafted, 1):.2f}",
        "drafts": f"{drafted / steps:.2f}",
        "per_step": f"{total / steps:.2f}",
        "paired": _spread(paired),
    }


def output_lengths(max_tokens: int, spread: float, num_prompts: int) -> list[int]:
    """Each request's max_tokens: `max_tokens` x (1 +- `spread`), spread evenly (golden-ratio
    steps), so that requests finish at different steps, as in a server; 0: all alike (one
    wave of equal requests then finishes, and the next is admitted, in lock step)."""
    return [
        max(1, round(max_tokens * (1 - spread + 2 * spread * ((i * 0.6180339887) % 1.0))))
        for i in range(num_prompts)
    ]


def shuffled(lengths: list[int], seed: int) -> list[int]:
    """`lengths` in an order drawn with `seed` (`--shuffle-lengths`). Which request gets which
    length decides which finish in the same step, and each step that admits a prompt costs
    ~2 ms more than a decode step (H100, 0.9B): with one fixed order, plain decoding finished
    256 requests in 151 admitting steps and dynamic speculation, whose accepted drafts move
    finishes, in 175 (`brief`, 4 waves, spread 0.5; 2026-11-27): one draw of coincidences,
    worth ~3% either way. Drawing an order per repeat averages over them."""
    order = list(lengths)
    random.Random(seed).shuffle(order)
    return order


def _spread(ratios: list[float]) -> str:
    """The median speed-up over plain of runs paired within a repeat, and its range."""
    ordered = sorted(ratios)
    return f"{statistics.median(ordered):.2f} [{ordered[0]:.2f}-{ordered[-1]:.2f}]"


if __name__ == "__main__":
    main()
