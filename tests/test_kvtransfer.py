"""kvtransfer on CPU (gloo): KV lands exactly in the receiver's blocks and nowhere else, in real
processes and in threads; coalescing settings agree; cancel drains; a dead or stalled peer turns
into FAILED within the timeout and the pair reconnects with a new generation."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch

import kvtransfer.receiver
from kvtransfer import KVTransferAgent, TransferState, nccl, start_store
from kvtransfer.pair import choose_backend, read_hello, wait_work
from kvtransfer.protocol import KVLayout, layers_per_message, message_plan
from kvtransfer.receiver import _message_runs, _segments
from kvtransfer.scatter import Guard
from kvtransfer.store import connect_store

NUM_LAYERS = 5
BLOCK_SHAPE = (4, 2, 8)  # block_size, kv heads, head_dim: 512 bytes per block and layer (fp32)
PREFILL_BLOCKS, DECODE_BLOCKS = 40, 48
PREFILL_SEED, DECODE_SEEDS = 1, {"d0": 2, "d1": 3}
# Prefill agents of one process, by min_message_bytes: a message per layer, 2 layers per
# message for 3-block transfers (uneven last message), one message per transfer.
PREFILLS = {"p-layer": 0, "p-mid": 3000, "p-whole": 1 << 30}
UNEXPECTED_TID, CANCELLED_TID = 900, 901
DONE, FAILED = TransferState.DONE, TransferState.FAILED


@pytest.fixture(scope="module")
def port():
    """One master store for the whole module, as in a deployment: a fresh one per test could
    land on the port of a gloo listener that a finished test is still closing (seen here)."""
    store, port = start_store()
    yield port
    del store


def make_caches(
    seed: int, num_blocks: int, num_layers: int = NUM_LAYERS, device: str = "cpu", stacked=False
) -> list[torch.Tensor]:
    """`stacked`: views of one allocation, as the model runner makes them (the agent then
    copies a message's layers in one kernel); the values do not depend on it."""
    g = torch.Generator().manual_seed(seed)
    caches = [torch.randn(2, num_blocks, *BLOCK_SHAPE, generator=g) for _ in range(num_layers)]
    if stacked:
        return list(torch.stack(caches).to(device).unbind(0))
    return [c.to(device) for c in caches]


def test_stacked_rows_only_for_consecutive_views_of_one_allocation():
    caches = make_caches(0, 4, stacked=True)
    layout = KVLayout.of(caches)
    rows = layout.stacked_rows(caches)
    assert rows is not None and rows.shape[0] == NUM_LAYERS * 2 * 4
    for layer, kv in enumerate(caches):
        assert torch.equal(rows[layer * 8 : (layer + 1) * 8], layout.as_rows(kv))
    assert layout.stacked_rows(caches[::-1]) is None
    assert layout.stacked_rows(make_caches(0, 4)) is None


def transfer_plan() -> list[tuple[int, str, str, list[int], list[int]]]:
    """(transfer id, prefill, decode, source blocks, destination blocks): three transfers per
    pair; destinations never overlap within a decode worker."""
    rng = random.Random(0)
    free = {d: rng.sample(range(DECODE_BLOCKS), DECODE_BLOCKS) for d in DECODE_SEEDS}
    plan, tid = [], 100
    for prefill in PREFILLS:
        for decode in DECODE_SEEDS:
            for _ in range(3):
                n = rng.randint(1, 4)
                src = rng.sample(range(PREFILL_BLOCKS), n)
                dst = [free[decode].pop() for _ in range(n)]
                plan.append((tid, prefill, decode, src, dst))
                tid += 1
    # The unexpected and the cancelled transfer: their destinations must stay untouched.
    plan.append((UNEXPECTED_TID, "p-layer", "d1", [0, 1], [free["d1"].pop(), free["d1"].pop()]))
    plan.append((CANCELLED_TID, "p-mid", "d0", [2, 3, 4], [free["d0"].pop() for _ in range(3)]))
    return plan


def expected_caches(decode: str, done: set[int]) -> list[torch.Tensor]:
    """What decode's caches must hold once the transfers `done` landed."""
    want = make_caches(DECODE_SEEDS[decode], DECODE_BLOCKS)
    src = make_caches(PREFILL_SEED, PREFILL_BLOCKS)
    for tid, _, d, src_blocks, dst_blocks in transfer_plan():
        if d == decode and tid in done:
            for layer in range(NUM_LAYERS):
                want[layer][:, dst_blocks] = src[layer][:, src_blocks]
    return want


def wait_for(agent: KVTransferAgent, tids: set[int], timeout_s: float) -> dict[int, TransferState]:
    results: dict[int, TransferState] = {}
    deadline = time.monotonic() + timeout_s
    while not tids <= results.keys() and time.monotonic() < deadline:
        results.update(agent.poll())
        time.sleep(0.005)
    return results


def meet(store, run: str, me: str, peer: str) -> None:
    """Wait until the peer process is up too: connects below then take well under their
    short timeouts even when spawning a process takes seconds (a loaded CI machine)."""
    store.set(f"{run}/up/{me}", "1")
    store.wait([f"{run}/up/{peer}"])


def send_all(agent: KVTransferAgent, tid: int, peer: str, blocks: list[int]) -> TransferState:
    handle = agent.start_send(tid, peer, blocks)
    for layer in range(len(agent.kv_caches)):
        agent.send_layer(handle, layer)
    return agent.finish_send(handle)


def send_first_layers(agent: KVTransferAgent, tid: int, peer: str, blocks: list[int], count: int):
    """Start a transfer and send only its first `count` layers; its handle."""
    handle = agent.start_send(tid, peer, blocks)
    for layer in range(count):
        agent.send_layer(handle, layer)
    return handle


# ---------------------------------------------------------------- processes


def prefill_process(port: int, device: str, run: str, out) -> None:
    caches = make_caches(PREFILL_SEED, PREFILL_BLOCKS, device=device, stacked=True)
    agents = {
        name: KVTransferAgent(
            name, caches, "127.0.0.1", port, timeout_s=10, min_message_bytes=m, role="prefill"
        )
        for name, m in PREFILLS.items()
    }
    store = connect_store("127.0.0.1", port, 60)
    for decode in DECODE_SEEDS:
        meet(store, run, "prefill", decode)
    for agent in agents.values():
        for decode in DECODE_SEEDS:
            agent.connect(decode)
    store.wait([f"{run}/ready/{d}" for d in DECODE_SEEDS])
    plan = transfer_plan()
    states = {}
    # Extras first: the receivers must drain them and carry on.
    for tid, prefill, decode, src, _ in plan[-2:]:
        states[tid] = send_all(agents[prefill], tid, decode, src)
    # One transfer per pair in sequence, then the rest interleaved: layer by layer across all of
    # them, two per pair, so one pair's second transfer queues behind its first.
    sequential = [t for i, t in enumerate(plan[:-2]) if i % 3 == 0]
    interleaved = [t for i, t in enumerate(plan[:-2]) if i % 3 != 0]
    for tid, prefill, decode, src, _ in sequential:
        states[tid] = send_all(agents[prefill], tid, decode, src)
    handles = [(tid, agents[p], agents[p].start_send(tid, d, s)) for tid, p, d, s, _ in interleaved]
    for layer in range(NUM_LAYERS):
        for _, agent, handle in handles:
            agent.send_layer(handle, layer)
    for tid, agent, handle in reversed(handles):
        states[tid] = agent.finish_send(handle)
    store.wait([f"{run}/done/{d}" for d in DECODE_SEEDS])
    for agent in agents.values():
        agent.close()
    out.put(("prefill", {tid: s.value for tid, s in states.items()}))


def decode_process(name: str, port: int, device: str, run: str, out) -> None:
    # One decode worker's caches stacked, the other's not: both copy paths receive.
    stacked = name == min(DECODE_SEEDS)
    caches = make_caches(DECODE_SEEDS[name], DECODE_BLOCKS, device=device, stacked=stacked)
    assert (KVLayout.of(caches).stacked_rows(caches) is not None) == stacked
    agent = KVTransferAgent(name, caches, "127.0.0.1", port, timeout_s=10, role="decode")
    store = connect_store("127.0.0.1", port, 60)
    meet(store, run, name, "prefill")
    for prefill in PREFILLS:
        agent.connect(prefill)
    mine = [t for t in transfer_plan() if t[2] == name and t[0] != UNEXPECTED_TID]
    for tid, prefill, _, _, dst in mine:
        agent.expect(tid, prefill, dst)
    agent.cancel(CANCELLED_TID)
    store.set(f"{run}/ready/{name}", "1")
    wanted = {tid for tid, *_ in mine} - {CANCELLED_TID}
    results = wait_for(agent, wanted, timeout_s=20)
    time.sleep(0.2)  # anything reported late (the cancelled, the unexpected) would show now
    results.update(agent.poll())
    store.set(f"{run}/done/{name}", "1")
    want = expected_caches(name, {t for t, s in results.items() if s is DONE})
    exact = all(torch.equal(c.cpu(), w) for c, w in zip(caches, want))
    agent.close()
    out.put((name, {"results": {t: s.value for t, s in results.items()}, "exact": exact}))


# The process tests' two devices: gloo on CPU, and NCCL between two GPUs (`pytest -m gpu`).
PROCESS_DEVICES = pytest.mark.parametrize(
    "devices",
    [
        ("cpu", "cpu"),
        pytest.param(("cuda:0", "cuda:1"), marks=pytest.mark.gpu),  # NCCL
    ],
)


def skip_without_two_gpus(devices: tuple[str, str]) -> None:
    if devices[0] != "cpu" and torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")


def run_processes(targets: list[tuple], timeout_s: float) -> dict:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=fn, args=(*args, out), daemon=True) for fn, *args in targets]
    for p in procs:
        p.start()
    try:
        return dict(out.get(timeout=timeout_s) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()


@pytest.mark.timeout(90)
@PROCESS_DEVICES
def test_transfers_between_processes_land_exactly(port, devices):
    skip_without_two_gpus(devices)
    prefill_device, decode_device = devices
    run = f"test/{prefill_device}"
    reports = run_processes(
        [(prefill_process, port, prefill_device, run)]
        + [(decode_process, d, port, decode_device, run) for d in DECODE_SEEDS],
        60,
    )
    plan = transfer_plan()
    assert reports["prefill"] == {tid: "done" for tid, *_ in plan}
    for decode in DECODE_SEEDS:
        wanted = {tid for tid, _, d, *_ in plan if d == decode}
        wanted -= {UNEXPECTED_TID, CANCELLED_TID}
        assert reports[decode]["results"] == {tid: "done" for tid in wanted}
        # the three coalescing settings, the drained transfers and nothing else written
        assert reports[decode]["exact"]


def dying_sender(port: int, out) -> None:
    caches = make_caches(PREFILL_SEED, PREFILL_BLOCKS)
    agent = KVTransferAgent(
        "p-dies", caches, "127.0.0.1", port, timeout_s=5, min_message_bytes=0, role="prefill"
    )
    store = connect_store("127.0.0.1", port, 60)
    meet(store, "dead", "sender", "receiver")
    agent.connect("d-survives")
    store.wait(["dead/expecting"])
    handle = agent.start_send(1, "d-survives", [0, 1, 2])
    agent.send_layer(handle, 0)  # header and the first of five messages, then death
    time.sleep(0.3)
    out.put(("sender", "dying"))
    out.close()
    out.join_thread()  # flush the queue: os._exit skips that
    os._exit(1)


@pytest.mark.timeout(60)
def test_dead_sender_fails_within_timeout_then_reconnects(port):
    store = connect_store("127.0.0.1", port, 60)
    caches = make_caches(DECODE_SEEDS["d0"], DECODE_BLOCKS)
    decode = KVTransferAgent("d-survives", caches, "127.0.0.1", port, timeout_s=3, role="decode")
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=dying_sender, args=(port, out), daemon=True)
    proc.start()
    try:
        meet(store, "dead", "receiver", "sender")
        decode.connect("p-dies")
        first_generation = decode.generation("p-dies")
        decode.expect(1, "p-dies", [5, 6, 7])
        store.set("dead/expecting", "1")
        assert out.get(timeout=30) == ("sender", "dying")
        start = time.monotonic()
        assert wait_for(decode, {1}, timeout_s=10) == {1: FAILED}
        assert time.monotonic() - start < 3 + 3
    finally:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
    # A new process under the same worker id (here a thread) connects: a new generation works.
    prefill = KVTransferAgent(
        "p-dies", make_caches(PREFILL_SEED, PREFILL_BLOCKS), "127.0.0.1", port, role="prefill"
    )
    connect_both(prefill, decode)
    assert decode.generation("p-dies") > first_generation
    decode.expect(2, "p-dies", [8, 9])
    assert send_all(prefill, 2, "d-survives", [10, 11]) is DONE
    assert wait_for(decode, {2}, timeout_s=10) == {2: DONE}
    for layer in range(NUM_LAYERS):
        assert torch.equal(caches[layer][:, [8, 9]], prefill.kv_caches[layer][:, [10, 11]])
    prefill.close()
    decode.close()


