"""The request lifecycle: validate, place, reserve, prefill + transfer, stream, retry on failure.

    validate (before any worker sees it) ─▶ choose (P, D) ─▶ D.reserve (wait while D is full)
      ─▶ P.prefill (KV pushed to D over torch.distributed; returns token 1) ─▶ stream token 1
      ─▶ D.start ─▶ stream D's batched updates ─▶ last message (usage, timings, instances)

A prefill or decode worker that dies, or a transfer that fails, sends the request back to
placement with the tokens produced so far appended to its prompt (re-prefill), at most
`max_attempts` times. A cancelled stream aborts the request on both workers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from engine.chat_template import ChatTemplate
from engine.sampling_params import SamplingParams
from engine.text_stream import TextStream
from engine.tokenizer import IncrementalDetokenizer, Tokenizer
from router.metrics import RouterMetrics, WorkerMetricsCollector
from router.placement import (
    GoodputPlacement,
    NoWorkerAvailable,
    Overloaded,
    Placement,
    PlacementInfo,
)
from router.tiers import TierChoice, TierSelector
from router.workers import Worker, WorkerDied

log = logging.getLogger(__name__)

_RESERVE_RETRY_S = (0.002, 0.05)  # backoff bounds while the decode worker has no free blocks


class RequestError(Exception):
    """A request the router refuses or cannot finish; `code` is a grpc.StatusCode name."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


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
    queue_ms: float = 0.0
    prefill_ms: float = 0.0
    ttft_ms: float | None = None
    ttft_slo_ms: float = 0.0
    tpot_slo_ms: float = 0.0
    tier_choice: TierChoice | None = None


