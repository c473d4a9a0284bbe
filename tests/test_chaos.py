"""Chaos on a CPU deployment (2 prefill + 2 decode workers): 40 concurrent requests while a
prefill and a decode worker are killed mid-load and some clients cancel mid-stream. At the end
every request has ended, in bounded time: with the greedy reference's tokens, cancelled (its
tokens a prefix of them), or with UNAVAILABLE after its attempts; every worker is back (the
killed ones restarted) with its whole block pool free, and the next request is served.

The schedule is drawn from a seeded RNG (BATON_CHAOS_SEED to draw another)."""

from __future__ import annotations

import concurrent.futures
import os
import random
import threading
import time

import grpc
import pytest

from engine import LLM, SamplingParams
from proto import serving_pb2
from tests.helpers import random_prompts
from tests.test_serving import Server, generate

ray = pytest.importorskip("ray")

NUM_REQUESTS = 40
NUM_CANCELLED = 6
SEED = int(os.environ.get("BATON_CHAOS_SEED", "5"))


@pytest.fixture(scope="module")
def server(model_dir):
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False)
    s = Server(
        model_dir,
        num_prefill=2,
        num_decode=2,
        config={"transfer_timeout_s": 3.0, "worker_call_timeout_s": 10.0},
    )
    yield s
    s.close()
    if started_ray:
        ray.shutdown()


class Client:
    """One request's client: streams it, cancels it after `cancel_after` tokens if set."""

    def __init__(self, stub, prompt, max_tokens, cancel_after, started: threading.Semaphore):
        self.stub, self.prompt, self.max_tokens = stub, prompt, max_tokens
        self.cancel_after, self.started = cancel_after, started
        self.tokens: list[int] = []

    def __call__(self):
        sp = serving_pb2.SamplingParams(
            max_tokens=self.max_tokens, temperature=0.0, ignore_eos=True
        )
        request = serving_pb2.GenerateRequest(prompt_token_ids=self.prompt, sampling=sp)
        call = self.stub.Generate(request, timeout=60)  # no request may take longer
        try:
            for message in call:
                if not self.tokens:
                    self.started.release()
                self.tokens += message.token_ids
                if self.cancel_after and len(self.tokens) >= self.cancel_after:
                    call.cancel()
                    return "cancelled", None
            return "ok", message
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.CANCELLED and self.cancel_after:
                return "cancelled", None
            return "error", e


def killer(server, rng: random.Random, started: threading.Semaphore, log: list) -> None:
    """Kill a random prefill worker once 5 requests stream, a random decode worker once 15 do."""
    for role, streaming in (("prefill", 5), ("decode", 15)):
        for _ in range(streaming):
            started.acquire(timeout=30)
        time.sleep(rng.uniform(0.0, 0.2))
        victim = rng.choice([w for w in server.deployment.actors if f"-{role}-" in w])
        ray.kill(server.deployment.actors[victim])
        log.append(victim)


def test_chaos_kills_and_cancellations_end_every_request_and_free_every_block(server, model_dir):
    rng = random.Random(SEED)
    prompts = random_prompts([rng.randint(5, 200) for _ in range(NUM_REQUESTS)], seed=SEED)
    max_tokens = [rng.randint(8, 64) for _ in range(NUM_REQUESTS)]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in max_tokens]
    want = [o.token_ids for o in LLM(model_dir, num_blocks=1024).generate(prompts, params)]
    cancel = dict.fromkeys(rng.sample(range(NUM_REQUESTS), NUM_CANCELLED), 0)
    for i in cancel:
        cancel[i] = rng.randint(1, max_tokens[i] - 1)

    started = threading.Semaphore(0)
    clients = [
        Client(server.stub, prompts[i], max_tokens[i], cancel.get(i), started)
        for i in range(NUM_REQUESTS)
    ]
    killed: list[str] = []
    begin = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(NUM_REQUESTS + 1) as pool:
        chaos = pool.submit(killer, server, rng, started, killed)
        futures = [pool.submit(client) for client in clients]
        done, pending = concurrent.futures.wait(futures, timeout=75)
        assert not pending, f"seed {SEED}: {len(pending)} requests never ended"
        chaos.result(timeout=30)
    assert len(killed) == 2, f"seed {SEED}: the load ended before both kills"

    outcomes = {"ok": 0, "cancelled": 0, "error": 0}
    for i, (client, future) in enumerate(zip(clients, futures)):
        outcome, detail = future.result()
        outcomes[outcome] += 1
        where = f"seed {SEED}, request {i}"
        if outcome == "ok":
            assert client.tokens == want[i], where
            assert detail.finish_reason == "length", where
        elif outcome == "cancelled":
            assert client.tokens == want[i][: len(client.tokens)], where
        else:
            assert detail.code() == grpc.StatusCode.UNAVAILABLE, (where, detail.details())
            assert "attempt" in detail.details() or "no live" in detail.details(), where
            assert client.tokens == want[i][: len(client.tokens)], where
    assert outcomes["ok"] >= NUM_REQUESTS // 2, (SEED, outcomes)

    # The killed workers come back; every pool is whole again; the next request is served.
    router = server.deployment.router
    deadline = time.monotonic() + 60
    while not all(w.alive for w in router.workers):
        assert time.monotonic() < deadline, [(w.worker_id, w.alive) for w in router.workers]
        time.sleep(0.1)
    assert {w.worker_id for w in router.workers if w.incarnation > 0} == set(killed)
    server.wait_all_blocks_free()
    assert router._queued == {"tiny": 0} and not router._streams
    tokens, _ = generate(server.stub, prompts[0], max_tokens=max_tokens[0])
    assert tokens == want[0]
    assert time.monotonic() - begin < 90
