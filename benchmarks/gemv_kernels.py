"""Quantized linear kernels at decode sizes on one GPU, against bf16 and the HBM copy rate.

Each Llama-3-8B linear at M = 1 (or `--rows`): bf16 `F.linear` against int8 / fp8 / int4
(group 128, symmetric) through the GEMV kernel (gemv.py) and through the tl.dot kernel
(kernels.py), in one run, with the HBM copy bandwidth measured beside them.

Timing: GPU time per call, from CUDA graph replays (no launch overhead) of calls that cycle
through enough copies of the weight (>= 256 MB in all) that no call finds its weight in L2, as
in a decode step, where every layer reads weights the previous layers evicted. GB/s counts the
weight bytes a call reads (quantized values, scales, zero points).

For each shape and format every candidate config the tuner knows is timed (a config that fails
to compile or run, or gives a wrong result, is reported and skipped); printed: the best GEMV
config, the best tl.dot config, and what `kernels._tuned` picks (the engine's choice, timed the
same way). `--sweep` prints every config. Last, a projected decode step (32 layers of the four
linears + the bf16 output head; no attention, norms or sampling) per format against bf16.

`--sass` needs no GPU: it compiles each GEMV candidate for sm_90 on this machine and counts the
SASS instructions of its K loop per weight (how close a config is to the issue limit: an H100
SM issues 128 thread-instructions a cycle and HBM brings it ~27 int4 weights a cycle).

    PYTHONPATH=. python -m benchmarks.gemv_kernels [--sweep] [--json gemv.json]
    PYTHONPATH=. python -m benchmarks.gemv_kernels --sass [--formats int4]
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import re
import subprocess
import tempfile
import traceback

import torch
import torch.nn.functional as F

from benchmarks.gpu_common import copy_bandwidth, describe_run, replay_ms
from engine.quantization import kernels
from engine.quantization.formats import QuantizedWeight, dequantize, quantize

# name: (in_features K, out_features N), Llama-3-8B with q/k/v and gate/up fused as the model runs.
SHAPES = {
    "qkv": (4096, 6144),
    "o": (4096, 4096),
    "gate_up": (4096, 28672),
    "down": (14336, 4096),
}
LM_HEAD = (4096, 128256)  # not quantized (engine/quantization/linear.py): bf16 in every format
NUM_LAYERS = 32
FORMATS = ("int8", "fp8", "int4")
ROTATE_BYTES = 256 << 20  # weight copies per timed graph: at least this much, > 2x the H100's L2


def weight_bytes(qw: QuantizedWeight) -> int:
    tensors = [qw.qweight, qw.scales] + ([qw.zeros] if qw.zeros is not None else [])
    return sum(t.numel() * t.element_size() for t in tensors)


def copies(make, num_bytes: int) -> list:
    """Enough independent copies (made by `make`) to cycle through ROTATE_BYTES."""
    return [make() for _ in range(max(2, math.ceil(ROTATE_BYTES / num_bytes)))]


def time_per_call(calls: list, reps: int) -> float:
    """Microseconds of GPU time per call: a CUDA graph of all `calls` (one per weight copy),
    replayed `reps` times between two events."""
    for call in calls:  # compiles, tunes nothing (configs are pinned), allocates
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return replay_ms(graph, reps) * 1e3 / len(calls)


def rel_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    return float((out.float() - expected).norm() / expected.norm())


def bench_bf16(k: int, n: int, rows: int, reps: int) -> dict:
    weights = copies(
        lambda: torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02, n * k * 2
    )
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    us = time_per_call([lambda w=w: F.linear(x, w) for w in weights], reps)
    return {"us": us, "bytes": n * k * 2}


def bench_format(method: str, k: int, n: int, rows: int, reps: int) -> list[dict]:
    """One row per candidate config (and the tuner's pick): us per call, GB/s, error, or the
    error message of a config that failed."""
    weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    qw = quantize(weight, method, 128, True)
    del weight
    num_bytes = weight_bytes(qw)

    def clone() -> QuantizedWeight:
        zeros = None if qw.zeros is None else qw.zeros.clone()
        return QuantizedWeight(
            qw.method, qw.qweight.clone(), qw.scales.clone(), zeros, qw.in_features, qw.group_size
        )

    weights = [qw] + copies(clone, num_bytes)[1:]
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    expected = x.float() @ dequantize(qw).T
    bucket = 1 << (rows - 1).bit_length()
    configs = [("candidate", c) for c in kernels._candidates(bucket, n, k, method, 128)]
    configs.append(("tuner", kernels._tuned(x, qw, None)))  # the engine's pick (tunes now)
    results = []
    for role, cfg in configs:
        row = {"role": role, "config": describe(cfg), "gemv": cfg.gemv, "bytes": num_bytes}
        try:
            err = rel_error(kernels.weight_only_matmul(x, qw, None, cfg), expected)
            row["rel_err"] = err
            if not err < 1e-2:
                raise ValueError(f"wrong result: relative error {err:.3g}")
            calls = [lambda w=w, c=cfg: kernels.weight_only_matmul(x, w, None, c) for w in weights]
            row["us"] = time_per_call(calls, reps)
        except Exception as exc:  # a config that fails to compile / run: report, keep going
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            row["traceback"] = traceback.format_exc(limit=3)
            torch.cuda.synchronize()  # raises again if the CUDA context is gone: nothing to save
        results.append(row)
    return results


def describe(cfg: kernels.KernelConfig) -> str:
    if cfg.gemv:
        return f"gemv bn{cfg.block_n} bk{cfg.block_k} w{cfg.num_warps} u{cfg.unroll}"
    return (
        f"dot bm{cfg.block_m} bn{cfg.block_n} bk{cfg.block_k} split{cfg.split_k} "
        f"w{cfg.num_warps} s{cfg.num_stages}"
    )


def line(name: str, label: str, row: dict, copy_gbps: float, bf16_us: float) -> str:
    if "error" in row:
        return f"{name:8s} {label:34s} FAILED {row['error'][:120]}"
    gbps = row["bytes"] / row["us"] / 1e3
    return (
        f"{name:8s} {label:34s} {row['us']:8.2f} us  {gbps:7.0f} GB/s  "
        f"{100 * gbps / copy_gbps:3.0f}% of copy  {bf16_us / row['us']:5.2f}x bf16"
    )


def best(rows: list[dict], gemv: bool) -> dict | None:
    timed = [r for r in rows if r["role"] == "candidate" and r["gemv"] == gemv and "us" in r]
    return min(timed, key=lambda r: r["us"]) if timed else None


def sass_loop(method: str, cfg: kernels.KernelConfig, k: int) -> tuple[int, collections.Counter]:
    """(instructions, opcode counts) of the main K loop of `cfg`'s GEMV for `method` on a
    [*, k] bf16 weight, compiled for sm_90 here (Triton's ptxas and cuobjdump, no GPU)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from engine.quantization import gemv as gemv_mod
    from engine.quantization import gemv_int4

    w_type = {"int8": "*i8", "fp8": "*u8", "int4": "*u8"}[method]
    s_type = "*bf16" if method == "int4" else "*fp32"
    types = dict(x="*bf16", qweight=w_type, scales=s_type, zeros="*u8", bias="*bf16", out="*bf16")
    values = dict(HAS_ZEROS=False, HAS_BIAS=False, EVEN_K=True, BLOCK_N=cfg.block_n,
                  BLOCK_K=cfg.block_k)  # fmt: skip
    if method == "int4":
        fn = gemv_int4.int4_gemv_kernel
        values.update(STRIDE_W=k // 2, STRIDE_S=k // 128, GROUP_SIZE=128, UNROLL=cfg.unroll)
    else:
        fn = gemv_mod.gemv_kernel
        values.update(GROUP_SIZE=8, METHOD=gemv_mod.METHOD_CODE[method])
    names = list(fn.arg_names)
    signature = {n: "constexpr" if n in values else types.get(n, "i32") for n in names}
    constexprs = {(names.index(n),): v for n, v in values.items()}
    # Pointers and strides 16-divisible, as Triton specializes them at run time.
    aligned = [n for n in names if n in types or n.startswith("stride") or n == "K"]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    compiled = triton.compile(
        ASTSource(fn, signature, constexprs, attrs),
        target=GPUTarget("cuda", 90, 32),
        options=dict(num_warps=cfg.num_warps, num_stages=1),
    )
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        listing = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True)
    code = []  # (address, opcode, operands)
    for text in listing.stdout.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)(.*);", text)
        if m:
            code.append((int(m.group(1), 16), m.group(2).split(".")[0], m.group(3)))
    loops = []  # (start, end) of each backward branch
    for addr, op, rest in code:
        target = re.search(r"0x([0-9a-f]+)", rest)
        if op == "BRA" and target and int(target.group(1), 16) < addr:
            loops.append((int(target.group(1), 16), addr))
    start, end = max(loops, key=lambda span: span[1] - span[0])
    ops = collections.Counter(op for addr, op, _ in code if start <= addr <= end)
    return sum(ops.values()), ops


def print_sass(formats: list[str]) -> None:
    k = SHAPES["gate_up"][0]
    for method in formats:
        for cfg in kernels._gemv_candidates(method):
            count, ops = sass_loop(method, cfg, k)
            weights = cfg.block_n * cfg.block_k * cfg.unroll // (32 * cfg.num_warps)
            top = " ".join(f"{op} {n}" for op, n in ops.most_common(6))
            print(f"{method} {describe(cfg):28s} {count / weights:5.2f} instructions/weight  {top}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sweep", action="store_true", help="print every candidate config's time")
    p.add_argument("--rows", type=int, default=1, help="rows of x (decode batch)")
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--reps", type=int, default=50, help="graph replays per timing")
    p.add_argument("--json", default=None)
    p.add_argument("--sass", action="store_true", help="count SASS per weight (no GPU needed)")
    args = p.parse_args()
    if args.sass:
        return print_sass(args.formats.split(","))
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    torch.manual_seed(0)
    copy_gbps = copy_bandwidth() / 1e9
    print(describe_run())
    print(f"HBM copy bandwidth {copy_gbps:.0f} GB/s (read + write); rows of x: {args.rows}\n")
    report = {"run": describe_run(), "copy_GBps": copy_gbps, "rows": args.rows, "shapes": {}}
    step_us = {"bf16": 0.0}
    for name in args.shapes.split(","):
        k, n = SHAPES[name]
        bf16 = bench_bf16(k, n, args.rows, args.reps)
        bf16["gbps"] = bf16["bytes"] / bf16["us"] / 1e3
        step_us["bf16"] += NUM_LAYERS * bf16["us"]
        entry = report["shapes"][name] = {"K": k, "N": n, "bf16": bf16, "formats": {}}
        print(f"--- {name}: K {k} -> N {n}")
        print(line(name, "bf16 F.linear", {**bf16}, copy_gbps, bf16["us"]))
        for method in args.formats.split(","):
            rows = bench_format(method, k, n, args.rows, args.reps)
            entry["formats"][method] = rows
            picks = [("gemv best", best(rows, True)), ("tl.dot best", best(rows, False))]
            picks.append(("tuner", next(r for r in rows if r["role"] == "tuner")))
            for label, row in picks:
                if row is not None:
                    print(
                        line(name, f"{method} {label}: {row['config']}", row, copy_gbps, bf16["us"])
                    )
            tuner = picks[-1][1]
            if "us" in tuner:
                step_us[method] = step_us.get(method, 0.0) + NUM_LAYERS * tuner["us"]
            if args.sweep:
                for row in sorted(rows, key=lambda r: r.get("us", math.inf)):
                    print(
                        "    " + line(name, f"{method} {row['config']}", row, copy_gbps, bf16["us"])
                    )
            failed = [r for r in rows if "error" in r]
            if failed:
                print(f"    {len(failed)} of {len(rows)} {method} configs failed; first:")
                print("    " + failed[0]["traceback"].replace("\n", "\n    "))
        print()
    if set(args.shapes.split(",")) != set(SHAPES):
        return _write(args.json, report)
    head = bench_bf16(*LM_HEAD, args.rows, args.reps)["us"]
    print(f"lm_head (bf16 in every format) {head:.1f} us")
    print(f"Projected step ({NUM_LAYERS} layers x the linears above, tuner's picks, + lm_head):")
    for fmt, us in step_us.items():
        total = us + head
        print(f"  {fmt:5s} {total / 1e3:7.3f} ms  {(step_us['bf16'] + head) / total:5.2f}x bf16")
    report["lm_head_us"] = head
    report["projected_step_us"] = {fmt: us + head for fmt, us in step_us.items()}
    _write(args.json, report)


def _write(path: str | None, report: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
