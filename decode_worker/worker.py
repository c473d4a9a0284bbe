"""The decode worker: reserves blocks for a prompt's KV, receives it from a prefill worker,
then decodes in its continuous batch and publishes one batched token update per step.

Runs as a Ray actor (see deploy/launcher.py); the class itself is plain Python."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

import torch

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.engine_thread import EngineHost, EngineThread
from engine.metrics import EngineMetrics
from kvtransfer import KVTransferAgent, TransferState

log = logging.getLogger(__name__)

# Published step batches kept for the router's poller; beyond this they are merged into one
# batch per request (nothing is lost, memory grows with requests, not with steps).
MAX_PENDING_BATCHES = 256
_HOUSEKEEPING_S = 0.1  # how often the loop looks for expired leases and orphans


@dataclasses.dataclass
class TokenUpdate:
    request_id: str
    new_token_ids: list[int]
    logprobs: list | None = None  # one entry per new token, when asked for
    finish_reason: str | None = None  # "stop", "length", "abort"
    stop_reason: int | None = None
    error: str | None = None  # set when the request failed here (e.g. its KV never arrived)


@dataclasses.dataclass
class _Handoff:
    transfer_id: int
    arrived: bool = False
    first: tuple[int, tuple | None] | None = None  # (first token, its logprobs), from the router
    # A lease: a reservation `start` has not claimed by then is released (the router is gone).
    expires_at: float = float("inf")


class DecodeWorker(EngineHost):
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
        reservation_ttl_s: float = 60.0,
        colocated: bool = False,
    ):
        """`colocated`: this worker prefills its requests too (`generate`), with no KV agent:
        the baseline that disaggregated serving is compared against."""
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.worker_id = worker_id
        self.reservation_ttl_s = reservation_ttl_s
        if not colocated:
            # Requests arrive prefilled: only a preempted one is recomputed here, too rarely
            # for the piecewise prefill graphs' capture and memory (the pool may still ask).
            engine_args = {"prefill_graphs": False, **engine_args}
        self.engine = LLMEngine(EngineConfig(**engine_args))
        self.agent = None
        if not colocated:
            self.agent = KVTransferAgent(
                worker_id,
                self.engine.runner.kv_caches,
                store_host,
                store_port,
                backend=transfer_backend,
                timeout_s=transfer_timeout_s,
                role="decode",
            )
        self._handoffs: dict[str, _Handoff] = {}  # reserved requests, by request id
        self._by_transfer: dict[int, str] = {}
        self._updates: list[list[TokenUpdate]] = []
        self._updates_cv = threading.Condition()
        self._last_poll = time.monotonic()
        self._next_housekeeping = 0.0
        self.num_transfers_failed = 0
        self.num_leases_expired = 0
        self.num_orphans_aborted = 0
        self.metrics = EngineMetrics(tier, "colocated" if colocated else "decode", worker_id)
        self.loop = EngineThread(self.engine, self._on_outputs, poll=self._poll_transfers)
        if self.agent is not None:  # a landed KV is seen at once, not at the next 1 ms tick
            self.agent.on_result = self.loop.wake

    def connect(self, peer_id: str, fresh: bool = False) -> None:
        """Build (once) the communicator to a prefill worker; it calls its side concurrently.
        `fresh`: the peer was restarted, so drop any pair with its previous process first."""
        if fresh:
            self.agent.disconnect(peer_id)
        self.agent.connect(peer_id)

    def disconnect(self, peer_id: str) -> None:
        """Drop the pair with `peer_id` (a prefill worker removed from the deployment): its
        threads end and its group is aborted. The router calls it after stopping the peer."""
        self.agent.disconnect(peer_id)

    def reserve(
        self,
        request_id: str,
        transfer_id: int,
        peer_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
    ) -> bool:
        """Hold blocks for the prompt's KV and expect it from `peer_id` under `transfer_id`.
        False when no blocks are free now (the router waits and asks again). The reservation is
        a lease: without `start` within `reservation_ttl_s` it is released."""

        def fn(engine: LLMEngine) -> bool:
            block_ids = engine.reserve(
                request_id,
                prompt_token_ids,
                dataclasses.replace(params, stop=[]),
                output_kind="delta",  # what _publish_outputs sends; no copies of the whole
                detokenize=False,  # the router detokenizes and checks stop strings
            )
            if block_ids is None:
                return False
            self.agent.expect(transfer_id, peer_id, block_ids)
            expires_at = time.monotonic() + self.reservation_ttl_s
            self._handoffs[request_id] = _Handoff(transfer_id, expires_at=expires_at)
            self._by_transfer[transfer_id] = request_id
            return True

        return self.loop.call(fn)

    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        """Colocated serving: prefill and decode the request here; its tokens, the first one
        included, come in `poll_updates` like a handed-off request's."""
        if self.agent is not None:
            raise RuntimeError(f"{self.worker_id} is a decode worker: requests come prefilled")
        # The router applies stop strings (they may span tokens it has already streamed).
        params = dataclasses.replace(params, stop=[])
        self.loop.call(lambda engine: engine.add_request(request_id, prompt_token_ids, params))

    def start(self, request_id: str, first_token: int, first_logprobs: tuple | None = None) -> None:
        """The prefill worker sampled `first_token`; decode from it once the KV is in."""

        def fn(engine: LLMEngine) -> None:
            handoff = self._handoffs.get(request_id)
            if handoff is None:
                raise KeyError(f"no reservation for request {request_id}")
            handoff.first = (first_token, first_logprobs)
            self._try_admit(engine, request_id)

        self.loop.call(fn)

    def abort(self, request_id: str) -> None:
        """Cancel: a reservation is released (its transfer ignored), a running request ends."""

        def fn(engine: LLMEngine) -> None:
            handoff = self._handoffs.pop(request_id, None)
            if handoff is not None:
                self.agent.cancel(handoff.transfer_id)
                self._by_transfer.pop(handoff.transfer_id, None)
                engine.release(request_id)
            else:
                engine.abort_request(request_id)

        self.loop.call(fn)

    def poll_updates(self, timeout_s: float = 1.0) -> list[list[TokenUpdate]]:
        """Long poll: every step's batched update since the last call (waits up to timeout_s
        for the first one). One call carries all requests' tokens, not one message per token."""
        self._last_poll = time.monotonic()
        with self._updates_cv:
            if not self._updates:
                self._updates_cv.wait(timeout_s)
            updates, self._updates = self._updates, []
        self._last_poll = time.monotonic()
        return updates

    def _publish(self, batch: list[TokenUpdate]) -> None:
        if batch:
            with self._updates_cv:
                self._updates.append(batch)
                if len(self._updates) > MAX_PENDING_BATCHES:  # the poller fell behind
                    self._updates = [coalesce(self._updates)]
                self._updates_cv.notify_all()

    def _on_outputs(self, outputs) -> None:
        self.metrics.observe_step(self.engine)
        self._publish_outputs(outputs)

    def _publish_outputs(self, outputs) -> None:
        batch = []
        for out in outputs:
            new = out.new_token_ids
            logprobs = out.logprobs[-len(new) :] if out.logprobs and new else None
            batch.append(
                TokenUpdate(
                    out.request_id,
                    out.new_token_ids,
                    logprobs,
                    out.finish_reason,
                    out.stop_reason if isinstance(out.stop_reason, int) else None,
                )
            )
        self._publish(batch)

    def _poll_transfers(self, engine: LLMEngine) -> bool:
        failed = []
        for transfer_id, state in self.agent.poll().items() if self.agent else ():
            request_id = self._by_transfer.pop(transfer_id, None)
            if request_id is None:
                continue  # cancelled meanwhile
            if state is TransferState.DONE:
                self._handoffs[request_id].arrived = True
                self._try_admit(engine, request_id)
            else:
                self._handoffs.pop(request_id, None)
                engine.release(request_id)
                self.num_transfers_failed += 1
                self.metrics.observe_transfer(0, 0.0, ok=False)
                failed.append(TokenUpdate(request_id, [], error=f"KV transfer {state.value}"))
        now = time.monotonic()
        if now >= self._next_housekeeping:
            self._next_housekeeping = now + _HOUSEKEEPING_S
            failed += self._expire_leases(engine, now)
            self._abort_orphans(engine, now)
        self._publish(failed)
        return bool(self._handoffs)

    def _expire_leases(self, engine: LLMEngine, now: float) -> list[TokenUpdate]:
        """Release reservations that `start` did not claim in time: their router is gone, or
        gave up on them. NOTE: one whose KV is still arriving is cancelled like an abort."""
        expired = [
            rid for rid, h in self._handoffs.items() if h.first is None and now >= h.expires_at
        ]
        for request_id in expired:
            handoff = self._handoffs.pop(request_id)
            self.agent.cancel(handoff.transfer_id)
            self._by_transfer.pop(handoff.transfer_id, None)
            engine.release(request_id)
            self.num_leases_expired += 1
            log.warning("reservation %s expired after %.0f s", request_id, self.reservation_ttl_s)
        error = f"reservation expired: not started within {self.reservation_ttl_s} s"
        return [TokenUpdate(rid, [], error=error) for rid in expired]

    def _abort_orphans(self, engine: LLMEngine, now: float) -> None:
        """Nobody has polled for `reservation_ttl_s`: the router is gone and nobody will read
        what the running requests produce. End them, and drop what is queued for the poller."""
        if now - self._last_poll < self.reservation_ttl_s or not engine.scheduler.running:
            return
        orphans = [r.request_id for r in engine.scheduler.running]
        for request_id in orphans:
            engine.abort_request(request_id)
        self.num_orphans_aborted += len(orphans)
        with self._updates_cv:
            self._updates = []
        log.warning("no poll for %.0f s: aborted %d requests", now - self._last_poll, len(orphans))

    def _try_admit(self, engine: LLMEngine, request_id: str) -> None:
        handoff = self._handoffs[request_id]
        if not (handoff.arrived and handoff.first):
            return
        del self._handoffs[request_id]
        final = engine.admit_prefilled(request_id, *handoff.first)
        if final is not None:
            self._publish_outputs([final])

    def stats(self) -> dict:
        def fn(engine: LLMEngine) -> dict:
            kv = engine.kv_manager
            drafter = engine.drafter  # speculative decoding's draft model, its own KV pool
            return {
                "num_draft_blocks": drafter.pool.num_blocks if drafter else 0,
                "num_free_draft_blocks": drafter.pool.num_free_blocks if drafter else 0,
                "num_draft_tokens": engine.num_draft_tokens,
                "num_accepted_tokens": engine.num_accepted_tokens,
                "worker_id": self.worker_id,
                "role": "decode" if self.agent is not None else "colocated",
                "num_blocks": kv.num_blocks,
                "num_free_blocks": kv.num_free_blocks,
                "num_running": len(engine.scheduler.running),
                "num_reserved": len(engine.scheduler.reserved),
                "num_waiting": len(engine.scheduler.waiting),
                "num_transfers_failed": self.num_transfers_failed,
                "num_leases_expired": self.num_leases_expired,
                "num_orphans_aborted": self.num_orphans_aborted,
            }

        return self.loop.call(fn)


def coalesce(batches: list[list[TokenUpdate]]) -> list[TokenUpdate]:
    """Many step batches as one: per request, its tokens (and logprobs) in order, and the last
    finish or error. What a poller that fell behind would have read, in fewer objects."""
    merged: dict[str, TokenUpdate] = {}
    for batch in batches:
        for update in batch:
            into = merged.get(update.request_id)
            if into is None:
                merged[update.request_id] = dataclasses.replace(
                    update,
                    new_token_ids=list(update.new_token_ids),
                    logprobs=None if update.logprobs is None else list(update.logprobs),
                )
                continue
            into.new_token_ids += update.new_token_ids
            if update.logprobs is not None:
                into.logprobs = (into.logprobs or []) + update.logprobs
            into.finish_reason = update.finish_reason or into.finish_reason
            into.stop_reason = update.stop_reason if update.finish_reason else into.stop_reason
            into.error = update.error or into.error
    return list(merged.values())
