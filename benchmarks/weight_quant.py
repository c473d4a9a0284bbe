"""Weight quantization on one GPU: batch-1 decode speed of bf16, int8, int4 and fp8 in one run,
with each quantized model's logit error and greedy agreement against the bf16 one.

Model: Llama-3-8B shape, random bf16 weights drawn on the GPU from the same seed for every
variant, so each quantized model is a quantization of the very bf16 model it is compared with
(see `benchmarks.gpu_decode` for the engine set-up and the timing: whole engine steps with
CUDA graphs). The output head stays bf16 in every variant (engine/quantization/linear.py).

Roofline per variant: HBM copy bandwidth (measured in the same run) / the bytes a decode step
must read (every weight but the embedding, of which it reads one row per token).

Accuracy: `--prompts` prompts of `--prompt-len` random tokens, `--gen-len` greedy tokens each;
relative L2 error of the end-of-prompt logits, first-token agreement, and the share of all
generated tokens before each prompt's first disagreement. Random weights and random prompts:
these numbers bound nothing about a trained model; they show the kernels compute the quantized
model faithfully and how far its logits move.

    PYTHONPATH=. python -m benchmarks.weight_quant --json weight_quant.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.gpu_common import (
    copy_bandwidth,
    describe_run,
    release_gpu_memory,
    write_config_only,
)
from benchmarks.gpu_decode import decode_rate, graph_replay_ms
from engine import LLM, SamplingParams

VARIANTS = {"bf16": None, "int8": "int8", "int4": "int4", "fp8": "fp8"}


def greedy_with_logits(llm: LLM, prompts: list[list[int]], gen_len: int):
    """Greedy tokens per prompt and the float32 logits of each prompt's first sampled token."""
    first_logits = {}
    runner = llm.engine.runner
    execute = runner.execute

    def capture(sched):
        out = execute(sched)
        for row, rid in enumerate(out.sampled):
            if rid not in first_logits:
                first_logits[rid] = out.logits[row].float().cpu()
        return out

    runner.execute = capture
    # NOTE: async steps go through `launch`, not `execute`: the accuracy pass runs synchronous.
    config = llm.engine.config
    async_scheduling, config.async_scheduling = config.async_scheduling, False
    params = SamplingParams(max_tokens=gen_len, temperature=0.0, ignore_eos=True)
    outputs = llm.generate(prompts, params)
    runner.execute = execute
    config.async_scheduling = async_scheduling
    return [o.token_ids for o in outputs], [first_logits[o.request_id] for o in outputs]


def agreement(tokens, ref_tokens) -> tuple[float, float]:
    """(share of prompts whose first token agrees, share of tokens before the first mismatch)."""
    first = sum(a[0] == b[0] for a, b in zip(tokens, ref_tokens)) / len(tokens)
    prefix = 0
    for a, b in zip(tokens, ref_tokens):
        prefix += next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(b))
    return first, prefix / sum(len(b) for b in ref_tokens)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help="of bf16,int8,int4,fp8")
    p.add_argument("--batches", default="1", help="decode batch sizes to time")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--prompts", type=int, default=16, help="accuracy prompts")
    p.add_argument("--gen-len", type=int, default=32, help="greedy tokens per accuracy prompt")
    p.add_argument("--num-blocks", type=int, default=2048)
    p.add_argument(
        "--async-scheduling", action="store_true",
        help="every variant launches greedy decode steps before reading the last one's tokens",
    )  # fmt: skip
    p.add_argument("--json", default=None)
    args = p.parse_args()
    variants = args.variants.split(",")
    batches = [int(b) for b in args.batches.split(",")]

    bandwidth = copy_bandwidth()
    g = torch.Generator().manual_seed(0)
    results = {
        "run": describe_run(),
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "async_scheduling": args.async_scheduling,
        "variants": {},
    }
    ref = None
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_config_only(Path(tmp) / "llama3-8b-shape")
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        prompts = [
            torch.randint(10, vocab, (args.prompt_len,), generator=g).tolist()
            for _ in range(args.prompts)
        ]
        for name in variants:
            start = time.perf_counter()
            llm = LLM(
                model_dir, dtype="bfloat16", max_model_len=4096, max_num_seqs=max(batches),
                num_blocks=args.num_blocks, quantization=VARIANTS[name],
                async_scheduling=args.async_scheduling, extra={"random_weights": True},
            )  # fmt: skip
            setup_s = time.perf_counter() - start
            model = llm.engine.runner.model
            weight_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
            embed = model.model.embed_tokens.weight
            read_bytes = weight_bytes - embed.numel() * embed.element_size()
            rates = {
                b: decode_rate(llm, b, args.prompt_len, args.steps, args.warmup) for b in batches
            }
            row = {
                "setup_s": setup_s,
                "weight_bytes": weight_bytes,
                "bytes_read_per_step": read_bytes,
                "roofline_tokens_per_s": bandwidth / read_bytes,
                "tokens_per_s": rates,
                "graph_replay_ms": graph_replay_ms(llm) if llm.engine.runner.graphs else None,
            }
            tokens, logits = greedy_with_logits(llm, prompts, args.gen_len)
            if ref is None and name == "bf16":
                ref = (tokens, logits)
            elif ref is not None:
                rel = torch.stack([(a - b).norm() / b.norm() for a, b in zip(logits, ref[1])])
                first, prefix = agreement(tokens, ref[0])
                row.update(
                    rel_logit_err_mean=float(rel.mean()),
                    rel_logit_err_max=float(rel.max()),
                    first_token_agreement=first,
                    greedy_prefix_agreement=prefix,
                )
            results["variants"][name] = row
            del model, embed, llm
            release_gpu_memory()
    report(results, batches)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def report(results: dict, batches: list[int]) -> None:
    print(results["run"])
    print(
        f"HBM copy bandwidth {results['copy_bandwidth_GBps']:.0f} GB/s; async scheduling "
        f"{'on' if results.get('async_scheduling') else 'off'} in every variant"
    )
    base = results["variants"].get("bf16")
    for name, r in results["variants"].items():
        line = (
            f"{name:5s} weights {r['weight_bytes'] / 1e9:6.2f} GB, read/step "
            f"{r['bytes_read_per_step'] / 1e9:6.2f} GB, roofline {r['roofline_tokens_per_s']:7.1f}"
        )
        for b in batches:
            rate = r["tokens_per_s"][b]
            ratio = f" ({rate / base['tokens_per_s'][b]:.2f}x bf16)" if base else ""
            line += f" | batch {b}: {rate:8.1f} tok/s{ratio}"
        share = r["tokens_per_s"][1] / r["roofline_tokens_per_s"] if 1 in batches else None
        if share is not None:
            line += f", {100 * share:.0f}% of its roofline"
        if r.get("graph_replay_ms"):
            line += f", graph replay {r['graph_replay_ms']:.3f} ms"
        print(line)
        if "rel_logit_err_mean" in r:
            print(
                f"      vs bf16: logit rel err mean {r['rel_logit_err_mean']:.4f} max "
                f"{r['rel_logit_err_max']:.4f}; first token agrees "
                f"{100 * r['first_token_agreement']:.0f}%; greedy tokens before first mismatch "
                f"{100 * r['greedy_prefix_agreement']:.0f}%"
            )
        print(f"      engine setup {r['setup_s']:.1f} s (includes quantizing and kernel tuning)")


if __name__ == "__main__":
    main()
