"""The launcher's side of scaling at runtime (router/scaling.py drives it): worker processes as
Ray actors, created from the deployment's config like the first ones, and stopped.

Resources: a worker added to a pool asks for the pool's Ray resources (e.g. `{"GPU": 1,
"decode_gpu": 1}`), so it lands where the pool's workers may. A worker that switches role takes
its predecessor's place instead: the same resources (`prefill_gpu` included: the GPU it held)
on the same node, with the new role's engine arguments. Pool resources say where a role may
start; after a switch a `prefill_gpu` node may host a decode worker, and switching it back
returns it. Its restarts keep those resources, on any node that has them.
"""

from __future__ import annotations

import asyncio
import logging

from deploy.config import BatonConfig
from deploy.launcher import WorkerSpec, worker_spec
from router.scaling import WorkerFactory
from router.workers import RayWorkerClient, WorkerClient

log = logging.getLogger(__name__)

_SHUTDOWN_TIMEOUT_S = 15.0  # a clean stop (engine loop, KV pairs) before the kill
_NODE_TIMEOUT_S = 5.0


class RayWorkerFactory(WorkerFactory):
    """Starts and stops worker actors. `actors` and `specs` are the deployment's (worker id ->
    actor handle / WorkerSpec), which the supervisor's restarts and `Deployment.stop` read."""

    def __init__(
        self,
        config: BatonConfig,
        paths: dict[str, str],
        deployment_id: str,
        store_host: str,
        store_port: int,
        actors: dict,
        specs: dict[str, WorkerSpec],
    ):
        self.config = config
        self.paths = paths  # tier -> model folder
        self.where = (deployment_id, store_host, store_port)
        self.actors = actors
        self.specs = specs
        self._nodes: dict[str, str] = {}  # worker id -> Ray node id, once asked
        self._replaced: dict[str, str] = {}  # switched worker id -> the one it replaced

    async def start(self, tier, role, worker_id, in_place_of=None) -> WorkerClient:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        pool = next((p for p in self.config.pools if p.tier == tier and p.role == role), None)
        if pool is None:
            raise ValueError(f"tier {tier!r} has no {role} pool in the config")
        resources, options = None, {}
        if in_place_of is not None:
            resources = held_resources(self.specs[in_place_of])
            node_id = self._nodes.get(in_place_of)
            if node_id:
                options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=False)
        spec = worker_spec(
            self.config, pool, self.paths[tier], worker_id, *self.where, resources=resources
        )
        # The node pin is for this start only: a restart goes wherever the resources are.
        actor = _spawn_with(spec, options)
        self.actors[worker_id] = actor
        self.specs[worker_id] = spec
        try:
            await asyncio.wait_for(_ping(actor), self.config.worker_start_timeout_s)
        except BaseException as e:
            ray.kill(actor)
            self.actors.pop(worker_id, None)
            self.specs.pop(worker_id, None)
            if isinstance(e, asyncio.TimeoutError):
                raise TimeoutError(
                    f"{worker_id} did not start within {self.config.worker_start_timeout_s} s "
                    f"(are {spec.options['resources'] or 'its'} resources free?)"
                ) from None
            raise
        if in_place_of is not None:
            self._replaced[worker_id] = in_place_of
        await self._learn_node(worker_id)
        return RayWorkerClient(actor)

    async def stop(self, worker_id: str) -> None:
        import ray

        actor = self.actors.pop(worker_id, None)
        if actor is None:
            return
        # Where it runs now (a restart may have moved it): a switch starts its successor there.
        await self._learn_node(worker_id, actor, refresh=True)
        try:
            await asyncio.wait_for(_call(actor.shutdown), _SHUTDOWN_TIMEOUT_S)
        except Exception as e:  # dead or hung: the kill below frees it all the same
            log.info("shutting %s down: %s", worker_id, e)
        ray.kill(actor)

    def describe(self, worker_id: str) -> dict:
        spec = self.specs.get(worker_id)
        return {
            "resources": held_resources(spec) if spec else {},
            "node_id": self._nodes.get(worker_id, ""),
            "replaced": self._replaced.get(worker_id, ""),
        }

    async def learn_nodes(self) -> None:
        """Find the node of every worker (for ListWorkers), concurrently."""
        await asyncio.gather(*(self._learn_node(wid) for wid in list(self.actors)))

    async def _learn_node(self, worker_id: str, actor=None, refresh: bool = False) -> None:
        """Remember the node the worker runs on (best effort, through Ray's `__ray_call__`)."""
        if worker_id in self._nodes and not refresh:
            return
        actor = actor or self.actors.get(worker_id)
        try:
            node = await asyncio.wait_for(_call(actor.__ray_call__, _node_id), _NODE_TIMEOUT_S)
            self._nodes[worker_id] = node
        except Exception as e:
            log.info("the node of %s is unknown: %s", worker_id, e)


def held_resources(spec: WorkerSpec) -> dict[str, float]:
    """The Ray resources a spec's actor holds, in a pool's `resources` form."""
    options = spec.options
    return {"CPU": options["num_cpus"], "GPU": options["num_gpus"], **options["resources"]}


def _spawn_with(spec: WorkerSpec, options: dict):
    """`spec.spawn()` with extra actor options for this start only."""
    pinned = WorkerSpec(**{**spec.__dict__, "options": {**spec.options, **options}})
    return pinned.spawn()


# A lambda: pickled by value, so the worker process need not import this module.
_node_id = lambda actor: __import__("ray").get_runtime_context().get_node_id()  # noqa: E731


async def _ping(actor) -> str:
    return await actor.ping.remote()


async def _call(method, *args):
    return await method.remote(*args)
