"""The handoff at engine level: a prefill engine computes the prompt and copies KV layer by layer
into blocks a decode engine reserved; decoding there gives the single-engine tokens."""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from engine.kv_connector import KVConnector
from tests.helpers import PROMPT_LENGTHS, random_prompts


class CopyConnector(KVConnector):
    """An in-process stand-in for kvtransfer: copies each finished layer into the peer's cache."""

    def __init__(self, src_caches, dst_caches):
        self.src, self.dst = src_caches, dst_caches
        self.targets: dict[str, list[int]] = {}  # request id -> decode-side block ids
        self.active: list[tuple[list[int], list[int]]] = []
        self.layers_sent = 0

    def on_step_start(self, sched):
        self.active = [
            (s.block_ids, self.targets.pop(s.request.request_id))
            for s in sched.scheduled
            if s.samples and s.request.request_id in self.targets
        ]
        return bool(self.active)

    def on_layer_done(self, layer_idx):
        for src_blocks, dst_blocks in self.active:
            self.dst[layer_idx][:, dst_blocks] = self.src[layer_idx][:, src_blocks]
            self.layers_sent += 1

    def on_step_end(self, sched):
        self.active = []


@pytest.mark.parametrize("seeded", [False, True])
def test_handoff_matches_single_engine(model_dir, seeded):
    prompts = random_prompts(PROMPT_LENGTHS, seed=21)
    if seeded:
        params = [
            SamplingParams(max_tokens=10, temperature=0.8, seed=i, ignore_eos=True)
            for i in range(16)
        ]
    else:
        params = [SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)] * 16
    expected = [o.token_ids for o in LLM(model_dir, num_blocks=512).generate(prompts, params)]

    prefill = LLM(model_dir, num_blocks=256, max_num_batched_tokens=64)
    decode = LLM(model_dir, num_blocks=256, max_num_batched_tokens=64)
    connector = CopyConnector(prefill.engine.runner.kv_caches, decode.engine.runner.kv_caches)
    prefill.engine.runner.kv_connector = connector
    results = {}
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        rid = f"r{i}"
        block_ids = decode.engine.reserve(rid, prompt, p)
        assert block_ids is not None
        connector.targets[rid] = block_ids
        first = prefill.engine.make_request(
            rid, prompt, SamplingParams(**{**p.__dict__, "max_tokens": 1})
        )
        prefill.engine.enqueue(*first)
    firsts = {}
    while prefill.engine.has_unfinished_requests():
        for out in prefill.engine.step():
            firsts[out.request_id] = out.token_ids[0]
    assert connector.layers_sent == 16 * 2  # every request, every layer, sent once
    for rid, token in firsts.items():
        assert decode.engine.admit_prefilled(rid, token) is None
        results[rid] = [token]
    while decode.engine.has_unfinished_requests():
        for out in decode.engine.step():
            results[out.request_id].extend(out.new_token_ids)
    assert [results[f"r{i}"] for i in range(16)] == expected
    for llm in (prefill, decode):
        kv = llm.engine.kv_manager
        assert kv.num_free_blocks == kv.num_blocks


def test_release_returns_reserved_blocks(model_dir):
    decode = LLM(model_dir, num_blocks=32)
    assert decode.engine.reserve("a", [5] * 100, SamplingParams(max_tokens=4)) is not None
    assert decode.engine.kv_manager.num_free_blocks == 32 - 7
    assert decode.engine.reserve("b", [5] * 500, SamplingParams(max_tokens=4)) is None
    decode.engine.release("a")
    assert decode.engine.kv_manager.num_free_blocks == 32
    assert not decode.engine.has_unfinished_requests()


def test_reservations_leave_room_for_the_running_batch(model_dir):
    """A reservation never takes the block a running request needs next (that used to make the
    decode engine preempt its whole batch and stop with 'no progress')."""
    decode = LLM(model_dir, num_blocks=8)
    engine = decode.engine
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    assert engine.reserve("a", [5] * 63, params) is not None  # 4 blocks, full after token 1
    assert engine.admit_prefilled("a", 7) is None
    # 4 blocks free; "b" would take all 4 and leave "a" nothing to grow into.
    assert engine.reserve("b", [6] * 64, params) is None
    assert engine.reserve("c", [6] * 40, params) is not None  # 3 blocks: 1 left for "a"
    tokens = []
    while "a" in engine.scheduler.requests:
        for out in engine.step():
            tokens.extend(out.new_token_ids)
    assert len(tokens) == 9  # the rest of "a" decoded while "c" waited for its KV
    engine.release("c")
    assert engine.kv_manager.num_free_blocks == 8
