"""The prefill worker: computes prompts' KV (chunked, prefix-cached), pushes it layer by layer to
the decode worker that reserved blocks for it, and samples the first token.

Runs as a Ray actor (see deploy/launcher.py); the class itself is plain Python so tests can
host it in-process."""

from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import threading
import time
from concurrent.futures import Future

import torch

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.engine_thread import EngineHost, EngineThread
from engine.kv_cache import KVCacheManager
from engine.kv_connector import KVConnector
from engine.metrics import EngineMetrics
from engine.scheduler import SchedulerOutput
from kvtransfer import KVTransferAgent, SendHandle, TransferState

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PrefillResult:
    first_token: int
    first_logprobs: tuple | None
    finish_reason: str | None  # set when the first token already ends the request
    num_prompt_tokens: int
    num_cached_tokens: int
    transfer: str  # TransferState value
    prefill_ms: float  # from the call's arrival here to its answer (the transfer included)


@dataclasses.dataclass(frozen=True)
class StepRecord:
    """One engine step as the prefill worker ran it (`take_step_log`): for comparing serving's
    steps with a profile's predictions and finding the time between steps."""

    end: float  # time.perf_counter() when the step's outputs were handled
    seconds: float  # the engine's step duration (StepStats.duration_s)
    num_seqs: int
    num_prefill_tokens: int
    attention_pairs: int
    num_context_tokens: int  # > num_prefill_tokens: a chunk continued a cached part
    backlog: int  # requests waiting or running after it: > 0, the next step could start at once


# Transfers whose messages may still be leaving while the prefill worker steps on; beyond this
# a step waits at its end for the oldest (each holds its KV in send buffers).
MAX_SENDS_IN_FLIGHT = 16


class _SendConnector(KVConnector):
    """Starts a request's transfer in the step that completes its prompt and sends each layer as
    soon as the forward pass has written it. The step does not wait for the sends: every layer
    was copied into the transfer's send buffers during the forward pass (on CUDA, earlier in
    stream order than any later kernel), so the blocks may be freed and reused at once, and a
    thread waits for the sends and reports each transfer's outcome through `on_sent`."""

    def __init__(
        self,
        agent: KVTransferAgent,
        metrics: EngineMetrics,
        bytes_per_block: int,
        kv_manager: KVCacheManager,
        on_sent=None,
    ):
        self.agent = agent
        self.kv_manager = kv_manager
        self.metrics = metrics
        self.bytes_per_block = bytes_per_block
        self.targets: dict[str, tuple[int, str]] = {}  # request id -> (transfer id, decode peer)
        self._active: list[tuple[str, SendHandle, int, float]] = []
        self.stall_sends: list[float] = []  # fault injection: seconds to sleep, one per transfer
        # (request id, TransferState) once its sends are done or failed, from the sends thread
        self.on_sent = on_sent or (lambda request_id, state: None)
        self.sending: set[str] = set()  # request ids whose outcome `on_sent` has yet to report
        self._slots = threading.BoundedSemaphore(MAX_SENDS_IN_FLIGHT)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._finish_sends, name="kv-sends", daemon=True)
        self._thread.start()

    def on_step_start(self, sched: SchedulerOutput) -> bool:
        self._active = []
        for s in sched.scheduled:
            rid = s.request.request_id
            if s.samples and rid in self.targets:
                transfer_id, peer = self.targets.pop(rid)
                # With a sliding window or sinks only the blocks the decode side's next token
                # can see travel; it reserved exactly those (Scheduler.reserve).
                block_ids = self.kv_manager.live_block_ids(s.request, s.request.num_tokens)
                handle = self.agent.start_send(transfer_id, peer, block_ids)
                num_bytes = len(block_ids) * self.bytes_per_block
                self._active.append((rid, handle, num_bytes, time.perf_counter()))
        return bool(self._active)

    def on_layer_done(self, layer_idx: int) -> None:
        if layer_idx == 0 and self.stall_sends:
            # NOTE: fault injection only (`PrefillWorker.debug_stall_sends`): the header is out,
            # the KV is not, so the receiver waits until its timeout.
            time.sleep(self.stall_sends.pop(0))
        for _, handle, _, _ in self._active:
            self.agent.send_layer(handle, layer_idx)

    def on_step_end(self, sched: SchedulerOutput) -> None:
        forward_done = time.perf_counter()
        for rid, handle, num_bytes, start in self._active:
            self._slots.acquire()  # backpressure: only when MAX_SENDS_IN_FLIGHT are pending
            self.sending.add(rid)
            self._queue.put((rid, handle, num_bytes, start, forward_done))
        self._active = []

    def _finish_sends(self) -> None:
        while True:
            rid, handle, num_bytes, start, forward_done = self._queue.get()
            try:
                state = self.agent.finish_send(handle)
            except Exception as e:  # noqa: BLE001 - a failed wait fails this transfer only
                log.warning("KV transfer of %s failed: %s", rid, e)
                state = TransferState.FAILED
            finally:
                self._slots.release()
            # NOTE: what the router's TTFT model needs is what the transfer adds to the prefill
            # step: the wait after the forward pass until the last message left (earlier layers
            # went out while later ones computed). Timed from the transfer's start, a sample
            # would hold the whole forward pass again, counted twice beside the step's time.
            now = time.perf_counter()
            ok = state is TransferState.DONE
            self.metrics.observe_transfer(num_bytes, now - start, ok, exposed_s=now - forward_done)
            self.on_sent(rid, state)
            self.sending.discard(rid)

    def wait_idle(self, timeout_s: float = 10.0) -> bool:
        """True once every queued transfer's outcome was reported (tests, shutdown)."""
        deadline = time.monotonic() + timeout_s
        while self.sending and time.monotonic() < deadline:
            time.sleep(0.001)
        return not self.sending


