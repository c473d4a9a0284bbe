"""Speculative decoding on one GPU with CUDA graphs (`pytest -m gpu`): verify steps (d + 1 decode
rows a request, engine/decode_graphs.py) and the draft model's passes replay decode graphs, and
greedy tokens in float32 equal plain decoding's, with graphs and eagerly; with attention sinks
too (the Triton sink kernel, each row its own window), against the streaming reference."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.testing import write_draft_pair
from tests.test_attention_sinks import StreamingReference, sink_llm
from tests.test_correctness import assert_pool_whole
from tests.test_sliding_window import run_checked
from tests.test_speculative_rows import PROMPTS, repeating_prompts

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

GREEDY = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
K = 3


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return write_draft_pair(tmp_path_factory.mktemp("gpu_pair"), 1, 0.1, num_hidden_layers=3)


def gpu_llm(model_dir, eager=False, **kwargs):
    return LLM(model_dir, device="cuda", dtype="float32", enforce_eager=eager, **kwargs)


def count_replays(graphs, counts: dict, key: str) -> None:
    """Counts `graphs`' replays in counts[key], and those of more rows than `max_num_seqs`
    (only a verify step has them) in counts[key + ">seqs"]."""
    replay = graphs.replay
    counts[key] = counts[key + ">seqs"] = 0

    def counted(size, input_ids, positions, meta):
        counts[key] += 1
        counts[key + ">seqs"] += meta.num_seqs > counts["max_num_seqs"]
        return replay(size, input_ids, positions, meta)

    graphs.replay = counted


def count_verify_replays(llm, counts: dict) -> None:
    """counts["verify"]: the target's graph replays in steps that verified drafts."""
    runner = llm.engine.runner
    launch, replay = runner.launch, runner.graphs.replay
    counts["verify"], verifying = 0, [False]

    def counted_launch(sched, prev=None):
        verifying[0] = any(s.spec_token_ids for s in sched.scheduled)
        return launch(sched, prev)

    def counted_replay(*args):
        counts["verify"] += verifying[0]
        return replay(*args)

    runner.launch, runner.graphs.replay = counted_launch, counted_replay


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_verify_and_draft_steps_replay_graphs(pair, method):
    """Static k = 3 at batch 8: verify steps of up to 32 rows replay the buckets past 8 (the
    graphs cover speculation's rows), the draft's passes replay its own graphs; tokens equal
    plain decoding, with graphs and eagerly."""
    prompts = repeating_prompts([8, 12, 20, 9], seed=21) + PROMPTS[-4:]
    expected = [o.token_ids for o in gpu_llm(pair[0], num_blocks=512).generate(prompts, GREEDY)]
    config = {"method": method, "num_speculative_tokens": K, "adaptive": False}
    if method == "draft":
        config["model"] = str(pair[1])
    results = []
    for eager in (False, True):
        llm = gpu_llm(pair[0], eager, num_blocks=512, max_num_seqs=8, speculative_config=config)
        counts = {"max_num_seqs": 8}
        engine = llm.engine
        if not eager:
            assert engine.runner.graphs.sizes == [1, 2, 4, 8, 16, 32]  # 8 requests x (k + 1)
            count_verify_replays(llm, counts)
            count_replays(engine.runner.graphs, counts, "target")
            if method == "draft":
                assert engine.drafter.graphs.sizes == [1, 2, 4, 8, 16, 32]
                count_replays(engine.drafter.graphs, counts, "draft")
        else:
            assert engine.runner.graphs is None
            assert engine.drafter is None or engine.drafter.graphs is None
        results.append([o.token_ids for o in llm.generate(prompts, GREEDY)])
        assert 0 < engine.num_accepted_tokens <= engine.num_draft_tokens
        assert_pool_whole(llm)
        if not eager:
            assert counts["verify"] > 5 and counts["target>seqs"] > 0
            assert method == "ngram" or counts["draft"] > 10
    assert results[0] == expected
    assert results[1] == expected


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_dynamic_speculation_equals_plain(pair, method):
    """The dynamic rule (k per step from measured costs) changes how many drafts a step
    verifies, never a greedy token."""
    prompts = repeating_prompts([8, 12, 20, 9], seed=22) + PROMPTS
    expected = [o.token_ids for o in gpu_llm(pair[0], num_blocks=512).generate(prompts, GREEDY)]
    config = {"method": method, "num_speculative_tokens": 4}
    if method == "draft":
        config["model"] = str(pair[1])
    llm = gpu_llm(pair[0], num_blocks=512, speculative_config=config)
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == expected
    assert_pool_whole(llm)


def test_sinks_verify_in_graphs(model_dir):
    """Attention sinks on the Triton sink backend: verify rows replay the decode graphs, each
    row reading its own compact table (sinks, then its window); the streaming reference's
    tokens past max_model_len."""
    prompts = repeating_prompts([7, 11], seed=8)
    ngram = {"method": "ngram", "num_speculative_tokens": K, "adaptive": False}
    llm = sink_llm(
        model_dir, device="cuda", dtype="float32", max_model_len=64, speculative_config=ngram
    )
    counts = {}
    count_verify_replays(llm, counts)
    params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    outputs = run_checked(llm, prompts, params)
    streaming = StreamingReference(model_dir, 4, 16)
    for prompt, out in zip(prompts, outputs):
        assert out.token_ids == streaming.greedy(prompt, 60)
    assert llm.engine.num_accepted_tokens > 0 and counts["verify"] > 5
