"""benchmarks/planner_replay.py: the planner's prediction replayed with step scales."""

from __future__ import annotations

from benchmarks import planner_replay


def test_slower_continued_steps_lower_the_replayed_prediction(capsys):
    planner_replay.main(
        [
            "--prefill",
            "0.01",
            "1e-5",
            "0",
            "--decode",
            "0.005",
            "1e-5",
            "0",
            "--budget",
            "1024",
            "--input-len",
            "1500",
            "--output-len",
            "8",
            "--rates",
            "20",
            "40",
            "--min-duration-s",
            "5",
            "--seeds",
            "2",
            "--ttft-slo-ms",
            "1000",
            "--scales",
            "1,1,0",
            "1,1.2,0",
        ]  # fmt: skip
    )
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines()[1:]]
    assert len(rows) == 2
    base, slower = (float(r[2]) for r in rows)  # the max rates
    assert slower < base
