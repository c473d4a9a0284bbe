"""The engine's outputs per request: cumulative (everything so far), delta (only what is new:
what a decode worker streams, without copying the whole output every step) and final (nothing
before the last: what `LLM.generate` reads)."""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, num_blocks=128)


def run(llm, kind: str, params: SamplingParams) -> list:
    engine = llm.engine
    engine.add_request("r", "The quick brown fox", params, output_kind=kind)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += [o for o in engine.step() if o.request_id == "r"]
    return outputs


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=2),
        SamplingParams(max_tokens=12, temperature=0.8, seed=3, ignore_eos=True),
    ],
)
def test_deltas_add_up_to_the_cumulative_output_and_final_is_the_last(llm, params):
    cumulative = run(llm, "cumulative", params)
    delta = run(llm, "delta", params)
    final = run(llm, "final", params)
    assert len(delta) == len(cumulative) > 1 and len(final) == 1
    last = cumulative[-1]
    assert last.finished and final[0].finished and delta[-1].finished
    assert [t for o in delta for t in o.token_ids] == last.token_ids == final[0].token_ids
    assert "".join(o.text for o in delta) == last.text == final[0].text
    for d, c in zip(delta, cumulative, strict=True):
        assert d.token_ids == d.new_token_ids == c.new_token_ids and d.text == c.new_text
    if params.logprobs is not None:
        assert [lp for o in delta for lp in o.logprobs] == last.logprobs == final[0].logprobs
        assert all(len(o.logprobs) == len(o.token_ids) for o in delta)
    assert final[0].finish_reason == last.finish_reason == "length"


def test_unknown_output_kind_is_refused(llm):
    with pytest.raises(ValueError, match="output_kind"):
        llm.engine.add_request("x", "Hello", SamplingParams(), output_kind="partial")
    assert not llm.engine.has_unfinished_requests()


def test_output_kinds_benchmark_runs():
    from benchmarks import output_kinds

    output_kinds.main(["--batch", "2", "--tokens", "20", "--repeats", "1"])


def test_without_detokenizing_outputs_carry_tokens_only(llm):
    engine = llm.engine
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    with pytest.raises(ValueError, match="stop strings"):
        engine.make_request("s", "Hello", SamplingParams(stop=["x"]), detokenize=False)
    request, state = engine.make_request("t", "The quick brown fox", params, "delta", False)
    engine.enqueue(request, state)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert all(o.text == "" for o in outputs)
    expected = run(llm, "cumulative", params)[-1].token_ids  # the same prompt, detokenized
    assert [t for o in outputs for t in o.token_ids] == expected
