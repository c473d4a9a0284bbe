"""Changing a running deployment's pools: add workers, drain and remove them, switch a worker's
role between prefill and decode, bring a tier to a plan's counts (docs/SCALING.md).

    add      factory.start (a new process with the pool's resources; pings) -> Router.add_worker
             (placement uses it at once; its KV pairs are built on first use, as every pair is)
    remove   draining: placement skips it -> its requests finish, up to drain_timeout_s ->
             the rest move: re-placed elsewhere with the tokens they streamed (re-prefill; not
             counted as failures) -> its KV blocks are back -> Router.remove_worker ->
             factory.stop -> the workers it had pairs with drop them
    switch   remove, then start a worker of the other role in its place (the Ray resources it
             held, on its node); if that fails, one of the old role is started there instead

A pool is a tier's workers of one role, named "{tier}-{role}". Its count is the workers that
serve or are restarting; a worker that stays down (restarts spent) is not counted, and any
operation on its pool removes it. One operation runs at a time, and to its end even if the
client that asked goes away. The router reaches processes only through the `WorkerFactory` the
launcher hands it (deploy/scaling.py: Ray actors).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from router.workers import Worker, WorkerClient

if TYPE_CHECKING:
    from router.router import Router

log = logging.getLogger(__name__)

SWITCHABLE = ("prefill", "decode")
MAX_ADDED_PER_CALL = 64  # a typo of 1000 would otherwise ask the cluster for 1000 workers
_STATE_POLL_S = 0.05


class ScalingError(Exception):
    """A refused or failed operation; `code` is a grpc.StatusCode name."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class WorkerFactory:
    """Creates and stops worker processes; the launcher's implements it with Ray actors."""

    async def start(
        self, tier: str, role: str, worker_id: str, in_place_of: str | None = None
    ) -> WorkerClient:
        """Start `worker_id`, a worker of the tier's `role` pool, with the pool's resources, or
        with those `in_place_of` held and on its node; return a client once it answers a ping.
        Raises if it does not start (its process is gone then)."""
        raise NotImplementedError

    async def stop(self, worker_id: str) -> None:
        """Shut the worker's process down and free what it holds; never raises."""
        raise NotImplementedError

    def describe(self, worker_id: str) -> dict:
        """What ListWorkers shows of it: {"resources": {...}, "node_id": str, "replaced": str}."""
        return {}


@dataclass
class Removal:
    worker_id: str
    finished: int  # requests that ended on it while it drained
    moved: int  # still there at the timeout: re-placed elsewhere
    num_blocks: int = -1  # its KV pool when it stopped; -1: it could not say (e.g. it was dead)
    num_free_blocks: int = -1
    drain_s: float = 0.0


@dataclass
class ScaleResult:
    added: list[str] = field(default_factory=list)
    removed: list[Removal] = field(default_factory=list)
    switched: list[tuple[str, str, str]] = field(default_factory=list)  # (from, to, new role)

    def summary(self) -> str:
        moves = [f"{a} -> {b}" for a, b, _ in self.switched]
        parts = [
            f"added {self.added}" if self.added else "",
            f"removed {[r.worker_id for r in self.removed]}" if self.removed else "",
            f"switched {moves}" if moves else "",
        ]
        return "; ".join(p for p in parts if p) or "nothing changed"


@dataclass(frozen=True)
class Action:
    """One step toward a target. `role`: the pool added to or removed from; for a switch, the
    role the worker leaves."""

    kind: str  # "add" | "remove" | "switch"
    role: str
    worker_id: str = ""  # remove, switch


def pool_name(tier: str, role: str) -> str:
    return f"{tier}-{role}"


def is_down(worker: Worker) -> bool:
    """Dead with no restart coming: not capacity, and nothing to drain."""
    return worker.state == "down"


def counted(worker: Worker) -> bool:
    """Whether the worker counts in its pool's size: serving, or on its way back."""
    return worker.state in ("serving", "restarting")


def removal_order(workers: list[Worker]) -> list[Worker]:
    """Which of a pool's counted workers to take out first: the least loaded, the newest among
    equals (the original ones stay). A restarting worker is never taken: its restart would
    bring it back into placement after its removal."""
    return sorted(
        (w for w in workers if w.alive and not w.draining),
        key=lambda w: (w.load, -_index(w.worker_id), w.worker_id),
    )


