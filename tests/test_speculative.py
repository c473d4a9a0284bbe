"""Speculative decoding: greedy outputs equal non-speculative decoding and transformers under
every scheduling path; the accept/reject rule keeps the target distribution; blocks all return
to the pool; it works on the decode side of a handoff."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.metrics import EngineMetrics
from engine.speculative import (
    NgramProposer,
    SpeculativeConfig,
    accept_greedy,
    num_drafts,
    rejection_sample,
    update_acceptance,
)
from tests.helpers import random_prompts
from tests.test_correctness import assert_matches_reference, assert_pool_whole
from tests.test_handoff_engine import CopyConnector

MAX_TOKENS = 24
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
# saturation_tokens: verification priced as on a GPU, so the step rule lets these batches
# speculate (the CPU default would mostly turn it off past a few requests).
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "saturation_tokens": 1024}


def prompts_16() -> list[list[int]]:
    """10 random prompts (block-boundary lengths included) and 6 that repeat a passage, as in
    code editing or summarisation, where prompt lookup finds what comes next."""
    lengths = [1, 3, 15, 16, 17, 33, 64, 100, 150, 257]
    passages = random_prompts([8, 12, 20, 30, 40, 50], seed=11)
    repeated = [(p * 6)[: 6 * len(p) - 3] for p in passages]
    return random_prompts(lengths, seed=10) + repeated


PROMPTS = prompts_16()


def spec_llm(model_dir, **kwargs) -> LLM:
    return price_by_model(LLM(model_dir, speculative=NGRAM, **kwargs))


def price_by_model(llm: LLM) -> LLM:
    """Dynamic speculation prices its steps by the rule's model alone: step times measured on
    a loaded CPU (other tests, other jobs) could turn it off, and then a test that checks the
    tokens of speculative steps sees none."""
    llm.engine.step_cost.observe_speculative = lambda *args: None
    return llm


def assert_accepted_some(llm):
    engine = llm.engine
    assert engine.num_draft_tokens > 0
    assert 0 < engine.num_accepted_tokens <= engine.num_draft_tokens


# -- the rule itself -------------------------------------------------------------------------


def test_accept_greedy():
    assert accept_greedy([5, 6, 7], [5, 6, 7, 8]) == [5, 6, 7, 8]  # all accepted + bonus
    assert accept_greedy([5, 9, 7], [5, 6, 7, 8]) == [5, 6]  # first mismatch: target's token
    assert accept_greedy([], [3]) == [3]


@pytest.mark.parametrize("point_mass", [True, False])
def test_rejection_sampling_keeps_target_distribution(point_mass):
    """The first emitted token is distributed as p, whatever the draft (Leviathan et al.,
    Theorem 1): draft tokens come from q (a point mass for n-gram proposals)."""
    gen = torch.Generator().manual_seed(0)
    vocab, trials = 6, 12000
    p = torch.tensor([[0.05, 0.4, 0.1, 0.25, 0.15, 0.05], [1 / 6] * 6])
    q = torch.tensor([[0.3, 0.1, 0.3, 0.1, 0.1, 0.1]])
    counts = torch.zeros(vocab)
    for _ in range(trials):
        if point_mass:
            draft, draft_probs = [2], None  # always proposes token 2
        else:
            draft, draft_probs = [int(torch.multinomial(q[0], 1, generator=gen))], q
        counts[rejection_sample(p, draft, draft_probs, gen)[0]] += 1
    total_variation = 0.5 * (counts / trials - p[0]).abs().sum()
    assert total_variation < 0.02, (counts / trials, p[0])


def test_ngram_proposer():
    proposer = NgramProposer(SpeculativeConfig(prompt_lookup_max=3))
    # The suffix [1, 2, 3] last occurred at 4..6, followed by 9, 9, 1.
    assert proposer.propose([1, 2, 3, 4, 1, 2, 3, 9, 9, 1, 2, 3], 2) == [9, 9]
    assert proposer.propose([1, 2, 3, 4, 1, 2, 3, 9, 9, 1, 2, 3], 9) == [9, 9, 1, 2, 3]
    assert proposer.propose([1, 2, 3, 4], 3) == []  # nothing repeats
    assert proposer.propose([7], 3) == []


def test_ngram_index_proposes_what_a_full_scan_does_as_sequences_grow():
    """`propose_batch`'s per-request index against `propose`'s scan, on random sequences over
    small vocabularies (many repeats), grown by 1-4 tokens a step; `retain` drops finished
    requests' indexes."""
    gen = torch.Generator().manual_seed(0)

    def draw(high: int, size: int = 1) -> list[int]:
        return torch.randint(0, high, (size,), generator=gen).tolist()

    for lookup_min, lookup_max in [(1, 1), (1, 4), (2, 3), (3, 5)]:
        config = SpeculativeConfig(prompt_lookup_min=lookup_min, prompt_lookup_max=lookup_max)
        proposer = NgramProposer(config)
        requests = [_Tokens(f"r{i}", draw(2 + i, 1 + i)) for i in range(4)]
        for _ in range(30):
            ks = [draw(5)[0] + 1 for _ in requests]
            proposer.propose_batch(requests, ks)
            for request, k in zip(requests, ks):
                assert request.spec_token_ids == proposer.propose(request.all_token_ids, k)
                request.all_token_ids += draw(2 + int(request.request_id[1:]), draw(4)[0] + 1)
        proposer.retain({"r1"})
        assert set(proposer._indexes) == {"r1"}


