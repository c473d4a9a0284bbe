"""Bad input, fuzzed with hypothesis against a CPU deployment (1 prefill + 1 decode worker) over
gRPC and HTTP: random strings and bytes, huge, negative and non-finite numbers, invalid UTF-8,
enormous prompts, thousands of stop strings, unknown fields. Every case gets a clear error or a
valid answer, never a hang or a 5xx; afterwards every worker answers its ping and every block
is back in its pool.

The examples are derandomized, so CI sees the same ones every run; set BATON_FUZZ_EXAMPLES=N to
draw N fresh random examples per test instead."""

from __future__ import annotations

import http.client
import json
import math
import os
import urllib.error
import urllib.request

import grpc
import pytest

from proto import serving_pb2
from tests.test_serving import Server

ray = pytest.importorskip("ray")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, currently_in_test_context, example, given, settings  # noqa: E402
from hypothesis import event as hypothesis_event  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_EXAMPLES = os.environ.get("BATON_FUZZ_EXAMPLES")
FUZZ = settings(
    max_examples=int(_EXAMPLES or 40),
    derandomize=_EXAMPLES is None,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
MAX_REQUEST_BYTES = 1 << 20
GRPC_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,  # a message over max_request_bytes
}


@pytest.fixture(scope="module")
def server(model_dir):
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    s = Server(
        model_dir,
        num_prefill=1,
        num_decode=1,
        tier={"default_max_tokens": 4, "max_tokens_limit": 16},
        config={"max_request_bytes": MAX_REQUEST_BYTES},
    )
    yield s
    s.close()
    if started_ray:
        ray.shutdown()


@pytest.fixture(autouse=True)
def nothing_crashed_or_leaked(server):
    yield
    for actor in server.deployment.actors.values():
        ray.get(actor.ping.remote(), timeout=10)  # raises if the engine loop died
    assert all(w.alive and w.restarts == 0 for w in server.deployment.router.workers)
    server.wait_all_blocks_free()


# -- gRPC ----------------------------------------------------------------------------------

floats32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
uint32 = st.integers(0, 2**32 - 1)
small_or_huge = st.one_of(st.integers(0, 20), uint32)
sampling = st.fixed_dictionaries(
    {},
    optional={
        "max_tokens": st.one_of(st.integers(0, 8), uint32),
        "temperature": floats32,
        "top_p": floats32,
        "top_k": st.integers(-(2**31), 2**31 - 1),
        "seed": st.integers(0, 2**64 - 1),
        "stop": st.lists(st.text(max_size=20), max_size=4),
        "ignore_eos": st.booleans(),
        "min_p": floats32,
        "repetition_penalty": floats32,
        "presence_penalty": floats32,
        "frequency_penalty": floats32,
        "stop_token_ids": st.lists(uint32, max_size=4),
        "logprobs": small_or_huge,
        "include_stop_str_in_output": st.booleans(),
    },
)
# Requests a client might well send: every value in range, odd ones included (any Unicode,
# NUL bytes, stop strings that match at once, every sampling knob at its edges).
plausible_sampling = st.fixed_dictionaries(
    {"max_tokens": st.integers(1, 8)},
    optional={
        "temperature": st.floats(0, 5, width=32),
        "top_p": st.floats(0.0625, 1, width=32),
        "top_k": st.integers(-1, 600),
        "seed": st.integers(0, 2**64 - 1),
        "stop": st.lists(st.text(min_size=1, max_size=10), max_size=4),
        "ignore_eos": st.booleans(),
        "min_p": st.floats(0, 1, width=32),
        "repetition_penalty": st.floats(0.125, 3, width=32),
        "presence_penalty": st.floats(-2, 2, width=32),
        "frequency_penalty": st.floats(-2, 2, width=32),
        "stop_token_ids": st.lists(st.integers(0, 600), max_size=4),
        "logprobs": st.integers(0, 20),
        "include_stop_str_in_output": st.booleans(),
    },
)
plausible_grpc = st.fixed_dictionaries(
    {"sampling": plausible_sampling},
    optional={"model": st.sampled_from(["", "auto", "tiny"]), "request_id": st.text(max_size=20)},
).flatmap(
    lambda fields: st.one_of(
        st.fixed_dictionaries({"prompt": st.text(min_size=1, max_size=300)}),
        st.fixed_dictionaries({"prompt_token_ids": st.lists(st.integers(0, 511), min_size=1)}),
    ).map(lambda prompt: {**fields, **prompt})
)
wild_grpc = st.fixed_dictionaries(
    {},
    optional={
        "prompt": st.text(max_size=300),
        "prompt_token_ids": st.lists(small_or_huge, max_size=40),
        "sampling": sampling,
        "model": st.sampled_from(["", "auto", "tiny"]) | st.text(max_size=30),
        "request_id": st.text(max_size=20) | st.text(min_size=300, max_size=400),
        "ttft_slo_ms": floats32,
        "itl_slo_ms": floats32,
        "min_quality": floats32,
        "max_cost": st.floats(allow_nan=True, allow_infinity=True),
    },
)
grpc_requests = plausible_grpc | wild_grpc


