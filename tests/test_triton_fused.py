"""The fused decoder kernels (engine.attention.fused_ops) equal the eager modules, and the fused
model (Triton attention + fused kernels) equals the reference model on prefill and decode steps.

Runs under Triton's interpreter on CPU in the default suite (float32 / float16: the interpreter
does not round bf16 as the GPU does); bf16 on a GPU with `pytest -m gpu`.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Before 3.9 the interpreter's loops over run-time bounds fail with NumPy >= 2.4 (int() of a
# 1-element array); compiled kernels on a GPU are fine with older Triton.
pytest.importorskip("triton", minversion=None if torch.cuda.is_available() else "3.9")

from engine.attention import fused_ops  # noqa: E402
from engine.attention.backend import AttentionMetadata, AttentionSpec  # noqa: E402
from engine.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from engine.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from engine.config import ModelConfig  # noqa: E402
from engine.loader import load_model  # noqa: E402
from engine.models.llama import RMSNorm, RotaryEmbedding  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16] if CUDA else [torch.float32, torch.float16]
pytestmark = [pytest.mark.gpu] if CUDA else []


def rel_err(a, b):
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype, with_residual):
    g = torch.Generator().manual_seed(1)
    hidden = 4096 if CUDA else 96
    x = torch.randn(5, hidden, generator=g).to(dtype).to(DEVICE)
    residual = torch.randn(5, hidden, generator=g).to(dtype).to(DEVICE)
    norm = RMSNorm(hidden, 1e-5).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(hidden, generator=g))
    norm = norm.to(dtype)
    if with_residual:
        expected_residual = x + residual
        expected = norm(expected_residual)
        out = fused_ops.rms_norm(x, norm.weight, 1e-5, residual)
        assert torch.equal(residual, expected_residual)
    else:
        expected = norm(x)
        out = fused_ops.rms_norm(x, norm.weight, 1e-5)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert rel_err(out, expected) < tol


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_on_strided_views(dtype):
    """In place on q and k that are column slices of one qkv matrix, as the fused model has."""
    g = torch.Generator().manual_seed(2)
    heads, kv_heads, head_dim, tokens = 4, 2, 64, 7
    rotary = RotaryEmbedding(head_dim, 256, 500000.0, None)
    rotary.build(torch.device(DEVICE))
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype)
    qkv = qkv.to(DEVICE)
    positions = torch.tensor([0, 1, 5, 17, 100, 200, 255], device=DEVICE)
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
    q, k = q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim)
    q_ref, k_ref = rotary(positions, q.clone(), k.clone())
    fused_ops.rope_(q, k, positions, rotary.cos_sin)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert rel_err(q, q_ref) < tol and rel_err(k, k_ref) < tol


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype):
    g = torch.Generator().manual_seed(3)
    n = 14336 if CUDA else 200  # not a multiple of the kernel's block
    gate_up = torch.randn(3, 2 * n, generator=g).to(dtype).to(DEVICE)
    expected = F.silu(gate_up[:, :n]) * gate_up[:, n:]
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert rel_err(fused_ops.silu_and_mul(gate_up), expected) < tol


def _model_steps(model_dir, fused: bool):
    """Prefill two prompts (one spanning a block boundary), then decode one token each, then
    continue the first with a 3-token chunk over its cached prefix. Hidden states per step."""
    cfg = ModelConfig.from_pretrained(model_dir)
    spec = AttentionSpec(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.head_dim**-0.5)
    backend = TritonAttentionBackend(spec, 1024) if fused else TorchAttentionBackend(spec)
    device = torch.device(DEVICE)
    model = load_model(model_dir, cfg, backend, torch.float32, device)
    if fused:
        model.fuse_for_cuda()
    cache = [
        torch.zeros(2, 8, 16, cfg.num_kv_heads, cfg.head_dim, device=device)
        for _ in range(cfg.num_layers)
    ]
    tables = torch.tensor([[3, 5, 0], [6, 0, 0]], device=device)
    g = torch.Generator().manual_seed(4)
    prompt = [torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist() for n in (17, 3)]
    steps = [  # (token ids, positions, per-sequence (num cached, num new))
        (prompt[0] + prompt[1], list(range(17)) + list(range(3)), [(0, 17), (0, 3)]),
        ([7, 8], [17, 3], [(17, 1), (3, 1)]),
        ([9, 10, 11], [18, 19, 20], [(18, 3)]),
    ]
    outputs = []
    with torch.inference_mode():
        for ids, pos, seqs in steps:
            pos_t = torch.tensor(pos, device=device)
            seq_of = torch.repeat_interleave(torch.tensor([n for _, n in seqs]))
            slots = tables[seq_of.to(device), pos_t // 16] * 16 + pos_t % 16
            starts = [0]
            for _, n in seqs:
                starts.append(starts[-1] + n)
            meta = AttentionMetadata(
                slots, starts, [c + n for c, n in seqs], tables[: len(seqs)], 16
            )
            backend.prepare(meta)
            ids_t = torch.tensor(ids, device=device)
            outputs.append(model(ids_t, pos_t, cache, meta))
    return outputs


def test_fused_model_equals_reference(model_dir):
    ours = _model_steps(model_dir, fused=True)
    ref = _model_steps(model_dir, fused=False)
    for step, (a, b) in enumerate(zip(ours, ref)):
        assert rel_err(a, b) < 1e-5, f"step {step}: {rel_err(a, b):.2e}"
