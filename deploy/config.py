"""Baton's deployment config: tiers (model + engine args) and worker pools. Loaded from YAML and
validated here, so a bad config fails at start with a message naming the field."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from engine.chat_template import read_template
from engine.quantization.config import QuantConfig

ROLES = ("prefill", "decode", "colocated")
# A tier is served either disaggregated (a prefill and a decode pool) or colocated (workers
# that prefill and decode their own requests: the baseline disaggregation is measured against).
DISAGGREGATED, COLOCATED = {"prefill", "decode"}, {"colocated"}
_POSITIVE_SECONDS = (
    "transfer_timeout_s",
    "health_check_interval_s",
    "health_check_timeout_s",
    "engine_stall_timeout_s",
    "worker_call_timeout_s",
    "prefill_timeout_s",
    "worker_start_timeout_s",
    "reservation_ttl_s",
    "drain_timeout_s",
)


@dataclass
class TierConfig:
    name: str
    model: str | None = None  # a Hugging Face model folder; None: the embedded demo model
    dtype: str = "auto"
    engine_args: dict = field(default_factory=dict)  # EngineConfig fields (block_size, ...)
    max_tokens_limit: int = 4096  # the largest max_tokens a request may ask for
    default_max_tokens: int = 64
    # SLOs for requests without hints; goodput counts requests that meet them.
    ttft_slo_ms: float = 2000.0
    tpot_slo_ms: float = 200.0
    profile: str | None = None  # latency profile from `baton profile`, seeds placement's models
    quality: float = 1.0  # for tier selection: how good this tier's answers are, 0..1
    # For /v1/chat/completions: Jinja2 text or a file path; None: the model's own template.
    chat_template: str | None = None
    # Admission: requests waiting for a decode reservation or their prefill; beyond this,
    # RESOURCE_EXHAUSTED (HTTP 429). See docs/RELIABILITY.md.
    max_queued_requests: int = 256
    max_prompt_chars: int | None = None  # longer text prompts are refused; None: 64 x context

    def __post_init__(self) -> None:
        if self.max_queued_requests < 0:
            raise ValueError(f"config: tiers.{self.name}.max_queued_requests must be >= 0")
        if self.max_prompt_chars is not None and self.max_prompt_chars < 1:
            raise ValueError(f"config: tiers.{self.name}.max_prompt_chars must be >= 1")
        try:
            QuantConfig.parse(self.engine_args.get("quantization"))
        except ValueError as e:
            raise ValueError(f"config: tiers.{self.name}.engine_args: {e}") from None
        if self.chat_template is not None:
            try:
                read_template(self.chat_template)
            except ValueError as e:
                raise ValueError(f"config: tiers.{self.name}.{e}") from None


# What a pool may set for its own workers over its tier's engine_args: sizing and step
# scheduling only (a decode pool's async scheduling, say). The rest (block size, context, KV
# dtype, the model's math) is the tier's, as the router assumes it.
POOL_ENGINE_ARGS = frozenset(
    {
        "num_blocks",
        "kv_cache_memory_fraction",
        "max_num_seqs",
        "max_num_batched_tokens",
        "enforce_eager",
        "prefill_graphs",
        "decode_graphs",
        "async_scheduling",
    }
)


@dataclass
class PoolConfig:
    tier: str
    role: str
    count: int = 1
    # Ray resources per worker, e.g. {"GPU": 1, "prefill_gpu": 1} or {"CPU": 1}.
    resources: dict = field(default_factory=lambda: {"CPU": 1})
    gpu_type: str = "cpu"  # informational: what the resources above buy
    cost_per_hour: float = 0.0  # $ per instance-hour, for tier selection and planning
    # Over the tier's engine_args for this pool's workers (POOL_ENGINE_ARGS only), e.g. a
    # prefill pool with fewer KV blocks than its decode pool.
    engine_args: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        other = sorted(set(self.engine_args) - POOL_ENGINE_ARGS)
        if other:
            raise ValueError(
                f"config: a pool's engine_args may set only {sorted(POOL_ENGINE_ARGS)}; "
                f"{other} belong to the tier"
            )


@dataclass
class BatonConfig:
    tiers: dict[str, TierConfig]
    pools: list[PoolConfig]
    default_tier: str
    ray_address: str | None = None  # None: start a local Ray; "auto" or "ray://...": join one
    grpc_host: str = "0.0.0.0"
    grpc_port: int = 50051
    metrics_port: int = 9400  # the router's Prometheus /metrics (workers' metrics included)
    http_host: str = "0.0.0.0"
    http_port: int | None = 8000  # the OpenAI-compatible API; None: off
    api_key: str | None = None  # None: no key needed; else HTTP Bearer / gRPC metadata
    # The admin gRPC service's key (scaling, docs/SCALING.md); None: `api_key` guards it too.
    admin_api_key: str | None = None
    # gloo | nccl (NCCL's C API) | torch-nccl (ProcessGroupNCCL) | auto (see kvtransfer.pair)
    transfer_backend: str = "auto"
    transfer_timeout_s: float = 30.0
    max_attempts: int = 3  # placements per request before it fails
    placement: str = "goodput"  # goodput | least_loaded | round_robin
    overload_policy: str = "queue"  # when no placement meets the SLOs: queue | reject
    # Tier selection for model "auto": quality − cost_weight × $ per request (see router/tiers.py)
    tier_cost_weight: float = 0.0
    # Faults and limits (docs/RELIABILITY.md).
    restart_workers: bool = True  # re-create a dead worker (same id, same pool resources)
    max_worker_restarts: int = 5  # per worker, over the deployment's life
    health_check_interval_s: float = 1.0  # every live worker is pinged this often
    health_check_timeout_s: float = 5.0  # a ping's deadline; 3 missed in a row: dead
    engine_stall_timeout_s: float = 300.0  # an engine loop stuck this long: dead
    worker_call_timeout_s: float = 30.0  # deadline of every router → worker call but prefill
    prefill_timeout_s: float = 300.0  # a prefill call's deadline, queueing included
    worker_start_timeout_s: float = 300.0  # a restarted worker must load its model by then
    reservation_ttl_s: float = 60.0  # a decode reservation not started by then is released
    # A worker being removed (scaled down, switching role) lets its requests finish this long;
    # the rest are re-placed elsewhere (docs/SCALING.md).
    drain_timeout_s: float = 60.0
    max_request_bytes: int = 4 << 20  # gRPC message and HTTP body limit

    def __post_init__(self) -> None:
        if not self.tiers:
            raise ValueError("config: at least one tier is needed")
        if self.default_tier not in self.tiers:
            raise ValueError(f"config: default_tier {self.default_tier!r} is not a tier")
        for pool in self.pools:
            if pool.tier not in self.tiers:
                raise ValueError(f"config: pool names unknown tier {pool.tier!r}")
            if pool.role not in ROLES:
                raise ValueError(f"config: pool role must be one of {ROLES}, got {pool.role!r}")
            if pool.count < 1:
                raise ValueError(f"config: pool count must be >= 1, got {pool.count}")
        for name in self.tiers:
            roles = {p.role for p in self.pools if p.tier == name}
            if roles not in (DISAGGREGATED, COLOCATED):
                raise ValueError(
                    f"config: tier {name!r} needs a prefill and a decode pool, or only "
                    f"colocated pools; got {sorted(roles)}"
                )
        if self.transfer_backend not in ("auto", "gloo", "nccl", "torch-nccl"):
            raise ValueError(
                "config: transfer_backend must be auto, gloo, nccl or torch-nccl, "
                f"got {self.transfer_backend!r}"
            )
        if self.placement not in ("goodput", "least_loaded", "round_robin"):
            raise ValueError(f"config: unknown placement {self.placement!r}")
        if self.overload_policy not in ("queue", "reject"):
            raise ValueError("config: overload_policy must be queue or reject")
        if self.max_attempts < 1:
            raise ValueError("config: max_attempts must be >= 1")
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            raise ValueError(f"config: http_port must be in [0, 65535], got {self.http_port}")
        for name in _POSITIVE_SECONDS:
            if not getattr(self, name) > 0:
                raise ValueError(f"config: {name} must be > 0, got {getattr(self, name)}")
        if self.max_worker_restarts < 0:
            raise ValueError("config: max_worker_restarts must be >= 0")
        if self.max_request_bytes < 1024:
            raise ValueError("config: max_request_bytes must be >= 1024")

    @classmethod
    def from_dict(cls, raw: dict) -> BatonConfig:
        raw = dict(raw)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"config: unknown keys {sorted(unknown)}")
        tiers = {
            name: _build(TierConfig, {"name": name, **(spec or {})}, f"tiers.{name}")
            for name, spec in (raw.pop("tiers", None) or {}).items()
        }
        pools = [
            _build(PoolConfig, spec, f"pools[{i}]") for i, spec in enumerate(raw.pop("pools", []))
        ]
        raw.setdefault("default_tier", next(iter(tiers), ""))
        return cls(tiers=tiers, pools=pools, **raw)

    @classmethod
    def load(cls, path: str | Path) -> BatonConfig:
        return cls.from_dict(yaml.safe_load(Path(path).read_text()) or {})

    @classmethod
    def embedded_default(cls) -> BatonConfig:
        """One CPU machine: the demo model, one prefill and one decode worker."""
        return cls.from_dict(
            {
                "tiers": {
                    "tiny": {
                        "engine_args": {"num_blocks": 512, "max_num_batched_tokens": 512},
                    }
                },
                "pools": [
                    {"tier": "tiny", "role": "prefill", "count": 1},
                    {"tier": "tiny", "role": "decode", "count": 1},
                ],
            }
        )


def _build(cls, spec: dict, where: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(spec) - known
    if unknown:
        raise ValueError(f"config: {where} has unknown keys {sorted(unknown)}")
    return cls(**spec)
