"""Prometheus metrics of one engine host (a prefill or decode worker), in a registry of its own.

The worker updates them after every step; the router fetches `render()` from every worker and
re-exports the samples on its `/metrics`, so one scrape target covers the whole deployment.
Every series carries the labels `tier`, `role`, `instance`.
"""

from __future__ import annotations

from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LABELS = ("tier", "role", "instance")
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class EngineMetrics:
    def __init__(self, tier: str, role: str, instance: str):
        self.registry = CollectorRegistry()
        labels = (tier, role, instance)
        r = self.registry

        def gauge(name, doc):
            return Gauge(name, doc, LABELS, registry=r).labels(*labels)

        def counter(name, doc):
            return Counter(name, doc, LABELS, registry=r).labels(*labels)

        def histogram(name, doc, buckets):
            return Histogram(name, doc, LABELS, buckets=buckets, registry=r).labels(*labels)

        self.running = gauge("baton_num_requests_running", "Requests in the running batch")
        self.waiting = gauge("baton_num_requests_waiting", "Requests waiting to be scheduled")
        self.reserved = gauge("baton_num_requests_reserved", "Decode reservations awaiting KV")
        self.kv_usage = gauge("baton_kv_cache_usage_ratio", "Share of KV blocks held by requests")
        self.hit_rate = gauge("baton_prefix_cache_hit_rate", "Prefix cache hits / queried tokens")
        self.prefill_tokens = counter("baton_prefill_tokens", "Prompt tokens computed")
        self.decode_tokens = counter("baton_decode_tokens", "Tokens decoded")
        self.cache_queried = counter("baton_prefix_cache_queried_tokens", "Tokens looked up")
        self.cache_hits = counter("baton_prefix_cache_hit_tokens", "Tokens served from cache")
        self.preemptions = counter("baton_preemptions", "Requests preempted (recompute)")
        # Speculative decoding: acceptance rate = accepted / draft tokens.
        self.spec_draft_tokens = counter("baton_spec_draft_tokens", "Draft tokens verified")
        self.spec_accepted_tokens = counter(
            "baton_spec_accepted_tokens", "Draft tokens the target model accepted"
        )
        self.step_time = histogram("baton_engine_step_seconds", "Engine step time", STEP_BUCKETS)
        self.decode_step_time = histogram(
            "baton_decode_step_seconds", "Step time of steps that only decode", STEP_BUCKETS
        )
        self.batch_size = histogram(
            "baton_decode_batch_size", "Decoding requests per step", BATCH_BUCKETS
        )
        self.transfers = counter("baton_kv_transfers", "KV transfers finished")
        self.transfer_failures = counter("baton_kv_transfer_failures", "KV transfers failed")
        self.transfer_bytes = counter("baton_kv_transfer_bytes", "KV bytes moved")
        self.transfer_time = histogram(
            "baton_kv_transfer_seconds",
            "KV transfer time (sender: start to all sent)",
            TRANSFER_BUCKETS,
        )
        # What the step waited for the transfer after its forward pass: the part that delays
        # the prefill worker's next step and the request's TTFT.
        self.transfer_exposed = histogram(
            "baton_kv_transfer_exposed_seconds",
            "KV transfer time after the forward pass (sender: forward done to all sent)",
            TRANSFER_BUCKETS,
        )
        self._seen_queried = self._seen_hits = 0
        # Raw samples for the router's latency models, drained by `take_samples`:
        #   ("prefill", new tokens, attention pairs, seconds)   steps that only prefill
        #   ("decode", batch size, context tokens, seconds)     steps that only decode
        #   ("transfer", bytes, 0, seconds)                    after the forward pass (exposed)
        self._samples: deque[tuple[str, int, int, float]] = deque(maxlen=1024)

    def observe_step(self, engine, seconds: float | None = None) -> None:
        """Called by the worker after each `engine.step()` (on the engine thread). `seconds`:
        what a prefill step's latency sample takes instead of the step's duration (a worker
        stepping back to back passes the loop's whole period)."""
        step = engine.last_step
        self.step_time.observe(step.duration_s)
        if step.num_prefill_tokens and not step.num_decode_tokens:
            taken = step.duration_s if seconds is None else seconds
            self._samples.append(("prefill", step.num_prefill_tokens, step.attention_pairs, taken))
        elif step.num_decode_tokens and not step.num_prefill_tokens:
            self._samples.append(
                ("decode", step.num_decode_tokens, step.num_context_tokens, step.duration_s)
            )
        if step.num_decode_tokens:
            self.batch_size.observe(step.num_decode_tokens)
            if not step.num_prefill_tokens:
                self.decode_step_time.observe(step.duration_s)
        self.prefill_tokens.inc(step.num_prefill_tokens)
        self.decode_tokens.inc(step.num_decode_tokens)
        self.preemptions.inc(step.num_preempted)
        self.spec_draft_tokens.inc(step.num_draft_tokens)
        self.spec_accepted_tokens.inc(step.num_accepted_tokens)
        self.update_gauges(engine)

    def update_gauges(self, engine) -> None:
        scheduler, kv = engine.scheduler, engine.kv_manager
        self.running.set(len(scheduler.running))
        self.waiting.set(len(scheduler.waiting))
        self.reserved.set(len(scheduler.reserved))
        self.kv_usage.set(1.0 - kv.num_free_blocks / kv.num_blocks)
        stats = kv.stats
        self.hit_rate.set(stats.hit_rate)
        self.cache_queried.inc(stats.queried_tokens - self._seen_queried)
        self.cache_hits.inc(stats.hit_tokens - self._seen_hits)
        self._seen_queried, self._seen_hits = stats.queried_tokens, stats.hit_tokens

    def observe_transfer(
        self, num_bytes: int, seconds: float, ok: bool, exposed_s: float | None = None
    ) -> None:
        """`seconds`: start to all sent (the histogram); `exposed_s`: the part after the
        forward pass, what the transfer adds to TTFT (the router's latency sample)."""
        if ok:
            exposed = seconds if exposed_s is None else exposed_s
            self._samples.append(("transfer", num_bytes, 0, exposed))
            self.transfers.inc()
            self.transfer_bytes.inc(num_bytes)
            self.transfer_time.observe(seconds)
            self.transfer_exposed.observe(exposed)
        else:
            self.transfer_failures.inc()

    def take_samples(self) -> list[tuple[str, int, int, float]]:
        """The samples recorded since the last call (thread-safe enough: deque ops are atomic)."""
        taken = []
        while self._samples:
            taken.append(self._samples.popleft())
        return taken

    def render(self) -> bytes:
        return generate_latest(self.registry)
