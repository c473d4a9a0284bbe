"""The admin gRPC service, `baton.v1.Admin` (proto/admin.proto): list the workers, scale a pool,
switch a worker's role, apply a plan. A thin layer over `router.scaling.PoolScaler`: bad input
gets INVALID_ARGUMENT / NOT_FOUND / FAILED_PRECONDITION before any worker is touched; a worker
that does not start gets UNAVAILABLE, with what changed before it in the message."""

from __future__ import annotations

import logging

import grpc

from proto import admin_pb2, admin_pb2_grpc
from router.scaling import PoolScaler, ScaleResult, ScalingError, pool_name
from router.workers import Worker

log = logging.getLogger(__name__)


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(self, scaler: PoolScaler):
        self.scaler = scaler

    async def ListWorkers(self, request, context):
        workers = [self._worker_info(w) for w in self.scaler.router.workers]
        return admin_pb2.ListWorkersResponse(workers=workers, pools=self._pools())

    async def ScalePool(self, request, context):
        return await self._run(
            context, self.scaler.scale, request.pool, request.count, request.drain_timeout_s
        )

    async def SwitchRole(self, request, context):
        return await self._run(
            context,
            self.scaler.switch_role,
            request.worker_id,
            request.pool,
            request.to_role,
            request.drain_timeout_s,
        )

    async def ApplyPlan(self, request, context):
        return await self._run(
            context,
            self.scaler.apply_plan,
            request.tier,
            request.prefill,
            request.decode,
            request.drain_timeout_s,
        )

    async def _run(self, context, operation, *args) -> admin_pb2.ScaleResponse:
        try:
            result = await operation(*args)
        except ScalingError as e:
            await context.abort(getattr(grpc.StatusCode, e.code), e.message)
        except Exception as e:
            log.exception("admin operation failed")
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}")
        return self._response(result)

    def _response(self, result: ScaleResult) -> admin_pb2.ScaleResponse:
        removed = [
            admin_pb2.RemovedWorker(
                worker_id=r.worker_id,
                finished=r.finished,
                moved=r.moved,
                num_blocks=r.num_blocks,
                num_free_blocks=r.num_free_blocks,
                drain_s=r.drain_s,
            )
            for r in result.removed
        ]
        switched = [
            admin_pb2.SwitchedWorker(from_worker_id=a, to_worker_id=b, to_role=role)
            for a, b, role in result.switched
        ]
        return admin_pb2.ScaleResponse(
            added=result.added, removed=removed, switched=switched, pools=self._pools()
        )

    def _pools(self) -> list[admin_pb2.PoolInfo]:
        return [
            admin_pb2.PoolInfo(name=name, tier=tier, role=role, count=count)
            for name, tier, role, count in self.scaler.pool_sizes()
        ]

    def _worker_info(self, worker: Worker) -> admin_pb2.WorkerInfo:
        described = self.scaler.factory.describe(worker.worker_id)
        return admin_pb2.WorkerInfo(
            worker_id=worker.worker_id,
            tier=worker.tier,
            role=worker.role,
            pool=pool_name(worker.tier, worker.role),
            state=worker.state,
            in_flight=worker.load,
            restarts=worker.restarts,
            resources=described.get("resources", {}),
            node_id=described.get("node_id", ""),
            replaced=described.get("replaced", ""),
        )
