"""Prefill attention over a cached prefix, one layer on one GPU: `paged_prefill` (the Triton
kernel reading pages in place) against gather + SDPA (engine/attention/gathered_prefill.py), with
flash SDPA on a fresh prompt of the same total length for reference.

Llama-3-8B's attention (32 heads, 8 KV heads, head_dim 128, bf16), block size 16, every
sequence's pages scattered over the pool. For each chunk length x cached prefix x batch (that
many sequences, each a chunk over its own prefix) it times one layer's call of:

    paged      triton_kernels.paged_prefill, the tiles as the backend builds them (64 score
               rows, 4 warps); `--paged-variants` adds other tile shapes, e.g. 128x8 (rows x
               warps) or 128x8x2 (x pipeline stages), as columns
    varlen     gather + one varlen flash call (the backend's default on CUDA)
    per-seq    gather + one SDPA call per chunk (causal_lower_right)
    gather     the gather alone (K and V), the copy both SDPA paths pay
    fresh      F.scaled_dot_product_attention(is_causal=True) over prompts of prefix + chunk tokens

each as a CUDA graph replayed many times (GPU time per call), and reports ms and TFLOP/s
(4 * heads * head_dim FLOPs per attended (query, key) pair). Correctness: at batch 2 every path's
output against a float32 reference (the torch backend), and gathered against paged. The SDPA
kernels each path dispatches to are listed once (torch.profiler).

    python benchmarks/prefill_attention.py [--quick] [--kv-cache-dtype fp8] [--out results.jsonl]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_common import describe_run, replay_ms  # noqa: E402
from engine.attention import triton_kernels as tk  # noqa: E402
from engine.attention.backend import AttentionMetadata, AttentionSpec  # noqa: E402
from engine.attention.gathered_prefill import (  # noqa: E402
    gather_chunks,
    gathered_attention,
    read_slots,
)
from engine.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from engine.attention.triton_backend import paged_chunks  # noqa: E402
from engine.kv_cache import quant  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
CHUNKS = [256, 512, 1024, 2048]
PREFIXES = [0, 1024, 3072, 6144]
BATCHES = [1, 2, 4]


def make_cache(num_blocks: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    """A layer's cache of random K/V (8-bit: quantized), [2, num_blocks, 16, 8, row]."""
    values = torch.randn(
        (2, num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM), generator=gen, device="cuda"
    ).to(torch.bfloat16)
    if not quant.is_quantized(kind):
        return values
    row = quant.cache_row_size(kind, HEAD_DIM)
    dtype = quant.cache_dtype(kind, torch.bfloat16)
    cache = torch.zeros((2, num_blocks, BLOCK_SIZE, KV_HEADS, row), dtype=dtype, device="cuda")
    slots = torch.arange(num_blocks * BLOCK_SIZE, device="cuda")
    for half in range(2):
        quant.write(cache[half], slots, values[half].view(-1, KV_HEADS, HEAD_DIM), kind)
    return cache


