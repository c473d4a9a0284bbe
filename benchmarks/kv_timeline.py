"""Where a KV handoff's time goes: one phase table per way of sending, on 2 GPUs (NCCL).

benchmarks/kv_transfer.py says how long a transfer takes; this says where the time goes. It runs
the same two processes and shapes (a Llama-3-8B-shaped KV cache, 128 KiB per token), with raw
sends and header-ahead agent transfers (`ahead`: the consumer waits on the agent's condition
variable; `polled`: it polls every 20 us) interleaved, and stamps each phase on the host clock
(time.perf_counter, one clock per host):

  host      the sender's first `_wait_prepared` and `_post_sends`, each post; the
            receiver thread's waits, `_finish`; the consumer's DONE
  GPU       CUDA events (each GPU's times mapped to the host clock through an event recorded on
            an idle stream, ~2 us): each message's data ready on the sender (gathered), its
            send done, its receive done, its scatter's start and end

No profiler: its per-op host overhead stretches exactly the host work this looks at. The phases
are stamped by wrapping the agent's internals (the wrappers cost a few us each; compare the
totals with kv_transfer.py's, not its ratios). Times are medians over repeats, in us from the
sender's clock start (the first `send_layer`; raw: the send).

    python -m benchmarks.kv_timeline --tokens 2048 --repeats 15

What it found (2x H200, 2026-11-27, benchmarks/RESULTS.md, session 13): a 2048-token transfer's
~260 us over raw (1103 against 843 us, `ahead`) was ~92 us of head (host: the first gather's
launch and the first post), ~96 us on the wire (the first message's ~60 us start, then ~14 us a
message), ~72 us of tail (the last receive and scatter, the receiver thread's wake-up, `_finish`,
the consumer's wake-up).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import zlib

import torch

import benchmarks.kv_transfer as kvb
import kvtransfer.agent as agent_module
import kvtransfer.nccl as nccl_module
import kvtransfer.receiver as receiver_module
import kvtransfer.scatter as scatter_module
from kvtransfer import KVTransferAgent, TransferState
from kvtransfer.pair import new_group, precise_sleeps, wait_work
from kvtransfer.store import connect_store

KINDS = ("raw", "ahead", "polled")
# Per process, this repeat's stamps: (name, host time) or (name, host start, host end, GPU
# event at the start, GPU event at the end).
_LOG: list[tuple] = []
_EVENTS: list[torch.cuda.Event] = []  # timing events, reused: creating one costs host time


def _event(stream: torch.cuda.Stream | None = None) -> torch.cuda.Event:
    if not _EVENTS:
        _EVENTS.extend(torch.cuda.Event(enable_timing=True) for _ in range(256))
    event = _EVENTS.pop()
    event.record(stream)
    return event


def _anchor() -> tuple[float, torch.cuda.Event]:
    """A host time and an event that ran at that time: recorded on the idle current stream
    (not a device sync: a posted receive may be waiting), stamped at the call's midpoint."""
    _EVENTS.append(_event())  # the pool is filled outside the timed call
    torch.cuda.current_stream().synchronize()
    before = time.perf_counter()
    event = _event()
    return (before + time.perf_counter()) / 2, event


def _stamp_internals() -> None:
    """Wrap the agent's internals so that each logs its phase in _LOG."""

    def timed(cls, name, label, stream_of=None):
        original = getattr(cls, name)

        def wrapper(self, *args, **kwargs):
            start = time.perf_counter()
            ready = _event(torch.cuda.current_stream(self.device)) if stream_of else None
            result = original(self, *args, **kwargs)
            end = time.perf_counter()
            if stream_of:  # a post: data ready on the caller's stream; done on the pair's
                _LOG.append((args[1], start, end, ready, _event(stream_of(self))))
            else:
                _LOG.append((label, start, end, None, None))
            return result

        setattr(cls, name, wrapper)

    timed(nccl_module.NcclComm, "_post", None, stream_of=lambda comm: comm.stream)
    timed(agent_module.KVTransferAgent, "_wait_prepared", "wait_prepared")
    timed(agent_module.KVTransferAgent, "_post_sends", "post_sends")
    timed(agent_module.KVTransferAgent, "_finish", "finish")

    launch = scatter_module.Guard.launch

    def guarded_launch(self, dst, rows, src, token):
        start, ready = time.perf_counter(), _event()  # ready: after its receive (stream order)
        launch(self, dst, rows, src, token)
        _LOG.append(("scatter", start, time.perf_counter(), ready, _event()))

    scatter_module.Guard.launch = guarded_launch
    wait = receiver_module.wait_work

    def receiver_wait(work, backend, timeout_s):
        wait(work, backend, timeout_s)
        _LOG.append(("receiver_wait", time.perf_counter()))

    receiver_module.wait_work = receiver_wait


