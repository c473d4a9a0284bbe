"""Triton weight-only matmul for quantized linears on CUDA (W8A16 int8, W8A16 fp8, W4A16 int4):
out[M, N] = x[M, K] @ dequant(W)[N, K]^T (+ bias), reading the quantized bytes once.

Why a kernel: a batch-1 decode step is memory-bound (every weight byte read once per token), so
a dequantize-then-matmul would read the small weights, write the wide ones and read them again,
slower than bf16. Here each program loads a [BLOCK_N, BLOCK_K] tile of the quantized matrix,
dequantizes it in registers and multiplies it into a [BLOCK_M, BLOCK_N] float32 accumulator:

    grid = (ceil(M / BLOCK_M), ceil(N / BLOCK_N), split_k)
    program (m, n, s) sums k in [s * k_per_split, (s + 1) * k_per_split) of rows m, columns n

M is padded to 16 rows inside a program (the smallest `tl.dot` tile; the padding rows are
masked loads of zeros, free in a memory-bound kernel). Split-K gives a small-M, small-N matmul
enough programs to keep HBM busy (o_proj at batch 1: 4096 / BLOCK_N programs without it); the
splits then add float32 partial sums atomically into a zeroed buffer, cast at the end.

Formats (formats.py): int8 and fp8 (e4m3 bits as uint8) scale whole output channels, so the
scale multiplies the finished sum; int4 bytes hold k = 2j (low nibble) and 2j + 1 (high), so
a tile is split into its even and odd columns, each dotted with the matching columns of x, and
each element is scaled by its group's scale before the dot.

Up to MAX_GEMV_ROWS rows (decode) the GEMV kernel in gemv.py competes too: no tl.dot, no
split-K, one launch, integers turned into floats without I2F (see there why that matters).

Kernel, block sizes and split_k: measured per (format, M bucket, N, K) the first time a shape
runs outside CUDA graph capture (`_tuned`), among a few dozen candidates, each timed after an L2
flush as a decode step meets its weights; `BATON_QUANT_TUNE=0`, the interpreter and capture use
`_heuristic` (the GEMV for up to 4 rows). No host sync and no host tensors in `matmul`, so
decode CUDA graphs capture it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine.quantization.formats import QuantizedWeight
from engine.quantization.gemv import gemv, gemv_supports, weight_args

# Above this many rows (prefill) the Triton kernel re-reads each weight tile ceil(M / 64) times
# and is compute-bound without tensor-core-friendly tiles: dequantize once and use cuBLAS.
MAX_KERNEL_ROWS = 256
# Up to this many rows the GEMV kernel (gemv.py) is a candidate too: it dequantizes every weight
# once per row of x, so it wins where the weight bytes, not the math, are the cost.
MAX_GEMV_ROWS = 8
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _mac(acc, xt, w, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] += xt [BLOCK_M, BK] @ w [BLOCK_N, BK]^T. Under 16 rows (decode at
    batch 1..8) as FMAs and a row sum, a GEMV with no tensor-core layout shuffles; else tl.dot."""
    if BLOCK_M < 16:
        prod = xt.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
        return acc + tl.sum(prod, axis=2)
    return acc + tl.dot(xt, tl.trans(w), input_precision=PRECISION)


