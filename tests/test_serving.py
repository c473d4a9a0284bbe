"""End to end on CPU: a real gRPC client → router → prefill worker → gloo KV transfer → decode
worker, all Ray actors in a local Ray. Greedy tokens must equal `engine.LLM` on the same model."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
import time
from types import SimpleNamespace

import grpc
import pytest

from deploy.config import BatonConfig
from engine import LLM, SamplingParams
from proto import serving_pb2, serving_pb2_grpc
from tests.helpers import random_prompts

ray = pytest.importorskip("ray")

MAX_TOKENS = 12
INVALID = grpc.StatusCode.INVALID_ARGUMENT


class Server:
    """A deployment whose router runs on an event loop in a background thread. `http_port`
    (0: a free one; None: no HTTP) and `api_key` go to the config as `baton serve` sets them;
    `engine_args`, `tier` and `config` add to the tier's engine args, the tier and the config;
    `pools` replaces the prefill and decode pools."""

    def __init__(
        self,
        model_dir,
        num_prefill=2,
        num_decode=2,
        num_blocks=256,
        resources=None,
        http_port=0,
        api_key=None,
        engine_args=None,
        tier=None,
        config=None,
        pools=None,
    ):
        from deploy.launcher import deploy

        pools = pools or [
            {
                "tier": "tiny",
                "role": "prefill",
                "count": num_prefill,
                "resources": resources or {"CPU": 1},
            },
            {
                "tier": "tiny",
                "role": "decode",
                "count": num_decode,
                "resources": resources or {"CPU": 1},
            },
        ]

        config = BatonConfig.from_dict(
            {
                "tiers": {
                    "tiny": {
                        "model": str(model_dir),
                        "dtype": "float32",
                        "engine_args": {
                            "num_blocks": num_blocks,
                            "max_num_batched_tokens": 128,
                            "max_model_len": 512,
                            **(engine_args or {}),
                        },
                        "max_tokens_limit": 256,
                        **(tier or {}),
                    }
                },
                "pools": pools,
                "transfer_timeout_s": 5.0,
                "http_port": http_port,
                "api_key": api_key,
                **(config or {}),
            }
        )
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.deployment = self.run(deploy(config, 0, 0), timeout=180)
        self.channel = grpc.insecure_channel(f"localhost:{self.deployment.grpc_port}")
        self.stub = serving_pb2_grpc.BatonStub(self.channel)

    def run(self, coro, timeout=60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stats(self) -> dict[str, dict]:
        return {s["worker_id"]: s for s in self.run(self.deployment.router.stats())}

    def wait_all_blocks_free(self, timeout=20.0) -> dict[str, dict]:
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            live = [s for s in stats.values() if s["alive"]]
            if all(s["num_free_blocks"] == s["num_blocks"] for s in live):
                return stats
            assert time.monotonic() < deadline, f"blocks not returned: {stats}"
            time.sleep(0.1)

    def close(self):
        self.channel.close()
        self.run(self.deployment.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def server(ray_local, model_dir):
    s = Server(model_dir)
    yield s
    s.close()


def generate(stub, prompt_ids, max_tokens=MAX_TOKENS, timeout=60, **sampling):
    sp = serving_pb2.SamplingParams(
        max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **sampling
    )
    request = serving_pb2.GenerateRequest(prompt_token_ids=prompt_ids, sampling=sp)
    messages = list(stub.Generate(request, timeout=timeout))
    tokens = [t for m in messages for t in m.token_ids]
    return tokens, messages[-1]


def test_32_concurrent_requests_match_engine(server, model_dir):
    shared = random_prompts([48], seed=30)[0]
    suffixes = random_prompts([1 + (i * 37) % 200 for i in range(32)], seed=31)
    prompts = [(shared + s if i % 2 else s)[:400] for i, s in enumerate(suffixes)]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    expected = [o.token_ids for o in LLM(model_dir, num_blocks=512).generate(prompts, params)]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda p: generate(server.stub, p), prompts))
    for (tokens, last), want, prompt in zip(results, expected, prompts):
        assert tokens == want
        assert last.finish_reason == "length"
        assert (
            last.usage.prompt_tokens == len(prompt) and last.usage.completion_tokens == MAX_TOKENS
        )
        assert last.prefill_instance.startswith("tiny-prefill") and last.decode_instance.startswith(
            "tiny-decode"
        )
    stats = server.wait_all_blocks_free()
    assert {
        s for (_, last) in results for s in (last.prefill_instance, last.decode_instance)
    } == set(stats)
    assert sum(s.get("prefix_cache_hit_tokens", 0) for s in stats.values()) > 0


def test_text_prompt_and_stop_string(server, model_dir):
    llm = LLM(model_dir, num_blocks=64)
    free = llm.generate(
        "Alice was", SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    )[0]
    stop = free.text[4:7]
    sp = serving_pb2.SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, stop=[stop])
    messages = list(
        server.stub.Generate(
            serving_pb2.GenerateRequest(prompt="Alice was", sampling=sp), timeout=30
        )
    )
    assert "".join(m.text for m in messages) == free.text[: free.text.index(stop)]
    assert messages[-1].finish_reason == "stop" and messages[-1].stop_reason == stop
    server.wait_all_blocks_free()


def test_cancelled_stream_frees_blocks_on_both_workers(server):
    prompt = random_prompts([150], seed=32)[0]
    sp = serving_pb2.SamplingParams(max_tokens=250, temperature=0.0, ignore_eos=True)
    call = server.stub.Generate(
        serving_pb2.GenerateRequest(prompt_token_ids=prompt, sampling=sp), timeout=60
    )
    received = 0
    for message in call:
        received += len(message.token_ids)
        if received >= 3:
            break
    call.cancel()
    stats = server.wait_all_blocks_free()
    assert all(s["num_running"] == 0 for s in stats.values())


@pytest.mark.parametrize(
    "request_kwargs, max_tokens, code, match",
    [
        ({"prompt": ""}, 4, grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty"),
        (
            {"prompt_token_ids": [5, 6]},
            0,
            grpc.StatusCode.INVALID_ARGUMENT,
            "max_tokens must be in",
        ),
        (
            {"prompt_token_ids": [5, 6]},
            100000,
            grpc.StatusCode.INVALID_ARGUMENT,
            "max_tokens must be in",
        ),
        (
            {"prompt_token_ids": [5], "model": "gpt-9"},
            4,
            grpc.StatusCode.NOT_FOUND,
            "unknown model",
        ),
        ({"prompt_token_ids": [5] * 600}, 4, grpc.StatusCode.INVALID_ARGUMENT, "context"),
        ({"prompt_token_ids": [5], "sampling": None}, 4, grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        ({"prompt_token_ids": [5], "sampling": {"regex": "(ab"}}, 4, INVALID, "invalid regex"),
        (
            {"prompt_token_ids": [5], "sampling": {"json_schema": '{"type": "objekt"}'}},
            4,
            grpc.StatusCode.INVALID_ARGUMENT,
            "invalid json_schema: Invalid type",
        ),
        (
            {"prompt_token_ids": [5], "sampling": {"json_schema": "{"}},
            4,
            INVALID,
            "not valid JSON",
        ),
    ],
)
def test_bad_requests_get_clear_status_and_no_work(server, request_kwargs, max_tokens, code, match):
    before = {k: s.get("num_prefills") for k, s in server.stats().items()}
    kwargs = dict(request_kwargs)
    sampling = kwargs.pop("sampling", {})
    sp = serving_pb2.SamplingParams(max_tokens=max_tokens, **(sampling or {}))
    if sampling is None:
        sp.top_p = 1.5
    with pytest.raises(grpc.RpcError) as err:
        list(server.stub.Generate(serving_pb2.GenerateRequest(sampling=sp, **kwargs), timeout=10))
    assert err.value.code() == code
    assert match in err.value.details()
    assert {k: s.get("num_prefills") for k, s in server.stats().items()} == before


def test_list_models_and_health(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    models = server.stub.ListModels(serving_pb2.ListModelsRequest(), timeout=5)
    assert models.default_model == "tiny"
    assert models.models[0].prefill_instances == 2 and models.models[0].decode_instances == 2
    health = health_pb2_grpc.HealthStub(server.channel).Check(
        health_pb2.HealthCheckRequest(), timeout=5
    )
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_decode_worker_killed_mid_stream(ray_local, model_dir):
    server = Server(model_dir, num_prefill=1, num_decode=2)
    try:
        prompts = random_prompts([30, 60, 90, 120], seed=33)
        params = SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True)
        expected = [o.token_ids for o in LLM(model_dir, num_blocks=512).generate(prompts, params)]
        calls = []
        for p in prompts:
            sp = serving_pb2.SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True)
            calls.append(
                server.stub.Generate(
                    serving_pb2.GenerateRequest(prompt_token_ids=p, sampling=sp), timeout=60
                )
            )
        first = [next(call) for call in calls]  # every request has started streaming
        victim = "tiny-decode-0"
        ray.kill(server.deployment.actors[victim])
        served_again = 0
        for call, head, want in zip(calls, first, expected):
            try:
                messages = [head, *call]
                tokens = [t for m in messages for t in m.token_ids]
                assert tokens == want  # served again on the survivor, same greedy tokens
                served_again += messages[-1].timings.attempts > 1
            except grpc.RpcError as e:  # or ended with a clear status
                assert e.code() == grpc.StatusCode.UNAVAILABLE and "attempt" in e.details()
        # The victim held some of the four requests (least-loaded spreads them 2 and 2).
        assert served_again >= 1
        tokens, last = generate(server.stub, prompts[0], max_tokens=8)
        assert last.decode_instance == "tiny-decode-1" and tokens == expected[0][:8]
        stats = server.wait_all_blocks_free()
        assert stats[victim]["alive"] is False
    finally:
        server.close()


def test_metrics_agree_with_the_client(server):
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://localhost:{server.deployment.metrics_port}/metrics"

    def scrape() -> dict[tuple, float]:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def total(samples, name, **labels):
        return sum(
            v
            for (n, ls), v in samples.items()
            if n == name and all(dict(ls).get(k) == want for k, want in labels.items())
        )

    before = scrape()
    prompts = random_prompts([20, 40, 60, 80], seed=34)
    for p in prompts:
        generate(server.stub, p)
    server.wait_all_blocks_free()
    time.sleep(1.5)  # the router refreshes worker metrics every second
    after = scrape()

    def delta(name, **labels):
        return total(after, name, **labels) - total(before, name, **labels)

    assert delta("baton_requests_total", tier="tiny", outcome="length") == 4
    assert delta("baton_time_to_first_token_seconds_count", tier="tiny") == 4
    assert delta("baton_generation_tokens_total", tier="tiny") == 4 * MAX_TOKENS
    assert delta("baton_prompt_tokens_total", tier="tiny") == sum(map(len, prompts))
    assert delta("baton_slo_requests_total", role="prefill") == 4
    assert delta("baton_slo_requests_total", role="decode") == 4
    # Worker metrics, re-exported with their instance labels.
    assert delta("baton_kv_transfers_total", role="prefill") == 4
    assert delta("baton_kv_transfer_bytes_total", role="prefill") > 0
    assert delta("baton_prefill_tokens_total", role="prefill") > 0
    assert delta("baton_decode_tokens_total", role="decode") >= 4 * (MAX_TOKENS - 1)
    instances = {dict(ls).get("instance") for (n, ls) in after if n == "baton_kv_cache_usage_ratio"}
    assert instances == {"tiny-prefill-0", "tiny-prefill-1", "tiny-decode-0", "tiny-decode-1"}


def test_colocated_tier_serves_the_same_tokens_and_frees_blocks(ray_local, model_dir):
    """The baseline deployment: workers that prefill and decode their own requests, no KV
    handoff. Same greedy tokens as engine.LLM; cancellation frees the blocks."""
    pools = [{"tier": "tiny", "role": "colocated", "count": 2, "resources": {"CPU": 1}}]
    server = Server(model_dir, pools=pools, http_port=None)
    try:
        prompts = random_prompts([1 + (i * 53) % 300 for i in range(12)], seed=33)
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
        expected = [o.token_ids for o in LLM(model_dir, num_blocks=512).generate(prompts, params)]
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            results = list(pool.map(lambda p: generate(server.stub, p), prompts))
        for (tokens, last), want in zip(results, expected):
            assert tokens == want
            assert last.finish_reason == "length" and last.usage.completion_tokens == MAX_TOKENS
            assert last.prefill_instance == last.decode_instance
            assert last.prefill_instance.startswith("tiny-colocated")
        assert len({last.decode_instance for _, last in results}) == 2  # both workers used
        sp = serving_pb2.SamplingParams(max_tokens=250, temperature=0.0, ignore_eos=True)
        call = server.stub.Generate(
            serving_pb2.GenerateRequest(prompt_token_ids=prompts[0], sampling=sp), timeout=60
        )
        for message in call:
            if message.token_ids:
                break
        call.cancel()
        stats = server.wait_all_blocks_free()
        assert all(s["role"] == "colocated" and s["num_running"] == 0 for s in stats.values())
    finally:
        server.close()


def test_structured_output_through_prefill_and_decode_workers(server, model_dir):
    """The prefill worker samples token 1 under the mask, the decode worker's matcher consumes
    it and goes on: every output validates, greedy ones equal the engine's."""
    from tests.test_structured_output import PROMPTS, check, constraints

    items = [(c, PROMPTS[i % 4]) for i, c in enumerate(constraints())]
    llm = LLM(model_dir, num_blocks=256)
    expected = llm.generate(
        [p for _, p in items],
        [SamplingParams(max_tokens=160, temperature=0.0, **c) for c, _ in items],
    )

    def run(item, temperature):
        constraint, prompt = item
        fields = dict(constraint)
        if "json_schema" in fields:
            fields["json_schema"] = json.dumps(fields["json_schema"])
        sp = serving_pb2.SamplingParams(max_tokens=160, temperature=temperature, seed=7, **fields)
        request = serving_pb2.GenerateRequest(prompt=prompt, sampling=sp)
        messages = list(server.stub.Generate(request, timeout=60))
        return messages

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        greedy = list(pool.map(lambda item: run(item, 0.0), items))
        sampled = list(pool.map(lambda item: run(item, 1.0), items))
    for messages, want in zip(greedy, expected):
        assert [t for m in messages for t in m.token_ids] == want.token_ids
    for (constraint, _), messages in zip(items + items, greedy + sampled):
        text = "".join(m.text for m in messages)
        check(SimpleNamespace(text=text, finish_reason=messages[-1].finish_reason), constraint)
    server.wait_all_blocks_free()
