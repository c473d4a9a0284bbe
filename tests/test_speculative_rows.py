"""Speculative verification as decode rows (engine/decode_graphs.py): a request verifying d drafts
is d + 1 one-token rows, the layout the decode CUDA graphs replay; on CPU the eager path runs the
very same rows.

- the expansion on a constructed schedule: positions, slots, context lengths, tables, padding;
  the general packing (a step that also prefills) gives the same rows;
- greedy tokens with speculation (n-gram and draft model, static and dynamic) equal plain
  decoding, with verify steps and the draft's passes going through rows;
- sliding window and attention sinks verify correctly (against transformers and the streaming
  reference), a draft model with sinks is refused;
- the dynamic rule's cost meter times the proposal with the step, and skips one-off catch-ups.
"""

from __future__ import annotations

import time

import pytest

from engine import LLM, SamplingParams
from engine.kv_cache import NULL_BLOCK_ID
from engine.request import Request
from engine.scheduler import ScheduledRequest, SchedulerOutput
from engine.speculative import SpeculativeConfig, StepCostMeter
from engine.testing import write_draft_pair, write_test_checkpoint
from tests.helpers import Reference, random_prompts
from tests.test_attention_sinks import StreamingReference, sink_llm
from tests.test_correctness import assert_pool_whole
from tests.test_sliding_window import run_checked, set_config
from tests.test_speculative import price_by_model

pytestmark = pytest.mark.usefixtures("unbudgeted_shadow_lookups")
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def repeating_prompts(lengths, seed) -> list[list[int]]:
    """Passages said several times over: prompt lookup finds what comes next."""
    return [(p * 6)[: 6 * len(p) - 3] for p in random_prompts(lengths, seed=seed)]


PROMPTS = repeating_prompts([8, 12, 20], seed=11) + random_prompts([5, 33, 70], seed=12)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A 3-layer target whose later layers are damped, and its 1-layer truncation as draft."""
    return write_draft_pair(tmp_path_factory.mktemp("rows_pair"), 1, 0.1, num_hidden_layers=3)


def spec_config(method, pair, adaptive) -> dict:
    config = {"method": method, "num_speculative_tokens": 3, "adaptive": adaptive}
    if method == "draft":
        config["model"] = str(pair[1])
    return {**config, "saturation_tokens": 1024}  # price verification as on a GPU


# -- the expansion ---------------------------------------------------------------------------


def decode_at(request_id: str, position: int, seed: int) -> Request:
    """A request in decode whose last token sits at `position` (its KV not yet computed)."""
    prompt = random_prompts([position + 1], seed=seed)[0]
    request = Request(request_id, prompt, GREEDY)
    request.num_computed_tokens = position
    return request


def test_verify_rows_expand_drafts(model_dir):
    runner = LLM(model_dir, num_blocks=64).engine.runner
    bs, scratch = runner.block_size, runner.num_blocks
    r0, r1, r2 = decode_at("a", 20, 1), decode_at("b", 30, 2), decode_at("c", 47, 3)
    tables = [[5, 9], [2, 7, 11], [1, 3, 4, 6]]
    sched = SchedulerOutput(
        [
            ScheduledRequest(r0, 1, tables[0]),  # a plain decode
            ScheduledRequest(r1, 4, tables[1], [101, 102, 103]),  # 3 drafts, into block 2
            ScheduledRequest(r2, 2, tables[2], [201]),  # 1 draft, across a block boundary
        ]
    )
    ids, positions, meta, sample_rows, requests = runner._prepare(sched, pad_to=8)
    last = [r.all_token_ids[-1] for r in (r0, r1, r2)]
    assert ids.tolist() == [last[0], last[1], 101, 102, 103, last[2], 201, 0]
    assert positions.tolist() == [20, 30, 31, 32, 33, 47, 48, 0]
    slots = [9 * bs + 4, 7 * bs + 14, 7 * bs + 15, 11 * bs, 11 * bs + 1, 4 * bs + 15, 6 * bs]
    assert meta.slot_mapping.tolist() == slots + [scratch * bs]  # padding: the scratch block
    assert meta.seq_lens == [21, 31, 32, 33, 34, 48, 49]  # each row its own context
    assert meta.backend_data.tolist() == meta.seq_lens + [1]
    assert meta.query_start_loc == list(range(8)) and meta.decode_rows_packed
    width = 4  # each row's table ends at its own last block
    row_tables = [[5, 9], [2, 7], [2, 7], [2, 7, 11], [2, 7, 11], [1, 3, 4], [1, 3, 4, 6]]
    expected = [t + [NULL_BLOCK_ID] * (width - len(t)) for t in row_tables] + [[scratch] * width]
    assert meta.block_tables.tolist() == expected
    assert sample_rows == list(range(7)) and requests == [r0, r1, r2]

    # A step that also prefills packs its verifying requests as the same rows.
    g_ids, g_positions, g_meta, g_rows, _ = runner._prepare(sched)
    assert g_ids.tolist() == ids.tolist()[:7] and g_positions.tolist() == positions.tolist()[:7]
    assert g_meta.slot_mapping.tolist() == slots and g_meta.seq_lens == meta.seq_lens
    assert g_meta.query_start_loc == list(range(8)) and g_rows == sample_rows
    for row, table in enumerate(row_tables):
        assert g_meta.block_tables[row, : len(table)].tolist() == table


# -- greedy: the tokens of plain decoding ------------------------------------------------------


def count_rows_steps(llm) -> dict[str, int]:
    """Counts, as `llm` runs, the target's decode-rows steps that verified drafts, its general
    steps that did, and the draft model's passes run as rows."""
    counts = {"verify_rows": 0, "verify_mixed": 0, "draft_rows": 0}
    runner = llm.engine.runner
    prepare, prepare_decodes = runner._prepare, runner._prepare_decodes

    def counted_prepare(sched, pad_to=None):
        if pad_to is None and any(s.spec_token_ids for s in sched.scheduled):
            counts["verify_mixed"] += 1
        return prepare(sched, pad_to)

    def counted_decodes(sched, pad_to):
        counts["verify_rows"] += any(s.spec_token_ids for s in sched.scheduled)
        return prepare_decodes(sched, pad_to)

    runner._prepare, runner._prepare_decodes = counted_prepare, counted_decodes
    drafter = llm.engine.drafter
    if drafter is not None:
        decode = drafter._decode

        def counted_draft(*args):
            counts["draft_rows"] += 1
            return decode(*args)

        drafter._decode = counted_draft
    return counts


