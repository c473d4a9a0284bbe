"""Continuous batching with chunked prefill and preemption by recompute.

Every step the scheduler hands out a token budget (`max_num_batched_tokens`):

1. running requests, decodes first, then prefills in progress; each gets the tokens it still
   needs, cut to the budget left (that cut is chunked prefill). When the pool runs out of blocks,
   the most recently arrived running request is preempted: its blocks are freed, its progress
   reset, and it goes back to the front of the waiting queue (it will recompute its prompt and
   the tokens it already produced, mostly from the prefix cache).
2. waiting requests, strictly first come first served, while the budget, `max_num_seqs` and
   the free blocks allow. A request that does not fit stops admission: nobody overtakes it, so
   nobody starves.

Any token of a request is one unit of budget: a decode costs 1, a prefill chunk its length.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from engine.kv_cache import KVCacheManager
from engine.request import Request, RequestStatus


@dataclass
class ScheduledRequest:
    request: Request
    num_tokens: int  # tokens to compute this step, from request.num_computed_tokens on
    block_ids: list[int]
    # Draft tokens verified this step, counted in `num_tokens` (after the request's last token).
    spec_token_ids: list[int] = field(default_factory=list)
    # Async scheduling (`Scheduler.schedule_ahead`): the step before this one is still running
    # and its token for this request, not yet on the host, is this step's input: the row of
    # that step's sampled tokens holding it. The position is one past `num_computed_tokens`.
    prev_row: int | None = None

    @property
    def seq_len(self) -> int:
        """The context length after this step: cached tokens plus this step's."""
        return self.request.num_computed_tokens + (self.prev_row is not None) + self.num_tokens

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the request's last known token, so logits get sampled."""
        if self.prev_row is not None:
            return True
        num_real = self.num_tokens - len(self.spec_token_ids)
        return self.request.num_computed_tokens + num_real == self.request.num_tokens


