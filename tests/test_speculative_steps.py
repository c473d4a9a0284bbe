"""benchmarks/speculative_steps.py: every step of a speculative engine's run, classified;
benchmarks/speculative_bookkeeping.py: what the speculation methods cost a step;
benchmarks/speculative.py: paired repeats, one engine, lengths in a new order each repeat."""

from __future__ import annotations

import pytest

from benchmarks import speculative_steps as steps

TINY = ["--hidden-size", "64", "--heads", "2", "--kv-heads", "1", "--layers", "2"]


@pytest.mark.usefixtures("unbudgeted_shadow_lookups")
def test_classes_cover_every_step_and_show_verification(capsys):
    steps.main([*TINY, "--batch", "4", "--max-tokens", "16", "--repeats", "1", "--async-scheduling",
                "--saturation-tokens", "256"])  # fmt: skip
    lines = {line.split()[1]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert set(lines) == {"plain", "static", "dynamic"}
    assert "verify" not in lines["plain"] and "plain+chain" in lines["plain"]
    assert "verify" in lines["static"] and "0 lookups" not in lines["static"]
    assert "plain+chain" not in lines["static"]  # every step may propose: none chains


def test_trace_run_restores_the_engine(tmp_path):
    from engine import LLM, SamplingParams
    from engine.testing import write_test_checkpoint

    model = write_test_checkpoint(tmp_path / "m", with_tokenizer=False)
    llm = LLM(model, num_blocks=64, speculative={"method": "ngram", "adaptive": False})
    engine = llm.engine
    step, lookup = engine.step, engine.proposer.lookup
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    run = steps.trace_run(llm, [[5, 6, 7, 5, 6, 7, 5, 6]] * 2, params)
    assert sum(count for count, _, _ in run["classes"].values()) >= 7  # one token a step, or more
    assert engine.step == step and engine.proposer.lookup == lookup
    assert run["lookups"] > 0 and run["drafted"] > 0


def test_brief_workload_holds_only_the_continuations_first_tokens(tmp_path):
    from argparse import Namespace

    from benchmarks.speculative import copy_workload
    from engine import LLM, SamplingParams
    from engine.testing import write_test_checkpoint

    model = write_test_checkpoint(tmp_path / "m", with_tokenizer=False)
    args = Namespace(dtype="float32", max_tokens=8)
    full = copy_workload(model, 2, 512, args, 1)
    brief = copy_workload(model, 2, 512, args, 1, copy_tokens=3)
    for whole, short in zip(full, brief):
        doc = whole[:128]
        assert len(whole) == 128 + 8 + 128 and whole[-128:] == doc
        assert short == doc + whole[128:131] + doc  # the document, 3 tokens of C, the document
    greedy = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    continuation = LLM(model, num_blocks=64).generate([brief[0][:128]], greedy)[0].token_ids
    assert brief[0][128:131] == continuation


def test_bookkeeping_times_each_method_and_restores_the_engine(capsys):
    from benchmarks import speculative_bookkeeping as book

    book.main([*TINY, "--vocab-size", "512", "--batch", "4", "--waves", "2", "--max-tokens", "8"])
    out = capsys.readouterr().out.splitlines()
    assert "steps" in out[0]
    rows = {line.split()[0]: line for line in out[1:]}
    assert set(rows) == {*book.ENGINE_METHODS, "lookup", "all"}
    assert int(rows["_propose"].split()[1]) > 0  # once a step


def test_paired_repeats_of_one_engine_with_shuffled_lengths(capsys):
    from benchmarks import speculative

    lengths = speculative.output_lengths(16, 0.5, 8)
    assert sorted(speculative.shuffled(lengths, 1)) == sorted(lengths)
    assert speculative.shuffled(lengths, 1) != speculative.shuffled(lengths, 2)
    speculative.main([*TINY, "--methods", "ngram", "--models", "markov", "--workloads", "brief",
                      "--batch-sizes", "4", "--waves", "2", "--max-tokens", "16",
                      "--length-spread", "0.5", "--shuffle-lengths", "--repeats", "2",
                      "--engines", "dynamic"])  # fmt: skip
    out = capsys.readouterr().out
    [row] = [line for line in out.splitlines() if line.startswith("ngram")]
    assert row.split()[5] == "-"  # static left out
    [pairs] = [line for line in out.splitlines() if "dynamic pairs" in line]
    assert len(pairs.split(":")[1].split()) == 2  # one ratio a repeat
