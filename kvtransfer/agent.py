"""KVTransferAgent: one per worker process; moves a request's paged KV from a prefill worker's
blocks into a decode worker's blocks over a size-2 group per pair: on GPUs an NCCL communicator
driven through NCCL's C API (`kvtransfer.nccl`; ProcessGroupNCCL where that library does not
load), on CPU a ProcessGroupGloo.

    prefill worker (rank 0)                                decode worker (rank 1)
    connect(D)  <------------- handshake (store) ------------->  connect(P)
                                                                 expect(t, P, dst_blocks)
    h = start_send(t, D, src_blocks) -- header (store) -------->  receiver thread claims t
    send_layer(h, 0..L-1)  ---- messages, ≥ min_message_bytes ->  index_copy_ into dst_blocks
    finish_send(h) -> DONE | FAILED                              poll() -> {t: DONE | FAILED}

The agent never frees or allocates blocks: the scheduler owns them, and learns from
`finish_send` (prefill) and `poll` (decode) when a transfer no longer needs them.
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

from kvtransfer import scatter
from kvtransfer.pair import (
    DECODE,
    PREFILL,
    RANK,
    abort_group,
    choose_backend,
    handshake,
    new_group,
    other_role,
    pair_base,
    read_hello,
    wait_work,
)
from kvtransfer.protocol import BROKEN, CLOSE, TRANSFER, Header, KVLayout, layers_per_message
from kvtransfer.protocol import message_plan as plan_messages
from kvtransfer.receiver import Receiver
from kvtransfer.store import connect_store

log = logging.getLogger(__name__)

# The receiver thread's store connection blocks while the pair is idle; this bounds one wait.
_IDLE_WAIT_S = 24 * 3600.0


def _notify(action) -> None:
    """One store write telling others of a broken pair; best effort (the store may be gone)."""
    try:
        action()
    except Exception as e:  # noqa: BLE001 - the store may be gone too
        log.debug("notifying of a broken pair failed: %s", e)


class TransferState(enum.Enum):
    PENDING = "pending"
    TRANSFERRING = "transferring"
    DONE = "done"
    FAILED = "failed"


@dataclass(eq=False)
class SendHandle:
    """One transfer on the prefill side, from `start_send` to `finish_send`. `state` is
    TRANSFERRING until `finish_send` says DONE, or FAILED (also set when the pair breaks)."""

    transfer_id: int
    peer_id: str
    num_blocks: int
    state: TransferState = TransferState.PENDING
    _pair: _Pair | None = None
    _block_ids: list[int] = field(default_factory=list)
    _stream: torch.cuda.Stream | None = None  # CUDA: the stream start_send was called on
    # Prepared on the pair's pusher thread (see _prepare_send), usable once _ready is set: the
    # source rows (see _index_tensor), one buffer per message, and with stacked caches each
    # message's (rows, buffer as rows) for its one gather. On CUDA all on `_stream`.
    _ready: threading.Event = field(default_factory=threading.Event)
    _taken: bool = False  # the step thread saw _ready (and ordered its stream after it)
    _index: torch.Tensor | None = None
    _buffers: list[torch.Tensor] = field(default_factory=list)
    _copies: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    _per_message: int = 1  # layers per message
    _plan: list[tuple[int, int]] = field(default_factory=list)
    _next_layer: int = 0
    _gathered: int = 0  # messages whose every layer is in its buffer
    _works: list = field(default_factory=list)  # one posted send per message

    def _release(self) -> None:
        self._buffers, self._works, self._index, self._copies = [], [], None, []


@dataclass(eq=False)
class _Expectation:
    transfer_id: int
    peer_id: str
    block_ids: list[int]
    state: TransferState = TransferState.PENDING
    cancelled: bool = False
    # Held by the receiver while it writes into `block_ids` (or queues a scatter), and by
    # `cancel`: after `cancel` returns, nothing more is written into the blocks.
    lock: threading.Lock = field(default_factory=threading.Lock)
    stream: torch.cuda.Stream | None = None
    # Scatters queued ahead of their data (see kvtransfer.scatter): the transfer's guard token,
    # and per queued scatter (its receive's event, the event after the scatter), in order.
    token: int = 0
    launched: list[tuple[torch.cuda.Event, torch.cuda.Event]] = field(default_factory=list)


@dataclass(eq=False)
class _Pair:
    peer_id: str
    generation: int
    peer_nonce: int
    hello: str  # what this side's hello key holds while the pair is live
    group: object  # ProcessGroupGloo | NcclComm | ProcessGroupNCCL; ranks: prefill 0, decode 1
    backend: str
    client: object  # this pair's store connection (the group's store; the sender's headers)
    queue_key: str  # the store queue of headers
    stream: torch.cuda.Stream | None = None  # decode side on CUDA: where received KV is scattered
    broken: bool = False
    lock: threading.RLock = field(default_factory=threading.RLock)
    send_order: deque[SendHandle] = field(default_factory=deque)  # started, messages not all posted
    in_flight: set[SendHandle] = field(default_factory=set)  # started, not finished
    receiver: Receiver | None = None
    pusher: _HeaderPusher | None = None  # prefill side: pushes headers off the step thread


class _HeaderPusher(threading.Thread):
    """The prefill side's thread per pair that pushes transfer headers to the store, in order,
    and after each header prepares its transfer (`KVTransferAgent._prepare_send`).

    A push is a store round trip (100-230 us measured on the GPU machines); made on the step
    thread before the forward pass, it held the GPU idle that long, once per request handed off
    in the step. Order is all the receiver needs: it matches messages to transfers by header
    order, and a send posted before its header has left waits on the GPU for the receive.

    The preparation (index, buffers, gathers: 40-330 us of host time on the H200 hosts, which
    vary 4x between machines) is done here: on the step thread before the forward pass it held
    the GPU idle (+0.3 ms on a 512-token prefill, traced), at the first send_layer it stood
    between the layers' end and the first byte. Here it overlaps the first layers."""

    def __init__(self, agent: KVTransferAgent, pair: _Pair):
        super().__init__(name=f"kvtransfer-headers-{pair.peer_id}", daemon=True)
        self.agent, self.pair = agent, pair
        self.headers: queue.SimpleQueue[tuple[SendHandle, bytes] | None] = queue.SimpleQueue()

    def push(self, handle: SendHandle, header: bytes) -> None:
        self.headers.put((handle, header))

    def stop(self) -> None:
        self.headers.put(None)

    def run(self) -> None:
        pair, agent = self.pair, self.agent
        if agent.layout.device.type == "cuda":
            torch.cuda.set_device(agent.layout.device)
        while (item := self.headers.get()) is not None and not pair.broken:
            handle, header = item
            try:
                pair.client.queue_push(pair.queue_key, header)
            except Exception as e:  # noqa: BLE001 - the pair breaks, its transfers fail
                agent._break(
                    pair, f"pushing the header of transfer {handle.transfer_id} failed: {e}"
                )
                return
            try:
                agent._prepare_send(handle)
            except Exception as e:  # noqa: BLE001 - as above
                agent._break(pair, f"preparing transfer {handle.transfer_id} failed: {e}")
                return
            finally:
                handle._ready.set()