def _resolve(anchor_time: float, anchor: torch.cuda.Event) -> list[tuple]:
    """_LOG with every event as a host time; the events go back to the pool."""
    out = []
    for entry in _LOG:
        if len(entry) == 2:
            out.append(entry)
            continue
        name, start, end, ready, done = entry
        on_host = [anchor_time + anchor.elapsed_time(e) / 1e3 if e else None for e in (ready, done)]
        out.append((name, start, end, *on_host))
        _EVENTS.extend(e for e in (ready, done) if e is not None)
    _LOG.clear()
    return out


def worker(role: str, args, port: int, out) -> None:
    try:
        out.put((role, run(role, args, port)))
    except BaseException as e:  # noqa: BLE001 - reported by the parent
        import traceback

        out.put((role, {"error": f"{e!r}\n{traceback.format_exc()}"}))


def run(role: str, args, port: int) -> dict:
    _stamp_internals()
    rank = 0 if role == "prefill" else 1
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    store = connect_store("127.0.0.1", port, 600)
    clock = kvb.Clock(store, "timeline")
    shape = argparse.Namespace(**kvb.GPU_SHAPE)
    n = args.tokens // shape.block_size
    num_blocks = 2 * n + 7
    caches = kvb.make_caches(shape, num_blocks, device, seed=rank)
    me, peer = ("p", "d")[:: 1 if role == "prefill" else -1]
    agent = KVTransferAgent(
        me, caches, "127.0.0.1", port, "nccl", 60, min_message_bytes=args.min_message_bytes,
        role=role,
    )  # fmt: skip
    agent.connect(peer)
    raw = new_group(connect_store("127.0.0.1", port, 60), "timeline/raw", rank, "nccl", 60)
    probe = torch.ones(1, device=device)
    wait_work(raw.send([probe], 1, 0) if rank == 0 else raw.recv([probe], 0, 0), "nccl", 60)
    total = shape.layers * agent.layout.layer_bytes(n)
    raw_buf = torch.empty(total, dtype=torch.uint8, device=device)
    ids = kvb.block_ids(num_blocks, n, seed=args.tokens * 7 + rank)
    repeats = []
    for i in range(args.repeats + 1):
        for kind in KINDS:
            key = f"{kind}/{i}"
            tid = zlib.crc32(key.encode())
            torch.cuda.synchronize()
            _LOG.clear()
            if role == "decode":
                stamps = receive(agent, raw, raw_buf, clock, key, tid, peer, ids, kind)
            else:
                stamps = send(agent, raw, raw_buf, clock, key, tid, peer, ids, kind, shape.layers)
            if i > 0:
                repeats.append((kind, stamps))
    agent.close()
    return {"repeats": repeats, "bytes": total}


def send(agent, raw, raw_buf, clock, key, tid, peer, ids, kind, layers) -> dict:
    clock.wait_ready(key)
    torch.cuda.synchronize()
    if kind == "raw":
        anchor_time, anchor = _anchor()
        start = time.perf_counter()
        wait_work(raw.send([raw_buf], 1, 0), "nccl", 60)
    else:
        handle = agent.start_send(tid, peer, ids)
        kvb.busy_wait(kvb.AHEAD_S)
        torch.cuda.synchronize()
        _LOG.clear()  # the header's preparation is not timed
        anchor_time, anchor = _anchor()
        start = time.perf_counter()
        for layer in range(layers):
            agent.send_layer(handle, layer)
        assert agent.finish_send(handle) is TransferState.DONE
    sent = time.perf_counter()
    end = kvb.clock_end(clock, key)
    torch.cuda.synchronize()
    return {"start": start, "sent": sent, "end": end, "log": _resolve(anchor_time, anchor)}


