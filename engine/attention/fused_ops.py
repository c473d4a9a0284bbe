"""Fused elementwise kernels for the decoder on CUDA: RMSNorm (+ residual add), RoPE, SiLU-and-mul.

Why: at batch 1 a decode step is ~7 weight matrix-vector products per layer, and the eager
model adds ~35 tiny elementwise kernels per layer around them (RMSNorm alone is 8: cast,
square, mean, add, rsqrt, mul, cast, scale). Even inside a CUDA graph each costs a few
microseconds, over 1,000 of them a step. Each function here is one kernel.

Each kernel rounds where the reference module rounds (to the model dtype after the float32
normalisation, after each product), so it computes what `engine.models.llama` computes
up to float32 summation order.

NOTE: these live under engine/attention/ for now only because that is the package the GPU work
owns; they belong in an `engine/kernels/` package once there is one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x,
    residual,
    weight,
    out,
    stride_x,
    stride_r,
    stride_o,
    eps,
    N: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    h = tl.load(x + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # residual <- x + residual (rounded to the model dtype, as the eager add is)
        h = h.to(tl.float32) + tl.load(residual + row * stride_r + cols, mask=mask, other=0.0)
        h = h.to(residual.dtype.element_ty)
        tl.store(residual + row * stride_r + cols, h, mask=mask)
    hf = h.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(hf * hf, 0) / N + eps)
    normed = (hf * inv_rms).to(out.dtype.element_ty).to(tl.float32)
    w = tl.load(weight + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out + row * stride_o + cols, (w * normed).to(out.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """RMSNorm over the last dim of a 2-D `x`. With `residual`: first `residual += x` in place,
    then normalise the sum (the pre-norm decoder's add-then-norm, one pass)."""
    num_rows, n = x.shape
    out = torch.empty_like(x)
    if num_rows == 0:
        return out
    res = residual if residual is not None else x
    _rms_norm_kernel[(num_rows,)](
        x,
        res,
        weight,
        out,
        x.stride(0),
        res.stride(0),
        out.stride(0),
        eps,
        N=n,
        BLOCK=triton.next_power_of_2(n),
        HAS_RESIDUAL=residual is not None,
        num_warps=8 if n >= 4096 else 4,
    )
    return out


@triton.jit
def _rope_heads(
    ptr,
    token,
    stride_t,
    stride_h,
    cos,
    sin,
    j,
    jm,
    NUM_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin on the halves (x1, x2) of each head: the
    eager `x * cos + rotate_half(x) * sin`, each product rounded to the dtype as it rounds."""
    dt = ptr.dtype.element_ty
    h = tl.arange(0, BLOCK_H)
    mask = (h < NUM_HEADS)[:, None] & jm[None, :]
    base = ptr + token * stride_t + h[:, None] * stride_h + j[None, :]
    x1 = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF, mask=mask, other=0.0).to(tl.float32)
    a1 = (x1 * cos).to(dt).to(tl.float32)
    b1 = (-x2 * sin).to(dt).to(tl.float32)
    a2 = (x2 * cos).to(dt).to(tl.float32)
    b2 = (x1 * sin).to(dt).to(tl.float32)
    tl.store(base, (a1 + b1).to(dt), mask=mask)
    tl.store(base + HALF, (a2 + b2).to(dt), mask=mask)


@triton.jit
def _rope_kernel(
    q,
    k,
    positions,
    cos_sin,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_cs,
    NUM_Q_HEADS: tl.constexpr,
    NUM_K_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions + token).to(tl.int64)
    j = tl.arange(0, BLOCK_HALF)
    jm = j < HALF
    dt = q.dtype.element_ty
    # cos/sin repeat over the two halves; the eager code casts them to the dtype first.
    cos = tl.load(cos_sin + pos * 2 * HALF + j, mask=jm, other=0.0).to(dt).to(tl.float32)
    sin = tl.load(cos_sin + stride_cs + pos * 2 * HALF + j, mask=jm, other=0.0)
    sin = sin.to(dt).to(tl.float32)
    _rope_heads(q, token, stride_qt, stride_qh, cos, sin, j, jm, NUM_Q_HEADS, HALF, BLOCK_H)
    _rope_heads(k, token, stride_kt, stride_kh, cos, sin, j, jm, NUM_K_HEADS, HALF, BLOCK_H)


def rope_(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim], rotated in place
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], rotated in place
    positions: torch.Tensor,
    cos_sin: torch.Tensor,  # [2, max_positions, head_dim] float32 (RotaryEmbedding.cos_sin)
) -> None:
    num_tokens, num_heads, head_dim = q.shape
    if num_tokens == 0:
        return
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and cos_sin.is_contiguous()
    _rope_kernel[(num_tokens,)](
        q,
        k,
        positions,
        cos_sin,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos_sin.stride(0),
        NUM_Q_HEADS=num_heads,
        NUM_K_HEADS=k.shape[1],
        HALF=head_dim // 2,
        BLOCK_H=triton.next_power_of_2(max(num_heads, k.shape[1])),
        BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
        num_warps=4,
    )


@triton.jit
def _silu_and_mul_kernel(gate_up, out, stride_in, stride_out, N: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(gate_up + row * stride_in + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gate_up + row * stride_in + N + cols, mask=mask, other=0.0).to(tl.float32)
    dt = out.dtype.element_ty
    act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
    tl.store(out + row * stride_out + cols, (act * u).to(dt), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[rows, 2n] (gate | up) -> [rows, n] silu(gate) * up."""
    rows, two_n = gate_up.shape
    n = two_n // 2
    out = torch.empty((rows, n), dtype=gate_up.dtype, device=gate_up.device)
    if rows == 0:
        return out
    block = 1024
    _silu_and_mul_kernel[(rows, triton.cdiv(n, block))](
        gate_up, out, gate_up.stride(0), out.stride(0), N=n, BLOCK=block, num_warps=4
    )
    return out
