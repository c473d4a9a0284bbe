from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListWorkersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("worker_id", "tier", "role", "pool", "state", "in_flight", "restarts", "resources", "node_id", "replaced")
    class ResourcesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REPLACED_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    tier: str
    role: str
    pool: str
    state: str
    in_flight: int
    restarts: int
    resources: _containers.ScalarMap[str, float]
    node_id: str
    replaced: str
    def __init__(self, worker_id: _Optional[str] = ..., tier: _Optional[str] = ..., role: _Optional[str] = ..., pool: _Optional[str] = ..., state: _Optional[str] = ..., in_flight: _Optional[int] = ..., restarts: _Optional[int] = ..., resources: _Optional[_Mapping[str, float]] = ..., node_id: _Optional[str] = ..., replaced: _Optional[str] = ...) -> None: ...

class PoolInfo(_message.Message):
    __slots__ = ("name", "tier", "role", "count")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    name: str
    tier: str
    role: str
    count: int
    def __init__(self, name: _Optional[str] = ..., tier: _Optional[str] = ..., role: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...

class ListWorkersResponse(_message.Message):
    __slots__ = ("workers", "pools")
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    POOLS_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    pools: _containers.RepeatedCompositeFieldContainer[PoolInfo]
    def __init__(self, workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ..., pools: _Optional[_Iterable[_Union[PoolInfo, _Mapping]]] = ...) -> None: ...

class ScalePoolRequest(_message.Message):
    __slots__ = ("pool", "count", "drain_timeout_s")
    POOL_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    DRAIN_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    pool: str
    count: int
    drain_timeout_s: float
    def __init__(self, pool: _Optional[str] = ..., count: _Optional[int] = ..., drain_timeout_s: _Optional[float] = ...) -> None: ...

class SwitchRoleRequest(_message.Message):
    __slots__ = ("worker_id", "pool", "to_role", "drain_timeout_s")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    TO_ROLE_FIELD_NUMBER: _ClassVar[int]
    DRAIN_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    pool: str
    to_role: str
    drain_timeout_s: float
    def __init__(self, worker_id: _Optional[str] = ..., pool: _Optional[str] = ..., to_role: _Optional[str] = ..., drain_timeout_s: _Optional[float] = ...) -> None: ...

class ApplyPlanRequest(_message.Message):
    __slots__ = ("tier", "prefill", "decode", "drain_timeout_s")
    TIER_FIELD_NUMBER: _ClassVar[int]
    PREFILL_FIELD_NUMBER: _ClassVar[int]
    DECODE_FIELD_NUMBER: _ClassVar[int]
    DRAIN_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    tier: str
    prefill: int
    decode: int
    drain_timeout_s: float
    def __init__(self, tier: _Optional[str] = ..., prefill: _Optional[int] = ..., decode: _Optional[int] = ..., drain_timeout_s: _Optional[float] = ...) -> None: ...

class RemovedWorker(_message.Message):
    __slots__ = ("worker_id", "finished", "moved", "num_blocks", "num_free_blocks", "drain_s")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    MOVED_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DRAIN_S_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    finished: int
    moved: int
    num_blocks: int
    num_free_blocks: int
    drain_s: float
    def __init__(self, worker_id: _Optional[str] = ..., finished: _Optional[int] = ..., moved: _Optional[int] = ..., num_blocks: _Optional[int] = ..., num_free_blocks: _Optional[int] = ..., drain_s: _Optional[float] = ...) -> None: ...

class SwitchedWorker(_message.Message):
    __slots__ = ("from_worker_id", "to_worker_id", "to_role")
    FROM_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    TO_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    TO_ROLE_FIELD_NUMBER: _ClassVar[int]
    from_worker_id: str
    to_worker_id: str
    to_role: str
    def __init__(self, from_worker_id: _Optional[str] = ..., to_worker_id: _Optional[str] = ..., to_role: _Optional[str] = ...) -> None: ...

class ScaleResponse(_message.Message):
    __slots__ = ("added", "removed", "switched", "pools")
    ADDED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    SWITCHED_FIELD_NUMBER: _ClassVar[int]
    POOLS_FIELD_NUMBER: _ClassVar[int]
    added: _containers.RepeatedScalarFieldContainer[str]
    removed: _containers.RepeatedCompositeFieldContainer[RemovedWorker]
    switched: _containers.RepeatedCompositeFieldContainer[SwitchedWorker]
    pools: _containers.RepeatedCompositeFieldContainer[PoolInfo]
    def __init__(self, added: _Optional[_Iterable[str]] = ..., removed: _Optional[_Iterable[_Union[RemovedWorker, _Mapping]]] = ..., switched: _Optional[_Iterable[_Union[SwitchedWorker, _Mapping]]] = ..., pools: _Optional[_Iterable[_Union[PoolInfo, _Mapping]]] = ...) -> None: ...
