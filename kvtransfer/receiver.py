"""The decode side's thread per connected pair: header, then that transfer's messages, in order.

The sender's order defines what comes next on a pair, so the thread never has to match messages
to transfers: after a header it receives exactly the messages the header announces, then waits
for the next header. Idle, it blocks in the store's queue (cheap, no GPU work pending); once a
header arrived, every wait is bounded by the agent's `timeout_s`.
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
        """NCCL: each message's receive into a buffer of its own, and its (guarded) scatter queued
        on this thread's stream right behind it, RECV_AHEAD_BYTES ahead of the wire; then wait
        for the receives (each bounded, each checked for an abort) and the last scatter."""
        agent, pair, layout = self.agent, self.pair, self.agent.layout
        plan = message_plan(layout.num_layers, header.layers_per_message)
        layer_bytes = layout.layer_bytes(header.num_blocks)
        index = None
        posted: deque[tuple[object, int]] = deque()  # (work, bytes), oldest first
        posted_bytes = 0
        for first, count in plan:
            size = count * layer_bytes
            while posted and posted_bytes + size > RECV_AHEAD_BYTES:
                work, done_bytes = posted.popleft()
                self._wait(work)
                posted_bytes -= done_bytes
            shape = layout.message_shape(count, header.num_blocks)
            buf = torch.empty(shape, dtype=layout.dtype, device=layout.device)
            work = pair.group.recv([buf], 0, 0)
            posted.append((work, size))
            posted_bytes += size
            if expectation is None:
                continue  # drain: unknown, cancelled or mis-sized transfer
            if index is None:  # after the first receive is posted
                index = agent._index_tensor(expectation.block_ids)
            if not agent._launch_scatter(expectation, index, first, count, buf, work):
                expectation = None  # cancelled meanwhile: drain the rest
        while posted:
            self._wait(posted.popleft()[0])
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
    runs: list[list[int]] = []  # [first layer, layer count] per segment
    for first, count in plan:
        if runs and (runs[-1][1] + count) * layer_bytes <= SEGMENT_BYTES:
            runs[-1][1] += count
        else:
            runs.append([first, count])
    out, seg = [], 0
    for first, _count in plan:
        while first >= runs[seg][0] + runs[seg][1]:
            seg += 1
        out.append((seg, runs[seg][0], runs[seg][1]))
    return out
