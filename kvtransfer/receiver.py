"""The decode side's thread per connected pair: header, then that transfer's messages, in order.

The sender's order defines what comes next on a pair, so the thread never has to match messages
to transfers: after a header it receives exactly the messages the header announces, then waits
for the next header. Idle, it blocks in the store's queue (cheap, no GPU work pending); once a
header arrived, every wait is bounded by the agent's `timeout_s`.

Two ways to land the messages in the blocks:
  queued (NCCL, the agent's `_guard` set)  each group's scatter is queued on the GPU behind its
      receives before any data comes (kvtransfer.scatter): it runs as the last byte lands, and
      the thread only waits. Against the other way on 2x H200, 64 MiB messages, four runs
      (benchmarks/RESULTS.md, 2026-11-27): a 512-token transfer 0.02-0.15 ms sooner in all 8
      paired cells, and the TTFT it adds 3.4-4.8% of the prefill instead of 5.0-6.3%.
  host (gloo, torch-nccl)  the thread waits for each message, then launches the scatter of
      everything that arrived since.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

import torch

from kvtransfer.nccl import NcclWork
from kvtransfer.pair import wait_work
from kvtransfer.protocol import BROKEN, CLOSE, Header, message_plan

if TYPE_CHECKING:
    from kvtransfer.agent import KVTransferAgent, _Expectation, _Pair

log = logging.getLogger(__name__)

# Receives posted ahead of the one being waited on, in bytes (at least one message). A posted
# receive cost ~60-150 us of host time through ProcessGroupNCCL (the `torch-nccl` backend), so
# the thread never waits for the next post between two messages if the window holds a few of
# them: with 64 MiB messages on an H100 (~200 us each on the wire) a window of 3 messages left
# the last receive posted ~270 us late (traced 2026-11-26).
RECV_AHEAD_BYTES = 512 << 20
# Consecutive messages land in one buffer of up to this size (a message larger than it gets its
# own), so that messages that arrived while the thread was busy are scattered by one kernel.
SEGMENT_BYTES = 256 << 20
# NCCL (scatters queued behind their receives): consecutive messages share one scatter of up to
# this size, launched once the last of them is posted; the last message always has its own. A
# scatter queued on the GPU costs ~50 us of this thread's time, while it may be posting the next
# receives; at ~3 TB/s one of 64 MiB takes ~20 us, less than the next message's time on the wire.
SCATTER_BYTES = 64 << 20


class Receiver(threading.Thread):
    def __init__(self, agent: KVTransferAgent, pair: _Pair, queue_client):
        super().__init__(name=f"kvtransfer-recv-{pair.peer_id}", daemon=True)
        self.agent = agent
        self.pair = pair
        self.queue_client = queue_client  # this thread's own store connection: it blocks on it

    def run(self) -> None:
        layout = self.agent.layout
        on_cuda = layout.device.type == "cuda"
        if on_cuda:
            torch.cuda.set_device(layout.device)
        with torch.cuda.stream(self.pair.stream) if on_cuda else contextlib.nullcontext():
            while not self.pair.broken:
                header = self._next_header()
                if header is None or header.kind == CLOSE:
                    return
                if header.kind == BROKEN:
                    # the sender logged why; a closing sender is routine
                    self.agent._break(self.pair, "the sender broke the pair", quiet=True)
                    return
                if not self._receive(header):
                    return

    def _next_header(self) -> Header | None:
        while not self.pair.broken:
            start = time.monotonic()
            try:
                return Header.decode(self.queue_client.queue_pop(self.pair.queue_key))
            except Exception as e:
                if self.pair.broken:
                    return None
                if time.monotonic() - start > 60:
                    continue  # the (day-long) idle wait expired: keep waiting
                self.agent._break(self.pair, f"header queue failed: {e}")
                return None
        return None

    def _receive(self, header: Header) -> bool:
        """Receive one transfer. Returns False if the pair broke (the thread then stops)."""
        agent, pair = self.agent, self.pair
        expectation = agent._claim(header.transfer_id, pair.peer_id, header.num_blocks)
        try:
            if agent._guard is not None:
                self._receive_launched(header, expectation)
            else:
                self._receive_scattering(header, expectation)
        except Exception as e:
            if expectation is not None:
                agent._stop_scatters(expectation)  # before the blocks can go back to the pool
                agent._finish(expectation, failed=True)
            agent._break(pair, f"receiving transfer {header.transfer_id} failed: {e}")
            return False
        if expectation is not None:
            agent._finish(expectation, failed=False)  # a no-op if it was cancelled
        return True

    def _receive_launched(self, header: Header, expectation: _Expectation | None) -> None:
        """NCCL: receives posted RECV_AHEAD_BYTES ahead of the wire, and behind them on this
        thread's stream the (guarded) scatters, one per group of messages (`_message_runs`),
        queued before a byte has arrived; then wait for the receives (each bounded, each
        checked for an abort) but the last, and then the last scatter, which runs after it.
        A window's receives are all posted before its scatters are queued: a receive posted
        late holds the sender back (queueing each scatter right after its receive halved the
        bandwidth of 32 16-MiB messages)."""
        agent, pair, layout = self.agent, self.pair, self.agent.layout
        plan = message_plan(layout.num_layers, header.layers_per_message)
        layer_bytes = layout.layer_bytes(header.num_blocks)
        groups = _message_runs(plan, layer_bytes, SCATTER_BYTES)
        group_of = [g for g, (_, count) in enumerate(groups) for _ in range(count)]
        index = None
        works: list = []  # per message posted, its receive; works[waited:] not waited for yet
        buffers: dict[int, torch.Tensor] = {}  # per group, until its scatter is queued
        waited, next_group = 0, 0
        while waited < len(plan):
            while len(works) < len(plan):  # post the window
                message = len(works)
                first, count = plan[message]
                in_flight = sum(c for _, c in plan[waited:message]) * layer_bytes
                if message > waited and in_flight + count * layer_bytes > RECV_AHEAD_BYTES:
                    break
                group = group_of[message]
                group_start, group_len = groups[group]
                group_first = plan[group_start][0]
                if message == group_start:
                    layers = sum(c for _, c in plan[group_start : group_start + group_len])
                    shape = layout.message_shape(layers, header.num_blocks)
                    buffers[group] = torch.empty(shape, dtype=layout.dtype, device=layout.device)
                buf = buffers[group][first - group_first : first - group_first + count]
                works.append(pair.group.recv([buf], 0, 0))
            while next_group < len(groups):  # the groups posted in full: queue their scatters
                group_start, group_len = groups[next_group]
                if group_start + group_len > len(works):
                    break
                buf = buffers.pop(next_group)
                next_group += 1
                if expectation is None:
                    continue  # drain: unknown, cancelled or mis-sized transfer
                if index is None:
                    index = agent._index_tensor(expectation.block_ids)
                received = works[group_start + group_len - 1]
                first = plan[group_start][0]
                if not agent._launch_scatter(expectation, index, first, buf, received):
                    expectation = None  # cancelled meanwhile: drain the rest
            if waited == len(plan) - 1 and expectation is not None and expectation.launched:
                break  # the last scatter runs after the last receive: wait for it alone
            self._wait(works[waited])
            waited += 1
        if expectation is not None and expectation.launched:
            with _span("kv.recv.last_scatter"):
                self._wait(NcclWork(pair.group, expectation.launched[-1][1]))

    def _wait(self, work) -> None:
        if self.pair.broken:
            raise RuntimeError("the pair was broken")
        with _span("kv.recv.wait"):
            wait_work(work, self.pair.backend, self.agent.timeout_s)

    def _receive_scattering(self, header: Header, expectation: _Expectation | None) -> None:
        """Gloo, ProcessGroupNCCL: this thread launches each run of arrived messages' scatter
        once it saw them arrive."""
        agent, pair = self.agent, self.pair
        messages = self._messages(header)
        next(messages)  # the first receives are posted before anything else
        index = agent._index_tensor(expectation.block_ids) if expectation else None
        for first, count, buf in messages:
            if expectation is None:
                continue  # drain: unknown, cancelled or mis-sized transfer
            with expectation.lock:
                if expectation.cancelled:
                    expectation = None
                    continue
                with _span("kv.recv.scatter"):
                    agent._scatter(index, first, count, buf)
        if expectation is not None and pair.stream is not None:
            with _span("kv.recv.sync"):
                pair.stream.synchronize()  # DONE: the KV is readable from any stream

    def _messages(self, header: Header):
        """Yield None once the first receives are posted, then (first layer, layer count,
        buffer) per run of arrived messages: each wait is for the oldest posted receive, and the
        messages after it that have already arrived into the same segment join it, so a thread
        that fell behind the link catches up with one scatter instead of one per message.
        Receives stay posted RECV_AHEAD_BYTES ahead, and the next ones are posted before the
        scatter is launched.

            segment 0 (one buffer)        | segment 1
            | msg 0 | msg 1 | msg 2 | ... | msg k | ...      yielded: msg 0, then msgs 1..2, ...
        """
        layout, pair, timeout_s = self.agent.layout, self.pair, self.agent.timeout_s
        plan = message_plan(layout.num_layers, header.layers_per_message)
        layer_bytes = layout.layer_bytes(header.num_blocks)
        segments = _segments(plan, layer_bytes)
        buffers: dict[int, torch.Tensor] = {}  # segment -> its buffer, while messages use it
        posted: deque[tuple[int, object]] = deque()  # (message index in the plan, its work)
        next_post, posted_bytes = 0, 0

        def post_ahead() -> None:
            nonlocal next_post, posted_bytes
            while next_post < len(plan) and (not posted or posted_bytes < RECV_AHEAD_BYTES):
                first, count = plan[next_post]
                seg_index, seg_first, seg_layers = segments[next_post]
                if seg_index not in buffers:
                    shape = layout.message_shape(seg_layers, header.num_blocks)
                    buffers[seg_index] = torch.empty(
                        shape, dtype=layout.dtype, device=layout.device
                    )
                buf = buffers[seg_index][first - seg_first : first - seg_first + count]
                posted.append((next_post, pair.group.recv([buf], 0, 0)))
                posted_bytes += count * layer_bytes
                next_post += 1

        post_ahead()
        yield None
        while posted:
            message, work = posted.popleft()
            if pair.broken:
                raise RuntimeError("the pair was broken")
            with _span("kv.recv.wait"):
                wait_work(work, pair.backend, timeout_s)
            first, count = plan[message]
            seg_index, seg_first, seg_layers = segments[message]
            while posted and segments[posted[0][0]][0] == seg_index and posted[0][1].is_completed():
                message, work = posted.popleft()
                wait_work(work, pair.backend, timeout_s)  # done: orders this stream after it
                count += plan[message][1]
            posted_bytes -= count * layer_bytes
            post_ahead()
            buf = buffers[seg_index][first - seg_first : first - seg_first + count]
            if first + count == seg_first + seg_layers:
                del buffers[seg_index]  # the segment's last layers: the scatter is its last use
            yield first, count, buf


def _span(name: str):
    """A named range in a torch.profiler trace, only while one records: a record_function costs
    ~11 us of host time (measured on an H200 host), three a message on the receiver's path."""
    if torch._C._autograd._profiler_enabled():
        return torch.profiler.record_function(name)
    return contextlib.nullcontext()