def plan_actions(workers: list[Worker], tier: str, target: dict[str, int]) -> list[Action]:
    """The steps that bring the tier's pools named in `target` (role -> count) to their counts:
    first the workers that stay down are removed, then, where one pool shrinks while the other
    grows, workers switch role (one process less to start and to stop per pair), then workers
    are added, then removed. Raises ScalingError when the workers to remove cannot be chosen."""
    pools = {role: [w for w in workers if w.tier == tier and w.role == role] for role in target}
    actions = [
        Action("remove", role, w.worker_id)
        for role, members in pools.items()
        for w in members
        if is_down(w)
    ]
    delta = {role: n - sum(counted(w) for w in pools[role]) for role, n in target.items()}
    candidates = {role: removal_order(pools[role]) for role in target}
    switches = []
    if set(SWITCHABLE) <= set(target):
        for leaving, joining in (SWITCHABLE, SWITCHABLE[::-1]):
            n = min(max(-delta[leaving], 0), max(delta[joining], 0))
            chosen, candidates[leaving] = candidates[leaving][:n], candidates[leaving][n:]
            switches += [Action("switch", leaving, w.worker_id) for w in chosen]
            delta[leaving] += len(chosen)
            delta[joining] -= len(chosen)
    adds = [Action("add", role) for role, d in delta.items() for _ in range(max(d, 0))]
    removes = []
    for role, d in delta.items():
        if d >= 0:
            continue
        if len(candidates[role]) < -d:
            busy = [w.worker_id for w in pools[role] if w.restarting]
            raise ScalingError(
                "FAILED_PRECONDITION",
                f"cannot remove {-d} workers from {pool_name(tier, role)}: {busy} restarting; "
                "try again once they are back",
            )
        removes += [Action("remove", role, w.worker_id) for w in candidates[role][:-d]]
    return actions + switches + adds + removes


