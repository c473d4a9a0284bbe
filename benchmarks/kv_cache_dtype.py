"""Decode throughput each KV memory option buys at a fixed KV memory budget, on one GPU.

Model: Llama-3-8B shape, bf16, random weights drawn on the GPU (`gpu_common`). Options
(`--kinds`): a `kv_cache_dtype` (auto, int8, fp8); `claN`, cross-layer KV sharing with groups
of N layers (`cla_share_factor`: a different model, N times fewer K/V projections); `windowW`,
a sliding window of W tokens on every layer (the rolling buffer frees blocks that leave it);
`sinksS+W`, attention sinks (StreamingLLM: the first S tokens and the last W, the same rolling
buffer, keys rotated by their cache position in the Triton decode kernel).
Each option's cache gets the same number of bytes (`--kv-gib`); the batch is as many requests
of `--prompt-len` + decoded tokens as its blocks hold while decoding (at most `--max-seqs`),
and `--steps` pure-decode engine steps are timed after the prefill.

    PYTHONPATH=. python -m benchmarks.kv_cache_dtype --kv-gib 8 \
        --kinds auto,int8,fp8,cla2,window512,sinks4+508
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from benchmarks.gpu_common import LLAMA3_8B, describe_run, release_gpu_memory, write_config_only
from benchmarks.gpu_decode import decode_rate
from engine import LLM
from engine.config import ModelConfig
from engine.kv_cache import quant

BLOCK_SIZE = 16  # the engine's default


def kv_bytes_per_token(cfg: ModelConfig, kind: str, cla: int = 1) -> int:
    """As ModelRunner.kv_bytes_per_token (checked there against the engine's), for bf16."""
    elem = quant.cache_dtype(kind, torch.bfloat16).itemsize
    row = quant.cache_row_size(kind, cfg.head_dim)
    return 2 * (cfg.num_layers // cla) * cfg.num_kv_heads * row * elem


def option(kind: str) -> tuple[str, dict, dict, int | None]:
    """(kv_cache_dtype, config.json changes, engine options, blocks a decoding request holds) of
    a --kinds entry; the blocks are None when the whole sequence stays."""
    if kind.startswith("cla"):
        return "auto", {"cla_share_factor": int(kind[3:])}, {}, None
    if kind.startswith("window"):
        # The window and the block being written (plus, while prefilling, its chunk: prefill
        # chunks of 512 tokens keep that small).
        window = int(kind[6:])
        return "auto", {"sliding_window": window}, {}, -(-window // BLOCK_SIZE) + 2
    if kind.startswith("sinks"):  # sinksS+W: the sink blocks too
        sinks, window = (int(n) for n in kind[5:].split("+"))
        engine = {"attention_sinks": sinks, "sink_window": window}
        return "auto", {}, engine, -(-sinks // BLOCK_SIZE) + -(-window // BLOCK_SIZE) + 2
    return kind, {}, {}, None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kv-gib", type=float, default=8.0)
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--max-seqs", type=int, default=256)
    p.add_argument("--kinds", default="auto,int8,fp8")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    results = {"run": describe_run(), "kv_gib": args.kv_gib, "kinds": {}}
    blocks_per_request = -(-(args.prompt_len + args.warmup + args.steps + 2) // BLOCK_SIZE)
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kinds.split(","):
            dtype_kind, changes, engine_options, held = option(kind)
            model_dir = write_config_only(Path(tmp) / kind, {**LLAMA3_8B, **changes})
            cla = changes.get("cla_share_factor", 1)
            per_token = kv_bytes_per_token(ModelConfig.from_pretrained(model_dir), dtype_kind, cla)
            per_block = per_token * BLOCK_SIZE
            num_blocks = int(args.kv_gib * (1 << 30)) // per_block
            rolling = held is not None
            held = held or blocks_per_request
            batch = min(args.max_seqs, num_blocks // held)
            llm = LLM(
                model_dir, dtype="bfloat16", kv_cache_dtype=dtype_kind, num_blocks=num_blocks,
                max_num_seqs=batch, max_model_len=4096,
                max_num_batched_tokens=512 if rolling else 8192,
                extra={"random_weights": True}, **engine_options,
            )  # fmt: skip
            assert llm.engine.runner.kv_bytes_per_token == per_token
            rate = decode_rate(llm, batch, args.prompt_len, args.steps, args.warmup)
            results["kinds"][kind] = {
                "blocks_per_request": held,
                "kv_bytes_per_token": per_token,
                "num_blocks": num_blocks,
                "batch": batch,
                "tokens_per_s": rate,
            }
            print(
                f"{kind:10s}: {per_token} B/token, {num_blocks} blocks, {held} a request -> "
                f"batch {batch}: "
                f"{rate:.0f} tok/s",
                flush=True,
            )
            del llm
            release_gpu_memory()
    print(results["run"])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
