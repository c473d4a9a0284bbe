"""The router's fault handling against fake in-process workers (no Ray, no model): a decode
worker that dies between prefill and `start`, a call that misses its deadline, and the
supervisor noticing a dead worker and bringing it back. Fast and deterministic; the Ray
versions of these are in test_reliability.py and test_chaos.py."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from decode_worker.worker import TokenUpdate, coalesce
from engine import SamplingParams
from prefill_worker.worker import PrefillResult
from router.placement import LeastLoaded
from router.router import Router, RouterOptions, TierInfo
from router.supervisor import SupervisorOptions
from router.workers import LocalWorkerClient, Worker, WorkerDied


def next_token(sequence: list[int]) -> int:
    """The fake model: the next token depends only on the sequence so far."""
    return (len(sequence) * 7 + sum(sequence)) % 97 + 3


def continuation(prompt: list[int], n: int) -> list[int]:
    sequence = list(prompt)
    for _ in range(n):
        sequence.append(next_token(sequence))
    return sequence[len(prompt) :]


class FakePrefill:
    def ping(self, max_stall_s=None):
        return "prefill"

    def connect(self, peer_id, fresh=False):
        pass

    def prefill(self, wid, transfer_id, prompt, params, peer_id):
        return PrefillResult(next_token(prompt), None, None, len(prompt), 0, "done", 1.0)

    def abort(self, wid):
        pass

    def stats(self):
        return {"num_blocks": 64, "num_free_blocks": 64}

    def metrics_text(self):
        return b""

    def step_samples(self):
        return []


class FakeDecode(FakePrefill):
    """Decodes a started request in one update. `fail_start`: dies when asked to start;
    `hang_reserve_s`: reserve answers that late; `start_delay_s`: start returns that late."""

    def __init__(self, fail_start=False, hang_reserve_s=0.0, start_delay_s=0.0):
        self.fail_start, self.hang_reserve_s = fail_start, hang_reserve_s
        self.start_delay_s = start_delay_s
        self.reserved: dict[str, tuple[list[int], int]] = {}
        self.updates: list[list[TokenUpdate]] = []
        self.cv = threading.Condition()

    def reserve(self, wid, transfer_id, peer_id, prompt, params):
        time.sleep(self.hang_reserve_s)
        self.reserved[wid] = (prompt, params.max_tokens)
        return True

    def start(self, wid, first_token, first_logprobs=None):
        if self.fail_start:
            raise WorkerDied("killed between prefill and start")
        time.sleep(self.start_delay_s)
        prompt, max_tokens = self.reserved.pop(wid)
        rest = continuation([*prompt, first_token], max_tokens - 1)
        with self.cv:
            self.updates.append([TokenUpdate(wid, rest, finish_reason="length")])
            self.cv.notify_all()

    def poll_updates(self, timeout_s=1.0):
        with self.cv:
            if not self.updates:
                self.cv.wait(timeout_s)
            updates, self.updates = self.updates, []
        return updates

    def abort(self, wid):
        self.reserved.pop(wid, None)


def make_router(decodes, respawn=None, call_timeout_s=30.0) -> Router:
    tier = TierInfo("t", "", None, vocab_size=100, max_model_len=512, max_tokens_limit=64,
                    default_max_tokens=8)  # fmt: skip
    workers = [Worker("p0", "prefill", "t", LocalWorkerClient(FakePrefill()))]
    workers += [
        Worker(f"d{i}", "decode", "t", LocalWorkerClient(decode))
        for i, decode in enumerate(decodes)
    ]
    return Router(
        {"t": tier},
        "t",
        workers,
        placement=LeastLoaded(),
        options=RouterOptions(call_timeout_s=call_timeout_s),
        supervisor_options=SupervisorOptions(interval_s=0.05, ping_timeout_s=0.5),
        respawn=respawn,
    )


async def serve(router: Router, prompt: list[int], max_tokens: int):
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    req = router.validate("", prompt, "t", params, max_tokens)
    return [chunk async for chunk in router.generate(req)]


def test_decode_dying_before_start_loses_no_token():
    async def scenario():
        router = make_router([FakeDecode(fail_start=True), FakeDecode()])
        await router.start()
        chunks = await serve(router, [5, 6, 7], 6)
        await router.stop()
        return router, chunks

    router, chunks = asyncio.run(scenario())
    # Token 1 came from the prefill of attempt 1; the retry re-prefilled prompt + token 1.
    assert [t for c in chunks for t in c.token_ids] == continuation([5, 6, 7], 6)
    assert chunks[-1].timings["attempts"] == 2 and chunks[-1].decode_instance == "d1"
    assert not router.workers[1].alive  # no respawn given: it stays down


def test_first_token_reaches_the_client_before_the_decode_worker_starts():
    """The prefill worker's token is streamed before the decode worker's `start` call: the
    client's TTFT does not wait for that round trip."""

    async def scenario():
        router = make_router([FakeDecode(start_delay_s=0.5)])
        await router.start()
        req = router.validate("", [5, 6, 7], "t", SamplingParams(max_tokens=4), 4)
        begin, arrivals, chunks = time.perf_counter(), [], []
        async for chunk in router.generate(req):
            arrivals.append(time.perf_counter() - begin)
            chunks.append(chunk)
        await router.stop()
        return arrivals, chunks

    arrivals, chunks = asyncio.run(scenario())
    assert chunks[0].token_ids == continuation([5, 6, 7], 1)
    assert [t for c in chunks for t in c.token_ids] == continuation([5, 6, 7], 4)
    assert arrivals[0] < 0.25 and arrivals[-1] >= 0.5


