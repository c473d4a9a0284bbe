"""The router's view of the workers: handles it calls through, and their live load.

The router talks to workers only through `WorkerClient.call` (their public actor methods), so
the same code drives Ray actors in production and plain objects in unit tests. Every call has a
deadline: a hung worker costs a request its attempt, never the request itself."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

# Worker methods that must answer even while every other actor thread is busy (e.g. blocked in
# long prefill calls) run in Ray concurrency groups of their own; the ping has one to itself, so
# calls stuck behind a hung engine loop cannot delay the health check that detects the hang.
CONTROL_METHODS = frozenset({"abort", "stats", "metrics_text", "step_samples"})
CONTROL_GROUP, HEALTH_GROUP = "control", "health"
CONCURRENCY_GROUPS = {CONTROL_GROUP: 4, HEALTH_GROUP: 1}


class WorkerDied(Exception):
    """The worker process is gone (or unreachable); its requests must be placed elsewhere."""


class WorkerTimeout(Exception):
    """A call did not answer within its deadline. The worker may be hung or just slow: the
    health check decides whether it is dead; the caller gives up on this call."""


class WorkerClient:
    async def call(self, method: str, *args: Any, timeout_s: float | None = None) -> Any:
        """Call the worker's `method`; raises WorkerDied, WorkerTimeout after `timeout_s`, or
        the exception the method raised."""
        raise NotImplementedError


class RayWorkerClient(WorkerClient):
    def __init__(self, actor):
        self.actor = actor

    async def call(self, method, *args, timeout_s=None):
        import ray

        remote = getattr(self.actor, method)
        if method == "ping":
            remote = remote.options(concurrency_group=HEALTH_GROUP)
        elif method in CONTROL_METHODS:
            remote = remote.options(concurrency_group=CONTROL_GROUP)
        try:
            return await asyncio.wait_for(_await(remote.remote(*args)), timeout_s)
        except asyncio.TimeoutError:
            raise WorkerTimeout(f"{method} did not answer within {timeout_s} s") from None
        except ray.exceptions.RayActorError as e:
            raise WorkerDied(str(e)) from e
        except ray.exceptions.RayTaskError as e:
            # An exception raised inside the worker method: re-raise the original (its message
            # without Ray's traceback), else an instance of its type.
            if isinstance(e.cause, Exception):
                raise e.cause from None
            raise e.as_instanceof_cause() from None


async def _await(ref):
    return await ref


class LocalWorkerClient(WorkerClient):
    """Calls a worker object in this process, on a thread (for tests)."""

    def __init__(self, worker):
        self.worker = worker
        self.dead = False

    async def call(self, method, *args, timeout_s=None):
        if self.dead:
            raise WorkerDied("worker stopped")
        call = asyncio.to_thread(getattr(self.worker, method), *args)
        try:
            return await asyncio.wait_for(call, timeout_s)
        except asyncio.TimeoutError:
            raise WorkerTimeout(f"{method} did not answer within {timeout_s} s") from None


@dataclass
class Worker:
    worker_id: str
    role: str  # "prefill" | "decode"
    tier: str
    client: WorkerClient
    alive: bool = True
    # Worker-level request ids currently placed here (prefill: being prefilled; decode: held).
    requests: set[str] = field(default_factory=set)
    # Grows with every restart: which process `client` reaches (pairs built with an older one
    # are stale).
    incarnation: int = 0
    restarts: int = 0
    restarting: bool = False
    # Being removed (router/scaling.py): placement skips it while its requests finish.
    draining: bool = False

    @property
    def load(self) -> int:
        return len(self.requests)

    @property
    def state(self) -> str:
        """serving | draining (being removed) | restarting | down (restarts spent or off)."""
        if self.draining:
            return "draining"
        if self.alive:
            return "serving"
        return "restarting" if self.restarting else "down"
