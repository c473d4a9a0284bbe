"""KV bytes per request with a full cache, a sliding window and attention sinks (CPU).

Two parts:

1. measured: the engine on a small random-weight Mistral-shaped model (`engine.testing`), one
   request of `--prompt-len` tokens generating `--max-tokens`; the peak number of KV blocks the
   request holds (sampled after every step) times the bytes of a block.
2. computed for real shapes with the same rule the engine applies (`KVWindow.num_live_blocks`
   while decoding at position n, `peak_blocks` for the bound during a prefill chunk):
   Mistral-7B (32 layers, 8 KV heads x 128, bf16: 128 KiB a token), window 4096, and sinks
   4 + 2044 (the same 2048-token cache budget as StreamingLLM's evaluation uses).

    PYTHONPATH=. python -m benchmarks.kv_window
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import torch

from engine import LLM, SamplingParams
from engine.kv_cache import KVWindow
from engine.testing import write_test_checkpoint

BLOCK = 16


def measure(model_dir: Path, prompt_len: int, max_tokens: int, **engine_args) -> tuple[int, ...]:
    """(peak blocks held during a step, blocks held at the end of decoding, bytes per block) for
    one request. Sampled inside each step, after allocation and before out-of-window blocks go
    back, so a prefill chunk's extra blocks count."""
    llm = LLM(str(model_dir), block_size=BLOCK, num_blocks=512, **engine_args)
    engine = llm.engine
    prompt = torch.randint(3, 500, (prompt_len,), generator=torch.Generator().manual_seed(0))
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    engine.add_request("r", prompt.tolist(), params)
    kv, execute = engine.kv_manager, engine.runner.execute
    held = []

    def sampled_execute(sched):
        held.append(kv.num_blocks - kv.num_free_blocks)
        return execute(sched)

    engine.runner.execute = sampled_execute
    while engine.has_unfinished_requests():
        engine.step()
    return max(held), held[-1], engine.runner.kv_bytes_per_block


def computed_rows(lengths: list[int], chunk: int) -> list[str]:
    bytes_per_token = 2 * 32 * 8 * 128 * 2  # Mistral-7B, bf16
    variants = {
        "full cache": KVWindow(BLOCK),
        "sliding window 4096": KVWindow(BLOCK, 4096),
        "sinks 4 + window 2044": KVWindow(BLOCK, 2044, 4),
    }
    rows = ["| variant | " + " | ".join(f"{n // 1024}k tokens" for n in lengths) + " |"]
    rows.append("|---" * (len(lengths) + 1) + "|")
    for name, window in variants.items():
        cells = []
        for n in lengths:
            decode = window.num_live_blocks(n, n) * BLOCK * bytes_per_token
            prefill = window.peak_blocks(n, chunk) * BLOCK * bytes_per_token
            cells.append(f"{decode / 2**30:.2f} GiB ({prefill / 2**30:.2f})")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=1536)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--chunk", type=int, default=256, help="max_num_batched_tokens")
    args = p.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    print(f"commit {commit.stdout.strip()}, torch {torch.__version__}, CPU, block size {BLOCK}")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_test_checkpoint(Path(tmp) / "m", architecture="mistral")
        config = json.loads((model_dir / "config.json").read_text())
        total = args.prompt_len + args.max_tokens
        config.update(max_position_embeddings=total, sliding_window=None)
        (model_dir / "config.json").write_text(json.dumps(config))
        common = {"max_num_batched_tokens": args.chunk}
        full = measure(model_dir, args.prompt_len, args.max_tokens, **common)
        sinks = measure(
            model_dir,
            args.prompt_len,
            args.max_tokens,
            attention_sinks=args.sinks,
            sink_window=args.window - args.sinks,
            **common,
        )
        config["sliding_window"] = args.window
        (model_dir / "config.json").write_text(json.dumps(config))
        window = measure(model_dir, args.prompt_len, args.max_tokens, **common)
    print(
        f"\nmeasured: {args.prompt_len}-token prompt + {args.max_tokens} generated, "
        f"chunk {args.chunk}; peak KV of the request"
    )
    print("| variant | peak blocks | peak KV bytes | vs full | blocks at the last step |")
    print("|---|---|---|---|---|")
    for name, (blocks, last, block_bytes) in {
        "full cache": full,
        f"sliding window {args.window}": window,
        f"sinks {args.sinks} + window {args.window - args.sinks}": sinks,
    }.items():
        ratio = blocks / full[0]
        print(f"| {name} | {blocks} | {blocks * block_bytes:,} | {ratio:.3f} | {last} |")
    print(
        "\ncomputed, Mistral-7B shape (bf16, 128 KiB/token): KV per request while decoding at "
        f"that length (in brackets: the bound during a {args.chunk}-token prefill chunk)"
    )
    print("\n".join(computed_rows([4096, 32768, 131072], args.chunk)))


if __name__ == "__main__":
    main()
