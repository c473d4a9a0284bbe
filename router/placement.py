"""Choosing the prefill and decode instance for a request.

`LeastLoaded` is the baseline policy: the live instance with the fewest requests placed on it,
ties broken by id. The goodput-optimised policy (issue: the router's brain) plugs in beside it."""

from __future__ import annotations

from router.workers import Worker


class NoWorkerAvailable(Exception):
    pass


class LeastLoaded:
    def choose(
        self, workers: list[Worker], tier: str, avoid: set[str] = frozenset()
    ) -> tuple[Worker, Worker]:
        """(prefill, decode) for `tier`, preferring workers not in `avoid` (failed before)."""
        return self._pick(workers, tier, "prefill", avoid), self._pick(
            workers, tier, "decode", avoid
        )

    @staticmethod
    def _pick(workers: list[Worker], tier: str, role: str, avoid: set[str]) -> Worker:
        live = [w for w in workers if w.tier == tier and w.role == role and w.alive]
        if not live:
            raise NoWorkerAvailable(f"no live {role} worker for tier {tier!r}")
        fresh = [w for w in live if w.worker_id not in avoid] or live
        return min(fresh, key=lambda w: (w.load, w.worker_id))
