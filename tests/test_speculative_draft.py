"""Speculative decoding with a draft model (and the dynamic rule, for both methods): greedy
output equals plain decoding under chunked prefill, preemption, aborts and a prefill → decode
handoff; sampled output keeps the target's distribution (chi-square against the exact one);
both block pools, the target's and the draft's, are whole afterwards."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.speculative import (
    AcceptanceMeter,
    StepCostMeter,
    choose_num_drafts,
    expected_tokens,
)
from engine.testing import write_draft_pair
from tests.helpers import random_prompts
from tests.test_correctness import assert_pool_whole
from tests.test_speculative import GREEDY, PROMPTS, handoff, price_by_model

# The target's later layers are damped (engine.testing.write_draft_pair) so that its 1-layer
# truncation agrees with it about 3 times in 4, as a real draft would.
LATER_LAYER_SCALE = 0.1


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return write_draft_pair(
        tmp_path_factory.mktemp("draft"), 1, LATER_LAYER_SCALE, num_hidden_layers=3
    )


def draft_config(pair, **overrides) -> dict:
    # saturation_tokens: price verification as on a GPU, so these small CPU batches speculate.
    return {
        "method": "draft",
        "model": str(pair[1]),
        "num_speculative_tokens": 3,
        "saturation_tokens": 1024,
        **overrides,
    }


def assert_pools_whole(llm):
    """The target's pool (test_correctness) and the draft's: every block free, none held."""
    assert_pool_whole(llm)
    drafter = llm.engine.drafter
    assert drafter.num_held_blocks == 0
    assert drafter.pool.num_free_blocks == drafter.pool.num_blocks
    assert all(b.ref_cnt == 0 for b in drafter.pool.blocks)


def plain_tokens(target, prompts, params=GREEDY, **kwargs):
    llm = LLM(target, num_blocks=512, enable_prefix_caching=False, **kwargs)
    return [o.token_ids for o in llm.generate(prompts, params)]


@pytest.mark.parametrize("adaptive", [False, True])
def test_greedy_identical_chunked_prefill(pair, adaptive):
    expected = plain_tokens(pair[0], PROMPTS)
    spec = LLM(
        pair[0],
        max_num_batched_tokens=32,
        num_blocks=512,
        speculative_config=draft_config(pair, adaptive=adaptive),
    )
    outputs = price_by_model(spec).generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outputs] == expected
    engine = spec.engine
    assert engine.num_accepted_tokens > 0.3 * engine.num_draft_tokens > 0
    assert_pools_whole(spec)


def test_greedy_identical_preemption_and_short_draft_pool(pair):
    """24 target blocks force preemption (the longest request needs 21); a draft pool of 30
    blocks cannot hold every request's draft KV, so some steps propose fewer drafts or none."""
    expected = plain_tokens(pair[0], PROMPTS)
    spec = LLM(
        pair[0],
        max_num_batched_tokens=64,
        num_blocks=24,
        speculative_config=draft_config(pair, draft_num_blocks=30),
    )
    outputs = price_by_model(spec).generate(PROMPTS, GREEDY)
    assert spec.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outputs] == expected
    assert spec.engine.num_accepted_tokens > 0
    assert_pools_whole(spec)


def test_aborts_free_both_pools(pair):
    spec = LLM(pair[0], num_blocks=256, speculative_config=draft_config(pair))
    engine = spec.engine
    for i, prompt in enumerate(PROMPTS[:8]):
        engine.add_request(f"r{i}", prompt, GREEDY)
    for _ in range(4):
        engine.step()
    assert engine.drafter.num_held_blocks > 0
    for i in range(0, 8, 2):
        engine.abort_request(f"r{i}")
    held = {r.request_id for r in engine.scheduler.running}
    assert set(engine.drafter._seqs) <= held
    while engine.has_unfinished_requests():
        engine.step()
    assert_pools_whole(spec)


def test_decode_side_prefills_the_draft(pair):
    """Prefill on one engine, target KV copied into the blocks the decode engine reserved:
    the decode engine builds the draft's KV for the prompt itself, and its tokens equal a
    single engine's without speculation."""
    expected = plain_tokens(pair[0], PROMPTS)
    prefill = LLM(pair[0], num_blocks=256, max_num_batched_tokens=64)
    decode = LLM(
        pair[0], num_blocks=256, max_num_batched_tokens=64, speculative_config=draft_config(pair)
    )
    price_by_model(decode)
    assert handoff(prefill, decode, PROMPTS) == expected
    assert decode.engine.num_accepted_tokens > 0
    assert_pools_whole(decode)
    assert_pool_whole(prefill)


# -- sampling: the output distribution is the target's ------------------------------------------

TOP_K, NUM_TOKENS, NUM_SAMPLES = 3, 4, 400