@pytest.fixture(scope="module")
def expected(pair) -> list[list[int]]:
    plain = LLM(pair[0], num_blocks=256, max_num_batched_tokens=48)
    return [o.token_ids for o in plain.generate(PROMPTS, GREEDY)]


@pytest.mark.parametrize("adaptive", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_greedy_equals_plain_through_rows(pair, expected, method, adaptive):
    spec = LLM(
        pair[0],
        num_blocks=256,
        max_num_batched_tokens=48,  # prefill chunks beside verify steps
        speculative_config=spec_config(method, pair, adaptive),
    )
    counts = count_rows_steps(price_by_model(spec))
    outputs = spec.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outputs] == expected
    assert counts["verify_rows"] >= 3
    # Static drafts from the first decode on, so some steps verify beside prefill chunks.
    assert adaptive or counts["verify_mixed"] > 0
    assert method == "ngram" or counts["draft_rows"] >= 3
    engine = spec.engine
    assert 0 < engine.num_accepted_tokens <= engine.num_draft_tokens
    assert_pool_whole(spec)


# -- sliding window and attention sinks --------------------------------------------------------


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory):
    """Mistral with a 20-token window (block size 8 below): the window rolls past blocks."""
    path = write_test_checkpoint(tmp_path_factory.mktemp("rows_mistral"), architecture="mistral")
    return set_config(path, sliding_window=20)


def test_sliding_window_verifies_as_rows(mistral_dir):
    prompts = repeating_prompts([9], seed=10)  # 51 tokens: the window is 20
    ngram = {"method": "ngram", "num_speculative_tokens": 4, "adaptive": False}
    llm = LLM(mistral_dir, block_size=8, num_blocks=48, speculative_config=ngram)
    outputs = run_checked(llm, prompts, GREEDY)  # blocks left behind by the window are freed
    reference = Reference(mistral_dir)
    for prompt, out in zip(prompts, outputs):
        assert out.token_ids == reference.greedy(prompt, 24)
    assert llm.engine.num_accepted_tokens > 0


