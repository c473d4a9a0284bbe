"""Starting Baton on Ray: the KV store, the worker actors of every pool, the router, gRPC and
the OpenAI-compatible HTTP API.

The driver process (this one) is the router. Pools map to Ray resources, so on a cluster
started with `ray up deploy/cluster.yaml` prefill workers land on nodes that advertise
`prefill_gpu` and decode workers on nodes that advertise `decode_gpu`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import start_http_server

from deploy.config import COLOCATED, BatonConfig, PoolConfig, TierConfig
from engine.chat_template import ChatTemplate
from engine.config import ModelConfig, parse_dtype
from engine.tokenizer import Tokenizer
from router.latency_model import load_profile
from router.placement import POLICIES, GoodputPlacement, Placement
from router.router import Router, RouterOptions, TierInfo
from router.scaling import PoolScaler
from router.server import start_grpc_server
from router.supervisor import SupervisorOptions
from router.tiers import TierCost, TierSelector
from router.workers import (
    CONCURRENCY_GROUPS,
    CONTROL_GROUP,
    RayWorkerClient,
    Worker,
    WorkerClient,
)

log = logging.getLogger(__name__)


def resolve_model(tier: TierConfig) -> str:
    if tier.model:
        return tier.model
    from engine.testing import ensure_default_model

    return str(ensure_default_model())


def kv_bytes_per_token(model_config: ModelConfig, dtype_bytes: int, engine_args: dict) -> int:
    """What one prompt token's KV costs to move: 8-bit caches hold one byte per element plus a
    float32 scale per head and token (engine/kv_cache/quant.py)."""
    if engine_args.get("kv_cache_dtype", "auto") in ("fp8", "int8"):
        heads = 2 * model_config.num_kv_layers * model_config.num_kv_heads
        return heads * (model_config.head_dim + 4)
    return model_config.kv_elements_per_token * dtype_bytes


def tier_info(tier: TierConfig, path: str, colocated: bool = False) -> TierInfo:
    model_config = ModelConfig.from_pretrained(path)
    max_len = tier.engine_args.get("max_model_len") or model_config.max_position_embeddings
    dtype = model_config.torch_dtype if tier.dtype == "auto" else tier.dtype
    dtype_bytes = parse_dtype(dtype).itemsize
    return TierInfo(
        name=tier.name,
        path=path,
        tokenizer=Tokenizer.from_pretrained(path),
        vocab_size=model_config.vocab_size,
        max_model_len=max_len,
        max_tokens_limit=tier.max_tokens_limit,
        default_max_tokens=tier.default_max_tokens,
        block_size=tier.engine_args.get("block_size", 16),
        kv_bytes_per_token=kv_bytes_per_token(model_config, dtype_bytes, tier.engine_args),
        ttft_slo_ms=tier.ttft_slo_ms,
        tpot_slo_ms=tier.tpot_slo_ms,
        chat_template=ChatTemplate.from_pretrained(path, tier.chat_template),
        max_queued_requests=tier.max_queued_requests,
        max_prompt_chars=tier.max_prompt_chars or 0,
        colocated=colocated,
    )


@dataclass
class Deployment:
    config: BatonConfig
    router: Router
    actors: dict[str, object] = field(default_factory=dict)  # worker id -> Ray actor handle
    store: object = None
    grpc_server: object = None
    grpc_port: int = 0
    metrics_server: object = None
    metrics_port: int = 0
    http_server: object = None  # router.openai_api.HttpServer; None when http_port is None
    http_port: int = 0
    specs: dict[str, WorkerSpec] = field(default_factory=dict)  # how to re-create each worker
    scaler: PoolScaler | None = None  # runtime pool changes (the admin gRPC service)

    async def stop(self) -> None:
        import ray

        if self.scaler is not None:
            await self.scaler.stop()
        if self.http_server is not None:
            await self.http_server.stop()
        if self.grpc_server is not None:
            await self.grpc_server.stop(grace=1.0)
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        await self.router.stop()
        await self._close_workers()
        for actor in self.actors.values():
            ray.kill(actor)

    async def _close_workers(self, timeout_s: float = 5.0) -> None:
        """Each worker stops its engine thread and closes its KV agent before its actor is
        killed: the agents' threads wait on the KV store, which lives in this process and goes
        when it exits (a decode worker still running then logged c10d errors with C++ stack
        traces on every stop). Bounded: a hung worker is killed anyway."""
        import ray

        refs = [
            actor.shutdown.options(concurrency_group=CONTROL_GROUP).remote()
            for actor in self.actors.values()
        ]
        if refs:
            wait = functools.partial(ray.wait, refs, num_returns=len(refs), timeout=timeout_s)
            await asyncio.get_running_loop().run_in_executor(None, wait)


def _ray_init(config: BatonConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    if config.ray_address:
        ray.init(address=config.ray_address)
        return
    # A local Ray with enough CPU slots for every worker, even on a 2-core machine, and as many
    # again for workers added at runtime (docs/SCALING.md).
    needed = sum(p.count * p.resources.get("CPU", 0) for p in config.pools)
    ray.init(num_cpus=max(2 * int(needed) + 1, os.cpu_count() or 1), include_dashboard=False)


@dataclass
class WorkerSpec:
    """How to create one worker's actor, the first time and after it died."""

    worker_id: str
    role: str
    tier: str
    cls: type
    options: dict  # Ray actor options: resources, concurrency, name
    args: tuple
    kwargs: dict

    def spawn(self, incarnation: int = 0):
        import ray

        name = self.options["name"] + (f".{incarnation}" if incarnation else "")
        # Concurrency groups keep health checks and aborts answering while every other
        # actor thread is blocked in a long call (see router/workers.py).
        cls = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(self.cls)
        return cls.options(**{**self.options, "name": name}).remote(*self.args, **self.kwargs)


