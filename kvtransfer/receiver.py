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
    from kvtransfer.agent import KVTransferAgent, _Expectation, _Pair

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
        # CUDA: receives are posted from this stream, the copies run on the pair's
        self.post_stream = None
        if pair.stream is not None:
            self.post_stream = torch.cuda.Stream(agent.layout.device)

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
            if pair.stream is not None:
                self._receive_queued(header, expectation)
            else:
                self._receive_in_turn(header, expectation)
        except Exception as e:
            agent._break(pair, f"receiving transfer {header.transfer_id} failed: {e}")
            if expectation is not None:
                self._drain()
                agent._finish(expectation, failed=True)
            return False
        if expectation is not None:
            agent._finish(expectation, failed=False)
        return True

    def _receive_in_turn(self, header: Header, expectation: _Expectation | None) -> None:
        """Gloo: wait for each message, then copy it into the blocks."""
        agent = self.agent
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

    def _receive_queued(self, header: Header, expectation: _Expectation | None) -> None:
        """CUDA: each message's copy into the blocks is queued on the pair's stream behind its
        receive when the receive is posted, so it runs the moment the data lands, with no host
        round trip between; this thread only keeps RECV_AHEAD_MESSAGES in flight, checks each
        receive within the timeout and, at the end, that every copy has run.

        Receives are posted from their own stream: posted from the pair's, each would also wait
        for the copies queued before it, and the link would idle during every copy."""
        agent, pair, layout = self.agent, self.pair, self.agent.layout
        index = agent._index_tensor(expectation.block_ids) if expectation else None
        in_flight: deque[object] = deque()
        for first, count in message_plan(layout.num_layers, header.layers_per_message):
            if len(in_flight) == RECV_AHEAD_MESSAGES:
                self._wait_received(in_flight.popleft())
            with torch.cuda.stream(self.post_stream), record_function("kv.recv.post"):
                shape = layout.message_shape(count, header.num_blocks)
                buf = torch.empty(shape, dtype=layout.dtype, device=layout.device)
                work = pair.group.recv([buf], 0, 0)
            work.wait()  # orders the pair's stream after the receive; the host does not wait
            buf.record_stream(pair.stream)
            if expectation is not None:
                with expectation.lock:
                    if expectation.cancelled:
                        expectation = None  # drain the rest
                    else:
                        expectation.queued = True
                        with record_function("kv.recv.scatter"):
                            agent._scatter(index, first, count, buf)
            in_flight.append(work)
        while in_flight:
            self._wait_received(in_flight.popleft())
        with record_function("kv.recv.sync"):
            pair.stream.synchronize()  # the queued copies: they follow received data at once

    def _wait_received(self, work) -> None:
        if self.pair.broken:
            raise RuntimeError("the pair was broken")
        with record_function("kv.recv.wait"):
            wait_work(work, self.pair.backend, self.agent.timeout_s)

    def _drain(self) -> None:
        """After a failure: wait until the copies queued into a transfer's blocks have run (the
        group is aborted by then, which ends its pending receives), so the blocks can be freed."""
        if self.pair.stream is None:
            return
        done = torch.cuda.Event()
        done.record(self.pair.stream)
        deadline = time.monotonic() + self.agent.timeout_s
        while not done.query():
            if time.monotonic() > deadline:
                log.error(
                    "copies into a failed transfer's blocks did not drain in %.0f s",
                    self.agent.timeout_s,
                )
                return
            time.sleep(1e-3)
