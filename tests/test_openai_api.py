"""The OpenAI-compatible HTTP API, end to end with the official `openai` client on CPU: a local
Ray deployment (1 prefill + 1 decode worker) whose router also serves HTTP, with an API key.
Greedy answers must equal `engine.LLM` on the same model (chat: on the rendered template)."""

from __future__ import annotations

import concurrent.futures
import json
import time
import urllib.error
import urllib.request

import grpc
import pytest

from engine import LLM, SamplingParams
from engine.chat_template import ChatTemplate
from engine.tokenizer import Tokenizer
from proto import serving_pb2
from tests.helpers import random_prompts
from tests.test_serving import Server

ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")

KEY = "test-key-123"
MAX_TOKENS = 12
GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}
MESSAGES = [
    {"role": "system", "content": "You are Alice."},
    {"role": "user", "content": "Where does the rabbit-hole go?"},
]


@pytest.fixture(scope="module")
def server(model_dir):
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    s = Server(model_dir, num_prefill=1, num_decode=1, api_key=KEY)
    yield s
    s.close()
    if started_ray:
        ray.shutdown()


@pytest.fixture(scope="module")
def client(server):
    url = f"http://localhost:{server.deployment.http_port}/v1"
    return openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, num_blocks=256)


def greedy(max_tokens=MAX_TOKENS, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kwargs)


def http(server, method, path, body=None, key=KEY) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    url = f"http://localhost:{server.deployment.http_port}{path}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers, method=method)) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# -- completions ---------------------------------------------------------------------------


def test_completions_match_engine(client, llm):
    ids = random_prompts([5, 40, 130], seed=40)
    prompts = [*ids, "Alice was", [ids[0]], ["Alice was"]]  # ids, text, one-element lists
    expected = llm.generate([*ids, "Alice was", ids[0], "Alice was"], greedy())
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        results = list(
            pool.map(
                lambda p: client.completions.create(
                    model="tiny", prompt=p, max_tokens=MAX_TOKENS, **GREEDY
                ),
                prompts,
            )
        )
    for result, want in zip(results, expected):
        assert result.object == "text_completion" and result.model == "tiny"
        assert result.choices[0].text == want.text
        assert result.choices[0].finish_reason == "length"
        usage = result.usage
        assert (usage.prompt_tokens, usage.completion_tokens) == (len(want.prompt_token_ids), 12)
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_completion_stream_with_usage_and_logprobs(client, llm):
    want = llm.generate("Alice was", greedy(logprobs=3))[0]
    events = list(
        client.completions.create(
            model="tiny",
            prompt="Alice was",
            max_tokens=MAX_TOKENS,
            stream=True,
            stream_options={"include_usage": True},
            logprobs=3,
            **GREEDY,
        )
    )
    *deltas, last = events
    assert len(deltas) > 1  # streamed, not one blob
    assert "".join(e.choices[0].text for e in deltas) == want.text
    assert [e.choices[0].finish_reason for e in deltas] == [None] * (len(deltas) - 1) + ["length"]
    assert all(e.usage is None for e in deltas)
    assert last.choices == []
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (
        len(want.prompt_token_ids),
        MAX_TOKENS,
    )
    chosen = [lp for e in deltas for lp in e.choices[0].logprobs.token_logprobs]
    assert chosen == pytest.approx([c for c, _ in want.logprobs], abs=1e-4)
    for e in deltas:
        for lp, top in zip(
            e.choices[0].logprobs.token_logprobs, e.choices[0].logprobs.top_logprobs
        ):
            assert 1 <= len(top) <= 3 and max(top.values()) == pytest.approx(lp, abs=1e-5)


def test_seeded_sampling_repeats(client):
    def sample(seed):
        request = {"model": "tiny", "prompt": "Alice was", "max_tokens": 8, "temperature": 1.0}
        return client.completions.create(seed=seed, **request).choices[0].text

    texts = {seed: sample(seed) for seed in (1, 2, 3)}
    assert sample(1) == texts[1] and len(set(texts.values())) > 1


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string(client, llm, stream):
    free = llm.generate("Alice was", greedy(20))[0].text
    stop = free[4:7]
    response = client.completions.create(
        model="tiny", prompt="Alice was", max_tokens=20, stop=[stop, "never there"], stream=stream,
        **GREEDY,
    )  # fmt: skip
    choices = [e.choices[0] for e in response] if stream else response.choices
    assert "".join(c.text for c in choices) == free[: free.index(stop)]
    assert choices[-1].finish_reason == "stop"


# -- chat ------------------------------------------------------------------------------------


