"""Decode speed on one GPU against the HBM roofline, with and without CUDA graphs.

Model: Llama-3-8B shape, bf16, random weights drawn on the GPU (no checkpoint; see
`gpu_common.write_config_only`). Roofline: at batch 1 every weight is read once per token, so
tokens/s <= HBM bandwidth / weight bytes, with the bandwidth measured in the same run as a
device-to-device copy (bytes read + written).

Each measurement: `batch` requests with `--prompt-len` random tokens are prefilled, then
`--steps` engine steps are timed end to end (scheduling, input building, forward, sampling:
what a user waits for), after `--warmup` untimed steps. Modes: `graphs` (decode CUDA graphs with
the output head and argmax inside), `async` (graphs, and each step launched before the previous
one's tokens are read: `EngineConfig.async_scheduling`), `eager` (no graphs).

    PYTHONPATH=. python -m benchmarks.gpu_decode --json out.json
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
    replay_ms,
    write_config_only,
)
from engine import LLM, SamplingParams


def start_decoding(llm: LLM, batch: int, prompt_len: int, steps: int, warmup: int) -> None:
    """`batch` greedy requests of `prompt_len` random tokens, prefilled and `warmup` steps into
    decoding, with room for `steps` more decode steps."""
    engine = llm.engine
    vocab = engine.model_config.vocab_size
    g = torch.Generator().manual_seed(batch)
    params = SamplingParams(max_tokens=steps + warmup + 2, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        prompt = torch.randint(10, vocab, (prompt_len,), generator=g).tolist()
        engine.add_request(f"b{batch}-{i}", prompt, params)
    while any(r.num_output_tokens == 0 for r in engine.scheduler.requests.values()):
        engine.step()  # prefill
    for _ in range(warmup):
        engine.step()


def decode_rate(llm: LLM, batch: int, prompt_len: int, steps: int, warmup: int) -> float:
    """Output tokens per second over `steps` pure-decode steps of `batch` sequences."""
    engine = llm.engine
    start_decoding(llm, batch, prompt_len, steps, warmup)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()  # reads a step's tokens: one sync a step (async: the previous step's)
    elapsed = time.perf_counter() - start
    for rid in list(engine.scheduler.requests):
        engine.abort_request(rid)
    return batch * steps / elapsed


def graph_replay_ms(llm: LLM, reps: int = 50) -> float:
    """GPU time of one batch-1 decode graph replay (the forward pass, the output head and the
    argmax; no host work), on whatever its static inputs last held."""
    return replay_ms(llm.engine.runner.graphs.graphs[1][0], reps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--batches", default="1,16,64", help="batch sizes to time with graphs")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    bandwidth = copy_bandwidth()
    results = {"run": describe_run(), "copy_bandwidth_GBps": bandwidth / 1e9, "modes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_config_only(Path(tmp) / "llama3-8b-shape")
        for mode in ("graphs", "async", "eager"):
            extra = {"random_weights": True}
            start = time.perf_counter()
            llm = LLM(
                model_dir, dtype="bfloat16", max_model_len=4096, max_num_seqs=max(batches),
                extra=extra, enforce_eager=mode == "eager", async_scheduling=mode == "async",
            )  # fmt: skip
            setup_s = time.perf_counter() - start
            model = llm.engine.runner.model
            weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            embed_bytes = model.model.embed_tokens.weight.numel() * 2
            rates = {}
            for batch in batches if mode != "eager" else [1]:
                rates[batch] = decode_rate(llm, batch, args.prompt_len, args.steps, args.warmup)
            results["modes"][mode] = {"setup_s": setup_s, "tokens_per_s": rates}
            if mode == "graphs":
                results["graph_replay_ms"] = graph_replay_ms(llm)
            del model, llm
            release_gpu_memory()
    roofline = bandwidth / weight_bytes
    # The embedding is read one row per token, not whole: the bytes a step must read are less.
    roofline_read = bandwidth / (weight_bytes - embed_bytes)
    results.update(
        weight_bytes=weight_bytes, roofline_tokens_per_s=roofline, roofline_read=roofline_read
    )
    print(results["run"])
    print(
        f"HBM copy bandwidth {bandwidth / 1e9:.0f} GB/s; weights {weight_bytes / 1e9:.2f} GB "
        f"(embedding {embed_bytes / 1e9:.2f} GB of it) -> batch-1 roofline {roofline:.1f} tok/s "
        f"({roofline_read:.1f} counting only bytes a step reads)"
    )
    replay_ms = results["graph_replay_ms"]
    print(f"batch-1 decode graph replay (GPU time, head and argmax included): {replay_ms:.3f} ms")
    for mode, r in results["modes"].items():
        for batch, rate in r["tokens_per_s"].items():
            share = f"  {100 * rate / roofline:5.1f}% of roofline" if batch == 1 else ""
            print(f"{mode:7s} batch {batch:4d}: {rate:9.1f} tok/s{share}")
        print(f"{mode:7s} engine setup {r['setup_s']:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
