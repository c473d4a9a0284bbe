"""Scaling at runtime without Ray: the plan diff (current pools + target counts -> actions) on
constructed states, and `PoolScaler` and the admin gRPC service driving a router of fake
in-process workers (draining, moving requests, refusals, the admin key). The Ray end-to-end
version is tests/test_scaling_serving.py."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from proto import admin_pb2, admin_pb2_grpc
from router.placement import LeastLoaded
from router.router import Router, RouterOptions, TierInfo
from router.scaling import Action, PoolScaler, ScalingError, WorkerFactory, plan_actions
from router.server import start_grpc_server
from router.supervisor import SupervisorOptions
from router.workers import LocalWorkerClient, Worker
from tests.test_router_faults import FakeDecode, FakePrefill, continuation, serve

# -- the plan diff ----------------------------------------------------------------------------


def pool(role: str, *loads: int, tier: str = "t", first: int = 0) -> list[Worker]:
    """Workers `{tier}-{role}-{first}`, ... with these many requests in flight each."""
    workers = []
    for i, load in enumerate(loads, start=first):
        w = Worker(f"{tier}-{role}-{i}", role, tier, None)
        w.requests = {f"r{j}" for j in range(load)}
        workers.append(w)
    return workers


def kinds(actions: list[Action]) -> list[tuple[str, str, str]]:
    return [(a.kind, a.role, a.worker_id) for a in actions]


def test_a_pool_shrinking_as_the_other_grows_switches_its_least_loaded_workers():
    workers = pool("prefill", 3, 0, 1, 5) + pool("decode", 2, 2)
    actions = plan_actions(workers, "t", {"prefill": 1, "decode": 6})
    # Three prefill workers go, least loaded first: they switch to decode, which still needs
    # one more, so one is added; nothing is removed.
    assert kinds(actions) == [
        ("switch", "prefill", "t-prefill-1"),
        ("switch", "prefill", "t-prefill-2"),
        ("switch", "prefill", "t-prefill-0"),
        ("add", "decode", ""),
    ]
    assert kinds(plan_actions(workers, "t", {"prefill": 4, "decode": 2})) == []


def test_both_pools_growing_or_shrinking_add_or_remove():
    workers = pool("prefill", 1, 1) + pool("decode", 0, 4, 0)
    assert kinds(plan_actions(workers, "t", {"prefill": 3, "decode": 4})) == [
        ("add", "prefill", ""),
        ("add", "decode", ""),
    ]
    # Least loaded first; among equals the newest (highest index) goes, the originals stay.
    assert kinds(plan_actions(workers, "t", {"prefill": 1, "decode": 1})) == [
        ("remove", "prefill", "t-prefill-1"),
        ("remove", "decode", "t-decode-2"),
        ("remove", "decode", "t-decode-0"),
    ]


def test_scaling_one_pool_never_switches_and_other_tiers_are_left_alone():
    workers = pool("prefill", 0, 0) + pool("decode", 0) + pool("decode", 0, 0, tier="big")
    assert kinds(plan_actions(workers, "t", {"decode": 2})) == [("add", "decode", "")]
    assert kinds(plan_actions(workers, "t", {"prefill": 1})) == [
        ("remove", "prefill", "t-prefill-1")
    ]


def test_down_workers_are_removed_first_and_restarting_ones_count_but_stay():
    workers = pool("prefill", 0) + pool("decode", 0, 0, 0, 0)
    workers[1].alive = False  # t-decode-0: restarts spent, not capacity
    for w in workers[2:4]:  # t-decode-1 and -2 are on their way back
        w.alive, w.restarting = False, True
    actions = plan_actions(workers, "t", {"prefill": 1, "decode": 2})
    # Counted: t-decode-1, -2 (restarting) and -3; one must go, and not a restarting one.
    assert kinds(actions) == [
        ("remove", "decode", "t-decode-0"),
        ("remove", "decode", "t-decode-3"),
    ]
    with pytest.raises(ScalingError, match=r"\['t-decode-1', 't-decode-2'\] restarting") as err:
        plan_actions(workers, "t", {"decode": 1})
    assert err.value.code == "FAILED_PRECONDITION"


def test_draining_workers_are_not_counted_or_chosen():
    workers = pool("prefill", 0) + pool("decode", 0, 0)
    workers[2].draining = True  # already on its way out
    assert kinds(plan_actions(workers, "t", {"prefill": 1, "decode": 1})) == []
    assert kinds(plan_actions(workers, "t", {"prefill": 1, "decode": 2})) == [("add", "decode", "")]


# -- PoolScaler on a router of fake workers ----------------------------------------------------


class HoldingDecode(FakeDecode):
    """Holds each started request (no tokens, its blocks taken) while `hold` is set."""

    def __init__(self):
        super().__init__()
        self.hold = True
        self.held: dict[str, int] = {}
        self.disconnected: list[str] = []

    def start(self, wid, first_token, first_logprobs=None):
        if self.hold:
            self.held[wid] = first_token
        else:
            super().start(wid, first_token)

    def release_held(self) -> None:
        for wid, first_token in list(self.held.items()):
            del self.held[wid]
            super().start(wid, first_token)

    def abort(self, wid):
        self.held.pop(wid, None)
        self.reserved.pop(wid, None)

    def stats(self):
        return {"num_blocks": 64, "num_free_blocks": 64 - len(self.reserved)}

    def disconnect(self, peer_id):
        self.disconnected.append(peer_id)


class FakeFactory(WorkerFactory):
    def __init__(self, fail_roles=()):
        self.fail_roles = set(fail_roles)
        self.started: list[tuple[str, str, str | None]] = []
        self.stopped: list[str] = []

    async def start(self, tier, role, worker_id, in_place_of=None):
        self.started.append((worker_id, role, in_place_of))
        if role in self.fail_roles:
            raise RuntimeError("no node has the resources")
        return LocalWorkerClient(FakePrefill() if role == "prefill" else HoldingDecode())

    async def stop(self, worker_id):
        self.stopped.append(worker_id)


def make_router(num_decode=2, max_attempts=1) -> Router:
    tier = TierInfo("t", "", None, vocab_size=100, max_model_len=512, max_tokens_limit=64,
                    default_max_tokens=8)  # fmt: skip
    workers = [Worker("t-prefill-0", "prefill", "t", LocalWorkerClient(FakePrefill()))]
    workers += [
        Worker(f"t-decode-{i}", "decode", "t", LocalWorkerClient(HoldingDecode()))
        for i in range(num_decode)
    ]
    return Router(
        {"t": tier},
        "t",
        workers,
        max_attempts,
        LeastLoaded(),
        RouterOptions(call_timeout_s=5.0),
        SupervisorOptions(interval_s=0.05, ping_timeout_s=0.5),
    )


def fake(router: Router, worker_id: str):
    return next(w for w in router.workers if w.worker_id == worker_id).client.worker


async def wait_for(condition, timeout_s=5.0):
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


def test_draining_moves_what_is_left_elsewhere_without_spending_an_attempt():
    async def scenario():
        router = make_router(num_decode=2, max_attempts=1)
        factory = FakeFactory()
        scaler = PoolScaler(router, factory)
        await router.start()
        d0, d1 = fake(router, "t-decode-0"), fake(router, "t-decode-1")
        a = asyncio.create_task(serve(router, [5, 6, 7], 6))
        await wait_for(lambda: d0.held)
        b = asyncio.create_task(serve(router, [8, 9], 5))
        await wait_for(lambda: d1.held)
        d0.hold = False  # from now on d0 streams what it starts
        # Equal loads: the newest goes. Its request outlives the drain and moves to d0.
        result = await scaler.scale("t-decode", 1, drain_timeout_s=0.2)
        chunks_b = await b
        assert not a.done()  # a still streams from d0: a drain leaves the others alone
        d0.release_held()
        chunks_a = await a
        await router.stop()
        return router, factory, result, chunks_a, chunks_b, d0

    router, factory, result, chunks_a, chunks_b, d0 = asyncio.run(scenario())
    [removal] = result.removed
    assert (removal.worker_id, removal.finished, removal.moved) == ("t-decode-1", 0, 1)
    assert removal.num_free_blocks == removal.num_blocks == 64 and 0.2 <= removal.drain_s < 2
    assert factory.stopped == ["t-decode-1"]
    assert [w.worker_id for w in router.workers] == ["t-prefill-0", "t-decode-0"]
    # max_attempts is 1, yet the moved request was served: a move is not a failure.
    assert [t for c in chunks_b for t in c.token_ids] == continuation([8, 9], 5)
    assert chunks_b[-1].timings["attempts"] == 2 and chunks_b[-1].decode_instance == "t-decode-0"
    assert [t for c in chunks_a for t in c.token_ids] == continuation([5, 6, 7], 6)
    assert chunks_a[-1].timings["attempts"] == 1
    assert d0.stats()["num_free_blocks"] == 64


def test_added_workers_take_requests_and_a_switch_takes_its_predecessors_place():
    async def scenario():
        router = make_router(num_decode=1)
        factory = FakeFactory()
        scaler = PoolScaler(router, factory)
        await router.start()
        fake(router, "t-decode-0").hold = False
        added = await scaler.scale("decode", 2)  # a bare role names the one tier's pool
        fake(router, "t-decode-1").hold = False
        served = [(await serve(router, [i, i], 3))[-1].decode_instance for i in range(4)]
        await wait_for(lambda: all(w.load == 0 for w in router.workers))
        switched = await scaler.switch_role(pool="t-decode", to_role="prefill")
        outputs = await asyncio.gather(*(serve(router, [i], 3) for i in range(4)))
        served_p = [chunks[-1].prefill_instance for chunks in outputs]
        sizes = scaler.pool_sizes()
        await router.stop()
        return added, served, switched, served_p, sizes, factory

    added, served, switched, served_p, sizes, factory = asyncio.run(scenario())
    assert added.added == ["t-decode-1"] and set(served) == {"t-decode-0", "t-decode-1"}
    # The least loaded decode worker (the newest among idle ones) became t-prefill-1, in
    # t-decode-1's place.
    assert switched.switched == [("t-decode-1", "t-prefill-1", "prefill")]
    assert factory.started[-1] == ("t-prefill-1", "prefill", "t-decode-1")
    assert set(served_p) == {"t-prefill-0", "t-prefill-1"}
    assert sizes == [("t-decode", "t", "decode", 1), ("t-prefill", "t", "prefill", 2)]


def test_a_switch_whose_new_worker_fails_gives_the_place_back_to_the_old_role():
    async def scenario():
        router = make_router(num_decode=2)
        factory = FakeFactory(fail_roles={"prefill"})
        scaler = PoolScaler(router, factory)
        await router.start()
        with pytest.raises(ScalingError) as err:
            await scaler.switch_role(worker_id="t-decode-0")
        await router.stop()
        return router, err.value

    router, error = asyncio.run(scenario())
    assert error.code == "UNAVAILABLE"
    assert "t-prefill-1 (prefill) did not start in t-decode-0's place" in error.message
    assert "t-decode-2 (decode) took it instead" in error.message
    assert sorted(w.worker_id for w in router.workers) == [
        "t-decode-1",
        "t-decode-2",
        "t-prefill-0",
    ]


def test_a_pool_whose_only_worker_stays_down_gets_a_new_one():
    async def scenario():
        router = make_router(num_decode=1)
        router.workers[1].alive = False  # t-decode-0: dead, no restart coming
        factory = FakeFactory()
        scaler = PoolScaler(router, factory)
        await router.start()
        result = await scaler.scale("t-decode", 1)
        fake(router, "t-decode-1").hold = False
        chunks = await serve(router, [4, 2], 3)
        await router.stop()
        return router, factory, result, chunks

    router, factory, result, chunks = asyncio.run(scenario())
    assert [(r.worker_id, r.moved, r.num_blocks) for r in result.removed] == [("t-decode-0", 0, -1)]
    assert result.added == ["t-decode-1"] and factory.stopped == ["t-decode-0"]
    assert [w.worker_id for w in router.workers] == ["t-prefill-0", "t-decode-1"]
    assert [t for c in chunks for t in c.token_ids] == continuation([4, 2], 3)


# -- the admin gRPC service --------------------------------------------------------------------


def admin_scenario(checks, api_key=None, admin_api_key=None):
    """Serve the admin service for a fake deployment (1 prefill + 2 decode) on a free port and
    run `checks(stub, router)` against it."""

    async def scenario():
        router = make_router(num_decode=2)
        scaler = PoolScaler(router, FakeFactory())
        await router.start()
        server, port = await start_grpc_server(
            router, "127.0.0.1", 0, api_key, scaler=scaler, admin_api_key=admin_api_key
        )
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await checks(admin_pb2_grpc.AdminStub(channel), router)
        finally:
            await server.stop(grace=None)
            await router.stop()

    asyncio.run(scenario())


BAD_REQUESTS = [  # (method, request fields, status, part of its message)
    ("ScalePool", {"pool": "t-mixed", "count": 2}, "INVALID_ARGUMENT", "unknown pool"),
    ("ScalePool", {"pool": "t-decode", "count": -1}, "INVALID_ARGUMENT", "count must be >= 0"),
    ("ScalePool", {"pool": "t-prefill", "count": 0}, "FAILED_PRECONDITION", "at least one"),
    ("ScalePool", {"pool": "t-decode", "count": 99}, "INVALID_ARGUMENT", "at most 64"),
    (
        "ScalePool",
        {"pool": "t-decode", "count": 1, "drain_timeout_s": float("nan")},
        "INVALID_ARGUMENT",
        "drain_timeout_s must be finite",
    ),
    ("SwitchRole", {"worker_id": "t-prefill-0"}, "FAILED_PRECONDITION", "last serving"),
    ("SwitchRole", {"worker_id": "t-decode-7"}, "NOT_FOUND", "unknown worker"),
    ("SwitchRole", {}, "INVALID_ARGUMENT", "name a worker_id or a pool"),
    (
        "SwitchRole",
        {"worker_id": "t-decode-0", "to_role": "decode"},
        "INVALID_ARGUMENT",
        "can only become prefill",
    ),
    ("ApplyPlan", {"tier": "big", "prefill": 1, "decode": 1}, "INVALID_ARGUMENT", "tier"),
    ("ApplyPlan", {"prefill": 2, "decode": 0}, "FAILED_PRECONDITION", "at least one"),
]


def test_bad_admin_requests_get_a_clear_status_and_change_nothing():
    requests = {
        "ScalePool": admin_pb2.ScalePoolRequest,
        "SwitchRole": admin_pb2.SwitchRoleRequest,
        "ApplyPlan": admin_pb2.ApplyPlanRequest,
    }

    async def checks(stub, router):
        before = [w.worker_id for w in router.workers]
        for method, fields, code, match in BAD_REQUESTS:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await getattr(stub, method)(requests[method](**fields), timeout=5)
            case = (method, fields)
            assert err.value.code().name == code, case
            assert match in err.value.details(), case
            assert [w.worker_id for w in router.workers] == before, case

    admin_scenario(checks)


def test_admin_service_lists_scales_and_needs_its_key():
    async def checks(stub, router):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ListWorkers(admin_pb2.ListWorkersRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # The API key is not the admin key.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ListWorkers(admin_pb2.ListWorkersRequest(), metadata=auth("k"), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        listed = await stub.ListWorkers(
            admin_pb2.ListWorkersRequest(), metadata=auth("admin"), timeout=5
        )
        assert [(w.worker_id, w.state) for w in listed.workers] == [
            ("t-prefill-0", "serving"),
            ("t-decode-0", "serving"),
            ("t-decode-1", "serving"),
        ]
        request = admin_pb2.ApplyPlanRequest(prefill=2, decode=1, drain_timeout_s=1)
        applied = await stub.ApplyPlan(request, metadata=auth("admin"), timeout=10)
        assert [(s.from_worker_id, s.to_worker_id) for s in applied.switched] == [
            ("t-decode-1", "t-prefill-1")
        ]
        assert {p.name: p.count for p in applied.pools} == {"t-prefill": 2, "t-decode": 1}

    admin_scenario(checks, api_key="k", admin_api_key="admin")


def auth(key: str):
    return (("authorization", f"Bearer {key}"),)
