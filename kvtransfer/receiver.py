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
from torch.profiler import record_function

from kvtransfer.pair import wait_work
from kvtransfer.protocol import BROKEN, CLOSE, Header, message_plan

if TYPE_CHECKING:
    from kvtransfer.agent import KVTransferAgent, _Pair

log = logging.getLogger(__name__)

# Receives posted ahead of the one being waited on: enough that the link never waits for this
# thread's Python between two messages. NOTE: not more: posting one costs ~60 us of host time,
# and posting a whole transfer's receives before waiting on the first one delayed the first
# scatter by ~1 ms on a 16-message transfer (2x H100, profiled 2026-11-26).
RECV_AHEAD_MESSAGES = 3


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
                    with record_function("kv.recv.scatter"):
                        agent._scatter(index, first, count, buf)
            if expectation is not None and pair.stream is not None:
                with record_function("kv.recv.sync"):
                    pair.stream.synchronize()  # DONE: the KV is readable from any stream
        except Exception as e:
            if expectation is not None:
                agent._finish(expectation, failed=True)
            agent._break(pair, f"receiving transfer {header.transfer_id} failed: {e}")
            return False
        if expectation is not None:
            agent._finish(expectation, failed=False)
        return True

    def _messages(self, header: Header):
        """Yield None once the first receives are posted, then (first layer, layer count,
        buffer) per message as it arrives; receives are posted ahead of the one waited on."""
        layout, pair, timeout_s = self.agent.layout, self.pair, self.agent.timeout_s
        plan = message_plan(layout.num_layers, header.layers_per_message)
        posted: deque[tuple[torch.Tensor, object]] = deque()
        next_post = 0
        for first, count in plan:
            while next_post < len(plan) and len(posted) < RECV_AHEAD_MESSAGES:
                shape = layout.message_shape(plan[next_post][1], header.num_blocks)
                buf = torch.empty(shape, dtype=layout.dtype, device=layout.device)
                posted.append((buf, pair.group.recv([buf], 0, 0)))
                next_post += 1
            if first == 0:
                yield None
            buf, work = posted.popleft()
            if pair.broken:
                raise RuntimeError("the pair was broken")
            with record_function("kv.recv.wait"):
                wait_work(work, pair.backend, timeout_s)
            yield first, count, buf