class KVTransferAgent:
    """One per worker process; owns this worker's pairwise communicators. Never frees blocks:
    it reports what finished.

    `role` ("prefill" | "decode") fixes the direction: prefill workers send (rank 0 of each pair),
    decode workers receive (rank 1). `backend`: "gloo", "nccl", "torch-nccl" or "auto" (see
    `kvtransfer.pair.choose_backend`). `timeout_s` bounds `connect` and every wait of a
    transfer in flight; an idle pair may stay connected forever. `scatter_ahead` (decode side,
    `nccl` backend, caches in one allocation, Triton): queue each message's scatter on the GPU
    behind its receive (kvtransfer.scatter); off, the receiver thread launches each scatter once
    it saw the message arrive (the only way on gloo and `torch-nccl`)."""

    def __init__(
        self,
        worker_id: str,
        kv_caches: list[torch.Tensor],
        store_host: str,
        store_port: int,
        backend: str = "auto",
        timeout_s: float = 30.0,
        min_message_bytes: int = 64 << 20,
        *,
        role: str,
        scatter_ahead: bool = True,
    ):
        if role not in (PREFILL, DECODE):
            raise ValueError(f"role must be 'prefill' or 'decode', got {role!r}")
        if "/" in worker_id or not worker_id:
            raise ValueError(f"worker_id must be non-empty and contain no '/', got {worker_id!r}")
        if timeout_s <= 0 or min_message_bytes < 0:
            raise ValueError("timeout_s must be > 0 and min_message_bytes >= 0")
        self.layout = KVLayout.of(kv_caches)
        backend = choose_backend(backend, self.layout.device)
        self.worker_id, self.role, self.backend = worker_id, role, backend
        self.kv_caches = kv_caches
        self._rows = [self.layout.as_rows(kv) for kv in kv_caches]  # views, for copies
        # All layers' rows as one view when the caches allow: one copy kernel per message.
        self._all_rows = self.layout.stacked_rows(kv_caches)
        rows_per_layer = self._rows[0].shape[0]
        self._layer_offsets = np.arange(self.layout.num_layers, dtype=np.int64) * rows_per_layer
        self.timeout_s, self.min_message_bytes = timeout_s, min_message_bytes
        ahead = scatter_ahead and role == DECODE and backend == "nccl"
        ahead = ahead and self._all_rows is not None and scatter.available(self.layout.device)
        self._guard = scatter.Guard(self.layout.device) if ahead else None
        if self._guard is not None:
            self._guard.warm_up(self._all_rows)
        self._store_addr = (store_host, store_port)
        self._store = connect_store(store_host, store_port, timeout_s)
        self._lock = threading.Lock()  # guards the dicts below
        self._reported = threading.Condition(self._lock)  # a result was added to _results
        self._pairs: dict[str, _Pair] = {}
        self._connect_locks: dict[str, threading.Lock] = {}
        self._expected: dict[int, _Expectation] = {}
        self._results: dict[int, TransferState] = {}
        # NOTE: dropping a gloo group joins its threads, which may wait out a pending op's
        # timeout; broken groups are kept here so that never happens on a caller's thread.
        self._retired: list[object] = []
        self._closed = False
        # Decode side: called on the receiver thread after each result is added, outside the
        # agent's locks (quick, never blocking): a polling loop asleep between polls wakes at
        # once instead of at its next tick (the decode worker's idle loop ticks every 1 ms).
        self.on_result: Callable[[], None] | None = None

    # ---------------------------------------------------------------- pairs

    def connect(self, peer_id: str) -> None:
        """Make the pair with `peer_id` usable; both ends call this, in either order, from any
        thread. Returns at once if the pair is up and the peer is still the one it was built
        with; otherwise (first time, broken, or the peer reconnected) handshakes a new
        generation. Raises TimeoutError if the peer does not show up within `timeout_s`."""
        self._check_open()
        with self._lock:
            connect_lock = self._connect_locks.setdefault(peer_id, threading.Lock())
        with connect_lock:
            pair = self._pairs.get(peer_id)
            if pair is not None and not pair.broken and self._peer_unchanged(pair):
                return
            if pair is not None:
                self._break(pair, "reconnecting", quiet=True)
            pair = self._new_pair(peer_id)
            if self.role == PREFILL:
                pair.pusher = _HeaderPusher(self, pair)
                pair.pusher.start()
            with self._lock:
                self._pairs[peer_id] = pair
            if self.role == DECODE:
                client = connect_store(*self._store_addr, _IDLE_WAIT_S)
                pair.receiver = Receiver(self, pair, client)
                pair.receiver.start()

    def disconnect(self, peer_id: str) -> None:
        """Break the pair with `peer_id`, if any (its transfers in flight fail); the next
        `connect` handshakes a new generation. For a peer known to have died: its hello key is
        not marked broken, so `connect` alone could take the stale pair for a live one."""
        self._check_open()
        with self._lock:
            connect_lock = self._connect_locks.setdefault(peer_id, threading.Lock())
        with connect_lock:
            pair = self._pairs.get(peer_id)
            if pair is not None:
                self._break(pair, "disconnected", quiet=True)

    def generation(self, peer_id: str) -> int | None:
        """The generation of the live pair with `peer_id` (it grows with every reconnect)."""
        pair = self._pairs.get(peer_id)
        return None if pair is None or pair.broken else pair.generation

    def _ids(self, peer_id: str) -> tuple[str, str]:
        return (self.worker_id, peer_id) if self.role == PREFILL else (peer_id, self.worker_id)

    def _peer_unchanged(self, pair: _Pair) -> bool:
        base = pair_base(*self._ids(pair.peer_id))
        hello = read_hello(self._store, f"{base}/hello/{other_role(self.role)}")
        return hello is not None and hello.nonce == pair.peer_nonce

    def _new_pair(self, peer_id: str) -> _Pair:
        base = pair_base(*self._ids(peer_id))
        generation, peer_nonce, hello = handshake(
            self._store, base, self.role, self.layout.describe(), self.timeout_s
        )
        client = connect_store(*self._store_addr, self.timeout_s)
        group = self._build_group(client, f"{base}/{generation}")
        stream = None
        if self.role == DECODE and self.layout.device.type == "cuda":
            stream = torch.cuda.Stream(self.layout.device)
        log.info(
            "KV pair %s/%s up, generation %d (%s)", *self._ids(peer_id), generation, self.backend
        )
        return _Pair(
            peer_id,
            generation,
            peer_nonce,
            hello,
            group,
            self.backend,
            client,
            f"{base}/{generation}/headers",
            stream,
        )

    def _build_group(self, client, prefix: str):
        """Build the group and push one tiny message through it (NCCL creates its communicator
        on first use; that must happen here, not inside a forward pass), within `timeout_s`."""
        rank, built = RANK[self.role], {}

        def build():
            try:
                if self.layout.device.type == "cuda":
                    torch.cuda.set_device(self.layout.device)
                group = new_group(client, prefix, rank, self.backend, self.timeout_s)
                probe = torch.ones(1, device=self.layout.device)
                work = group.send([probe], 1, 0) if rank == 0 else group.recv([probe], 0, 0)
                wait_work(work, self.backend, self.timeout_s)
                built["group"] = group
            except Exception as e:  # noqa: BLE001 - re-raised in the caller's thread
                built["error"] = e

        thread = threading.Thread(target=build, name="kvtransfer-connect", daemon=True)
        thread.start()
        thread.join(2 * self.timeout_s)
        if "group" in built:
            return built["group"]
        if "error" in built:
            raise built["error"]
        raise TimeoutError(f"building the process group {prefix} took over {self.timeout_s} s")

    def _break(self, pair: _Pair, reason: str, quiet: bool = False) -> None:
        """Mark the pair broken: its transfers in flight fail, its group is aborted, and the
        next `connect` on either side builds a new generation."""
        with pair.lock:
            if pair.broken:
                return
            pair.broken = True
            failed = list(pair.in_flight)
            pair.in_flight.clear()
            pair.send_order.clear()
        base = pair_base(*self._ids(pair.peer_id))
        for handle in failed:
            # NOTE: buffers stay until finish_send: the step thread may be inside send_layer.
            handle.state = TransferState.FAILED
        # NOTE: the hello is marked broken before any waiter wakes: a woken thread may reconnect
        # at once, and the peer's `connect` must not find the stale hello and take the pair for
        # live (it returned without a handshake and ours timed out: a test's reconnect in CI,
        # 2026-11-26). compare_set: a newer handshake of this side may already own the key.
        _notify(lambda: self._store.compare_set(f"{base}/hello/{self.role}", pair.hello, "broken"))
        for handle in failed:
            handle._ready.set()  # a send_layer waiting for the preparation returns
        if pair.pusher is not None:
            pair.pusher.stop()
        (log.info if quiet else log.warning)(
            "KV pair %s/%s generation %d broken: %s",
            *self._ids(pair.peer_id),
            pair.generation,
            reason,
        )
        # wakes the decode side's receiver thread (ours on decode, the peer's on prefill)
        notice = Header(BROKEN if self.role == PREFILL else CLOSE).encode()
        _notify(lambda: pair.client.queue_push(pair.queue_key, notice))
        abort_group(pair.group)
        with self._lock:
            self._retired.append(pair.group)

    # ---------------------------------------------------------------- prefill side

    def start_send(self, transfer_id: int, peer_id: str, block_ids: list[int]) -> SendHandle:
        """Begin sending these blocks (all layers) to `peer_id`: queues the transfer's header
        for the pair's pusher thread. Called from the engine's step thread before the forward
        pass that finalises the blocks. Never raises for network reasons: on a missing or broken
        pair the handle is FAILED (also later, if pushing the header fails)."""
        self._check_role(PREFILL)
        self._check_blocks(block_ids)
        handle = SendHandle(transfer_id, peer_id, len(block_ids))
        pair = self._pairs.get(peer_id)
        if pair is None or pair.broken:
            log.warning("transfer %d: no live pair with %s", transfer_id, peer_id)
            handle.state = TransferState.FAILED
            return handle
        layer_bytes = self.layout.layer_bytes(len(block_ids))
        per_message = layers_per_message(
            layer_bytes, self.min_message_bytes, self.layout.num_layers
        )
        handle._pair = pair
        if self.layout.device.type == "cuda":
            handle._stream = torch.cuda.current_stream(self.layout.device)
        handle._per_message = per_message
        handle._plan = plan_messages(self.layout.num_layers, per_message)
        header = Header(TRANSFER, transfer_id, len(block_ids), per_message)
        with pair.lock:
            if pair.broken:
                handle.state = TransferState.FAILED
                return handle
            handle.state = TransferState.TRANSFERRING
            pair.send_order.append(handle)
            pair.in_flight.add(handle)
            handle._block_ids = list(block_ids)
            pair.pusher.push(handle, header.encode())  # under the lock: in start order
        return handle

    def send_layer(self, handle: SendHandle, layer_idx: int) -> None:
        """Called once per layer, in order 0..L-1, as soon as the layer's KV for all the blocks
        is final (inside the forward pass, on the engine's stream). Gathers the layer into the
        current message's buffer; posts the message once its last layer is in. Never waits on
        the network. A no-op on a FAILED handle."""
        if handle.state is not TransferState.TRANSFERRING:
            return
        if layer_idx != handle._next_layer:
            raise ValueError(
                f"transfer {handle.transfer_id}: expected layer "
                f"{handle._next_layer}, got {layer_idx}"
            )
        message = handle._gathered  # messages fill in order
        first, layers_in_message = handle._plan[message]
        position = layer_idx - first
        last_of_message = position == layers_in_message - 1
        # The first gather waits for the pusher thread's preparation, not layer 0: meanwhile
        # the step thread goes on launching layers (it waited at layer 0 for the header's
        # round trip and the preparation: +0.3 ms of GPU idle on a 512-token prefill, traced).
        gathers_now = self._all_rows is None or last_of_message
        if gathers_now and not handle._taken and not self._wait_prepared(handle):
            return
        if self._all_rows is None:  # gather each layer as it is done
            buf = handle._buffers[message]
            self._gather(handle._index, layer_idx, 1, buf[position : position + 1])
        handle._next_layer += 1
        if last_of_message:
            if self._all_rows is not None:  # the whole message at once
                rows, out = handle._copies[message]
                torch.index_select(self._all_rows, 0, rows, out=out)
            handle._gathered += 1
            self._post_sends(handle._pair)

    def _prepare_send(self, handle: SendHandle) -> None:
        """On the pusher thread: the transfer's index, message buffers and gathers, on the
        stream start_send was called on (so they are ordered before the gathers of send_layer,
        which waits for `_ready`)."""
        layout = self.layout
        stream = torch.cuda.stream(handle._stream) if handle._stream is not None else nullcontext()
        with stream:
            index = self._index_tensor(handle._block_ids)
            buffers = [
                torch.empty(
                    layout.message_shape(count, handle.num_blocks),
                    dtype=layout.dtype,
                    device=layout.device,
                )
                for _, count in handle._plan
            ]
        copies = []
        if self._all_rows is not None:
            copies = [
                (index[first : first + count].view(-1), layout.as_rows(buf))
                for (first, count), buf in zip(handle._plan, buffers, strict=True)
            ]
        handle._index, handle._buffers, handle._copies = index, buffers, copies

    def _wait_prepared(self, handle: SendHandle) -> bool:
        """Wait (bounded) until the pusher thread prepared this transfer. False if it failed
        meanwhile."""
        if not handle._ready.wait(self.timeout_s):
            self._break(handle._pair, f"transfer {handle.transfer_id} was not prepared in time")
        if handle.state is not TransferState.TRANSFERRING or not handle._buffers:
            return False
        if handle._stream is not None:
            current = torch.cuda.current_stream(self.layout.device)
            if current != handle._stream:  # send_layer on another stream than start_send
                current.wait_stream(handle._stream)
        handle._taken = True
        return True

    def _post_sends(self, pair: _Pair) -> None:
        # NOTE: messages leave in header order. A transfer's messages wait until every transfer
        # started before it on the same pair has posted its last message: the receiver matches
        # messages to transfers by order alone. Two requests prefilled in one step for the same
        # decode worker therefore overlap only the first one's sends with the forward pass.
        with pair.lock:
            try:
                while pair.send_order and not pair.broken:
                    head = pair.send_order[0]
                    while len(head._works) < head._gathered:
                        buf = head._buffers[len(head._works)]
                        head._works.append(pair.group.send([buf], 1, 0))
                    if len(head._works) < len(head._plan):
                        return
                    pair.send_order.popleft()
            except Exception as e:
                self._break(pair, f"posting a send failed: {e}")

    def finish_send(self, handle: SendHandle) -> TransferState:
        """Wait, at most `timeout_s` in all, until every message of the transfer has left.
        Returns DONE, or FAILED (the pair is then broken; the next `connect` builds a new
        generation). Called after the last `send_layer`; calling it earlier abandons the
        transfer (FAILED). The handle's buffers are freed either way."""
        try:
            if handle.state is TransferState.TRANSFERRING:
                self._wait_sent(handle)
            return handle.state
        finally:
            handle._release()

    def _wait_sent(self, handle: SendHandle) -> None:
        pair = handle._pair
        if handle._next_layer < self.layout.num_layers:
            self._break(pair, f"transfer {handle.transfer_id} finished before all its layers")
            return
        self._post_sends(pair)
        if len(handle._works) < len(handle._plan):
            self._break(pair, f"transfer {handle.transfer_id} is queued behind an unfinished one")
            return
        deadline = time.monotonic() + self.timeout_s
        try:
            for work in handle._works:
                wait_work(work, self.backend, deadline - time.monotonic())
        except Exception as e:
            self._break(pair, f"sending transfer {handle.transfer_id} failed: {e}")
            return
        with pair.lock:
            pair.in_flight.discard(handle)
            if handle.state is TransferState.TRANSFERRING:
                handle.state = TransferState.DONE

    # ---------------------------------------------------------------- decode side

    def expect(self, transfer_id: int, peer_id: str, block_ids: list[int]) -> None:
        """Register where transfer `transfer_id` from `peer_id` must land: this worker's reserved
        blocks, as many as the sender's. Must be called before the sender's `start_send`: a
        header nobody expects is drained and dropped."""
        self._check_role(DECODE)
        self._check_blocks(block_ids)
        with self._lock:
            if transfer_id in self._expected or transfer_id in self._results:
                raise ValueError(f"transfer {transfer_id} is already expected")
            self._expected[transfer_id] = _Expectation(transfer_id, peer_id, list(block_ids))

    def poll(self) -> dict[int, TransferState]:
        """Transfers that reached DONE or FAILED since the last call, each reported once. DONE:
        the KV is in `kv_caches` (on CUDA: synchronized, safe to read from any stream). An
        expected transfer whose header never came stays unreported until cancelled."""
        return self.wait(0.0)

    def wait(self, timeout_s: float) -> dict[int, TransferState]:
        """`poll`, after waiting up to `timeout_s` for at least one result (a waiting thread
        wakes as the receiver finishes a transfer, not at its next polling tick)."""
        with self._lock:
            if timeout_s > 0:
                self._reported.wait_for(lambda: self._results, timeout_s)
            results, self._results = self._results, {}
        return results

    def cancel(self, transfer_id: int) -> None:
        """Stop expecting the transfer. Once this returns nothing more is written into its
        blocks; data still arriving is drained and dropped, and it is never reported."""
        with self._lock:
            self._results.pop(transfer_id, None)
            expectation = self._expected.pop(transfer_id, None)
        if expectation is None:
            return
        with expectation.lock:
            expectation.cancelled = True  # no scatter is launched or queued after this
        if expectation.launched:
            self._stop_scatters(expectation)
        elif expectation.stream is not None:
            expectation.stream.synchronize()  # scatters launched before the flag was set

    def _claim(self, transfer_id: int, peer_id: str, num_blocks: int) -> _Expectation | None:
        """The receiver thread takes a transfer whose header arrived; None means drain it."""
        with self._lock:
            expectation = self._expected.get(transfer_id)
            if expectation is None or expectation.peer_id != peer_id:
                log.info("dropping transfer %d from %s: not expected", transfer_id, peer_id)
                return None
            if len(expectation.block_ids) != num_blocks:
                log.warning(
                    "transfer %d: %d blocks sent, %d expected",
                    transfer_id,
                    num_blocks,
                    len(expectation.block_ids),
                )
                mismatch = True
            else:
                mismatch = False
                expectation.state = TransferState.TRANSFERRING
                pair = self._pairs.get(peer_id)
                expectation.stream = pair.stream if pair is not None else None
                if self._guard is not None:
                    expectation.token = self._guard.next_token()
        if mismatch:
            self._finish(expectation, failed=True)
            return None
        return expectation

    def _launch_scatter(
        self,
        expectation: _Expectation,
        index: torch.Tensor,
        first: int,
        buf: torch.Tensor,
        work,
    ) -> bool:
        """Receiver thread: queue the scatter of `buf` (layers [first, first + len(buf)), its
        last receive `work` posted) on the current stream, behind that receive. False, and
        nothing queued, if the transfer was cancelled."""
        with expectation.lock:
            if expectation.cancelled:
                return False
            stream = torch.cuda.current_stream(self.layout.device)
            stream.wait_event(work.event)
            rows = index[first : first + len(buf)].view(-1)
            self._guard.launch(self._all_rows, rows, self.layout.as_rows(buf), expectation.token)
            scattered = torch.cuda.Event()
            scattered.record(stream)
            expectation.launched.append((work.event, scattered))
            return True

    def _stop_scatters(self, expectation: _Expectation) -> None:
        """Make sure nothing more is written into the transfer's blocks: the scatters still
        queued behind their receives will write nothing, and those whose receive completed
        (which may have started before the guard was set) are waited for. Bounded: none of
        those waits on the network. Called by `cancel` after `cancelled` is set, and by the
        receiver before it reports a failure."""
        if not expectation.launched:
            return
        self._guard.disable(expectation.token, expectation.launched[-1][1])
        started = None
        for received, scattered in expectation.launched:  # receives complete in order
            if not received.query():
                break
            started = scattered
        if started is not None:
            started.synchronize()

    def _finish(self, expectation: _Expectation, failed: bool) -> None:
        """Stop expecting the transfer and report its result, in one step (a `cancel` comes
        before both or after both); nothing if it was cancelled. Then `on_result`."""
        transfer_id = expectation.transfer_id
        with self._lock:
            if self._expected.get(transfer_id) is not expectation:
                return  # cancelled: never reported
            del self._expected[transfer_id]
            self._results[transfer_id] = TransferState.FAILED if failed else TransferState.DONE
            self._reported.notify_all()
        if self.on_result is not None:
            self.on_result()

    # ---------------------------------------------------------------- shared

    def close(self) -> None:
        """Break every pair and stop the receiver threads. Expected transfers are forgotten."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            pairs = list(self._pairs.values())
        for pair in pairs:
            self._break(pair, "agent closed", quiet=True)
        for pair in pairs:
            for thread in (pair.receiver, pair.pusher):
                if thread is not None:
                    thread.join(timeout=1.0)
            pair.receiver = pair.pusher = None  # the threads refer back to this agent
            pair.group = None
        with self._lock:
            # Destroying the groups closes their sockets and listening ports. NOTE: a gloo
            # group's destructor waits out its pending ops, up to `timeout_s`.
            self._retired.clear()
            self._pairs.clear()

    def _index_tensor(self, block_ids: list[int]) -> torch.Tensor:
        """The rows of a layer's `as_rows` view that hold these blocks: all K rows, then all V
        rows; with stacked caches, [num_layers, 2 * len(block_ids)]: each layer's rows in the
        `_all_rows` view. Built with numpy (torch.tensor of a list costs ~2x) and uploaded
        from pageable memory on the current stream: the driver stages the bytes before the
        call returns, so no pinned buffer has to outlive the copy."""
        num_blocks = self.kv_caches[0].shape[1]
        ids = np.asarray(block_ids, dtype=np.int64)
        rows = np.concatenate((ids, ids + num_blocks))
        if self._all_rows is not None:
            rows = self._layer_offsets[:, None] + rows[None, :]
        index = torch.from_numpy(rows)
        if self.layout.device.type != "cuda":
            return index
        return index.to(self.layout.device, non_blocking=True)

    def _gather(self, index: torch.Tensor, first: int, count: int, buf: torch.Tensor) -> None:
        """Layers [first, first + count) of the indexed blocks into `buf` (the message's layout),
        on the current stream. `index` as `_index_tensor` made it."""
        if self._all_rows is not None:
            rows = index[first : first + count].view(-1)
            torch.index_select(self._all_rows, 0, rows, out=self.layout.as_rows(buf))
            return
        for i in range(count):
            torch.index_select(self._rows[first + i], 0, index, out=self.layout.as_rows(buf[i]))

    def _scatter(self, index: torch.Tensor, first: int, count: int, buf: torch.Tensor) -> None:
        """The inverse of `_gather`: `buf`'s layers into the indexed blocks."""
        if self._all_rows is not None:
            rows = index[first : first + count].view(-1)
            self._all_rows.index_copy_(0, rows, self.layout.as_rows(buf))
            return
        for i in range(count):
            self._rows[first + i].index_copy_(0, index, self.layout.as_rows(buf[i]))

    def _check_blocks(self, block_ids: list[int]) -> None:
        num_blocks = self.kv_caches[0].shape[1]
        if not block_ids:
            raise ValueError("block_ids is empty")
        if len(set(block_ids)) != len(block_ids):
            raise ValueError("block_ids has duplicates")
        if min(block_ids) < 0 or max(block_ids) >= num_blocks:
            raise ValueError(f"block ids must lie in [0, {num_blocks})")

    def _check_role(self, role: str) -> None:
        self._check_open()
        if self.role != role:
            raise RuntimeError(f"a {self.role} agent cannot do what the {role} side does")

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the KV transfer agent is closed")
