"""Speculative decoding: greedy outputs equal non-speculative decoding and transformers under
every scheduling path; the accept/reject rule keeps the target distribution; blocks all return
to the pool; it works on the decode side of a handoff."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import engine.engine as engine_module
from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.metrics import EngineMetrics
from engine.speculative import (
    DraftGate,
    NgramProposer,
    SpeculativeConfig,
    accept_greedy,
    choose_num_drafts,
    rejection_sample,
    speed_up,
)
from tests.helpers import random_prompts
from tests.test_correctness import assert_matches_reference, assert_pool_whole
from tests.test_handoff_engine import CopyConnector

pytestmark = pytest.mark.usefixtures("unbudgeted_shadow_lookups")
SHADOW_MIN_SCALE = engine_module._SHADOW_MIN_SCALE  # before any test patches it
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


def spec_llm(model_dir, adaptive: bool = True, **kwargs) -> LLM:
    """adaptive=False: k drafts every step (no rule deciding whether it pays)."""
    speculative = {**NGRAM, "adaptive": adaptive}
    return price_by_model(LLM(model_dir, speculative=speculative, **kwargs))


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


def full_scan(tokens: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    """Prompt lookup the plain way, the reference: every window of every n compared."""
    array = np.asarray(tokens)
    length = len(array)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        # Windows starting at 0 .. length-n-1, i.e. every n-gram but the suffix itself.
        windows = np.lib.stride_tricks.sliding_window_view(array[:-1], n)
        hits = np.flatnonzero((windows == array[length - n :]).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n  # the token after the latest match
            return array[start : start + k].tolist()
    return []


def test_ngram_index_proposes_what_a_full_scan_does_as_sequences_grow():
    """`propose_batch`'s per-request index against `full_scan`, on random sequences over
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
                expected = full_scan(request.all_token_ids, lookup_min, lookup_max, k)
                assert request.spec_token_ids == expected
                request.all_token_ids += draw(2 + int(request.request_id[1:]), draw(4)[0] + 1)
        proposer.retain({"r1"})
        assert set(proposer._indexes) == {"r1"}


