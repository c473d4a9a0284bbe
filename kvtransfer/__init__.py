"""Moving KV pages between workers: prefill sends a request's blocks, layer by layer, into the
decode worker's reserved blocks over a size-2 torch.distributed group per pair (NCCL on GPU,
gloo on CPU). Never frees blocks itself: it reports what finished."""

from kvtransfer.agent import KVTransferAgent, SendHandle, TransferState
from kvtransfer.store import start_store

__all__ = ["KVTransferAgent", "SendHandle", "TransferState", "start_store"]
