"""Attention sinks (StreamingLLM): the engine against a naive reference written here.

The reference runs the Llama forward pass one token at a time in plain PyTorch, keeps every
token's K (unrotated) and V, and for the token at position p attends to the first S tokens and
the last W (p included), with RoPE positions counted within that cache, as the paper defines it
(Xiao et al. 2023, section 3.2). No paging, chunking or block tables: what the engine does with
those must not change a token.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from engine import LLM, EngineConfig, SamplingParams
from tests.helpers import random_prompts
from tests.test_sliding_window import (
    check_blocks,
    check_preemption_then_prefix_hits,
    run_checked,
)

SINKS, WINDOW, BLOCK = 4, 16, 8


class StreamingReference:
    def __init__(self, path, num_sinks: int, window: int):
        self.cfg = json.loads((path / "config.json").read_text())
        self.w = load_file(path / "model.safetensors")
        self.num_sinks, self.window = num_sinks, window
        head_dim = self.cfg["hidden_size"] // self.cfg["num_attention_heads"]
        exponents = torch.arange(0, head_dim, 2).float() / head_dim
        self.inv_freq = 1.0 / (self.cfg["rope_theta"] ** exponents)
        self.head_dim = head_dim

    def _norm(self, x, name):
        eps = self.cfg["rms_norm_eps"]
        return self.w[name] * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def _rope(self, x, positions):  # x [N, heads, D], positions [N]
        angles = positions.float()[:, None] * self.inv_freq
        cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * cos[:, None] + rotated * sin[:, None]

    def greedy(self, prompt: list[int], max_tokens: int) -> list[int]:
        # Tiny ops: one thread is ~20x faster than two on a busy machine.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.no_grad():
                return self._greedy(prompt, max_tokens)
        finally:
            torch.set_num_threads(threads)

    def _greedy(self, prompt: list[int], max_tokens: int) -> list[int]:
        cfg, w, d = self.cfg, self.w, self.head_dim
        heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        layers = cfg["num_hidden_layers"]
        keys = [[] for _ in range(layers)]
        values = [[] for _ in range(layers)]
        tokens, out = list(prompt), []
        for p in range(len(prompt) + max_tokens - 1):
            # The cache token p sees: the sinks and the recent window, in text order.
            kept = [j for j in range(p + 1) if j < self.num_sinks or j > p - self.window]
            cache_pos = torch.arange(len(kept))
            x = w["model.embed_tokens.weight"][tokens[p]]
            for i in range(layers):
                pre = f"model.layers.{i}."
                h = self._norm(x, pre + "input_layernorm.weight")
                q = (w[pre + "self_attn.q_proj.weight"] @ h).view(heads, d)
                keys[i].append((w[pre + "self_attn.k_proj.weight"] @ h).view(kv_heads, d))
                values[i].append((w[pre + "self_attn.v_proj.weight"] @ h).view(kv_heads, d))
                k = self._rope(torch.stack([keys[i][j] for j in kept]), cache_pos)
                v = torch.stack([values[i][j] for j in kept])
                q = self._rope(q[None], cache_pos[-1:])[0]
                k = k.repeat_interleave(heads // kv_heads, dim=1)  # [L, heads, D]
                v = v.repeat_interleave(heads // kv_heads, dim=1)
                scores = torch.einsum("hd,lhd->hl", q, k) * d**-0.5
                attn = torch.einsum("hl,lhd->hd", scores.softmax(-1), v).reshape(-1)
                x = x + w[pre + "self_attn.o_proj.weight"] @ attn
                h = self._norm(x, pre + "post_attention_layernorm.weight")
                gate = torch.nn.functional.silu(w[pre + "mlp.gate_proj.weight"] @ h)
                x = x + w[pre + "mlp.down_proj.weight"] @ (
                    gate * (w[pre + "mlp.up_proj.weight"] @ h)
                )
            if p >= len(prompt) - 1:
                logits = w["lm_head.weight"] @ self._norm(x, "model.norm.weight")
                tokens.append(int(logits.argmax()))
                out.append(tokens[-1])
        return out


@pytest.fixture(scope="module")
def streaming(model_dir):
    return StreamingReference(model_dir, SINKS, WINDOW)


def greedy(n):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def sink_llm(model_dir, **kwargs):
    kwargs = {"block_size": BLOCK, "num_blocks": 32, **kwargs}
    return LLM(model_dir, attention_sinks=SINKS, sink_window=WINDOW, **kwargs)


def test_options_are_checked():
    with pytest.raises(ValueError, match="sink_window"):
        EngineConfig(model="x", attention_sinks=4)
    with pytest.raises(ValueError, match=">= 0"):
        EngineConfig(model="x", attention_sinks=-1, sink_window=8)


def test_reference_is_transformers_until_the_cache_fills(model_dir, reference, streaming):
    """Both the reference and the engine equal plain attention while nothing is evicted."""
    prompt = random_prompts([10], seed=5)[0]
    expected = reference.greedy(prompt, SINKS + WINDOW - 10)
    assert streaming.greedy(prompt, SINKS + WINDOW - 10) == expected
    out = sink_llm(model_dir).generate([prompt], greedy(SINKS + WINDOW - 10))[0]
    assert out.token_ids == expected
    # Past the cache the answers part: the test below compares something that matters.
    assert streaming.greedy(prompt, 40) != reference.greedy(prompt, 40)


@pytest.mark.parametrize("budget", [8, 256])
def test_generation_past_max_model_len_matches_reference(model_dir, streaming, budget):
    """max_model_len 64, 100-token sequences: positions stay within the cache, blocks bounded."""
    prompts = random_prompts([40, 7], seed=6)
    llm = sink_llm(model_dir, max_model_len=64, max_num_batched_tokens=budget)
    outputs = run_checked(llm, prompts, greedy(60))
    for prompt, out in zip(prompts, outputs):
        assert out.finish_reason == "length" and len(out.token_ids) == 60
        assert out.token_ids == streaming.greedy(prompt, 60)


def test_prefix_cache_hits_and_preemption(model_dir, streaming):
    base = random_prompts([30], seed=11)[0]
    prompts = [base + p for p in random_prompts([5, 12, 20], seed=12)]
    llm = sink_llm(model_dir, num_blocks=9, max_num_batched_tokens=16)
    check_preemption_then_prefix_hits(llm, prompts, streaming, 24)


def test_memory_bounded_while_generating_ten_windows(model_dir, streaming):
    prompt = random_prompts([20], seed=13)[0]
    llm = sink_llm(model_dir, max_num_batched_tokens=16)
    engine = llm.engine
    engine.add_request("long", prompt, greedy(10 * WINDOW))
    outputs, peak = [], 0
    while engine.has_unfinished_requests():
        outputs += engine.step()
        check_blocks(engine)
        peak = max(peak, engine.kv_manager.num_blocks - engine.kv_manager.num_free_blocks)
    total = 20 + 10 * WINDOW
    # The sink block, the window, one chunk, one partial block.
    assert peak <= 1 + -(-(WINDOW + 16) // BLOCK) + 1 < -(-total // BLOCK) // 3
    assert outputs[-1].token_ids == streaming.greedy(prompt, 10 * WINDOW)


GPU_BACKENDS = {"triton": "TritonSinkAttentionBackend", "torch": "SinkAttentionBackend"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", list(GPU_BACKENDS))
def test_gpu_sinks_match_reference(model_dir, streaming, backend):
    """On CUDA sinks decode in the Triton kernel, in CUDA graphs (the torch backend on request):
    both give the reference's tokens past max_model_len, blocks bounded."""
    prompts = random_prompts([40, 7], seed=6)
    llm = sink_llm(
        model_dir, device="cuda", dtype="float32", max_model_len=64,
        extra={"attention_backend": backend},
    )  # fmt: skip
    runner = llm.engine.runner
    assert type(runner.backend).__name__ == GPU_BACKENDS[backend]
    assert (runner.graphs is not None) == (backend == "triton")
    replays = count_replays(runner)
    outputs = run_checked(llm, prompts, greedy(60))
    for prompt, out in zip(prompts, outputs):
        assert out.token_ids == streaming.greedy(prompt, 60)
    assert backend == "torch" or replays[0] > 40


def count_replays(runner) -> list[int]:
    """A counter of the runner's decode-graph replays (none when it has no graphs)."""
    count = [0]
    if runner.graphs is not None:
        replay = runner.graphs.replay

        def counted(*args, **kwargs):
            count[0] += 1
            return replay(*args, **kwargs)

        runner.graphs.replay = counted
    return count


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_graphs_match_torch_backend(model_dir):
    """Many requests of mixed lengths, chunked prefill beside graph-replayed decodes, 8-token
    blocks and windows rolling past many of them: the Triton sink backend with decode graphs
    gives the torch backend's greedy tokens (float32), and every block comes back."""
    prompts = random_prompts([3, 9, 17, 30, 41, 50, 62, 5, 24], seed=21)
    results = {}
    for backend in GPU_BACKENDS:
        llm = sink_llm(
            model_dir, device="cuda", dtype="float32", max_model_len=64, num_blocks=64,
            max_num_batched_tokens=32, extra={"attention_backend": backend},
        )  # fmt: skip
        replays = count_replays(llm.engine.runner)
        results[backend] = [o.token_ids for o in run_checked(llm, prompts, greedy(90))]
        assert backend == "torch" or replays[0] > 50
    assert results["triton"] == results["torch"]
