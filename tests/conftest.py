"""Shared fixtures: small random-weight checkpoints and the transformers reference on them."""

from __future__ import annotations

import pytest

from engine.testing import write_test_checkpoint
from tests.helpers import Reference


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """The default test model: Llama, GQA (4 heads, 2 KV heads), 2 layers, with a tokenizer."""
    return write_test_checkpoint(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def reference(model_dir):
    return Reference(model_dir)


@pytest.fixture
def unbudgeted_shadow_lookups(monkeypatch):
    """Dynamic n-gram speculation's shadow lookups as often as _SHADOW_PER_STEP allows: with
    1% of a tiny CPU model's steps as their time budget, a short run learns too little to
    speculate. The budget has its own test (`test_shadow_lookups_keep_to_their_time_budget`)."""
    import engine.engine

    monkeypatch.setattr(engine.engine, "_SHADOW_SHARE", 1.0)
    monkeypatch.setattr(engine.engine, "_SHADOW_MIN_SCALE", 1.0)
