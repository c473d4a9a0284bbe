"""Speculative decoding (n-gram prompt lookup) vs plain decoding: output tokens per second, same
model, same prompts, same run, greedy (so both sides must produce identical tokens).

Two workloads: `copy` (the prompt holds a document, the model's own continuation of it, and the
document again, so the answer is already in the prompt, as in code editing or quoting back) and
`random` (random tokens, the same length), on two models (see `make_models`). Each runs at batch
1 (one request at a time) and at a larger batch. Reported per cell: tokens/s without and with
speculation, the ratio, the acceptance rate (accepted / proposed draft tokens) and the mean
number of tokens a request gained per step it was in.

    python -m benchmarks.speculative                       # CPU, the default model shape
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from engine import LLM, SamplingParams
from engine.testing import write_test_checkpoint


def copy_workload(model_dir, num_prompts, vocab, max_tokens, seed) -> list[list[int]]:
    """Prompts X + C + X, where C is the model's own greedy continuation of X: the answer is
    already in the prompt, as when editing code or quoting a document back."""
    docs = random_prompts(num_prompts, 128, vocab, seed)
    llm = LLM(model_dir, num_blocks=512, enable_prefix_caching=False)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return [x + out.token_ids + x for x, out in zip(docs, llm.generate(docs, params))]


def random_prompts(num_prompts, length, vocab, seed) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(num_prompts)]


def make_models(root: Path, args) -> dict[str, Path]:
    """`random`: random weights. `markov`: the same with every attention output projection
    zeroed, so the next token is a fixed function of the current one (a stand-in for a model
    that continues text it has seen the way it did before; its attention is still computed)."""
    shape = dict(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=3 * args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        with_tokenizer=False,
    )
    models = {}
    for name in ("random", "markov"):
        models[name] = write_test_checkpoint(root / name, **shape)
    weights = models["markov"] / "model.safetensors"
    tensors = load_file(weights)
    for key in tensors:
        if key.endswith("self_attn.o_proj.weight"):
            tensors[key].zero_()
    save_file(tensors, weights, metadata={"format": "pt"})
    return models


def run(model_dir, prompts, batch_size, max_tokens, spec, repeats):
    """Time plain and speculative engines on the same prompts, alternating runs so that drift in
    the machine's load hits both alike; the best run of each counts."""
    llms = [
        LLM(
            model_dir,
            max_num_seqs=batch_size,
            num_blocks=48 * batch_size,
            enable_prefix_caching=False,
            speculative=s,
        )
        for s in (None, spec)
    ]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    best = [float("inf"), float("inf")]
    tokens = [None, None]
    for llm in llms:
        llm.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=0.0))  # warm-up
    for _ in range(repeats):
        for i, llm in enumerate(llms):
            llm.engine.num_draft_tokens = llm.engine.num_accepted_tokens = 0
            start = time.perf_counter()
            outputs = llm.generate(prompts, params)
            best[i] = min(best[i], time.perf_counter() - start)
            tokens[i] = [o.token_ids for o in outputs]
    assert tokens[0] == tokens[1], "speculative greedy output differs from plain"
    total = sum(map(len, tokens[0]))
    engine = llms[1].engine
    return (
        total / best[0],
        total / best[1],
        total,
        engine.num_draft_tokens,
        engine.num_accepted_tokens,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-prompts", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--hidden-size", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per cell; best is kept")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    models = make_models(Path(tempfile.mkdtemp(prefix="baton-spec-")), args)
    spec = {"method": "ngram", "num_speculative_tokens": args.k}
    print(
        f"commit {commit}, {platform.machine()} CPU, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}; models: {args.layers} layers, hidden {args.hidden_size}, vocab "
        f"{args.vocab_size}; {args.num_prompts} prompts, {args.max_tokens} output tokens each, "
        f"greedy; n-gram k={args.k}"
    )
    print(
        f"{'model':<8}{'workload':<9}{'batch':>6}{'plain tok/s':>13}{'spec tok/s':>12}"
        f"{'ratio':>7}{'accept':>8}{'tok/step':>10}"
    )
    for model, model_dir in models.items():
        work = {
            "copy": copy_workload(
                model_dir, args.num_prompts, args.vocab_size, args.max_tokens, seed=1
            ),
            "random": random_prompts(args.num_prompts, 256 + args.max_tokens, args.vocab_size, 2),
        }
        for name, prompts in work.items():
            for batch in args.batch_sizes:
                base, fast, total, drafted, accepted = run(
                    model_dir, prompts, batch, args.max_tokens, spec, args.repeats
                )
                # A request gains its accepted drafts plus one target token per step it runs.
                print(
                    f"{model:<8}{name:<9}{batch:>6}{base:>13.1f}{fast:>12.1f}{fast / base:>7.2f}"
                    f"{accepted / max(drafted, 1):>8.2f}{total / (total - accepted):>10.2f}"
                )


if __name__ == "__main__":
    main()