def event(outcome: str) -> None:
    """Count outcomes (`--hypothesis-show-statistics` shows the mix of answers and errors)."""
    if currently_in_test_context():
        hypothesis_event(outcome)


def call_grpc(server, request: serving_pb2.GenerateRequest, raw: bytes | None = None):
    """Returns the messages, or the RpcError; checks either is well formed."""
    if raw is None:
        call = server.stub.Generate(request, timeout=30)
    else:
        generate = server.channel.unary_stream(
            "/baton.v1.Baton/Generate",
            request_serializer=lambda b: b,
            response_deserializer=serving_pb2.GenerateResponse.FromString,
        )
        call = generate(raw, timeout=30)
    try:
        messages = list(call)
    except grpc.RpcError as e:
        assert e.code() != grpc.StatusCode.DEADLINE_EXCEEDED, "the request hung"
        event(f"gRPC {e.code().name}")
        return e
    event("gRPC OK")
    assert messages and messages[-1].finish_reason in ("stop", "length")
    assert 1 <= messages[-1].usage.completion_tokens <= 256
    return messages


def build_request(fields: dict) -> serving_pb2.GenerateRequest:
    fields = dict(fields)
    sp = serving_pb2.SamplingParams(**fields.pop("sampling", {}))
    return serving_pb2.GenerateRequest(sampling=sp, **fields)


# Enormous inputs, one by one (hypothesis would print megabytes when one fails).
ENORMOUS_GRPC = {
    "prompt text": ({"prompt": "x" * 200_000}, "characters"),
    "prompt ids": ({"prompt_token_ids": [7] * 200_000}, "context"),
    "5000 stops": ({"prompt": "a", "sampling": {"stop": ["s"] * 5000}}, "stop strings"),
    "huge stop": ({"prompt": "a", "sampling": {"stop": ["s" * 100_000]}}, "stop strings"),
    "5000 stop ids": ({"prompt": "a", "sampling": {"stop_token_ids": [3] * 5000}}, "stop token"),
    "huge request id": ({"prompt": "a", "request_id": "r" * 100_000}, "request_id"),
    "over the message limit": ({"prompt": "a" * (MAX_REQUEST_BYTES + 10)}, "larger than max"),
}


@pytest.mark.parametrize("case", ENORMOUS_GRPC)
def test_grpc_enormous_inputs_get_clear_errors(server, case):
    fields, match = ENORMOUS_GRPC[case]
    result = call_grpc(server, build_request(fields))
    assert isinstance(result, grpc.RpcError)
    assert result.code() in GRPC_ERRORS and match in result.details(), result.details()[:200]


@FUZZ
@given(fields=grpc_requests)
@example(fields={"prompt": "a", "sampling": {"temperature": math.nan}})
@example(fields={"prompt": "a", "sampling": {"temperature": 1e-38, "repetition_penalty": 1e38}})
@example(fields={"prompt": "a", "sampling": {"top_k": 2**31 - 1, "seed": 2**64 - 1}})
@example(fields={"prompt": "a", "ttft_slo_ms": math.inf, "max_cost": -1.0})
def test_grpc_fuzzed_requests_get_a_clear_status_or_an_answer(server, fields):
    result = call_grpc(server, build_request(fields))
    if isinstance(result, grpc.RpcError):
        assert result.code() in GRPC_ERRORS, (result.code(), result.details())
        assert result.details()


