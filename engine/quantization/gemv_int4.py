"""Triton GEMV for int4 group-wise linears at decode sizes (gemv.py's int8 / fp8 kernel has the
layout this one shares): out[M, N] = x[M, K] @ dequant(W)[N, K]^T (+ bias), each byte read once.

    grid = (M, ceil(N / BLOCK_N))
    program (m, t): rows r0 .. r0 + BLOCK_N - 1 of W for x row m, r0 = min(t BLOCK_N, N - BLOCK_N)

The last tile overlaps its neighbour instead of masking rows (needs BLOCK_N <= N): both programs
compute the overlapping rows' sums the same way and store them.

The budget: at batch 1 an H100 SM gets ~13 bytes of HBM a cycle, ~27 int4 weights, against 128
thread-instructions a cycle of issue, so ~4 instructions a weight is all there is. The previous
loop spent 5.1-5.8 (byte extract, OR, AND, FADD, FFMA, addressing); this one 2.9-3.4 at 8-16
rows a thread (SASS of sm_90 builds: `python -m benchmarks.gemv_kernels --sass`).

Nibbles become floats with one AND each. A float32 whose bits b are below 2^24 (exponent field 0
or 1: the denormals and the lowest binade, evenly spaced) equals b * 2^-149 exactly. A row's 4
bytes load as one 32-bit word w, columns c .. c + 7 in its nibbles 0 .. 7 (formats.py's packing,
little-endian), and a nibble masked in place is an exact float:

    f_i = float(bits(w & 0xF << p_i))          = q_i 2^(p_i - 149),  p_i = 4i    i = 0 .. 5
    f_i = float(bits((w >> 8) & 0xF << p_i))   = q_i 2^(p_i - 149),  p_i = 4i - 8  i = 6, 7

(one shift per word for the two nibbles in the exponent's bits). x undoes each nibble's power of
two, once per x value, shared by all the rows a thread holds: x'_i = x_i 2^(149 - p_i + E), so
x'_i f_i = x_i q_i 2^E exactly. Per 8-column chunk (inside one group, zero point z):

    part = -z 2^E S + sum_i x'_i f_i = 2^E sum_i x_i (q_i - z)      (S = sum_i x_i, 7 FADDs)
    acc += part scale;   out = 2^-E sum(acc)

z is 8, or the group's zero point read as a float the same way (z << 20 is z 2^-129). Per weight
one LOP3 and one FFMA (+ 1/8 SHF); per row and chunk the scale's load, conversion and FFMA; per
x value a conversion, the FMUL and an FADD of S, divided among the thread's rows.

Range: with E = -64 every intermediate is a normal float for any realistic activation: x' =
x 2^(85 - p) is finite for |x| < 2^43, the zero term S 2^65 for |S| < 2^63; a product x q 2^-64 is
normal for |x q| >= 2^-62, and a smaller one is a denormal exact to 2^-150 (2^-86 after the
unscale), so only a row of x entirely below ~2^-60 would lose relative accuracy. Denormal
operands cost an FFMA nothing on NVIDIA GPUs, and Triton does not flush them (no .ftz).

Error (u = 2^-24): every product is exact, so part differs from 2^E sum x (q - z) by the
roundings of S (7), of z S (1) and of the 8 FFMAs, each relative to a partial sum bounded by
(z + 15) sum |x|: at most (16 z + 120) u sum_i |x_i| per chunk, 248 u sum |x| at z = 8, where a
plain float32 chain over the dequantized q - z is bounded by 8 u sum |x| |q - z| <= 64 u sum |x|.
No catastrophic cancellation: for typical weights sum |x q| and z |S| are ~3 times
sum |x| |q - z|. Tests hold the kernel to 4e-6 of a float64 reference in float32 (it measures
~2e-7).
"""

from __future__ import annotations

import triton
import triton.language as tl

E = tl.constexpr(-64)  # products are x q 2^E (see the module docstring)


@triton.jit
def _split4(v):
    """[..., 4] -> its four [...] slices, in order (register renames, no data movement)."""
    even, odd = tl.split(tl.reshape(v, v.shape[:-1] + [2, 2]))
    v0, v2 = tl.split(even)
    v1, v3 = tl.split(odd)
    return v0, v1, v2, v3


@triton.jit
def _split8(v):
    """[..., 8] -> its eight [...] slices, in order."""
    lo, hi = tl.split(tl.reshape(v, v.shape[:-1] + [4, 2]))
    v0, v2, v4, v6 = _split4(lo)
    v1, v3, v5, v7 = _split4(hi)
    return v0, v1, v2, v3, v4, v5, v6, v7


@triton.jit
def _fma_nibble(part, x, w, POS: tl.constexpr):
    """part + x q 2^E for the nibble q at bits POS .. POS + 3 of w (POS + 3 < 24)."""
    f = (w & (0xF << POS)).to(tl.float32, bitcast=True)  # q 2^(POS - 149), exactly
    return tl.fma(x * (2.0 ** (149 + E - POS)), f, part)  # the x scale: once per x, not per row


