"""The serving identity test on GPUs: KV pages over NCCL between a prefill and a decode worker,
each a Ray actor on its own GPU. Run on a machine with two GPUs: `pytest -m gpu`."""

from __future__ import annotations

import concurrent.futures

import pytest
import torch

from engine import LLM, SamplingParams
from tests.helpers import random_prompts
from tests.test_serving import MAX_TOKENS, Server, generate

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs"),
]
ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_gpus():
    ray.init(
        num_cpus=8, num_gpus=torch.cuda.device_count(), include_dashboard=False, log_to_driver=False
    )
    yield
    ray.shutdown()


def test_nccl_handoff_matches_engine(ray_gpus, model_dir):
    server = Server(
        model_dir, num_prefill=1, num_decode=1, resources={"CPU": 1, "GPU": 1}, http_port=None
    )
    try:
        shared = random_prompts([48], seed=40)[0]
        suffixes = random_prompts([1 + (i * 37) % 200 for i in range(32)], seed=41)
        prompts = [(shared + s if i % 2 else s)[:400] for i, s in enumerate(suffixes)]
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
        llm = LLM(model_dir, num_blocks=512, device="cuda", dtype="float32")
        expected = [o.token_ids for o in llm.generate(prompts, params)]
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            results = list(pool.map(lambda p: generate(server.stub, p), prompts))
        assert [tokens for tokens, _ in results] == expected
        stats = server.wait_all_blocks_free()
        assert sum(s.get("prefix_cache_hit_tokens", 0) for s in stats.values()) > 0
    finally:
        server.close()
