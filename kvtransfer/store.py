"""The rendezvous store: the router hosts the master TCPStore, every worker connects as a client.

The store carries only small control data: the pair handshakes, process-group bootstrap keys and
one header per transfer. KV bytes never go through it.
"""

from __future__ import annotations

from datetime import timedelta

from torch.distributed import TCPStore


def start_store(host: str = "127.0.0.1", port: int = 0) -> tuple[TCPStore, int]:
    """Start the master store (called once, by the router). Returns the store and its port
    (the chosen one when `port` is 0). Keep the returned object alive: it is the server."""
    store = TCPStore(host, port, is_master=True, wait_for_workers=False)
    return store, store.port


# NOTE: connecting gets its own, generous bound. On one host, a client's ephemeral port can
# collide with a TIME_WAIT left by an earlier connection to the same port, and the kernel then
# answers the first SYN only after a ~1 s retransmit (seen in tests that start many stores).
_CONNECT_TIMEOUT_S = 30.0


def connect_store(host: str, port: int, timeout_s: float) -> TCPStore:
    """A new client connection; `timeout_s` bounds every blocking get/wait on it."""
    store = TCPStore(
        host,
        port,
        is_master=False,
        wait_for_workers=False,
        timeout=timedelta(seconds=max(timeout_s, _CONNECT_TIMEOUT_S)),
    )
    store.set_timeout(timedelta(seconds=timeout_s))
    return store
