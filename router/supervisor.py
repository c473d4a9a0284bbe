"""Keeping the pools whole: health checks with deadlines, and restarts of dead workers.

Every `interval_s` the supervisor pings each live worker (in the worker's control concurrency
group, so actor threads busy with long calls cannot delay it), with a deadline. A worker is
declared dead when

- Ray says its actor died (the ping, or any router call, raises `WorkerDied`);
- its ping says its engine loop died, or has not gone round for `engine_stall_timeout_s`;
- `max_missed_pings` pings in a row went unanswered (the process hangs).

Detection therefore takes at most about `interval_s` (death) or
`interval_s + max_missed_pings * ping_timeout_s` (a hang), with or without traffic.

A dead worker is re-created by `respawn` (the launcher's: same worker id, same pool resources;
a lingering process is killed first), at most `max_restarts` times over its life, and rejoins
placement once its new process answers a ping. Its pairs are rebuilt lazily by the router.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from router.workers import Worker, WorkerClient, WorkerDied, WorkerTimeout

if TYPE_CHECKING:
    from router.router import Router

log = logging.getLogger(__name__)

# Creates a new process for the worker and returns a client once it answers its ping.
Respawn = Callable[[Worker], Awaitable[WorkerClient]]


@dataclass
class SupervisorOptions:
    interval_s: float = 1.0
    ping_timeout_s: float = 5.0
    max_missed_pings: int = 3
    engine_stall_timeout_s: float = 300.0  # longer than any step, transfer wait or compile
    restart: bool = True
    max_restarts: int = 5  # per worker, over the deployment's life
    restart_backoff_s: float = 2.0  # between failed attempts to bring one worker back

    def __post_init__(self) -> None:
        if min(self.interval_s, self.ping_timeout_s, self.engine_stall_timeout_s) <= 0:
            raise ValueError("health check intervals and timeouts must be > 0")
        if self.max_missed_pings < 1 or self.max_restarts < 0:
            raise ValueError("max_missed_pings must be >= 1 and max_restarts >= 0")


class Supervisor:
    """Started by `Router.start`; reports deaths and returns through `Router.worker_died` and
    `Router.worker_back`, which own what the router does about them."""

    def __init__(self, router: Router, respawn: Respawn | None, options: SupervisorOptions):
        self.router = router
        self.respawn = respawn
        self.options = options
        self._missed: dict[str, int] = {}
        self._restarts: set[asyncio.Task] = set()

    async def run(self) -> None:
        while True:
            live = [w for w in self.router.workers if w.alive]
            await asyncio.gather(*(self._check(w) for w in live))
            await asyncio.sleep(self.options.interval_s)

    async def stop(self) -> None:
        for task in list(self._restarts):
            task.cancel()
        await asyncio.gather(*self._restarts, return_exceptions=True)

    async def _check(self, worker: Worker) -> None:
        client = worker.client
        try:
            await client.call(
                "ping", self.options.engine_stall_timeout_s, timeout_s=self.options.ping_timeout_s
            )
            self._missed[worker.worker_id] = 0
        except WorkerDied as e:
            self.router.worker_died(worker, client, f"its actor died ({_first_line(e)})")
        except WorkerTimeout:
            missed = self._missed.get(worker.worker_id, 0) + 1
            self._missed[worker.worker_id] = missed
            if missed >= self.options.max_missed_pings:
                self.router.worker_died(worker, client, f"{missed} health checks unanswered")
        except Exception as e:  # the engine loop died or stalled: the process is no use
            self.router.worker_died(worker, client, _first_line(e))

    def restarting(self, tier: str, role: str) -> bool:
        """Whether a worker of the tier and role is on its way back."""
        return any(w.restarting for w in self.router.workers if w.tier == tier and w.role == role)

    def on_death(self, worker: Worker) -> None:
        """Called by the router once per death: bring the worker back if allowed (not one
        being removed: router/scaling.py stops it anyway)."""
        if not self.options.restart or self.respawn is None or worker.restarting:
            return
        if worker.draining:  # on its way out: nothing to bring back
            return
        if worker.restarts >= self.options.max_restarts:
            log.error("worker %s stays down: restarted %d times", worker.worker_id, worker.restarts)
            return
        worker.restarting = True
        task = asyncio.get_running_loop().create_task(self._restart(worker))
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    async def _restart(self, worker: Worker) -> None:
        try:
            while worker.restarts < self.options.max_restarts:
                worker.restarts += 1
                try:
                    client = await self.respawn(worker)
                except Exception as e:
                    log.warning("restarting %s failed: %s", worker.worker_id, _first_line(e))
                    await asyncio.sleep(self.options.restart_backoff_s)
                    continue
                self._missed[worker.worker_id] = 0
                self.router.worker_back(worker, client)
                return
            log.error("worker %s stays down: restarted %d times", worker.worker_id, worker.restarts)
        finally:
            worker.restarting = False


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
