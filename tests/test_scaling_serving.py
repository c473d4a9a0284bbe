"""Scaling a running deployment on CPU, end to end: Ray actors, gloo KV transfer, the admin gRPC
service and the `baton` CLI. One deployment (1 prefill + 1 decode) goes through a scale-up, a
role switch whose drain times out under load, and a scale-down with requests in flight; every
greedy output must equal `engine.LLM`'s and every KV block must come back."""

from __future__ import annotations

import concurrent.futures
import json
import re
import urllib.request

import grpc
import pytest

from engine import LLM
from proto import admin_pb2, admin_pb2_grpc, serving_pb2
from tests.helpers import greedy, random_prompts
from tests.test_serving import Server

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def server(model_dir):
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    # round_robin: consecutive requests alternate between a role's instances, so the test
    # knows which worker serves what, however the requests' timings fall on a loaded machine.
    s = Server(model_dir, num_prefill=1, num_decode=1, http_port=None,
               config={"placement": "round_robin"})  # fmt: skip
    yield s
    s.close()
    ray.shutdown()


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, num_blocks=512)


def start_streams(stub, prompts, max_tokens):
    """Start the requests; return each call with its first message (every one is streaming)."""
    calls = []
    for prompt in prompts:
        sp = serving_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        request = serving_pb2.GenerateRequest(prompt_token_ids=prompt, sampling=sp)
        calls.append(stub.Generate(request, timeout=120))
    return [(call, next(call)) for call in calls]


def finish(streams) -> list[tuple[list[int], serving_pb2.GenerateResponse]]:
    out = []
    for call, first in streams:
        messages = [first, *call]
        out.append(([t for m in messages for t in m.token_ids], messages[-1]))
    return out


def serve_concurrently(stub, prompts, max_tokens):
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(lambda p: finish(start_streams(stub, [p], max_tokens))[0], prompts))


def pools(response) -> dict[str, int]:
    return {p.name: p.count for p in response.pools}


