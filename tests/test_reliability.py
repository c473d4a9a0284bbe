"""Faults and overload on a CPU deployment (1 prefill + 1 decode worker on a local Ray):
workers killed or hung are noticed without traffic and restarted, a stalled KV transfer times
out and frees blocks on both sides, unstarted reservations expire, and a burst of ten times the
admission queue is refused early while the rest is served correctly. See docs/RELIABILITY.md."""

from __future__ import annotations

import concurrent.futures
import json
import time
import urllib.error
import urllib.request

import grpc
import pytest

from engine import LLM, SamplingParams
from tests.helpers import random_prompts
from tests.test_serving import Server, generate

ray = pytest.importorskip("ray")

MAX_QUEUED = 4
TRANSFER_TIMEOUT_S = 2.0
RESERVATION_TTL_S = 4.0
CONFIG = {
    "transfer_timeout_s": TRANSFER_TIMEOUT_S,
    "reservation_ttl_s": RESERVATION_TTL_S,
    "worker_call_timeout_s": 3.0,
    # Above the longest legitimate loop stall here: the injected 3 s stall + a 2 s send wait.
    "engine_stall_timeout_s": 8.0,
}
PREFILL, DECODE = "tiny-prefill-0", "tiny-decode-0"


@pytest.fixture(scope="module")
def server(model_dir):
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    # Two decode slots make a queue form quickly; the queue holds MAX_QUEUED requests.
    s = Server(
        model_dir,
        num_prefill=1,
        num_decode=1,
        engine_args={"max_num_seqs": 2},
        tier={"max_queued_requests": MAX_QUEUED},
        config=CONFIG,
    )
    yield s
    s.close()
    if started_ray:
        ray.shutdown()


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, num_blocks=512)


def greedy(llm, prompts, max_tokens):
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return [o.token_ids for o in llm.generate(prompts, params)]


def worker(server, worker_id):
    return next(w for w in server.deployment.router.workers if w.worker_id == worker_id)