def receive(agent, raw, raw_buf, clock, key, tid, peer, ids, kind) -> dict:
    anchor_time, anchor = _anchor()
    if kind == "raw":
        work = raw.recv([raw_buf], 0, 0)
        clock.ready(key)
        wait_work(work, "nccl", 60)
        torch.cuda.synchronize()
    else:
        agent.expect(tid, peer, ids)
        clock.ready(key)
        polled = kind == "polled"
        if polled:
            precise_sleeps()
        deadline = time.monotonic() + 30
        while (state := (agent.poll() if polled else agent.wait(timeout_s=1.0)).get(tid)) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{key}: no result in 30 s")
            if polled:
                time.sleep(kvb.POLL_S)
        assert state is TransferState.DONE, f"{key}: {state}"
    end = time.perf_counter()
    clock.stamp(key)
    torch.cuda.synchronize()
    return {"end": end, "log": _resolve(anchor_time, anchor)}


def phases(sender: dict, receiver: dict) -> dict[str, float]:
    """One repeat's phases, in seconds from the sender's clock start."""
    t0 = sender["start"]
    row = {"DONE (consumer)": sender["end"] - t0}
    sends = [e for e in sender["log"] if e[0] == "ncclSend"]
    for j, (_, start, _, ready, done) in enumerate(sends):
        row[f"send {j}: post called"] = start - t0
        row[f"send {j}: data ready"] = ready - t0
        row[f"send {j}: done"] = done - t0
    for name in ("wait_prepared", "post_sends"):
        first = next((e for e in sender["log"] if e[0] == name), None)
        if first is not None:
            row[f"{name}: called"], row[f"{name}: returned"] = first[1] - t0, first[2] - t0
    for j, entry in enumerate(e for e in receiver["log"] if e[0] == "ncclRecv"):
        row[f"recv {j}: done"] = entry[4] - t0
    for j, entry in enumerate(e for e in receiver["log"] if e[0] == "scatter"):
        row[f"scatter {j}: start"], row[f"scatter {j}: end"] = entry[3] - t0, entry[4] - t0
    for j, entry in enumerate(e for e in receiver["log"] if e[0] == "receiver_wait"):
        row[f"receiver thread: wait {j} returned"] = entry[1] - t0
    finish = next((e for e in receiver["log"] if e[0] == "finish"), None)
    if finish is not None:
        row["receiver thread: _finish"] = finish[1] - t0
    row["sender: finish_send returned"] = sender["sent"] - t0
    return row


def report(results: dict) -> str:
    total = results["prefill"]["bytes"]
    lines = [f"{total >> 20} MiB; us from the sender's clock start, median (min, max)"]
    by_kind: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    receiver = iter(results["decode"]["repeats"])
    for kind, sender in results["prefill"]["repeats"]:
        rkind, received = next(receiver)
        assert rkind == kind
        by_kind[kind].append(phases(sender, received))
    for kind, rows in by_kind.items():
        done = statistics.median(r["DONE (consumer)"] for r in rows)
        lines.append(f"-- {kind}: {len(rows)} repeats, {total / done / 1e9:.1f} GB/s")
        for name in sorted(rows[0], key=lambda k: statistics.median(r.get(k, 0) for r in rows)):
            values = [1e6 * r[name] for r in rows if name in r]
            lines.append(
                f"  {name:>36} {statistics.median(values):8.1f} "
                f"({min(values):.1f}, {max(values):.1f})"
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--min-message-bytes", type=kvb.parse_bytes, default=64 << 20)
    args = p.parse_args()
    if torch.cuda.device_count() < 2 or not nccl_module.available():
        sys.exit("kv_timeline needs 2 CUDA devices and NCCL")
    results = kvb.run_processes(worker, args)
    print(f"{torch.cuda.get_device_name(0)} x2, {args.tokens} tokens")
    print(report(results))


if __name__ == "__main__":
    main()
