"""Speculative decoding through the disaggregated path: gRPC → router → prefill worker → gloo KV
transfer → decode worker, whose tier runs a draft model (the prefill worker loads none; the
decode worker prefills the draft itself). Greedy tokens equal a deployment without speculation;
both of the decode worker's pools are whole afterwards."""

from __future__ import annotations

import concurrent.futures

import pytest

from engine.testing import write_draft_pair
from tests.helpers import random_prompts
from tests.test_serving import Server, generate
from tests.test_speculative_draft import LATER_LAYER_SCALE

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_draft_speculation_on_decode_workers(ray_local, tmp_path):
    target, draft = write_draft_pair(tmp_path, 1, LATER_LAYER_SCALE, num_hidden_layers=3)
    prompts = random_prompts([1, 17, 40, 90, 150, 33], seed=41)
    prompts += [(p * 5)[:80] for p in random_prompts([9, 13], seed=42)]
    speculative = {
        "method": "draft",
        "model": str(draft),
        "num_speculative_tokens": 3,
        # Static: every decode step proposes. The dynamic rule decides from measured step
        # times, which on a loaded CI machine may rightly turn speculation off (seen once).
        "adaptive": False,
    }
    results = {}
    for name, engine_args in (("plain", {}), ("spec", {"speculative": speculative})):
        server = Server(target, num_prefill=1, num_decode=1, engine_args=engine_args)
        try:
            with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
                outputs = list(
                    pool.map(generate, [server.stub] * len(prompts), prompts, [16] * len(prompts))
                )
            results[name] = [tokens for tokens, _ in outputs]
            stats = server.wait_all_blocks_free()
            decode = stats["tiny-decode-0"]
            if name == "spec":
                assert decode["num_accepted_tokens"] > 0.3 * decode["num_draft_tokens"] > 0
                assert decode["num_free_draft_blocks"] == decode["num_draft_blocks"] > 0
            else:
                assert decode["num_draft_tokens"] == 0
        finally:
            server.close()
    assert results["spec"] == results["plain"]
    assert all(len(tokens) == 16 for tokens in results["spec"])
