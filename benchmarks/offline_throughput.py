"""Offline throughput: Baton's engine vs batched `transformers.generate`, same model, same work.

Both sides get the same prompts (mixed lengths) and the same per-prompt `max_tokens`, greedy.
transformers runs the prompts in left-padded batches of `--hf-batch-size` and, since its
`generate` has one `max_new_tokens` per batch, generates to the batch's largest and we count only
the tokens each prompt asked for. Reported: useful output tokens per second, and the ratio.

    python -m benchmarks.offline_throughput            # CPU, 64 prompts, the default model shape
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import tempfile
import time

import torch

from engine import LLM, ModelConfig, SamplingParams
from engine.testing import write_test_checkpoint


def workload(
    num_prompts: int, vocab: int, min_len: int, max_len: int, min_out: int, max_out: int, seed: int
):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(min_len, max_len + 1, (num_prompts,), generator=g).tolist()
    outs = torch.randint(min_out, max_out + 1, (num_prompts,), generator=g).tolist()
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]
    return prompts, outs


def run_engine(model_dir, prompts, max_tokens, dtype, device):
    llm = LLM(model_dir, dtype=dtype, device=device, max_num_batched_tokens=2048, max_num_seqs=256)
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in max_tokens]
    llm.generate(prompts[:2], params[:2])  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    assert [len(o.token_ids) for o in outputs] == max_tokens
    return elapsed, [o.token_ids for o in outputs]


def run_transformers(model_dir, prompts, max_tokens, dtype, device, batch_size):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, dtype)
    )
    model = model.to(device).eval()
    model.generation_config.eos_token_id = (
        None  # run past EOS like ignore_eos, without forbidding it
    )
    # Sort by length so each padded batch wastes little (the favourable setting for transformers).
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[int] | None] = [None] * len(prompts)

    def batch_generate(idx):
        width = max(len(prompts[i]) for i in idx)
        ids = torch.zeros((len(idx), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(idx):  # left padding
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        n = max(max_tokens[i] for i in idx)
        with torch.no_grad():
            out = model.generate(
                ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )
        for row, i in enumerate(idx):
            results[i] = out[row, width : width + max_tokens[i]].tolist()

    batch_generate(order[:2])  # warm-up
    start = time.perf_counter()
    for b in range(0, len(order), batch_size):
        batch_generate(order[b : b + batch_size])
    return time.perf_counter() - start, results


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model", default=None, help="model folder (default: a random model written now)"
    )
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--min-len", type=int, default=16)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--min-out", type=int, default=8)
    p.add_argument("--max-out", type=int, default=128)
    p.add_argument("--hf-batch-size", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or write_test_checkpoint(
            tmp,
            vocab_size=2048,
            hidden_size=args.hidden_size,
            intermediate_size=args.hidden_size * 3,
            num_hidden_layers=args.layers,
            num_attention_heads=args.hidden_size // 64,
            num_key_value_heads=max(1, args.hidden_size // 128),
            max_position_embeddings=2048,
            with_tokenizer=False,
        )
        vocab = ModelConfig.from_pretrained(model_dir).vocab_size
        prompts, max_tokens = workload(
            args.num_prompts,
            vocab,
            args.min_len,
            args.max_len,
            args.min_out,
            args.max_out,
            args.seed,
        )
        useful = sum(max_tokens)
        t_engine, ours = run_engine(model_dir, prompts, max_tokens, args.dtype, args.device)
        t_hf, theirs = run_transformers(
            model_dir, prompts, max_tokens, args.dtype, args.device, args.hf_batch_size
        )
    same = sum(a == b for a, b in zip(ours, theirs))
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    print(
        f"commit {commit}, device {args.device} ({platform.processor() or platform.machine()}), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(
        f"workload: {args.num_prompts} prompts of {args.min_len}-{args.max_len} tokens, "
        f"{args.min_out}-{args.max_out} output tokens each ({useful} in all), greedy, {args.dtype}"
    )
    print(f"baton engine   : {t_engine:8.2f} s  {useful / t_engine:9.1f} output tok/s")
    print(
        f"transformers   : {t_hf:8.2f} s  {useful / t_hf:9.1f} output tok/s"
        f"  (batch {args.hf_batch_size})"
    )
    print(f"ratio (engine / transformers throughput): {t_hf / t_engine:.2f}x")
    print(f"greedy outputs identical: {same}/{len(prompts)}")


if __name__ == "__main__":
    main()
