"""Triton GEMV for quantized linears at decode sizes (a few rows of x), no tensor cores:
out[M, N] = x[M, K] @ dequant(W)[N, K]^T (+ bias), every weight byte read from HBM once.

    grid = (M, ceil(N / BLOCK_N))
    program (m, n): output columns n * BLOCK_N .. n * BLOCK_N + BLOCK_N - 1 of x row m, all of K

Each program walks K in chunks of BLOCK_K: a wide contiguous load of its BLOCK_N weight rows and
the x chunk, dequantized and multiplied in registers into a float32 accumulator, reduced over K
once at the end. x row m is the fastest grid axis, so the M programs of a weight tile run side by
side and all but the first read it from L2. No split-K (N = 4096 / BLOCK_N 4-16 is already
256-1024 programs), so no zero-filled buffer and no cast kernel: one launch per linear.

Why not `tl.dot` or `.to(float)`: at batch 1 the H100 feeds an SM ~15 weight bytes a cycle, and
int -> float conversions (I2F) run at 16 a cycle per SM, so converting every int8 weight (two per
byte for int4) caps a kernel at about the memory rate, before any other work. Integers become
floats by the 2^23 trick instead: an integer 0 <= i < 2^23 OR-ed (or added) into the mantissa of
2^23 (bits 0x4B000000) reads as the float 2^23 + i exactly; one FADD removes 2^23 and the zero
point together. Per weight: a byte extract, one integer op, one FADD, one FFMA.

    int8   w = float(bits(0x4B000080 + q)) - (2^23 + 128)            (q + 128 in [1, 255])
    fp8    the e4m3 bits converted by Triton (cvt e4m3x2 -> f16x2 on sm_90, then to f32)
    int4   byte b of a row holds k = 2j (low nibble), 2j + 1 (high nibble):
           low  = float(bits(0x4B000000 | (b & 0x0F))) - (2^23 + zero)       = q_lo - zero
           high = float(bits(0x4B000000 | (b & 0xF0))) - (2^23 + 16 zero)   = 16 (q_hi - zero)
           the 16 is folded into the odd x columns (x / 16, exact): per x value, not per weight

Scales: int8 and fp8 scale whole output channels, applied to the finished sum; int4 scales per
group multiply each thread's 8-column partial sums (see `_group_dot`).

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
def _split4(v):
    """[..., 4] -> its four [...] slices, in order (register renames, no data movement)."""
    even, odd = tl.split(tl.reshape(v, v.shape[:-1] + [2, 2]))
    v0, v2 = tl.split(even)
    v1, v3 = tl.split(odd)
    return v0, v1, v2, v3


@triton.jit
def _nibbles(b, zero_lo, zero_hi):
    """Byte b (int32, 0..255) -> (q_lo - zero, 16 (q_hi - zero)) as float32, exactly."""
    b = b | 0x4B000000  # then one mask each: a single-constant LOP3 per nibble
    lo = (b & 0x4B00000F).to(tl.float32, bitcast=True) - zero_lo
    hi = (b & 0x4B0000F0).to(tl.float32, bitcast=True) - zero_hi
    return lo, hi


@triton.jit
def _group_dot(x_row, w_rows, s_rows, z_rows, K, HAS_ZEROS: tl.constexpr, EVEN_K: tl.constexpr,
               GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """int4: sum_g scale[n, g] sum_{k in g} x[k] (q[n, k] - zero[n, g]), float32 [BLOCK_N].

    A thread holds a chunk of 4 bytes of a row (8 columns, inside one group: GROUP_SIZE is a
    multiple of 8) and the 8 x values they multiply (one 16-byte load of 16-bit x), split into
    per-byte, per-nibble [BLOCK_N, CHUNKS] tensors; both loads get the same layout, so nothing
    moves between threads. The chunk's 8 products are one FMA chain, then scaled: one scale
    (and zero) load per 4 bytes, the same address for a group's chunks (L1)."""
    HALF_K: tl.constexpr = BLOCK_K // 2
    CHUNKS: tl.constexpr = BLOCK_K // 8
    j = tl.max_contiguous(tl.arange(0, HALF_K), 4)  # no wider: the x chunks set the layout
    kx = tl.arange(0, BLOCK_K)
    chunk_k = tl.arange(0, CHUNKS) * 8  # first column of each chunk
    same_x = tl.zeros((BLOCK_N, 1), tl.int32)  # every row reads the same x (loads are shared)
    acc = tl.zeros((BLOCK_N, CHUNKS), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        group = ((k0 + chunk_k) // GROUP_SIZE)[None, :]
        if EVEN_K:
            b = tl.load(w_rows + (k0 // 2 + j)[None, :])
            xt = tl.load(x_row + same_x + (k0 + kx)[None, :])
            scale = tl.load(s_rows + group)
        else:
            b = tl.load(w_rows + (k0 // 2 + j)[None, :], mask=(k0 + 2 * j < K)[None, :], other=0)
            x_mask = (k0 + kx < K)[None, :]
            xt = tl.load(x_row + same_x + (k0 + kx)[None, :], mask=x_mask, other=0)
            scale = tl.load(s_rows + group, mask=(k0 + chunk_k < K)[None, :], other=0)
        xt = tl.reshape(xt.to(tl.float32), (BLOCK_N, CHUNKS, 8))
        x_lo, x_hi = tl.split(tl.reshape(xt, (BLOCK_N, CHUNKS, 4, 2)))
        xl0, xl1, xl2, xl3 = _split4(x_lo)
        xh0, xh1, xh2, xh3 = _split4(x_hi * 0.0625)  # exact; the high nibbles come as 16 q
        b0, b1, b2, b3 = _split4(tl.reshape(b.to(tl.int32), (BLOCK_N, CHUNKS, 4)))
        if HAS_ZEROS:  # sum (q - z) x = sum q x - z sum x, per chunk
            zero_lo = TWO_23
            zero_hi = TWO_23
        else:  # zero point 8, subtracted with 2^23
            zero_lo = TWO_23 + 8
            zero_hi = TWO_23 + 128
        lo, hi = _nibbles(b0, zero_lo, zero_hi)
        part = lo * xl0
        part += hi * xh0
        lo, hi = _nibbles(b1, zero_lo, zero_hi)
        part += lo * xl1
        part += hi * xh1
        lo, hi = _nibbles(b2, zero_lo, zero_hi)
        part += lo * xl2
        part += hi * xh2
        lo, hi = _nibbles(b3, zero_lo, zero_hi)
        part += lo * xl3
        part += hi * xh3
        if HAS_ZEROS:
            if EVEN_K:
                zero = tl.load(z_rows + group).to(tl.float32)
            else:
                zero = tl.load(z_rows + group, mask=(k0 + chunk_k < K)[None, :], other=0)
                zero = zero.to(tl.float32)
            part -= zero * tl.sum(xt, axis=2)
        acc += part * scale.to(tl.float32)
    return tl.sum(acc, axis=1)


@triton.jit
def gemv_kernel(x, qweight, scales, zeros, bias, out, N, K,
                stride_xm, stride_wn, stride_sn, stride_om,
                GROUP_SIZE: tl.constexpr,
                METHOD: tl.constexpr,  # 0 int8, 1 fp8 (e4m3 bits), 2 int4 (packed)
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
    if METHOD == 2:
        s_rows = scales + rn_in[:, None] * stride_sn
        z_rows = zeros + rn_in[:, None] * stride_sn
        acc = _group_dot(x_row, w_rows, s_rows, z_rows, K, HAS_ZEROS, EVEN_K, GROUP_SIZE,
                         BLOCK_N, BLOCK_K)  # fmt: skip
    else:
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
) -> torch.Tensor:
    """x [M, K] (contiguous rows) @ dequant(qw)^T + bias -> [M, N] in x's dtype; one launch."""
    num_rows, k = x.shape
    n = qw.qweight.shape[0]
    out = torch.empty((num_rows, n), dtype=x.dtype, device=x.device)
    if num_rows == 0:
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