class PoolScaler:
    """Owned by the launcher's deployment; called by the admin gRPC service (router/admin.py)."""

    def __init__(self, router: Router, factory: WorkerFactory, drain_timeout_s: float = 60.0):
        self.router = router
        self.factory = factory
        self.drain_timeout_s = drain_timeout_s
        self._lock = asyncio.Lock()
        # Worker ids are never reused: a new process under an old id could meet the old one's
        # KV pair keys and metrics series.
        self._used_ids = {w.worker_id for w in router.workers}
        # The pools the deployment started with, name -> (tier, role).
        self._pools = {pool_name(w.tier, w.role): (w.tier, w.role) for w in router.workers}
        self._ops: set[asyncio.Task] = set()

    # -- views ------------------------------------------------------------------------------

    def pools(self) -> dict[str, tuple[str, str]]:
        """Pool name -> (tier, role)."""
        return dict(self._pools)

    def pool_sizes(self) -> list[tuple[str, str, str, int]]:
        """(name, tier, role, count) of every pool, in name order."""
        return [
            (name, tier, role, sum(counted(w) for w in self._members(tier, role)))
            for name, (tier, role) in sorted(self.pools().items())
        ]

    def _members(self, tier: str, role: str) -> list[Worker]:
        return [w for w in self.router.workers if w.tier == tier and w.role == role]

    def resolve_pool(self, name: str) -> tuple[str, str]:
        """A pool's (tier, role) from its name, or from a bare role one tier has."""
        pools = self.pools()
        if name in pools:
            return pools[name]
        matches = [tr for tr in pools.values() if tr[1] == name]
        if len(matches) == 1:
            return matches[0]
        raise ScalingError("INVALID_ARGUMENT", f"unknown pool {name!r}; pools: {sorted(pools)}")

    # -- operations -------------------------------------------------------------------------

    async def scale(self, pool: str, count: int, drain_timeout_s: float = 0.0) -> ScaleResult:
        """Bring `pool` to `count` workers."""
        tier, role = self.resolve_pool(pool)
        _check_count(pool, count)
        timeout_s = self._drain_timeout(drain_timeout_s)
        return await self._exclusive(lambda: self._apply(tier, {role: count}, timeout_s))

    async def apply_plan(
        self, tier: str, num_prefill: int, num_decode: int, drain_timeout_s: float = 0.0
    ) -> ScaleResult:
        """Bring a disaggregated tier to `num_prefill` + `num_decode` workers."""
        tier = tier or self.router.default_tier
        roles = {role for _, (t, role) in self.pools().items() if t == tier}
        if not roles:
            raise ScalingError("INVALID_ARGUMENT", f"unknown tier {tier!r}")
        if roles != set(SWITCHABLE):
            raise ScalingError("INVALID_ARGUMENT", f"tier {tier!r} is not disaggregated")
        for role, count in (("prefill", num_prefill), ("decode", num_decode)):
            _check_count(pool_name(tier, role), count)
        timeout_s = self._drain_timeout(drain_timeout_s)
        target = {"prefill": num_prefill, "decode": num_decode}
        return await self._exclusive(lambda: self._apply(tier, target, timeout_s))

    async def switch_role(
        self, worker_id: str = "", pool: str = "", to_role: str = "", drain_timeout_s: float = 0.0
    ) -> ScaleResult:
        """Drain `worker_id` (or the least loaded worker of `pool`), stop it, start a worker of
        the other role in its place."""
        timeout_s = self._drain_timeout(drain_timeout_s)

        async def run() -> ScaleResult:
            worker = self._switch_candidate(worker_id, pool, to_role)
            result = ScaleResult()
            try:
                await self._switch(worker, result, timeout_s)
            except Exception as e:
                raise _failed(e, result) from e
            return result

        self._switch_candidate(worker_id, pool, to_role)  # bad input: refused before waiting
        return await self._exclusive(run)

    async def stop(self) -> None:
        """Cancel operations in flight (the deployment is stopping)."""
        for task in list(self._ops):
            task.cancel()
        await asyncio.gather(*self._ops, return_exceptions=True)

    # -- validation -------------------------------------------------------------------------

    def _drain_timeout(self, drain_timeout_s: float) -> float:
        if not (math.isfinite(drain_timeout_s) and drain_timeout_s >= 0):
            message = f"drain_timeout_s must be finite and >= 0, got {drain_timeout_s}"
            raise ScalingError("INVALID_ARGUMENT", message)
        return drain_timeout_s or self.drain_timeout_s

    def _switch_candidate(self, worker_id: str, pool: str, to_role: str) -> Worker:
        if bool(worker_id) == bool(pool):
            raise ScalingError("INVALID_ARGUMENT", "name a worker_id or a pool, not both")
        if worker_id:
            worker = next((w for w in self.router.workers if w.worker_id == worker_id), None)
            if worker is None:
                raise ScalingError("NOT_FOUND", f"unknown worker {worker_id!r}")
        else:
            tier, role = self.resolve_pool(pool)
            candidates = removal_order(self._members(tier, role))
            worker = candidates[0] if candidates else None
            if worker is None:
                raise ScalingError("FAILED_PRECONDITION", f"{pool} has no serving worker")
        if worker.role not in SWITCHABLE:
            message = f"{worker.worker_id} is {worker.role}: only prefill and decode workers switch"
            raise ScalingError("INVALID_ARGUMENT", message)
        new_role = _other(worker.role)
        if to_role and to_role != new_role:
            raise ScalingError(
                "INVALID_ARGUMENT",
                f"{worker.worker_id} is a {worker.role} worker: it can only become {new_role}",
            )
        if not worker.alive or worker.draining:
            state = "draining" if worker.draining else "down"
            raise ScalingError("FAILED_PRECONDITION", f"{worker.worker_id} is {state}")
        self._check_not_last(worker)
        return worker

    def _check_serving_after(self, tier: str, actions: list[Action]) -> None:
        """Every pool that loses a serving worker keeps another (not only restarting ones)."""
        serving = {w.worker_id for w in self.router.workers if w.alive and not w.draining}
        leaving = {a.worker_id for a in actions if a.kind != "add"}
        for role in {a.role for a in actions if a.worker_id in serving}:
            members = self._members(tier, role)
            if not any(w.alive and not w.draining and w.worker_id not in leaving for w in members):
                raise ScalingError(
                    "FAILED_PRECONDITION",
                    f"{pool_name(tier, role)} would have no serving worker left (the others are "
                    "restarting): its requests need one; try again once they are back",
                )

    def _check_not_last(self, worker: Worker) -> None:
        """A tier keeps at least one serving worker of every role: its requests need one."""
        others = [
            w
            for w in self._members(worker.tier, worker.role)
            if w is not worker and w.alive and not w.draining
        ]
        if not others:
            raise ScalingError(
                "FAILED_PRECONDITION",
                f"{worker.worker_id} is the last serving {worker.role} worker of tier "
                f"{worker.tier!r}: its requests need one",
            )

    # -- running ----------------------------------------------------------------------------

    async def _exclusive(self, operation) -> ScaleResult:
        """Run one operation at a time; shielded, so that a client going away does not leave a
        worker half drained."""

        async def locked() -> ScaleResult:
            async with self._lock:
                return await operation()

        task = asyncio.create_task(locked())
        self._ops.add(task)
        task.add_done_callback(self._done)
        return await asyncio.shield(task)

    def _done(self, task: asyncio.Task) -> None:
        self._ops.discard(task)
        if not task.cancelled() and task.exception() is not None:  # read: logged once, here
            log.warning("scaling operation ended: %s", _first_line(task.exception()))

    async def _apply(self, tier: str, target: dict[str, int], timeout_s: float) -> ScaleResult:
        actions = plan_actions(self.router.workers, tier, target)
        num_added = sum(a.kind == "add" for a in actions)
        if num_added > MAX_ADDED_PER_CALL:
            raise ScalingError(
                "INVALID_ARGUMENT",
                f"{num_added} workers to add; at most {MAX_ADDED_PER_CALL} per call",
            )
        self._check_serving_after(tier, actions)
        by_id = {w.worker_id: w for w in self.router.workers}
        result = ScaleResult()
        if actions:
            log.warning("scaling tier %s to %s: %s", tier, target, actions)
        kinds = ("add", "switch", "remove")
        # The ones that stay down first, then each kind's steps together: adds start their
        # processes at once, removals drain side by side.
        down = [a for a in actions if a.kind == "remove" and not by_id[a.worker_id].alive]
        steps = [down] + [[a for a in actions if a.kind == k and a not in down] for k in kinds]
        for group in steps:
            outcomes = await asyncio.gather(
                *(self._run(tier, a, by_id, result, timeout_s) for a in group),
                return_exceptions=True,
            )
            errors = [e for e in outcomes if isinstance(e, BaseException)]
            if errors:
                raise _failed(errors[0], result) from errors[0]
        return result

    async def _run(self, tier, action: Action, by_id, result: ScaleResult, timeout_s) -> None:
        if action.kind == "add":
            worker_id = self._new_id(tier, action.role)
            client = await self.factory.start(tier, action.role, worker_id)
            self.router.add_worker(Worker(worker_id, action.role, tier, client))
            result.added.append(worker_id)
        elif action.kind == "remove":
            result.removed.append(await self._remove(by_id[action.worker_id], timeout_s))
        else:
            await self._switch(by_id[action.worker_id], result, timeout_s)

    async def _switch(self, worker: Worker, result: ScaleResult, timeout_s: float) -> None:
        new_role = _other(worker.role)
        result.removed.append(await self._remove(worker, timeout_s))
        new_id = self._new_id(worker.tier, new_role)
        try:
            client = await self.factory.start(worker.tier, new_role, new_id, worker.worker_id)
        except Exception as e:
            failure = f"{new_id} ({new_role}) did not start in {worker.worker_id}'s place"
            log.error("%s: %s", failure, e)
            # Give the place back to the old role rather than leave it empty.
            back_id = self._new_id(worker.tier, worker.role)
            try:
                client = await self.factory.start(
                    worker.tier, worker.role, back_id, worker.worker_id
                )
            except Exception as again:
                raise RuntimeError(
                    f"{failure}: {_first_line(e)}; nor did {back_id} ({worker.role}): "
                    f"{_first_line(again)}"
                ) from e
            self.router.add_worker(Worker(back_id, worker.role, worker.tier, client))
            result.added.append(back_id)
            raise RuntimeError(
                f"{failure}: {_first_line(e)}; {back_id} ({worker.role}) took it instead"
            ) from e
        self.router.add_worker(Worker(new_id, new_role, worker.tier, client))
        result.switched.append((worker.worker_id, new_id, new_role))
        log.warning("worker %s switched role: now %s (%s)", worker.worker_id, new_id, new_role)

    async def _remove(self, worker: Worker, timeout_s: float) -> Removal:
        """Drain the worker, move what is left at the timeout, stop it."""
        start = time.monotonic()
        worker.draining = True  # NOTE: before the wait below: no new restart starts from here
        while worker.restarting:  # it died since it was chosen: let its process come back first
            await asyncio.sleep(_STATE_POLL_S)
        was_down = not worker.alive
        placed = len(worker.requests)
        deadline = start + timeout_s
        while worker.requests and worker.alive and time.monotonic() < deadline:
            await asyncio.sleep(_STATE_POLL_S)
        moved = len(worker.requests)
        if worker.requests:
            await self._move_requests(worker)
        blocks = (-1, -1) if was_down else await self._blocks_back(worker)
        peers = self.router.remove_worker(worker)
        await self.factory.stop(worker.worker_id)
        await self._drop_pairs(worker.worker_id, peers)
        drain_s = time.monotonic() - start
        finished = placed - moved
        log.warning(
            "worker %s stopped after %.1f s: %d requests finished, %d moved, blocks %d/%d free",
            *(worker.worker_id, drain_s, finished, moved, blocks[1], blocks[0]),
        )
        return Removal(worker.worker_id, finished, moved, *blocks, drain_s)

    async def _move_requests(self, worker: Worker) -> None:
        """The drain timed out: its requests go back to placement, elsewhere. Each is failed
        (the attempt sees it on its stream) and aborted on the worker (a pending prefill call
        fails; the blocks are freed); then the attempts end, bounded by a call's deadline."""
        reason = f"{worker.role} worker {worker.worker_id} is being removed"
        self.router.fail_streams(worker, reason)
        timeout_s = self.router.options.call_timeout_s
        wids = list(worker.requests)
        await asyncio.gather(
            *(worker.client.call("abort", wid, timeout_s=timeout_s) for wid in wids),
            return_exceptions=True,
        )
        deadline = time.monotonic() + timeout_s
        while worker.requests and time.monotonic() < deadline:
            await asyncio.sleep(_STATE_POLL_S)

    async def _blocks_back(self, worker: Worker, timeout_s: float = 5.0) -> tuple[int, int]:
        """(num_blocks, num_free_blocks) once every block is free (the aborts of requests that
        ended are sent asynchronously), or as they are at the deadline."""
        deadline = time.monotonic() + timeout_s
        blocks = (-1, -1)
        while True:
            try:
                stats = await worker.client.call("stats", timeout_s=timeout_s)
                blocks = (stats["num_blocks"], stats["num_free_blocks"])
            except Exception as e:  # dead meanwhile: its memory goes with its process
                log.warning("stats of %s while removing it: %s", worker.worker_id, e)
                return blocks
            if blocks[0] == blocks[1] or time.monotonic() > deadline:
                return blocks
            await asyncio.sleep(_STATE_POLL_S)

    async def _drop_pairs(self, worker_id: str, peers: list[str]) -> None:
        """The workers that had a KV pair with the removed one drop theirs (its group, threads
        and store connection), best effort."""
        by_id = {w.worker_id: w for w in self.router.workers if w.alive}
        timeout_s = self.router.options.call_timeout_s
        calls = [
            by_id[p].client.call("disconnect", worker_id, timeout_s=timeout_s)
            for p in peers
            if p in by_id
        ]
        for outcome in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(outcome, Exception):
                log.info("dropping the pair with %s: %s", worker_id, _first_line(outcome))

    def _new_id(self, tier: str, role: str) -> str:
        prefix = pool_name(tier, role)
        index = 1 + max(
            (_index(wid) for wid in self._used_ids if wid.startswith(prefix + "-")), default=-1
        )
        worker_id = f"{prefix}-{index}"
        self._used_ids.add(worker_id)
        return worker_id


def _check_count(pool: str, count: int) -> None:
    if count < 0:
        raise ScalingError("INVALID_ARGUMENT", f"count must be >= 0, got {count}")
    if count == 0:
        raise ScalingError(
            "FAILED_PRECONDITION",
            f"{pool} cannot have 0 workers: its tier's requests need at least one",
        )


def _failed(error: BaseException, result: ScaleResult) -> ScalingError:
    """A step failed (a worker did not start, most likely): say so, and what changed before."""
    return ScalingError("UNAVAILABLE", f"{_first_line(error)} (so far: {result.summary()})")


def _other(role: str) -> str:
    return "decode" if role == "prefill" else "prefill"


def _index(worker_id: str) -> int:
    match = re.search(r"-(\d+)$", worker_id)
    return int(match.group(1)) if match else -1


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:500] if text else type(e).__name__