def test_scale_up_switch_role_and_scale_down_under_load(server, llm):
    admin = admin_pb2_grpc.AdminStub(server.channel)

    # 1. One more decode worker: the router places on it once it answers its ping.
    added = admin.ScalePool(admin_pb2.ScalePoolRequest(pool="tiny-decode", count=2), timeout=120)
    assert list(added.added) == ["tiny-decode-1"]
    assert pools(added) == {"tiny-prefill": 1, "tiny-decode": 2}
    prompts = random_prompts([20, 45, 70, 95], seed=60)
    results = serve_concurrently(server.stub, prompts, 10)
    assert [tokens for tokens, _ in results] == greedy(llm, prompts, 10)
    assert {last.decode_instance for _, last in results} == {"tiny-decode-0", "tiny-decode-1"}

    # 2. tiny-decode-0 becomes a prefill worker while four long streams run, two of them on
    # it. Its engine is held up, so they outlive the drain and move to tiny-decode-1.
    prompts = random_prompts([30, 60, 90, 120], seed=61)
    streams = start_streams(server.stub, prompts, 120)
    ray.get(server.deployment.actors["tiny-decode-0"].debug_hang.remote(1.5))
    request = admin_pb2.SwitchRoleRequest(worker_id="tiny-decode-0", drain_timeout_s=0.2)
    switched = admin.SwitchRole(request, timeout=120)
    results = finish(streams)
    assert [tokens for tokens, _ in results] == greedy(llm, prompts, 120)
    moved = [last for _, last in results if last.timings.attempts > 1]
    assert len(moved) == 2 and {last.decode_instance for last in moved} == {"tiny-decode-1"}
    [(old, new, role)] = [(s.from_worker_id, s.to_worker_id, s.to_role) for s in switched.switched]
    assert (old, new, role) == ("tiny-decode-0", "tiny-prefill-1", "prefill")
    [removal] = switched.removed
    assert (removal.worker_id, removal.moved, removal.finished) == ("tiny-decode-0", 2, 0)
    assert removal.num_free_blocks == removal.num_blocks > 0  # every block came back
    assert pools(switched) == {"tiny-prefill": 2, "tiny-decode": 1}
    listed = {w.worker_id: w for w in admin.ListWorkers(admin_pb2.ListWorkersRequest()).workers}
    assert set(listed) == {"tiny-prefill-0", "tiny-prefill-1", "tiny-decode-1"}
    assert listed["tiny-prefill-1"].replaced == "tiny-decode-0"
    assert listed["tiny-prefill-1"].resources["CPU"] == 1.0
    assert listed["tiny-prefill-1"].node_id == listed["tiny-decode-1"].node_id != ""

    # The new prefill worker serves; its pairs with the decode worker form on first use.
    prompts = random_prompts([25, 50, 75, 100], seed=62)
    results = serve_concurrently(server.stub, prompts, 10)
    assert [tokens for tokens, _ in results] == greedy(llm, prompts, 10)
    assert {last.prefill_instance for _, last in results} == {"tiny-prefill-0", "tiny-prefill-1"}

    # 3. Back to one prefill worker with requests in flight: they finish in the drain.
    prompts = random_prompts([40 + 13 * i for i in range(8)], seed=63)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(serve_concurrently, server.stub, prompts, 40)
        request = admin_pb2.ScalePoolRequest(pool="tiny-prefill", count=1, drain_timeout_s=30)
        shrunk = admin.ScalePool(request, timeout=120)
        results = running.result()
    assert [tokens for tokens, _ in results] == greedy(llm, prompts, 40)
    [removal] = shrunk.removed
    assert removal.moved == 0 and removal.num_free_blocks == removal.num_blocks > 0
    assert pools(shrunk) == {"tiny-prefill": 1, "tiny-decode": 1}
    stats = server.wait_all_blocks_free()
    assert len(stats) == 2 and all(s["num_running"] == 0 for s in stats.values())

    # Metrics follow: the pools' gauge, and no series of the removed workers.
    url = f"http://localhost:{server.deployment.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    assert 'baton_pool_workers{role="decode",state="serving",tier="tiny"} 1.0' in text
    instances = set(re.findall(r'instance="([^"]+)"', text))
    assert "tiny-decode-0" not in instances and removal.worker_id not in instances
    assert len(server.deployment.actors) == 2


def test_cli_lists_scales_and_applies_a_plan(server, tmp_path, capsys):
    from deploy.cli import main

    target = f"localhost:{server.deployment.grpc_port}"
    before = {w.worker_id for w in server.deployment.router.workers}
    assert main(["workers", "--target", target]) == 0
    assert "serving" in capsys.readouterr().out
    assert main(["scale", "--target", target, "--pool", "tiny-decode", "--count", "1"]) == 0
    assert "nothing to change" in capsys.readouterr().out
    assert main(["scale", "--target", target, "--pool", "tiny-decode", "--count", "-2"]) == 1
    assert "INVALID_ARGUMENT: count must be >= 0" in capsys.readouterr().err
    # A plan within 2 GPUs is 1 + 1: what the deployment runs now.
    profile = tmp_path / "profile.json"
    profile.write_text(
        json.dumps({"prefill": [0.0, 1e-3, 0.0], "decode": [0.01, 1e-3, 0.0],
                    "transfer": [0.0, 0.0, 0.0]})
    )  # fmt: skip
    argv = ["plan", "--profile", str(profile), "--max-gpus", "2", "--input-len", "100"]
    argv += ["--output-len", "20", "--num-requests", "50", "--min-duration-s", "5"]
    argv += ["--apply", "--target", target]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "applying 1 prefill + 1 decode" in out and "nothing to change" in out
    assert {w.worker_id for w in server.deployment.router.workers} == before


def test_admin_rpcs_refuse_what_would_leave_a_role_without_workers(server):
    admin = admin_pb2_grpc.AdminStub(server.channel)
    worker = next(w for w in server.deployment.router.workers if w.role == "prefill")
    with pytest.raises(grpc.RpcError) as err:
        admin.SwitchRole(admin_pb2.SwitchRoleRequest(worker_id=worker.worker_id), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "last serving prefill worker" in err.value.details()
