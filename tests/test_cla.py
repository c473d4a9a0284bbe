"""Cross-layer KV sharing (CLA): groups of adjacent layers share one KV cache. transformers has
no CLA model, so the reference is explicit: a naive full-recompute implementation below, read
from the same safetensors. Greedy tokens and logits match it under chunked prefill, prefix
caching and preemption; the engine keeps one cache per group (KV bytes per token fall by the
factor); a prefill → decode handoff through a real gloo KVTransferAgent pair moves only the
groups' caches and yields the same tokens."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from deploy.launcher import kv_bytes_per_token
from engine import LLM, SamplingParams
from engine.config import ModelConfig
from engine.testing import write_test_checkpoint
from tests.helpers import capture_first_logits, random_prompts
from tests.test_correctness import assert_pool_whole
from tests.test_speculative import handoff

FACTOR, MAX_TOKENS = 2, 12
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
PROMPTS = random_prompts([1, 5, 16, 17, 40, 100, 150], seed=12)


@pytest.fixture(scope="module")
def cla_dir(tmp_path_factory):
    return write_test_checkpoint(
        tmp_path_factory.mktemp("cla"), num_hidden_layers=4, cla_share_factor=FACTOR
    )


class NaiveCLA:
    """The CLA Llama written out plainly: every token recomputed from scratch each step, no
    cache; a group's first layer computes K and V (RoPE'd) from its own input, the group's
    other layers attend to those."""

    def __init__(self, path):
        self.w = load_file(path / "model.safetensors")
        self.cfg = json.loads((path / "config.json").read_text())
        self._greedy: dict[tuple, list[int]] = {}

    def logits(self, tokens: list[int]) -> torch.Tensor:
        """[len(tokens), vocab] logits of every position."""
        cfg, w = self.cfg, self.w
        heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        dim = cfg["hidden_size"] // heads
        eps = cfg["rms_norm_eps"]
        n = len(tokens)
        inv_freq = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, dim, 2).float() / dim))
        angles = torch.outer(torch.arange(n).float(), inv_freq)
        cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)

        def rope(x):  # [heads, n, dim]
            rotated = torch.cat([-x[..., dim // 2 :], x[..., : dim // 2]], -1)
            return x * cos + rotated * sin

        def norm(x, weight):
            return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

        x = w["model.embed_tokens.weight"][tokens]
        mask = torch.ones(n, n).tril().bool()
        for i in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{i}."
            h = norm(x, w[p + "input_layernorm.weight"])
            q = rope((h @ w[p + "self_attn.q_proj.weight"].T).view(n, heads, dim).transpose(0, 1))
            if i % cfg.get("cla_share_factor", 1) == 0:
                k = (h @ w[p + "self_attn.k_proj.weight"].T).view(n, kv_heads, dim)
                v = (h @ w[p + "self_attn.v_proj.weight"].T).view(n, kv_heads, dim)
                k = rope(k.transpose(0, 1)).repeat_interleave(heads // kv_heads, 0)
                v = v.transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
            scores = (q @ k.transpose(1, 2)) / math.sqrt(dim)
            attn = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
            x = x + attn.transpose(0, 1).reshape(n, -1) @ w[p + "self_attn.o_proj.weight"].T
            h = norm(x, w[p + "post_attention_layernorm.weight"])
            gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
            x = x + (F.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
        return norm(x, w["model.norm.weight"]) @ w["lm_head.weight"].T

    def greedy(self, prompt: list[int], max_tokens: int) -> list[int]:
        key = (tuple(prompt), max_tokens)
        if key not in self._greedy:
            tokens = list(prompt)
            for _ in range(max_tokens):
                with torch.no_grad():
                    tokens.append(int(self.logits(tokens)[-1].argmax()))
            self._greedy[key] = tokens[len(prompt) :]
        return self._greedy[key]


@pytest.fixture(scope="module")
def naive(cla_dir):
    return NaiveCLA(cla_dir)


def test_config_and_cache_layout(cla_dir):
    cfg = ModelConfig.from_pretrained(cla_dir)
    assert (cfg.cla_share_factor, cfg.num_layers, cfg.num_kv_layers) == (FACTOR, 4, 2)
    assert [cfg.kv_layer(i) for i in range(4)] == [0, 0, 1, 1]
    llm = LLM(cla_dir, num_blocks=64)
    runner = llm.engine.runner
    assert len(runner.kv_caches) == 2
    plain = LLM(write_test_checkpoint(cla_dir.parent / "plain", num_hidden_layers=4), num_blocks=64)
    assert plain.engine.runner.kv_bytes_per_token == FACTOR * runner.kv_bytes_per_token
    # The router's transfer estimate (deploy/launcher.py) counts each group once too.
    assert kv_bytes_per_token(cfg, 4, {}) == 2 * 2 * cfg.num_kv_heads * cfg.head_dim * 4
    weights = load_file(cla_dir / "model.safetensors")
    assert "model.layers.1.self_attn.k_proj.weight" not in weights
    assert "model.layers.2.self_attn.k_proj.weight" in weights


def test_bad_factor(tmp_path):
    path = write_test_checkpoint(tmp_path / "bad", num_hidden_layers=2)
    config = json.loads((path / "config.json").read_text())
    with pytest.raises(ValueError, match="cla_share_factor"):
        ModelConfig.from_dict({**config, "cla_share_factor": 0})


def test_logits_match_naive_reference(cla_dir, naive):
    llm = LLM(cla_dir, num_blocks=256, max_num_batched_tokens=32)
    captured = capture_first_logits(llm)
    outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=1, temperature=0.0))
    for out, prompt in zip(outputs, PROMPTS):
        with torch.no_grad():
            expected = naive.logits(prompt)[-1]
        torch.testing.assert_close(captured[out.request_id], expected, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "engine_args",
    [
        dict(num_blocks=512, max_num_batched_tokens=32, enable_prefix_caching=False),
        dict(num_blocks=512, max_num_batched_tokens=128),  # prefix cache, second pass hits
        dict(num_blocks=14, max_num_batched_tokens=64),  # forces preemption
    ],
    ids=["chunked", "prefix_cache", "preemption"],
)
def test_greedy_matches_naive_reference(cla_dir, naive, engine_args):
    llm = LLM(cla_dir, **engine_args)
    outputs = llm.generate(PROMPTS, GREEDY)
    if engine_args["num_blocks"] == 512 and engine_args.get("enable_prefix_caching", True):
        outputs = llm.generate(PROMPTS, GREEDY)
        assert llm.engine.kv_manager.stats.hit_tokens > 0
    if engine_args["num_blocks"] == 14:
        assert llm.engine.scheduler.num_preemptions > 0
    for out, prompt in zip(outputs, PROMPTS):
        assert out.token_ids == naive.greedy(prompt, MAX_TOKENS)
    assert_pool_whole(llm)


def test_handoff_moves_group_caches(cla_dir, naive):
    """Prefill and decode engines, KV copied layer by layer as the forward pass writes it: one
    copy per group's cache, and the decode side's tokens equal the reference's."""
    prefill = LLM(cla_dir, num_blocks=128, max_num_batched_tokens=64)
    decode = LLM(cla_dir, num_blocks=128, max_num_batched_tokens=64)
    tokens = handoff(prefill, decode, PROMPTS, GREEDY)
    assert tokens == [naive.greedy(p, MAX_TOKENS) for p in PROMPTS]
    connector = prefill.engine.runner.kv_connector
    assert connector.layers_sent == len(PROMPTS) * 2  # 2 caches per request, not 4 layers
    for llm in (prefill, decode):
        assert_pool_whole(llm)


def test_cla_through_grpc_and_gloo(cla_dir, naive):
    """gRPC → router → prefill worker → gloo KV transfer (2 caches per block, not 4) → decode
    worker: the tokens equal the naive reference's."""
    ray = pytest.importorskip("ray")
    from tests.test_serving import Server, generate

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    server = None
    try:
        server = Server(cla_dir, num_prefill=1, num_decode=1)
        for prompt in PROMPTS[:4]:
            tokens, _ = generate(server.stub, prompt, MAX_TOKENS)
            assert tokens == naive.greedy(prompt, MAX_TOKENS)
        server.wait_all_blocks_free()
    finally:
        if server is not None:
            server.close()
        ray.shutdown()