@triton.jit
def _wq_matmul_kernel(
    x,
    qweight,
    scales,
    zeros,
    bias,
    out,
    M,
    N,
    K,
    k_per_split,
    stride_xm,
    stride_wn,
    stride_sn,
    stride_om,
    GROUP_SIZE: tl.constexpr,
    METHOD: tl.constexpr,  # 0 int8, 1 fp8 (e4m3 bits), 2 int4 (packed)
    HAS_ZEROS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ATOMIC: tl.constexpr,  # split-K: out is a zeroed float32 buffer, partial sums are added
    TILE_IN_GROUP: tl.constexpr,  # int4: GROUP_SIZE % BLOCK_K == 0 (the fast form)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < N
    x_rows = x + rm.to(tl.int64)[:, None] * stride_xm
    w_rows = qweight + rn.to(tl.int64)[:, None] * stride_wn
    dtype = x.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        if METHOD == 2 and TILE_IN_GROUP:
            # The tile lies in one group (GROUP_SIZE % BLOCK_K == 0): one scale and zero per
            # row, applied to the tile's sum:
            #     sum_k (q_k - z) s x_k = s (sum_k q_k x_k - z sum_k x_k)
            # x is read contiguously and split into the even and odd columns (low and high
            # nibbles of byte j), the bytes as one contiguous [BLOCK_N, BLOCK_K / 2] load.
            j = tl.arange(0, BLOCK_K // 2)
            k = k0 + tl.arange(0, BLOCK_K)
            w_mask = n_mask[:, None] & (k0 + 2 * j < k_end)[None, :]
            packed = tl.load(w_rows + (k0 // 2 + j)[None, :], mask=w_mask, other=0)
            group = k0 // GROUP_SIZE
            scale = tl.load(scales + rn.to(tl.int64) * stride_sn + group, mask=n_mask, other=0)
            if HAS_ZEROS:
                zero = tl.load(zeros + rn.to(tl.int64) * stride_sn + group, mask=n_mask, other=0)
                zero = zero.to(tl.float32)
            else:
                zero = tl.full((BLOCK_N,), 8.0, tl.float32)
            xt = tl.load(x_rows + k[None, :], mask=m_mask[:, None] & (k < k_end)[None, :], other=0)
            x_lo, x_hi = tl.split(tl.reshape(xt, (BLOCK_M, BLOCK_K // 2, 2)))
            q_lo = (packed & 0xF).to(dtype)  # 0..15: exact in every float type
            q_hi = (packed >> 4).to(dtype)
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            part = _mac(part, x_lo, q_lo, BLOCK_M, PRECISION)
            part = _mac(part, x_hi, q_hi, BLOCK_M, PRECISION)
            x_sum = tl.sum(xt.to(tl.float32), axis=1)  # the zero's share: z * sum_k x_k
            part -= x_sum[:, None] * zero[None, :]
            acc += part * scale.to(tl.float32)[None, :]
        elif METHOD == 2:
            # Byte j of the tile holds columns k0 + 2j (low nibble) and k0 + 2j + 1 (high);
            # k0 is even (k_per_split and BLOCK_K are), so both share a group (even size).
            j = tl.arange(0, BLOCK_K // 2)
            k_even = k0 + 2 * j
            w_mask = n_mask[:, None] & (k_even < k_end)[None, :]
            packed = tl.load(w_rows + (k_even // 2)[None, :], mask=w_mask, other=0)
            s_rows = scales + rn.to(tl.int64)[:, None] * stride_sn + (k_even // GROUP_SIZE)[None, :]
            scale = tl.load(s_rows, mask=w_mask, other=0).to(tl.float32)
            if HAS_ZEROS:
                z_rows = zeros + rn.to(tl.int64)[:, None] * stride_sn
                zero = tl.load(z_rows + (k_even // GROUP_SIZE)[None, :], mask=w_mask, other=0)
                zero = zero.to(tl.float32)
            else:
                zero = 8.0
            w_lo = (((packed & 0xF).to(tl.float32) - zero) * scale).to(dtype)
            w_hi = (((packed >> 4).to(tl.float32) - zero) * scale).to(dtype)
            x_lo = tl.load(
                x_rows + k_even[None, :], mask=m_mask[:, None] & (k_even < k_end)[None, :], other=0
            )
            x_hi = tl.load(
                x_rows + (k_even + 1)[None, :],
                mask=m_mask[:, None] & (k_even + 1 < k_end)[None, :],
                other=0,
            )
            acc = _mac(acc, x_lo, w_lo, BLOCK_M, PRECISION)
            acc = _mac(acc, x_hi, w_hi, BLOCK_M, PRECISION)
        else:
            k = k0 + tl.arange(0, BLOCK_K)
            k_mask = k < k_end
            w = tl.load(w_rows + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0)
            if METHOD == 1:
                w = w.to(tl.float8e4nv, bitcast=True)
            # Exact: int8 and e4m3 values are representable in bf16, fp16 and fp32.
            w = w.to(dtype)
            xt = tl.load(x_rows + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0)
            acc = _mac(acc, xt, w, BLOCK_M, PRECISION)
    if METHOD != 2:  # per-channel scale: a factor of the whole sum
        acc = acc * tl.load(scales + rn, mask=n_mask, other=0).to(tl.float32)[None, :]
    if HAS_BIAS:
        b = tl.load(bias + rn, mask=n_mask, other=0).to(tl.float32)
        if ATOMIC:
            b = tl.where(pid_k == 0, b, 0.0)  # added once, by the first split
        acc += b[None, :]
    o_ptrs = out + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
    o_mask = m_mask[:, None] & n_mask[None, :]
    if ATOMIC:
        tl.atomic_add(o_ptrs, acc, mask=o_mask)
    else:
        tl.store(o_ptrs, acc.to(out.dtype.element_ty), mask=o_mask)


@dataclass(frozen=True)
class KernelConfig:
    block_n: int
    block_k: int
    split_k: int
    block_m: int = 0  # 0: 16, 32 or 64 by the number of rows; 1..8: the FMA (GEMV) form
    num_warps: int = 4
    num_stages: int = 3
    gemv: bool = False  # gemv.py's kernel (block_n, block_k, num_warps; one row a program)
    unroll: int = 1  # the int4 GEMV's K loop unroll factor (more loads in flight a thread)

    def rows_per_program(self, num_rows: int) -> int:
        if self.block_m:
            return self.block_m
        return 16 if num_rows <= 16 else 32 if num_rows <= 32 else 64


def _split_for(num_rows: int, n: int, k: int, block_m: int, block_n: int, block_k: int) -> int:
    """Enough programs for ~4 per SM on a 132-SM H100, without splits shorter than 4 tiles."""
    programs = triton.cdiv(num_rows, block_m) * triton.cdiv(n, block_n)
    return max(1, min(triton.cdiv(528, programs), k // (4 * block_k)))


def _config(num_rows: int, n: int, k: int, block_m: int, block_n: int, block_k: int, **kw):
    rows = KernelConfig(block_n, block_k, 1, block_m).rows_per_program(num_rows)
    split = _split_for(num_rows, n, k, rows, block_n, block_k)
    return KernelConfig(block_n, block_k, split, block_m, **kw)


def _int4_block_k(group_size: int) -> int:
    """A tile inside one group takes the kernel's fast int4 form."""
    return group_size if group_size in (32, 64, 128) else 128


def _gemv_config(block_n: int, block_k: int, num_warps: int = 4, unroll: int = 1) -> KernelConfig:
    return KernelConfig(block_n, block_k, 1, 1, num_warps, 1, gemv=True, unroll=unroll)


def _gemv_candidates(method: str) -> list[KernelConfig]:
    """int8 / fp8: 16..64 weights a thread per tile: fewer and a thread's loads are narrower than
    16 bytes, more and the accumulator crowds out occupancy.

    int4 (gemv_int4.py): a thread holds one 8-column chunk of 4..16 rows, which share the per-x
    work (conversion, scaling, the x sum): 2.9-3.4 instructions a weight at 8-16 rows, 3.7-4.4 at
    4 (sm_90 SASS, `benchmarks.gemv_kernels --sass`), 5-6 at 2. Fewer rows, more programs for
    small N. Loads in flight per SM scale with block_k * unroll, not block_n: what hides HBM
    latency on the small-N projections (o, down: 256-512 programs)."""
    if method != "int4":
        return [
            _gemv_config(block_n, block_k, num_warps)
            for num_warps in (4, 8)
            for block_n in (4, 8, 16)
            for block_k in (256, 512, 1024)
            if 16 <= block_n * block_k // (32 * num_warps) <= 64
        ]
    found = []
    for num_warps in (4, 8):
        for block_n in (8, 16, 32):
            for block_k in (256, 512, 1024):
                rows = block_n * block_k // (8 * 32 * num_warps)
                if not 4 <= rows <= 16:
                    continue
                unrolls = (1, 2, 4) if num_warps == 4 and block_k == 512 else (1, 2)
                found += [_gemv_config(block_n, block_k, num_warps, u) for u in unrolls]
    return found


def _heuristic(num_rows: int, n: int, k: int, method: str, group_size: int) -> KernelConfig:
    if num_rows <= 4 and gemv_supports(method, group_size):
        # int4: 8 rows a thread (fewest instructions a weight in the sm_90 SASS), 2 K steps
        # of loads in flight
        return _gemv_config(16, 512, 4, 2) if method == "int4" else _gemv_config(8, 512)
    block_m = num_rows if num_rows <= 4 else 0
    block_k = _int4_block_k(group_size) if method == "int4" else 128
    return _config(num_rows, n, k, block_m, 32, block_k)


# Rows up to this many are tuned (decode at small batch: where weight bytes are the cost);
# larger buckets use the heuristic, which keeps tuning to a few seconds per shape.
_MAX_TUNED_ROWS = 16


def _candidates(num_rows: int, n: int, k: int, method: str, group_size: int) -> list[KernelConfig]:
    tiles = [(32, 128), (64, 128), (32, 256), (16, 256)]
    if method == "int4":
        block_k = _int4_block_k(group_size)
        tiles = [(16, block_k), (32, block_k), (64, block_k), (128, block_k)]
    found = []
    for block_m in {0, num_rows if num_rows <= 8 else 0}:
        for block_n, block_k in tiles:
            # The FMA form holds a [block_m, block_n, block_k] product: at most 16K floats
            # (128 registers a thread at 4 warps), else it spills.
            columns = block_k // 2 if method == "int4" else block_k
            if block_m * block_n * columns > 16384:
                continue
            base = _config(num_rows, n, k, block_m, block_n, block_k)
            for split in sorted({1, base.split_k, 2 * base.split_k}):
                if split == 1 or k // split >= 2 * block_k:
                    found.append(KernelConfig(block_n, block_k, split, block_m))
    if num_rows <= MAX_GEMV_ROWS and gemv_supports(method, group_size):
        found += _gemv_candidates(method)
    return found


_TUNED: dict[tuple, KernelConfig] = {}


def _tuned(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None) -> KernelConfig:
    """The fastest candidate for this call's shape bucket, measured once; the heuristic while a
    CUDA graph is being captured (the warm-up run before each capture tunes its shapes)."""
    num_rows, k = x.shape
    n = qw.qweight.shape[0]
    bucket = 1 << (num_rows - 1).bit_length()
    key = (qw.method, bucket, n, k, qw.group_size, qw.zeros is not None, bias is not None,
           x.dtype)  # fmt: skip
    if key in _TUNED:
        return _TUNED[key]
    fallback = _heuristic(bucket, n, k, qw.method, qw.group_size)
    if (
        _INTERPRET
        or bucket > _MAX_TUNED_ROWS
        or os.environ.get("BATON_QUANT_TUNE", "1") == "0"
        or torch.cuda.is_current_stream_capturing()
    ):
        return fallback
    best, best_ms = fallback, float("inf")
    flush = _l2_flush_buffer(x.device)
    for cfg in _candidates(bucket, n, k, qw.method, qw.group_size):
        try:
            ms = _cold_ms(lambda c=cfg: _launch(x, qw, bias, c), flush)
        except Exception:  # e.g. out of shared memory / registers for a big tile: skip it
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    _TUNED[key] = best
    return best


def _l2_flush_buffer(device: torch.device) -> torch.Tensor:
    """Twice the GPU's L2: reading it all evicts whatever a timed call would find cached."""
    num_bytes = 2 * getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    return torch.empty(max(num_bytes, 32 << 20) // 4, dtype=torch.int32, device=device)


def _cold_ms(call, flush: torch.Tensor) -> float:
    """GPU time of `call()` after reading `flush`, from CUDA graph replays: what ranks candidates
    as a decode step meets its weights, evicted from L2 by the layers before. Timed from the
    host, a decode-sized call (~10 us of GPU work) measures launch latency; timed in a graph
    without the flush, the weight stays in L2 (for `o` at batch 1 that picked a config 16%
    slower than the best from HBM). The flush's own time is in every candidate's number alike;
    it reads, so the call has no dirty lines to write back."""

    def cold_call():
        flush.max()
        call()

    return triton.testing.do_bench_cudagraph(cold_call, rep=5)


def _launch(
    x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None, cfg: KernelConfig
) -> torch.Tensor:
    if cfg.gemv:
        return gemv(x, qw, bias, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.unroll)
    num_rows, k = x.shape
    n = qw.qweight.shape[0]
    atomic = cfg.split_k > 1
    if atomic:
        out = torch.zeros((num_rows, n), dtype=torch.float32, device=x.device)
    else:
        out = torch.empty((num_rows, n), dtype=x.dtype, device=x.device)
    if num_rows == 0:
        return out.to(x.dtype)
    # Splits start on whole blocks (even k: int4 bytes are never split between programs).
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    block_m = cfg.rows_per_program(num_rows)
    grid = (triton.cdiv(num_rows, block_m), triton.cdiv(n, cfg.block_n), cfg.split_k)
    tensors, strides, meta = weight_args(qw, bias)
    _wq_matmul_kernel[grid](
        x,
        *tensors,
        out,
        num_rows,
        n,
        k,
        k_per_split,
        x.stride(0),
        *strides,
        out.stride(0),
        **meta,
        ATOMIC=atomic,
        TILE_IN_GROUP=qw.group_size % cfg.block_k == 0,
        BLOCK_M=block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out.to(x.dtype) if atomic else out


def weight_only_matmul(
    x: torch.Tensor,
    qw: QuantizedWeight,
    bias: torch.Tensor | None = None,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """x [M, K] (bf16 / fp16 / fp32) @ dequant(qw)^T + bias -> [M, N] in x's dtype. `config`
    pins the blocks and split (tests); else tuned per shape."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    assert qw.qweight.stride(-1) == 1 and qw.scales.stride(-1) == 1
    return _launch(x, qw, bias, config or _tuned(x, qw, bias))
