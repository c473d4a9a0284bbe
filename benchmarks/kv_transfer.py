"""KV handoff between a prefill and a decode process: bandwidth and the TTFT it adds.

Two processes (prefill on cuda:0, decode on cuda:1, NCCL; or both on CPU with gloo) hold a
Llama-3-8B-shaped paged KV cache (32 layers, 8 KV heads, head_dim 128, bf16: 128 KiB per token,
block size 16). For each prompt length, in one run:

  raw      one contiguous buffer of the transfer's total size, one send/recv on a size-2 group
           (also on the first agent pair's own communicator, to check that the raw column's
           communicator carries what the agent's does: it did, 1.00-1.01, 2026-11-27),
           once per backend (--backends: on CUDA `nccl`, NCCL's C API, and `torch-nccl`,
           ProcessGroupNCCL, interleaved in one run; `nccl:host` is `nccl` with the receiver
           thread launching each scatter once its message arrived, instead of queueing it on
           the GPU behind the receive: kvtransfer.scatter)
  agent    KVTransferAgent: start_send, send_layer x32, finish_send, until the receiver's poll()
           says DONE; scattered random block ids on both sides; one agent pair per backend and
           --min-message-bytes setting; reported as GB/s and as a ratio to the best raw send
           of the run at that size (whichever backend's was faster). Three ways:
           the header on the clock; sent ahead (the clock starts at the first send_layer);
           sent ahead with the decode side's main thread polling the agent for DONE every 20
           us, as raw's receiving thread polls its recv, instead of waking on the agent's
           condition variable (a thread handoff: 40-130 us on the H200 hosts, no part of the
           transfer; until 2026-11-27 it polled with sleep(0): see `receive`)
  ttft     a simulated prefill, 32 layer steps of one matmul each (2*8e9*tokens FLOPs in all,
           an 8B model's linear layers), without sends, then with send_layer after each layer:
           the compute slowdown, and the tail after the last layer until the receiver's DONE
           ("handoff") and until the sender's finish_send returns ("sent": when a prefill
           worker's call returns, and the router streams token 1)

Times cross processes through time.perf_counter (CLOCK_MONOTONIC: one clock per host); each
number is the median of --repeats runs after a warm-up.

    python -m benchmarks.kv_transfer                       # 2 GPUs
    python -m benchmarks.kv_transfer --device cpu          # smoke test: gloo, small shapes
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import zlib

import torch

from kvtransfer import KVTransferAgent, TransferState, nccl, scatter
from kvtransfer.pair import abort_group, new_group, precise_sleeps, wait_work
from kvtransfer.store import connect_store, start_store

GPU_SHAPE = dict(layers=32, kv_heads=8, head_dim=128, block_size=16, dtype="bfloat16")
CPU_SHAPE = dict(layers=32, kv_heads=2, head_dim=32, block_size=16, dtype="float32")
# The simulated layer: x[tokens, hidden] @ w[hidden, width]; 2*hidden*width = 2 * 8e9 / 32.
GPU_MATMUL, CPU_MATMUL = (4096, 61440), (256, 512)
# Header-ahead runs: start_send this long before the first layer (a prefill's first layer alone
# takes longer: ~1.5 ms for 2048 tokens of an 8B model on an H100).
AHEAD_S = 2e-3
# Polled runs: the decode side's main thread polls the agent this often.
POLL_S = 20e-6


def parse_bytes(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def label(num_bytes: int) -> str:
    for unit, size in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if num_bytes >= size and num_bytes % size == 0:
            return f"{num_bytes // size}{unit}"
    return str(num_bytes)


class Clock:
    """Cross-process timing of one event pair: the sender starts, the receiver stamps the end."""

    def __init__(self, store, name: str):
        self.store, self.name = store, name

    def ready(self, key: str) -> None:  # receiver: posted / expecting
        self.store.set(f"{self.name}/{key}/ready", "1")

    def wait_ready(self, key: str) -> None:  # sender
        self.store.wait([f"{self.name}/{key}/ready"])

    def stamp(self, key: str) -> None:  # receiver: the end
        self.store.set(f"{self.name}/{key}/end", repr(time.perf_counter()))

    def end(self, key: str) -> float:  # sender
        return float(self.store.get(f"{self.name}/{key}/end"))


# Set by --profile: a marker kernel at the sender's clock start and at the receiver's DONE, so
# the device-only trace (no CPU ops: the profiler's host overhead skews a transfer's host work)
# shows where each end's clock falls against the NCCL kernels.
MARK_EVENTS = False


def mark(device: torch.device) -> None:
    if MARK_EVENTS and device.type == "cuda":
        torch.cuda._sleep(1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sync_compute(device: torch.device) -> None:
    """Wait for the compute stream only: the first token needs the last layer, not the sends
    still running on NCCL's stream."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def make_caches(args, num_blocks: int, device: torch.device, seed: int) -> list[torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (2, num_blocks, args.block_size, args.kv_heads, args.head_dim)
    dtype = getattr(torch, args.dtype)
    # One allocation, as the model runner makes it: the agent copies all layers in one kernel.
    stacked = torch.randn((args.layers, *shape), generator=g, device=device, dtype=dtype)
    return list(stacked.unbind(0))


