"""Shared by the GPU benchmarks: the Llama-3-8B shape, random-weight engines, the HBM ceiling."""

from __future__ import annotations

import gc
import json
import os
import subprocess
from pathlib import Path

import torch

# Llama-3-8B's config.json, less what only the tokenizer needs.
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}


def write_config_only(path: Path, config: dict = LLAMA3_8B) -> Path:
    """A model folder holding only config.json: engines built on it need
    `extra={"random_weights": True}` (weights drawn on the GPU; writing 16 GB of safetensors
    and reading them back would cost minutes of device time for numbers that do not depend
    on the values)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def serving_model(folder: Path, gpu: bool, **tiny) -> tuple[str, int]:
    """(model folder, vocabulary size) for a serving benchmark: on GPUs the Llama-3-8B shape
    (config only: workers draw random weights), else a tiny random checkpoint with no
    tokenizer, shaped by `tiny` (engine.testing.write_test_checkpoint's arguments)."""
    if gpu:
        return str(write_config_only(folder / "llama3-8b-shape")), LLAMA3_8B["vocab_size"]
    from engine.testing import write_test_checkpoint

    tiny = {"vocab_size": 2048, "max_position_embeddings": 2048, **tiny}
    model_dir = write_test_checkpoint(folder / "tiny", with_tokenizer=False, **tiny)
    return str(model_dir), tiny["vocab_size"]


# The tiny model the router benchmarks serve on CPU (placement, planner_check).
SMALL_SERVING_SHAPE = dict(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def bench_config(
    model_dir: str,
    profile_path: str | None,
    gpu: bool,
    engine_args: dict,
    split: tuple[int, int],
    prefill_args: dict,
    max_tokens_limit: int,
    slo_ms: tuple[float, float],
    **settings,
):
    """The deployment a router benchmark measures: one tier "bench", `split` = (prefill, decode)
    workers, one GPU each on GPUs; `prefill_args` over the tier's engine args for the prefill
    pool; gRPC only. `settings`: other BatonConfig keys (placement, timeouts)."""
    from deploy.config import BatonConfig

    device = {"GPU": 1, "CPU": 2} if gpu else {"CPU": 1}
    return BatonConfig.from_dict(
        {
            "tiers": {
                "bench": {
                    "model": model_dir,
                    "dtype": "bfloat16" if gpu else "float32",
                    "engine_args": engine_args,
                    "profile": profile_path,
                    "max_tokens_limit": max_tokens_limit,
                    "max_queued_requests": 100000,
                    "ttft_slo_ms": slo_ms[0],
                    "tpot_slo_ms": slo_ms[1],
                }
            },
            "pools": [
                {
                    "tier": "bench",
                    "role": "prefill",
                    "count": split[0],
                    "resources": device,
                    "engine_args": prefill_args,
                },
                {"tier": "bench", "role": "decode", "count": split[1], "resources": device},
            ],
            "http_port": None,  # gRPC only: `baton bench` drives it
            **settings,
        }
    )


def copy_bandwidth(num_bytes: int = 4 << 30, reps: int = 20) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written (median)."""
    src = torch.randn(num_bytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * num_bytes / sorted(times)[len(times) // 2]


def replay_ms(graph: torch.cuda.CUDAGraph, reps: int) -> float:
    """GPU time of one replay of `graph` (after a warm-up replay), averaged over `reps`."""
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def describe_run() -> str:
    # The device machine gets the working tree without .git: the caller passes BATON_COMMIT.
    commit = (
        os.environ.get("BATON_COMMIT")
        or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    )
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"commit {commit or '?'}, {gpu}, torch {torch.__version__}"


def release_gpu_memory() -> None:
    """After the caller dropped its last reference to an engine: collect it (the model and
    backend refer to each other) and hand its GPU memory back to the driver."""
    gc.collect()
    torch.cuda.empty_cache()
