"""Sliding-window attention with a rolling KV buffer (kv_cache/window.py).

Mistral with a 20-token window (block size 8) and prompts several windows long: greedy tokens
equal transformers under chunked prefill, prefix-cache hits and preemption, while blocks that
left the window go back to the pool. Per-layer windows (Qwen2 `layer_types`): equal to
transformers, and nothing is freed while a layer is global.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from engine import LLM, SamplingParams
from engine.config import ModelConfig
from engine.kv_cache import KVWindow
from engine.testing import write_test_checkpoint
from tests.helpers import Reference, random_prompts

WINDOW, BLOCK = 20, 8


def set_config(path, **values):
    config = json.loads((path / "config.json").read_text())
    config.update(values)
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory):
    path = write_test_checkpoint(tmp_path_factory.mktemp("mistral"), architecture="mistral")
    return set_config(path, sliding_window=WINDOW)


@pytest.fixture(scope="module")
def mistral_ref(mistral_dir):
    return Reference(mistral_dir)


def greedy(n):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def check_blocks(engine):
    """Ref counts equal the blocks the running requests hold; a held block never sits in a
    freed slot; each request holds no more than the window allows."""
    kv = engine.kv_manager
    held: dict[int, int] = {}
    for request in engine.scheduler.running:
        ids = kv.held_block_ids(request.request_id)
        bound = kv.window.peak_blocks(request.num_tokens, engine.config.max_num_batched_tokens)
        assert len(ids) <= bound, f"{request.request_id} holds {len(ids)} > {bound}"
        for block_id in ids:
            held[block_id] = held.get(block_id, 0) + 1
    for block in kv.pool.blocks:
        assert block.ref_cnt == held.get(block.block_id, 0), f"block {block.block_id}"
    assert kv.num_free_blocks == kv.num_blocks - len(held)


def run_checked(llm, prompts, params):
    engine = llm.engine
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[int(out.request_id)] = out
        check_blocks(engine)
    kv = engine.kv_manager
    assert kv.num_free_blocks == kv.num_blocks
    return [outputs[i] for i in range(len(prompts))]


def test_window_changes_the_answer(mistral_dir, mistral_ref, tmp_path):
    """The test model really depends on the window (else the tests below could not fail)."""
    full_dir = set_config(shutil.copytree(mistral_dir, tmp_path / "full"), sliding_window=None)
    prompt = random_prompts([70], seed=1)[0]
    assert Reference(full_dir).greedy(prompt, 16) != mistral_ref.greedy(prompt, 16)


@pytest.mark.parametrize("budget", [16, 256])
def test_matches_transformers_with_chunked_prefill(mistral_dir, mistral_ref, budget):
    prompts = random_prompts([70, 100, 5, 41], seed=1)
    llm = LLM(mistral_dir, block_size=BLOCK, num_blocks=64, max_num_batched_tokens=budget)
    outputs = run_checked(llm, prompts, greedy(30))
    for prompt, out in zip(prompts, outputs):
        assert out.token_ids == mistral_ref.greedy(prompt, 30)


def test_prefix_cache_hits_and_preemption(mistral_dir, mistral_ref):
    base = random_prompts([60], seed=7)[0]
    prompts = [base + p for p in random_prompts([9, 30, 17, 3], seed=8)]
    # 10 blocks: four requests of 4 to 8 live blocks each cannot all run at once.
    llm = LLM(mistral_dir, block_size=BLOCK, num_blocks=10, max_num_batched_tokens=32)
    check_preemption_then_prefix_hits(llm, prompts, mistral_ref, 24)


def check_preemption_then_prefix_hits(llm, prompts, reference, max_tokens):
    """Run twice: the first time with preemptions, the second from the prefix cache; both give
    the reference's tokens."""
    first = run_checked(llm, prompts, greedy(max_tokens))
    assert llm.engine.scheduler.num_preemptions > 0
    again = run_checked(llm, prompts, greedy(max_tokens))
    assert llm.engine.kv_manager.stats.hit_tokens > 0
    for prompt, a, b in zip(prompts, first, again):
        expected = reference.greedy(prompt, max_tokens)
        assert a.token_ids == expected and b.token_ids == expected


