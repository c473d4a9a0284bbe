"""Sliding window and attention sinks through the disaggregated path: a real PrefillWorker and
DecodeWorker in this process, KV over gloo. The decode side reserves only the blocks its next
token can see, only those travel, and decoding from them gives the reference's tokens."""

from __future__ import annotations

import threading
import time

import pytest

from decode_worker.worker import DecodeWorker
from engine import SamplingParams
from engine.testing import write_test_checkpoint
from kvtransfer import start_store
from prefill_worker.worker import PrefillWorker
from tests.helpers import Reference, random_prompts
from tests.test_attention_sinks import StreamingReference
from tests.test_sliding_window import set_config

BLOCK, MAX_TOKENS = 8, 20
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(engine args, reference) for Mistral with a 20-token window and Llama with 4 sinks and a
    16-token window."""
    mistral = write_test_checkpoint(tmp_path_factory.mktemp("mistral"), architecture="mistral")
    set_config(mistral, sliding_window=20)
    llama = write_test_checkpoint(tmp_path_factory.mktemp("llama"))
    return {
        "window": ({"model": str(mistral)}, Reference(mistral)),
        "sinks": (
            {"model": str(llama), "attention_sinks": 4, "sink_window": 16},
            StreamingReference(llama, 4, 16),
        ),
    }


def wait_free(worker, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = worker.stats()
        if stats["num_free_blocks"] == stats["num_blocks"]:
            return
        time.sleep(0.05)
    raise AssertionError(f"{worker.worker_id} kept blocks: {worker.stats()}")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["window", "sinks"])
def test_only_live_blocks_travel(checkpoints, kind):
    engine_args, reference = checkpoints[kind]
    engine_args = {
        **engine_args,
        "block_size": BLOCK,
        "num_blocks": 64,
        "device": "cpu",
        "max_num_batched_tokens": 32,
    }
    prompts = random_prompts([70, 45, 9], seed=17)
    store, port = start_store()
    prefill = PrefillWorker("p", engine_args, "127.0.0.1", port, transfer_timeout_s=20)
    decode = DecodeWorker("d", engine_args, "127.0.0.1", port, transfer_timeout_s=20)
    try:
        thread = threading.Thread(target=decode.connect, args=("p",))
        thread.start()
        prefill.connect("d")
        thread.join()
        sent = []
        start_send = prefill.agent.start_send

        def spy(transfer_id, peer, block_ids):
            sent.append(len(block_ids))
            return start_send(transfer_id, peer, block_ids)

        prefill.agent.start_send = spy
        tokens = {}
        for i, prompt in enumerate(prompts):
            rid = f"r{i}"
            assert decode.reserve(rid, 100 + i, "p", prompt, GREEDY)
            result = prefill.prefill(rid, 100 + i, prompt, GREEDY, "d")
            assert result.transfer == "done"
            decode.start(rid, result.first_token, result.first_logprobs)
            tokens[rid] = [result.first_token]
        finished, deadline = set(), time.monotonic() + 60
        while len(finished) < len(prompts) and time.monotonic() < deadline:
            for batch in decode.poll_updates(timeout_s=1.0):
                for update in batch:
                    assert update.error is None, update.error
                    tokens[update.request_id] += update.new_token_ids
                    if update.finish_reason:
                        finished.add(update.request_id)
        window = decode.engine.kv_manager.window
        full = [-(-len(p) // BLOCK) for p in prompts]
        assert sent == [window.num_live_blocks(len(p), len(p)) for p in prompts]
        assert sent[0] < full[0] and sent[1] < full[1]  # the 9-token prompt fits its window
        for i, prompt in enumerate(prompts):
            assert tokens[f"r{i}"] == reference.greedy(prompt, MAX_TOKENS), f"prompt {i}"
        wait_free(prefill)
        wait_free(decode)
    finally:
        prefill.shutdown()
        decode.shutdown()
        del store