def worker_specs(
    config: BatonConfig, store_host: str, store_port: int, deployment_id: str | None = None
):
    """Every pool's worker specs and each tier's TierInfo."""
    # Actor names stay unique across deployments.
    deployment_id = deployment_id or uuid.uuid4().hex[:8]
    specs, tiers = [], {}
    for name, tier in config.tiers.items():
        path = resolve_model(tier)
        colocated = {p.role for p in config.pools if p.tier == name} == COLOCATED
        tiers[name] = tier_info(tier, path, colocated)
        for pool in (p for p in config.pools if p.tier == name):
            for i in range(pool.count):
                worker_id = f"{name}-{pool.role}-{i}"
                where = (deployment_id, store_host, store_port)
                specs.append(worker_spec(config, pool, path, worker_id, *where))
    return specs, tiers


def worker_spec(
    config: BatonConfig,
    pool: PoolConfig,
    path: str,
    worker_id: str,
    deployment_id: str,
    store_host: str,
    store_port: int,
    resources: dict | None = None,
) -> WorkerSpec:
    """One worker of `pool` (its tier's model at `path`), holding the pool's Ray resources or
    `resources` (a switched worker keeps those of the one it replaces); no GPU: on the CPU."""
    from decode_worker import DecodeWorker
    from prefill_worker import PrefillWorker

    tier = config.tiers[pool.tier]
    resources = dict(pool.resources if resources is None else resources)
    num_cpus = resources.pop("CPU", 1)
    num_gpus = resources.pop("GPU", 0)
    on_cpu = num_gpus == 0
    kwargs = {}
    if pool.role != "prefill":
        kwargs = {"reservation_ttl_s": config.reservation_ttl_s}
    if pool.role == "colocated":
        kwargs["colocated"] = True
    options = dict(
        name=f"baton-{deployment_id}:{worker_id}",
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        resources=resources,
        max_concurrency=64,
        max_restarts=0,  # the router restarts workers itself (router/supervisor.py)
    )
    engine_args = {"model": path, "dtype": tier.dtype, **tier.engine_args, **pool.engine_args}
    args = (
        worker_id,
        {**engine_args, "device": "cpu" if on_cpu else "cuda"},
        store_host,
        store_port,
        config.transfer_timeout_s,
        1 if on_cpu else None,
        config.transfer_backend,
        pool.tier,
    )
    cls = PrefillWorker if pool.role == "prefill" else DecodeWorker
    return WorkerSpec(worker_id, pool.role, pool.tier, cls, options, args, kwargs)


def start_workers(
    config: BatonConfig, store_host: str, store_port: int, deployment_id: str | None = None
):
    """Create every pool's actors; returns (workers, actors, tier infos, specs by worker id)."""
    import ray

    specs, tiers = worker_specs(config, store_host, store_port, deployment_id)
    actors = {spec.worker_id: spec.spawn() for spec in specs}
    workers = [
        Worker(spec.worker_id, spec.role, spec.tier, RayWorkerClient(actors[spec.worker_id]))
        for spec in specs
    ]
    # Wait until every engine is loaded (a worker that cannot start fails the deployment).
    ray.get([a.ping.remote() for a in actors.values()], timeout=config.worker_start_timeout_s)
    return workers, actors, tiers, {spec.worker_id: spec for spec in specs}


def make_respawn(config: BatonConfig, actors: dict, specs: dict[str, WorkerSpec]):
    """The supervisor's way to bring a worker back: kill what is left of its process, create
    the actor anew from its spec (same id, same resources), wait until its engine is loaded."""

    async def respawn(worker: Worker) -> WorkerClient:
        import ray

        old = actors.get(worker.worker_id)
        if old is not None:
            ray.kill(old)  # a hung process must free its resources (and GPU) first
        actor = specs[worker.worker_id].spawn(worker.restarts)  # a new name per attempt
        actors[worker.worker_id] = actor
        try:
            await asyncio.wait_for(_ping(actor), config.worker_start_timeout_s)
        except BaseException:
            ray.kill(actor)
            raise
        return RayWorkerClient(actor)

    return respawn


