"""NCCL point-to-point through the library's C API: one size-2 communicator per KV pair, sends
and receives on a stream of the pair's own, completion seen through CUDA events.

Why not `ProcessGroupNCCL` (kept as the `torch-nccl` backend): a KV transfer is tens of
messages, each posted as soon as its layers are gathered, on the step thread. c10d's `send` costs
~31 us of host time warm and 92-112 us cold (the first after a sync), for its work object, the
flight recorder's entry and the stream syncs; an `ncclSend` here costs 24 us warm and 68 us cold
(2x H200 hosts, 2026-11-27), with no watchdog thread. The benchmark's bandwidth did not move with
it (benchmarks/RESULTS.md, session 11): what bounds a transfer there is the rest of the host path.

    comm   = NcclComm.connect(store, prefix, rank, timeout_s)   # rank 0 publishes the unique id
    work   = comm.send([buf], peer)     # on the pair's stream, after the caller's stream's work
    work.is_completed()                 # polls the work's event
    work.wait()                         # orders the caller's stream after it; raises if aborted
    comm.abort()                        # from any thread: pending kernels exit, work fails

The library is the one torch loaded (`libnccl.so.2`, found by its soname), or the file named by
`BATON_NCCL_LIBRARY`. Where neither loads, `available()` is False and the agent uses
`ProcessGroupNCCL` ("torch-nccl").
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os
import sys
import threading
from datetime import timedelta
from functools import cache

import torch

log = logging.getLogger(__name__)

_SUCCESS, _IN_PROGRESS = 0, 7
_UINT8 = 1  # ncclDataType_t: every message goes as bytes
_ID_KEY = "nccl_unique_id"


class NcclError(RuntimeError):
    pass


class _UniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_byte * 128)]  # NCCL_UNIQUE_ID_BYTES


class _Library:
    """The few entry points this package calls, typed."""

    def __init__(self, path: str):
        lib = ctypes.CDLL(path)
        comm, result, ptr = ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p

        def fn(name, restype, *argtypes):
            f = getattr(lib, name)
            f.restype, f.argtypes = restype, list(argtypes)
            return f

        self.path = path
        self.get_version = fn("ncclGetVersion", result, ctypes.POINTER(ctypes.c_int))
        self.get_unique_id = fn("ncclGetUniqueId", result, ctypes.POINTER(_UniqueId))
        self.comm_init_rank = fn(
            "ncclCommInitRank", result, ctypes.POINTER(comm), ctypes.c_int, _UniqueId, ctypes.c_int
        )
        self.send = fn(
            "ncclSend", result, ptr, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, comm, ptr
        )
        self.recv = fn(
            "ncclRecv", result, ptr, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, comm, ptr
        )
        self.comm_abort = fn("ncclCommAbort", result, comm)
        self.comm_get_async_error = fn(
            "ncclCommGetAsyncError", result, comm, ctypes.POINTER(ctypes.c_int)
        )
        self.get_error_string = fn("ncclGetErrorString", ctypes.c_char_p, ctypes.c_int)

    def version(self) -> int:
        v = ctypes.c_int()
        self.check(self.get_version(ctypes.byref(v)), "ncclGetVersion")
        return v.value

    def check(self, result: int, what: str) -> None:
        if result not in (_SUCCESS, _IN_PROGRESS):
            text = self.get_error_string(result).decode(errors="replace")
            raise NcclError(f"{what} failed: {text} (ncclResult {result})")


def _candidates() -> list[str]:
    found = [os.environ["BATON_NCCL_LIBRARY"]] if os.environ.get("BATON_NCCL_LIBRARY") else []
    found.append("libnccl.so.2")  # the copy torch's CUDA build already loaded, by soname
    for entry in sys.path:  # the nvidia-nccl wheel next to torch
        found += sorted(glob.glob(os.path.join(entry, "nvidia", "nccl*", "lib", "libnccl.so*")))
    return found


@cache
def library() -> _Library | None:
    """The NCCL library, or None where there is none (a CPU build of torch, no GPU)."""
    if not torch.cuda.is_available():
        return None
    for path in _candidates():
        try:
            lib = _Library(path)
            log.debug("NCCL %d from %s", lib.version(), path)
            return lib
        except (OSError, AttributeError) as e:
            log.debug("no usable NCCL at %s: %s", path, e)
    return None


def available() -> bool:
    return library() is not None


class NcclWork:
    """One posted send or receive: done when its event is. Mirrors the part of c10d's `Work`
    that `kvtransfer.pair.wait_work` uses."""

    __slots__ = ("comm", "event")

    def __init__(self, comm: NcclComm, event: torch.cuda.Event):
        self.comm, self.event = comm, event

    def is_completed(self) -> bool:
        return self.event.query()

    def wait(self) -> None:
        """Order the caller's current stream after the work. Raises if the communicator was
        aborted or reports an error: an aborted operation's kernel exits and its event
        completes, so completion alone does not mean the bytes arrived."""
        self.comm.check()
        torch.cuda.current_stream(self.comm.device).wait_event(self.event)


class NcclComm:
    """A size-2 NCCL communicator and the stream its operations run on. Every operation is
    ordered after the work already queued on the caller's current stream (as c10d's are), and
    runs on this communicator's high-priority stream, so a send never holds the compute stream
    and a receive never waits behind the scatters."""

    def __init__(self, lib: _Library, comm: ctypes.c_void_p, device: torch.device):
        self.lib, self.device = lib, device
        self._comm: ctypes.c_void_p | None = comm
        self._lock = threading.Lock()  # NCCL calls on one communicator never overlap
        self.stream = torch.cuda.Stream(device, priority=-1)
        self._ordered = torch.cuda.Event()  # a post's place on the caller's stream; under _lock
        self._stream_ptr = ctypes.c_void_p(self.stream.cuda_stream)

    @classmethod
    def connect(cls, store, prefix: str, rank: int, timeout_s: float) -> NcclComm:
        """Both ranks call this (rank 0 publishes the unique id under `prefix` in `store`);
        returns once the communicator is up. Blocks until the peer joins: run it on a thread
        with a bound (as the agent does)."""
        lib = library()
        if lib is None:
            raise NcclError("no NCCL library could be loaded (set BATON_NCCL_LIBRARY)")
        device = torch.device("cuda", torch.cuda.current_device())
        uid = _UniqueId()
        key = f"{prefix}/{_ID_KEY}"
        if rank == 0:
            lib.check(lib.get_unique_id(ctypes.byref(uid)), "ncclGetUniqueId")
            store.set(key, bytes(uid.internal))
        else:
            store.wait([key], timedelta(seconds=timeout_s))
            raw = store.get(key)
            ctypes.memmove(uid.internal, raw, len(uid.internal))
        comm = ctypes.c_void_p()
        lib.check(lib.comm_init_rank(ctypes.byref(comm), 2, uid, rank), "ncclCommInitRank")
        return cls(lib, comm, device)

    # `tag` is ignored (NCCL has none): the signature is c10d's, so the agent calls either alike.
    def send(self, tensors: list[torch.Tensor], peer: int, tag: int = 0) -> NcclWork:
        return self._post(self.lib.send, "ncclSend", tensors, peer)

    def recv(self, tensors: list[torch.Tensor], peer: int, tag: int = 0) -> NcclWork:
        return self._post(self.lib.recv, "ncclRecv", tensors, peer)

    def _post(self, op, what: str, tensors: list[torch.Tensor], peer: int) -> NcclWork:
        for t in tensors:
            if not t.is_contiguous() or t.device != self.device:
                raise ValueError(f"{what}: tensors must be contiguous and on {self.device}")
        current = torch.cuda.current_stream(self.device)
        with self._lock:
            if self._comm is None:
                raise NcclError(f"{what}: the communicator was aborted")
            # as self.stream.wait_stream(current), without a new event each post (5-23 us off a
            # 2048-token transfer of 5 posts: benchmarks/RESULTS.md, session 13)
            self._ordered.record(current)
            self.stream.wait_event(self._ordered)
            for t in tensors:
                self.lib.check(
                    op(t.data_ptr(), t.nbytes, _UINT8, peer, self._comm, self._stream_ptr), what
                )
        # NOTE: the caching allocator must not hand the memory out again before this stream is
        # done with it, even if the caller drops the tensor first (a receive abandoned by a
        # failing thread, before the abort ends its kernel): as c10d does.
        for t in tensors:
            t.record_stream(self.stream)
        event = torch.cuda.Event()
        event.record(self.stream)
        return NcclWork(self, event)

    def check(self) -> None:
        """Raise if the communicator was aborted or NCCL reports an asynchronous error."""
        with self._lock:
            if self._comm is None:
                raise NcclError("the communicator was aborted")
            state = ctypes.c_int()
            self.lib.check(
                self.lib.comm_get_async_error(self._comm, ctypes.byref(state)),
                "ncclCommGetAsyncError",
            )
            self.lib.check(state.value, "an NCCL operation")

    def abort(self) -> None:
        """Stop the pending operations (kernels waiting on a dead or stalled peer exit) and free
        the communicator. Idempotent; any thread."""
        with self._lock:
            comm, self._comm = self._comm, None
            if comm is not None:
                self.lib.check(self.lib.comm_abort(comm), "ncclCommAbort")
