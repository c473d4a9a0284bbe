"""The request lifecycle: validate, place, reserve, prefill + transfer, stream, retry on failure.

    validate (before any worker sees it) ─▶ choose (P, D) ─▶ D.reserve (wait while D is full)
      ─▶ P.prefill (KV pushed to D over torch.distributed; returns token 1) ─▶ stream token 1
      ─▶ D.start ─▶ stream D's batched updates ─▶ last message (usage, timings, instances)

A prefill or decode worker that dies, a call that misses its deadline, or a transfer that
fails, sends the request back to placement with the tokens produced so far appended to its
prompt (re-prefill), at most `max_attempts` times. A cancelled stream aborts the request on both
workers. Admission is bounded: a tier with `max_queued_requests` requests waiting for a
reservation or their prefill refuses new ones (RESOURCE_EXHAUSTED) before any worker work.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from engine.chat_template import ChatTemplate
from engine.sampling_params import SamplingParams
from engine.text_stream import TextStream
from engine.tokenizer import IncrementalDetokenizer, Tokenizer
from router.metrics import PoolCollector, RouterMetrics, WorkerMetricsCollector
from router.placement import (
    GoodputPlacement,
    NoWorkerAvailable,
    Overloaded,
    Placement,
    PlacementInfo,
)
from router.supervisor import Respawn, Supervisor, SupervisorOptions
from router.tiers import TierChoice, TierSelector
from router.workers import Worker, WorkerClient, WorkerDied, WorkerTimeout

log = logging.getLogger(__name__)

_RESERVE_RETRY_S = (0.002, 0.05)  # backoff bounds while the decode worker has no free blocks
_POLL_WAIT_S = 0.5  # a decode worker's long poll waits this long for an update
ROLES = ("prefill", "decode", "colocated")
STREAMING_ROLES = ("decode", "colocated")  # workers whose token updates the router polls
MAX_REQUEST_ID_CHARS = 256


class RequestError(Exception):
    """A request the router refuses or cannot finish; `code` is a grpc.StatusCode name.
    `retry_after_s`: for RESOURCE_EXHAUSTED, when a retry may succeed."""

    def __init__(self, code: str, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s


@dataclass
class RouterOptions:
    """Deadlines and limits of the request lifecycle (set from the config by the launcher)."""

    call_timeout_s: float = 30.0  # any worker call but prefill and the long poll
    prefill_timeout_s: float = 300.0  # queueing on the prefill worker included
    # With no live worker of a role but one restarting, a request waits this long for it.
    restart_wait_s: float = 30.0
    retry_after_s: float = 1.0  # the advice sent with RESOURCE_EXHAUSTED (HTTP Retry-After)


@dataclass
class TierInfo:
    name: str
    path: str
    tokenizer: Tokenizer | None
    vocab_size: int
    max_model_len: int
    max_tokens_limit: int
    default_max_tokens: int
    block_size: int = 16
    kv_bytes_per_token: int = 0  # all layers, K and V: what a prompt token costs to transfer
    ttft_slo_ms: float = 2000.0  # defaults for requests that give no SLO hints (goodput)
    tpot_slo_ms: float = 200.0
    chat_template: ChatTemplate | None = None  # None: the tier serves no chat requests
    # Requests waiting for a decode reservation or their prefill; more get RESOURCE_EXHAUSTED.
    max_queued_requests: int = 256
    max_prompt_chars: int = 0  # 0: 64 characters per token of context
    colocated: bool = False  # served by workers that prefill and decode (no KV handoff)

    def __post_init__(self) -> None:
        self.max_prompt_chars = self.max_prompt_chars or 64 * self.max_model_len


@dataclass
class Chunk:
    """One streamed message to the client."""

    token_ids: list[int]
    text: str
    logprobs: list | None = None
    finish_reason: str | None = None
    stop_reason: str | None = None
    # Last chunk only:
    usage: dict | None = None
    timings: dict | None = None
    tier: str = ""
    prefill_instance: str = ""
    decode_instance: str = ""
    estimated_cost: float = 0.0
    tier_reason: str = ""


@dataclass
class _Failure:
    reason: str


@dataclass
class _Request:
    request_id: str
    tier: TierInfo
    prompt_token_ids: list[int]
    params: SamplingParams
    text: TextStream
    received: float = field(default_factory=time.perf_counter)
    output_token_ids: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0
    attempts: int = 0
    # Attempts moved off a worker being removed (router/scaling.py): not failures, so they do
    # not count against max_attempts.
    migrations: int = 0
    queue_ms: float = 0.0
    prefill_ms: float = 0.0
    ttft_ms: float | None = None
    ttft_slo_ms: float = 0.0
    tpot_slo_ms: float = 0.0
    tier_choice: TierChoice | None = None
    # Worker-level ids are `{key}.{attempt}`: the router's own, unlike the client's request_id.
    key: str = field(default_factory=lambda: uuid.uuid4().hex)
    queued: bool = False  # counted in its tier's queue (waiting for a reservation or prefill)


class Router:
    def __init__(
        self,
        tiers: dict[str, TierInfo],
        default_tier: str,
        workers: list[Worker],
        max_attempts: int = 3,
        placement: Placement | None = None,
        options: RouterOptions | None = None,
        supervisor_options: SupervisorOptions | None = None,
        respawn: Respawn | None = None,
    ):
        """`respawn` (the launcher's) re-creates a dead worker's process; None: no restarts."""
        self.tiers = tiers
        self.default_tier = default_tier
        self.workers = workers
        self.max_attempts = max_attempts
        self.placement = placement or GoodputPlacement()
        self.options = options or RouterOptions()
        self.supervisor = Supervisor(self, respawn, supervisor_options or SupervisorOptions())
        # Set by the launcher when the config prices its tiers (needs goodput placement).
        self.tier_selector: TierSelector | None = None
        # (prefill id, decode id) -> the workers' incarnations when their pair was built.
        self._connected: dict[tuple[str, str], tuple[int, int]] = {}
        self._connecting: dict[tuple[str, str], asyncio.Task] = {}
        self._suspect: set[tuple[str, str]] = set()  # a transfer failed on it: reconnect
        self._streams: dict[str, asyncio.Queue] = {}  # worker-level request id -> updates
        self._queued: dict[str, int] = dict.fromkeys(tiers, 0)
        self._transfer_ids = itertools.count(1)
        self._tasks: list[asyncio.Task] = []
        self.metrics = RouterMetrics()
        self.worker_metrics = WorkerMetricsCollector()
        self.metrics.registry.register(self.worker_metrics)
        self.metrics.registry.register(PoolCollector(lambda: self.workers))
        self.metrics_refresh_s = 1.0

    async def start(self) -> None:
        for worker in self.workers:
            if worker.role in STREAMING_ROLES:
                self._tasks.append(asyncio.create_task(self._poll_decode(worker)))
        self._tasks.append(asyncio.create_task(self._refresh_worker_metrics()))
        self._tasks.append(asyncio.create_task(self.supervisor.run()))

    async def _refresh_worker_metrics(self) -> None:
        """Keep a recent copy of every worker's metrics for the router's /metrics."""
        while True:
            await asyncio.gather(*(self._refresh_metrics_of(w) for w in self.workers))
            await asyncio.sleep(self.metrics_refresh_s)

    async def _refresh_metrics_of(self, worker: Worker) -> None:
        text = None
        if worker.alive:
            timeout_s = self.supervisor.options.ping_timeout_s
            try:
                text = (await self._call(worker, "metrics_text", timeout_s=timeout_s)).decode()
                samples = await self._call(worker, "step_samples", timeout_s=timeout_s)
                self.placement.observe_samples(worker, samples)
                stats = await self._call(worker, "stats", timeout_s=timeout_s)
                self.placement.observe_stats(worker, stats)
            except WorkerDied:
                text = None
            except Exception as e:
                log.debug("metrics of %s: %s", worker.worker_id, e)
                return
        if worker.draining and not worker.alive:
            return  # removed meanwhile: its metrics stay dropped
        self.worker_metrics.update(worker.worker_id, text)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.supervisor.stop()

    # -- workers: calls with deadlines, deaths, returns --------------------------------------

    async def _call(self, worker: Worker, method: str, *args, timeout_s: float | None = None):
        """Call a worker with a deadline (default `call_timeout_s`); a death it reveals is
        handled here (`worker_died`) before WorkerDied reaches the caller."""
        client = worker.client
        try:
            return await client.call(
                method, *args, timeout_s=timeout_s or self.options.call_timeout_s
            )
        except WorkerDied as e:
            self.worker_died(worker, client, f"its actor died ({_first_line(e)})")
            raise

    def worker_died(self, worker: Worker, client: WorkerClient, reason: str) -> None:
        """The process behind `client` is gone or useless. Its requests fail over (each attempt
        re-places itself) and the supervisor may restart it; its pairs are rebuilt when a new
        process comes (`_connect` compares incarnations). A late report about an earlier
        process (`client` no longer the worker's) is ignored."""
        if worker.client is not client or not worker.alive:
            return
        worker.alive = False
        log.warning("worker %s is down: %s", worker.worker_id, reason)
        self.fail_streams(worker, f"{worker.role} worker {worker.worker_id} died")
        self.supervisor.on_death(worker)

    def fail_streams(self, worker: Worker, reason: str) -> None:
        """End the attempts streaming from `worker`: each goes back to placement (re-prefill
        with the tokens it streamed). Attempts still in a call to it fail with that call."""
        for wid in list(worker.requests):
            queue = self._streams.get(wid)
            if queue is not None:
                queue.put_nowait(_Failure(reason))

    def worker_back(self, worker: Worker, client: WorkerClient) -> None:
        """A new process of the worker answers its ping: it rejoins placement. Its pairs are
        rebuilt on first use (`_connect` sees the new incarnation)."""
        worker.client = client
        worker.incarnation += 1
        worker.requests.clear()
        self.placement.on_restarted(worker)
        worker.alive = True
        log.warning("worker %s is back (restart %d)", worker.worker_id, worker.restarts)
        if worker.role in STREAMING_ROLES:
            self._tasks.append(asyncio.create_task(self._poll_decode(worker)))

    # -- pools changing at runtime (router/scaling.py drives these) ----------------------------

    def add_worker(self, worker: Worker) -> None:
        """A new worker whose process answers its ping joins placement; its pairs are built on
        first use, as every pair is."""
        self.workers.append(worker)
        if worker.role in STREAMING_ROLES:
            self._tasks.append(asyncio.create_task(self._poll_decode(worker)))
        log.warning("worker %s (%s, %s) added", worker.worker_id, worker.tier, worker.role)

    def remove_worker(self, worker: Worker) -> list[str]:
        """Forget a drained worker (placement, pairs, re-exported metrics); its poller ends.
        Returns the peers it had pairs with, for them to drop theirs."""
        worker.draining, worker.alive = True, False
        self.workers[:] = [w for w in self.workers if w is not worker]
        self.placement.forget(worker)
        self.worker_metrics.update(worker.worker_id, None)
        self.metrics.forget_instance(worker.tier, worker.worker_id)
        peers = []
        for pair in [p for p in self._connected if worker.worker_id in p]:
            del self._connected[pair]
            self._suspect.discard(pair)
            peers += [wid for wid in pair if wid != worker.worker_id]
        log.warning("worker %s removed", worker.worker_id)
        return peers

    # -- validation -------------------------------------------------------------------------

    def validate(
        self,
        prompt: str,
        prompt_token_ids: list[int],
        model: str,
        params: SamplingParams | None,
        max_tokens: int | None,
        ttft_slo_ms: float = 0.0,
        itl_slo_ms: float = 0.0,
        min_quality: float = 0.0,
        max_cost: float = 0.0,
    ) -> _Request:
        """Everything a worker would reject, rejected here first (raises RequestError).
        SLO hints of 0 take the tier's defaults. With model "" or "auto" and several tiers,
        the tier selector picks the tier (quality floor, cost budget, SLO likelihood)."""
        choice = None
        try:
            _check_hints(ttft_slo_ms, itl_slo_ms, min_quality, max_cost)
            if model in ("", "auto") and self.tier_selector is not None and len(self.tiers) > 1:
                choice = self._choose_tier(
                    prompt,
                    prompt_token_ids,
                    max_tokens,
                    ttft_slo_ms,
                    itl_slo_ms,
                    min_quality,
                    max_cost,
                )
                model = choice.tier
            req = self._validate(prompt, prompt_token_ids, model, params, max_tokens)
        except RequestError as e:
            tier = model if model in self.tiers else self.default_tier
            self.metrics.requests.labels(tier, e.code).inc()
            raise
        req.ttft_slo_ms = ttft_slo_ms or req.tier.ttft_slo_ms
        req.tpot_slo_ms = itl_slo_ms or req.tier.tpot_slo_ms
        req.tier_choice = choice
        return req

    def _choose_tier(
        self, prompt, prompt_token_ids, max_tokens, ttft_slo_ms, itl_slo_ms, min_quality, max_cost
    ) -> TierChoice:
        infos = {}
        for name, tier in self.tiers.items():
            if prompt and (tier.tokenizer is None or len(prompt) > tier.max_prompt_chars):
                continue
            if not prompt and len(prompt_token_ids) >= tier.max_model_len:
                continue
            tokens = tier.tokenizer.encode(prompt) if prompt else list(prompt_token_ids)
            n = max_tokens or tier.default_max_tokens
            if not tokens or len(tokens) + 1 > tier.max_model_len or n > tier.max_tokens_limit:
                continue  # this tier would refuse it; the others may not
            infos[name] = PlacementInfo(
                name,
                tokens,
                n,
                (ttft_slo_ms or tier.ttft_slo_ms) / 1e3,
                (itl_slo_ms or tier.tpot_slo_ms) / 1e3,
                tier.block_size,
                tier.kv_bytes_per_token,
            )
        if not infos:  # every tier refuses it: let the default tier's validation say why
            return TierChoice(self.default_tier, "no tier accepts the request", 0.0, 0.0)
        return self.tier_selector.choose(self.workers, infos, prompt, min_quality, max_cost)

    def _validate(
        self,
        prompt: str,
        prompt_token_ids: list[int],
        model: str,
        params: SamplingParams | None,
        max_tokens: int | None,
    ) -> _Request:
        tier_name = self.default_tier if model in ("", "auto") else model
        tier = self.tiers.get(tier_name)
        if tier is None:
            raise RequestError(
                "NOT_FOUND", f"unknown model {_short(model)}; served: {sorted(self.tiers)}"
            )
        if prompt:
            if tier.tokenizer is None:
                raise RequestError(
                    "INVALID_ARGUMENT",
                    f"model {tier.name!r} has no tokenizer; send prompt_token_ids",
                )
            # Checked before tokenizing: tokenizing runs on the router's event loop.
            if len(prompt) > tier.max_prompt_chars:
                raise RequestError(
                    "INVALID_ARGUMENT",
                    f"prompt has {len(prompt)} characters; {tier.name!r} takes at most "
                    f"{tier.max_prompt_chars}",
                )
            _check_utf8("prompt", prompt)
            token_ids = tier.tokenizer.encode(prompt)
        else:
            token_ids = list(prompt_token_ids)
        if not token_ids:
            raise RequestError("INVALID_ARGUMENT", "prompt is empty")
        if len(token_ids) + 1 > tier.max_model_len:
            raise RequestError(
                "INVALID_ARGUMENT",
                f"prompt has {len(token_ids)} tokens; the context of {tier.name!r} is "
                f"{tier.max_model_len}",
            )
        if min(token_ids) < 0 or max(token_ids) >= tier.vocab_size:
            raise RequestError(
                "INVALID_ARGUMENT", f"prompt token ids must be in [0, {tier.vocab_size})"
            )
        if max_tokens is None:
            max_tokens = tier.default_max_tokens
        if not 1 <= max_tokens <= tier.max_tokens_limit:
            raise RequestError(
                "INVALID_ARGUMENT",
                f"max_tokens must be in [1, {tier.max_tokens_limit}], got {_short(max_tokens)}",
            )
        try:
            params = dataclasses.replace(params or SamplingParams(), max_tokens=max_tokens)
        except ValueError as e:
            raise RequestError("INVALID_ARGUMENT", str(e)) from None
        if params.stop and tier.tokenizer is None:
            raise RequestError("INVALID_ARGUMENT", "stop strings need a tokenizer")
        for stop in params.stop:
            _check_utf8("stop strings", stop)
        detok = (
            IncrementalDetokenizer(tier.tokenizer, token_ids, params.skip_special_tokens)
            if tier.tokenizer
            else None
        )
        text = TextStream(prompt or None, detok, params.stop, params.include_stop_str_in_output)
        return _Request(uuid.uuid4().hex, tier, token_ids, params, text)

    # -- the lifecycle ----------------------------------------------------------------------

    async def generate(self, req: _Request) -> AsyncIterator[Chunk]:
        """Serve the request; yields chunks to stream. Records its metrics however it ends."""
        tier = req.tier.name
        outcome = "abort"  # unless it finishes or fails below: the client went away
        last_chunk_at = None
        try:
            self._admit(req)
            async for chunk in self._generate(req):
                now = time.perf_counter()
                if chunk.token_ids:
                    if last_chunk_at is None:
                        self.metrics.ttft.labels(tier).observe(now - req.received)
                        self.metrics.queue.labels(tier).observe(req.queue_ms / 1e3)
                    else:
                        self.metrics.itl.labels(tier).observe(now - last_chunk_at)
                    last_chunk_at = now
                    self.metrics.generation_tokens.labels(tier).inc(len(chunk.token_ids))
                if chunk.finish_reason is not None:
                    self.metrics.observe_finished(
                        tier,
                        chunk.prefill_instance,
                        chunk.decode_instance,
                        ttft_s=(req.ttft_ms or 0.0) / 1e3,
                        e2e_s=now - req.received,
                        num_tokens=len(req.output_token_ids),
                        num_prompt_tokens=len(req.prompt_token_ids),
                        ttft_slo_s=req.ttft_slo_ms / 1e3,
                        tpot_slo_s=req.tpot_slo_ms / 1e3,
                        outcome=chunk.finish_reason,
                    )
                    outcome = ""  # counted
                yield chunk
        except RequestError as e:
            outcome = e.code
            raise
        finally:
            self._dequeue(req)
            if req.attempts > 1:
                self.metrics.retries.labels(tier).inc(req.attempts - 1)
            if outcome:
                self.metrics.requests.labels(tier, outcome).inc()

    def _admit(self, req: _Request) -> None:
        """Count the request in its tier's queue, or refuse it if the queue is full."""
        tier = req.tier
        if self._queued[tier.name] >= tier.max_queued_requests:
            retry_after_s = self.options.retry_after_s
            raise RequestError(
                "RESOURCE_EXHAUSTED",
                f"model {tier.name!r} is at capacity: {self._queued[tier.name]} requests queued "
                f"(max_queued_requests); retry after {retry_after_s:g} s",
                retry_after_s,
            )
        self._enqueue(req)

    def _enqueue(self, req: _Request) -> None:
        if not req.queued:
            req.queued = True
            self._queued[req.tier.name] += 1

    def _dequeue(self, req: _Request) -> None:
        if req.queued:
            req.queued = False
            self._queued[req.tier.name] -= 1

    async def _generate(self, req: _Request) -> AsyncIterator[Chunk]:
        failed_workers: set[str] = set()
        last_error = ""
        while req.attempts - req.migrations < self.max_attempts:
            req.attempts += 1
            self._enqueue(req)  # a retry waits for a reservation and a prefill again
            info = PlacementInfo(
                tier=req.tier.name,
                # After a failure the tokens already streamed join the prompt (re-prefill).
                prompt_token_ids=req.prompt_token_ids + req.output_token_ids,
                max_tokens=req.params.max_tokens - len(req.output_token_ids),
                ttft_slo_s=req.ttft_slo_ms / 1e3,
                tpot_slo_s=req.tpot_slo_ms / 1e3,
                block_size=req.tier.block_size,
                kv_bytes_per_token=req.tier.kv_bytes_per_token,
            )
            wid = f"{req.key}.{req.attempts}"
            if req.tier.colocated:
                worker = await self._choose(info, failed_workers, colocated=True)
                workers, attempt = (worker,), self._attempt_colocated(req, wid, worker, info)
            else:
                prefill, decode = await self._choose(info, failed_workers)
                workers, attempt = (prefill, decode), self._attempt(req, wid, prefill, decode, info)
            try:
                async for chunk in attempt:
                    yield chunk
                    if chunk.finish_reason is not None:
                        return
                return
            except (WorkerDied, _AttemptFailed) as e:
                last_error = _first_line(e)
                log.warning("request %s attempt %d failed: %s", req.key, req.attempts, last_error)
                failed_workers.update(w.worker_id for w in workers if not w.alive)
                if isinstance(e, _AttemptFailed) and e.worker is not None:
                    failed_workers.add(e.worker)
                if any(w.draining for w in workers):
                    req.migrations += 1  # moved off a worker being removed: not a failure
        raise RequestError(
            "UNAVAILABLE", f"request failed after {req.attempts} attempts: {last_error}"
        )

    async def _choose(self, info: PlacementInfo, avoid: set[str], colocated: bool = False):
        """Placement: (prefill, decode), or the one worker of a colocated tier; while a role
        has no live worker but one restarting, wait (bounded)."""
        deadline = time.monotonic() + self.options.restart_wait_s
        while True:
            try:
                if colocated:
                    return self.placement.choose_colocated(self.workers, info, avoid)
                return self.placement.choose(self.workers, info, avoid)
            except NoWorkerAvailable as e:
                waiting = any(self.supervisor.restarting(info.tier, r) for r in ROLES)
                if not waiting or time.monotonic() > deadline:
                    raise RequestError("UNAVAILABLE", str(e)) from None
            except Overloaded as e:
                retry_after_s = self.options.retry_after_s
                raise RequestError(
                    "RESOURCE_EXHAUSTED", f"{e}; retry after {retry_after_s:g} s", retry_after_s
                ) from None
            await asyncio.sleep(0.05)

    async def _attempt(
        self, req: _Request, wid: str, prefill: Worker, decode: Worker, info: PlacementInfo
    ) -> AsyncIterator[Chunk]:
        prompt = info.prompt_token_ids
        params = _attempt_params(req, info)
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[wid] = queue
        prefill.requests.add(wid)
        decode.requests.add(wid)
        finished = False
        decode_finished = False  # the decode worker ended it itself (nothing left to abort)
        self.placement.on_placed(prefill, decode, info, wid)
        try:
            await self._connect(prefill, decode)
            transfer_id = next(self._transfer_ids)
            await self._reserve(req, wid, transfer_id, prefill, decode, prompt, params)
            start = time.perf_counter()
            result = await self._attempt_call(
                prefill,
                "prefill",
                wid,
                transfer_id,
                prompt,
                params,
                decode.worker_id,
                timeout_s=self.options.prefill_timeout_s,
            )
            self._dequeue(req)  # out of the queue: streaming from here on
            prefill.requests.discard(wid)  # done there: nothing to abort on the prefill side
            now = time.perf_counter()
            req.prefill_ms += (now - start) * 1e3
            # The first token's path outside the prefill worker (placement, the reservation,
            # the calls' round trips): the planner adds it to the TTFTs it simulates.
            overhead_s = now - req.received - result.prefill_ms / 1e3
            first_try = req.attempts == 1
            self.placement.on_prefill_done(
                prefill, info, wid, now - start, overhead_s if first_try else None
            )
            if result.transfer != "done":
                # The pair may be broken: the next request on it reconnects (a no-op if not).
                self._suspect.add((prefill.worker_id, decode.worker_id))
                raise _AttemptFailed(
                    f"KV transfer {result.transfer} from {prefill.worker_id}", prefill.worker_id
                )
            if req.attempts == 1 or not req.output_token_ids:
                req.num_cached_tokens = result.num_cached_tokens
            lp = [result.first_logprobs] if result.first_logprobs else None
            first_reason = result.finish_reason
            if first_reason is None and len(req.output_token_ids) + 1 >= req.params.max_tokens:
                first_reason = "length"
            stop_token = result.first_token if result.finish_reason == "stop" else None
            chunk = self._advance(req, [result.first_token], lp, first_reason, stop_token)
            if chunk.finish_reason is None:
                # The first token goes out before the decode worker's `start` call: the client
                # does not wait for that round trip (3.5-4.5 ms of client TTFT on the local CPU
                # deployment). It is in req.output_token_ids, so a retry after a failed start
                # goes on after it, as the client saw it.
                yield chunk
                chunk = Chunk([], "")
                await self._attempt_call(
                    decode, "start", wid, result.first_token, result.first_logprobs
                )
            while True:
                if chunk.token_ids or chunk.text or chunk.finish_reason:
                    if chunk.finish_reason is not None:
                        finished = True
                        self._finalize(chunk, req, prefill, decode)
                    yield chunk
                    if finished:
                        return
                update = await queue.get()
                if isinstance(update, _Failure):
                    raise _AttemptFailed(update.reason, None)
                if update.error:
                    # e.g. the KV never arrived: the pair may be broken, so the next request on
                    # it reconnects (a no-op on a healthy pair).
                    self._suspect.add((prefill.worker_id, decode.worker_id))
                    raise _AttemptFailed(update.error, None)
                decode_finished = update.finish_reason is not None
                self.placement.on_tokens(decode, wid, len(update.new_token_ids))
                chunk = self._advance_update(req, update)
        finally:
            self.placement.on_finished(prefill, decode, wid)
            self._streams.pop(wid, None)
            still_prefilling = wid in prefill.requests
            decode.requests.discard(wid)
            prefill.requests.discard(wid)
            if not decode_finished:
                # Cancelled, failed, or ended here (stop string, first token): free its blocks.
                asyncio.get_running_loop().create_task(
                    self._abort(wid, prefill if still_prefilling else None, decode)
                )

    async def _attempt_colocated(
        self, req: _Request, wid: str, worker: Worker, info: PlacementInfo
    ) -> AsyncIterator[Chunk]:
        """A colocated tier: one worker prefills and decodes; its updates (the first token
        included) stream as a decode worker's do."""
        params = _attempt_params(req, info)
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[wid] = queue
        worker.requests.add(wid)
        worker_finished = False  # the worker ended it itself (nothing left to abort)
        try:
            start = time.perf_counter()
            await self._attempt_call(worker, "generate", wid, info.prompt_token_ids, params)
            while True:
                update = await queue.get()
                if isinstance(update, _Failure):
                    raise _AttemptFailed(update.reason, None)
                if update.error:
                    raise _AttemptFailed(update.error, worker.worker_id)
                if req.queued and update.new_token_ids:  # the first token: prefill is over
                    self._dequeue(req)
                    req.prefill_ms += (time.perf_counter() - start) * 1e3
                worker_finished = update.finish_reason is not None
                chunk = self._advance_update(req, update)
                if chunk.finish_reason is not None:
                    self._finalize(chunk, req, worker, worker)
                if chunk.token_ids or chunk.text or chunk.finish_reason:
                    yield chunk
                if chunk.finish_reason is not None:
                    return
        finally:
            self._streams.pop(wid, None)
            worker.requests.discard(wid)
            if not worker_finished:
                asyncio.get_running_loop().create_task(self._abort(wid, None, worker))

    def _advance_update(self, req: _Request, update) -> Chunk:
        return self._advance(
            req, update.new_token_ids, update.logprobs, update.finish_reason, update.stop_reason
        )

    def _advance(self, req: _Request, token_ids, logprobs, finish_reason, stop_reason) -> Chunk:
        req.output_token_ids.extend(token_ids)
        if req.ttft_ms is None and token_ids:
            req.ttft_ms = (time.perf_counter() - req.received) * 1e3
        req.text.append(token_ids)
        if req.text.stop_hit is not None and finish_reason is None:
            finish_reason, stop_reason = "stop", req.text.stop_hit
        finished = finish_reason is not None
        return Chunk(
            list(token_ids),
            req.text.take_delta(finished),
            logprobs,
            finish_reason,
            None if stop_reason is None else str(stop_reason),
        )

    def _finalize(self, chunk: Chunk, req: _Request, prefill: Worker, decode: Worker) -> None:
        chunk.usage = {
            "prompt_tokens": len(req.prompt_token_ids),
            "completion_tokens": len(req.output_token_ids),
            "cached_prompt_tokens": req.num_cached_tokens,
        }
        chunk.timings = {
            "ttft_ms": req.ttft_ms or 0.0,
            "e2e_ms": (time.perf_counter() - req.received) * 1e3,
            "queue_ms": req.queue_ms,
            "prefill_ms": req.prefill_ms,
            "attempts": req.attempts,
        }
        chunk.tier = req.tier.name
        if req.tier_choice is not None:
            chunk.estimated_cost = req.tier_choice.estimated_cost
            chunk.tier_reason = req.tier_choice.reason
        chunk.prefill_instance = prefill.worker_id
        chunk.decode_instance = decode.worker_id

    async def _reserve(self, req, wid, transfer_id, prefill, decode, prompt, params) -> None:
        """Hold blocks on the decode worker; while it has none free, the request waits."""
        start = time.perf_counter()
        delay = _RESERVE_RETRY_S[0]
        args = (wid, transfer_id, prefill.worker_id, prompt, params)
        while not await self._attempt_call(decode, "reserve", *args):
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RESERVE_RETRY_S[1])
            if not decode.alive:
                raise _AttemptFailed(f"decode worker {decode.worker_id} died", decode.worker_id)
        req.queue_ms += (time.perf_counter() - start) * 1e3

    async def _attempt_call(self, worker: Worker, method: str, *args, timeout_s=None):
        """A call on an attempt's path. Raises WorkerDied, _AttemptFailed (missed deadline or
        the worker failed: try elsewhere), or RequestError (the worker refused the request)."""
        try:
            return await self._call(worker, method, *args, timeout_s=timeout_s)
        except WorkerDied:
            raise
        except WorkerTimeout as e:
            raise _AttemptFailed(f"{worker.worker_id}: {e}", worker.worker_id) from None
        except ValueError as e:  # what the engine's validation says of this request
            raise RequestError(
                "INVALID_ARGUMENT", f"{worker.worker_id} refused the request: {_first_line(e)}"
            ) from None
        except Exception as e:
            raise _AttemptFailed(
                f"{method} on {worker.worker_id} failed: {type(e).__name__}: {_first_line(e)}",
                worker.worker_id,
            ) from None

    async def _connect(self, prefill: Worker, decode: Worker) -> None:
        """Build the pair's communicator once per pair of processes, both sides at the same
        time; concurrent requests for a pair share one connect."""
        pair = (prefill.worker_id, decode.worker_id)
        incarnations = (prefill.incarnation, decode.incarnation)
        if self._connected.get(pair) == incarnations and pair not in self._suspect:
            return
        task = self._connecting.get(pair)
        if task is None:
            task = asyncio.create_task(self._connect_pair(prefill, decode, incarnations))
            self._connecting[pair] = task
            task.add_done_callback(lambda _: self._connecting.pop(pair, None))
        await asyncio.shield(task)  # a cancelled request leaves the connect to the others

    async def _connect_pair(self, prefill: Worker, decode: Worker, incarnations) -> None:
        pair = (prefill.worker_id, decode.worker_id)
        built = self._connected.get(pair)
        # NOTE: a worker that was restarted did not mark its old pairs broken: the survivor
        # must drop its pair first, or it may take the stale one for live.
        fresh = built is not None and built != incarnations
        timeout_s = 2 * self.options.call_timeout_s  # the handshake has its own, shorter bound
        results = await asyncio.gather(
            self._call(prefill, "connect", decode.worker_id, fresh, timeout_s=timeout_s),
            self._call(decode, "connect", prefill.worker_id, fresh, timeout_s=timeout_s),
            return_exceptions=True,
        )
        for worker, result in zip((prefill, decode), results):
            if isinstance(result, BaseException):
                raise _AttemptFailed(
                    f"connecting {pair}: {_first_line(result)}", worker.worker_id
                ) from None
        self._connected[pair] = incarnations
        self._suspect.discard(pair)

    async def _abort(self, wid: str, prefill: Worker | None, decode: Worker) -> None:
        for worker in (prefill, decode):
            if worker is not None and worker.alive:
                try:
                    await self._call(worker, "abort", wid)
                except Exception as e:  # best effort: a dead worker frees nothing anyway
                    log.debug("abort %s on %s: %s", wid, worker.worker_id, e)

    async def _poll_decode(self, worker: Worker) -> None:
        """One long poll at a time per decode worker process: every step's batched update.
        Ends when the process dies (`worker_died` fails its requests over)."""
        incarnation = worker.incarnation
        timeout_s = _POLL_WAIT_S + self.options.call_timeout_s
        while worker.alive and worker.incarnation == incarnation:
            try:
                batches = await self._call(
                    worker, "poll_updates", _POLL_WAIT_S, timeout_s=timeout_s
                )
            except WorkerDied:
                break
            except asyncio.CancelledError:
                raise
            except Exception as e:  # e.g. a missed deadline: the health check judges the worker
                log.warning("polling %s: %s", worker.worker_id, _first_line(e))
                await asyncio.sleep(0.1)
                continue
            for batch in batches:
                for update in batch:
                    queue = self._streams.get(update.request_id)
                    if queue is not None:
                        queue.put_nowait(update)

    async def stats(self) -> list[dict]:
        """Every worker's stats (`alive: False` for the dead), asked concurrently."""

        async def one(worker: Worker) -> dict:
            if worker.alive:
                try:
                    return {**(await self._call(worker, "stats")), "alive": True}
                except WorkerDied:
                    pass
            return {"worker_id": worker.worker_id, "role": worker.role, "alive": False}

        return list(await asyncio.gather(*(one(w) for w in self.workers)))


class _AttemptFailed(Exception):
    def __init__(self, message: str, worker: str | None):
        super().__init__(message)
        self.worker = worker


def _attempt_params(req: _Request, info: PlacementInfo) -> SamplingParams:
    """One attempt's params: what is left of max_tokens; with structured output, the tokens
    already streamed end the re-prefilled prompt, and the grammar must consume them first."""
    n = len(req.output_token_ids) if req.params.grammar is not None else 0
    return dataclasses.replace(
        req.params, max_tokens=info.max_tokens, num_structured_prompt_tokens=n
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:500] if text else type(e).__name__


def _short(value, limit: int = 80) -> str:
    """repr() cut to `limit` characters: error messages echo input, not megabytes of it."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-2:]}"


def _check_utf8(name: str, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(
            "INVALID_ARGUMENT", f"{name} must be valid Unicode (lone surrogates are not)"
        ) from None


def _check_hints(ttft_slo_ms, itl_slo_ms, min_quality, max_cost) -> None:
    for name, value in (("ttft_slo_ms", ttft_slo_ms), ("itl_slo_ms", itl_slo_ms)):
        if not (math.isfinite(value) and value >= 0):
            raise RequestError("INVALID_ARGUMENT", f"{name} must be finite and >= 0, got {value}")
    if not 0.0 <= min_quality <= 1.0:
        raise RequestError("INVALID_ARGUMENT", f"min_quality must be in [0, 1], got {min_quality}")
    if not (math.isfinite(max_cost) and max_cost >= 0):
        raise RequestError("INVALID_ARGUMENT", f"max_cost must be finite and >= 0, got {max_cost}")
