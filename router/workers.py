"""The router's view of the workers: handles it calls through, and their live load.

The router talks to workers only through `WorkerClient.call` (their public actor methods), so
the same code drives Ray actors in production and plain objects in unit tests."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any


class WorkerDied(Exception):
    """The worker process is gone (or unreachable); its requests must be placed elsewhere."""


class WorkerClient:
    async def call(self, method: str, *args: Any) -> Any:
        raise NotImplementedError


class RayWorkerClient(WorkerClient):
    def __init__(self, actor):
        self.actor = actor

    async def call(self, method, *args):
        import ray

        try:
            return await getattr(self.actor, method).remote(*args)
        except ray.exceptions.RayActorError as e:
            raise WorkerDied(str(e)) from e
        except ray.exceptions.RayTaskError as e:
            # An exception raised inside the worker method: re-raise the original type.
            raise e.as_instanceof_cause() from None


class LocalWorkerClient(WorkerClient):
    """Calls a worker object in this process, on a thread (for tests)."""

    def __init__(self, worker):
        self.worker = worker
        self.dead = False

    async def call(self, method, *args):
        if self.dead:
            raise WorkerDied("worker stopped")
        return await asyncio.to_thread(getattr(self.worker, method), *args)


@dataclass
class Worker:
    worker_id: str
    role: str  # "prefill" | "decode"
    tier: str
    client: WorkerClient
    alive: bool = True
    # Worker-level request ids currently placed here (prefill: being prefilled; decode: held).
    requests: set[str] = field(default_factory=set)

    @property
    def load(self) -> int:
        return len(self.requests)