def test_first_lookups_scan_then_the_index_is_built():
    """`scan` answers as `full_scan` does (random sequences over small vocabularies, the empty
    and one-token ones included); a request's first lookups scan (at least _SCAN_LOOKUPS, a
    tenth of its length if more), the next one builds its index."""
    from engine.speculative import _SCAN_LOOKUPS, _NgramIndex, scan

    gen = torch.Generator().manual_seed(1)
    proposer = NgramProposer(SpeculativeConfig(prompt_lookup_min=1, prompt_lookup_max=4))
    for _ in range(2000):
        length, vocab, k = (int(x) for x in torch.randint(1, 40, (3,), generator=gen))
        tokens = torch.randint(0, 1 + vocab % 5, (length - 1,), generator=gen).tolist()
        assert scan(tokens, range(4, 0, -1), k) == full_scan(tokens, 1, 4, k), tokens
    index, tokens = _NgramIndex(1, 4), [5, 6, 7, 5, 6]
    for _ in range(_SCAN_LOOKUPS):
        assert index.propose(tokens, 2) == [7, 5] and index.length == 0
    shrunk = _NgramIndex(1, 4)  # the scans' array copy follows a sequence that shrinks
    assert shrunk.propose([1, 2, 3, 1, 2, 9, 1], 2) == [2, 9]
    assert shrunk.propose([1, 2, 3, 1], 2) == [2, 3]
    assert index.propose(tokens, 2) == [7, 5] and index.length == len(tokens)
    # Longer sequences scan longer before a build pays (a tenth of their length in lookups).
    long = _NgramIndex(1, 4)
    sequence = [t % 7 for t in range(200)]
    for _ in range(20):
        assert not long.builds_next(sequence)
        long.propose(sequence, 2)
    assert long.builds_next(sequence) and long.length == 0
    # The proposer times the lookup that builds a request's index: the step cost meter takes
    # it off the step's time (scans are what a lookup costs, and stay on it).
    request = _Tokens("r", tokens)
    learning = []
    for _ in range(_SCAN_LOOKUPS + 2):
        proposer.propose_batch([request], [2])
        learning.append(proposer.one_off_s > 0)
    assert learning == [False] * _SCAN_LOOKUPS + [True, False]


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
    """Static k: with chunks of 32 tokens few steps are pure decode, which dynamic speculation
    needs to price plain steps before it speculates."""
    plain = LLM(model_dir, max_num_batched_tokens=32, num_blocks=512, enable_prefix_caching=False)
    spec = spec_llm(
        model_dir,
        adaptive=False,
        max_num_batched_tokens=32,
        num_blocks=512,
        enable_prefix_caching=False,
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
    # Static: dynamic speculation does not speculate while requests wait to be (re)admitted.
    spec = spec_llm(model_dir, adaptive=False, max_num_batched_tokens=64, num_blocks=24)
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
    spec = spec_llm(model_dir, adaptive=False, num_blocks=256)
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
    assert DraftGate(acceptance=1.0).num_drafts(4) == 4
    assert DraftGate(acceptance=0.5).num_drafts(4) == 2  # 0.5, 0.25 >= 0.2 > 0.125
    assert DraftGate(acceptance=0.1).num_drafts(4) == 1  # at least one, while not paused
    assert DraftGate(acceptance=1.0).num_drafts(2) == 2  # never more than the step's k
    gate = DraftGate()
    for _ in range(10):  # every draft rejected: acceptance falls towards 0
        gate.observe(4, 0, num_tokens=100)
    assert gate.acceptance < 0.2 and gate.num_drafts(4) == 1


def test_fruitless_proposals_pause_a_request_for_doubling_spans():
    """Four fruitless proposals in a row (nothing found, or nothing accepted) pause a request
    for 8 tokens, then 16, 32, ... up to 128; an accepted draft ends the pauses."""
    gate = DraftGate()
    for num_tokens in range(100, 103):
        gate.observe(0, 0, num_tokens)  # the lookup found nothing: no pause yet
    assert gate.is_open(103) and gate.acceptance == 1.0  # (nothing verified)
    gate.observe(3, 0, num_tokens=103)  # nothing accepted: the fourth
    assert gate.acceptance < 1.0
    assert not gate.is_open(110) and gate.is_open(111)
    spans = []
    for _ in range(6):
        now = int(gate.resume_at)
        gate.observe(0, 0, num_tokens=now)
        spans.append(gate.resume_at - now)
    assert spans == [16, 32, 64, 128, 128, 128]
    gate.observe(1, 1, num_tokens=2000)
    assert gate.fruitless == 0 and gate.is_open(2000)
    gate.observe(0, 0, num_tokens=2001)  # a fresh start: one fruitless proposal is no pause
    assert gate.is_open(2001)


def test_few_drafts_do_not_pay_for_a_verify_step():
    """The post-proposal check: a handful of requests of 64 with drafts is not worth a verify
    step once verify steps are measured to cost more than plain ones; most of the batch with
    drafts is. And the step's k counts only the requests that may be proposed for."""
    assert speed_up(64, [3] * 5, 0.7, 0.0, 256) > 1.0  # unmeasured: verify (and learn)
    assert speed_up(64, [3] * 5, 0.7, 0.0, 256, overhead=1.3) < 1.0
    assert speed_up(64, [4] * 5, 0.1, 0.0, 256) < 1.05
    assert speed_up(64, [3] * 48, 0.9, 0.0, 256, overhead=1.3) > 1.5
    assert choose_num_drafts(64, 0.9, 4, 0.0, 256, overhead=1.3) > 0
    assert choose_num_drafts(64, 0.9, 4, 0.0, 256, overhead=1.3, num_speculating=4) == 0
    assert choose_num_drafts(64, 0.9, 4, 0.0, 256, num_speculating=0) == 0


def test_dynamic_never_verifies_where_drafts_fail(model_dir):
    """Every draft wrong (each request's proposer offers the token after the right one),
    verification priced as on a GPU (where the rule speculates at this batch if drafts held):
    the shadow lookups score the drafts against the decoded tokens, so the engine learns that
    they fail without a single verify step, and looks each request up a bounded number of
    times; the tokens are plain decoding's and every block returns to the pool."""
    llm, prompts, params, expected, lookups = _planted(model_dir, 1, 16, 96, seed=21)
    engine = llm.engine
    outputs = llm.generate(prompts, params)
    assert [o.token_ids for o in outputs] == expected
    assert engine.num_draft_tokens == 0
    assert engine.acceptance.num_outcomes >= 8 and engine.acceptance.acceptance < 0.2
    assert len(lookups) == len(prompts) and max(lookups.values()) <= 8, lookups
    assert not engine._shadows
    assert_pool_whole(llm)


def test_dynamic_speculates_once_shadow_lookups_find_drafts_hold(model_dir):
    """Every draft right: a few plain steps of shadow lookups measure it, then the engine
    verifies drafts and accepts them all; tokens are plain decoding's."""
    llm, prompts, params, expected, _ = _planted(model_dir, 0, 8, 64, seed=22)
    engine = llm.engine
    verify_steps, step = [], 0
    step_once = engine.step

    def counted_step():
        nonlocal step
        outputs = step_once()
        step += 1
        if engine.last_step.num_draft_tokens:
            verify_steps.append(step)
        return outputs

    engine.step = counted_step
    outputs = llm.generate(prompts, params)
    assert [o.token_ids for o in outputs] == expected
    assert 0 < engine.num_accepted_tokens == engine.num_draft_tokens
    assert verify_steps and verify_steps[0] <= 12, verify_steps  # prefill, learning, one plain
    assert_pool_whole(llm)


def test_dynamic_does_not_speculate_in_steps_holding_prompt_tokens(model_dir):
    """Requests arriving while others decode (8 requests of different lengths, 4 at a time):
    the steps that prefill an admitted request verify no drafts (the cost meter prices pure
    decode steps only), the pure decode steps between them do; tokens are plain decoding's."""
    max_tokens = [12 + 5 * i for i in range(8)]
    llm, prompts, params, expected, _ = _planted(model_dir, 0, 8, max_tokens, 24, max_num_seqs=4)
    engine = llm.engine
    kinds = []
    step_once = engine.step

    def classified_step():
        outputs = step_once()
        last = engine.last_step
        if last.num_decode_tokens:
            kinds.append(("mixed" if last.num_prefill_tokens else "decode", last.num_draft_tokens))
        return outputs

    engine.step = classified_step
    outputs = llm.generate(prompts, params)
    assert [o.token_ids for o in outputs] == expected
    mixed = [drafts for kind, drafts in kinds if kind == "mixed"]
    assert mixed and not any(mixed), kinds
    assert any(drafts for kind, drafts in kinds if kind == "decode"), kinds
    assert_pool_whole(llm)


def _planted(
    model_dir, offset: int, num_prompts: int, max_tokens: int | list[int], seed: int, **kwargs
):
    """A dynamic speculating engine whose n-gram lookup offers each request its next greedy
    tokens plus `offset` (0: every draft right; 1: every draft wrong). `max_tokens`: for all,
    or per prompt. Returns (llm, prompts, params, the tokens plain decoding gives, {prompt
    index: lookups made})."""
    prompts = random_prompts([40 + 7 * i for i in range(num_prompts)], seed=seed)
    counts = max_tokens if isinstance(max_tokens, list) else [max_tokens] * num_prompts
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in counts]
    expected = [o.token_ids for o in LLM(model_dir, num_blocks=512).generate(prompts, params)]
    kwargs.setdefault("max_num_seqs", num_prompts)
    llm = spec_llm(model_dir, num_blocks=512, **kwargs)
    lookups: dict[int, int] = {}
    vocab = llm.engine.model_config.vocab_size

    def lookup(request, k):
        i = int(request.request_id.split("-")[1]) % len(prompts)
        done = request.num_output_tokens
        lookups[i] = lookups.get(i, 0) + 1
        return [(t + offset) % vocab for t in expected[i][done : done + k]]

    llm.engine.proposer.lookup = lookup
    return llm, prompts, params, expected, lookups


