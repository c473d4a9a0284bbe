"""benchmarks/prefill_steps.py: one engine's prefill steps measured against a latency model."""

from __future__ import annotations

import json

import pytest

from benchmarks import prefill_steps as ps
from engine import EngineConfig, LLMEngine
from router.latency_model import new_instance_model

BUDGET = 64
# 1 ms a step plus 0.1 ms a token: a 64-token step is predicted at 7.4 ms.
MODEL = new_instance_model(
    {"prefill": [1e-3, 1e-4, 0.0], "decode": [0, 0, 0], "transfer": [0, 0, 0]}
)


def step(tokens, context, seconds, device, chunks, end=1.0, backlog=0):
    return ps.MeasuredStep(
        end, seconds, len(chunks), tokens, sum(n * c for n, c, _ in chunks), context, backlog,
        wall_s=seconds, period_s=seconds, host_s=0.0, chunks=chunks, device_s=device,
    )  # fmt: skip


def test_kinds_and_bins_of_constructed_steps():
    steps = [
        # A long prompt's first chunk: no token read, so its duration is only the launch ...
        step(64, 64, 0.002, 0.0074, [(64, 64, False)]),
        # ... and the next step, reading tokens, waits for both: duration 2x, device 1x.
        step(64, 64 + 96, 0.0148, 0.0074, [(32, 96, True), (32, 64, False)]),
        step(40, 40, 0.005, 0.005, [(40, 40, True)]),  # fresh and read: as predicted
    ]
    kinds = ps.by_kind(steps, MODEL)
    assert kinds["all"]["steps"] == 3
    assert kinds["fresh only"]["steps"] == 2 and kinds["continued chunk"]["steps"] == 1
    assert kinds["fresh only, no token read"]["duration_over_predicted"] == pytest.approx(
        0.27, 0.01
    )
    cont = kinds["continued chunk, reads tokens"]
    assert cont["duration_over_predicted"] == pytest.approx(2.0)
    assert cont["device_over_predicted"] == pytest.approx(1.0)
    assert kinds["all"]["device_sum_over_predicted_sum"] == pytest.approx(1.0)
    [row] = ps.continued_bins(steps, MODEL, BUDGET)  # the 32-token chunk: bin [B/2, B]
    assert row["chunk_tokens"] == "32-64" and row["steps"] == 1
    assert row["context_mean"] == 96 and row["other_tokens_mean"] == 32
    assert row["device_minus_predicted_ms"] == pytest.approx(0.0, abs=1e-9)


@pytest.fixture(scope="module")
def engine(model_dir):
    config = EngineConfig(
        model=str(model_dir),
        device="cpu",
        dtype="float32",
        max_num_batched_tokens=BUDGET,
        max_model_len=512,
        num_blocks=128,
        enforce_eager=True,
    )
    return LLMEngine(config)


@pytest.fixture(scope="module")
def probe(engine):
    return ps.StepProbe(engine)


@pytest.mark.parametrize("rate", [None, 400.0])
def test_every_prompt_token_is_computed_once_in_chunks_under_the_budget(probe, rate):
    engine = probe.engine
    lengths, arrivals = ps.workload(8, 64, 0.5, rate, seed=3)
    # Other ids per case: the same prompts again would be prefix-cache hits.
    prompts = ps.random_prompts(lengths, engine.model_config.vocab_size, seed=int(rate or 4))
    steps = ps.run_workload(probe, prompts, arrivals, f"t{rate}")
    chunks = [c for s in steps for c in s.chunks]
    assert sum(n for n, _, _ in chunks) == sum(lengths)
    assert sum(ends for _, _, ends in chunks) == len(prompts)  # each prompt read once
    assert all(s.num_prefill_tokens <= BUDGET for s in steps)
    assert any(s.continued for s in steps)  # prompts of 32-96 tokens over a 64-token budget
    for s in steps:
        assert s.continued == any(ctx > n for n, ctx, _ in s.chunks)
        assert s.device_s == s.wall_s > 0 and s.wall_s >= s.seconds and s.host_s >= 0
    assert not engine.has_unfinished_requests()


def test_attention_choice_needs_the_triton_backend(engine):
    ps.set_attention(engine, "auto", None)
    with pytest.raises(SystemExit, match="Triton"):
        ps.set_attention(engine, "paged", None)


def test_cli_smoke_run(tmp_path, capsys):
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"prefill": [1e-3, 1e-4, 0.0], "decode": [0, 0, 0],
                                   "transfer": [0, 0, 0]}))  # fmt: skip
    shape = "--layers 1 --hidden-size 64 --intermediate-size 128 --heads 4 --kv-heads 2"
    argv = (
        f"--cpu --num-prompts 4 --input-len 96 --max-batched-tokens 64 --warmup 1 {shape} "
        f"--vocab-size 512 --mode backlog,poisson --rate 500 --profile 1 "
        f"--latency-profile {profile} --reference-prefill 0,1e-4,0"
    ).split()
    result = ps.main(argv)
    out = capsys.readouterr().out
    assert "continued-chunk steps by the continued chunk's length" in out
    assert "profiled" in out and "against the reference prefill form" in out
    assert json.loads(out.strip().splitlines()[-1])["bench"] == "prefill_steps"
    timed = [p for p in result["passes"] if p["mode"] != "profile"]
    assert [p["mode"] for p in timed] == ["backlog", "poisson"]
    assert all(p["profile"]["kinds"]["all"]["steps"] > 0 and "reference" in p for p in timed)
    [profiled] = [p["profiled"] for p in result["passes"] if p["mode"] == "profile"]
    assert all(k["busy_ms"] > 0 for k in profiled.values())
