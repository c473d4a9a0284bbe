"""A decode worker releases a cancelled reservation's blocks only when the KV agent says
nothing more will be written into them: at once when `cancel` says so (gloo), or when `poll`
reports the transfer CANCELLED (CUDA: copies were already queued behind receives in flight).
The agent here is a stand-in with that contract; the real one is tested in test_kvtransfer."""

from __future__ import annotations

import threading
import time

import pytest

from decode_worker.worker import DecodeWorker
from engine import SamplingParams
from kvtransfer import TransferState

PARAMS = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


class QueuedCopiesAgent:
    """Cancels with copies still queued: the blocks stay busy until `drained`."""

    def __init__(self, free_now: bool):
        self.free_now = free_now
        self.expected: dict[int, list[int]] = {}
        self.results: dict[int, TransferState] = {}
        self.lock = threading.Lock()

    def expect(self, transfer_id, peer_id, block_ids):
        self.expected[transfer_id] = block_ids

    def cancel(self, transfer_id) -> bool:
        self.expected.pop(transfer_id, None)
        return self.free_now

    def drained(self, transfer_id):
        with self.lock:
            self.results[transfer_id] = TransferState.CANCELLED

    def poll(self):
        with self.lock:
            results, self.results = self.results, {}
        return results

    def close(self):
        pass


def free_blocks(worker) -> int:
    return worker.stats()["num_free_blocks"]


def wait_until(predicate, timeout_s=10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


@pytest.mark.timeout(60)
@pytest.mark.parametrize("free_now", [True, False])
def test_cancelled_reservation_frees_blocks_when_the_agent_says_so(model_dir, free_now):
    args = {"model": str(model_dir), "device": "cpu", "num_blocks": 32, "block_size": 4}
    worker = DecodeWorker("d", args, "127.0.0.1", 0, colocated=True)
    agent = worker.agent = QueuedCopiesAgent(free_now)
    try:
        total = free_blocks(worker)
        assert worker.reserve("r1", 7, "p", list(range(1, 20)), PARAMS)
        held = total - free_blocks(worker)
        assert held == 5
        worker.abort("r1")
        if free_now:
            assert free_blocks(worker) == total
            return
        time.sleep(0.3)
        assert free_blocks(worker) == total - held  # copies may still land: kept
        agent.drained(7)
        assert wait_until(lambda: free_blocks(worker) == total)
        # The next reservation and its abort follow the same path; nothing is left behind.
        assert worker.reserve("r2", 8, "p", list(range(1, 9)), PARAMS)
        worker.abort("r2")
        agent.drained(8)
        assert wait_until(lambda: free_blocks(worker) == total)
    finally:
        worker.shutdown()