def with_unknown_field(request: bytes, tag: int, payload: bytes) -> bytes:
    """Append a length-delimited field of an unknown number (proto3 keeps and ignores it)."""
    key = (tag << 3) | 2

    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)

    return request + varint(key) + varint(len(payload)) + payload


@FUZZ
@given(raw=st.binary(max_size=200), tag=st.integers(100, 10_000), payload=st.binary(max_size=50))
def test_grpc_random_bytes_and_unknown_fields(server, raw, tag, payload):
    # Undecodable bytes get INVALID_ARGUMENT; others decode as some request, answered as one.
    result = call_grpc(server, None, raw)
    if isinstance(result, grpc.RpcError):
        assert result.code() in GRPC_ERRORS, result.details()
    # A valid request with an unknown field is served as if the field were not there.
    valid = serving_pb2.GenerateRequest(
        prompt_token_ids=[5, 6, 7], sampling=serving_pb2.SamplingParams(max_tokens=2)
    ).SerializeToString()
    result = call_grpc(server, None, with_unknown_field(valid, tag, payload))
    assert not isinstance(result, grpc.RpcError), result.details()


# -- HTTP ----------------------------------------------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
)
anything = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)
lone_surrogates = st.sampled_from(["\ud800", "a\udfffb", "\udbff"])
texts = st.text(max_size=100) | lone_surrogates
sampling_fields = {
    "model": st.sampled_from(["", "tiny", "auto"]) | st.text(max_size=20),
    "max_tokens": st.integers(-3, 8) | st.integers(-(2**70), 2**70) | anything,
    "temperature": st.floats(allow_nan=True, allow_infinity=True) | anything,
    "top_p": st.floats(allow_nan=True, allow_infinity=True),
    "top_k": st.integers(-(2**70), 2**70),
    "min_p": st.floats(allow_nan=True, allow_infinity=True),
    "seed": st.integers(-(2**70), 2**70),
    "stop": texts | st.lists(texts, max_size=4) | anything,
    "stop_token_ids": st.lists(st.integers(-(2**70), 2**70), max_size=4),
    "presence_penalty": st.floats(allow_nan=True, allow_infinity=True),
    "repetition_penalty": st.floats(allow_nan=True, allow_infinity=True),
    "n": st.integers(-2, 3),
    "stream": st.booleans(),
    "ignore_eos": st.booleans() | anything,
    "logit_bias": anything,
    "stream_options": anything,
    "unknown_field": anything,
}
plausible_fields = {
    "model": st.sampled_from(["", "tiny"]),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "top_k": st.integers(-1, 600),
    "seed": st.integers(-(2**63), 2**64 - 1),
    "stop": texts.filter(bool) | st.lists(st.text(min_size=1, max_size=10), max_size=4),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "ignore_eos": st.booleans(),
    "unknown_field": anything,
}
plausible_completions = st.fixed_dictionaries(
    {
        "prompt": st.text(min_size=1, max_size=200) | st.lists(st.integers(0, 511), min_size=1),
        "max_tokens": st.integers(1, 8),
    },
    optional={**plausible_fields, "logprobs": st.integers(0, 5)},
)
plausible_chat = st.fixed_dictionaries(
    {
        "messages": st.lists(
            st.fixed_dictionaries(
                {"role": st.just("user"), "content": st.text(min_size=1, max_size=100)}
            ),
            min_size=1,
            max_size=3,
        ),
        "max_tokens": st.integers(1, 8),
    },
    optional={**plausible_fields, "logprobs": st.booleans()},
)
completion_bodies = plausible_completions | st.fixed_dictionaries(
    {},
    optional={
        **sampling_fields,
        "prompt": texts
        | st.lists(st.integers(-(2**70), 2**70), max_size=20)
        | st.lists(texts, max_size=2)
        | anything,
        "logprobs": st.integers(-5, 30),
        "echo": st.booleans(),
    },
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant"]) | st.text(max_size=10)},
        optional={"content": texts | anything, "name": texts},
    ),
    max_size=4,
)
chat_bodies = plausible_chat | st.fixed_dictionaries(
    {},
    optional={
        **sampling_fields,
        "messages": messages | anything,
        "max_completion_tokens": st.integers(-3, 8),
        "logprobs": st.booleans() | anything,
        "top_logprobs": st.integers(-5, 30),
        "chat_template_kwargs": anything,
        "response_format": anything,
        "tools": anything,
    },
)