def test_a_call_past_its_deadline_fails_the_attempt_not_the_request():
    async def scenario():
        router = make_router([FakeDecode(hang_reserve_s=1.0), FakeDecode()], call_timeout_s=0.2)
        await router.start()
        start = time.monotonic()
        chunks = await serve(router, [9, 9], 4)
        elapsed = time.monotonic() - start
        await router.stop()
        return chunks, elapsed

    chunks, elapsed = asyncio.run(scenario())
    assert [t for c in chunks for t in c.token_ids] == continuation([9, 9], 4)
    assert chunks[-1].decode_instance == "d1" and chunks[-1].timings["attempts"] == 2
    assert elapsed < 1.0  # the hung reserve was given up after 0.2 s


def test_supervisor_notices_a_dead_worker_and_restarts_it():
    replacement = LocalWorkerClient(FakeDecode())

    async def respawn(worker):
        await asyncio.sleep(0.05)  # a process starting
        return replacement

    async def scenario():
        router = make_router([FakeDecode()], respawn=respawn)
        await router.start()
        decode = router.workers[1]
        decode.client.dead = True  # its process is gone; no request is in flight
        for _ in range(100):
            await asyncio.sleep(0.02)
            if decode.incarnation == 1 and decode.alive:
                break
        chunks = await serve(router, [1, 2, 3], 5)
        # A late report about the old process must not take the new one down.
        old = LocalWorkerClient(None)
        router.worker_died(decode, old, "late news")
        await router.stop()
        return decode, chunks

    decode, chunks = asyncio.run(scenario())
    assert decode.alive and decode.incarnation == 1 and decode.restarts == 1
    assert decode.client is replacement
    assert [t for c in chunks for t in c.token_ids] == continuation([1, 2, 3], 5)


def test_coalesced_updates_keep_every_token_in_order():
    batches = [
        [TokenUpdate("a", [1], [(0.1, [])]), TokenUpdate("b", [7])],
        [TokenUpdate("a", [2], [(0.2, [])])],
        [
            TokenUpdate("b", [8], finish_reason="stop", stop_reason=8),
            TokenUpdate("c", [], error="x"),
        ],
    ]
    merged = {u.request_id: u for u in coalesce(batches)}
    assert merged["a"].new_token_ids == [1, 2] and merged["a"].logprobs == [(0.1, []), (0.2, [])]
    assert merged["b"].new_token_ids == [7, 8] and merged["b"].finish_reason == "stop"
    assert merged["b"].stop_reason == 8 and merged["c"].error == "x"
    assert batches[0][0].new_token_ids == [1]  # the inputs are left as they were


def test_config_checks_reliability_settings():
    from deploy.config import BatonConfig

    def config(tier=None, **top) -> BatonConfig:
        pools = [{"tier": "t", "role": "prefill"}, {"tier": "t", "role": "decode"}]
        return BatonConfig.from_dict({"tiers": {"t": tier or {}}, "pools": pools, **top})

    defaults = config()
    assert defaults.restart_workers and defaults.reservation_ttl_s == 60.0
    assert defaults.tiers["t"].max_queued_requests == 256
    for name in ("reservation_ttl_s", "worker_call_timeout_s", "health_check_interval_s"):
        with pytest.raises(ValueError, match=f"config: {name} must be > 0"):
            config(**{name: 0})
    with pytest.raises(ValueError, match="max_worker_restarts must be >= 0"):
        config(max_worker_restarts=-1)
    with pytest.raises(ValueError, match=r"tiers\.t\.max_queued_requests must be >= 0"):
        config({"max_queued_requests": -1})


def test_config_tier_is_disaggregated_or_colocated():
    from deploy.config import BatonConfig

    def config(*roles) -> BatonConfig:
        pools = [{"tier": "t", "role": r} for r in roles]
        return BatonConfig.from_dict({"tiers": {"t": {}}, "pools": pools})

    assert config("prefill", "decode") and config("colocated", "colocated")
    for roles in (("prefill",), ("prefill", "colocated"), ("prefill", "decode", "colocated")):
        with pytest.raises(ValueError, match="or only colocated pools"):
            config(*roles)
    with pytest.raises(ValueError, match="pool role must be one of"):
        config("mixed")


def test_pool_engine_args_size_that_pool_only(model_dir):
    from deploy.config import BatonConfig
    from deploy.launcher import worker_specs

    def config(prefill_args) -> BatonConfig:
        tier = {"model": str(model_dir), "engine_args": {"num_blocks": 512, "max_model_len": 256}}
        pools = [
            {"tier": "t", "role": "prefill", "engine_args": prefill_args},
            {"tier": "t", "role": "decode"},
        ]
        return BatonConfig.from_dict({"tiers": {"t": tier}, "pools": pools})

    specs, tiers = worker_specs(config({"num_blocks": 64}), "127.0.0.1", 0)
    engine_args = {spec.role: spec.args[1] for spec in specs}
    assert engine_args["prefill"]["num_blocks"] == 64 and engine_args["decode"]["num_blocks"] == 512
    assert engine_args["prefill"]["max_model_len"] == 256 == tiers["t"].max_model_len
    # What the router assumes of the whole tier stays the tier's.
    with pytest.raises(ValueError, match=r"\['block_size'\] belong to the tier"):
        config({"block_size": 32})