def exact_distribution(model_dir, prompt) -> dict[tuple[int, ...], float]:
    """P(t1..t4) under the target sampled at temperature 1 with top-k 3, by expanding the
    whole tree of top-k continuations with transformers (one batched forward per level)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    probs = {(): 1.0}
    for _ in range(NUM_TOKENS):
        prefixes = list(probs)
        with torch.no_grad():
            logits = model(torch.tensor([prompt + list(p) for p in prefixes])).logits[:, -1]
        top = logits.topk(TOP_K, dim=-1)
        p_top = top.values.softmax(dim=-1)
        probs = {
            prefix + (int(token),): probs[prefix] * float(p)
            for prefix, tokens, ps in zip(prefixes, top.indices, p_top)
            for token, p in zip(tokens, ps)
        }
    return probs


def chi_square_p_value(samples: list[tuple[int, ...]], exact: dict) -> float:
    """Pearson's goodness-of-fit test; cells expected fewer than 5 times are pooled."""
    counts = {seq: 0 for seq in exact}
    for seq in samples:
        counts[seq] += 1  # a sequence outside the top-k tree is a KeyError: a failure too
    n = len(samples)
    observed, expected, pooled_o, pooled_e = [], [], 0, 0.0
    for seq, p in exact.items():
        if n * p >= 5:
            observed.append(counts[seq])
            expected.append(n * p)
        else:
            pooled_o, pooled_e = pooled_o + counts[seq], pooled_e + n * p
    observed.append(pooled_o)
    expected.append(pooled_e)
    o, e = torch.tensor(observed, dtype=torch.float64), torch.tensor(expected)
    statistic = float(((o - e) ** 2 / e).sum())
    df = len(observed) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2), torch.tensor(statistic / 2)))


def test_sampling_keeps_target_distribution(pair):
    """400 samples of 4 tokens (token 1 from the prefill step, tokens 2-4 through drafts of
    up to 3 tokens verified by the rejection rule with the draft's q) fit the target's exact
    distribution; the draft model's own samples, which differ from it by what the rule must
    correct, fail the same test."""
    prompt = random_prompts([6], seed=5)[0]
    exact = exact_distribution(pair[0], prompt)
    params = SamplingParams(max_tokens=NUM_TOKENS, temperature=1.0, top_k=TOP_K, ignore_eos=True)
    spec = LLM(
        pair[0],
        num_blocks=1024,
        max_num_seqs=NUM_SAMPLES,
        speculative_config=draft_config(pair, adaptive=False, max_batch_size=NUM_SAMPLES),
    )
    samples = [tuple(o.token_ids) for o in spec.generate([prompt] * NUM_SAMPLES, params)]
    engine = spec.engine
    assert engine.num_accepted_tokens > 0.3 * engine.num_draft_tokens > 0
    assert_pools_whole(spec)
    assert chi_square_p_value(samples, exact) > 1e-3

    draft_only = LLM(pair[1], num_blocks=1024, max_num_seqs=NUM_SAMPLES)
    control = [tuple(o.token_ids) for o in draft_only.generate([prompt] * NUM_SAMPLES, params)]
    assert chi_square_p_value([s for s in control if s in exact], exact) < 1e-3


def test_rule_with_q_accepts_more_than_point_mass():
    """Both rules keep p (test_speculative), but with the draft's q a draft x ~ q is accepted
    with probability sum_x min(p, q) = 1 - TV(p, q), against sum_x q p for a point mass."""
    from engine.speculative import rejection_sample

    gen = torch.Generator().manual_seed(1)
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.25] * 4])
    q = torch.tensor([[0.4, 0.4, 0.1, 0.1]])
    trials, with_q, point_mass = 6000, 0, 0
    for _ in range(trials):
        draft = [int(torch.multinomial(q[0], 1, generator=gen))]
        with_q += len(rejection_sample(p, draft, q, gen)) == 2
        point_mass += len(rejection_sample(p, draft, None, gen)) == 2
    assert with_q / trials == pytest.approx(float(torch.minimum(p[0], q[0]).sum()), abs=0.02)
    assert point_mass / trials == pytest.approx(float((p[0] * q[0]).sum()), abs=0.02)


# -- dynamic speculation ---------------------------------------------------------------------


def test_expected_tokens():
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)


def test_choose_num_drafts_rule():
    # Batch 1, drafts mostly right, verification free (under the roofline): all k.
    assert choose_num_drafts(1, 0.9, 4, 0.0, 256) == 4
    # A costly draft (half a target step per pass) earns fewer drafts.
    assert 0 < choose_num_drafts(1, 0.9, 4, 0.5, 256) < 4
    # Poor acceptance: none.
    assert choose_num_drafts(1, 0.02, 4, 0.1, 256) == 0
    # The batch grows past the roofline: k falls, then 0 even for perfect drafts.
    ks = [choose_num_drafts(b, 0.8, 4, 0.05, 256) for b in (1, 32, 64, 128, 256)]
    assert ks == sorted(ks, reverse=True) and ks[0] == 4 and ks[-1] == 0
    assert choose_num_drafts(512, 1.0, 4, 0.0, 256) == 0


