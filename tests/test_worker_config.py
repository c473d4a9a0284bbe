"""What each worker role's engine captures by default, and that a pool's engine_args still
decide: a prefill worker never decodes (no decode graphs), a disaggregated decode worker
recomputes only preempted requests (no prefill graphs)."""

from __future__ import annotations

import pytest

from decode_worker.worker import DecodeWorker
from engine.testing import write_test_checkpoint
from kvtransfer import start_store
from prefill_worker.worker import PrefillWorker


@pytest.fixture(scope="module")
def engine_args(tmp_path_factory):
    model = write_test_checkpoint(tmp_path_factory.mktemp("model"))
    return {"model": str(model), "device": "cpu", "num_blocks": 32}


@pytest.mark.parametrize("pool_args", [{}, {"decode_graphs": True, "prefill_graphs": True}])
def test_role_defaults_and_pool_overrides(engine_args, pool_args):
    store, port = start_store()
    prefill = PrefillWorker("p", {**engine_args, **pool_args}, "127.0.0.1", port)
    decode = DecodeWorker("d", {**engine_args, **pool_args}, "127.0.0.1", port)
    try:
        asked = bool(pool_args)
        assert prefill.engine.config.decode_graphs is asked
        assert prefill.engine.config.prefill_graphs is True
        assert decode.engine.config.decode_graphs is True
        assert decode.engine.config.prefill_graphs is asked
    finally:
        prefill.shutdown()
        decode.shutdown()
        del store