def big_caches(device: str, seed: int = 0, stacked: bool = False) -> list[torch.Tensor]:
    """4 layers of 16-token blocks of 8 heads x 128 (bf16): 32 KiB per K or V block. On GPU,
    512 blocks: sending 256 is 64 MiB, more than NCCL buffers for a receiver that is gone.
    `stacked`: views of one allocation, as the model runner makes them (on GPU a decode agent
    then queues its scatters behind their receives: kvtransfer.scatter)."""
    num_blocks = 512 if device.startswith("cuda") else 64
    g = torch.Generator().manual_seed(seed)
    shape = (2, num_blocks, 16, 8, 128)
    caches = [torch.randn(shape, generator=g).bfloat16() for _ in range(4)]
    if stacked:
        return list(torch.stack(caches).to(device).unbind(0))
    return [c.to(device) for c in caches]


def failures_prefill(port: int, device: str, run: str, out) -> None:
    store = connect_store("127.0.0.1", port, 60)
    caches = make_caches(PREFILL_SEED, PREFILL_BLOCKS, device=device)
    agent = KVTransferAgent("fp", caches, "127.0.0.1", port, timeout_s=3, role="prefill")
    meet(store, run, "prefill", "decode")
    agent.connect("fd")
    big = KVTransferAgent(
        "fp2", big_caches(device), "127.0.0.1", port,
        timeout_s=3, min_message_bytes=0, role="prefill",
    )  # fmt: skip
    big.connect("fd2")
    report = {}
    # 1. The sender stalls after layer 0: the receiver fails on its own, by its timeout.
    store.wait([f"{run}/ready1"])
    handle = agent.start_send(1, "fd", [0, 1, 2])
    agent.send_layer(handle, 0)
    store.wait([f"{run}/failed1"])
    report["abandoned"] = agent.finish_send(handle).value
    # 2. Both reconnect: a new generation (a new communicator) carries the next transfer.
    agent.connect("fd")
    store.wait([f"{run}/ready2"])
    report["after_reconnect"] = send_all(agent, 2, "fd", [3, 4, 5]).value
    # 3. The receiver's agent is closed: the sender fails within its timeout, never hangs.
    store.wait([f"{run}/closed"])
    start = time.monotonic()
    blocks = list(range(big.kv_caches[0].shape[1] // 2))
    report["receiver_gone"] = send_all(big, 3, "fd2", blocks).value
    report["receiver_gone_s"] = time.monotonic() - start
    store.set(f"{run}/finished", "1")
    agent.close()
    big.close()
    out.put(("prefill", report))


def failures_decode(port: int, device: str, run: str, out) -> None:
    store = connect_store("127.0.0.1", port, 60)
    caches = make_caches(DECODE_SEEDS["d0"], DECODE_BLOCKS, device=device)
    agent = KVTransferAgent("fd", caches, "127.0.0.1", port, timeout_s=3, role="decode")
    other = KVTransferAgent(
        "fd2", big_caches(device, stacked=True), "127.0.0.1", port, timeout_s=3, role="decode"
    )
    meet(store, run, "decode", "prefill")
    agent.connect("fp")
    other.connect("fp2")
    report = {}
    agent.expect(1, "fp", [10, 11, 12])
    store.set(f"{run}/ready1", "1")
    start = time.monotonic()
    report["stalled"] = wait_for(agent, {1}, timeout_s=15).get(1, TransferState.PENDING).value
    report["stalled_s"] = time.monotonic() - start
    store.set(f"{run}/failed1", "1")
    agent.connect("fp")
    agent.expect(2, "fp", [20, 21, 22])
    store.set(f"{run}/ready2", "1")
    done = wait_for(agent, {2}, timeout_s=15)
    report["after_reconnect"] = done.get(2, TransferState.PENDING).value
    src = make_caches(PREFILL_SEED, PREFILL_BLOCKS)
    report["exact"] = all(
        torch.equal(caches[layer][:, [20, 21, 22]].cpu(), src[layer][:, [3, 4, 5]])
        for layer in range(NUM_LAYERS)
    )
    other.close()
    store.set(f"{run}/closed", "1")
    store.wait([f"{run}/finished"])
    agent.close()
    out.put(("decode", report))


@pytest.mark.timeout(120)
@PROCESS_DEVICES
def test_stall_reconnect_and_dead_receiver_between_processes(port, devices):
    skip_without_two_gpus(devices)
    run = f"failures/{devices[0]}"
    reports = run_processes(
        [(failures_prefill, port, devices[0], run), (failures_decode, port, devices[1], run)], 90
    )
    prefill, decode = reports["prefill"], reports["decode"]
    assert decode["stalled"] == "failed" and decode["stalled_s"] < 3 + 3
    assert prefill["abandoned"] == "failed"
    assert prefill["after_reconnect"] == decode["after_reconnect"] == "done"
    assert decode["exact"]
    # gloo: the closed peer's sockets fail the sends. NCCL (2.28, 2x H200): sends to a peer
    # whose communicator was aborted were seen to complete, so the sender may say DONE. What
    # must hold is that it returns within its timeout; the decode side's poll() is the truth.
    allowed = {"failed"} if devices[0] == "cpu" else {"failed", "done"}
    assert prefill["receiver_gone"] in allowed and prefill["receiver_gone_s"] < 3 + 3


def message_per_layer_prefill(port: int, device: str, run: str, name: str, peer: str):
    """A prefill process's store, its agent (big caches, a message per layer, 3 s timeout)
    connected to `peer`, and the blocks it sends: the first half."""
    _debuggable(device)
    store = connect_store("127.0.0.1", port, 60)
    agent = KVTransferAgent(
        name, big_caches(device, seed=1), "127.0.0.1", port,
        timeout_s=3, min_message_bytes=0, role="prefill",
    )  # fmt: skip
    meet(store, run, "prefill", "decode")
    agent.connect(peer)
    return store, agent, list(range(agent.kv_caches[0].shape[1] // 2))


def stall_prefill(port: int, device: str, run: str, out) -> None:
    store, agent, blocks = message_per_layer_prefill(port, device, run, "sp", "sd")
    report = {}
    store.wait([f"{run}/ready1"])
    report["first"] = send_all(agent, 1, "sd", blocks).value
    # The sender stalls after two of its four messages were received.
    store.wait([f"{run}/ready2"])
    handle = send_first_layers(agent, 2, "sd", blocks, 2)
    store.wait([f"{run}/failed2"])
    report["abandoned"] = agent.finish_send(handle).value
    start = time.monotonic()
    agent.connect("sd")
    report["reconnect_s"] = time.monotonic() - start
    store.wait([f"{run}/ready3"])
    report["after_reconnect"] = send_all(agent, 3, "sd", blocks[::-1]).value
    store.wait([f"{run}/finished"])
    agent.close()
    out.put(("prefill", report))


def stacked_decode(port: int, device: str, run: str, name: str, peer: str):
    """A decode process's store, its agent (big caches in one allocation, as the model runner
    makes them; 3 s timeout) connected to `peer`, and its caches."""
    _debuggable(device)
    store = connect_store("127.0.0.1", port, 60)
    caches = big_caches(device, seed=2, stacked=True)
    agent = KVTransferAgent(name, caches, "127.0.0.1", port, timeout_s=3, role="decode")
    meet(store, run, "decode", "prefill")
    agent.connect(peer)
    return store, agent, caches


def stall_decode(port: int, device: str, run: str, out) -> None:
    store, agent, caches = stacked_decode(port, device, run, "sd", "sp")
    half = caches[0].shape[1] // 2
    dst = list(range(half, 2 * half))
    report = {}
    agent.expect(1, "sp", dst)
    store.set(f"{run}/ready1", "1")
    report["first"] = wait_for(agent, {1}, timeout_s=15).get(1, TransferState.PENDING).value
    agent.expect(2, "sp", dst)
    store.set(f"{run}/ready2", "1")
    start = time.monotonic()
    report["stalled"] = wait_for(agent, {2}, timeout_s=15).get(2, TransferState.PENDING).value
    report["stalled_s"] = time.monotonic() - start
    store.set(f"{run}/failed2", "1")
    start = time.monotonic()
    agent.connect("sp")
    report["reconnect_s"] = time.monotonic() - start
    agent.expect(3, "sp", dst)
    store.set(f"{run}/ready3", "1")
    done = wait_for(agent, {3}, timeout_s=15)
    report["after_reconnect"] = done.get(3, TransferState.PENDING).value
    src = [c.cpu() for c in big_caches(device, seed=1)]  # the sender's caches
    report["exact"] = all(
        torch.equal(c[:, dst].cpu(), s[:, list(range(half))[::-1]]) for c, s in zip(caches, src)
    )
    store.set(f"{run}/finished", "1")
    agent.close()
    out.put(("decode", report))


def _debuggable(device: str) -> None:
    """In a test's child process: kvtransfer's log lines, and every thread's stack on stderr if
    the process is still running after 45 s (a hang shows where it hangs)."""
    import faulthandler
    import logging

    logging.basicConfig(level=logging.INFO, format="%(process)d %(name)s: %(message)s")
    faulthandler.dump_traceback_later(45, exit=False)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)


@pytest.mark.timeout(120)
@PROCESS_DEVICES
def test_sender_stalling_after_received_messages_fails_and_the_pair_rebuilds(port, devices):
    """The stall comes after the receiver got messages of the transfer (16 MiB each on GPU, a
    layer per message): both sides fail it within their timeouts, reconnect, and the next
    transfer lands. (Session 9 saw the NCCL reconnect time out after such a stall.)"""
    skip_without_two_gpus(devices)
    run = f"stall-later/{devices[0]}"
    reports = run_processes(
        [(stall_prefill, port, devices[0], run), (stall_decode, port, devices[1], run)], 90
    )
    prefill, decode = reports["prefill"], reports["decode"]
    assert prefill["first"] == decode["first"] == "done"
    assert decode["stalled"] == "failed" and decode["stalled_s"] < 3 + 3
    assert prefill["abandoned"] == "failed"
    assert prefill["reconnect_s"] < 3 and decode["reconnect_s"] < 3
    assert prefill["after_reconnect"] == decode["after_reconnect"] == "done"
    assert decode["exact"]


# A value no transfer carries: blocks handed to another request are filled with it.
SENTINEL = 7.0


def queued_prefill(port: int, device: str, run: str, out) -> None:
    store, agent, blocks = message_per_layer_prefill(port, device, run, "qp", "qd")
    report = {}
    # 1: two of four messages, then the rest only after the receiver cancelled.
    store.wait([f"{run}/ready1"])
    handle = send_first_layers(agent, 1, "qd", blocks, 2)
    store.set(f"{run}/half1", "1")
    store.wait([f"{run}/cancelled1"])
    agent.send_layer(handle, 2)
    agent.send_layer(handle, 3)
    report["cancelled"] = agent.finish_send(handle).value
    store.wait([f"{run}/ready2"])
    report["after_cancel"] = send_all(agent, 2, "qd", blocks).value
    # 3: two of four messages, then a stall past the receiver's timeout.
    store.wait([f"{run}/ready3"])
    handle = send_first_layers(agent, 3, "qd", blocks, 2)
    store.wait([f"{run}/failed3"])
    report["stalled"] = agent.finish_send(handle).value
    store.wait([f"{run}/finished"])
    agent.close()
    out.put(("prefill", report))


def queued_decode(port: int, device: str, run: str, out) -> None:
    store, agent, caches = stacked_decode(port, device, run, "qd", "qp")
    half = caches[0].shape[1] // 2
    dst, dst2 = list(range(half, 2 * half)), list(range(half))
    report = {"queued": agent._guard is not None}
    # NOTE: this process's own kernels load before any receive runs: with CUDA's lazy module
    # loading, a first launch while NCCL receives wait for their data can wait for them, and
    # the sender here waits for this process's cancel. The blocks start as the sentinel.
    for c in caches:
        c[:, dst] = SENTINEL
    assert all(bool((c[:, dst] == SENTINEL).all()) for c in caches)

    def sentinel_in_late_layers() -> bool:  # layers 2 and 3: their messages came late or never
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        return all(bool((c[:, dst] == SENTINEL).all()) for c in caches[2:])

    agent.expect(1, "qp", dst)
    store.set(f"{run}/ready1", "1")
    store.wait([f"{run}/half1"])
    time.sleep(0.3)  # layers 0-1 land; on GPU the scatters of 2-3 wait behind their receives
    start = time.monotonic()
    agent.cancel(1)
    report["cancel_s"] = time.monotonic() - start
    for c in caches:  # the scheduler hands the blocks to another request, which writes them
        c[:, dst] = SENTINEL
    store.set(f"{run}/cancelled1", "1")
    agent.expect(2, "qp", dst2)
    store.set(f"{run}/ready2", "1")
    report["after_cancel"] = wait_for(agent, {2}, timeout_s=15).get(2, TransferState.PENDING).value
    report["cancel_wrote_nothing"] = sentinel_in_late_layers()
    src = [c.cpu() for c in big_caches(device, seed=1)]
    report["exact"] = all(torch.equal(c[:, dst2].cpu(), s[:, :half]) for c, s in zip(caches, src))

    agent.expect(3, "qp", dst)
    store.set(f"{run}/ready3", "1")
    report["stalled"] = wait_for(agent, {3}, timeout_s=15).get(3, TransferState.PENDING).value
    time.sleep(0.5)  # the broken pair's receives end; scatters still queued behind them run
    report["failure_wrote_nothing"] = sentinel_in_late_layers()
    store.set(f"{run}/failed3", "1")
    store.set(f"{run}/finished", "1")
    agent.close()
    out.put(("decode", report))


@pytest.mark.timeout(120)
@PROCESS_DEVICES
def test_nothing_is_written_after_cancel_or_failure(port, devices):
    """Once `cancel` returns, or a transfer is reported FAILED, its blocks may go to another
    request: nothing of the transfer may land in them later. On GPU the decode agent queues
    each scatter behind its receive before the data comes (kvtransfer.scatter), so this is what
    the guard must stop: the scatters of the two messages still to come when the transfer is
    cancelled, and of the two a stalled sender never sends."""
    skip_without_two_gpus(devices)
    run = f"queued/{devices[0]}"
    reports = run_processes(
        [(queued_prefill, port, devices[0], run), (queued_decode, port, devices[1], run)], 90
    )
    prefill, decode = reports["prefill"], reports["decode"]
    assert decode["queued"] == devices[1].startswith("cuda")
    assert prefill["cancelled"] == "done"  # the receiver drained the rest
    assert decode["cancel_s"] < 1.0
    assert prefill["after_cancel"] == decode["after_cancel"] == "done"
    assert decode["exact"]
    assert decode["cancel_wrote_nothing"]
    assert prefill["stalled"] == decode["stalled"] == "failed"
    assert decode["failure_wrote_nothing"]


# ---------------------------------------------------------------- threads, one process


def connect_both(prefill: KVTransferAgent, decode: KVTransferAgent) -> None:
    errors = []

    def run():
        try:
            decode.connect(prefill.worker_id)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        prefill.connect(decode.worker_id)
    except Exception as e:
        thread.join()
        # NOTE: say what the decode side did too: a reconnect once timed out on the prefill
        # side in CI (test_failed_header_push_..., 2026-11-26) with no trace of the other side.
        e.add_note(f"decode side's connect: {errors or 'returned'}")
        raise
    thread.join()
    assert not errors


@pytest.fixture
def pair(port):
    """A connected prefill/decode pair in this process, 1 s timeout, a message per layer."""
    prefill = KVTransferAgent(
        "p", make_caches(PREFILL_SEED, PREFILL_BLOCKS), "127.0.0.1", port,
        timeout_s=1.0, min_message_bytes=0, role="prefill",
    )  # fmt: skip
    decode = KVTransferAgent(
        "d", make_caches(DECODE_SEEDS["d0"], DECODE_BLOCKS), "127.0.0.1", port,
        timeout_s=1.0, role="decode",
    )  # fmt: skip
    connect_both(prefill, decode)
    yield prefill, decode
    prefill.close()
    decode.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("min_message_bytes", [0, 1000, 2500, 1 << 30])
@pytest.mark.parametrize(
    "segment_bytes, ahead_bytes", [(256 << 20, 512 << 20), (1, 1), (2500, 5000)]
)  # receiver: one segment, all posted; a buffer and a receive at a time; a few of each
def test_coalescing_settings_give_identical_blocks(
    port, min_message_bytes, segment_bytes, ahead_bytes, monkeypatch
):
    monkeypatch.setattr(kvtransfer.receiver, "SEGMENT_BYTES", segment_bytes)
    monkeypatch.setattr(kvtransfer.receiver, "RECV_AHEAD_BYTES", ahead_bytes)
    src = make_caches(PREFILL_SEED, PREFILL_BLOCKS, num_layers=7)
    dst = make_caches(DECODE_SEEDS["d0"], DECODE_BLOCKS, num_layers=7)
    want = [t.clone() for t in dst]
    prefill = KVTransferAgent(
        "p", src, "127.0.0.1", port, min_message_bytes=min_message_bytes, role="prefill"
    )
    decode = KVTransferAgent("d", dst, "127.0.0.1", port, role="decode")
    connect_both(prefill, decode)
    transfers = [
        (1, [3, 1, 4], [40, 2, 17]),
        (2, [15, 9], [0, 47]),
        (3, [26, 5, 35, 8], [9, 8, 7, 6]),
    ]
    for tid, src_blocks, dst_blocks in transfers:
        decode.expect(tid, "p", dst_blocks)
        assert send_all(prefill, tid, "d", src_blocks) is DONE
        for layer in range(7):
            want[layer][:, dst_blocks] = src[layer][:, src_blocks]
    assert wait_for(decode, {1, 2, 3}, timeout_s=10) == {1: DONE, 2: DONE, 3: DONE}
    assert all(torch.equal(d, w) for d, w in zip(dst, want))
    prefill.close()
    decode.close()


@pytest.mark.timeout(30)
def test_cancel_mid_transfer_drains_and_writes_nothing_more(pair):
    prefill, decode = pair
    before = [t.clone() for t in decode.kv_caches]
    decode.expect(1, "p", [10, 11])
    handle = prefill.start_send(1, "d", [0, 1])
    prefill.send_layer(handle, 0)
    prefill.send_layer(handle, 1)
    time.sleep(0.2)  # layers 0-1 may well be written: the blocks were still reserved then
    decode.cancel(1)
    for layer in range(2, NUM_LAYERS):
        prefill.send_layer(handle, layer)
    assert prefill.finish_send(handle) is DONE  # the receiver drained the rest
    decode.expect(2, "p", [12])
    assert send_all(prefill, 2, "d", [5]) is DONE
    assert wait_for(decode, {2}, timeout_s=5) == {2: DONE}  # the cancelled one is never reported
    for layer in range(2, NUM_LAYERS):
        assert torch.equal(decode.kv_caches[layer][:, [10, 11]], before[layer][:, [10, 11]])
    assert torch.equal(decode.kv_caches[0][:, 12], prefill.kv_caches[0][:, 5])


@pytest.mark.timeout(30)
def test_on_result_is_called_once_per_reported_result(pair):
    """Each result is there to poll when its call comes: here only the callback polls."""
    prefill, decode = pair
    calls, seen = [], {}

    def on_result():
        calls.append(1)
        seen.update(decode.poll())

    decode.on_result = on_result
    decode.expect(1, "p", [10, 11])
    assert send_all(prefill, 1, "d", [0, 1]) is DONE
    decode.expect(2, "p", [12])  # the sender sends two blocks: FAILED on the receiver
    send_all(prefill, 2, "d", [3, 4])
    decode.expect(3, "p", [13])
    decode.cancel(3)
    send_all(prefill, 3, "d", [5])  # drained, never reported
    decode.expect(4, "p", [14])
    assert send_all(prefill, 4, "d", [6]) is DONE
    deadline = time.monotonic() + 5
    while len(seen) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert seen == {1: DONE, 2: FAILED, 4: DONE}
    assert len(calls) == 3


@pytest.mark.timeout(30)
def test_stalled_sender_fails_within_timeout_and_pair_rebuilds(pair):
    prefill, decode = pair
    generation = decode.generation("p")
    decode.expect(1, "p", [10, 11])
    handle = prefill.start_send(1, "d", [0, 1])
    prefill.send_layer(handle, 0)  # ...and nothing more: the sender stalls
    start = time.monotonic()
    assert wait_for(decode, {1}, timeout_s=5) == {1: FAILED}
    assert 0.9 < time.monotonic() - start < 1 + 3
    assert decode.generation("p") is None  # broken
    assert prefill.finish_send(handle) is FAILED  # abandoned before its last layer
    connect_both(prefill, decode)
    assert decode.generation("p") > generation
    decode.expect(2, "p", [12])
    assert send_all(prefill, 2, "d", [5]) is DONE
    assert wait_for(decode, {2}, timeout_s=5) == {2: DONE}


@pytest.mark.timeout(30)
def test_failed_preparation_fails_the_transfer_without_blocking_the_step(pair, monkeypatch):
    """The pusher thread prepares each transfer (index, buffers); if that fails, the pair
    breaks and send_layer returns at once instead of waiting for a preparation that never
    comes; a rebuilt pair carries the next transfer."""
    prefill, decode = pair
    decode.expect(1, "p", [10, 11])

    def fail(handle):
        raise RuntimeError("out of memory (injected)")

    monkeypatch.setattr(prefill, "_prepare_send", fail)
    handle = prefill.start_send(1, "d", [0, 1])
    start = time.monotonic()
    for layer in range(NUM_LAYERS):
        prefill.send_layer(handle, layer)
    assert prefill.finish_send(handle) is FAILED
    assert time.monotonic() - start < 1  # well under the 1 s timeout: the break woke it
    assert wait_for(decode, {1}, timeout_s=5) == {1: FAILED}
    monkeypatch.undo()
    connect_both(prefill, decode)
    decode.expect(2, "p", [12])
    assert send_all(prefill, 2, "d", [5]) is DONE
    assert wait_for(decode, {2}, timeout_s=5) == {2: DONE}
    assert torch.equal(decode.kv_caches[1][:, 12], prefill.kv_caches[1][:, 5])


@pytest.mark.timeout(30)
def test_sender_fails_within_timeout_when_receiver_is_gone(pair):
    prefill, decode = pair
    decode.close()  # the receiver stops receiving
    handle = prefill.start_send(1, "d", [0, 1])
    for layer in range(NUM_LAYERS):
        prefill.send_layer(handle, layer)
    start = time.monotonic()
    assert prefill.finish_send(handle) is FAILED
    assert time.monotonic() - start < 1 + 3
    assert prefill.start_send(2, "d", [0]).state is FAILED  # until connect rebuilds the pair


@pytest.mark.timeout(60)
def test_failed_header_push_fails_the_transfer_and_the_pair_rebuilds(port, monkeypatch):
    # 5 s, not the `pair` fixture's 1 s: the reconnect below handshakes twice (the decode side
    # never heard of the break), which a loaded CI machine could not always do within 1 s.
    prefill = KVTransferAgent(
        "p-push", make_caches(PREFILL_SEED, PREFILL_BLOCKS), "127.0.0.1", port,
        timeout_s=5.0, min_message_bytes=0, role="prefill",
    )  # fmt: skip
    decode = KVTransferAgent(
        "d-push", make_caches(DECODE_SEEDS["d0"], DECODE_BLOCKS), "127.0.0.1", port,
        timeout_s=5.0, role="decode",
    )  # fmt: skip
    connect_both(prefill, decode)
    try:
        check_failed_header_push(prefill, decode, monkeypatch)
    finally:
        prefill.close()
        decode.close()


def check_failed_header_push(prefill, decode, monkeypatch) -> None:

    class Refusing:  # the pair's store connection, failing every push
        def queue_push(self, key, value):
            raise ConnectionError("store gone")

    class SlowToMark:  # the agent's store connection, slow to mark a hello broken
        def __init__(self, store):
            self.store = store

        def compare_set(self, *args):
            time.sleep(0.3)
            return self.store.compare_set(*args)

        def __getattr__(self, name):
            return getattr(self.store, name)

    monkeypatch.setattr(prefill._pairs["d-push"], "client", Refusing())
    monkeypatch.setattr(prefill, "_store", SlowToMark(prefill._store))
    decode.expect(1, "p-push", [10, 11])
    handle = prefill.start_send(1, "d-push", [0, 1])  # returns at once: the header is pushed later
    for layer in range(NUM_LAYERS):
        prefill.send_layer(handle, layer)
    assert prefill.finish_send(handle) is FAILED  # within the timeout, not hanging
    assert prefill.generation("d-push") is None
    # Before the step thread learnt of the break, the store did: the decode side's `connect`
    # must not take the old hello for a live pair (it skipped the handshake, ours timed out).
    monkeypatch.undo()
    assert read_hello(prefill._store, "baton/pair/p-push/d-push/hello/prefill") is None
    decode.cancel(1)
    connect_both(prefill, decode)
    decode.expect(2, "p-push", [12])
    assert send_all(prefill, 2, "d-push", [5]) is DONE
    assert wait_for(decode, {2}, timeout_s=5) == {2: DONE}


@pytest.mark.timeout(30)
def test_block_count_mismatch_fails_on_receiver_and_pair_survives(pair):
    prefill, decode = pair
    decode.expect(1, "p", [10, 11, 12])
    assert send_all(prefill, 1, "d", [0, 1]) is DONE  # drained on the other side
    decode.expect(2, "p", [13])
    assert send_all(prefill, 2, "d", [2]) is DONE
    assert wait_for(decode, {1, 2}, timeout_s=5) == {1: FAILED, 2: DONE}


@pytest.mark.timeout(30)
def test_connect_times_out_when_peer_never_comes(port):
    agent = KVTransferAgent(
        "p", make_caches(0, 4), "127.0.0.1", port, timeout_s=0.5, role="prefill"
    )
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        agent.connect("ghost")
    assert time.monotonic() - start < 0.5 + 3
    agent.close()


@pytest.mark.timeout(30)
def test_connect_is_idempotent_and_rejects_other_layouts(port):
    prefill = KVTransferAgent("p", make_caches(0, 4), "127.0.0.1", port, role="prefill")
    decode = KVTransferAgent("d", make_caches(1, 6), "127.0.0.1", port, role="decode")
    connect_both(prefill, decode)
    generation = prefill.generation("d")
    prefill.connect("d")
    decode.connect("p")
    assert prefill.generation("d") == decode.generation("p") == generation
    other = KVTransferAgent(
        "d2", make_caches(1, 6, num_layers=3), "127.0.0.1", port, timeout_s=2, role="decode"
    )
    with pytest.raises(ValueError, match="layout"):
        connect_both(prefill, other)
    for agent in (prefill, decode, other):
        agent.close()


@pytest.mark.timeout(30)
def test_disconnect_lets_a_restarted_peer_in(port):
    """A peer that died without a word left its hello standing: the survivor drops the pair
    (`disconnect`), then a new process under the same id builds a new generation with it."""
    prefill = KVTransferAgent(
        "p", make_caches(0, 4), "127.0.0.1", port, timeout_s=2, role="prefill"
    )
    decode = KVTransferAgent("d", make_caches(1, 6), "127.0.0.1", port, timeout_s=2, role="decode")
    connect_both(prefill, decode)
    generation = prefill.generation("d")
    reborn = KVTransferAgent("d", make_caches(2, 6), "127.0.0.1", port, timeout_s=2, role="decode")
    prefill.disconnect("d")
    assert prefill.generation("d") is None
    connect_both(prefill, reborn)
    assert prefill.generation("d") > generation
    reborn.expect(1, "p", [4])
    assert send_all(prefill, 1, "d", [2]) is DONE
    assert wait_for(reborn, {1}, timeout_s=5) == {1: DONE}
    assert torch.equal(reborn.kv_caches[0][:, 4], prefill.kv_caches[0][:, 2])
    for agent in (prefill, decode, reborn):
        agent.close()


def test_bad_calls_get_clear_errors(pair):
    prefill, decode = pair
    with pytest.raises(ValueError, match="duplicates"):
        prefill.start_send(1, "d", [1, 1])
    with pytest.raises(ValueError, match="lie in"):
        decode.expect(1, "p", [DECODE_BLOCKS])
    with pytest.raises(RuntimeError, match="prefill"):
        decode.start_send(1, "p", [0])
    decode.expect(1, "p", [0])
    with pytest.raises(ValueError, match="already expected"):
        decode.expect(1, "p", [1])
    handle = prefill.start_send(1, "d", [0])
    with pytest.raises(ValueError, match="expected layer 0"):
        prefill.send_layer(handle, 1)
    with pytest.raises(ValueError, match="role"):
        KVTransferAgent("x", prefill.kv_caches, "127.0.0.1", 1, role="both")
    with pytest.raises(ValueError, match="backend"):
        KVTransferAgent("x", prefill.kv_caches, "127.0.0.1", 1, backend="nccl", role="decode")


class FakeWork:
    """An NCCL-like work: `is_completed` turns True at a given time, or at its n-th call; `wait`
    never blocks."""

    def __init__(self, done_after_s: float = float("inf"), done_after_polls: int | None = None):
        self.done_at = time.monotonic() + done_after_s
        self.polls_left = done_after_polls
        self.waited = False

    def is_completed(self) -> bool:
        if self.polls_left is not None:
            self.polls_left -= 1
            return self.polls_left < 0
        return time.monotonic() >= self.done_at

    def wait(self) -> bool:
        self.waited = True
        return True


def test_polled_wait_spins_for_a_message_then_backs_off_until_timeout(monkeypatch):
    import kvtransfer.pair

    sleeps = []
    real_sleep = time.sleep
    monkeypatch.setattr(kvtransfer.pair.time, "sleep", lambda s: (sleeps.append(s), real_sleep(s)))
    # Done at the 4th poll, and a spin phase no stall of the machine can outlast: counted in
    # polls, not time (a 0.5 ms fake once completed before the first poll on a slow CI machine).
    with monkeypatch.context() as m:
        m.setattr(kvtransfer.pair, "_POLL_SPIN_S", 60.0)
        work = FakeWork(done_after_polls=3)
        wait_work(work, "nccl", timeout_s=1.0)
    # 2 us sleeps, which leave the GIL to other threads: noticed within microseconds. The first
    # poll comes before the loop: two sleeps.
    assert work.waited and sleeps == [kvtransfer.pair._POLL_SPIN_SLEEP_S] * 2
    sleeps.clear()
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        wait_work(FakeWork(10.0), "nccl", timeout_s=0.05)
    assert 0.05 <= time.monotonic() - start < 0.5
    assert 0 < max(sleeps) <= 200e-6  # past the spin phase: short sleeps, capped


def test_receive_segments_group_consecutive_messages_up_to_the_segment_size(monkeypatch):
    monkeypatch.setattr(kvtransfer.receiver, "SEGMENT_BYTES", 4 << 20)
    plan = [(0, 1), (1, 2), (3, 2), (5, 2), (7, 1)]
    # 1 MiB a layer: layers 0-2 (3 MiB), 3-6 (4 MiB), then 7 alone
    assert _segments(plan, 1 << 20) == [(0, 0, 3), (0, 0, 3), (1, 3, 4), (1, 3, 4), (2, 7, 1)]
    # a message larger than a segment is a segment of its own
    assert _segments(plan, 3 << 20) == [(0, 0, 1), (1, 1, 2), (2, 3, 2), (3, 5, 2), (4, 7, 1)]


def test_scatter_groups_join_messages_up_to_the_limit_and_leave_the_last_alone():
    mib = 1 << 20
    plan = [(layer, 1) for layer in range(6)]
    assert _message_runs(plan, mib, 3 * mib) == [(0, 3), (3, 2), (5, 1)]
    plan = message_plan(8, 3)  # (0, 3), (3, 3), (6, 1), (7, 1)
    assert _message_runs(plan, mib, 4 * mib) == [(0, 1), (1, 2), (3, 1)]
    assert _message_runs(plan, mib, 1) == [(0, 1), (1, 1), (2, 1), (3, 1)]
    assert _message_runs([(0, 32)], mib, 1) == [(0, 1)]


def test_message_plan_covers_every_layer_once():
    assert message_plan(5, 2) == [(0, 2), (2, 2), (4, 1)]
    assert message_plan(6, 2) == [(0, 2), (2, 2), (4, 1), (5, 1)]
    assert message_plan(32, 32) == [(0, 31), (31, 1)]
    assert message_plan(3, 1) == [(0, 1), (1, 1), (2, 1)]
    assert message_plan(1, 4) == [(0, 1)]
    for layers in range(1, 12):
        for per_message in range(1, 14):
            plan = message_plan(layers, per_message)
            assert [f + i for f, c in plan for i in range(c)] == list(range(layers))
            assert all(c <= per_message for _, c in plan)
    assert layers_per_message(layer_bytes=8 << 20, min_message_bytes=16 << 20, num_layers=32) == 2
    assert layers_per_message(layer_bytes=8 << 20, min_message_bytes=0, num_layers=32) == 1
    assert layers_per_message(layer_bytes=1, min_message_bytes=1 << 30, num_layers=32) == 32


def test_store_helpers_roundtrip():
    store, port = start_store()
    client = connect_store("127.0.0.1", port, 5)
    client.set("k", "v")
    assert store.get("k") == b"v"
    assert client.timeout == timedelta(seconds=5)


def test_backend_choice_fits_the_device():
    cpu = torch.device("cpu")
    assert choose_backend("auto", cpu) == "gloo"
    assert choose_backend("gloo", cpu) == "gloo"
    for backend in ("nccl", "torch-nccl", "mpi"):
        with pytest.raises(ValueError, match="does not fit"):
            choose_backend(backend, cpu)
    if not torch.cuda.is_available():
        assert not nccl.available()  # a CPU build: nothing to load, and no error either
        return
    cuda = torch.device("cuda", 0)
    assert choose_backend("auto", cuda) == ("nccl" if nccl.available() else "torch-nccl")
    with pytest.raises(ValueError, match="does not fit"):
        choose_backend("gloo", cuda)


@pytest.mark.gpu
def test_nccl_library_loads_with_torch():
    """On a CUDA build of torch the NCCL it ships loads through ctypes (the `nccl` backend)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    lib = nccl.library()
    assert lib is not None, "no NCCL library loaded; the agent falls back to torch-nccl"
    assert lib.version() >= 21800  # ncclCommAbort, ncclCommGetAsyncError, p2p send / recv


@pytest.mark.gpu
@pytest.mark.timeout(60)
def test_nccl_comm_moves_bytes_and_an_abort_fails_a_pending_receive(port):
    """NcclComm between two GPUs of this process (one thread per rank): a send lands exactly;
    a receive nobody sends to stays pending until `abort`, after which its `wait` raises and
    the communicator refuses new work."""
    if torch.cuda.device_count() < 2 or not nccl.available():
        pytest.skip("needs 2 GPUs and NCCL's library")
    comms = {}

    def connect(rank: int) -> None:
        # NOTE: NCCL connects a pair at its first send / receive, and that call blocks until
        # the peer's first call: one thread per rank, as the agent's processes do.
        torch.cuda.set_device(rank)
        client = connect_store("127.0.0.1", port, 30)
        comm = nccl.NcclComm.connect(client, "test/ncclcomm", rank, 30)
        probe = torch.ones(1, device=f"cuda:{rank}")
        wait_work(comm.send([probe], 1) if rank == 0 else comm.recv([probe], 0), "nccl", 30)
        comms[rank] = comm

    threads = [threading.Thread(target=connect, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert set(comms) == {0, 1}
    src = torch.randint(0, 255, (3 << 20,), dtype=torch.uint8, device="cuda:0")
    dst = torch.zeros_like(src, device="cuda:1")
    with torch.cuda.device(1):
        received = comms[1].recv([dst], 0)
    with torch.cuda.device(0):
        sent = comms[0].send([src], 1)
    for work in (sent, received):
        wait_work(work, "nccl", 10)
    torch.cuda.synchronize(1)
    assert torch.equal(dst.cpu(), src.cpu())

    with torch.cuda.device(1):
        pending = comms[1].recv([dst], 0)
        time.sleep(0.2)
        assert not pending.is_completed()
        comms[1].abort()
        # the receive's kernel exits (seen on 2x H200, NCCL 2.28): nothing stays on the GPU
        with pytest.raises(nccl.NcclError, match="aborted"):
            wait_work(pending, "nccl", 10)
        assert pending.is_completed()
        with pytest.raises(nccl.NcclError, match="aborted"):
            comms[1].recv([dst], 0)
    comms[0].abort()


@pytest.mark.timeout(120)
def test_kv_transfer_benchmark_runs_on_cpu(tmp_path):
    """benchmarks.kv_transfer on CPU (two processes, gloo): every table, with its timings in
    the JSON. The GPU run compares the `nccl` and `torch-nccl` backends the same way."""
    output = tmp_path / "kv.json"
    args = ["--device", "cpu", "--tokens", "256", "--min-message-bytes", "0,16M"]
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.kv_transfer", *args, "--repeats", "2"]
        + ["--json", str(output)],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "== backend gloo" in done.stdout
    for kind in ("-- agent", "-- ahead", "-- polled"):
        assert kind in done.stdout
    assert "      gloo    256     16M" in done.stdout  # the TTFT rows
    prefill = json.loads(output.read_text())["results"]["prefill"]["gloo"]
    assert len(prefill["raw"]["256"]) == 2 and len(prefill["ahead"]["256/0"]) == 2
    assert all(t > 0 for t in prefill["polled"]["256/16777216"])


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "ahead_bytes, scatter_bytes", [(512 << 20, 64 << 20), (1, 1), (2500, 1000), (5000, 2500)]
)
def test_queued_receive_posts_windows_and_groups_that_land_exactly(
    port, ahead_bytes, scatter_bytes, monkeypatch
):
    """The NCCL receiver's bookkeeping (kvtransfer.receiver._receive_launched: receive windows,
    scatter groups, one buffer per group) on CPU. Its GPU half is replaced by a double: a
    "queued" scatter is recorded, and runs when the transfer finishes, after its receives."""
    monkeypatch.setattr(kvtransfer.receiver, "RECV_AHEAD_BYTES", ahead_bytes)
    monkeypatch.setattr(kvtransfer.receiver, "SCATTER_BYTES", scatter_bytes)
    src = make_caches(PREFILL_SEED, PREFILL_BLOCKS, num_layers=7, stacked=True)
    dst = make_caches(DECODE_SEEDS["d0"], DECODE_BLOCKS, num_layers=7, stacked=True)
    want = [t.clone() for t in dst]
    prefill = KVTransferAgent(
        "p", src, "127.0.0.1", port, timeout_s=5, min_message_bytes=0, role="prefill"
    )
    decode = KVTransferAgent("d", dst, "127.0.0.1", port, timeout_s=5, role="decode")
    queued = []

    def launch(expectation, index, first, buf, work):
        queued.append((index, first, buf))
        return True

    def finish(expectation, failed):
        while queued:
            index, first, buf = queued.pop(0)
            decode._scatter(index, first, len(buf), buf)
        finish_for_real(expectation, failed)

    finish_for_real = decode._finish
    decode._guard = Guard(torch.device("cpu"))  # the queued path
    monkeypatch.setattr(decode, "_launch_scatter", launch)
    monkeypatch.setattr(decode, "_finish", finish)
    connect_both(prefill, decode)
    for tid, src_blocks, dst_blocks in [(1, [3, 1, 4], [40, 2, 17]), (2, [15, 9], [0, 47])]:
        decode.expect(tid, "p", dst_blocks)
        assert send_all(prefill, tid, "d", src_blocks) is DONE
        for layer in range(7):
            want[layer][:, dst_blocks] = src[layer][:, src_blocks]
    assert wait_for(decode, {1, 2}, timeout_s=10) == {1: DONE, 2: DONE}
    assert all(torch.equal(d, w) for d, w in zip(dst, want))
    prefill.close()
    decode.close()


def test_timeline_stamps_keep_a_transfer_working_and_log_its_phases(port, monkeypatch):
    """benchmarks/kv_timeline wraps the agent's internals to stamp phases; on CPU (gloo: no
    posts through NcclComm, no queued scatters) the wrapped agent still delivers the KV, the
    sender and receiver logs hold the phases, and `phases` reads them."""
    import benchmarks.kv_timeline as timeline

    for cls, name in [
        (timeline.nccl_module.NcclComm, "_post"),
        (KVTransferAgent, "_wait_prepared"),
        (KVTransferAgent, "_post_sends"),
        (KVTransferAgent, "_finish"),
        (timeline.scatter_module.Guard, "launch"),
    ]:
        monkeypatch.setattr(cls, name, getattr(cls, name))  # restored after the test
    monkeypatch.setattr(timeline.receiver_module, "wait_work", timeline.receiver_module.wait_work)
    timeline._stamp_internals()
    src = make_caches(PREFILL_SEED, PREFILL_BLOCKS, stacked=True)
    dst = make_caches(DECODE_SEEDS["d0"], DECODE_BLOCKS, stacked=True)
    prefill = KVTransferAgent("tp", src, "127.0.0.1", port, timeout_s=5, role="prefill")
    decode = KVTransferAgent("td", dst, "127.0.0.1", port, timeout_s=5, role="decode")
    connect_both(prefill, decode)
    decode.expect(7, "tp", [5, 9])
    timeline._LOG.clear()
    start = time.perf_counter()
    assert send_all(prefill, 7, "td", [1, 2]) is DONE
    assert wait_for(decode, {7}, timeout_s=10) == {7: DONE}
    log = list(timeline._LOG)  # both agents share this process's log here
    assert all(torch.equal(d[:, [5, 9]], s[:, [1, 2]]) for d, s in zip(dst, src))
    names = [entry[0] for entry in log]
    assert {"wait_prepared", "post_sends", "receiver_wait", "finish"} <= set(names)
    row = timeline.phases(
        {"start": start, "sent": time.perf_counter(), "end": time.perf_counter(), "log": log},
        {"log": log},
    )
    assert 0 <= row["wait_prepared: called"] <= row["receiver thread: _finish"]
    assert row["receiver thread: wait 0 returned"] <= row["receiver thread: _finish"]
    prefill.close()
    decode.close()
