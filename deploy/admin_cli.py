"""`baton workers`, `baton scale`, `baton switch-role` and `baton plan --apply`: clients of a
running deployment's admin gRPC service (proto/admin.proto, docs/SCALING.md)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

_KEY_HELP = "admin key (default: $BATON_ADMIN_API_KEY, else $BATON_API_KEY; unset: none)"
_DRAIN_HELP = (
    "seconds a removed worker's requests may finish before the rest move elsewhere "
    "(default: the server's drain_timeout_s)"
)


def add_commands(sub) -> None:
    """Register `workers`, `scale` and `switch-role` on the `baton` parser's subcommands."""
    workers = sub.add_parser("workers", help="list a running deployment's workers and pools")
    _add_target_args(workers)
    workers.set_defaults(func=cmd_workers)

    scale = sub.add_parser("scale", help="add workers to a pool, or drain and remove some")
    _add_target_args(scale)
    scale.add_argument("--pool", required=True, help='"{tier}-{role}", e.g. tiny-decode')
    scale.add_argument("--count", type=int, required=True, help="the pool's size afterwards")
    scale.add_argument("--drain-timeout-s", type=float, default=0.0, help=_DRAIN_HELP)
    scale.set_defaults(func=cmd_scale)

    switch = sub.add_parser(
        "switch-role", help="drain a worker and start one of the other role in its place"
    )
    _add_target_args(switch)
    which = switch.add_mutually_exclusive_group(required=True)
    which.add_argument("--worker", default="", help="worker id, e.g. tiny-prefill-1")
    which.add_argument("--pool", default="", help="switch this pool's least loaded worker")
    switch.add_argument(
        "--to", default="", choices=["prefill", "decode"], help="refuse unless it becomes this"
    )
    switch.add_argument("--drain-timeout-s", type=float, default=0.0, help=_DRAIN_HELP)
    switch.set_defaults(func=cmd_switch_role)


def add_apply_args(plan: argparse.ArgumentParser) -> None:
    """`baton plan --apply --target HOST:PORT [--tier NAME]`."""
    plan.add_argument(
        "--apply", action="store_true", help="bring --target's pools to the plan's counts"
    )
    plan.add_argument("--target", default=None, help="HOST:PORT of the deployment (--apply)")
    plan.add_argument("--tier", default="", help="the tier to apply it to (default: default)")
    plan.add_argument("--api-key", default=_default_key(), help=_KEY_HELP)
    plan.add_argument("--drain-timeout-s", type=float, default=0.0, help=_DRAIN_HELP)
    plan.add_argument("--timeout", type=float, default=900.0, help="the apply call's deadline")


def _add_target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="localhost:50051", help="HOST:PORT")
    p.add_argument("--api-key", default=_default_key(), help=_KEY_HELP)
    p.add_argument(
        "--timeout", type=float, default=900.0, help="seconds (drains and starts take a while)"
    )


def _default_key() -> str | None:
    return os.environ.get("BATON_ADMIN_API_KEY") or os.environ.get("BATON_API_KEY")


def cmd_workers(args) -> int:
    from proto import admin_pb2

    response = _call(args, "ListWorkers", admin_pb2.ListWorkersRequest())
    if response is None:
        return 1
    print(f"{'worker':<22} {'role':<9} {'state':<10} {'in flight':>9}  resources / node")
    for w in response.workers:
        resources = ", ".join(f"{k}={v:g}" for k, v in sorted(w.resources.items()))
        extra = f"  (in place of {w.replaced})" if w.replaced else ""
        node = f" @ {w.node_id[:12]}" if w.node_id else ""
        row = f"{w.worker_id:<22} {w.role:<9} {w.state:<10} {w.in_flight:>9}"
        print(f"{row}  {resources}{node}{extra}")
    _print_pools(response.pools)
    return 0


def cmd_scale(args) -> int:
    from proto import admin_pb2

    request = admin_pb2.ScalePoolRequest(
        pool=args.pool, count=args.count, drain_timeout_s=args.drain_timeout_s
    )
    return _report(_call(args, "ScalePool", request))


def cmd_switch_role(args) -> int:
    from proto import admin_pb2

    request = admin_pb2.SwitchRoleRequest(
        worker_id=args.worker, pool=args.pool, to_role=args.to, drain_timeout_s=args.drain_timeout_s
    )
    return _report(_call(args, "SwitchRole", request))


def plan_and_apply(args, plan_main) -> int:
    """`baton plan ... --apply`: plan (written to --output, or a temporary file), then ask the
    deployment to bring the tier's prefill and decode pools to the plan's counts."""
    from proto import admin_pb2

    if not args.target:
        print("baton: error: --apply needs --target HOST:PORT", file=sys.stderr)
        return 2
    if len(args.profile) > 1:
        print(
            "baton: error: --apply sizes one tier's pools; a plan over several GPU types says "
            "which pools to run where: set their counts in the config",
            file=sys.stderr,
        )
        return 2
    with tempfile.TemporaryDirectory() as scratch:
        if not args.output:
            args.output = os.path.join(scratch, "plan.json")
        rc = plan_main(args)
        if rc != 0:
            return rc
        with open(args.output) as f:
            plan = json.load(f)["plan"]
    if plan["max_rate"] <= 0:
        print("baton: the plan meets the SLOs at no rate: not applied", file=sys.stderr)
        return 1
    request = admin_pb2.ApplyPlanRequest(
        tier=args.tier,
        prefill=plan["prefill"],
        decode=plan["decode"],
        drain_timeout_s=args.drain_timeout_s,
    )
    print(f"applying {plan['prefill']} prefill + {plan['decode']} decode to {args.target}")
    return _report(_call(args, "ApplyPlan", request))


def _call(args, method: str, request):
    """One admin RPC; prints the error status and returns None when it fails."""
    import grpc

    from proto import admin_pb2_grpc

    metadata = [("authorization", f"Bearer {args.api_key}")] if args.api_key else None
    with grpc.insecure_channel(args.target) as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        try:
            return getattr(stub, method)(request, timeout=args.timeout, metadata=metadata)
        except grpc.RpcError as e:
            print(f"baton: {e.code().name}: {e.details()}", file=sys.stderr)
            return None


def _report(response) -> int:
    if response is None:
        return 1
    for worker_id in response.added:
        print(f"added {worker_id}")
    for r in response.removed:
        blocks = (
            f"KV blocks {r.num_free_blocks}/{r.num_blocks} free"
            if r.num_blocks >= 0
            else "KV blocks unknown (it was down)"
        )
        print(
            f"removed {r.worker_id} after {r.drain_s:.1f} s: {r.finished} requests finished, "
            f"{r.moved} moved elsewhere; {blocks}"
        )
    for s in response.switched:
        print(f"switched {s.from_worker_id} -> {s.to_worker_id} ({s.to_role})")
    if not (response.added or response.removed or response.switched):
        print("nothing to change")
    _print_pools(response.pools)
    return 0


def _print_pools(pools) -> None:
    print("pools: " + ", ".join(f"{p.name} {p.count}" for p in pools))
