"""The decode side's scatter launched ahead of its data, and the guard that can still stop it.

With NCCL (`kvtransfer.nccl`) the receiver thread queues the scatter of each group of messages
on the GPU right behind their receives, before a byte has arrived (kvtransfer.receiver): the copy
into the blocks then starts as soon as the last byte lands, with no host round trip per message
(the receiver thread had lagged the wire by ~100 us a message on the H200 hosts, and launched the
last scatter 123 us after the last byte: session 11's trace; queued, it starts 1-3 us after).

A queued scatter is a hazard: `cancel` promises that nothing more is written into the blocks once
it returns, and a failed transfer's blocks go back to the pool, yet the scatter may still sit
behind a receive that completes later (or exits when an abort ends it, over a half-filled buffer).
So every launched scatter checks a guard word when it runs:

    guards[slot] == token   ->  the scatter writes nothing
    anything else           ->  it copies its rows

Each transfer takes the next token of its agent (1, 2, 3, ...) and the slot `token % SLOTS`;
`disable` stores the token there. No word is ever armed (so no arming can race a disable). A
disabled slot stays held until the transfer's last queued scatter has run: a later token of the
same slot would overwrite the word and bring the stopped scatters back to life (a stalled pair
can hold them for its whole timeout while other pairs go through a thousand transfers), so
`next_token` skips a held slot's tokens.

    guard.launch(dst_rows, rows, src_rows, token)   # on the current stream, after its receive
    guard.disable(token, last_scatter)              # any thread; queued scatters write nothing
"""

from __future__ import annotations

import threading
from functools import cache

import torch

SLOTS = 1024
_BLOCK = 1024  # words (8 KiB of int64) a program copies


def available(device: torch.device) -> bool:
    """Whether guarded scatters can run on `device`: CUDA, and Triton."""
    return device.type == "cuda" and _kernel() is not None


@cache
def _kernel():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    # NOTE: Triton compiles a variant per value class of an int argument (1, a multiple of 16,
    # other): `slot` and `token` change with every transfer and must not recompile the kernel.
    @triton.jit(do_not_specialize=["slot", "token"])
    def guarded_scatter(
        dst, rows, src, guards, slot, token, num_words, dst_stride, src_stride, BLOCK: tl.constexpr
    ):
        """Program (r, c): words [c * BLOCK, (c + 1) * BLOCK) of source row r into the
        destination row rows[r], unless guards[slot] == token."""
        r = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        disabled = tl.load(guards + slot, volatile=True) == token
        mask = cols < tl.where(disabled, 0, num_words)
        row = tl.load(rows + r)
        words = tl.load(src + r * src_stride + cols, mask=mask)
        tl.store(dst + row * dst_stride + cols, words, mask=mask)

    return guarded_scatter


class Guard:
    """One agent's guard words, on its device, for as long as the agent lives: a queued scatter
    may read them after a pair is gone."""

    def __init__(self, device: torch.device):
        self.device = device
        self.words = torch.zeros(SLOTS, dtype=torch.int64, device=device)
        # `disable`'s stream and pinned word, made here: while receives run is no time to
        # allocate pinned memory (cudaHostAlloc may synchronize the device).
        self._stream = self._staging = None
        if device.type == "cuda":
            self._stream = torch.cuda.Stream(device)
            self._staging = torch.empty(1, dtype=torch.int64, pin_memory=True)
        self._lock = threading.Lock()
        self._tokens = 0
        self._held: dict[int, object] = {}  # disabled slot -> its transfer's last scatter event

    def warm_up(self, dst_rows: torch.Tensor) -> None:
        """Compile the kernel for `dst_rows` now, not inside the first transfer (a second or
        more, on the receiver thread): one launch with token 0, which slot 0 disables until
        token SLOTS is disabled (tokens start at 1). Writes nothing."""
        rows = torch.zeros(1, dtype=torch.int64, device=self.device)
        src = torch.zeros((1, dst_rows.shape[1]), dtype=dst_rows.dtype, device=self.device)
        self.launch(dst_rows, rows, src, 0)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def next_token(self) -> int:
        """A new transfer's token (never 0), skipping the slots still held by `disable`."""
        with self._lock:
            while True:
                self._tokens += 1
                slot = self._tokens % SLOTS
                held = self._held.get(slot)
                if held is None or held.query():
                    self._held.pop(slot, None)
                    return self._tokens

    def launch(
        self, dst_rows: torch.Tensor, rows: torch.Tensor, src_rows: torch.Tensor, token: int
    ) -> None:
        """`dst_rows[rows[i]] = src_rows[i]` on the current stream, unless `token` is disabled by
        the time the kernel runs. 2-D row views of one word type; `rows` int64 on the device."""
        num_rows, num_words = src_rows.shape
        if num_rows == 0:
            return
        grid = (num_rows, _cdiv(num_words, _BLOCK))
        _kernel()[grid](
            dst_rows, rows, src_rows, self.words, token % SLOTS, token, num_words,
            dst_rows.stride(0), src_rows.stride(0), BLOCK=_BLOCK,
        )  # fmt: skip

    def disable(self, token: int, last_scatter=None) -> None:
        """Make the token's scatters that have not started yet write nothing; returns once the
        guard word is in device memory. The caller still waits for any that had started.
        `last_scatter` (an event after the transfer's last queued scatter): the slot is held,
        and no new token takes it, until that event has completed."""
        if last_scatter is not None:
            with self._lock:
                self._held[token % SLOTS] = last_scatter
        if self.device.type != "cuda":  # Triton's interpreter, in the CPU tests
            self.words[token % SLOTS] = token
            return
        # NOTE: a copy, not a kernel: with CUDA's lazy module loading the first launch of a
        # kernel may wait for the kernels running, and NCCL's receives run until their data
        # comes, which a cancel must not wait for.
        with self._lock:
            self._staging[0] = token
            slot = token % SLOTS
            with torch.cuda.stream(self._stream):
                self.words[slot : slot + 1].copy_(self._staging, non_blocking=True)
            self._stream.synchronize()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
