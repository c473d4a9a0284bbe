"""One prefill-decode pair: the handshake that agrees on a generation, its size-2 process group,
and bounded waits on that group's work.

Store keys of a pair (prefill worker P, decode worker D), under ``baton/pair/{P}/{D}``:

    attempts            counter; every connect attempt of either side draws a fresh nonce from it
    hello/prefill       "{nonce} {peer nonce seen} {layout}" written by P while it connects
    hello/decode        the same, written by D
    {generation}/...    the process group's bootstrap keys and the header queue of one generation

A connect attempt is complete on a side when the peer's hello says it has seen this side's
nonce. Both sides then know both nonces and take ``generation = max(prefill nonce, decode
nonce)``: a number no earlier pair of these two workers used, so a stale key from a dead process
or an abandoned attempt can never be mistaken for a live one. Breaking a pair overwrites the
side's hello with "broken", which tells the peer's next `connect` to handshake again.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
from torch.distributed import PrefixStore, TCPStore

from kvtransfer.nccl import NcclComm
from kvtransfer.nccl import available as nccl_available

log = logging.getLogger(__name__)

PREFILL, DECODE = "prefill", "decode"
BACKENDS = ("gloo", "nccl", "torch-nccl")
RANK = {PREFILL: 0, DECODE: 1}  # the prefill side sends, as rank 0

# NOTE: NCCL's watchdog aborts (and by default tears down the process) on a collective that
# outlives the group's timeout. A pair may sit idle for hours, so the group's own timeout is
# effectively infinite and every wait in this package is bounded by the agent's `timeout_s`.
NCCL_GROUP_TIMEOUT = timedelta(days=1)
_HANDSHAKE_POLL_S = 0.005
# Polling an NCCL work: poll every ~2 us first, then sleep with backoff.
# NOTE: Linux stretches a short sleep by the thread's timer slack (50 us by default: a 20 us
# sleep lasted ~60-80 us), and the receiver waits for each message in turn: sleeping from the
# start cost ~100 us per message, 3.6 ms for a 32-message transfer that NCCL delivers in 1 ms
# (2x H200, 2026-11-26). A message lands within tens of microseconds of the previous one, so the
# spin phase covers a burst. Between messages spread over a prefill (milliseconds apart) the
# wait backs off; a waiting thread's slack is cut to 1 us (`precise_sleeps`) and the backoff
# stops at 50 us, so a message waited on that long is seen within ~50 us, not ~250 us (the
# device trace of session 11: the first message's scatter began 293 us after it landed).
# NOTE: the first phase sleeps 2 us between polls, not sleep(0): a thread spinning on sleep(0)
# takes the GIL straight back, and another thread that wants it (the decode engine's loop, a
# poller) waits up to the 5 ms switch interval; a 2 us sleep leaves it the GIL.
_POLL_SPIN_S, _POLL_SPIN_SLEEP_S, _POLL_MAX_S = 2e-3, 2e-6, 50e-6
_PR_SET_TIMERSLACK, _TIMER_SLACK_NS = 29, 1000
_thread_state = threading.local()
_env_lock = threading.Lock()


def pair_base(prefill_id: str, decode_id: str) -> str:
    return f"baton/pair/{prefill_id}/{decode_id}"


def other_role(role: str) -> str:
    return DECODE if role == PREFILL else PREFILL


@dataclass(frozen=True)
class Hello:
    nonce: int
    seen: int
    layout: str

    def encode(self) -> str:
        return f"{self.nonce} {self.seen} {self.layout}"

    @staticmethod
    def decode(raw: bytes) -> Hello | None:
        parts = raw.decode().split(" ", 2)
        if len(parts) != 3:
            return None  # "broken", or a key from an incompatible version
        return Hello(int(parts[0]), int(parts[1]), parts[2])


def read_hello(store: TCPStore, key: str) -> Hello | None:
    if not store.check([key]):
        return None
    return Hello.decode(store.get(key))


def handshake(
    store: TCPStore, base: str, role: str, layout: str, timeout_s: float
) -> tuple[int, int, str]:
    """Meet the peer of `role` under `base`. Returns (generation, peer nonce, this side's hello).

    Raises TimeoutError if the peer does not complete a handshake with this attempt within
    `timeout_s`, ValueError if it did but its KV layout differs from `layout`."""
    nonce = store.add(f"{base}/attempts", 1)
    my_key, peer_key = f"{base}/hello/{role}", f"{base}/hello/{other_role(role)}"
    deadline = time.monotonic() + timeout_s
    while True:
        peer = read_hello(store, peer_key)
        hello = Hello(nonce, peer.nonce if peer else 0, layout).encode()
        store.set(my_key, hello)
        if peer is not None and peer.seen == nonce:
            if peer.layout != layout:
                raise ValueError(f"KV layout differs: this side {layout}, peer {peer.layout}")
            return max(nonce, peer.nonce), peer.nonce, hello
        if time.monotonic() > deadline:
            raise TimeoutError(f"peer did not connect within {timeout_s:.1f} s ({base})")
        time.sleep(_HANDSHAKE_POLL_S)


@contextlib.contextmanager
def _nccl_keeps_process_on_error():
    # NOTE: by default ProcessGroupNCCL tears the whole process down when one of its works fails
    # (TORCH_NCCL_ASYNC_ERROR_HANDLING=3, read in its constructor). A broken KV pair must cost one
    # transfer, not the worker, so this package's groups are built with error handling off (0):
    # errors surface on the work, where the waits below turn them into FAILED.
    with _env_lock:
        old = os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING")
        os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "0"
        try:
            yield
        finally:
            if old is None:
                del os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"]
            else:
                os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = old


def new_group(store: TCPStore, prefix: str, rank: int, backend: str, timeout_s: float):
    """A size-2 group for one pair, bootstrapped under `prefix` in `store` (no default, world
    group is involved): `gloo` (CPU), `nccl` (`kvtransfer.nccl.NcclComm`, NCCL's C API on a
    stream of the pair's own) or `torch-nccl` (`ProcessGroupNCCL`). All three answer `send`,
    `recv` and `abort`, with works that `wait_work` waits on. Gloo's own timeout is
    `timeout_s`: gloo work cannot be polled (`is_completed` stays False until `wait`), so its
    waits block with that bound instead."""
    if backend == "nccl":
        return NcclComm.connect(store, prefix, rank, timeout_s)
    prefixed = PrefixStore(prefix, store)
    if backend == "gloo":
        return torch.distributed.ProcessGroupGloo(prefixed, rank, 2, timedelta(seconds=timeout_s))
    if backend != "torch-nccl":
        raise ValueError(f"unknown KV transfer backend {backend!r}")
    options = torch.distributed.ProcessGroupNCCL.Options()
    options._timeout = NCCL_GROUP_TIMEOUT
    options.is_high_priority_stream = True  # KV sends overlap compute; let them start first
    with _nccl_keeps_process_on_error():
        return torch.distributed.ProcessGroupNCCL(prefixed, rank, 2, options)


def choose_backend(backend: str, device: torch.device) -> str:
    """`auto`: gloo for CPU caches; for CUDA caches NCCL's C API, or ProcessGroupNCCL where no
    NCCL library loads. Raises ValueError for a backend that does not fit the device."""
    on_cuda = device.type == "cuda"
    if backend == "auto":
        backend = ("nccl" if nccl_available() else "torch-nccl") if on_cuda else "gloo"
    if backend not in BACKENDS or (backend != "gloo") != on_cuda:
        raise ValueError(f"backend {backend!r} does not fit caches on {device}")
    if backend == "nccl" and not nccl_available():
        raise ValueError("backend 'nccl': no NCCL library loads here (try 'torch-nccl')")
    return backend


def wait_work(work, backend: str, timeout_s: float) -> None:
    """Wait for one send/recv. Raises TimeoutError after `timeout_s`, RuntimeError if it failed.

    Gloo blocks in `wait` (on expiry gloo also aborts the group: the pair is broken anyway). NCCL
    is polled, so a peer that never answers costs `timeout_s` and not a hung thread; the final
    `wait()` raises a stored error and orders the caller's current stream after the transfer."""
    if backend == "gloo":
        work.wait(timedelta(seconds=max(timeout_s, 1e-3)))
        return
    start = time.monotonic()
    sleep_s = _POLL_SPIN_SLEEP_S
    if not work.is_completed():
        precise_sleeps()
    while not work.is_completed():
        now = time.monotonic()
        if now - start >= timeout_s:
            raise TimeoutError(f"transfer did not complete within {timeout_s:.1f} s")
        if now - start > _POLL_SPIN_S:
            sleep_s = min(max(2 * sleep_s, 20e-6), _POLL_MAX_S)
        time.sleep(sleep_s)
    work.wait()


def precise_sleeps() -> None:
    """Cut this thread's timer slack to 1 us (Linux; once per thread; best effort): its short
    sleeps then last what they ask. Only timer precision changes, for this thread alone."""
    if getattr(_thread_state, "precise", False) or not sys.platform.startswith("linux"):
        return
    _thread_state.precise = True
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_TIMERSLACK, _TIMER_SLACK_NS, 0, 0, 0)
    except (OSError, AttributeError) as e:
        log.debug("could not set the timer slack: %s", e)


def abort_group(group) -> None:
    """Best effort: stop the group's pending work (NCCL kernels spinning on a dead peer)."""
    if isinstance(group, NcclComm):
        try:
            group.abort()
        except Exception as e:  # noqa: BLE001 - as below
            log.debug("aborting a broken KV pair's communicator failed: %s", e)
        return
    for name in ("abort", "_abort", "shutdown"):
        fn = getattr(group, name, None)
        if fn is None:
            continue
        try:
            fn()
            return
        except Exception as e:  # noqa: BLE001 - a failing abort must not mask the original error
            log.debug("%s() on a broken KV pair group failed: %s", name, e)