class Router:
    def __init__(
        self,
        tiers: dict[str, TierInfo],
        default_tier: str,
        workers: list[Worker],
        max_attempts: int = 3,
        placement: Placement | None = None,
    ):
        self.tiers = tiers
        self.default_tier = default_tier
        self.workers = workers
        self.max_attempts = max_attempts
        self.placement = placement or GoodputPlacement()
        # Set by the launcher when the config prices its tiers (needs goodput placement).
        self.tier_selector: TierSelector | None = None
        self._connected: set[tuple[str, str]] = set()
        self._streams: dict[str, asyncio.Queue] = {}  # worker-level request id -> updates
        self._transfer_ids = itertools.count(1)
        self._pollers: list[asyncio.Task] = []
        self.metrics = RouterMetrics()
        self.worker_metrics = WorkerMetricsCollector()
        self.metrics.registry.register(self.worker_metrics)
        self.metrics_refresh_s = 1.0

    async def start(self) -> None:
        for worker in self.workers:
            if worker.role == "decode":
                self._pollers.append(asyncio.create_task(self._poll_decode(worker)))
        self._pollers.append(asyncio.create_task(self._refresh_worker_metrics()))

    async def _refresh_worker_metrics(self) -> None:
        """Keep a recent copy of every worker's metrics for the router's /metrics."""
        while True:
            for worker in self.workers:
                text = None
                if worker.alive:
                    try:
                        text = (await worker.client.call("metrics_text")).decode()
                        samples = await worker.client.call("step_samples")
                        self.placement.observe_samples(worker, samples)
                        self.placement.observe_stats(worker, await worker.client.call("stats"))
                    except WorkerDied:
                        worker.alive = False
                    except Exception as e:
                        log.debug("metrics of %s: %s", worker.worker_id, e)
                        continue
                self.worker_metrics.update(worker.worker_id, text)
            await asyncio.sleep(self.metrics_refresh_s)

    async def stop(self) -> None:
        for task in self._pollers:
            task.cancel()

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
            if prompt and tier.tokenizer is None:
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
                "NOT_FOUND", f"unknown model {model!r}; served: {sorted(self.tiers)}"
            )
        if prompt:
            if tier.tokenizer is None:
                raise RequestError(
                    "INVALID_ARGUMENT",
                    f"model {tier.name!r} has no tokenizer; send prompt_token_ids",
                )
            token_ids = tier.tokenizer.encode(prompt)
        else:
            token_ids = list(prompt_token_ids)
        if not token_ids:
            raise RequestError("INVALID_ARGUMENT", "prompt is empty")
        if any(t >= tier.vocab_size for t in token_ids):
            raise RequestError(
                "INVALID_ARGUMENT", f"prompt token ids must be below {tier.vocab_size}"
            )
        if max_tokens is None:
            max_tokens = tier.default_max_tokens
        if not 1 <= max_tokens <= tier.max_tokens_limit:
            raise RequestError(
                "INVALID_ARGUMENT",
                f"max_tokens must be in [1, {tier.max_tokens_limit}], got {max_tokens}",
            )
        if len(token_ids) + 1 > tier.max_model_len:
            raise RequestError(
                "INVALID_ARGUMENT",
                f"prompt has {len(token_ids)} tokens; the context of {tier.name!r} is "
                f"{tier.max_model_len}",
            )
        try:
            params = dataclasses.replace(params or SamplingParams(), max_tokens=max_tokens)
        except ValueError as e:
            raise RequestError("INVALID_ARGUMENT", str(e)) from None
        if params.stop and tier.tokenizer is None:
            raise RequestError("INVALID_ARGUMENT", "stop strings need a tokenizer")
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
            if req.attempts > 1:
                self.metrics.retries.labels(tier).inc(req.attempts - 1)
            if outcome:
                self.metrics.requests.labels(tier, outcome).inc()

    async def _generate(self, req: _Request) -> AsyncIterator[Chunk]:
        failed_workers: set[str] = set()
        last_error = ""
        while req.attempts < self.max_attempts:
            req.attempts += 1
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
            try:
                prefill, decode = self.placement.choose(self.workers, info, failed_workers)
            except NoWorkerAvailable as e:
                raise RequestError("UNAVAILABLE", str(e)) from None
            except Overloaded as e:
                raise RequestError("RESOURCE_EXHAUSTED", f"{e}; retry later") from None
            wid = f"{req.request_id}.{req.attempts}"
            try:
                async for chunk in self._attempt(req, wid, prefill, decode, info):
                    yield chunk
                    if chunk.finish_reason is not None:
                        return
                return
            except (WorkerDied, _AttemptFailed) as e:
                last_error = str(e)
                log.warning("request %s attempt %d failed: %s", req.request_id, req.attempts, e)
                failed_workers.update(w.worker_id for w in (prefill, decode) if not w.alive)
                if isinstance(e, _AttemptFailed) and e.worker is not None:
                    failed_workers.add(e.worker)
        raise RequestError(
            "UNAVAILABLE", f"request failed after {req.attempts} attempts: {last_error}"
        )

    async def _attempt(
        self, req: _Request, wid: str, prefill: Worker, decode: Worker, info: PlacementInfo
    ) -> AsyncIterator[Chunk]:
        prompt = info.prompt_token_ids
        params = dataclasses.replace(req.params, max_tokens=info.max_tokens)
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
            try:
                result = await prefill.client.call(
                    "prefill", wid, transfer_id, prompt, params, decode.worker_id
                )
            except WorkerDied:
                prefill.alive = False
                raise
            prefill.requests.discard(wid)  # done there: nothing to abort on the prefill side
            req.prefill_ms += (time.perf_counter() - start) * 1e3
            self.placement.on_prefill_done(prefill, info, wid, time.perf_counter() - start)
            if result.transfer != "done":
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
                await decode.client.call("start", wid, result.first_token, result.first_logprobs)
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
                    raise _AttemptFailed(update.error, None)
                decode_finished = update.finish_reason is not None
                self.placement.on_tokens(decode, wid, len(update.new_token_ids))
                chunk = self._advance(
                    req,
                    update.new_token_ids,
                    update.logprobs,
                    update.finish_reason,
                    update.stop_reason,
                )
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
        while True:
            try:
                ok = await decode.client.call(
                    "reserve", wid, transfer_id, prefill.worker_id, prompt, params
                )
            except WorkerDied:
                decode.alive = False
                raise
            if ok:
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RESERVE_RETRY_S[1])
        req.queue_ms += (time.perf_counter() - start) * 1e3

    async def _connect(self, prefill: Worker, decode: Worker) -> None:
        """Build the pair's communicator once, both sides at the same time."""
        pair = (prefill.worker_id, decode.worker_id)
        if pair in self._connected:
            return
        results = await asyncio.gather(
            prefill.client.call("connect", decode.worker_id),
            decode.client.call("connect", prefill.worker_id),
            return_exceptions=True,
        )
        for worker, result in zip((prefill, decode), results):
            if isinstance(result, WorkerDied):
                worker.alive = False
            if isinstance(result, BaseException):
                raise _AttemptFailed(f"connecting {pair}: {result}", worker.worker_id)
        self._connected.add(pair)

    async def _abort(self, wid: str, prefill: Worker | None, decode: Worker) -> None:
        for worker in (prefill, decode):
            if worker is not None and worker.alive:
                try:
                    await worker.client.call("abort", wid)
                except Exception as e:  # best effort: a dead worker frees nothing anyway
                    log.debug("abort %s on %s: %s", wid, worker.worker_id, e)

    async def _poll_decode(self, worker: Worker) -> None:
        """One long poll at a time per decode worker: every step's batched update."""
        while worker.alive:
            try:
                batches = await worker.client.call("poll_updates", 0.5)
            except WorkerDied:
                worker.alive = False
                break
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("polling %s", worker.worker_id)
                await asyncio.sleep(0.1)
                continue
            for batch in batches:
                for update in batch:
                    queue = self._streams.get(update.request_id)
                    if queue is not None:
                        queue.put_nowait(update)
        # The worker is gone: everything it held fails over.
        self._connected = {p for p in self._connected if worker.worker_id not in p}
        for wid in list(worker.requests):
            queue = self._streams.get(wid)
            if queue is not None:
                queue.put_nowait(_Failure(f"decode worker {worker.worker_id} died"))

    async def stats(self) -> list[dict]:
        out = []
        for worker in self.workers:
            if not worker.alive:
                out.append({"worker_id": worker.worker_id, "role": worker.role, "alive": False})
                continue
            try:
                out.append({**(await worker.client.call("stats")), "alive": True})
            except WorkerDied:
                worker.alive = False
                out.append({"worker_id": worker.worker_id, "role": worker.role, "alive": False})
        return out


class _AttemptFailed(Exception):
    def __init__(self, message: str, worker: str | None):
        super().__init__(message)
        self.worker = worker
