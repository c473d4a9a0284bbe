"""Triton GEMV for quantized linears at decode sizes (a few rows of x), no tensor cores:
out[M, N] = x[M, K] @ dequant(W)[N, K]^T (+ bias), every weight byte read from HBM once. This
file: int8 and fp8, and `gemv`, the entry for all formats; int4 has its own kernel in
gemv_int4.py (same layout, its own way of turning nibbles into floats).

    grid = (M, ceil(N / BLOCK_N))
    program (m, n): output columns n * BLOCK_N .. n * BLOCK_N + BLOCK_N - 1 of x row m, all of K

Each program walks K in chunks of BLOCK_K: a wide contiguous load of its BLOCK_N weight rows and
the x chunk, dequantized and multiplied in registers into a float32 accumulator, reduced over K
once at the end. x row m is the fastest grid axis, so the M programs of a weight tile run side by
side and all but the first read it from L2. No split-K (N = 4096 / BLOCK_N 4-16 is already
256-1024 programs), so no zero-filled buffer and no cast kernel: one launch per linear.

Why not `tl.dot` or `.to(float)`: at batch 1 the H100 feeds an SM ~15 weight bytes a cycle, and
int -> float conversions (I2F) run at 16 a cycle per SM, so converting every int8 weight caps a
kernel at about the memory rate, before any other work. Integers become floats by the 2^23 trick
instead: an integer 0 <= i < 2^23 OR-ed (or added) into the mantissa of 2^23 (bits 0x4B000000)
reads as the float 2^23 + i exactly; one FADD removes 2^23 and the zero point together.

    int8   w = float(bits(0x4B000080 + q)) - (2^23 + 128)            (q + 128 in [1, 255])
    fp8    the e4m3 bits converted by Triton (cvt e4m3x2 -> f16x2 on sm_90, then to f32)

Scales: int8 and fp8 scale whole output channels, applied to the finished sum.

Layouts (checked in the SASS of sm_90 builds): x is loaded as a [BLOCK_N, BLOCK_K] tile of one
row, the shape of the weight tile, so Triton gives both the same register layout and the x loads
of a thread's rows are one load; a 1-D x load instead moved x through shared memory with
barriers every iteration.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.quantization.formats import QuantizedWeight
from engine.quantization.gemv_int4 import int4_gemv_kernel

METHOD_CODE = {"int8": 0, "fp8": 1, "int4": 2}

TWO_23 = tl.constexpr(8388608.0)  # 2^23: float32 bits 0x4B000000


@triton.jit
def _channel_dot(x_row, w_rows, K, METHOD: tl.constexpr, EVEN_K: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """int8 / fp8: sum_k x[k] q[n, k] as float32 [BLOCK_N] (scale not applied). x is loaded as
    a [BLOCK_N, BLOCK_K] tile of the same row, so it gets the weights' layout (each thread's x
    values are its weights' columns; the rows' loads are one load) instead of a move through
    shared memory and barriers every iteration."""
    same_x = tl.zeros((BLOCK_N, 1), tl.int32)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            w = tl.load(w_rows + k[None, :])
            xt = tl.load(x_row + same_x + k[None, :])
        else:
            w = tl.load(w_rows + k[None, :], mask=(k < K)[None, :], other=0)
            xt = tl.load(x_row + same_x + k[None, :], mask=(k < K)[None, :], other=0)
        if METHOD == 0:
            wf = (w.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - (TWO_23 + 128)
        else:
            wf = w.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        acc += xt.to(tl.float32) * wf
    return tl.sum(acc, axis=1)


@triton.jit
def gemv_kernel(x, qweight, scales, zeros, bias, out, N, K,
                stride_xm, stride_wn, stride_sn, stride_om,
                GROUP_SIZE: tl.constexpr,
                METHOD: tl.constexpr,  # 0 int8, 1 fp8 (e4m3 bits); int4: gemv_int4.py
                HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
                EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no masks along K
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    # Program (m, n): x row m is the fastest grid axis, so the programs of one weight tile run
    # together and rows after the first read it from L2.
    row = tl.program_id(0).to(tl.int64)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows past N read row N - 1 again (no masks on the loads); their sums are not stored.
    rn_in = tl.minimum(rn, N - 1).to(tl.int64)
    x_row = x + row * stride_xm
    w_rows = qweight + rn_in[:, None] * stride_wn
    acc = _channel_dot(x_row, w_rows, K, METHOD, EVEN_K, BLOCK_N, BLOCK_K)
    acc = acc * tl.load(scales + rn_in).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias + rn_in).to(tl.float32)
    tl.store(out + row * stride_om + rn, acc.to(out.dtype.element_ty), mask=rn < N)


def gemv_supports(method: str, group_size: int) -> bool:
    """int4 needs whole 8-column chunks inside a group (a thread's 4 bytes share one scale)."""
    return method != "int4" or group_size % 8 == 0


def weight_args(qw: QuantizedWeight, bias: torch.Tensor | None) -> tuple[tuple, tuple, dict]:
    """What both kernels take of the weight: (qweight, scales, zeros, bias) with the scales
    standing in for absent ones, (row stride of qweight, of the int4 scales), the constexprs."""
    zeros = qw.zeros if qw.zeros is not None else qw.scales
    tensors = (qw.qweight, qw.scales, zeros, bias if bias is not None else qw.scales)
    strides = (qw.qweight.stride(0), qw.scales.stride(0) if qw.method == "int4" else 0)
    meta = dict(
        GROUP_SIZE=max(qw.group_size, 8),  # int4 groups are even, >= 2; unused by int8 / fp8
        METHOD=METHOD_CODE[qw.method],
        HAS_ZEROS=qw.zeros is not None,
        HAS_BIAS=bias is not None,
    )
    return tensors, strides, meta


def gemv(
    x: torch.Tensor,
    qw: QuantizedWeight,
    bias: torch.Tensor | None,
    block_n: int,
    block_k: int,
    num_warps: int,
    unroll: int = 1,
) -> torch.Tensor:
    """x [M, K] (contiguous rows) @ dequant(qw)^T + bias -> [M, N] in x's dtype; one launch.
    `unroll`: the int4 kernel's K loop unroll factor (int8 / fp8 ignore it)."""
    num_rows, k = x.shape
    n = qw.qweight.shape[0]
    out = torch.empty((num_rows, n), dtype=x.dtype, device=x.device)
    if num_rows == 0:
        return out
    if qw.method == "int4":
        _gemv_int4(x, qw, bias, out, block_n, block_k, num_warps, unroll)
        return out
    tensors, strides, meta = weight_args(qw, bias)
    gemv_kernel[(num_rows, triton.cdiv(n, block_n))](
        x,
        *tensors,
        out,
        n,
        k,
        x.stride(0),
        *strides,
        out.stride(0),
        **meta,
        EVEN_K=k % block_k == 0,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=num_warps,
        num_stages=1,  # no software pipelining of non-dot loads: occupancy hides the latency
    )
    return out


def _gemv_int4(x, qw, bias, out, block_n: int, block_k: int, num_warps: int, unroll: int) -> None:
    num_rows, k = x.shape
    n = qw.qweight.shape[0]
    block_n = min(block_n, 1 << (n.bit_length() - 1))  # the last tile overlaps, never past N
    (qweight, scales, zeros, bias_arg), _, meta = weight_args(qw, bias)
    int4_gemv_kernel[(num_rows, triton.cdiv(n, block_n))](
        x,
        qweight,
        scales,
        zeros,
        bias_arg,
        out,
        n,
        k,
        x.stride(0),
        out.stride(0),
        # Constexpr strides: a thread's rows become immediate address offsets (gemv_int4.py);
        # one compile per distinct K, a few per model.
        STRIDE_W=qweight.stride(0),
        STRIDE_S=scales.stride(0),
        GROUP_SIZE=qw.group_size,
        HAS_ZEROS=meta["HAS_ZEROS"],
        HAS_BIAS=meta["HAS_BIAS"],
        EVEN_K=k % block_k == 0,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        UNROLL=unroll,
        num_warps=num_warps,
        num_stages=1,
    )
