"""Writes `baton.json`, the Grafana dashboard (run: python deploy/grafana/build_dashboard.py).

Kept as code so the panels stay consistent; the test suite runs every query of the JSON against a
real Prometheus scraping a deployment under load."""

from __future__ import annotations

import json
from pathlib import Path

SEL = 'tier=~"$tier"'
INST = 'tier=~"$tier", instance=~"$instance"'
RI = "$__rate_interval"


def quantiles(metric: str, by: str = "tier") -> list[tuple[str, str]]:
    return [
        (
            f"p{q} {{{{{by}}}}}",
            f"histogram_quantile(0.{q}, sum by (le, {by}) (rate({metric}_bucket{{{SEL}}}[{RI}])))",
        )
        for q in ("50", "90", "99")
    ]


# (title, unit, [(legend, expr), ...], width)
PANELS = [
    (
        "Prefill goodput (TTFT SLO met)",
        "reqps",
        [
            (
                "{{tier}}",
                f'sum by (tier) (rate(baton_slo_met_requests_total{{role="prefill", {SEL}}}[{RI}]))',
            ),
            (
                "{{instance}}",
                f'sum by (instance) (rate(baton_slo_met_requests_total{{role="prefill", {SEL}}}[{RI}]))',
            ),
        ],
        8,
    ),
    (
        "Decode goodput (TPOT SLO met)",
        "reqps",
        [
            (
                "{{tier}}",
                f'sum by (tier) (rate(baton_slo_met_requests_total{{role="decode", {SEL}}}[{RI}]))',
            ),
            (
                "{{instance}}",
                f'sum by (instance) (rate(baton_slo_met_requests_total{{role="decode", {SEL}}}[{RI}]))',
            ),
        ],
        8,
    ),
    (
        "SLO attainment",
        "percentunit",
        [
            (
                "{{role}}",
                f"sum by (role) (rate(baton_slo_met_requests_total{{{SEL}}}[{RI}])) / "
                f"sum by (role) (rate(baton_slo_requests_total{{{SEL}}}[{RI}]))",
            ),
            (
                "both (goodput)",
                f"sum(rate(baton_goodput_requests_total{{{SEL}}}[{RI}])) / "
                f'sum(rate(baton_slo_requests_total{{role="prefill", {SEL}}}[{RI}]))',
            ),
        ],
        8,
    ),
    ("Time to first token", "s", quantiles("baton_time_to_first_token_seconds"), 8),
    ("Inter-token latency", "s", quantiles("baton_inter_token_latency_seconds"), 8),
    ("Time per output token", "s", quantiles("baton_time_per_output_token_seconds"), 8),
    (
        "Requests by outcome",
        "reqps",
        [
            ("{{outcome}}", f"sum by (outcome) (rate(baton_requests_total{{{SEL}}}[{RI}]))"),
        ],
        8,
    ),
    (
        "Tokens",
        "short",
        [
            ("prompt tok/s", f"sum(rate(baton_prompt_tokens_total{{{SEL}}}[{RI}]))"),
            ("generated tok/s", f"sum(rate(baton_generation_tokens_total{{{SEL}}}[{RI}]))"),
        ],
        8,
    ),
    (
        "Queue time (waiting for a decode reservation)",
        "s",
        quantiles("baton_request_queue_time_seconds"),
        8,
    ),
    (
        "Running / waiting / reserved requests",
        "short",
        [
            ("running {{instance}}", f"baton_num_requests_running{{{INST}}}"),
            ("waiting {{instance}}", f"baton_num_requests_waiting{{{INST}}}"),
            ("reserved {{instance}}", f'baton_num_requests_reserved{{role="decode", {INST}}}'),
        ],
        8,
    ),
    (
        "KV cache usage",
        "percentunit",
        [
            ("{{instance}}", f"baton_kv_cache_usage_ratio{{{INST}}}"),
        ],
        8,
    ),
    (
        "Prefix cache hit rate",
        "percentunit",
        [
            (
                "{{instance}}",
                f"rate(baton_prefix_cache_hit_tokens_total{{{INST}}}[{RI}]) / "
                f"rate(baton_prefix_cache_queried_tokens_total{{{INST}}}[{RI}])",
            ),
        ],
        8,
    ),
    (
        "KV transfer bandwidth",
        "Bps",
        [
            (
                "{{instance}}",
                f'rate(baton_kv_transfer_bytes_total{{role="prefill", {INST}}}[{RI}])',
            ),
        ],
        8,
    ),
    (
        "KV transfer time p50 / p99",
        "s",
        [
            (
                "p50 {{instance}}",
                f"histogram_quantile(0.5, sum by (le, instance) "
                f'(rate(baton_kv_transfer_seconds_bucket{{role="prefill", {INST}}}[{RI}])))',
            ),
            (
                "p99 {{instance}}",
                f"histogram_quantile(0.99, sum by (le, instance) "
                f'(rate(baton_kv_transfer_seconds_bucket{{role="prefill", {INST}}}[{RI}])))',
            ),
        ],
        8,
    ),
    (
        "KV transfers failed",
        "short",
        [
            ("{{instance}}", f"increase(baton_kv_transfer_failures_total{{{INST}}}[{RI}])"),
        ],
        8,
    ),
    (
        "Prefill throughput",
        "short",
        [
            (
                "{{instance}} tok/s",
                f'rate(baton_prefill_tokens_total{{role="prefill", {INST}}}[{RI}])',
            ),
        ],
        8,
    ),
    (
        "Decode step time p50 / p99",
        "s",
        [
            (
                "p50 {{instance}}",
                f"histogram_quantile(0.5, sum by (le, instance) "
                f'(rate(baton_decode_step_seconds_bucket{{role="decode", {INST}}}[{RI}])))',
            ),
            (
                "p99 {{instance}}",
                f"histogram_quantile(0.99, sum by (le, instance) "
                f'(rate(baton_decode_step_seconds_bucket{{role="decode", {INST}}}[{RI}])))',
            ),
        ],
        8,
    ),
    (
        "Decode batch size (mean)",
        "short",
        [
            (
                "{{instance}}",
                f'rate(baton_decode_batch_size_sum{{role="decode", {INST}}}[{RI}]) / '
                f'rate(baton_decode_batch_size_count{{role="decode", {INST}}}[{RI}])',
            ),
        ],
        8,
    ),
]