def test_measured_step_cost_turns_speculation_off():
    """On a GPU a speculative step leaves the decode CUDA graphs: measured 3x the plain step
    where the model says 1x, the rule stops drafting what it drafted before."""
    meter = StepCostMeter()
    meter.observe_speculative(1, 1.0, 0.030)  # no plain step measured yet: ignored
    assert meter.factor == 1.0
    for _ in range(30):
        meter.observe_plain(1, 0.010)
        meter.observe_speculative(1, 1.0, 0.030)
    assert meter.factor == pytest.approx(3.0, rel=0.05)
    assert choose_num_drafts(1, 0.6, 4, 0.0, 256) > 0
    assert choose_num_drafts(1, 0.6, 4, 0.0, 256, overhead=meter.factor) == 0
    assert choose_num_drafts(1, 0.97, 4, 0.0, 256, overhead=meter.factor) > 0  # still pays


def test_no_speculation_before_a_plain_step_at_that_batch_size(pair):
    """Speculation is priced against plain steps: where none was timed yet (this batch size's
    power-of-two bucket), the engine runs one first, then drafts (its first ever is not
    timed)."""
    engine = LLM(pair[0], speculative=draft_config(pair), num_blocks=64).engine
    assert engine._step_num_drafts(3) == 0
    engine.step_cost.observe_plain(3, 0.01)  # the engine's first plain step is not timed
    assert engine._step_num_drafts(3) == 0
    engine.step_cost.observe_plain(3, 0.01)
    assert engine._step_num_drafts(3) > 0 and engine._step_num_drafts(4) > 0  # bucket 4
    assert engine._step_num_drafts(5) == 0  # bucket 8: not measured yet
    buckets = [StepCostMeter.bucket(b) for b in (1, 2, 3, 4, 5, 8, 9, 64, 65)]
    assert buckets == [1, 2, 4, 4, 8, 8, 16, 64, 128]


def test_failed_probes_back_off(pair):
    """With acceptance at zero, probes come at doubling intervals (16, 32, 64, ... steps apart),
    not every 16 steps: each costs more than a plain step."""
    llm = LLM(pair[0], speculative=draft_config(pair), num_blocks=64)
    engine = llm.engine
    engine.acceptance.accepted = 0.0
    for _ in range(2):  # plain steps at batch 1 have run (the first ever is not timed)
        engine.step_cost.observe_plain(1, 0.01)
    probes = [i for i in range(1, 501) if engine._step_num_drafts(1) > 0]
    assert probes == [16, 32, 64, 128, 256]  # gaps 16, 32, 64, 128


def test_acceptance_meter_estimates_per_draft_probability():
    """Drafts accepted with probability 0.6 each, k = 4 per step: the meter finds 0.6, where
    accepted / drafted would say about 0.32."""
    gen = torch.Generator().manual_seed(0)
    meter = AcceptanceMeter()
    for _ in range(300):
        steps = []
        for _ in range(8):
            accepted = 0
            while accepted < 4 and torch.rand(1, generator=gen).item() < 0.6:
                accepted += 1
            steps.append((4, accepted))
        meter.update(steps)
    assert meter.acceptance == pytest.approx(0.6, abs=0.06)


@pytest.mark.usefixtures("unbudgeted_shadow_lookups")
@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_dynamic_off_for_large_batch(pair, method):
    """Priced as on CPU (saturation 8 tokens), 16 decoding requests make verification cost
    more than it could gain: steps with all 16 decoding verify no drafts, while one request
    alone speculates; the tokens are the same either way."""
    config = {"method": method, "num_speculative_tokens": 4, "saturation_tokens": 8}
    if method == "draft":
        config["model"] = str(pair[1])
    prompts = [(p * 6)[:60] for p in random_prompts([8] * 16, seed=3)]
    expected = plain_tokens(pair[0], prompts)
    engine = LLM(pair[0], num_blocks=512, speculative_config=config).engine
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, GREEDY)
    results = {f"r{i}": [] for i in range(16)}
    full_steps = 0
    while engine.has_unfinished_requests():
        decoding = sum(r.num_output_tokens > 0 for r in engine.scheduler.running)
        for out in engine.step():
            results[out.request_id].extend(out.new_token_ids)
        if decoding == 16:
            full_steps += 1
            assert engine.last_step.num_draft_tokens == 0
    assert full_steps > 10
    assert list(results.values()) == expected
    alone = LLM(pair[0], num_blocks=512, max_num_seqs=1, speculative_config=config)
    assert [o.token_ids for o in alone.generate(prompts[:2], GREEDY)] == expected[:2]
    assert alone.engine.num_draft_tokens > 0


def test_draft_config_errors(pair, tmp_path):
    from engine.testing import write_test_checkpoint

    other = write_test_checkpoint(tmp_path / "other", vocab_size=640, num_hidden_layers=1)
    with pytest.raises(ValueError, match="share the target's tokenizer"):
        LLM(pair[0], num_blocks=64, speculative_config={"method": "draft", "model": str(other)})


def test_truncated_draft_shares_the_head(pair):
    from safetensors.torch import load_file

    target, draft = (load_file(p / "model.safetensors") for p in pair)
    assert set(draft) < set(target)
    assert not any(name.startswith("model.layers.1.") for name in draft)
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(draft[name], target[name])