def test_memory_bounded_while_generating_ten_windows(mistral_dir, mistral_ref):
    """A request generating 10x the window never holds more than window + chunk + one block."""
    prompt = random_prompts([30], seed=3)[0]
    llm = LLM(mistral_dir, block_size=BLOCK, num_blocks=64, max_num_batched_tokens=16)
    engine = llm.engine
    engine.add_request("long", prompt, greedy(10 * WINDOW))
    peak = 0
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
        check_blocks(engine)
        peak = max(peak, 64 - engine.kv_manager.num_free_blocks)
    total = 30 + 10 * WINDOW
    bound = -(-(WINDOW + 16) // BLOCK) + 1
    print(f"peak {peak} blocks for {total} tokens (full cache: {-(-total // BLOCK)})")
    assert peak <= bound < -(-total // BLOCK) // 4
    assert outputs[-1].finished
    assert outputs[-1].token_ids == mistral_ref.greedy(prompt, 10 * WINDOW)


def test_only_live_blocks_are_reserved_for_a_transfer(mistral_dir):
    llm = LLM(mistral_dir, block_size=BLOCK, num_blocks=64)
    engine = llm.engine
    ids = engine.reserve("r", random_prompts([70], seed=2)[0], greedy(4))
    window = engine.kv_manager.window
    assert len(ids) == window.num_live_blocks(70, 70) == 9 - (70 - WINDOW + 1) // BLOCK
    table = engine.kv_manager.block_ids("r")
    assert len(table) == 9 and table[-len(ids) :] == ids
    engine.release("r")
    assert engine.kv_manager.num_free_blocks == 64


# -- per-layer windows -------------------------------------------------------------------------


def qwen2_config(**values):
    base = {
        "architectures": ["Qwen2ForCausalLM"],
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "use_sliding_window": True,
        "sliding_window": 16,
    }
    return ModelConfig.from_dict({**base, **values})


def test_layer_windows_from_config():
    # transformers: Qwen2's layers from max_window_layers on slide, the ones below are global.
    assert qwen2_config(max_window_layers=2).layer_windows == (None, None, 16, 16)
    assert qwen2_config(max_window_layers=2).kv_window is None
    assert qwen2_config(max_window_layers=0).kv_window == 16
    assert qwen2_config(use_sliding_window=False).kv_window is None
    types = ["sliding_attention", "full_attention"] * 2
    assert qwen2_config(layer_types=types).layer_windows == (16, None, 16, None)
    with pytest.raises(ValueError, match="layer_types"):
        qwen2_config(layer_types=["sliding_attention"])
    assert KVWindow(8, 16).first_live_block(40) == 3  # keys 25.. are still visible
    assert KVWindow(8, 16, 4).is_live(0, 400) and not KVWindow(8, 16, 4).is_live(1, 400)


@pytest.mark.parametrize("types", [["sliding_attention", "full_attention"], None])
def test_per_layer_windows_match_transformers(tmp_path, types):
    """Alternating local/global layers (`layer_types`) equal transformers and free nothing (a
    block holds every layer); all-local layers (max_window_layers 0) free as Mistral does."""
    path = write_test_checkpoint(tmp_path / "qwen2", architecture="qwen2")
    window = {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 0}
    set_config(path, **window, **({"layer_types": types} if types else {}))
    prompts = random_prompts([70, 33], seed=4)
    llm = LLM(path, block_size=BLOCK, num_blocks=64, max_num_batched_tokens=32)
    engine = llm.engine
    assert engine.model_config.layer_windows == ((WINDOW, None) if types else (WINDOW, WINDOW))
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, greedy(20))
    outputs, freed = {}, False
    kv = engine.kv_manager
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[int(out.request_id)] = out.token_ids
        check_blocks(engine)
        for r in engine.scheduler.running:
            rid = r.request_id
            freed |= len(kv.held_block_ids(rid)) < len(kv.block_ids(rid))
    reference = Reference(path)
    for i, prompt in enumerate(prompts):
        assert outputs[i] == reference.greedy(prompt, 20)
    assert freed == (types is None)


# -- GPU: the Triton kernels and CUDA graphs over the rolling buffer (`pytest -m gpu`) ---------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("eager", [False, True])
def test_gpu_window_matches_transformers(mistral_dir, mistral_ref, eager):
    """Triton decode (graphs on and off) and paged prefill over tables with freed slots:
    chunked prefill, preemption and prefix-cache hits, float32 against transformers."""
    base = random_prompts([60], seed=7)[0]
    prompts = random_prompts([70, 100, 5, 41], seed=1) + [base + p for p in ([1, 2], [3] * 9)]
    llm = LLM(
        mistral_dir,
        device="cuda",
        dtype="float32",
        enforce_eager=eager,
        block_size=BLOCK,
        num_blocks=12,
        max_num_batched_tokens=32,
    )
    assert type(llm.engine.runner.backend).__name__ == "TritonAttentionBackend"
    for _ in range(2):  # the second time through the prefix cache
        outputs = run_checked(llm, prompts, greedy(40))
        for prompt, out in zip(prompts, outputs):
            assert out.token_ids == mistral_ref.greedy(prompt, 40)
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.kv_manager.stats.hit_tokens > 0
