"""benchmarks/mixed_step.py: the three kinds of step it times are what it says they are."""

from __future__ import annotations

from benchmarks import mixed_step

TINY = ["--hidden-size", "64", "--heads", "2", "--kv-heads", "1", "--layers", "1",
        "--vocab-size", "512"]  # fmt: skip


def test_reports_each_kind_and_the_input_packing(capsys):
    mixed_step.main([*TINY, "--batch", "4", "--prompt-len", "24", "--context-len", "16",
                     "--steps", "3", "--warmup", "1"])  # fmt: skip
    out = capsys.readouterr().out
    for kind in ("mixed", "decode", "prompt"):
        assert any(line.startswith(f"{kind} ") for line in out.splitlines()), out
    assert "ModelRunner._prepare): median" in out


def test_mixed_steps_each_admit_one_prompt_beside_the_decoders(tmp_path):
    from engine import LLM
    from engine.testing import write_test_checkpoint

    model = write_test_checkpoint(tmp_path / "m", vocab_size=512, with_tokenizer=False)
    llm = LLM(model, num_blocks=256, enable_prefix_caching=False)
    kinds = mixed_step.StepKinds(llm, batch=4, prompt_len=24, context_len=16, steps=4)
    engine = llm.engine
    assert len(engine.scheduler.running) == 3  # the B - 1 decoders, prefilled
    kinds.mixed()
    stats = engine.last_step
    assert stats.num_decode_tokens == 3 and stats.num_prefill_tokens == 24
    assert len(engine.scheduler.running) == 3  # the prompt finished in its own step
    kinds.with_full_batch()
    kinds.decode()
    assert engine.last_step.num_decode_tokens == 4 and engine.last_step.num_prefill_tokens == 0
    kinds.drop_decoders()
    assert not engine.scheduler.requests
    assert engine.scheduler.kv.num_free_blocks == engine.scheduler.kv.num_blocks