@triton.jit
def int4_gemv_kernel(x, qweight, scales, zeros, bias, out, N, K, stride_xm, stride_om,
                     STRIDE_W: tl.constexpr, STRIDE_S: tl.constexpr,  # row strides (elements)
                     GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
                     EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no masks along K
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     UNROLL: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    r0 = tl.minimum(tl.program_id(1) * BLOCK_N, N - BLOCK_N).to(tl.int64)
    rows = tl.arange(0, BLOCK_N)
    CHUNKS: tl.constexpr = BLOCK_K // 8
    # A thread holds one 8-column chunk (4 bytes, inside one group: GROUP_SIZE % 8 == 0) of a
    # few rows, and the chunk's 8 x values (one 16-byte load of 16-bit x), loaded as a
    # [BLOCK_N, BLOCK_K] tile of one row so it gets the weights' layout (the rows' loads are one).
    j = tl.max_contiguous(tl.arange(0, BLOCK_K // 2), 4)  # no wider: the x chunks set the layout
    kx = tl.arange(0, BLOCK_K)
    chunk_k = tl.arange(0, CHUNKS) * 8  # first column of each chunk
    same_x = tl.zeros((BLOCK_N, 1), tl.int32)
    x_row = x + row * stride_xm
    # NOTE: the K position lives in scalar pointers advanced each iteration, the rows in
    # loop-invariant offsets with constexpr strides: then a thread's rows are immediate offsets
    # of one address (LDG [R+imm]). Offsets computed from k0 instead make LLVM hoist a 64-bit
    # base per row and add k0 to each, two instructions a row. Scales go through a byte pointer
    # for the same reason (a bf16 pointer's scaled index hid the constants from ptxas).
    w_ptr = qweight + r0 * STRIDE_W
    w_offs = rows[:, None] * STRIDE_W + j[None, :]
    S_BYTES: tl.constexpr = scales.dtype.element_ty.primitive_bitwidth // 8
    s_ptr = scales.to(tl.pointer_type(tl.uint8)) + r0 * (STRIDE_S * S_BYTES)
    z_ptr = zeros + r0 * STRIDE_S
    TILE_GROUPS: tl.constexpr = BLOCK_K % GROUP_SIZE == 0  # whole groups a tile: fixed offsets
    if TILE_GROUPS:
        g_offs = rows[:, None] * STRIDE_S + (chunk_k // GROUP_SIZE)[None, :]
    acc = tl.zeros((BLOCK_N, CHUNKS), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, loop_unroll_factor=UNROLL):
        if not TILE_GROUPS:  # groups straddle tiles (or a tile is part of one): per iteration
            g_offs = rows[:, None] * STRIDE_S + ((k0 + chunk_k) // GROUP_SIZE)[None, :]
        s_ptrs = (s_ptr + g_offs * S_BYTES).to(tl.pointer_type(scales.dtype.element_ty))
        if EVEN_K:
            b = tl.load(w_ptr + w_offs)
            xt = tl.load(x_row + same_x + (k0 + kx)[None, :])
            scale = tl.load(s_ptrs)
        else:
            b = tl.load(w_ptr + w_offs, mask=(k0 + 2 * j < K)[None, :], other=0)
            xt = tl.load(x_row + same_x + (k0 + kx)[None, :], mask=(k0 + kx < K)[None, :], other=0)
            scale = tl.load(s_ptrs, mask=(k0 + chunk_k < K)[None, :], other=0)
        # One 32-bit load where the row is 4-byte aligned (LLVM folds the ORs into it).
        b0, b1, b2, b3 = _split4(tl.reshape(b.to(tl.int32), (BLOCK_N, CHUNKS, 4)))
        w = b0 | (b1 << 8) | (b2 << 16) | (b3 << 24)
        xt = tl.reshape(xt.to(tl.float32), (BLOCK_N, CHUNKS, 8))
        x_sum = tl.sum(xt, axis=2)
        if HAS_ZEROS:
            if EVEN_K:
                z = tl.load(z_ptr + g_offs)
            else:
                z = tl.load(z_ptr + g_offs, mask=(k0 + chunk_k < K)[None, :], other=0)
            # z at bits 20-23 reads as the float z 2^-129 (the nibble trick), so this is
            # -z S 2^E; not at bit 0: S 2^85 would overflow where x 2^85 does not
            z = (z.to(tl.int32) << 20).to(tl.float32, bitcast=True)
            part = (x_sum * -(2.0 ** (129 + E))) * z
        else:
            part = x_sum * -(2.0 ** (3 + E))  # zero point 8
        x0, x1, x2, x3, x4, x5, x6, x7 = _split8(xt)
        part = _fma_nibble(part, x0, w, 0)
        part = _fma_nibble(part, x1, w, 4)
        part = _fma_nibble(part, x2, w, 8)
        part = _fma_nibble(part, x3, w, 12)
        part = _fma_nibble(part, x4, w, 16)
        part = _fma_nibble(part, x5, w, 20)
        w = w >> 8  # nibbles 6, 7 to bits 16 .. 23
        part = _fma_nibble(part, x6, w, 16)
        part = _fma_nibble(part, x7, w, 20)
        acc = tl.fma(part, scale.to(tl.float32), acc)
        w_ptr += BLOCK_K // 2
        if TILE_GROUPS:
            s_ptr += BLOCK_K // GROUP_SIZE * S_BYTES
            z_ptr += BLOCK_K // GROUP_SIZE
    result = tl.sum(acc, axis=1) * (2.0**-E)
    rn = r0 + rows
    if HAS_BIAS:
        result += tl.load(bias + rn).to(tl.float32)
    tl.store(out + row * stride_om + rn, result.to(out.dtype.element_ty))