def post(server, path: str, body: bytes) -> tuple[int, bytes]:
    url = f"http://localhost:{server.deployment.http_port}{path}"
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def check_http(status: int, raw: bytes) -> None:
    event(f"HTTP {status}")
    assert status in (200, 400, 404, 413), (status, raw[:300])
    if status != 200:
        error = json.loads(raw)["error"]
        assert error["message"] and error["type"] == "invalid_request_error", error
        return
    if raw.startswith(b"data: "):  # a stream: events, then [DONE]
        events = [line[6:] for line in raw.decode().split("\n\n") if line.startswith("data: ")]
        assert events[-1] == "[DONE]", events[-3:]
        events = [json.loads(e) for e in events[:-1]]
        assert not any("error" in e for e in events), events[-1]
        reasons = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
        assert len(reasons) == 1 and reasons[0] in ("stop", "length"), events[-2:]
        return
    assert json.loads(raw)["choices"][0]["finish_reason"] in ("stop", "length")


def dumps(body) -> bytes:
    # NaN and Infinity as Python writes them (not JSON, but what a careless client sends);
    # lone surrogates as \\u escapes.
    return json.dumps(body).encode()


ENORMOUS_HTTP = {
    "prompt text": ("/v1/completions", {"prompt": "x" * 200_000}, "characters"),
    "prompt ids": ("/v1/completions", {"prompt": [7] * 100_000}, "context"),
    "5000 stops": ("/v1/completions", {"prompt": "a", "stop": ["s"] * 5000}, "stop strings"),
    "huge stop": ("/v1/completions", {"prompt": "a", "stop": "s" * 100_000}, "stop strings"),
    "chat message": (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x" * 200_000}]},
        "characters",
    ),
    "nesting": ("/v1/completions", "[" * 100_000 + "]" * 100_000, "body"),
}


@pytest.mark.parametrize("case", ENORMOUS_HTTP)
def test_http_enormous_inputs_get_clear_errors(server, case):
    path, body, match = ENORMOUS_HTTP[case]
    status, raw = post(server, path, body.encode() if isinstance(body, str) else dumps(body))
    check_http(status, raw)
    assert status == 400 and match in json.loads(raw)["error"]["message"]


def test_http_body_over_the_limit_is_refused_before_it_is_read(server):
    connection = http.client.HTTPConnection("localhost", server.deployment.http_port, timeout=30)
    connection.putrequest("POST", "/v1/completions")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(MAX_REQUEST_BYTES + 1))
    connection.endheaders()  # and no body: the answer must not wait for it
    response = connection.getresponse()
    assert response.status == 413
    assert "request body is over" in json.loads(response.read())["error"]["message"]
    connection.close()


@FUZZ
@given(body=completion_bodies)
@example(body={"prompt": "a", "temperature": math.nan, "top_p": math.inf})
@example(body={"prompt": "\ud800", "stop": "\udfff"})
@example(body={"prompt": "a", "top_k": 2**70, "seed": -(2**70)})
@example(body={"prompt": "a", "max_tokens": 2**70})
def test_http_fuzzed_completions(server, body):
    check_http(*post(server, "/v1/completions", dumps(body)))


@FUZZ
@given(body=chat_bodies)
@example(body={"messages": [{"role": "user", "content": "\ud800"}]})
@example(body={"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": [1]})
def test_http_fuzzed_chat(server, body):
    check_http(*post(server, "/v1/chat/completions", dumps(body)))


@FUZZ
@given(raw=st.binary(max_size=300))
@example(raw=b'{"prompt": "\xff\xfe", "max_tokens": 2}')  # invalid UTF-8 inside JSON
def test_http_random_bytes(server, raw):
    for path in ("/v1/completions", "/v1/chat/completions"):
        check_http(*post(server, path, raw))