def test_score_shadows_counts_the_matched_prefix(model_dir):
    """A shadow lookup is scored once the request holds the tokens its drafts predicted: the
    drafts before the first miss are accepted, as greedy verification would accept them."""
    llm = spec_llm(model_dir, num_blocks=64)
    engine = llm.engine
    engine.add_request("a", [1, 2, 3], GREEDY)
    request = engine.scheduler.waiting[0]
    request.all_token_ids += [7, 8]
    engine._shadows["a"] = (request, 4, [8, 9, 10])  # predicted tokens 4..6; 8 is right
    engine._score_shadows()
    assert "a" in engine._shadows  # token 5 not decoded yet
    request.all_token_ids += [9, 11]
    before = engine.acceptance.num_outcomes
    engine._score_shadows()
    assert not engine._shadows
    assert engine.acceptance.num_outcomes - before == 3  # two accepted, one rejected
    assert request.spec_gate.acceptance < 1.0 and request.spec_gate.fruitless == 0


def test_shadow_lookups_keep_to_their_time_budget(model_dir, monkeypatch):
    """The lookups' time stays within _SHADOW_SHARE of the run's wall time (on CPU the host
    never waits for a device, so the share is all the budget), give or take one lookup and the
    credit saved."""
    monkeypatch.setattr(engine_module, "_SHADOW_SHARE", 0.01)
    prompts = random_prompts([40 + 7 * i for i in range(16)], seed=21)
    params = SamplingParams(max_tokens=96, temperature=0.0, ignore_eos=True)
    llm = spec_llm(model_dir, num_blocks=512, max_num_seqs=16)
    proposer = llm.engine.proposer
    lookup, spent, longest, calls = proposer.lookup, [0.0], [0.0], [0]

    def timed(request, k):
        start = time.perf_counter()
        drafts = lookup(request, k)
        # A slow proposer: 1 ms more a lookup, a good share of a step here, so the budget binds.
        time.sleep(0.001)
        took = time.perf_counter() - start
        spent[0] += took
        longest[0] = max(longest[0], took)
        calls[0] += 1
        return drafts

    proposer.lookup = timed
    start = time.perf_counter()
    llm.generate(prompts, params)
    wall = time.perf_counter() - start
    assert calls[0] > 0
    allowed = 0.01 * wall + longest[0] + engine_module._SHADOW_MAX_CREDIT
    assert spent[0] <= allowed, (spent[0], wall, calls[0])
    assert_pool_whole(llm)