def build() -> dict:
    panels = []
    x = y = 0
    for i, (title, unit, targets, width) in enumerate(PANELS):
        if x + width > 24:
            x, y = 0, y + 8
        panels.append(
            {
                "id": i + 1,
                "type": "timeseries",
                "title": title,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "gridPos": {"x": x, "y": y, "w": width, "h": 8},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "targets": [
                    {
                        "refId": chr(65 + j),
                        "expr": expr,
                        "legendFormat": legend,
                        "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    }
                    for j, (legend, expr) in enumerate(targets)
                ],
            }
        )
        x += width
    return {
        "title": "Baton: disaggregated serving",
        "uid": "baton-serving",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "tags": ["baton", "llm"],
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "type": "datasource",
                    "query": "prometheus",
                    "label": "Data source",
                },
                {
                    "name": "tier",
                    "type": "query",
                    "label": "Tier",
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "current": {"text": "All", "value": "$__all"},
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "query": {"query": "label_values(baton_requests_total, tier)", "refId": "tier"},
                    "refresh": 2,
                },
                {
                    "name": "instance",
                    "type": "query",
                    "label": "Instance",
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "current": {"text": "All", "value": "$__all"},
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "query": {
                        "query": 'label_values(baton_kv_cache_usage_ratio{tier=~"$tier"}, instance)',
                        "refId": "instance",
                    },
                    "refresh": 2,
                },
            ]
        },
        "panels": panels,
    }


if __name__ == "__main__":
    out = Path(__file__).with_name("baton.json")
    out.write_text(json.dumps(build(), indent=2) + "\n")
    print(f"wrote {out}")