async def _ping(actor) -> str:
    return await actor.ping.remote()


async def deploy(
    config: BatonConfig, grpc_port: int | None = None, metrics_port: int | None = None
) -> Deployment:
    """Bring up everything and serve gRPC and /metrics; returns once the ports accept requests.
    A port of 0 picks a free one (see the returned Deployment)."""
    import ray

    from deploy.scaling import RayWorkerFactory  # NOTE: it imports this module
    from kvtransfer.store import start_store

    _ray_init(config)
    host = ray.util.get_node_ip_address()
    store, store_port = start_store(host)
    deployment_id = uuid.uuid4().hex[:8]  # actor names stay unique across deployments
    workers, actors, tiers, specs = await asyncio.to_thread(
        start_workers, config, host, store_port, deployment_id
    )
    router = Router(
        tiers,
        config.default_tier,
        workers,
        config.max_attempts,
        make_placement(config),
        RouterOptions(
            call_timeout_s=config.worker_call_timeout_s,
            prefill_timeout_s=config.prefill_timeout_s,
        ),
        SupervisorOptions(
            interval_s=config.health_check_interval_s,
            ping_timeout_s=config.health_check_timeout_s,
            engine_stall_timeout_s=config.engine_stall_timeout_s,
            restart=config.restart_workers,
            max_restarts=config.max_worker_restarts,
        ),
        make_respawn(config, actors, specs),
    )
    router.tier_selector = make_tier_selector(config, router.placement)
    await router.start()
    paths = {name: tier.path for name, tier in tiers.items()}
    factory = RayWorkerFactory(config, paths, deployment_id, host, store_port, actors, specs)
    await factory.learn_nodes()
    scaler = PoolScaler(router, factory, config.drain_timeout_s)
    port = config.grpc_port if grpc_port is None else grpc_port
    server, bound = await start_grpc_server(
        router,
        config.grpc_host,
        port,
        config.api_key,
        config.max_request_bytes,
        scaler,
        config.admin_api_key,
    )
    metrics_port = config.metrics_port if metrics_port is None else metrics_port
    metrics_server, _ = start_http_server(metrics_port, config.grpc_host, router.metrics.registry)
    metrics_bound = metrics_server.server_address[1]
    log.info("Baton up: %d workers, gRPC on %d, metrics on %d", len(workers), bound, metrics_bound)
    deployment = Deployment(
        config,
        router,
        actors,
        store,
        server,
        bound,
        metrics_server,
        metrics_bound,
        specs=specs,
        scaler=scaler,
    )
    if config.http_port is not None:
        from router.openai_api import start_openai_server  # FastAPI is only needed for HTTP

        try:
            deployment.http_server = await start_openai_server(
                router, config.http_host, config.http_port, config.api_key, config.max_request_bytes
            )
        except OSError:  # e.g. the port is taken: stop what is up before saying so
            await deployment.stop()
            raise
        deployment.http_port = deployment.http_server.port
    return deployment


def make_placement(config: BatonConfig) -> Placement:
    if config.placement != "goodput":
        return POLICIES[config.placement]()
    profiles = {
        name: load_profile(tier.profile) for name, tier in config.tiers.items() if tier.profile
    }
    return GoodputPlacement(config.overload_policy, profiles)


def make_tier_selector(config: BatonConfig, placement: Placement) -> TierSelector | None:
    """A selector when there is a choice to make and placement can predict latencies."""
    if len(config.tiers) < 2 or not isinstance(placement, GoodputPlacement):
        return None
    if any(p.role == "colocated" for p in config.pools):
        # NOTE: the selector predicts TTFT and ITL from prefill and decode pools' latency
        # models; colocated tiers have neither: requests name their tier.
        log.warning("tier selection is off: a colocated tier has no latency models")
        return None

    def cost_per_s(tier: str, role: str) -> float:
        pools = [p for p in config.pools if p.tier == tier and p.role == role]
        return sum(p.cost_per_hour for p in pools) / max(len(pools), 1) / 3600

    costs = {
        name: TierCost(name, tier.quality, cost_per_s(name, "prefill"), cost_per_s(name, "decode"))
        for name, tier in config.tiers.items()
    }
    return TierSelector(costs, placement, cost_weight=config.tier_cost_weight)


def load_config(path: str | None, model: str | None) -> BatonConfig:
    config = BatonConfig.load(path) if path else BatonConfig.embedded_default()
    if model:
        for tier in config.tiers.values():
            tier.model = str(Path(model))
    return config