def test_attention_sinks_verify_as_rows(model_dir):
    """Past the window, drafts verified as rows each see the sinks and their own window, with
    cache positions from their own context: the streaming reference's tokens."""
    prompt = repeating_prompts([7], seed=8)[0]  # 39 tokens: the window is 16
    ngram = {"method": "ngram", "num_speculative_tokens": 4, "adaptive": False}
    llm = sink_llm(model_dir, max_model_len=48, speculative_config=ngram)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    [out] = run_checked(llm, [prompt], params)  # past max_model_len: sinks allow it
    assert out.token_ids == StreamingReference(model_dir, 4, 16).greedy(prompt, 24)
    assert llm.engine.num_accepted_tokens > 0


def test_draft_model_with_sinks_is_refused(pair):
    draft = {"method": "draft", "model": str(pair[1])}
    with pytest.raises(ValueError, match="draft model with attention sinks is not supported"):
        sink_llm(pair[0], speculative_config=draft)


# -- dynamic speculation: what the cost meter times ------------------------------------------


def test_step_cost_includes_the_proposal(pair):
    """A speculative step is timed from its proposal on (the draft model's passes are part of
    its cost), and a step whose draft caught a request up on its whole prompt is not priced."""
    llm = LLM(pair[0], num_blocks=128, speculative_config=spec_config("draft", pair, True))
    engine = llm.engine
    propose, observed = engine.drafter.propose_batch, []

    def slow_propose(requests, counts):
        time.sleep(0.05)
        propose(requests, counts)

    engine.drafter.propose_batch = slow_propose
    meter = engine.step_cost
    observe = meter.observe_speculative

    def record(batch_size, modeled_cost, seconds):
        observed.append((engine.drafter.last_catch_up, seconds))
        observe(batch_size, modeled_cost, seconds)

    meter.observe_speculative = record
    engine.add_request("r", repeating_prompts([10], seed=4)[0], GREEDY)
    speculated = long_catch_ups = 0
    while engine.has_unfinished_requests():
        engine.step()
        if engine.last_step.num_draft_tokens:
            speculated += 1
            long_catch_ups += engine.drafter.last_catch_up > 4  # more than k + 1 tokens
    assert long_catch_ups >= 1  # the first proposal: the draft prefilled the prompt
    assert len(observed) == speculated - long_catch_ups >= 1
    assert all(catch_up <= 4 and seconds >= 0.05 for catch_up, seconds in observed)


def test_plain_reference_untimed_first_then_refreshed():
    """The engine's first plain step is not timed (one-off costs would make speculation look
    cheap); after `refresh` priced speculative steps in a bucket, a plain one is due there."""
    meter = StepCostMeter(refresh=4)
    meter.observe_plain(1, 1.0)  # the first: untimed
    assert meter.needs_plain(1) and meter.plain_s == {}
    meter.observe_plain(1, 0.01)
    assert not meter.needs_plain(1) and meter.plain_s == {1: 0.01}
    for _ in range(3):
        meter.observe_speculative(1, 2.0, 0.02)
    assert not meter.needs_plain(1) and meter.factor == pytest.approx(1.0)
    meter.observe_speculative(1, 2.0, 0.02)
    assert meter.needs_plain(1) and meter.needs_plain(2)  # bucket 2: none timed yet
    meter.observe_plain(1, 0.01)
    assert not meter.needs_plain(1)


def test_verify_graph_rows_cover_speculation():
    """The decode graphs' largest bucket holds a verify step of every request that may
    speculate (max_batch_size, at most max_num_seqs) with k + 1 rows each, capped at 512."""
    assert SpeculativeConfig(num_speculative_tokens=4).max_verify_rows(256) == 160  # 32 x 5
    assert SpeculativeConfig(num_speculative_tokens=4).max_verify_rows(8) == 40
    lifted = SpeculativeConfig(num_speculative_tokens=4, max_batch_size=1 << 16)
    assert lifted.max_verify_rows(64) == 320 and lifted.max_verify_rows(256) == 512
