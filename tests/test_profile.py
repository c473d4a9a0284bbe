"""`baton profile` measures an engine and writes a profile the router loads."""

from __future__ import annotations

import json

import pytest

from deploy.profile import fit, profile
from router.latency_model import load_profile, new_instance_model


def test_profile_fits_and_loads(model_dir, tmp_path):
    result = profile(
        {
            "model": str(model_dir),
            "num_blocks": 256,
            "max_num_batched_tokens": 256,
            "max_num_seqs": 8,
        },
        repeats=3,
        decode_steps=3,
    )
    assert result["num_samples"]["prefill"] >= 12 and result["num_samples"]["decode"] >= 4
    # Measured at this budget, and with steps that batch prompts or continue a chunk: the
    # planner simulates the prefill engine's steps under it.
    assert result["max_num_batched_tokens"] == 256
    for key in ("prefill", "decode"):
        assert all(c >= 0 for c in result[key]) and sum(result[key]) > 0
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(result))
    model = new_instance_model(load_profile(path))
    # A longer prompt is predicted to take longer; a bigger batch a longer step.
    assert model.prefill_time(512, 512) > model.prefill_time(16, 16)
    assert model.decode_step(8, 800) >= model.decode_step(1, 100)


def test_fit_takes_the_median_of_repeated_points():
    steady = [(n, n * n, 0.001 + 1e-5 * n) for n in (16, 64, 256, 512) for _ in range(3)]
    stalled = steady + [(16, 256, 0.2)]  # one step stalled behind another process
    assert fit(stalled) == pytest.approx([0.001, 1e-5, 0.0], abs=1e-6)