def wait_until(condition, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        time.sleep(0.05)
    return time.monotonic()


def test_killed_workers_are_noticed_without_traffic_and_restarted(server, llm):
    prompt = random_prompts([40], seed=50)[0]
    want = greedy(llm, [prompt], 8)[0]
    for victim_id in (PREFILL, DECODE):
        victim = worker(server, victim_id)
        incarnation, restarts = victim.incarnation, victim.restarts
        killed_at = time.monotonic()
        ray.kill(server.deployment.actors[victim_id])
        # No request is in flight: the health check notices within its interval (1 s).
        noticed_at = wait_until(lambda v=victim: not v.alive, 5, f"{victim_id} marked dead")
        assert noticed_at - killed_at < 2.5
        wait_until(
            lambda v=victim, i=incarnation: v.alive and v.incarnation == i + 1,
            60,
            f"{victim_id} restarted",
        )
        assert victim.restarts == restarts + 1
        # The survivor's pair with the old process is rebuilt on first use.
        tokens, last = generate(server.stub, prompt, max_tokens=8)
        assert tokens == want and last.timings.attempts == 1
        assert {last.prefill_instance, last.decode_instance} == {PREFILL, DECODE}
    server.wait_all_blocks_free()


def test_stalled_transfer_times_out_frees_both_sides_and_is_served_again(server, llm):
    prompt = random_prompts([70], seed=51)[0]
    want = greedy(llm, [prompt], 8)[0]
    failed_before = server.stats()[DECODE]["num_transfers_failed"]
    # The next transfer's header goes out, then its KV waits 3 s: past the 2 s timeout.
    ray.get(server.deployment.actors[PREFILL].debug_stall_sends.remote(3.0))
    start = time.monotonic()
    tokens, last = generate(server.stub, prompt, max_tokens=8)
    assert tokens == want
    assert last.timings.attempts == 2  # the first attempt's transfer failed, the second ran
    assert time.monotonic() - start < 3.0 + 2 * TRANSFER_TIMEOUT_S + 5
    stats = server.wait_all_blocks_free()
    assert stats[DECODE]["num_transfers_failed"] == failed_before + 1


def test_unstarted_reservation_expires_and_orphaned_prefill_finishes(server):
    decode = server.deployment.actors[DECODE]
    prompt = random_prompts([100], seed=52)[0]
    params = SamplingParams(max_tokens=8, temperature=0.0)
    # A router reserves blocks and vanishes before `start` (here: nobody calls it).
    assert ray.get(decode.reserve.remote("orphan", 10**9, PREFILL, prompt, params))
    stats = server.stats()[DECODE]
    assert stats["num_reserved"] == 1 and stats["num_free_blocks"] < stats["num_blocks"]
    expired_before = stats["num_leases_expired"]
    # A prefill whose caller vanished: its result is never read; it finishes anyway.
    prefill = server.deployment.actors[PREFILL]
    prefill.prefill.remote("orphan-prefill", 10**9 + 1, prompt, params, DECODE)
    stats = server.wait_all_blocks_free(timeout=RESERVATION_TTL_S + 5)
    assert stats[DECODE]["num_reserved"] == 0
    assert stats[DECODE]["num_leases_expired"] == expired_before + 1
    assert stats[PREFILL]["num_running"] == stats[PREFILL]["num_waiting"] == 0


def http_post(server, path, body):
    url = f"http://localhost:{server.deployment.http_port}{path}"
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, r.headers, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


def one_request(server, prompt, max_tokens):
    try:
        return generate(server.stub, prompt, max_tokens=max_tokens)
    except grpc.RpcError as e:
        return e


def test_burst_of_ten_times_the_queue_is_refused_early_and_recovers(server, llm):
    # Ten times the queue at once, half over gRPC and half over HTTP, interleaved.
    prompts = random_prompts([10 + (i * 7) % 90 for i in range(10 * MAX_QUEUED)], seed=53)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    outputs = llm.generate(prompts, params)
    want, texts = [o.token_ids for o in outputs], [o.text for o in outputs]

    def one(i):
        if i % 2 == 0:
            return one_request(server, prompts[i], 16)
        body = {"model": "tiny", "prompt": prompts[i], "max_tokens": 16, "temperature": 0}
        return http_post(server, "/v1/completions", {**body, "ignore_eos": True})

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(one, range(len(prompts))))
    grpc_refused = [r for r in results[::2] if isinstance(r, grpc.RpcError)]
    http_refused = [r for r in results[1::2] if r[0] != 200]
    assert grpc_refused and http_refused, "a burst of 10x the queue must overflow it"
    for error in grpc_refused:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        assert "max_queued_requests" in error.details()
        assert ("retry-after", "1") in error.trailing_metadata()
    for status, headers, answer in http_refused:
        assert status == 429 and headers.get("Retry-After") == "1", answer
        assert answer["error"]["code"] == "rate_limit_exceeded"
        assert "max_queued_requests" in answer["error"]["message"]
    num_served = 0
    for i, result in enumerate(results):
        if i % 2 == 0 and not isinstance(result, grpc.RpcError):
            tokens, last = result
            assert tokens == want[i] and last.finish_reason == "length"
            num_served += 1
        elif i % 2 == 1 and result[0] == 200:
            choice = result[2]["choices"][0]
            assert choice["text"] == texts[i] and choice["finish_reason"] == "length"
            num_served += 1
    assert num_served >= MAX_QUEUED

    # Recovered: a follow-up request is served, nothing is left queued or held.
    tokens, _ = generate(server.stub, prompts[0], max_tokens=16)
    assert tokens == want[0]
    server.wait_all_blocks_free()
    router = server.deployment.router
    assert router._queued == {"tiny": 0} and not router._streams


def test_hung_worker_is_replaced_and_no_request_hangs(server, llm):
    prompt = random_prompts([30], seed=55)[0]
    want = greedy(llm, [prompt], 8)[0]
    victim = worker(server, DECODE)
    incarnation = victim.incarnation
    ray.get(server.deployment.actors[DECODE].debug_hang.remote(120))  # its engine loop sleeps
    start = time.monotonic()
    try:
        tokens, _ = generate(server.stub, prompt, max_tokens=8, timeout=60)
        assert tokens == want  # served by the replacement
    except grpc.RpcError as e:  # or told so, in bounded time
        assert e.code() == grpc.StatusCode.UNAVAILABLE, e.details()
    assert time.monotonic() - start < 40
    # The stalled loop fails its health check (engine_stall_timeout_s 8 s): killed, replaced.
    wait_until(lambda: victim.alive and victim.incarnation > incarnation, 60, "a new process")
    tokens, _ = generate(server.stub, prompt, max_tokens=8)
    assert tokens == want
    server.wait_all_blocks_free()
