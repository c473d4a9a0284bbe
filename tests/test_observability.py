"""A real Prometheus scrapes a CPU deployment under load from `baton bench`; every query of the
Grafana dashboard must return data, and the metrics must agree with what the client measured.

Needs the `prometheus` binary (Debian's package; `.ci/run` installs it and sets
BATON_REQUIRE_PROMETHEUS=1 so that a missing binary fails instead of skipping)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from benchmarks.serving import run_load as bench_load
from benchmarks.serving import shared_prefix, summarize
from router.metrics import TTFT_BUCKETS
from tests.test_serving import Server

DASHBOARD = Path(__file__).parents[1] / "deploy" / "grafana" / "baton.json"
PROMETHEUS = shutil.which("prometheus")

if PROMETHEUS is None and os.environ.get("BATON_REQUIRE_PROMETHEUS") != "1":
    pytest.skip(
        "prometheus binary not installed (apt-get install prometheus)", allow_module_level=True
    )

ray = pytest.importorskip("ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def query(base: str, expr: str) -> list:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    body = json.loads(urllib.request.urlopen(url, timeout=10).read())
    assert body["status"] == "success", body
    return body["data"]["result"]


@pytest.fixture(scope="module")
def deployment(model_dir):
    assert PROMETHEUS is not None, "BATON_REQUIRE_PROMETHEUS=1 but no prometheus binary"
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    server = Server(model_dir)
    yield server
    server.close()
    ray.shutdown()


@pytest.fixture(scope="module")
def prometheus(deployment, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prometheus")
    config = tmp / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: baton\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{deployment.deployment.metrics_port}']}}]\n"
    )
    port = free_port()
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{base}/-/ready", timeout=1)
            break
        except OSError:
            assert proc.poll() is None, "prometheus exited"
            assert time.monotonic() < deadline, "prometheus did not become ready"
            time.sleep(0.2)
    yield base
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def load(deployment, prometheus):
    """`baton bench`'s load generator: 30 shared-prefix requests at 10 req/s."""
    target = f"localhost:{deployment.deployment.grpc_port}"
    prompts = shared_prefix(
        30, 512, num_prefixes=2, prefix_len=64, input_len=40, output_len=16, seed=0
    )
    slo = (1.0, 0.1)
    results, elapsed = asyncio.run(bench_load(target, prompts, 10.0, slo=slo, progress=False))
    summary = summarize(results, elapsed, 10.0, slo)
    time.sleep(4)  # the router refreshes worker metrics each second; Prometheus scrapes each second
    return results, summary


def dashboard_queries() -> list[tuple[str, str]]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(p["title"], t["expr"]) for p in panels for t in p["targets"]]


def test_every_dashboard_query_returns_data(prometheus, load):
    _, summary = load
    assert summary["completed"] == 30
    empty = []
    for title, expr in dashboard_queries():
        concrete = (
            expr.replace("$tier", ".*").replace("$instance", ".*").replace("$__rate_interval", "1m")
        )
        if not query(prometheus, concrete):
            empty.append(f"{title}: {concrete}")
    assert not empty, "queries without data:\n" + "\n".join(empty)


def test_metrics_agree_with_the_client(prometheus, load):
    results, summary = load
    completed = query(prometheus, 'sum(baton_requests_total{outcome="length"})')
    assert float(completed[0]["value"][1]) == summary["completed"] == 30
    tokens = query(prometheus, "sum(baton_generation_tokens_total)")
    assert float(tokens[0]["value"][1]) == sum(r.output_len for r in results)
    # The TTFT medians, server-side (from the histogram) and client-side, fall in the same or
    # adjacent buckets: the server's clock starts a little after the client's.
    server_p50 = float(
        query(
            prometheus,
            "histogram_quantile(0.5, sum by (le) (baton_time_to_first_token_seconds_bucket))",
        )[0]["value"][1]
    )
    client_p50 = float(np.median([r.ttft for r in results if r.ok]))
    bucket = np.searchsorted(TTFT_BUCKETS, [server_p50, client_p50])
    assert abs(int(bucket[0]) - int(bucket[1])) <= 1, (server_p50, client_p50)


def test_a_removed_workers_series_stay_gone_when_its_requests_finish_later():
    """A prefill worker removed while a request it prefilled still decodes elsewhere: the
    request's end must not re-create the removed worker's per-instance series (a race the
    scaling test hit in CI)."""
    from prometheus_client import CollectorRegistry, generate_latest

    from router.metrics import RouterMetrics

    metrics = RouterMetrics(CollectorRegistry())
    finished = dict(
        ttft_s=0.1,
        e2e_s=0.5,
        num_tokens=5,
        num_prompt_tokens=10,
        ttft_slo_s=1.0,
        tpot_slo_s=1.0,
        outcome="stop",
    )
    metrics.observe_finished("t", "p0", "d0", **finished)
    assert 'instance="p0"' in generate_latest(metrics.registry).decode()
    metrics.forget_instance("t", "p0")
    metrics.observe_finished("t", "p0", "d0", **finished)  # prefilled before the removal
    text = generate_latest(metrics.registry).decode()
    assert 'instance="p0"' not in text and 'instance="d0"' in text
    assert 'baton_goodput_requests_total{tier="t"} 2.0' in text  # tier totals still count it
