"""The prefill worker: computes prompts' KV (chunked, prefix-cached), pushes it layer by layer to
the decode worker that reserved blocks for it, and samples the first token.

Runs as a Ray actor (see deploy/launcher.py); the class itself is plain Python so tests can
host it in-process."""

from __future__ import annotations

import dataclasses
import logging
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
    prefill_ms: float


class _SendConnector(KVConnector):
    """Starts a request's transfer in the step that completes its prompt, sends each layer as
    soon as the forward pass has written it, and waits for the sends before blocks may be freed."""

    def __init__(
        self,
        agent: KVTransferAgent,
        metrics: EngineMetrics,
        bytes_per_block: int,
        kv_manager: KVCacheManager,
    ):
        self.agent = agent
        self.kv_manager = kv_manager
        self.metrics = metrics
        self.bytes_per_block = bytes_per_block
        self.targets: dict[str, tuple[int, str]] = {}  # request id -> (transfer id, decode peer)
        self.results: dict[str, TransferState] = {}
        self._active: list[tuple[str, SendHandle, int, float]] = []
        self.stall_sends: list[float] = []  # fault injection: seconds to sleep, one per transfer

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
        # NOTE: the forward pass is over here. What the router's TTFT model needs is what the
        # transfer adds to it: the wait from now until the last message left (earlier layers
        # went out while later ones computed). Timed from the transfer's start, a sample would
        # hold the whole forward pass again, counted twice beside the prefill step's time.
        forward_done = time.perf_counter()
        for rid, handle, num_bytes, start in self._active:
            state = self.agent.finish_send(handle)
            self.results[rid] = state
            ok = state is TransferState.DONE
            now = time.perf_counter()
            self.metrics.observe_transfer(num_bytes, now - start, ok, exposed_s=now - forward_done)
        self._active = []


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
        self.connector = _SendConnector(
            self.agent,
            self.metrics,
            self.engine.runner.kv_bytes_per_block,
            self.engine.kv_manager,
        )
        self.engine.runner.kv_connector = self.connector
        self._pending: dict[str, tuple[Future, float]] = {}
        self.num_prefills = 0
        self.loop = EngineThread(self.engine, self._on_outputs)

    def connect(self, peer_id: str, fresh: bool = False) -> None:
        """Build (once) the communicator to a decode worker; it calls its side concurrently.
        `fresh`: the peer was restarted, so drop any pair with its previous process first."""
        if fresh:
            self.agent.disconnect(peer_id)
        self.agent.connect(peer_id)

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

        def add(engine: LLMEngine) -> None:
            engine.add_request(request_id, prompt_token_ids, one_token)
            self.connector.targets[request_id] = (transfer_id, peer_id)
            self._pending[request_id] = (future, time.perf_counter())

        self.loop.call(add)
        return future.result(timeout_s)

    def abort(self, request_id: str) -> None:
        def fn(engine: LLMEngine) -> None:
            engine.abort_request(request_id)
            self.connector.targets.pop(request_id, None)
            pending = self._pending.pop(request_id, None)
            if pending is not None:
                pending[0].set_exception(RuntimeError(f"request {request_id} aborted"))

        self.loop.call(fn)

    def _on_outputs(self, outputs) -> None:
        self.metrics.observe_step(self.engine)
        for out in outputs:
            if not out.finished:
                continue
            pending = self._pending.pop(out.request_id, None)
            if pending is None:
                continue
            future, start = pending
            transfer = self.connector.results.pop(out.request_id, TransferState.FAILED)
            self.num_prefills += 1
            # The one-token request always ends with "length"; report only a real stop.
            reason = out.finish_reason if out.finish_reason == "stop" else None
            future.set_result(
                PrefillResult(
                    first_token=out.token_ids[0],
                    first_logprobs=out.logprobs[0] if out.logprobs else None,
                    finish_reason=reason,
                    num_prompt_tokens=len(out.prompt_token_ids),
                    num_cached_tokens=out.num_cached_tokens,
                    transfer=transfer.value,
                    prefill_ms=(time.perf_counter() - start) * 1e3,
                )
            )

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