def make_meta(chunk: int, prefix: int, batch: int, num_blocks: int, gen) -> AttentionMetadata:
    """`batch` chunks of `chunk` tokens, each over `prefix` cached ones, pages scattered."""
    blocks_per_seq = -(-(prefix + chunk) // BLOCK_SIZE)
    perm = torch.randperm(num_blocks, generator=gen, device="cuda")[: batch * blocks_per_seq]
    tables = perm.view(batch, blocks_per_seq)
    pos = torch.arange(prefix, prefix + chunk, device="cuda")
    slots = (tables[:, pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE).flatten()
    return AttentionMetadata(
        slot_mapping=slots,
        query_start_loc=[i * chunk for i in range(batch + 1)],
        seq_lens=[prefix + chunk] * batch,
        block_tables=tables,
        block_size=BLOCK_SIZE,
    )


def time_call(fn, min_seconds: float = 0.2) -> float:
    """GPU ms of one call of `fn`: a CUDA graph of it replayed enough times (eager timing with
    events if capture fails)."""
    fn()  # compile, allocate
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    reps = max(5, min(500, int(min_seconds / max(time.perf_counter() - start, 1e-5))))
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return replay_ms(graph, reps)
    except RuntimeError as e:  # pragma: no cover - reported, then timed eagerly
        print(f"  (graph capture failed: {str(e).splitlines()[0][:100]}; timing eagerly)")
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / reps


def kernels_of(fn) -> list[str]:
    """Names of the CUDA kernels one call of `fn` launches, longest first."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    events.sort(key=lambda e: -e.device_time_total)
    return [f"{e.key[:90]} ({e.device_time_total / 1e3:.3f} ms)" for e in events[:4]]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


class Case:
    """One (chunk, prefix, batch): its inputs and the calls each path makes."""

    def __init__(self, chunk, prefix, batch, cache, kind, gen):
        self.chunk, self.prefix, self.batch, self.cache, self.kind = (
            chunk, prefix, batch, cache, kind,
        )  # fmt: skip
        self.meta = make_meta(chunk, prefix, batch, cache.shape[1], gen)
        self.query = torch.randn((batch * chunk, HEADS, HEAD_DIM), generator=gen, device="cuda").to(
            torch.bfloat16
        )
        self.out = torch.empty_like(self.query)
        seqs = list(range(batch))
        self.tiles = {
            block_m: paged_chunks(self.meta, seqs, tk.prefill_block_q(HEADS, KV_HEADS, block_m))
            for block_m in (16, 32, 64, 128, 256)
        }
        self.gathered = gather_chunks(self.meta, seqs)
        total = prefix + chunk
        self.fresh_q = torch.randn(
            (batch, HEADS, total, HEAD_DIM), generator=gen, device="cuda"
        ).to(torch.bfloat16)
        self.fresh_kv = torch.randn(
            (2, batch, KV_HEADS, total, HEAD_DIM), generator=gen, device="cuda"
        ).to(torch.bfloat16)

    def paged(self, block_m=tk.PREFILL_BLOCK_M, num_warps=4, num_stages=None):
        t = self.tiles[block_m]
        tk.paged_prefill(
            self.query, self.cache, self.meta.block_tables, self.out, HEAD_DIM**-0.5,
            t.tile_seq, t.tile_start, t.q_start, t.q_lens, t.seq_lens, t.table_row, None,
            block_m, num_warps, num_stages,
        )  # fmt: skip
        return self.out

    def sdpa(self, varlen: bool):
        gathered_attention(
            self.query, self.cache, self.gathered, self.out, HEAD_DIM**-0.5, self.kind, varlen
        )
        return self.out

    def gather(self):
        for half in self.cache:
            read_slots(half, self.gathered.slots, self.kind, torch.bfloat16)

    def fresh(self):
        k, v = self.fresh_kv
        return F.scaled_dot_product_attention(
            self.fresh_q, k, v, is_causal=True, scale=HEAD_DIM**-0.5, enable_gqa=True
        )

    def reference(self) -> torch.Tensor:
        """float32 attention of the same chunks over the same (dequantized) cache."""
        spec = AttentionSpec(HEADS, KV_HEADS, HEAD_DIM, HEAD_DIM**-0.5, kv_cache_dtype=self.kind)
        backend = TorchAttentionBackend(spec)
        meta = AttentionMetadata(**{**self.meta.__dict__, "backend_data": None})
        backend.prepare(meta)
        cache = self.cache if quant.is_quantized(self.kind) else self.cache.float()
        # key None: nothing to write (the cache holds every context already), as a CLA layer.
        return backend.forward(self.query.float(), None, None, cache, meta)


def tflops(pairs: int, ms: float) -> float:
    return 4 * HEADS * HEAD_DIM * pairs / (ms * 1e-3) / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="chunks 512, 2048; batch 1, 4")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "int8"])
    parser.add_argument("--out", help="also write one JSON line per case here")
    parser.add_argument(
        "--paged-variants",
        default="",
        help="comma-separated paged_prefill tile shapes ROWSxWARPS[xSTAGES], e.g. 128x8,128x4",
    )
    args = parser.parse_args()
    print("command: python " + " ".join(sys.argv))
    print(describe_run())
    chunks, batches = ([512, 2048], [1, 4]) if args.quick else (CHUNKS, BATCHES)
    gen = torch.Generator(device="cuda").manual_seed(0)
    num_blocks = 2 * max(batches) * -(-(max(PREFIXES) + max(chunks)) // BLOCK_SIZE)
    cache = make_cache(num_blocks, args.kv_cache_dtype, gen)

    probe = Case(1024, 3072, 2, cache, args.kv_cache_dtype, gen)
    print("\nkernels (chunk 1024 over 3072, batch 2):")
    for name, fn in [
        ("paged", probe.paged),
        ("varlen", functools.partial(probe.sdpa, True)),
        ("per-seq", functools.partial(probe.sdpa, False)),
        ("fresh", probe.fresh),
    ]:
        print(f"  {name}: " + "; ".join(kernels_of(fn)))
    del probe

    variants = [tuple(int(x) for x in v.split("x")) for v in args.paged_variants.split(",") if v]
    header = (
        f"\n{'chunk':>5} {'prefix':>6} {'batch':>5} | {'paged ms':>8} {'TF/s':>5} | "
        f"{'varlen':>8} {'TF/s':>5} | {'per-seq':>8} {'TF/s':>5} | {'gather':>7} | "
        f"{'fresh':>8} {'TF/s':>5} | {'paged/varlen':>12} | "
        "err vs f32: paged varlen per-seq (variants)"
    )
    if variants:
        header += " | " + " ".join(f"{'x'.join(map(str, v)):>9} ms TF/s" for v in variants)
    print(header)
    rows = []
    for chunk in chunks:
        for prefix in PREFIXES:
            for batch in batches:
                case = Case(chunk, prefix, batch, cache, args.kv_cache_dtype, gen)
                ms = {
                    "paged": time_call(case.paged),
                    "varlen": time_call(lambda c=case: c.sdpa(True)),
                    "per_seq": time_call(lambda c=case: c.sdpa(False)),
                    "gather": time_call(case.gather),
                    "fresh": time_call(case.fresh),
                }
                pairs = batch * (chunk * prefix + chunk * (chunk + 1) // 2)
                for v in variants:
                    ms["paged_" + "x".join(map(str, v))] = time_call(
                        functools.partial(case.paged, *v)
                    )
                extra = "".join(
                    f" | {ms[k]:>8.3f} {tflops(pairs, ms[k]):>5.0f}"
                    for k in ms
                    if k.startswith("paged_")
                )
                total = prefix + chunk
                fresh_pairs = batch * total * (total + 1) // 2
                errs = ""
                if batch == 2 or args.quick:
                    ref = case.reference()
                    e = [rel_err(case.paged(), ref), rel_err(case.sdpa(True), ref)]
                    e.append(rel_err(case.sdpa(False), ref))
                    e += [rel_err(case.paged(*v), ref) for v in variants]
                    errs = " ".join(f"{x:.1e}" for x in e)
                print(
                    f"{chunk:>5} {prefix:>6} {batch:>5} | {ms['paged']:>8.3f} "
                    f"{tflops(pairs, ms['paged']):>5.0f} | {ms['varlen']:>8.3f} "
                    f"{tflops(pairs, ms['varlen']):>5.0f} | {ms['per_seq']:>8.3f} "
                    f"{tflops(pairs, ms['per_seq']):>5.0f} | {ms['gather']:>7.3f} | "
                    f"{ms['fresh']:>8.3f} {tflops(fresh_pairs, ms['fresh']):>5.0f} | "
                    f"{ms['paged'] / ms['varlen']:>12.2f} | {errs:<23}{extra}",
                    flush=True,
                )
                shape = {"chunk": chunk, "prefix": prefix, "batch": batch, "pairs": pairs}
                rows.append({**shape, "ms": ms, "errors": errs})
                del case
    if args.out:
        Path(args.out).write_text("".join(json.dumps(row) + "\n" for row in rows))


if __name__ == "__main__":
    main()