class PrefillWorker(EngineHost):
    def __init__(
        self,
        worker_id: str,
        engine_args: dict,
        store_host: str,
        store_port: int,
        transfer_timeout_s: float = 30.0,
        torch_threads: int | None = None,
        transfer_backend: str = "auto",
        tier: str = "",
    ):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.worker_id = worker_id
        # NOTE: a tier's speculative decoding runs on its decode workers; a prefill worker
        # samples only token 1, so it loads no draft model (the decode side prefills the draft).
        engine_args = {k: v for k, v in engine_args.items() if k != "speculative"}
        # Every request leaves after its first token: no decode step, no decode graphs to
        # capture (their memory and start-up time); prompt steps replay the prefill graphs.
        engine_args = {"decode_graphs": False, **engine_args}
        self.engine = LLMEngine(EngineConfig(**engine_args))
        self.agent = KVTransferAgent(
            worker_id,
            self.engine.runner.kv_caches,
            store_host,
            store_port,
            backend=transfer_backend,
            timeout_s=transfer_timeout_s,
            role="prefill",
        )
        self.metrics = EngineMetrics(tier, "prefill", worker_id)
        # Prefill results whose first token is known and whose transfer is not done yet, and
        # transfer outcomes that came before their request's output; both under `_lock`.
        self._lock = threading.Lock()
        self._awaiting: dict[str, tuple[Future, PrefillResult]] = {}
        self._sent: dict[str, TransferState] = {}
        self.connector = _SendConnector(
            self.agent,
            self.metrics,
            self.engine.runner.kv_bytes_per_block,
            self.engine.kv_manager,
            on_sent=self._on_sent,
        )
        self.engine.runner.kv_connector = self.connector
        self._pending: dict[str, tuple[Future, float]] = {}
        self.num_prefills = 0
        self._step_log: collections.deque[StepRecord] = collections.deque(maxlen=8192)
        self._last_step: StepRecord | None = None
        self.loop = EngineThread(self.engine, self._on_outputs)

    def connect(self, peer_id: str, fresh: bool = False) -> None:
        """Build (once) the communicator to a decode worker; it calls its side concurrently.
        `fresh`: the peer was restarted, so drop any pair with its previous process first."""
        if fresh:
            self.agent.disconnect(peer_id)
        self.agent.connect(peer_id)

    def disconnect(self, peer_id: str) -> None:
        """Drop the pair with `peer_id` (a decode worker removed from the deployment): its
        threads end and its group is aborted. The router calls it after stopping the peer."""
        self.agent.disconnect(peer_id)

    def prefill(
        self,
        request_id: str,
        transfer_id: int,
        prompt_token_ids: list[int],
        params: SamplingParams,
        peer_id: str,
        timeout_s: float = 600.0,
    ) -> PrefillResult:
        """Prefill the prompt, push its KV to `peer_id` (which reserved blocks under
        `transfer_id`), sample the first token. Blocks until done; one call per request."""
        future: Future = Future()
        one_token = dataclasses.replace(params, max_tokens=1, stop=[])
        # NOTE: from the call's arrival, so the wait for the running step to end (the request
        # joins the next) counts as the worker's time, as the planner simulates it.
        start = time.perf_counter()

        def add(engine: LLMEngine) -> None:
            engine.add_request(request_id, prompt_token_ids, one_token)
            self.connector.targets[request_id] = (transfer_id, peer_id)
            self._pending[request_id] = (future, start)

        self.loop.call(add)
        return future.result(timeout_s)

    def abort(self, request_id: str) -> None:
        def fn(engine: LLMEngine) -> None:
            engine.abort_request(request_id)
            self.connector.targets.pop(request_id, None)
            with self._lock:
                pending = self._pending.pop(request_id, None)
                awaiting = self._awaiting.pop(request_id, None)
                self._sent.pop(request_id, None)
            for future in (pending and pending[0], awaiting and awaiting[0]):
                if future is not None:
                    future.set_exception(RuntimeError(f"request {request_id} aborted"))

        self.loop.call(fn)

    def take_step_log(self) -> list[StepRecord]:
        """The steps run since the last call (at most the last 8192), oldest first."""
        taken = []
        while self._step_log:
            taken.append(self._step_log.popleft())
        return taken

    def _on_outputs(self, outputs) -> None:
        now = time.perf_counter()
        step, scheduler = self.engine.last_step, self.engine.scheduler
        duration = step.duration_s
        if step.num_seqs and not outputs and self.engine.runner.device.type == "cuda":
            # NOTE: a step that sampled nothing (a long prompt's first chunks) never waited for
            # the GPU: its duration is the host's launch time and the next step's holds both
            # forward passes (0.3x and 1.3-1.9x the model each, H200 2026-11-26: the live fit
            # put everything into its fixed term). Wait for the compute stream only (the KV
            # sends go on), which costs the next step's host preparation overlapping this one.
            torch.cuda.current_stream(self.engine.runner.device).synchronize()
            synced = time.perf_counter()
            duration += synced - now
            now = synced
        # NOTE: stepping back to back, a step holds the queue for its whole period: its forward
        # pass and the loop's work around it (scheduling, outputs, calls). The latency models
        # take the period, as `baton profile` does.
        seconds = duration
        if self._last_step is not None and self._last_step.backlog:
            seconds = max(seconds, now - self._last_step.end)
        self.metrics.observe_step(self.engine, seconds)
        if step.num_seqs:
            self._last_step = StepRecord(
                now,
                duration,
                step.num_seqs,
                step.num_prefill_tokens,
                step.attention_pairs,
                step.num_context_tokens,
                len(scheduler.waiting) + len(scheduler.running),
            )
            self._step_log.append(self._last_step)
        for out in outputs:
            if out.finished:
                self._answer(out)

    def _answer(self, out) -> None:
        """A prefill's first token is known: answer its `prefill` call now if its transfer is
        done (or never started), else when `_on_sent` reports it."""
        rid = out.request_id
        with self._lock:  # NOTE: every removal from _pending is under it (see _on_sent)
            pending = self._pending.pop(rid, None)
            if pending is None:
                return
            future, start = pending
            # The one-token request always ends with "length"; report only a real stop.
            reason = out.finish_reason if out.finish_reason == "stop" else None
            result = PrefillResult(
                first_token=out.token_ids[0],
                first_logprobs=out.logprobs[0] if out.logprobs else None,
                finish_reason=reason,
                num_prompt_tokens=len(out.prompt_token_ids),
                num_cached_tokens=out.num_cached_tokens,
                transfer=TransferState.FAILED.value,  # no transfer started: FAILED
                prefill_ms=(time.perf_counter() - start) * 1e3,
            )
            self.num_prefills += 1
            state = self._sent.pop(rid, None)
            if state is None and rid in self.connector.sending:
                self._awaiting[rid] = (future, result)
                return
        if state is not None:
            result = dataclasses.replace(result, transfer=state.value)
        future.set_result(result)

    def _on_sent(self, request_id: str, state: TransferState) -> None:
        """The sends thread: a transfer's outcome, for the request's `prefill` call if its first
        token is known, else for `_answer`; dropped if the request was aborted meanwhile."""
        with self._lock:  # (the connector drops it from `sending` after this returns)
            awaiting = self._awaiting.pop(request_id, None)
            if awaiting is None:
                if request_id in self._pending:
                    self._sent[request_id] = state
                return
        future, result = awaiting
        future.set_result(dataclasses.replace(result, transfer=state.value))

    def stats(self) -> dict:
        def fn(engine: LLMEngine) -> dict:
            kv = engine.kv_manager
            return {
                "worker_id": self.worker_id,
                "role": "prefill",
                "num_blocks": kv.num_blocks,
                "num_free_blocks": kv.num_free_blocks,
                "num_running": len(engine.scheduler.running),
                "num_waiting": len(engine.scheduler.waiting),
                "num_prefills": self.num_prefills,
                "prefix_cache_hit_rate": kv.stats.hit_rate,
                "prefix_cache_hit_tokens": kv.stats.hit_tokens,
                "prefix_cache_queried_tokens": kv.stats.queried_tokens,
            }

        return self.loop.call(fn)

    def debug_stall_sends(self, seconds: float, count: int = 1) -> None:
        """Fault injection for tests: the next `count` transfers stall `seconds` after their
        header, before any KV leaves."""

        def fn(engine: LLMEngine) -> None:
            self.connector.stall_sends.extend([seconds] * count)

        self.loop.call(fn)