@dataclass
class SchedulerOutput:
    # Decodes first, then prefill chunks; the runner lays tokens out in this order.
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(
        self,
        kv_manager: KVCacheManager,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        max_model_len: int,
        eos_token_ids: tuple[int, ...] = (),
    ):
        self.kv = kv_manager
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in arrival order
        self.requests: dict[str, Request] = {}
        # Decode role: requests holding blocks that another worker is filling with prompt KV.
        self.reserved: dict[str, Request] = {}
        self.num_preemptions = 0

    def add_request(self, request: Request) -> None:
        assert request.request_id not in self.requests, "duplicate request id"
        self.requests[request.request_id] = request
        self.waiting.append(request)

    @property
    def max_len(self) -> float:
        """How long a request may grow: max_model_len, or without limit with attention sinks
        (StreamingLLM counts positions within the cache, so the model never sees a larger one)."""
        return math.inf if self.kv.window.num_sink_tokens else self.max_model_len

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def has_schedulable(self) -> bool:
        """Work a step can do now (reserved requests wait for their KV instead)."""
        return bool(self.running or self.waiting)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        decodes_first = sorted(self.running, key=lambda r: r.num_tokens - r.num_computed_tokens > 1)
        for request in decodes_first:
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_tokens = min(request.num_tokens - request.num_computed_tokens, budget)
            spec = []
            if request.spec_token_ids:
                if num_tokens == 1:
                    spec = self._trim_drafts(request, budget)
                request.spec_token_ids = []
            if spec and not self.kv.allocate(request, 1 + len(spec)):
                spec = []  # verify nothing rather than preempt anyone for drafts
            num_tokens += len(spec)
            while not self.kv.allocate(request, num_tokens):
                victim = max(self.running, key=lambda r: r.arrival_time)
                budget += self._preempt(victim, out)
                if victim is request:
                    break
            else:
                block_ids = self.kv.block_ids(request.request_id)
                out.scheduled.append(ScheduledRequest(request, num_tokens, block_ids, spec))
                budget -= num_tokens

        # Admitting while others were just preempted would only thrash the pool.
        while self.waiting and budget > 0 and not out.preempted:
            if len(self.running) >= self.max_num_seqs:
                break
            request = self.waiting[0]
            cached = self.kv.find_cached_prefix(request)
            num_cached_tokens = len(cached) * self.kv.block_size
            num_tokens = min(request.num_tokens - num_cached_tokens, budget)
            if not self.kv.allocate(request, num_tokens, cached):
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_cached_tokens
            request.num_cached_tokens = num_cached_tokens
            self.running.append(request)
            out.scheduled.append(
                ScheduledRequest(request, num_tokens, self.kv.block_ids(request.request_id))
            )
            budget -= num_tokens
        return out

    def schedule_ahead(self, prev: SchedulerOutput) -> SchedulerOutput | None:
        """Async scheduling: the step after `prev`, a pure-decode step whose tokens are not
        known yet (still on the device), so that it can be launched before they are read.
        Every request of `prev` decodes once more, at the position after its token in flight,
        in the same order (`prev_row` = its row in `prev`).

        Returns None when the next step needs those tokens first: requests to admit, a running
        request that `prev` did not decode, one that `prev`'s token may end by length (it
        would not run again), or blocks that only a preemption would free. A request that
        `prev`'s token ends otherwise (a stop token or string) wastes its slot in this step:
        it is freed, blocks and all, when `prev` is processed, and `update` drops its token."""
        if self.waiting or len(prev.scheduled) != len(self.running):
            return None
        out = SchedulerOutput()
        for row, s in enumerate(prev.scheduled):
            request = s.request
            if request.status is not RequestStatus.RUNNING or s.num_tokens != 1 or not s.samples:
                return None
            # After prev: one more token and one more output; this step would add another.
            if request.num_output_tokens + 1 >= request.sampling_params.max_tokens:
                return None
            if request.num_tokens + 1 >= self.max_len:
                return None
            # NOTE: on a None below, blocks already taken for earlier rows stay with their
            # requests: the blocks those requests' next tokens need anyway.
            if not self.kv.allocate(request, 2):  # prev's token in flight, and this step's
                return None
            block_ids = self.kv.block_ids(request.request_id)
            out.scheduled.append(ScheduledRequest(request, 1, block_ids, prev_row=row))
        return out

    # -- decode role: prompt KV computed elsewhere ------------------------------------------

    def reserve(self, request: Request) -> list[int] | None:
        """Hold blocks for the request's prompt KV, which a prefill worker will write.

        Returns the block ids, or None if `max_num_seqs` or the free blocks cannot take it now
        (the caller retries later). Requests waiting to recompute locally go first."""
        if self.waiting or len(self.running) + len(self.reserved) >= self.max_num_seqs:
            return None
        assert request.request_id not in self.requests, "duplicate request id"
        # Leave every running request room for its next block, so reservations never starve
        # the batch already decoding (which would then preempt itself into a stall).
        n = request.num_prompt_tokens
        # With a window only the blocks the next token can see are reserved, and sent.
        needed = self.kv.window.num_live_blocks(n, n)
        if self.kv.num_free_blocks - needed < len(self.running):
            return None
        if not self.kv.allocate_computed(request, n):
            return None
        self.requests[request.request_id] = request
        self.reserved[request.request_id] = request
        return self.kv.held_block_ids(request.request_id)

    def admit_prefilled(self, request_id: str, first_token: int) -> Request:
        """The reserved request's prompt KV has arrived, with the token sampled after it: it
        joins the running batch (or finishes at once if that token ends it)."""
        request = self.reserved.pop(request_id)
        request.num_computed_tokens = request.num_prompt_tokens
        self.kv.cache_computed_blocks(request)
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        request.append_output_token(first_token)
        reason = self._check_stop(request, first_token)
        if reason is not None:
            self.finish(request_id, reason)
        return request

    def _trim_drafts(self, request: Request, budget: int) -> list[int]:
        """The request's drafts cut so that verifying them fits the budget and, even if all are
        accepted (plus the bonus token), never passes max_tokens or max_model_len."""
        room = min(
            budget - 1,
            request.sampling_params.max_tokens - request.num_output_tokens - 1,
            self.max_len - request.num_tokens - 1,
        )
        return request.spec_token_ids[: max(room, 0)]

    def _preempt(self, victim: Request, out: SchedulerOutput) -> int:
        """Preempt by recompute; returns the budget the victim had taken this step, if any."""
        self.kv.free(victim)
        self.running.remove(victim)
        victim.status = RequestStatus.PREEMPTED
        victim.num_computed_tokens = 0
        victim.num_preemptions += 1
        self.num_preemptions += 1
        # Victims are taken latest-arrival first, so pushing each to the front keeps the waiting
        # queue in arrival order.
        self.waiting.appendleft(victim)
        out.preempted.append(victim)
        for i, s in enumerate(out.scheduled):
            if s.request is victim:
                del out.scheduled[i]
                return s.num_tokens
        return 0

    def update(self, out: SchedulerOutput, sampled: dict[str, list[int]]) -> list[Request]:
        """Advance progress after the step ran, append sampled tokens, finish what must stop.

        `sampled` maps request id to the tokens sampled for it this step: one, or with drafts
        the accepted ones and the target's next. Returns the requests that finished (their
        blocks are already back in the pool)."""
        finished = []
        for s in out.scheduled:
            request = s.request
            if request.status is not RequestStatus.RUNNING:
                continue  # finished while this step ran ahead (async scheduling): token dropped
            tokens = sampled.get(request.request_id, [])
            reason = None
            num_appended = 0
            for token in tokens:
                request.append_output_token(token)
                num_appended += 1
                reason = self._check_stop(request, token)
                if reason is not None:
                    break  # drafts accepted past a stop token are dropped
            if s.spec_token_ids:
                # NOTE: KV was written for all drafts; only the accepted ones' is valid. Rejected
                # slots lie past num_computed_tokens and are overwritten by later steps.
                request.num_computed_tokens += num_appended
            else:
                request.num_computed_tokens += s.num_tokens
            self.kv.cache_computed_blocks(request)
            self.kv.release_out_of_window(request)
            if reason is not None:
                self.finish(request.request_id, reason)
                finished.append(request)
        return finished

    def _check_stop(self, request: Request, token: int) -> RequestStatus | None:
        params = request.sampling_params
        if not params.ignore_eos and token in self.eos_token_ids:
            request.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
        if token in params.stop_token_ids:
            request.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
        if request.grammar is not None and request.grammar.is_terminated:
            return RequestStatus.FINISHED_STOPPED  # the structured output is complete
        if request.num_output_tokens >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if request.num_tokens >= self.max_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def finish(self, request_id: str, status: RequestStatus) -> Request | None:
        """End a request now (stop condition, stop string, abort): its blocks go back at once."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        request.status = status
        if request in self.running:
            self.running.remove(request)
        elif self.reserved.pop(request_id, None) is None:
            self.waiting.remove(request)
        self.kv.free(request)
        return request
