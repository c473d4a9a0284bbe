"""The Triton weight-only matmul (engine.quantization.kernels) against a float32 reference on
the dequantized weight: int8, fp8 and int4 (symmetric and asymmetric), odd M, N and K that are
not multiples of the blocks, groups that straddle tiles and splits, with and without split-K;
the decode GEMV kernels (gemv.py, gemv_int4.py) the same way, int4's also against float64 at
float32 rounding, across activation magnitudes (its denormal weights) and in every tuner config.

Runs under Triton's interpreter on CPU in the default suite (small shapes, float32); on a GPU
(`pytest -m gpu`) in bf16 on larger shapes, tuned configs included, plus the quantized model
inside a CUDA graph.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", minversion=None if torch.cuda.is_available() else "3.9")

from engine.quantization import kernels  # noqa: E402
from engine.quantization.formats import dequantize, quantize  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
pytestmark = [pytest.mark.gpu] if CUDA else []

FORMATS = [("int8", True), ("fp8", True), ("int4", True), ("int4", False)]
Config = kernels.KernelConfig  # (block_n, block_k, split_k, block_m): block_m 0 is the tl.dot
# form, 1..8 the FMA (GEMV) form. Shapes (M, N, K, group): K odd or not a multiple of the
# group, N not a multiple of BLOCK_N, splits that end mid-group or past K.
CASES = [
    ((1, 40, 99, 32), Config(16, 32, 1, 1)),
    ((1, 40, 99, 32), Config(16, 32, 2)),
    ((3, 33, 130, 64), Config(16, 64, 2, 4)),
    ((17, 50, 66, 16), Config(16, 32, 3)),
    ((64, 24, 258, 128), Config(32, 64, 2)),
]
if CUDA:  # every shape with every config, and Llama-sized ones
    shapes = [(1, 40, 99, 32), (3, 33, 130, 64), (17, 50, 66, 16), (64, 24, 258, 128)]
    shapes += [(1, 4096 + 48, 4096 + 72, 128), (3, 1000, 3000, 128), (17, 6144, 4096, 128)]
    shapes += [(64, 2050, 1030, 64), (200, 512, 768, 128)]
    configs = [Config(16, 32, 1), Config(32, 64, 2), Config(64, 256, 4), Config(32, 128, 1, 1)]
    configs += [Config(32, 128, 3, 1), Config(16, 256, 2, 4)]
    CASES = [(shape, config) for shape in shapes for config in configs]


def check(x, qw, bias, config):
    """Relative error of the kernel against float32 math on the dequantized weight: float32
    inputs agree to rounding; bf16 rounds x and each dequantized int4 weight (~2^-9 each)."""
    expected = x.float() @ dequantize(qw).T + (0 if bias is None else bias.float())
    out = kernels.weight_only_matmul(x, qw, bias, config)
    assert out.dtype == x.dtype and out.shape == expected.shape
    err = float((out.float() - expected).norm() / expected.norm())
    assert err < (1e-5 if x.dtype == torch.float32 else 1e-2), err


def case_id(case):
    (m, n, k, group), c = case
    return f"m{m}n{n}k{k}g{group}-bm{c.block_m}bn{c.block_n}bk{c.block_k}s{c.split_k}"


@pytest.mark.parametrize("method,symmetric", FORMATS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_kernel_matches_dequantized_reference(method, symmetric, case):
    (m, n, k, group), config = case
    g = torch.Generator().manual_seed(m * 7919 + n * 31 + k)
    weight = (torch.randn(n, k, generator=g) * 0.02).to(DTYPE).to(DEVICE)
    x = torch.randn(m, k, generator=g).to(DTYPE).to(DEVICE)
    bias = torch.randn(n, generator=g).to(DTYPE).to(DEVICE) if n % 2 else None
    qw = quantize(weight, method, group, symmetric)
    check(x, qw, bias, config)


# The GEMV kernel (gemv.py) for decode rows: M = 1 and 3, N not a multiple of BLOCK_N, K not a
# multiple of BLOCK_K (and odd: int4's last byte half empty), groups of 16, 24 (not a power of
# two) and 32, tiles spanning several groups or part of one. (M, N, K, group), (block_n, block_k)
GEMV_CASES = [
    ((1, 40, 99, 32), (8, 64)),
    ((3, 33, 130, 24), (16, 32)),
    ((1, 17, 256, 16), (4, 128)),
    ((3, 8, 64, 32), (8, 64)),
]
if CUDA:  # the real tiles, Llama-sized shapes and ragged ones
    GEMV_CASES = [
        ((m, n, k, 128), (block_n, block_k))
        for m in (1, 3, 8)
        for n, k in ((4096 + 48, 4096 + 72), (1000, 3000), (6144, 4096), (33, 130))
        for block_n, block_k in ((4, 1024), (8, 512), (16, 256))
    ]


@pytest.mark.parametrize("method,symmetric", FORMATS)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize(
    "case", GEMV_CASES, ids=lambda c: "m{}n{}k{}g{}".format(*c[0]) + "-bn{}bk{}".format(*c[1])
)
def test_gemv_matches_dequantized_reference(method, symmetric, with_bias, case):
    (m, n, k, group), (block_n, block_k) = case
    g = torch.Generator().manual_seed(m * 7919 + n * 31 + k)
    weight = (torch.randn(n, k, generator=g) * 0.02).to(DTYPE).to(DEVICE)
    x = torch.randn(m, k, generator=g).to(DTYPE).to(DEVICE)
    bias = torch.randn(n, generator=g).to(DTYPE).to(DEVICE) if with_bias else None
    qw = quantize(weight, method, group, symmetric)
    check(x, qw, bias, kernels._gemv_config(block_n, block_k))


# The int4 GEMV (gemv_int4.py) beyond the shared cases: an unrolled K loop with a remainder and
# masks, 8 warps, groups longer than the tile (scale offsets per iteration) or not a power of two,
# N below BLOCK_N (shrunk; the last tile overlaps), 8 rows of x, rows not 4-byte aligned (K odd).
# (M, N, K, group), (block_n, block_k, num_warps, unroll)
INT4_GEMV_CASES = [
    ((8, 24, 72, 8), (8, 32, 4, 2)),
    ((2, 5, 512, 128), (16, 64, 4, 4)),
    ((1, 64, 1024, 64), (32, 256, 8, 2)),
    ((3, 20, 185, 40), (8, 64, 4, 2)),
]
if CUDA:  # Llama-sized, ragged, and the unroll factors the tuner offers
    INT4_GEMV_CASES += [
        ((m, n, k, 128), cfg)
        for m in (1, 8)
        for n, k in ((4096 + 48, 4096 + 72), (6144, 4096), (1000, 3000))
        for cfg in ((16, 512, 4, 4), (32, 1024, 8, 2))
    ]


def float64_error(x, qw, bias, config) -> float:
    """Relative error of the kernel against float64 math on the dequantized weight."""
    expected = x.double() @ dequantize(qw, torch.float64).T
    expected += 0 if bias is None else bias.double()
    out = kernels.weight_only_matmul(x, qw, bias, config)
    assert out.dtype == x.dtype and out.shape == expected.shape
    return float((out.double() - expected).norm() / expected.norm())


# float32: a few roundings of ~sum |x| each (gemv_int4.py's bound); bf16: the output's rounding
TIGHT = 1e-2 if CUDA else 4e-6


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize(
    "case",
    INT4_GEMV_CASES,
    ids=lambda c: "m{}n{}k{}g{}".format(*c[0]) + "-bn{}bk{}w{}u{}".format(*c[1]),
)
def test_int4_gemv_matches_float64_reference(symmetric, case):
    (m, n, k, group), (block_n, block_k, num_warps, unroll) = case
    g = torch.Generator().manual_seed(m * 7919 + n * 31 + k)
    weight = (torch.randn(n, k, generator=g) * 0.02).to(DTYPE).to(DEVICE)
    x = torch.randn(m, k, generator=g).to(DTYPE).to(DEVICE)
    bias = torch.randn(n, generator=g).to(DTYPE).to(DEVICE)
    qw = quantize(weight, "int4", group, symmetric)
    config = kernels._gemv_config(block_n, block_k, num_warps, unroll)
    assert float64_error(x, qw, bias, config) < TIGHT


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("exponent", [40, -60])
def test_int4_gemv_keeps_precision_across_activation_magnitudes(symmetric, exponent):
    """The int4 GEMV multiplies x by up to 2^85 and forms weights as denormal floats
    (gemv_int4.py): activations from 2^-60 to 2^40 keep full precision (a kernel whose denormals
    were flushed to zero would lose every weight)."""
    g = torch.Generator().manual_seed(11)
    weight = (torch.randn(24, 256, generator=g) * 0.02).to(DTYPE).to(DEVICE)
    x = (torch.randn(2, 256, generator=g) * 2.0**exponent).to(DTYPE).to(DEVICE)
    qw = quantize(weight, "int4", 64, symmetric)
    assert float64_error(x, qw, None, kernels._gemv_config(8, 128, 4, 2)) < TIGHT


@pytest.mark.skipif(not CUDA, reason="compiles every candidate: GPU only")
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_every_int4_gemv_candidate_on_gpu(symmetric):
    """Each config the tuner may pick computes the right result (K with a masked tail)."""
    g = torch.Generator().manual_seed(13)
    weight = (torch.randn(2048 + 40, 4096 + 72, generator=g) * 0.02).to(DTYPE).to(DEVICE)
    x = torch.randn(3, 4096 + 72, generator=g).to(DTYPE).to(DEVICE)
    qw = quantize(weight, "int4", 128, symmetric)
    for config in kernels._gemv_candidates("int4"):
        assert float64_error(x, qw, None, config) < TIGHT, config


def test_gemv_candidates_are_tuned_for_decode_rows_only():
    """The tuner offers the GEMV up to MAX_GEMV_ROWS rows, and not for int4 groups it cannot
    split into 8-column chunks."""
    for rows in (1, 4, kernels.MAX_GEMV_ROWS):
        assert any(c.gemv for c in kernels._candidates(rows, 4096, 4096, "int8", 0))
        assert any(c.gemv for c in kernels._candidates(rows, 4096, 4096, "int4", 128))
    assert not any(c.gemv for c in kernels._candidates(16, 4096, 4096, "int8", 0))
    assert not any(c.gemv for c in kernels._candidates(1, 4096, 4096, "int4", 12))
    assert kernels._heuristic(1, 4096, 4096, "int4", 128).gemv
    assert not kernels._heuristic(1, 4096, 4096, "int4", 12).gemv


@pytest.mark.parametrize("method,symmetric", FORMATS)
def test_expert_slice_of_a_stack(method, symmetric):
    """MoE experts are views [e] of a stacked quantized tensor: strides must be honoured."""
    g = torch.Generator().manual_seed(5)
    stack = (torch.randn(3, 40, 96, generator=g) * 0.02).to(DTYPE).to(DEVICE)
    qs = quantize(stack, method, 32, symmetric)
    x = torch.randn(5, 96, generator=g).to(DTYPE).to(DEVICE)
    expert = type(qs)(
        qs.method,
        qs.qweight[1],
        qs.scales[1],
        None if qs.zeros is None else qs.zeros[1],
        qs.in_features,
        qs.group_size,
    )
    check(x, expert, None, Config(16, 32, 2))
    check(x[:2], expert, None, kernels._gemv_config(8, 32))


@pytest.mark.skipif(not CUDA, reason="tuning and graphs need a GPU")
@pytest.mark.parametrize("method", ["int8", "int4", "fp8"])
def test_tuned_kernel_inside_a_cuda_graph(method):
    """The tuned path (first call measures candidates) and a graph replay of it agree with the
    reference; replaying on new inputs gives their result (no stale buffers)."""
    g = torch.Generator().manual_seed(9)
    weight = (torch.randn(6144, 4096, generator=g) * 0.02).to(DTYPE).to(DEVICE)
    qw = quantize(weight, method, 128, True)
    x = torch.randn(1, 4096, generator=g).to(DTYPE).to(DEVICE)
    check(x, qw, None, None)  # tunes
    static_x = x.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = kernels.weight_only_matmul(static_x, qw)
    new_x = torch.randn(1, 4096, generator=g).to(DTYPE).to(DEVICE)
    static_x.copy_(new_x)
    graph.replay()
    expected = new_x.float() @ dequantize(qw).T
    assert float((static_out.float() - expected).norm() / expected.norm()) < 1e-2


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
@pytest.mark.parametrize("method", ["int8", "int4", "fp8"])
def test_quantized_model_on_gpu_matches_cpu(model_dir, method):
    """The whole quantized model on CUDA (fused q/k/v and gate/up, Triton kernels, decode CUDA
    graphs) against the same quantized model on CPU (dequantize + matmul), float32 both."""
    from engine import LLM
    from tests.test_kv_quant import GREEDY, accuracy_prompts, run_with_logits

    prompts = accuracy_prompts(16)
    args = dict(dtype="float32", num_blocks=512, quantization=method)
    gpu_out, gpu_logits = run_with_logits(LLM(model_dir, **args), prompts, GREEDY)
    cpu_out, cpu_logits = run_with_logits(LLM(model_dir, device="cpu", **args), prompts, GREEDY)
    rel = [float((a.cpu() - b).norm() / b.norm()) for a, b in zip(gpu_logits, cpu_logits)]
    assert max(rel) < 1e-3, rel
    same = sum(a.token_ids == b.token_ids for a, b in zip(gpu_out, cpu_out))
    assert same >= 0.9 * len(prompts)