def _segments(plan: list[tuple[int, int]], layer_bytes: int) -> list[tuple[int, int, int]]:
    """(segment index, its first layer, its layer count) for each message of `plan`: runs of
    consecutive messages of up to SEGMENT_BYTES together."""
    out = []
    runs = _message_runs(plan, layer_bytes, SEGMENT_BYTES, last_alone=False)
    for seg, (start, size) in enumerate(runs):
        layers = sum(count for _, count in plan[start : start + size])
        out += [(seg, plan[start][0], layers)] * size
    return out


def _message_runs(
    plan: list[tuple[int, int]], layer_bytes: int, limit: int, last_alone: bool = True
) -> list[tuple[int, int]]:
    """(first message, message count) per run of consecutive messages of up to `limit` bytes
    (a larger message is a run of its own); with `last_alone`, the last message is a run of its
    own. As scatter groups: the last message's scatter is the only one on a transfer's critical
    path (the others run while later messages are on the wire), so it carries nothing more.

        plan:   | m0 | m1 | m2 | m3 | m4 | m5 |      (limit: three messages)
        groups: | m0   m1   m2 | m3   m4 | m5 |"""
    groups: list[list[int]] = []
    for message, (_, count) in enumerate(plan):
        last = last_alone and message == len(plan) - 1 and message > 0
        if groups and not last:
            start, size = groups[-1]
            layers = sum(c for _, c in plan[start : start + size]) + count
            if layers * layer_bytes <= limit:
                groups[-1][1] += 1
                continue
        groups.append([message, 1])
    return [(start, size) for start, size in groups]
