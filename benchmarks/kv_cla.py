"""KV bytes per request with cross-layer KV sharing (CLA) at share factors 1, 2 and 4: measured
from the engine's allocated cache tensors on a small model, and computed with the runner's own
formula (`model_runner.kv_bytes_per_token`, which the transfer and the router's estimate use)
for a Llama-3-8B shape.

    python -m benchmarks.kv_cla
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from benchmarks.gpu_common import LLAMA3_8B
from engine import LLM
from engine.config import ModelConfig
from engine.model_runner import kv_bytes_per_token
from engine.testing import write_test_checkpoint

PROMPT, OUTPUT, FACTORS = 1024, 256, (1, 2, 4)


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="baton-cla-"))
    tokens = PROMPT + OUTPUT
    print(f"request: {PROMPT} prompt + {OUTPUT} output tokens")
    for f in FACTORS:
        path = write_test_checkpoint(
            root / f"f{f}", num_hidden_layers=8, hidden_size=128, cla_share_factor=f
        )
        runner = LLM(path, num_blocks=64).engine.runner
        per_block = sum(c.numel() * c.element_size() for c in runner.kv_caches) // 64
        blocks = -(-tokens // runner.block_size)
        print(
            f"small (8 layers, measured) f={f}: {len(runner.kv_caches)} caches, "
            f"{per_block // runner.block_size} B/token, {blocks * per_block / 2**20:.2f} MiB"
        )
    for f in FACTORS:
        cfg = ModelConfig.from_dict({**LLAMA3_8B, "cla_share_factor": f})
        full, fp8 = (kv_bytes_per_token(cfg, kind, torch.bfloat16) for kind in ("auto", "fp8"))
        print(
            f"Llama-3-8B shape bf16 (computed) f={f}: {full // 1024} KiB/token, "
            f"{full * tokens / 2**20:.0f} MiB; fp8 KV {fp8 * tokens / 2**20:.1f} MiB"
        )


if __name__ == "__main__":
    main()