def test_chat_matches_engine_on_the_rendered_template(client, llm, model_dir):
    text = ChatTemplate.from_pretrained(model_dir).render(MESSAGES)
    ids = Tokenizer.from_pretrained(model_dir).encode(text, add_special_tokens=False)
    want = llm.generate([ids], greedy(logprobs=2))[0]

    result = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_completion_tokens=MAX_TOKENS,
        logprobs=True,
        top_logprobs=2,
        **GREEDY,
    )
    assert result.object == "chat.completion"
    message = result.choices[0].message
    assert (message.role, message.content) == ("assistant", want.text)
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (len(ids), MAX_TOKENS)
    content = result.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx([c for c, _ in want.logprobs], abs=1e-4)
    assert all(len(c.top_logprobs) == 2 and bytes(c.bytes).decode() == c.token for c in content)

    events = list(
        client.chat.completions.create(
            model="tiny",
            messages=MESSAGES,
            max_tokens=MAX_TOKENS,  # the older name
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    assert events[0].choices[0].delta.role == "assistant"
    assert "".join(e.choices[0].delta.content or "" for e in events if e.choices) == want.text
    assert events[-2].choices[0].finish_reason == "length"
    assert events[-1].usage.prompt_tokens == len(ids)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert http(server, "GET", "/health", key=None) == (200, {"status": "ok"})


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "endpoint, kwargs, status, param, match",
    [
        ("completions", {"max_tokens": 100000}, 400, None, "max_tokens must be in [1, 256]"),
        ("completions", {"model": "gpt-9"}, 404, "model", "unknown model 'gpt-9'"),
        ("completions", {"prompt": [5] * 600}, 400, None, "context"),
        ("completions", {"n": 2}, 400, "n", "n must be 1"),
        ("completions", {"top_p": 1.5}, 400, None, "top_p must be in (0, 1]"),
        ("completions", {"temperature": "hot"}, 400, "temperature", "valid number"),
        ("completions", {"prompt": ["a", "b"]}, 400, "prompt", "one prompt per request"),
        ("chat", {"model": "gpt-9"}, 404, "model", "unknown model"),
        ("chat", {"messages": []}, 400, "messages", "at least 1 item"),
        (
            "chat",
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            400,
            "response_format",
            "needs json_schema.schema",
        ),
        ("chat", {"response_format": {"type": "yaml"}}, 400, "response_format", "not 'yaml'"),
        ("completions", {"extra_body": {"guided_regex": "(ab"}}, 400, None, "invalid regex"),
        (
            "chat",
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 1}}}},
            400,
            None,
            "invalid json_schema",
        ),
        (
            "completions",
            {"extra_body": {"guided_regex": "a", "guided_choice": ["a"]}},
            400,
            None,
            "at most one",
        ),
    ],
)
def test_bad_requests_get_openai_errors_and_no_work(
    server, client, endpoint, kwargs, status, param, match
):
    before = {k: s.get("num_prefills") for k, s in server.stats().items()}
    with pytest.raises(openai.APIStatusError) as err:
        if endpoint == "completions":
            client.completions.create(**{"model": "tiny", "prompt": "Alice", **kwargs})
        else:
            client.chat.completions.create(**{"model": "tiny", "messages": MESSAGES, **kwargs})
    assert err.value.status_code == status
    assert set(err.value.body) == {"message", "type", "param", "code"}
    assert match in err.value.body["message"] and err.value.body["param"] == param
    if status == 404:
        assert err.value.body["code"] == "model_not_found"
    assert {k: s.get("num_prefills") for k, s in server.stats().items()} == before


def test_malformed_json_gets_400_or_401_without_the_key(server):
    status, error = http(server, "POST", "/v1/completions", b'{"model": ')
    assert status == 400 and "not valid JSON" in error["error"]["message"]
    assert http(server, "POST", "/v1/completions", b'{"model": ', key=None)[0] == 401


