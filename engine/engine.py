"""The step loop: schedule → run the model → update requests → detokenize and check stop strings.

`LLMEngine` is what a worker process drives; `engine.LLM` wraps it for offline batch use.
Inputs are validated in `add_request`, before any model work, with errors that say what is wrong.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch

from engine.config import EngineConfig, ModelConfig, parse_dtype
from engine.draft_model import DraftProposer
from engine.grammar import Grammar, GrammarCompiler
from engine.kv_cache import KVCacheManager, KVWindow
from engine.model_runner import ModelRunner, PendingStep, RunnerOutput
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledRequest, Scheduler, SchedulerOutput
from engine.speculative import (
    AcceptanceMeter,
    HitMeter,
    NgramProposer,
    StepCostMeter,
    choose_num_drafts,
    relative_step_cost,
    speed_up,
)
from engine.text_stream import TextStream
from engine.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger(__name__)

# Dynamic speculation with a draft model (n-gram lookup learns from shadow lookups instead,
# below): with acceptance too low for any drafts, probe with one every this many
# steps, so that the measured acceptance can recover; each probe that does not bring
# speculation back doubles the interval, up to _MAX_PROBE_STEPS (a probe step costs more than a
# plain one: on a GPU it runs outside the decode CUDA graphs).
_PROBE_STEPS = 16
_MAX_PROBE_STEPS = 1024
# While the acceptance rests on fewer than _LEARN_OUTCOMES drafts measured, and in probes, a
# step starts speculating for at most _MAX_NEW_PER_STEP requests new to it: a first proposal
# indexes the whole sequence (n-gram) or prefills it in the draft model, which for 64 requests
# of 384 tokens at once took 20-40 ms of host time, several plain steps on an H100.
_LEARN_OUTCOMES = 16
_MAX_NEW_PER_STEP = 8
# Dynamic n-gram speculation learns in the shadow of plain steps instead (no probes, no learning
# verify steps): while a step runs on the device, up to _SHADOW_PER_STEP requests whose gates
# are open are looked up, and their drafts are kept, not verified. Once the request has decoded
# the tokens the drafts predicted, they are scored as verification would have scored them: the
# matched prefix is what the rule accepts (greedy: exactly; sampling: a point-mass draft d is
# accepted with probability p(d), the chance that the token sampled there is d, and after an
# acceptance both go on from the same prefix). The hit rate, the acceptance and each request's
# gate are then measured without a verify step, and a step that does not speculate never waits
# for its predecessor's tokens to propose (async scheduling keeps chaining). Speculation starts
# once _SHADOW_LEARN_OUTCOMES drafts were scored.
#
# Lookups are host work (and so is finding whom to look up: _SHADOW_CANDIDATES requests are
# considered a step), and a decode step of a small model at a large batch is host-bound (an
# H100 or H200 at batch 64 waits on the host), so they are paid from a time budget:
# _SHADOW_SHARE of the wall time, up to _SHADOW_MAX_CREDIT saved. Where drafts fail, learning
# that costs at most that share. (Crediting the time the host waited for the device's tokens
# as free was tried: on an H200 at batch 64 steps with lookups still ran ~0.2 ms, 8%, longer.)
_SHADOW_PER_STEP = 4
_SHADOW_CANDIDATES = 16
_SHADOW_LEARN_OUTCOMES = 8
_SHADOW_SHARE = 0.01
_SHADOW_MAX_CREDIT = 0.002
# The share is scaled by the measured share of lookups that find drafts (`HitMeter`), down to
# _SHADOW_MIN_SCALE of it: where drafts fail, learning that they still fail costs 1/8 of the
# budget. (At batch 64 on an H200, where no draft was ever found, dynamic speculation measured
# 0.98x plain decoding with the full 1% spent; 2026-11-27.) One hit raises the rate again.
_SHADOW_MIN_SCALE = 0.125
# Async scheduling: a step launched ahead must be plain, so a rule that might speculate in the
# next step breaks the chain of launches (~1 ms of a ~1.5 ms step at batch 64 on an H200). Near
# the rule's break-even its choice flips with each measurement; it breaks the chain only when
# speculation beats plain decoding by _AHEAD_MIN_GAIN (the step itself still chooses by
# `speculative._MIN_GAIN`).
_AHEAD_MIN_GAIN = 1.2


# What a request's outputs hold (`LLMEngine.add_request(..., output_kind=...)`):
#   "cumulative"  token_ids, text and logprobs hold everything generated so far
#   "delta"       only what is new in this output (as new_token_ids and new_text)
#   "final"       no output before the last, which is cumulative
# NOTE: a cumulative output copies the whole output so far, every step: at 2000 tokens that
# was ~12 us a request on the dev CPU, 3 ms a step at batch 256 (6 ms with logprobs). A decode
# worker streams deltas, and `LLM.generate` reads final outputs only.
OUTPUT_KINDS = ("cumulative", "delta", "final")


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]  # all generated tokens so far (with output_kind "delta": the new ones)
    text: str  # all generated text so far (stop string excluded unless asked for; "delta": new)
    new_token_ids: list[int]  # generated since the previous output for this request
    new_text: str
    finished: bool
    finish_reason: str | None = None  # "stop", "length" or "abort"
    stop_reason: int | str | None = None  # the stop token or string that ended it
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache


@dataclass
class StepStats:
    """What the last step did, for metrics. A one-token chunk counts as a decode."""

    duration_s: float = 0.0
    num_decode_tokens: int = 0
    num_prefill_tokens: int = 0
    num_seqs: int = 0
    num_preempted: int = 0
    # Latency-model features: context tokens the step attends over, and the sum over sequences
    # of (new tokens x context length), attention's quadratic term.
    num_context_tokens: int = 0
    attention_pairs: int = 0
    # Speculative decoding: draft tokens verified this step, and how many the target accepted.
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.model_config = ModelConfig.from_pretrained(config.model)
        dtype_name = self.model_config.torch_dtype if config.dtype == "auto" else config.dtype
        self.dtype = parse_dtype(dtype_name)
        self.tokenizer = Tokenizer.from_pretrained(config.model)
        self.max_model_len = config.max_model_len or self.model_config.max_position_embeddings
        if self.max_model_len > self.model_config.max_position_embeddings:
            raise ValueError(
                f"max_model_len {self.max_model_len} exceeds the model's "
                f"max_position_embeddings {self.model_config.max_position_embeddings}"
            )
        torch.manual_seed(config.seed)
        self.speculative = config.speculative
        # A draft model loads before the target sizes its KV cache from the memory left, and
        # takes its share of that budget for its own cache (engine/draft_model.py).
        self.drafter = None
        if self.speculative and self.speculative.method == "draft":
            self.drafter = DraftProposer(config, self.model_config, self.dtype)
        self.runner = ModelRunner(
            config,
            self.model_config,
            self.dtype,
            self.drafter.kv_bytes_per_token if self.drafter else 0,
        )
        # Sliding windows and attention sinks bound a request's KV: blocks no query can read
        # again go back to the pool (kv_cache/window.py).
        window = (
            KVWindow(config.block_size, config.sink_window, config.attention_sinks)
            if config.attention_sinks
            else KVWindow(config.block_size, self.model_config.kv_window)
        )
        self.kv_manager = KVCacheManager(
            self.runner.num_blocks, config.block_size, config.enable_prefix_caching, window
        )
        # Stop on config.json's EOS and on generation_config.json's (Llama 3 lists several there).
        eos = tuple(
            dict.fromkeys(
                self.model_config.eos_token_ids
                + (tuple(self.tokenizer.eos_token_ids) if self.tokenizer else ())
            )
        )
        self.scheduler = Scheduler(
            self.kv_manager,
            config.max_num_batched_tokens,
            config.max_num_seqs,
            self.max_model_len,
            eos,
        )
        self._text: dict[str, TextStream] = {}
        self.grammar_compiler: GrammarCompiler | None = None  # on the first constrained request
        self.last_step = StepStats()
        self.proposer = self.drafter
        if self.drafter is not None:
            num_blocks = self.speculative.draft_num_blocks
            self.drafter.allocate_cache(
                num_blocks or self.runner.num_blocks + config.max_num_seqs, self.runner.sampler
            )
        elif self.speculative:
            self.proposer = NgramProposer(self.speculative)
        # Dynamic n-gram speculation learns from shadow lookups (_SHADOW_PER_STEP).
        self._shadow_learning = bool(
            self.speculative and self.drafter is None and self.speculative.adaptive
        )
        # Async scheduling: the step launched ahead and not yet processed, with its schedule.
        self._in_flight: tuple[SchedulerOutput, PendingStep] | None = None
        self.reset_speculation()

    def reset_speculation(self) -> None:
        """Forget what dynamic speculation measured (acceptance, step costs, probes) and the
        draft totals, as in a new engine. Benchmarks call it after a warm-up, so that a timed
        run pays the rule's learning phase as a fresh server would."""
        # Shadow lookups measure before any verify step, so their meter starts from a
        # pessimistic prior (a wrong guess costs verify steps, not lost drafts).
        self.acceptance = AcceptanceMeter(prior=0.0 if self._shadow_learning else 0.7)
        self.hits = HitMeter()
        self.step_cost = StepCostMeter()
        self._num_steps = 0
        self._probe_every = _PROBE_STEPS
        self._probing = False  # the step just chosen is a probe
        # The last step's proposal, for the cost meter: (batch size, modeled relative cost,
        # whether some request had its first proposal, seconds of n-gram learning lookups);
        # None: no proposer work (a plain step).
        self._last_choice: tuple[int, float, bool, float] | None = None
        self._cycle_start = 0.0  # when the last step began proposing (the cost meter's clock)
        # Shadow lookups awaiting their tokens: request id -> (request, its length at the
        # lookup, the drafts); and where the next step's lookups start in the running list.
        self._shadows: dict[str, tuple[Request, int, list[int]]] = {}
        self._shadow_cursor = 0
        # The lookups' time budget (_SHADOW_SHARE): seconds left, and when it was last topped up.
        self._shadow_credit = 0.0
        self._shadow_clock = time.perf_counter()
        # Totals since start: draft tokens verified and accepted (acceptance = accepted / draft).
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0

    # -- requests -------------------------------------------------------------------------

    def make_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        output_kind: str = "cumulative",
        detokenize: bool = True,
    ) -> tuple[Request, TextStream]:
        """Validate and tokenize one prompt; changes nothing in the engine. `output_kind`: see
        OUTPUT_KINDS. `detokenize` False: outputs carry token ids and no text (a decode worker,
        whose router detokenizes and checks stop strings: two decodes a token saved)."""
        if output_kind not in OUTPUT_KINDS:
            raise ValueError(f"output_kind must be one of {OUTPUT_KINDS}, got {output_kind!r}")
        if params.stop and not detokenize:
            raise ValueError("stop strings need the output detokenized")
        if request_id in self.scheduler.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text_prompt = prompt if isinstance(prompt, str) else None
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer; pass the prompt as token ids")
            token_ids = self.tokenizer.encode(prompt)
        else:
            token_ids = list(prompt)
        if not token_ids:
            raise ValueError("prompt is empty")
        vocab = self.model_config.vocab_size
        bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids must be integers in [0, {vocab}); got {bad[:5]}")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(token_ids)} tokens, longer than the context allows "
                f"(max_model_len {self.max_model_len}, and one token must be generated)"
            )
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this model has none")
        max_len = min(len(token_ids) + params.max_tokens, self.scheduler.max_len)
        peak = self.kv_manager.window.peak_blocks(max_len, self.config.max_num_batched_tokens)
        if peak > self.kv_manager.num_blocks:
            raise ValueError(
                f"request needs up to {peak} KV blocks but the pool has only "
                f"{self.kv_manager.num_blocks}"
            )
        request = Request(request_id, token_ids, params)
        if params.has_penalties or params.logprobs is not None:
            # Never speculated: verification would need per-position penalties and logprobs.
            request.spec_gate.resume_at = math.inf
        if params.grammar is not None:
            request.grammar = self._grammar_for(params, token_ids)
        detok = (
            IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens)
            if self.tokenizer and detokenize
            else None
        )
        state = TextStream(text_prompt, detok, params.stop, params.include_stop_str_in_output)
        state.output_kind = output_kind
        return request, state

    def _grammar_for(self, params: SamplingParams, token_ids: list[int]) -> Grammar:
        """The request's structured output matcher (engine/structured_output.py)."""
        if self.tokenizer is None:
            raise ValueError("structured output needs a tokenizer; this model has none")
        n = params.num_structured_prompt_tokens
        if n >= len(token_ids):
            raise ValueError("num_structured_prompt_tokens must be less than the prompt's length")
        if self.grammar_compiler is None:
            self.grammar_compiler = GrammarCompiler(
                self.tokenizer.to_json(),
                self.model_config.vocab_size,
                sorted(self.scheduler.eos_token_ids),
            )
        return self.grammar_compiler.grammar(params.grammar, token_ids[len(token_ids) - n :])

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        output_kind: str = "cumulative",
    ) -> None:
        request, state = self.make_request(request_id, prompt, params, output_kind)
        self.enqueue(request, state)

    def enqueue(self, request: Request, state: TextStream) -> None:
        self.scheduler.add_request(request)
        self._text[request.request_id] = state

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """End a request at once; its blocks go back to the pool. Unknown ids are ignored."""
        request = self.scheduler.finish(request_id, RequestStatus.FINISHED_ABORTED)
        if request is None:
            return None
        self._retain_proposals()
        return self._output(request, finished=True)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def has_schedulable_requests(self) -> bool:
        return self.scheduler.has_schedulable()

    # -- decode role: the prompt's KV and first token come from a prefill worker -------------

    def reserve(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        output_kind: str = "cumulative",
        detokenize: bool = True,
    ) -> list[int] | None:
        """Validate the request and hold blocks for its prompt KV; None if none are free now."""
        request, state = self.make_request(
            request_id, prompt_token_ids, params, output_kind, detokenize
        )
        # NOTE: a KV receive writes the blocks from its own stream; a step in flight may still
        # write blocks freed meanwhile (a finished request's wasted slot).
        self.wait_in_flight()
        block_ids = self.scheduler.reserve(request)
        if block_ids is not None:
            self._text[request_id] = state
        return block_ids

    def release(self, request_id: str) -> None:
        """Give back a reservation whose KV will not come (failed or cancelled transfer)."""
        self.scheduler.finish(request_id, RequestStatus.FINISHED_ABORTED)
        self._text.pop(request_id, None)

    def admit_prefilled(
        self, request_id: str, first_token: int, first_logprobs=None
    ) -> RequestOutput | None:
        """The prompt KV is in the reserved blocks: decode from `first_token` on. Returns the
        final output if that token already ends the request, else None."""
        request = self.scheduler.admit_prefilled(request_id, first_token)
        if first_logprobs is not None:
            request.logprobs.append(first_logprobs)
        # The prefill worker drew once from this request's seeded stream; draw the same here so
        # the samples continue exactly as on a single engine.
        self.runner.sampler.skip_draw(request, self.model_config.vocab_size)
        state = self._text[request_id]
        state.append([first_token])
        state.take_delta(finished=False)  # the prefill side already streamed token 1
        state.num_emitted_tokens = 1
        if request.is_finished:
            return self._output(request, finished=True)
        return None

    # -- the step -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one engine step; returns an output for each request that made progress.

        With `async_scheduling`, a greedy pure-decode step is followed at once by the next
        (launched before its tokens are read, `Scheduler.schedule_ahead`), which stays in
        flight when this returns: the next call processes it. Outputs come one step at a time
        either way, in order."""
        step_start = time.perf_counter()
        if self._in_flight is not None:
            sched, pending = self._in_flight
            self._in_flight = None
            # A step launched ahead is a plain one (see _launch_ahead): for the cost meter its
            # cycle is its period, from the processing of the step before it.
            self._last_choice = None
            self._cycle_start = step_start
        else:
            self._last_choice = None
            self._cycle_start = step_start  # what the step cost meter times: proposing included
            self._propose()
            sched = self.scheduler.schedule()
            if sched.is_empty:
                self.last_step = StepStats()
                # NOTE: on a decode worker, reservations (blocks awaiting KV from a prefill
                # worker) can hold the blocks a preempted request needs; they turn into running
                # requests or expire, so waiting is right. Without any, no progress is a bug.
                if self.scheduler.has_schedulable() and not self.scheduler.reserved:
                    raise RuntimeError("scheduler made no progress with requests pending")
                return []
            step_start = time.perf_counter()  # the step's duration: from its launch
            if not self.config.async_scheduling and not self._shadow_learning:
                # (tests wrap `execute` to see the logits)
                return self._complete(sched, self.runner.execute(sched), step_start)
            pending = self.runner.launch(sched)
        if self.config.async_scheduling:
            self._in_flight = self._launch_ahead(sched, pending)
        if self._shadow_learning and not any(s.spec_token_ids for s in sched.scheduled):
            self._shadow_lookups()  # while the step runs on the device
        return self._complete(sched, pending, step_start)

    def _launch_ahead(self, sched: SchedulerOutput, pending: PendingStep):
        """Async scheduling: launch the step after `sched` while its tokens are still on the
        device, when nothing needs them first. Returns (its schedule, its pending step)."""
        if pending.tokens is None or self.runner.kv_connector:
            return None  # not the greedy fast path, or KV sends need the tokens
        if self.proposer is not None and any(s.spec_token_ids for s in sched.scheduled):
            return None  # how many tokens each request gains is known only once verified
        plan = None
        if self.proposer is not None:
            plan = self._plan_plain_ahead()
            if plan is None:
                return None  # the next step may propose: proposals need the tokens
        ahead = self.scheduler.schedule_ahead(sched)
        if ahead is None:
            return None
        if plan:
            self._num_steps, self._probe_every, self._probing = plan  # as _propose would
        return ahead, self.runner.launch(ahead, prev=pending)

    def _plan_plain_ahead(self) -> tuple[int, int, bool] | tuple[()] | None:
        """Speculation with async scheduling: whether the step after the one being launched
        would be a plain step (dynamic speculation choosing k = 0 for it), so that it may be
        launched before the current step's tokens are read. None: it may propose. Otherwise the
        rule's state after choosing k = 0 for it (what `_step_num_drafts` would set), or () if
        `_propose` would not even count it (more requests than `max_batch_size`)."""
        spec = self.speculative
        running = self.scheduler.running
        if len(running) > spec.max_batch_size:
            return ()
        if not spec.adaptive:
            return None
        # As if every request's gate were open first: where drafts fail, k is 0 already.
        k, state = self._plan_num_drafts(len(running), min_gain=_AHEAD_MIN_GAIN)
        if k == 0:
            return state
        # After the current step each request holds one more token.
        num_open = sum(r.spec_gate.is_open(r.num_tokens + 1) for r in running)
        k, state = self._plan_num_drafts(len(running), num_open, _AHEAD_MIN_GAIN)
        return state if k == 0 else None

    def _complete(
        self, sched: SchedulerOutput, pending: PendingStep | RunnerOutput, step_start: float
    ) -> list[RequestOutput]:
        """Read a launched step's tokens (unless given them) and process them: stats, the
        scheduler's update, stop strings, outputs. Requests that finished while the step ran
        ahead are skipped."""
        scheduled = [s for s in sched.scheduled if not s.request.is_finished]
        context = [s.seq_len for s in scheduled]
        result = pending if isinstance(pending, RunnerOutput) else self.runner.finish(pending)
        # A decode verifying drafts counts as one decode (its batch slot), not as prefill.
        decodes = [s for s in scheduled if s.num_tokens == 1 or s.spec_token_ids]
        spec = [s for s in scheduled if s.spec_token_ids]
        self.last_step = StepStats(
            duration_s=time.perf_counter() - step_start,
            num_decode_tokens=len(decodes),
            num_prefill_tokens=sum(s.num_tokens for s in scheduled)
            - sum(s.num_tokens for s in decodes),
            num_seqs=len(scheduled),
            num_preempted=len(sched.preempted),
            num_context_tokens=sum(context),
            attention_pairs=sum(s.num_tokens * c for s, c in zip(scheduled, context)),
            num_draft_tokens=sum(len(s.spec_token_ids) for s in spec),
            num_accepted_tokens=sum(len(result.sampled[s.request.request_id]) - 1 for s in spec),
        )
        if spec:
            self._observe_acceptance(spec, result)
        if self.speculative and len(decodes) == len(scheduled):
            self._observe_step_cost(len(scheduled))
        num_before = {s.request.request_id: s.request.num_output_tokens for s in scheduled}
        finished = {r.request_id for r in self.scheduler.update(sched, result.sampled)}
        outputs = []
        for s in scheduled:
            request = s.request
            rid = request.request_id
            if rid not in result.sampled:
                continue
            if rid in result.logprobs:
                request.logprobs.append(result.logprobs[rid])
            state = self._text[rid]
            # Tokens past a stop condition were dropped by the scheduler: take what it kept.
            state.append(request.output_token_ids[num_before[rid] :])
            if state.stop_hit is not None and rid not in finished:
                request.stop_reason = state.stop_hit
                self.scheduler.finish(rid, RequestStatus.FINISHED_STOPPED)
                finished.add(rid)
            if rid in finished or state.output_kind != "final":
                outputs.append(self._output(request, finished=rid in finished))
        if self._shadows:
            self._score_shadows()
        if finished or sched.preempted:
            self._retain_proposals()  # (aborts call it too: no other way out of `running`)
        return outputs

    def _observe_acceptance(self, spec: list[ScheduledRequest], result: RunnerOutput) -> None:
        """Speculative decoding: totals, and each request's and the engine's acceptance."""
        self.num_draft_tokens += self.last_step.num_draft_tokens
        self.num_accepted_tokens += self.last_step.num_accepted_tokens
        verified = []
        for s in spec:
            request = s.request
            accepted = len(result.sampled[request.request_id]) - 1
            verified.append((len(s.spec_token_ids), accepted))
            request.spec_gate.observe(len(s.spec_token_ids), accepted, request.num_tokens)
        self.acceptance.update(verified)

    def _shadow_lookups(self) -> None:
        """Dynamic n-gram speculation: look up drafts for up to _SHADOW_PER_STEP of the next
        _SHADOW_CANDIDATES running requests (taking turns) whose gates are open, without
        verifying them, while the time budget lasts (_SHADOW_SHARE, scaled by the hit rate);
        a lookup that finds none is a fruitless proposal at once, the others wait for
        `_score_shadows`."""
        began = time.perf_counter()
        share = _SHADOW_SHARE * max(self.hits.rate, _SHADOW_MIN_SCALE)
        credit = self._shadow_credit + share * (began - self._shadow_clock)
        self._shadow_credit = credit = min(credit, _SHADOW_MAX_CREDIT)
        self._shadow_clock = began
        running = self.scheduler.running
        num_running = len(running)
        if credit <= 0 or not num_running or num_running > self.speculative.max_batch_size:
            return
        k = self.speculative.num_speculative_tokens
        max_len = self.scheduler.max_len
        tried = hits = 0
        start = self._shadow_cursor % num_running
        for i in range(min(num_running, _SHADOW_CANDIDATES)):
            self._shadow_cursor = start + i + 1
            request = running[(start + i) % num_running]
            num_tokens = request.num_tokens
            if (
                not request.spec_gate.is_open(num_tokens)
                or request.request_id in self._shadows
                or not request.output_token_ids  # prefilling
                or request.sampling_params.max_tokens - request.num_output_tokens <= k
                or max_len - num_tokens <= k
            ):
                continue
            tried += 1
            request.spec_gate.started = True
            drafts = self.proposer.lookup(request, k)
            if drafts:
                hits += 1
                self._shadows[request.request_id] = (request, num_tokens, drafts)
            else:
                request.spec_gate.observe(0, 0, num_tokens)
            if tried == _SHADOW_PER_STEP or time.perf_counter() - began >= credit:
                break
        self._shadow_credit = credit - (time.perf_counter() - began)
        if tried:
            self.hits.update(hits, tried)

    def _score_shadows(self) -> None:
        """Score the shadow lookups whose requests have decoded the tokens their drafts
        predicted: the drafts matched before the first miss count as accepted, as the
        rejection rule would have accepted them (`_SHADOW_PER_STEP`)."""
        verified = []
        for rid, (request, position, drafts) in list(self._shadows.items()):
            if request.is_finished:
                del self._shadows[rid]
                continue
            if request.num_tokens - position < len(drafts):
                continue
            del self._shadows[rid]
            actual = request.all_token_ids[position : position + len(drafts)]
            accepted = 0
            while accepted < len(drafts) and drafts[accepted] == actual[accepted]:
                accepted += 1
            verified.append((len(drafts), accepted))
            request.spec_gate.observe(len(drafts), accepted, request.num_tokens)
        self.acceptance.update(verified)

    def wait_in_flight(self) -> None:
        """Block until a step launched ahead has finished on the device (its KV writes
        included). Call before handing blocks freed meanwhile to anything that writes them
        outside the engine's stream (a KV receive)."""
        if self._in_flight is not None:
            self.runner.wait(self._in_flight[1])

    def _propose(self) -> None:
        """Speculative decoding: give running requests in decode their draft tokens for this
        step (the scheduler trims them to what fits). Requests with penalties or logprobs are
        not speculated (their verification would need per-position penalties and logprobs).

        Static (`adaptive` off): k drafts for every request. Dynamic: only requests whose
        `DraftGate` is open (not paused after fruitless proposals), as many as the step's k
        (`speculative.choose_num_drafts` over those requests; when acceptance alone rules
        speculation out, n-gram shadow lookups (`_shadow_lookups`) keep measuring it, and with
        a draft model one draft every _PROBE_STEPS steps does) and each request's acceptance
        allow. A step whose k is 0 does no proposer work: it is a plain
        step. N-gram drafts, found for some requests only, are verified only if they are worth
        the verify step (`speculative.speed_up`); otherwise the step runs plain. Either way at
        most what max_tokens and the context leave."""
        if self.proposer is None:
            return
        spec = self.speculative
        running = self.scheduler.running
        if not spec.adaptive:
            decoding = [r for r in running if r.num_tokens - r.num_computed_tokens == 1]
            if not decoding or len(decoding) > spec.max_batch_size:
                return
            requests = [r for r in decoding if r.spec_gate.resume_at != math.inf]
            self._propose_for(requests, [spec.num_speculative_tokens] * len(requests))
            return
        if self._shadow_learning and self.acceptance.num_outcomes < _SHADOW_LEARN_OUTCOMES:
            # Too few drafts scored for the rule to speculate anywhere (where drafts fail, for
            # good): a plain step, counted as `_step_num_drafts` counts one, without the pass
            # below (~25 us at batch 64 on the dev CPU).
            self._num_steps += 1
            return
        # NOTE: this runs every step, and where the rule says k = 0 it is all the step pays for
        # speculation: one pass without lists or properties (a batch-64 decode step of a small
        # model is ~3 ms of host work on an H100 host).
        batch_size = num_open = 0
        for r in running:
            num_tokens = len(r.all_token_ids)
            if num_tokens - r.num_computed_tokens == 1:
                batch_size += 1
                num_open += num_tokens >= r.spec_gate.resume_at
        if not batch_size or batch_size > spec.max_batch_size:
            return
        if batch_size < len(running) or (
            self.scheduler.waiting and len(running) < self.scheduler.max_num_seqs
        ):
            # The step will hold prompt tokens: the cost meter prices pure decode steps only
            # (a prompt chunk's share of a step varies), so the rule does not speculate there.
            # NOTE: with requests arriving all the time that is a quarter of the steps (a trace
            # of 4 waves of 64 on an H200), eager ones, where a verify step's cost is unknown.
            self._step_num_drafts(batch_size, 0)  # counted, as a plain step
            return
        k_step = self._step_num_drafts(batch_size, num_open)
        if k_step == 0:
            return
        gated = [
            r
            for r in running
            if r.num_tokens - r.num_computed_tokens == 1 and r.spec_gate.is_open(r.num_tokens)
        ]
        if self._probing or self.acceptance.num_outcomes < _LEARN_OUTCOMES:
            gated = _few_new(gated)
        first = any(not r.spec_gate.started for r in gated)
        proposed = self._propose_for(gated, [r.spec_gate.num_drafts(k_step) for r in gated])
        if not proposed:
            return
        drafts: list[int] = []
        for request in proposed:
            if request.spec_token_ids:
                drafts.append(len(request.spec_token_ids))
            elif self.drafter is None:  # the lookup found nothing: a fruitless proposal
                request.spec_gate.observe(0, 0, request.num_tokens)
            # (a draft model returns none while it catches up on a long prompt)
        if self.drafter is None:
            self.hits.update(len(drafts), len(proposed))
        cost, saturation = self._draft_cost(), self._saturation_tokens()
        if drafts and self.drafter is None and not self._probing:
            acceptance, overhead = self.acceptance.acceptance, self.step_cost.factor
            if speed_up(batch_size, drafts, acceptance, cost, saturation, overhead) < 1.0:
                for request in proposed:  # too few to pay for the verify step
                    request.spec_token_ids = []
                drafts = []
        modeled = relative_step_cost(batch_size, drafts, cost, saturation)
        learning_s = getattr(self.proposer, "one_off_s", 0.0)
        self._last_choice = (batch_size, modeled, first, learning_s)

    def _propose_for(self, requests: list[Request], counts: list[int]) -> list[Request]:
        """Propose up to `counts` drafts for `requests`, cut to what max_tokens and the context
        leave; returns the requests proposed for."""
        chosen, ks = [], []
        max_len = self.scheduler.max_len  # (with attention sinks requests grow past it)
        for request, k in zip(requests, counts):
            room = min(
                request.sampling_params.max_tokens - request.num_output_tokens,
                max_len - request.num_tokens,
            )
            k = min(k, room - 1)
            if k > 0:
                request.spec_gate.started = True
                chosen.append(request)
                ks.append(k)
        if chosen:
            self.proposer.propose_batch(chosen, ks)
        return chosen

    def _draft_cost(self) -> float:
        return self.drafter.cost if self.drafter is not None else 0.0

    def _saturation_tokens(self) -> int:
        cuda = self.runner.device.type == "cuda"
        return self.speculative.saturation_tokens or (256 if cuda else 8)

    def _step_num_drafts(self, batch_size: int, num_open: int | None = None) -> int:
        """The step's k for `batch_size` decoding requests, `num_open` (default all) of which
        may be proposed for; counts the step for the probes' schedule."""
        k, (self._num_steps, self._probe_every, self._probing) = self._plan_num_drafts(
            batch_size, num_open
        )
        return k

    def _plan_num_drafts(
        self, batch_size: int, num_open: int | None = None, min_gain: float | None = None
    ) -> tuple[int, tuple[int, int, bool]]:
        """`_step_num_drafts` without changing anything: (k, the rule's state after the step:
        steps counted, probe interval, whether the step is a probe). `min_gain`: the speed-up
        speculation must promise (default: `choose_num_drafts`'s)."""
        spec = self.speculative
        if self._shadow_learning and self.acceptance.num_outcomes < _SHADOW_LEARN_OUTCOMES:
            return 0, (self._num_steps + 1, self._probe_every, False)  # still learning
        saturation, cost = self._saturation_tokens(), self._draft_cost()
        k_max = spec.num_speculative_tokens
        overhead = self.step_cost.factor
        acceptance = self.acceptance.acceptance
        m = (batch_size if num_open is None else num_open) * self.hits.rate
        gain = {} if min_gain is None else {"min_gain": min_gain}
        k = choose_num_drafts(batch_size, acceptance, k_max, cost, saturation, overhead, m, **gain)
        num_steps, probe_every = self._num_steps + 1, self._probe_every
        if self._shadow_learning:  # shadow lookups measure it: no probes (_SHADOW_PER_STEP)
            if k > 0 and self.step_cost.needs_plain(batch_size):
                k = 0  # first a plain step at this batch size
            return k, (num_steps, probe_every, False)
        if k > 0:
            probe_every = _PROBE_STEPS  # speculation pays again
        elif self._probing:  # the last probe did not bring it back: probe less often
            probe_every = min(2 * probe_every, _MAX_PROBE_STEPS)
        probing = False
        if k == 0 and num_steps % probe_every == 0:
            # Probe, unless the batch alone rules speculation out (even if every draft held).
            k = min(1, choose_num_drafts(batch_size, 1.0, k_max, cost, saturation, overhead, m))
            probing = k > 0
        if k > 0 and self.step_cost.needs_plain(batch_size):
            return 0, (num_steps, probe_every, False)  # first a plain step at this batch size
        return k, (num_steps, probe_every, probing)

    def _observe_step_cost(self, batch_size: int) -> None:
        """Feed the cost meter a pure-decode step's duration, proposing included: a plain step
        if the proposer did no work in it, else a speculative one (lookups that found nothing
        included: they are part of what speculating costs). A speculative step that paid a
        one-off cost beside its own is left out: a request's first proposal (the draft model's
        prefill), or a draft model catching a request up on more than one step's tokens (the
        tokens of steps that did not speculate). An n-gram lookup that builds a request's index is
        learning: its time is taken off the step's."""
        seconds = time.perf_counter() - self._cycle_start
        if self._last_choice is None:
            self.step_cost.observe_plain(batch_size, seconds)
            return
        chosen_batch, modeled, first, learning_s = self._last_choice
        seconds -= learning_s
        # NOTE: a request's first n-gram lookups scan its tokens, which is what they cost until
        # the index is built (the build is `learning_s`): priced. Leaving every step with a
        # first proposal out left, with requests arriving all the time, almost none priced.
        steady = self.drafter is None or (
            not first and self.drafter.last_catch_up <= self.speculative.num_speculative_tokens + 1
        )
        if steady and chosen_batch == batch_size:
            self.step_cost.observe_speculative(batch_size, modeled, seconds)

    def _retain_proposals(self) -> None:
        """The proposer drops what it keeps for requests no longer running (the draft model's
        KV, the n-gram indexes)."""
        if self.proposer is not None:
            self.proposer.retain({r.request_id for r in self.scheduler.running})

    def _output(self, request: Request, finished: bool) -> RequestOutput:
        rid = request.request_id
        state = self._text.pop(rid) if finished else self._text[rid]
        new_text = state.take_delta(finished)
        new_tokens = request.output_token_ids[state.num_emitted_tokens :]
        state.num_emitted_tokens = request.num_output_tokens
        if state.output_kind == "delta":
            token_ids, text = new_tokens, new_text
            logprobs = request.logprobs[len(request.logprobs) - len(new_tokens) :]
        else:
            token_ids, text = list(request.output_token_ids), state.text[: state.num_emitted_chars]
            logprobs = list(request.logprobs)
        return RequestOutput(
            request_id=rid,
            prompt=state.prompt,
            prompt_token_ids=request.prompt_token_ids,
            token_ids=token_ids,
            text=text,
            new_token_ids=new_tokens,
            new_text=new_text,
            finished=finished,
            finish_reason=request.finish_reason if finished else None,
            stop_reason=request.stop_reason,
            logprobs=logprobs if request.sampling_params.logprobs is not None else None,
            num_cached_tokens=request.num_cached_tokens,
        )


def _few_new(requests: list[Request]) -> list[Request]:
    """`requests` less those new to speculation past the first _MAX_NEW_PER_STEP of them."""
    kept, num_new = [], 0
    for request in requests:
        if not request.spec_gate.started:
            if num_new == _MAX_NEW_PER_STEP:
                continue
            num_new += 1
        kept.append(request)
    return kept