def block_ids(num_blocks: int, count: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(num_blocks, generator=g)[:count].tolist()


def worker(role: str, args, port: int, out) -> None:
    try:
        out.put((role, run_worker(role, args, port)))
    except BaseException as e:  # noqa: BLE001 - reported by the parent
        import traceback

        out.put((role, {"error": f"{e!r}\n{traceback.format_exc()}"}))


def busy_python(share: float, period_s: float = 4e-3) -> None:
    """A decode engine's host work, as far as the GIL sees it: pure Python for `share` of each
    period, then a wait that releases the GIL (a step waiting on the GPU). Runs until exit."""

    def run() -> None:
        while True:
            end = time.perf_counter() + share * period_s
            while time.perf_counter() < end:
                pass
            time.sleep((1 - share) * period_s)

    threading.Thread(target=run, name="busy-decode-loop", daemon=True).start()


def run_worker(role: str, args, port: int) -> dict:
    rank = 0 if role == "prefill" else 1
    if role == "decode" and args.receiver_busy > 0:
        busy_python(args.receiver_busy)
    if args.device == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
    store = connect_store("127.0.0.1", port, 600)
    clock = Clock(store, "bench")
    max_blocks = max(args.tokens) // args.block_size
    num_blocks = 2 * max_blocks + 7  # room for scattered ids
    caches = make_caches(args, num_blocks, device, seed=rank)
    # Per backend: its raw group and one agent pair per coalescing setting, all on the caches.
    agents, raws = {}, {}
    for entry in args.backends:
        backend, _, variant = entry.partition(":")
        for m in args.min_message_bytes:
            tag = f"{backend}-{variant or 'ahead'}-{label(m)}"
            me, peer = (f"p-{tag}", f"d-{tag}")[:: 1 if role == "prefill" else -1]
            agent = KVTransferAgent(
                me, caches, "127.0.0.1", port, backend, 60,
                min_message_bytes=m, role=role, scatter_ahead=variant != "host",
            )  # fmt: skip
            agent.connect(peer)
            agents[entry, m] = (agent, peer)
        client = connect_store("127.0.0.1", port, 60)
        raw = new_group(client, f"bench/raw/{entry}", rank, backend, 60)
        probe = torch.ones(1, device=device)  # NCCL builds its communicator on the first op
        wait_work(raw.send([probe], 1, 0) if rank == 0 else raw.recv([probe], 0, 0), backend, 60)
        raws[entry] = raw
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    first_m = args.min_message_bytes[0]
    info["scatter_ahead"] = {e: agents[e, first_m][0]._guard is not None for e in args.backends}
    if any(e.startswith("nccl") for e in args.backends):
        info["nccl"] = f"{nccl.library().version()} ({nccl.library().path})"
    results: dict = {"info": info}
    for backend in args.backends:
        results[backend] = {
            "raw": {}, "raw_pair": {}, "agent": {}, "ahead": {}, "polled": {}, "ttft": {}
        }  # fmt: skip
    results["header_latency"] = header_latency(role, port)
    first = agents[args.backends[0], args.min_message_bytes[0]][0]
    results["copy"] = bench_copy(role, first, max(args.tokens) // args.block_size, device)
    for tokens in args.tokens:
        n = tokens // args.block_size
        total = args.layers * first.layout.layer_bytes(n)
        ids = block_ids(num_blocks, n, seed=tokens * 7 + rank)
        for backend in args.backends:  # interleaved: the hosts drift between minutes
            res = results[backend]
            res["raw"][tokens] = bench_raw(
                role, raws[backend], backend.partition(":")[0], device, clock,
                f"{backend}/{tokens}", total, args,
            )  # fmt: skip
            agent, peer = agents[backend, args.min_message_bytes[0]]
            res["raw_pair"][tokens] = bench_raw(
                role, agent._pairs[peer].group, backend.partition(":")[0], device, clock,
                f"{backend}/{tokens}/pair", total, args,
            )  # fmt: skip
            for m in args.min_message_bytes:
                agent, peer = agents[backend, m]
                key = f"{tokens}/{m}"
                tag = f"{backend}/{key}"
                res["agent"][key] = bench_agent(role, agent, peer, device, clock, tag, ids, args)
                res["ahead"][key] = bench_agent(
                    role, agent, peer, device, clock, tag, ids, args, ahead_s=AHEAD_S
                )
                res["polled"][key] = bench_agent(
                    role, agent, peer, device, clock, tag, ids, args, ahead_s=AHEAD_S, spin=True
                )
                if not args.skip_ttft:
                    res["ttft"][key] = bench_ttft(
                        role, agent, peer, device, clock, tokens, tag, ids, args
                    )
    if args.profile:
        agent, peer = agents[args.backends[0], args.min_message_bytes[0]]
        n = args.tokens[0] // args.block_size
        ids = block_ids(num_blocks, n, seed=rank)
        profile_agent(role, agent, peer, device, clock, ids, args)
        if not args.skip_ttft:
            profile_ttft(role, agent, peer, device, clock, ids, args)
    for agent, _ in agents.values():
        agent.close()
    for raw in raws.values():
        abort_group(raw)
    return results


def bench_copy(role: str, agent: KVTransferAgent, num_blocks: int, device, repeats: int = 5):
    """Seconds for the copies of one transfer's 32 layers, alone: the sender's gather
    (index_select of K/V rows) or the receiver's scatter (index_copy_), one kernel when the
    caches are stacked (as make_caches and the model runner allocate them)."""
    layout = agent.layout
    index = agent._index_tensor(block_ids(agent.kv_caches[0].shape[1], num_blocks, seed=3))
    buf = torch.empty(layout.message_shape(layout.num_layers, num_blocks), dtype=layout.dtype,
                      device=device)  # fmt: skip
    guard = scatter.Guard(device) if role == "decode" and scatter.available(device) else None
    times, guarded = [], []
    for _ in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        if role == "prefill":
            agent._gather(index, 0, layout.num_layers, buf)
        else:
            agent._scatter(index, 0, layout.num_layers, buf)
        sync(device)
        times.append(time.perf_counter() - start)
        if guard is not None and agent._all_rows is not None:
            start = time.perf_counter()
            rows = index.view(-1)
            guard.launch(agent._all_rows, rows, layout.as_rows(buf), guard.next_token())
            sync(device)
            guarded.append(time.perf_counter() - start)
    return {"bytes": buf.nbytes, "seconds": times[1:], "guarded": guarded[1:]}


def header_latency(role: str, port: int, samples: int = 50) -> list[float]:
    """Push -> pop through the store queue, as a transfer's header travels (an idle receiver
    thread blocked in queue_pop on its own connection)."""
    store = connect_store("127.0.0.1", port, 60)
    latencies = []
    for _ in range(samples):
        if role == "prefill":
            time.sleep(0.002)
            store.queue_push("bench/header", repr(time.perf_counter()))
        else:
            pushed_at = float(store.queue_pop("bench/header"))
            latencies.append(time.perf_counter() - pushed_at)
    return latencies


def bench_raw(role, group, backend, device, clock, tag, total_bytes, args) -> list[float]:
    buf = torch.empty(total_bytes, dtype=torch.uint8, device=device)
    if role == "prefill":
        buf.random_(0, 255)
    times = []
    for i in range(args.repeats + 1):
        key = f"raw/{tag}/{i}"
        if role == "decode":
            work = group.recv([buf], 0, 0)
            clock.ready(key)
            wait_work(work, backend, 60)
            sync(device)
            clock.stamp(key)
        else:
            clock.wait_ready(key)
            sync(device)
            start = time.perf_counter()
            wait_work(group.send([buf], 1, 0), backend, 60)
            times.append(clock_end(clock, key) - start)
    return times[1:]


def clock_end(clock: Clock, key: str) -> float:
    clock.store.wait([f"{clock.name}/{key}/end"])
    return clock.end(key)


def receive(
    agent: KVTransferAgent, clock: Clock, key: str, tid: int, peer: str, ids, spin: bool = False
) -> None:
    """Expect the transfer, then stamp the clock once the agent reports it DONE: waiting on the
    agent's condition variable (`wait`), or with `spin` polling it (`poll`) every POLL_S, as
    raw's receiving thread polls its work.

    NOTE: not sleep(0) between polls. Two threads spinning on sleep(0) (this one and the
    receiver thread in its waits) hand the GIL back and forth, and the receiver thread, when it
    has Python work to do, lost it for up to the 5 ms switch interval: 16 MiB messages at 4096
    tokens took 3.6-11 ms instead of ~2.3 (2x H200, 2026-11-27)."""
    agent.expect(tid, peer, ids)
    clock.ready(key)
    if spin:
        precise_sleeps()  # a 20 us sleep lasts 20 us, not the 50 us of the default timer slack
    while True:
        state = (agent.poll() if spin else agent.wait(timeout_s=1.0)).get(tid)
        if spin and state is None:
            time.sleep(POLL_S)
        if state is not None:
            assert state is TransferState.DONE, f"transfer {tid}: {state}"
            mark(agent.layout.device)
            clock.stamp(key)
            return


def busy_wait(seconds: float) -> None:
    """The step thread between start_send and the last layer: busy launching the forward pass,
    not asleep (after a 2 ms sleep the first kernel launch costs ~40 us of host time, after a
    busy 2 ms ~24 us, back to back ~13 us: measured on an H200 host, 2026-11-26). A launch
    releases the GIL, so the agent's threads run meanwhile: so does sleep(0) here."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        time.sleep(0)


def bench_agent(
    role, agent, peer, device, clock, key, ids, args, ahead_s=0.0, spin=False
) -> list[float]:
    """start_send .. the receiver's DONE. With `ahead_s` > 0 the clock starts that long after
    start_send, at the first send_layer: the header has travelled meanwhile, as it does in
    serving, where start_send comes before the forward pass that computes the layers, and the
    sending thread has been busy meanwhile, as the step thread is. `spin`: the decode side
    polls for DONE instead of waiting on the agent's condition variable (see `receive`)."""
    times = []
    for i in range(args.repeats + 1):
        tid = zlib.crc32(f"bw/{key}/{ahead_s}/{spin}/{i}".encode())
        rep = f"agent/{key}/{ahead_s}/{spin}/{i}"
        if role == "decode":
            receive(agent, clock, rep, tid, peer, ids, spin)
            continue
        clock.wait_ready(rep)
        sync(device)
        start = time.perf_counter()
        handle = agent.start_send(tid, peer, ids)
        if ahead_s:
            busy_wait(ahead_s)
            sync(device)
            start = time.perf_counter()
        mark(device)
        for layer in range(args.layers):
            agent.send_layer(handle, layer)
        assert agent.finish_send(handle) is TransferState.DONE
        times.append(clock_end(clock, rep) - start)
    return times[1:]


def profile_agent(role, agent, peer, device, clock, ids, args) -> None:
    """One header-ahead transfer under torch.profiler; a chrome trace per process. On CUDA the
    trace holds device activity only (with marker kernels at both ends' clocks) unless
    --profile-cpu: the profiler's per-op host overhead stretches a transfer's host work."""
    global MARK_EVENTS
    from torch.profiler import ProfilerActivity, profile

    on_cuda = device.type == "cuda"
    activities = [ProfilerActivity.CUDA] if on_cuda else [ProfilerActivity.CPU]
    if on_cuda and args.profile_cpu:
        activities.append(ProfilerActivity.CPU)
    once = argparse.Namespace(**{**vars(args), "repeats": 1})
    # the receiver works on its own thread, started before the profiler
    config = torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
    MARK_EVENTS = True
    with profile(activities=activities, experimental_config=config) as prof:
        bench_agent(role, agent, peer, device, clock, "profile", ids, once, ahead_s=AHEAD_S)
    MARK_EVENTS = False
    os.makedirs(args.profile, exist_ok=True)
    prof.export_chrome_trace(os.path.join(args.profile, f"{role}.json"))


def profile_ttft(role, agent, peer, device, clock, ids, args) -> None:
    """One TTFT repeat (without sends, then with) under torch.profiler: a chrome trace per
    process, and on the prefill side a summary of where the added time goes: longer matmul
    kernels (SMs shared with the copies and NCCL) or gaps with the GPU idle (host)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    once = argparse.Namespace(**{**vars(args), "repeats": 1})
    config = torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
    tag = f"profile/{args.tokens[0]}"
    with profile(activities=activities, experimental_config=config) as prof:
        bench_ttft(role, agent, peer, device, clock, args.tokens[0], tag, ids, once)
    os.makedirs(args.profile, exist_ok=True)
    prof.export_chrome_trace(os.path.join(args.profile, f"{role}-ttft.json"))
    if role != "prefill" or device.type != "cuda":
        return
    kernels = sorted(
        (e for e in prof.events() if e.device_type == DeviceType.CUDA),
        key=lambda e: e.time_range.start,
    )
    gemms = [e for e in kernels if any(k in e.name.lower() for k in ("gemm", "xmma", "nvjet"))]
    if len(gemms) < 4 * args.layers:  # warm-up + timed, without and with sends
        print(f"profile: found {len(gemms)} matmul kernels, expected {4 * args.layers}")
        return
    for name, part in (("without sends", gemms[-2 * args.layers : -args.layers]),
                       ("with sends", gemms[-args.layers :])):  # fmt: skip
        busy = sum(e.time_range.elapsed_us() for e in part)
        span = part[-1].time_range.end - part[0].time_range.start
        print(
            f"profile {args.tokens[0]} tokens, {name}: {len(part)} matmuls {busy / 1e3:.3f} ms "
            f"busy over {span / 1e3:.3f} ms (gaps {(span - busy) / 1e3:.3f} ms)"
        )
    others: dict[str, float] = {}
    start, end = gemms[-args.layers].time_range.start, gemms[-1].time_range.end
    for e in kernels:
        if start <= e.time_range.start <= end and e not in gemms:
            others[e.name[:60]] = others.get(e.name[:60], 0.0) + e.time_range.elapsed_us()
    for name, us in sorted(others.items(), key=lambda kv: -kv[1])[:6]:
        print(f"profile   beside the matmuls: {us / 1e3:.3f} ms  {name}")


def bench_ttft(role, agent, peer, device, clock, tokens, tag, ids, args) -> dict:
    """Prefill compute of `tokens` without and with per-layer sends; the tail until the
    receiver's DONE. `tag`: unique to this agent and size (the clock's and transfer ids' names)."""
    runs: dict[str, list[float]] = {"compute": [], "compute_sending": [], "sent": [], "done": []}
    if role == "prefill":
        hidden, width = GPU_MATMUL if device.type == "cuda" else CPU_MATMUL
        dtype = getattr(torch, args.dtype)
        x = torch.randn(tokens, hidden, device=device, dtype=dtype)
        w = torch.randn(hidden, width, device=device, dtype=dtype) / hidden**0.5
        y = torch.empty(tokens, width, device=device, dtype=dtype)
    for i in range(args.repeats + 1):
        tid = zlib.crc32(f"ttft/{tag}/{i}".encode())
        rep = f"ttft/{tag}/{i}"
        if role == "decode":
            receive(agent, clock, rep, tid, peer, ids)
            continue
        sync(device)
        start = time.perf_counter()
        for _ in range(args.layers):
            torch.matmul(x, w, out=y)
        sync_compute(device)
        compute = time.perf_counter() - start
        clock.wait_ready(rep)
        sync(device)
        start = time.perf_counter()
        handle = agent.start_send(tid, peer, ids)
        for layer in range(args.layers):
            torch.matmul(x, w, out=y)
            agent.send_layer(handle, layer)
        sync_compute(device)
        compute_sending = time.perf_counter() - start
        assert agent.finish_send(handle) is TransferState.DONE
        sent = time.perf_counter() - start
        done = clock_end(clock, rep) - start
        if i > 0:
            runs["compute"].append(compute)
            runs["compute_sending"].append(compute_sending)
            runs["sent"].append(sent)
            runs["done"].append(done)
    return runs


def median_ms(values: list[float]) -> float:
    return 1e3 * statistics.median(values)


def median_ratio(values: list[float], bases: list[float]) -> float:
    """The median over repeats of (value - base) / base, in percent."""
    return 100 * statistics.median((v - b) / b for v, b in zip(values, bases))


def report(args, results: dict, kv_bytes_per_token: int) -> str:
    """The tables, one block per backend. Every ratio is to the best raw send of the run at
    that size (over the backends): the link's bandwidth, not one binding's."""
    prefill = results["prefill"]
    lines = [
        f"bandwidth (GB/s = 1e9 B/s), median of {args.repeats}; agent = start_send .. receiver "
        "DONE, scattered block ids; ratio = agent GB/s / the best raw GB/s at that size",
    ]
    best_raw = {
        tokens: max(
            tokens * kv_bytes_per_token / statistics.median(prefill[b]["raw"][tokens]) / 1e9
            for b in args.backends
        )
        for tokens in args.tokens
    }
    for backend in args.backends:
        res = prefill[backend]
        lines += [
            f"== backend {backend}",
            f"{'tokens':>6} {'MiB':>6} {'raw GB/s':>9} | "
            + " | ".join(
                f"{'min ' + label(m):>10} {'GB/s':>6} {'ratio':>5}" for m in args.min_message_bytes
            ),
        ]
        for kind, what in (
            ("agent", "header included"),
            ("ahead", "header sent ahead"),
            ("polled", "header ahead; the decode side polls for DONE, as raw's polls its recv"),
        ):
            lines.append(f"-- {kind}: {what}")
            for tokens in args.tokens:
                total = tokens * kv_bytes_per_token
                raw = total / statistics.median(res["raw"][tokens]) / 1e9
                cells = []
                for m in args.min_message_bytes:
                    bw = total / statistics.median(res[kind][f"{tokens}/{m}"]) / 1e9
                    cells.append(f"{'':>10} {bw:6.1f} {bw / best_raw[tokens]:5.2f}")
                lines.append(f"{tokens:6d} {total / 2**20:6.0f} {raw:9.1f} | " + " | ".join(cells))
    lines.append(
        "raw on an agent's own communicator (the first --min-message-bytes agent's pair; the raw "
        "column's is a communicator of its own), GB/s and ratio to the raw column:"
    )
    for backend in args.backends:
        res = prefill[backend]
        cells = []
        for tokens in args.tokens:
            total = tokens * kv_bytes_per_token
            own = total / statistics.median(res["raw"][tokens]) / 1e9
            pair = total / statistics.median(res["raw_pair"][tokens]) / 1e9
            cells.append(f"{tokens}: {pair:.1f} ({pair / own:.2f})")
        lines.append(f"  {backend}: " + ", ".join(cells))
    if not args.skip_ttft:
        lines += [
            "",
            "TTFT: prefill = 32 matmul layer steps; +send = the same with send_layer after each "
            "layer (until the compute stream is done); tail = that -> receiver DONE; "
            "handoff = (DONE - start - prefill) / prefill; sent = the same to finish_send's "
            "return (a prefill worker's call returns, and the router streams token 1, then); "
            "percentages: medians of each repeat's ratio",
            f"{'backend':>10} {'tokens':>6} {'min msg':>7} {'prefill ms':>10} {'+send ms':>9} "
            f"{'compute +%':>10} {'tail ms':>8} {'handoff +%':>10} {'sent +%':>8}",
        ]
        for tokens in args.tokens:
            for backend in args.backends:
                for m in args.min_message_bytes:
                    runs = prefill[backend]["ttft"][f"{tokens}/{m}"]
                    base, sending = median_ms(runs["compute"]), median_ms(runs["compute_sending"])
                    tails = [d - c for d, c in zip(runs["done"], runs["compute_sending"])]
                    # Paired: each repeat's prefill with sends against the one just before it
                    # without (the GPU's clock drifts between repeats by more than the effect).
                    slowdown = median_ratio(runs["compute_sending"], runs["compute"])
                    handoff = median_ratio(runs["done"], runs["compute"])
                    sent = median_ratio(runs["sent"], runs["compute"])
                    lines.append(
                        f"{backend:>10} {tokens:6d} {label(m):>7} {base:10.2f} {sending:9.2f} "
                        f"{slowdown:10.2f} {median_ms(tails):8.2f} {handoff:10.2f} {sent:8.2f}"
                    )
    return "\n".join(lines)


def run_processes(target, args) -> dict:
    """Run `target(role, args, port, out)` in a prefill and a decode process around a fresh
    store; their results by role. Exits with the error a process reported, if one did."""
    store, port = start_store()
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, args, port, out)) for r in ("prefill", "decode")]
    for proc in procs:
        proc.start()
    results = dict(out.get() for _ in procs)
    for proc in procs:
        proc.join()
    for role, res in results.items():
        if "error" in res:
            sys.exit(f"{role} failed:\n{res['error']}")
    del store
    return results


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tokens", default=None, help="prompt lengths, comma separated")
    p.add_argument(
        "--min-message-bytes",
        default="0,16M,64M,1G",
        help="coalescing settings to compare (0: one message per layer), e.g. 0,16M,64M",
    )
    p.add_argument(
        "--backends",
        default=None,
        help="KV transfer backends to compare, comma separated (nccl: NCCL's C API; nccl:host: "
        "the same with scatters launched by the receiver thread; torch-nccl: ProcessGroupNCCL); "
        "default: nccl and torch-nccl on CUDA (nccl where it loads), gloo on CPU",
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip-ttft", action="store_true")
    p.add_argument(
        "--receiver-busy",
        type=float,
        default=0.0,
        help="share of time a thread of the decode process spends in pure Python (holding the "
        "GIL), as a decode engine's step loop does in serving; 0: an idle receiver",
    )
    p.add_argument("--json", default=None, help="also write the raw timings here")
    p.add_argument(
        "--profile",
        default=None,
        help="write chrome traces of one transfer and one TTFT repeat (the first --tokens, "
        "the first --min-message-bytes) to this folder; print where the TTFT goes",
    )
    p.add_argument(
        "--profile-cpu", action="store_true", help="the transfer's trace also records host ops"
    )
    for name in GPU_SHAPE:
        p.add_argument(f"--{name.replace('_', '-')}", default=None)
    args = p.parse_args()
    shape = GPU_SHAPE if args.device == "cuda" else CPU_SHAPE
    for name, default in shape.items():
        value = getattr(args, name)
        setattr(args, name, default if value is None else type(default)(value))
    default_tokens = "512,1024,2048,4096,8192" if args.device == "cuda" else "256,1024"
    args.tokens = [int(t) for t in (args.tokens or default_tokens).split(",")]
    args.min_message_bytes = [parse_bytes(m) for m in args.min_message_bytes.split(",")]
    if args.backends is None:
        cuda_backends = "nccl,torch-nccl" if nccl.available() else "torch-nccl"
        args.backends = cuda_backends if args.device == "cuda" else "gloo"
    args.backends = args.backends.split(",")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast: never needed here
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

    results = run_processes(worker, args)
    dtype = getattr(torch, args.dtype)
    kv_bytes_per_token = 2 * args.layers * args.kv_heads * args.head_dim * dtype.itemsize
    commit = (
        os.environ.get("BATON_COMMIT")
        or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    )
    print(
        f"commit {commit or 'unknown'}, {results['prefill']['info']['device']} -> "
        f"{results['decode']['info']['device']}, torch {torch.__version__}, "
        f"{platform.machine()}"
    )
    if "nccl" in results["prefill"]["info"]:
        print(f"NCCL (backend nccl): {results['prefill']['info']['nccl']}")
    ahead = [e for e, on in results["decode"]["info"]["scatter_ahead"].items() if on]
    print(f"scatters queued behind their receives (kvtransfer.scatter): {ahead or 'none'}")
    print(
        f"KV: {args.layers} layers x {args.kv_heads} KV heads x head_dim {args.head_dim}, "
        f"{args.dtype}, block {args.block_size}: {kv_bytes_per_token // 1024} KiB per token"
    )
    latency = statistics.median(results["decode"]["header_latency"])
    print(f"header through the store: median {1e6 * latency:.0f} us (push -> receiver pop)")
    for role, what in (("prefill", "gather (index_select)"), ("decode", "scatter (index_copy_)")):
        copy = results[role]["copy"]
        seconds = statistics.median(copy["seconds"])
        print(
            f"{role} {what} of {copy['bytes'] / 2**20:.0f} MiB in {args.layers} layers: "
            f"{1e3 * seconds:.2f} ms, {2 * copy['bytes'] / seconds / 1e9:.0f} GB/s read+written"
        )
        if copy.get("guarded"):
            seconds = statistics.median(copy["guarded"])
            print(
                f"{role} guarded scatter (kvtransfer.scatter, Triton) of the same: "
                f"{1e3 * seconds:.2f} ms, {2 * copy['bytes'] / seconds / 1e9:.0f} GB/s"
            )
    print(report(args, results, kv_bytes_per_token))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