def test_a_bug_is_a_500_in_the_same_shape(server, client, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(server.deployment.router, "validate", broken)
    for _ in range(3):  # the connection stays usable: no reset on the next request
        with pytest.raises(openai.InternalServerError) as err:
            client.completions.create(model="tiny", prompt="Alice")
        body = err.value.body
        assert body["type"] == "server_error" and "RuntimeError" in body["message"]


def test_chat_without_a_template_is_refused(server, client, monkeypatch):
    monkeypatch.setattr(server.deployment.router.tiers["tiny"], "chat_template", None)
    with pytest.raises(openai.BadRequestError, match="has no chat template"):
        client.chat.completions.create(model="tiny", messages=MESSAGES)


# -- API keys --------------------------------------------------------------------------------


def test_api_key_on_http(server):
    body = {"model": "tiny", "prompt": "Alice", "max_tokens": 2}
    for key in (None, "wrong"):
        status, error = http(server, "POST", "/v1/completions", body, key=key)
        assert status == 401 and error["error"]["code"] == "invalid_api_key"
    assert http(server, "GET", "/v1/models", key="wrong")[0] == 401
    assert http(server, "POST", "/v1/completions", body)[0] == 200
    with pytest.raises(openai.AuthenticationError):
        url = f"http://localhost:{server.deployment.http_port}/v1"
        openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
    # Without a configured key no header is needed (a second server on the same router).
    from router.openai_api import start_openai_server

    open_server = server.run(start_openai_server(server.deployment.router, "127.0.0.1", 0))
    try:
        url = f"http://127.0.0.1:{open_server.port}/v1/completions"
        request = urllib.request.Request(
            url, json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request) as r:
            assert r.status == 200
    finally:
        server.run(open_server.stop())


def test_api_key_on_grpc(server, capsys):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from deploy.cli import main

    request = serving_pb2.GenerateRequest(
        prompt_token_ids=[5, 6, 7], sampling=serving_pb2.SamplingParams(max_tokens=2)
    )
    for metadata in (None, [("authorization", "Bearer wrong")]):
        with pytest.raises(grpc.RpcError) as err:
            list(server.stub.Generate(request, timeout=10, metadata=metadata))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:
        server.stub.ListModels(serving_pb2.ListModelsRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    messages = list(
        server.stub.Generate(request, timeout=10, metadata=[("authorization", f"Bearer {KEY}")])
    )
    assert messages[-1].finish_reason == "length" and messages[-1].usage.completion_tokens == 2
    health = health_pb2_grpc.HealthStub(server.channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING  # open without a key

    target = f"localhost:{server.deployment.grpc_port}"
    assert main(["generate", "--target", target, "--max-tokens", "2", "Alice"]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert main(["generate", "--target", target, "--api-key", KEY, "--max-tokens", "2", "A"]) == 0


# -- cancellation ------------------------------------------------------------------------------


def test_client_disconnect_aborts_the_request(server, client, monkeypatch):
    router = server.deployment.router
    finished = []  # per request: did it run to its finish_reason?
    generate = router.generate

    async def spy(req):
        chunks, done = generate(req), False
        try:
            async for chunk in chunks:
                done = done or chunk.finish_reason is not None
                yield chunk
        finally:
            await chunks.aclose()
            finished.append(done)

    monkeypatch.setattr(router, "generate", spy)
    prompt = random_prompts([150], seed=41)[0]
    request = {"model": "tiny", "prompt": prompt, "max_tokens": 256, **GREEDY}
    stream = client.completions.create(stream=True, **request)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    with pytest.raises(openai.APITimeoutError):  # not streaming: the client gives up waiting
        client.with_options(timeout=0.25).completions.create(**request)
    deadline = time.monotonic() + 20
    while len(finished) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert finished == [False, False]
    stats = server.wait_all_blocks_free()
    assert all(s["num_running"] == 0 for s in stats.values())


def test_structured_output(client, llm, model_dir):
    """response_format (json_object, json_schema) on chat, vLLM's guided_* on completions."""
    from tests.test_structured_output import SCHEMAS

    jsonschema = pytest.importorskip("jsonschema")
    schema = SCHEMAS[0]
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
    for stream in (False, True):
        result = client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=160, temperature=0.0,
            response_format=response_format, stream=stream,
        )  # fmt: skip
        if stream:
            text = "".join(c.choices[0].delta.content or "" for c in result if c.choices)
        else:
            text = result.choices[0].message.content
            assert result.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(text), schema)
    result = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=100, response_format={"type": "json_object"}
    )
    assert isinstance(json.loads(result.choices[0].message.content), dict)
    choices = ["positive", "negative", "neutral"]
    result = client.completions.create(
        model="tiny", prompt="Alice was", max_tokens=20, extra_body={"guided_choice": choices}
    )
    assert result.choices[0].text in choices and result.choices[0].finish_reason == "stop"
    want = llm.generate("Alice was", greedy(max_tokens=20, regex="[0-9]{3}-[0-9]{4}"))[0].text
    result = client.completions.create(
        model="tiny", prompt="Alice was", max_tokens=20, temperature=0.0,
        extra_body={"guided_regex": "[0-9]{3}-[0-9]{4}"},
    )  # fmt: skip
    assert result.choices[0].text == want and len(want) == 8
