"""Inputs of a CUDA-graph decode step, checked on CPU: the packed, padded layout the graphs read
(`ModelRunner._prepare_decodes`) holds the same values as the general packing for the real rows,
and padding rows that touch only the scratch block."""

from __future__ import annotations

import torch

from engine import LLM, SamplingParams
from tests.helpers import random_prompts


def test_padded_decode_inputs_match_general_packing(model_dir):
    llm = LLM(model_dir, num_blocks=64)
    engine = llm.engine
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(random_prompts([5, 16, 40], seed=9)):
        engine.add_request(str(i), prompt, params)
    engine.step()  # the three prefills
    engine.step()  # one decode each: positions 5, 16 (a new block), 40
    sched = engine.scheduler.schedule()
    assert [s.num_tokens for s in sched.scheduled] == [1, 1, 1]
    runner = engine.runner
    ids, pos, meta, rows, _ = runner._prepare(sched)
    g_ids, g_pos, g_meta, g_rows, _ = runner._prepare(sched, pad_to=4)

    scratch = runner.num_blocks
    assert g_rows == rows == [0, 1, 2]
    assert g_ids.tolist() == ids.tolist() + [0]
    assert g_pos.tolist() == pos.tolist() + [0]
    assert g_meta.slot_mapping.tolist() == meta.slot_mapping.tolist() + [scratch * 16]
    assert g_meta.seq_lens == meta.seq_lens
    assert g_meta.backend_data.tolist() == meta.seq_lens + [1]
    width = meta.block_tables.shape[1]
    for row, s in enumerate(sched.scheduled):
        n = len(s.block_ids)
        assert torch.equal(g_meta.block_tables[row, :n], meta.block_tables[row, :n])
    assert (g_meta.block_tables[3] == scratch).all() and g_meta.block_tables.shape == (4, width)
    # The scratch block is not one the scheduler can hand out.
    assert scratch == engine.kv_manager.num_blocks
