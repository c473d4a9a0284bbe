"""`baton profile` measures an engine and writes a profile the router loads."""

from __future__ import annotations

import json

from deploy.profile import profile
from router.latency_model import load_profile, new_instance_model


def test_profile_fits_and_loads(model_dir, tmp_path):
    result = profile(
        {
            "model": str(model_dir),
            "num_blocks": 256,
            "max_num_batched_tokens": 512,
            "max_num_seqs": 8,
        },
        repeats=1,
        decode_steps=3,
    )
    assert result["num_samples"]["prefill"] >= 4 and result["num_samples"]["decode"] >= 4
    for key in ("prefill", "decode"):
        assert all(c >= 0 for c in result[key]) and sum(result[key]) > 0
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(result))
    model = new_instance_model(load_profile(path))
    # A longer prompt is predicted to take longer; a bigger batch a longer step.
    assert model.prefill_time(512, 512) > model.prefill_time(16, 16)
    assert model.decode_step(8, 800) >= model.decode_step(1, 100)
