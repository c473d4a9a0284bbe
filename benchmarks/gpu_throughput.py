"""Offline throughput on one GPU: Baton vs batched `transformers.generate`, Llama-3-8B shape.

bf16, random weights drawn on the GPU (both sides; see `gpu_common`). Workload: `--num-prompts`
random prompts of `--input-len` tokens, `--output-len` greedy tokens each with ignore_eos.
transformers generates `--hf-prompts` of them in batches of `--hf-batch-size` (equal lengths,
so no padding): its steady-state rate per output token does not depend on the total count,
which keeps its share of the device time small. Reported: requests/s and output tokens/s.

    PYTHONPATH=. python -m benchmarks.gpu_throughput --json out.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.gpu_common import LLAMA3_8B, describe_run, release_gpu_memory, write_config_only
from engine import LLM, SamplingParams


def run_engine(model_dir, prompts, output_len, max_batched_tokens, fresh="varlen"):
    """Seconds for the engine to generate every prompt. `fresh`: how fresh prompts' attention
    runs on CUDA, "varlen" (flash, the default) or "sdpa" (cuDNN: fastest per pair once it has
    planned a length; here every prompt has the same length, so it plans once)."""
    llm = LLM(
        model_dir,
        dtype="bfloat16",
        max_model_len=4096,
        max_num_seqs=256,
        max_num_batched_tokens=max_batched_tokens,
        extra={"random_weights": True},
    )
    llm.engine.runner.backend.fresh_prefill_varlen = fresh == "varlen"
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:4], params)  # warm-up: kernels compiled, graphs already captured
    torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    assert all(len(o.token_ids) == output_len for o in outputs)
    return elapsed


def run_transformers(prompts, output_len, batch_size):
    import transformers

    config = transformers.LlamaConfig(**{k: v for k, v in LLAMA3_8B.items() if k != "torch_dtype"})
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.eval()
    model.generation_config.eos_token_id = None

    def generate(batch):
        ids = torch.tensor(batch, device="cuda")
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=output_len,
                do_sample=False,
                pad_token_id=0,
            )
        assert out.shape[1] == ids.shape[1] + output_len

    generate(prompts[:2])  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    for b in range(0, len(prompts), batch_size):
        generate(prompts[b : b + batch_size])
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-batched-tokens", type=int, default=8192)
    p.add_argument("--hf-prompts", type=int, default=128)
    p.add_argument("--hf-batch-size", type=int, default=64)
    p.add_argument(
        "--fresh-attention",
        default="varlen",
        help="comma list of varlen, sdpa: one engine run each (see run_engine)",
    )
    p.add_argument("--json", default=None)
    args = p.parse_args()

    g = torch.Generator().manual_seed(0)
    vocab = LLAMA3_8B["vocab_size"]
    prompts = torch.randint(10, vocab, (args.num_prompts, args.input_len), generator=g).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_config_only(Path(tmp) / "llama3-8b-shape")
        times = {}
        for fresh in args.fresh_attention.split(","):
            times[fresh] = run_engine(
                model_dir, prompts, args.output_len, args.max_batched_tokens, fresh
            )
            release_gpu_memory()  # the engine went with run_engine's frame
    t_engine = next(iter(times.values()))
    t_hf = None
    if args.hf_prompts:
        t_hf = run_transformers(prompts[: args.hf_prompts], args.output_len, args.hf_batch_size)

    out_engine = args.num_prompts * args.output_len / t_engine
    print(describe_run())
    print(
        f"workload: {args.num_prompts} prompts x {args.input_len} in / {args.output_len} out, "
        f"greedy, ignore_eos, bf16; engine max_num_batched_tokens {args.max_batched_tokens}"
    )
    for fresh, t in times.items():
        print(
            f"baton {fresh:6}: {t:7.1f} s  {args.num_prompts / t:6.2f} req/s  "
            f"{args.num_prompts * args.output_len / t:8.0f} output tok/s  "
            f"{args.num_prompts * (args.input_len + args.output_len) / t:8.0f} total tok/s"
        )
    results = {"run": describe_run(), "args": vars(args), "engine_s": times}
    if t_hf is not None:
        out_hf = args.hf_prompts * args.output_len / t_hf
        print(
            f"transformers: {t_hf:7.1f} s for {args.hf_prompts} prompts (batch "
            f"{args.hf_batch_size})  {args.hf_prompts / t_hf:6.2f} req/s  "
            f"{out_hf:8.0f} output tok/s"
        )
        print(
            f"ratio (output tok/s, baton {next(iter(times))} / transformers): "
            f"{out_engine / out_hf:.2f}x"
        )
        results["hf_s"] = t_hf
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