class _Tokens:
    def __init__(self, request_id: str, token_ids: list[int]):
        self.request_id, self.all_token_ids, self.spec_token_ids = request_id, token_ids, []


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"method": "medusa"}, "not supported"),
        ({"method": "draft"}, "needs 'model'"),
        ({"method": "ngram", "model": "/x"}, "only it takes one"),
        ({"method": "draft", "model": "/nonexistent"}, "no config.json"),
        ({"num_speculative_tokens": 0}, "num_speculative_tokens"),
        ({"prompt_lookup_min": 3, "prompt_lookup_max": 2}, "prompt_lookup_min"),
        ({"k": 4}, "unknown speculative options"),
        ("ngram", "must be a dict"),
    ],
)
def test_config_errors(model_dir, bad, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(model=str(model_dir), speculative=bad)


# -- greedy: token-identical under every scheduling path ---------------------------------------


def test_greedy_identical_chunked_prefill(model_dir, reference):
    plain = LLM(model_dir, max_num_batched_tokens=32, num_blocks=512, enable_prefix_caching=False)
    spec = spec_llm(
        model_dir, max_num_batched_tokens=32, num_blocks=512, enable_prefix_caching=False
    )
    expected = plain.generate(PROMPTS, GREEDY)
    outputs = spec.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outputs] == [o.token_ids for o in expected]
    assert_matches_reference(reference, PROMPTS, outputs, MAX_TOKENS)
    assert_accepted_some(spec)
    assert_pool_whole(spec)


def test_greedy_identical_prefix_cache(model_dir, reference):
    spec = spec_llm(model_dir, max_num_batched_tokens=128, num_blocks=512)
    first = spec.generate(PROMPTS, GREEDY)
    second = spec.generate(PROMPTS, GREEDY)
    assert spec.engine.kv_manager.stats.hit_tokens > 0
    assert [o.token_ids for o in second] == [o.token_ids for o in first]
    assert_matches_reference(reference, PROMPTS, second, MAX_TOKENS)
    assert_accepted_some(spec)
    assert_pool_whole(spec)


def test_greedy_identical_forced_preemption(model_dir, reference):
    # The longest request needs ceil((297 + 24) / 16) = 21 blocks; 24 force preemption.
    spec = spec_llm(model_dir, max_num_batched_tokens=64, num_blocks=24)
    outputs = spec.generate(PROMPTS, GREEDY)
    assert spec.engine.scheduler.num_preemptions > 0
    assert_matches_reference(reference, PROMPTS, outputs, MAX_TOKENS)
    assert_accepted_some(spec)
    assert_pool_whole(spec)


def test_stop_inside_accepted_drafts(model_dir):
    """A stop token id among accepted drafts ends the request there; later drafts are dropped."""
    prompts = PROMPTS[1::2]
    base = spec_llm(model_dir, num_blocks=256).generate(prompts, GREEDY)
    # For each output, stop at its 10th token (often one that came in as an accepted draft).
    params = [
        SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, stop_token_ids=[o.token_ids[9]])
        for o in base
    ]
    spec = spec_llm(model_dir, num_blocks=256)
    outputs = spec.generate(prompts, params)
    for out, ref in zip(outputs, base):
        cut = ref.token_ids.index(ref.token_ids[9]) + 1
        assert out.token_ids == ref.token_ids[:cut]
        assert out.finish_reason == "stop"
    assert_pool_whole(spec)


# -- sampling ----------------------------------------------------------------------------------


