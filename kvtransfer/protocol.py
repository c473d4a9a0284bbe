"""What travels on a pair: one header per transfer through the store, then the KV messages.

A transfer of blocks B (same count on both sides, different ids) is, after its header:

    message 0: layers [0, k)      one contiguous tensor [k, 2, len(B), block_size, heads, head_dim]
    message 1: layers [k, 2k)     layer i of the message = kv_caches[first + i][:, B]
    ...                           (copied as rows: see KVLayout.as_rows)
    ...
    message m-1: the rest         (fewer layers when k does not divide num_layers)

k (`layers_per_message`) is the sender's choice, written in the header, so the receiver sizes its
buffers without knowing the sender's `min_message_bytes`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import torch

TRANSFER, BROKEN, CLOSE = "transfer", "broken", "close"


@dataclass(frozen=True)
class Header:
    kind: str  # TRANSFER; BROKEN (the sender broke the pair); CLOSE (the receiver stops itself)
    transfer_id: int = -1
    num_blocks: int = 0
    layers_per_message: int = 0

    def encode(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @staticmethod
    def decode(raw: bytes) -> Header:
        return Header(**json.loads(raw))


@dataclass(frozen=True)
class KVLayout:
    """The shape every layer's cache shares: [2, num_blocks, block_size, num_kv_heads, head_dim]."""

    num_layers: int
    block_shape: tuple[int, int, int]  # block_size, num_kv_heads, head_dim
    dtype: torch.dtype
    device: torch.device

    @staticmethod
    def of(kv_caches: list[torch.Tensor]) -> KVLayout:
        if not kv_caches:
            raise ValueError("kv_caches is empty")
        first = kv_caches[0]
        if first.dim() != 5 or first.shape[0] != 2:
            raise ValueError(
                f"each layer's cache must be [2, num_blocks, block_size, heads, head_dim], "
                f"got {tuple(first.shape)}"
            )
        for i, kv in enumerate(kv_caches):
            if kv.shape != first.shape or kv.dtype != first.dtype or kv.device != first.device:
                raise ValueError(
                    f"layer {i}'s cache {tuple(kv.shape)} {kv.dtype} {kv.device} differs from "
                    f"layer 0's {tuple(first.shape)} {first.dtype} {first.device}"
                )
            if not kv.is_contiguous():
                raise ValueError(f"layer {i}'s cache is not contiguous")
        return KVLayout(len(kv_caches), tuple(first.shape[2:]), first.dtype, first.device)

    def describe(self) -> str:
        """What both ends of a pair must agree on (num_blocks may differ)."""
        block_size, heads, head_dim = self.block_shape
        return f"layers={self.num_layers},block={block_size}x{heads}x{head_dim},{self.dtype}"

    def layer_bytes(self, num_blocks: int) -> int:
        return 2 * num_blocks * math.prod(self.block_shape) * self.dtype.itemsize

    def message_shape(self, num_layers: int, num_blocks: int) -> tuple[int, ...]:
        return (num_layers, 2, num_blocks, *self.block_shape)

    def as_rows(self, kv: torch.Tensor) -> torch.Tensor:
        """A contiguous [..., 2, n, *block_shape] as [rows, words], one row per block's K or V:
        for one layer's cache row j < n is block j's K, row n + j its V; a message's buffer is
        its layers' rows one after the other. Gathers and scatters then copy whole rows of
        8-byte words: element-wise 2-byte (bf16) copies of a 5-D tensor run far below memory
        bandwidth."""
        return kv.view(-1, math.prod(self.block_shape)).view(self._word())

    def stacked_rows(self, kv_caches: list[torch.Tensor]) -> torch.Tensor | None:
        """Every layer's rows as one [num_layers * 2 * num_blocks, words] view, when the caches
        are consecutive slices of one allocation (the model runner allocates them so); else
        None. Layer l's row r is row l * 2 * num_blocks + r: a message's gather or scatter is
        then one kernel for all its layers, not one per layer (~25 us of host time each, more
        than the copy of a layer of a 2048-token prompt takes on an H100)."""
        first = kv_caches[0]
        storage = first.untyped_storage().data_ptr()
        layer_bytes = first.numel() * first.element_size()
        for i, kv in enumerate(kv_caches):
            if kv.untyped_storage().data_ptr() != storage:
                return None
            if kv.data_ptr() != first.data_ptr() + i * layer_bytes:
                return None
        rows = self.as_rows(first)
        per_layer = rows.shape[0]
        return rows.as_strided(
            (self.num_layers * per_layer, rows.shape[1]), rows.stride(), rows.storage_offset()
        )

    def _word(self) -> torch.dtype:
        block_bytes = math.prod(self.block_shape) * self.dtype.itemsize
        for word in (torch.int64, torch.int32, torch.int16):
            if block_bytes % word.itemsize == 0:
                return word
        return torch.uint8


def layers_per_message(layer_bytes: int, min_message_bytes: int, num_layers: int) -> int:
    """The fewest consecutive layers whose KV reaches `min_message_bytes` (at least 1)."""
    wanted = math.ceil(min_message_bytes / max(layer_bytes, 1))
    return max(1, min(num_layers, wanted))


def message_plan(num_layers: int, per_message: int) -> list[tuple[int, int]]:
    """(first layer, layer count) of each message, in sending order: `per_message` layers a
    message, and the last layer alone. The last message can only leave once the forward pass
    has computed the last layer; what it carries is the transfer's tail on the critical path
    (its time on the wire plus its scatter), so it carries one layer, not `per_message`.

    NOTE: sending the first layer alone too (to start the wire ~40 us sooner) made the NCCL
    stall-and-reconnect test fail on 2x H100 (2026-11-26): a sender that stalls after layer 0
    then leaves a message on the wire before the stall, and the pair's reconnect after the
    receiver's timeout did not complete. Not understood yet; see that test before retrying."""
    body = num_layers - 1 if per_message > 1 and num_layers > 1 else num_layers
    plan = [(first, min(per_message, body - first)) for first in range(0, body, per_message)]
    return plan + [(body, 1)] if body < num_layers else plan
