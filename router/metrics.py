"""The router's Prometheus metrics, and the workers' re-exported beside them.

Request latencies follow `vllm bench serve`'s definitions: TTFT (request received → first
token sent), ITL (every gap between streamed chunks), TPOT ((E2E − TTFT) / (tokens − 1)), E2E.
Goodput: a request counts for its prefill instance when it met the TTFT SLO, for its decode
instance when it met the TPOT SLO, and for the tier when it met both.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.25, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0)
ITL_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.5,
    1.0,
)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
QUEUE_BUCKETS = (0.0, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(
            "baton_time_to_first_token_seconds",
            "Time to first token",
            ["tier"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "baton_inter_token_latency_seconds",
            "Gap between streamed chunks",
            ["tier"],
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "baton_time_per_output_token_seconds",
            "(E2E - TTFT) / (n - 1)",
            ["tier"],
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "baton_e2e_request_latency_seconds",
            "Request received to last token",
            ["tier"],
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.queue = Histogram(
            "baton_request_queue_time_seconds",
            "Time waiting for a decode reservation",
            ["tier"],
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "baton_requests", "Requests by outcome", ["tier", "outcome"], registry=r
        )
        self.prompt_tokens = Counter(
            "baton_prompt_tokens", "Prompt tokens of finished requests", ["tier"], registry=r
        )
        self.generation_tokens = Counter(
            "baton_generation_tokens", "Tokens streamed", ["tier"], registry=r
        )
        self.retries = Counter(
            "baton_request_retries", "Re-placements after a failure", ["tier"], registry=r
        )
        # Goodput, per pool instance and per tier.
        self.slo_requests = Counter(
            "baton_slo_requests",
            "Finished requests judged against SLOs",
            ["tier", "role", "instance"],
            registry=r,
        )
        self.slo_met = Counter(
            "baton_slo_met_requests",
            "Requests that met the role's SLO (prefill: TTFT, decode: TPOT)",
            ["tier", "role", "instance"],
            registry=r,
        )
        self.goodput = Counter(
            "baton_goodput_requests", "Requests that met every SLO", ["tier"], registry=r
        )
        self.attainment = Gauge(
            "baton_slo_attainment_ratio",
            "Share of finished requests that met the SLO since start",
            ["tier", "role"],
            registry=r,
        )
        self._counts: dict[tuple[str, str], list[int]] = {}
        # Workers that left (`forget_instance`): a request they served that ends later (a
        # prefill worker removed while its request decodes elsewhere) must not bring back
        # their series.
        self._gone: set[str] = set()

    def observe_finished(
        self,
        tier: str,
        prefill: str,
        decode: str,
        *,
        ttft_s: float,
        e2e_s: float,
        num_tokens: int,
        num_prompt_tokens: int,
        ttft_slo_s: float,
        tpot_slo_s: float,
        outcome: str,
    ) -> None:
        self.requests.labels(tier, outcome).inc()
        self.e2e.labels(tier).observe(e2e_s)
        self.prompt_tokens.labels(tier).inc(num_prompt_tokens)
        tpot = (e2e_s - ttft_s) / (num_tokens - 1) if num_tokens > 1 else 0.0
        if num_tokens > 1:
            self.tpot.labels(tier).observe(tpot)
        met_ttft, met_tpot = ttft_s <= ttft_slo_s, tpot <= tpot_slo_s
        for role, instance, met in (("prefill", prefill, met_ttft), ("decode", decode, met_tpot)):
            if instance in self._gone:
                continue
            self.slo_requests.labels(tier, role, instance).inc()
            if met:
                self.slo_met.labels(tier, role, instance).inc()
        if met_ttft and met_tpot:
            self.goodput.labels(tier).inc()
        for role, met in (
            ("prefill", met_ttft),
            ("decode", met_tpot),
            ("both", met_ttft and met_tpot),
        ):
            good_total = self._counts.setdefault((tier, role), [0, 0])
            good_total[0] += met
            good_total[1] += 1
            self.attainment.labels(tier, role).set(good_total[0] / good_total[1])

    def forget_instance(self, tier: str, instance: str) -> None:
        """A worker left the deployment: its per-instance series end (ids are never reused)."""
        self._gone.add(instance)
        for metric in (self.slo_requests, self.slo_met):
            for role in ("prefill", "decode"):
                metric.remove(tier, role, instance)


class PoolCollector:
    """`baton_pool_workers{tier, role, state}`: the router's view of its pools at scrape time
    (state: serving, draining, restarting, down), which scaling and failures change."""

    STATES = ("serving", "draining", "restarting", "down")

    def __init__(self, workers: Callable[[], list]):
        self.workers = workers

    def collect(self):
        family = GaugeMetricFamily(
            "baton_pool_workers", "Workers per pool and state", labels=["tier", "role", "state"]
        )
        counts = {}
        for w in self.workers():
            for state in self.STATES:
                counts.setdefault((w.tier, w.role, state), 0)
            counts[(w.tier, w.role, w.state)] += 1
        for labels, count in sorted(counts.items()):
            family.add_metric(labels, count)
        yield family


class WorkerMetricsCollector:
    """Re-exports the samples the workers last reported (refreshed by the router's poll).

    Families of the same name from different workers are merged into one, as the exposition
    format requires; each sample keeps its worker's `instance` label."""

    def __init__(self):
        self._texts: dict[str, str] = {}

    def update(self, worker_id: str, text: str | None) -> None:
        if text is None:
            self._texts.pop(worker_id, None)
        else:
            self._texts[worker_id] = text

    def collect(self):
        merged = {}
        for text in list(self._texts.values()):
            try:
                families = list(text_string_to_metric_families(text))
            except ValueError:
                log.warning("unparsable worker metrics dropped")
                continue
            for family in families:
                if family.name in merged:
                    merged[family.name].samples.extend(family.samples)
                else:
                    merged[family.name] = family
        yield from merged.values()