def test_seeded_sampling_valid_and_reproducible(model_dir):
    """Reproducible with a fixed k. (With dynamic k the random draws a request consumes depend
    on each step's k, which follows measured step times: same distribution, other samples.)"""
    params = [
        SamplingParams(
            max_tokens=MAX_TOKENS, temperature=t, top_k=k, top_p=p, seed=i, ignore_eos=True
        )
        for i, (t, k, p) in enumerate(
            [(0.3, 0, 1.0), (0.8, 50, 1.0), (1.0, 0, 0.9), (0.5, 0, 1.0)] * 4
        )
    ]
    runs = []
    for _ in range(2):
        static = {**NGRAM, "adaptive": False}
        spec = LLM(model_dir, speculative=static, max_num_batched_tokens=64, num_blocks=256)
        outputs = spec.generate(PROMPTS[::2], params[::2])
        for out in outputs:
            assert len(out.token_ids) == MAX_TOKENS
            assert all(0 <= t < spec.engine.model_config.vocab_size for t in out.token_ids)
        assert_accepted_some(spec)
        assert_pool_whole(spec)
        runs.append([o.token_ids for o in outputs])
    assert runs[0] == runs[1]


def test_metrics_count_drafts(model_dir):
    spec = spec_llm(model_dir, num_blocks=256)
    metrics = EngineMetrics("t", "decode", "d0")
    for i, prompt in enumerate(PROMPTS[-4:]):
        spec.engine.add_request(f"r{i}", prompt, GREEDY)
    drafted = accepted = 0
    while spec.engine.has_unfinished_requests():
        spec.engine.step()
        metrics.observe_step(spec.engine)
        drafted += spec.engine.last_step.num_draft_tokens
        accepted += spec.engine.last_step.num_accepted_tokens
    assert 0 < accepted <= drafted == spec.engine.num_draft_tokens
    text = metrics.render().decode()
    assert f"baton_spec_draft_tokens_total{{{_labels()}}} {float(drafted)}" in text
    assert f"baton_spec_accepted_tokens_total{{{_labels()}}} {float(accepted)}" in text


def _labels() -> str:
    return 'instance="d0",role="decode",tier="t"'


# -- decode role -------------------------------------------------------------------------------


def test_handoff_decode_side_speculates(model_dir):
    """Prefill on one engine, KV copied into blocks the speculating decode engine reserved:
    tokens equal a single engine's without speculation."""
    expected = [o.token_ids for o in LLM(model_dir, num_blocks=512).generate(PROMPTS, GREEDY)]
    prefill = LLM(model_dir, num_blocks=256, max_num_batched_tokens=64)
    decode = spec_llm(model_dir, num_blocks=256, max_num_batched_tokens=64)
    assert handoff(prefill, decode, PROMPTS) == expected
    assert_accepted_some(decode)
    for llm in (prefill, decode):
        assert_pool_whole(llm)


def handoff(prefill: LLM, decode: LLM, prompts, params=GREEDY) -> list[list[int]]:
    """Greedy generation split as on two workers: the prefill engine computes each prompt and
    token 1, its KV is copied into blocks the decode engine reserved, which decodes the rest."""
    connector = CopyConnector(prefill.engine.runner.kv_caches, decode.engine.runner.kv_caches)
    prefill.engine.runner.kv_connector = connector
    first_only = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        block_ids = decode.engine.reserve(f"r{i}", prompt, params)
        assert block_ids is not None
        connector.targets[f"r{i}"] = block_ids
        prefill.engine.add_request(f"r{i}", prompt, first_only)
    results = {}
    while prefill.engine.has_unfinished_requests():
        for out in prefill.engine.step():
            results[out.request_id] = list(out.token_ids)
    for rid, tokens in results.items():
        assert decode.engine.admit_prefilled(rid, tokens[0]) is None
    while decode.engine.has_unfinished_requests():
        for out in decode.engine.step():
            results[out.request_id].extend(out.new_token_ids)
    return [results[f"r{i}"] for i in range(len(prompts))]


def test_num_drafts_follows_acceptance():
    assert num_drafts(1.0, 4, num_output_tokens=1) == 4
    assert num_drafts(0.5, 4, num_output_tokens=1) == 2  # 0.5, 0.25 >= 0.2 > 0.125
    assert num_drafts(0.1, 4, num_output_tokens=1) == 0
    assert num_drafts(0.1, 4, num_output_tokens=8) == 1  # a probe now and then
    acceptance = 1.0
    for _ in range(10):  # every draft rejected: the request soon stops speculating
        acceptance = update_acceptance(acceptance, 4, 0)
    assert num_drafts(acceptance, 4, num_output_tokens=1) == 0