def test_shadow_lookups_that_find_nothing_shrink_their_budget(model_dir, monkeypatch):
    """Where no lookup finds drafts the measured hit rate falls, and the lookups' budget with
    it, to _SHADOW_MIN_SCALE of _SHADOW_SHARE: learning that drafts still fail costs a fraction
    of what learning costs where they hold."""
    monkeypatch.setattr(engine_module, "_SHADOW_SHARE", 0.02)
    # Requests keep arriving: each new one's gate is open, so lookups are what the budget allows.
    prompts = random_prompts([40 + 7 * (i % 16) for i in range(256)], seed=22)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    spent = {}
    floor = SHADOW_MIN_SCALE  # (this module's tests run with it at 1.0)
    for scale in (1.0, floor):
        monkeypatch.setattr(engine_module, "_SHADOW_MIN_SCALE", scale)
        llm = spec_llm(model_dir, num_blocks=512, max_num_seqs=16)
        calls, took = [0], [0.0]

        def fruitless(request, k, calls=calls, took=took):
            start = time.perf_counter()
            time.sleep(0.001)  # a slow proposer, so that the budget binds
            took[0] += time.perf_counter() - start
            calls[0] += 1
            return []

        llm.engine.proposer.lookup = fruitless
        start = time.perf_counter()
        llm.generate(prompts, params)
        wall = time.perf_counter() - start
        spent[scale] = took[0] / wall
        assert calls[0] > 0 and llm.engine.hits.rate < 0.2
        assert llm.engine.num_draft_tokens == 0
        assert_pool_whole(llm)
    # Measured 0.27-0.29 of it (dev CPU): 1/8 once the rate fell, the first credit and the
    # lookups before the rate fell on top, in a run of ~1.5 s.
    assert spent[floor] < 0.5 * spent[1.0], spent


def test_async_scheduling_chains_the_steps_dynamic_speculation_leaves_plain(model_dir):
    """With async scheduling a step the rule leaves plain (k = 0) is launched before the
    previous step's tokens are read, as without speculation: where every draft fails, the
    shadow lookups learn it without breaking the chain, nearly every decode step chains, no
    draft is verified, the tokens are plain decoding's and every block returns."""
    from tests.test_async_scheduling import count_chained

    llm, prompts, params, expected, lookups = _planted(
        model_dir, 1, 16, 96, seed=21, async_scheduling=True
    )
    engine = llm.engine
    chained = count_chained(llm)
    outputs = llm.generate(prompts, params)
    assert [o.token_ids for o in outputs] == expected
    assert engine.num_draft_tokens == 0
    assert chained[0] >= 85, chained  # of ~95 decode steps
    assert max(lookups.values()) <= 8, lookups
    assert_pool_whole(llm)


def test_async_scheduling_keeps_speculating_where_drafts_hold(model_dir, reference):
    """Async scheduling on: requests whose drafts hold are still proposed for (no step that
    may propose is launched ahead), and the tokens are transformers' greedy ones."""
    llm = spec_llm(model_dir, num_blocks=512, async_scheduling=True)
    outputs = llm.generate(PROMPTS, GREEDY)
    assert_matches_reference(reference, PROMPTS, outputs, MAX_TOKENS)
    assert_accepted_some(llm)
    assert_pool_whole(llm)


def test_ngram_steps_with_a_first_proposal_are_priced(model_dir):
    """A request's first n-gram lookups scan its tokens, which is what a lookup costs until
    its index is built: a speculative step holding one is priced (only the index build, the
    proposer's `one_off_s`, is taken off its time)."""
    engine = LLM(model_dir, num_blocks=64, speculative=NGRAM).engine
    meter = engine.step_cost
    meter.plain_s, meter._since_plain = {4: 0.005}, {4: 0}
    engine._last_choice = (4, 1.0, True, 0.004)  # batch, modeled cost, first, index builds
    engine._cycle_start = time.perf_counter() - 0.019
    engine._observe_step_cost(4)
    assert 1.8 < meter.factor < 2.4  # (1 + ~3) / 2: the ~15 ms left are ~3x a plain step
