"""Sparse MoE (Mixtral, Qwen2-MoE, Qwen3-MoE; dense Qwen3 for its q/k norms): greedy tokens
equal transformers' under chunked prefill and the prefix cache; both checkpoint layouts load;
experts no token chose are never computed."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import LLM, SamplingParams
from engine.config import ModelConfig
from engine.models.moe import SparseMoeBlock
from engine.testing import write_test_checkpoint
from tests.helpers import Reference, random_prompts

MAX_TOKENS = 10
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
LENGTHS = [1, 15, 17, 33, 100, 150]

VARIANTS = {
    "mixtral": dict(architecture="mixtral"),
    "qwen2_moe": dict(architecture="qwen2_moe"),
    # Layer 2 dense (mlp_only_layers), top-k renormalised, 3 of 8 experts per token.
    "qwen2_moe-mixed-layers": dict(
        architecture="qwen2_moe",
        num_hidden_layers=3,
        num_experts=8,
        num_experts_per_tok=3,
        moe_config={"mlp_only_layers": [2], "norm_topk_prob": True},
    ),
    # q/k norms, no shared expert, renormalised top-k.
    "qwen3_moe": dict(architecture="qwen3_moe"),
    "qwen3-dense": dict(architecture="qwen3"),  # the q/k norms alone
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def moe_model(request, tmp_path_factory):
    path = write_test_checkpoint(
        tmp_path_factory.mktemp(request.param), seed=7, **VARIANTS[request.param]
    )
    return path, Reference(path)


def assert_greedy_matches(reference, prompts, outputs):
    for prompt, out in zip(prompts, outputs):
        assert out.token_ids == reference.greedy(prompt, MAX_TOKENS), f"{len(prompt)} tokens"


def test_moe_matches_transformers_chunked_and_cached(moe_model):
    path, reference = moe_model
    shared = random_prompts([40], seed=1)[0]
    prompts = random_prompts(LENGTHS, seed=2)
    prompts += [shared + p for p in prompts[:3]]
    llm = LLM(path, dtype="float32", max_num_batched_tokens=32, num_blocks=256)
    assert_greedy_matches(reference, prompts, llm.generate(prompts, GREEDY))
    hits = llm.engine.kv_manager.stats.hit_tokens
    assert_greedy_matches(reference, prompts, llm.generate(prompts, GREEDY))
    assert llm.engine.kv_manager.stats.hit_tokens > hits
    kv = llm.engine.kv_manager
    assert kv.num_free_blocks == kv.num_blocks


def test_config_reads_moe_layers(moe_model):
    path, _ = moe_model
    cfg = ModelConfig.from_pretrained(path)
    raw = json.loads((path / "config.json").read_text())
    if raw["model_type"] == "mixtral":
        assert cfg.moe_layers == (0, 1) and cfg.norm_topk_prob
        assert cfg.num_experts == raw["num_local_experts"]
    elif raw["model_type"] == "qwen3":
        assert cfg.moe_layers == () and cfg.qk_norm
    elif raw["model_type"] == "qwen3_moe":
        assert cfg.moe_layers == (0, 1) and cfg.norm_topk_prob and cfg.qk_norm
        assert cfg.shared_expert_intermediate_size == 0
    elif raw.get("mlp_only_layers"):
        assert cfg.moe_layers == (0, 1) and cfg.norm_topk_prob and cfg.num_experts_per_tok == 3
    else:
        assert cfg.moe_layers == (0, 1) and not cfg.norm_topk_prob
        assert cfg.shared_expert_intermediate_size == raw["shared_expert_intermediate_size"]


def test_fused_expert_checkpoint_loads(tmp_path):
    """The same weights with experts stacked as 3-D `mlp.experts.gate_up_proj` / `down_proj`
    (transformers 5's in-memory layout) give the same tokens as the per-expert checkpoint."""
    classic = write_test_checkpoint(tmp_path / "classic", architecture="mixtral", seed=3)
    tensors = load_file(classic / "model.safetensors")
    fused = {}
    for name, t in tensors.items():
        if ".experts." not in name:
            fused[name.replace(".block_sparse_moe.", ".mlp.")] = t
    for layer in range(2):
        p = f"model.layers.{layer}.block_sparse_moe.experts"
        w = [[tensors[f"{p}.{e}.{k}.weight"] for e in range(4)] for k in ("w1", "w3", "w2")]
        q = f"model.layers.{layer}.mlp.experts"
        fused[f"{q}.gate_up_proj"] = torch.cat([torch.stack(w[0]), torch.stack(w[1])], dim=1)
        fused[f"{q}.down_proj"] = torch.stack(w[2])
    out_dir = tmp_path / "fused"
    out_dir.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (out_dir / f).write_bytes((classic / f).read_bytes())
    save_file(fused, out_dir / "model.safetensors", metadata={"format": "pt"})
    prompts = random_prompts([5, 60], seed=4)
    a = [o.token_ids for o in LLM(classic, num_blocks=64).generate(prompts, GREEDY)]
    b = [o.token_ids for o in LLM(out_dir, num_blocks=64).generate(prompts, GREEDY)]
    assert a == b


def test_unchosen_experts_are_not_computed():
    """Poison expert 3 with NaN and make the router never pick it: the output stays finite
    (dense computation of all experts would multiply NaN by a zero weight and spread it)."""
    cfg = ModelConfig.from_dict(
        {
            "architectures": ["MixtralForCausalLM"],
            "vocab_size": 32,
            "hidden_size": 16,
            "intermediate_size": 8,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
        }
    )
    block = SparseMoeBlock(cfg, dense_mlp_cls=None)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        block.experts.gate_up_proj[3] = float("nan")
        block.gate.weight[3] = 0.0
    x = torch.randn(50, 16, generator=g)
    x[:, :] = x.abs()  # with gate rows 0-2 positive below, expert 3's logit 0 is always lowest
    with torch.no_grad():
        block.gate.weight[:3] = block.gate.weight[:3].abs() + 0.1
    out = block(x)
    assert torch.isfinite(out).all()
    _, chosen = block.route(x)
    assert (chosen != 3).all()
