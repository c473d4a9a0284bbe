"""Choosing the prefill and decode instance for each request.

Three policies share one interface: `RoundRobin` and `LeastLoaded` are the baselines;
`GoodputPlacement` predicts, per candidate, the request's TTFT (queue + prefill of the part not
in that instance's prefix cache + KV transfer) and the decode step time after adding it, then
picks the prefill instance with the lowest predicted TTFT and the decode instance that keeps
every running request's ITL under its SLO with the most headroom and has the KV blocks.

The router calls the `on_*` hooks as a request moves, so a policy can keep its own view of
load between the workers' periodic reports.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field

from engine.kv_cache.block_pool import hash_block_tokens
from router.latency_model import InstanceModel, new_instance_model
from router.workers import Worker


class NoWorkerAvailable(Exception):
    pass


class Overloaded(Exception):
    """No placement can meet the request's SLOs and the policy says reject early."""


@dataclass
class PlacementInfo:
    """What placement knows of a request."""

    tier: str
    prompt_token_ids: list[int]
    max_tokens: int
    ttft_slo_s: float
    tpot_slo_s: float
    block_size: int = 16
    kv_bytes_per_token: int = 0
    block_hashes: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.block_hashes:
            bs, tokens = self.block_size, self.prompt_token_ids
            parent = None
            for i in range(len(tokens) // bs):
                parent = hash_block_tokens(parent, tuple(tokens[i * bs : (i + 1) * bs]))
                self.block_hashes.append(parent)


def _live(workers: list[Worker], tier: str, role: str, avoid: set[str]) -> list[Worker]:
    live = [w for w in workers if w.tier == tier and w.role == role and w.alive and not w.draining]
    if not live:
        raise NoWorkerAvailable(f"no live {role} worker for tier {tier!r}")
    return [w for w in live if w.worker_id not in avoid] or live


class Placement:
    """The interface. Hooks default to doing nothing."""

    def choose(
        self, workers: list[Worker], info: PlacementInfo, avoid: set[str] = frozenset()
    ) -> tuple[Worker, Worker]:
        raise NotImplementedError

    def choose_colocated(
        self, workers: list[Worker], info: PlacementInfo, avoid: set[str] = frozenset()
    ) -> Worker:
        """A colocated tier's worker: the least loaded, whatever the policy (colocated serving
        is the baseline disaggregation is measured against, not a placement problem here)."""
        live = _live(workers, info.tier, "colocated", avoid)
        return min(live, key=lambda w: (w.load, w.worker_id))

    def on_placed(self, prefill: Worker, decode: Worker, info: PlacementInfo, wid: str) -> None:
        pass

    def on_prefill_done(
        self,
        prefill: Worker,
        info: PlacementInfo,
        wid: str,
        ttft_s: float,
        overhead_s: float | None = None,
    ) -> None:
        """The prefill call answered after `ttft_s`; `overhead_s`: what the request's path to
        its first token spent outside the prefill worker (the router measures both)."""

    def on_tokens(self, decode: Worker, wid: str, num_tokens: int) -> None:
        pass

    def on_finished(self, prefill: Worker, decode: Worker, wid: str) -> None:
        pass

    def observe_samples(self, worker: Worker, samples: list) -> None:
        """Step and transfer timings the worker measured since its last report."""

    def observe_stats(self, worker: Worker, stats: dict) -> None:
        """The worker's periodic stats report (free blocks, capacity)."""

    def on_restarted(self, worker: Worker) -> None:
        """The worker runs in a new process: what was learnt of its caches no longer holds."""

    def forget(self, worker: Worker) -> None:
        """The worker left the deployment (scaled down or switched role): drop its state."""


class RoundRobin(Placement):
    def __init__(self):
        self._counters: dict[tuple[str, str], itertools.count] = {}

    def choose(self, workers, info, avoid=frozenset()):
        return self._next(workers, info.tier, "prefill", avoid), self._next(
            workers, info.tier, "decode", avoid
        )

    def _next(self, workers, tier, role, avoid):
        live = _live(workers, tier, role, avoid)
        counter = self._counters.setdefault((tier, role), itertools.count())
        return live[next(counter) % len(live)]


class LeastLoaded(Placement):
    """The live instance with the fewest requests placed on it, ties broken by id."""

    def choose(self, workers, info, avoid=frozenset()):
        pick = lambda role: min(  # noqa: E731
            _live(workers, info.tier, role, avoid), key=lambda w: (w.load, w.worker_id)
        )
        return pick("prefill"), pick("decode")


@dataclass
class _PrefillState:
    model: InstanceModel
    pending: dict[str, float] = field(default_factory=dict)  # wid -> predicted prefill seconds
    predicted_ttft: dict[str, float] = field(default_factory=dict)
    # Block hashes this instance likely holds, least recently used first (an estimate: the
    # router records what it sent there and evicts at the instance's capacity).
    cached: OrderedDict = field(default_factory=OrderedDict)
    capacity_blocks: int = 4096


@dataclass
class _DecodeState:
    model: InstanceModel
    context: dict[str, int] = field(default_factory=dict)  # wid -> tokens in its KV
    slo: dict[str, float] = field(default_factory=dict)  # wid -> TPOT SLO (s)
    free_blocks: int | None = None  # from the last stats report, minus placements since


class GoodputPlacement(Placement):
    def __init__(self, overload_policy: str = "queue", profiles: dict | None = None):
        if overload_policy not in ("queue", "reject"):
            raise ValueError(f"overload_policy must be queue or reject, got {overload_policy!r}")
        self.overload_policy = overload_policy
        self.profiles = profiles or {}
        self.ttft_margin = 0.25  # aim well under the TTFT SLO: predictions are rough under bursts
        self._prefill: dict[str, _PrefillState] = {}
        self._decode: dict[str, _DecodeState] = {}
        self.last_prediction: dict[str, float] = {}

    def _p(self, worker: Worker) -> _PrefillState:
        if worker.worker_id not in self._prefill:
            model = new_instance_model(self.profiles.get(worker.tier))
            self._prefill[worker.worker_id] = _PrefillState(model)
        return self._prefill[worker.worker_id]

    def _d(self, worker: Worker) -> _DecodeState:
        if worker.worker_id not in self._decode:
            model = new_instance_model(self.profiles.get(worker.tier))
            self._decode[worker.worker_id] = _DecodeState(model)
        return self._decode[worker.worker_id]

    # -- predictions --------------------------------------------------------------------

    def cached_tokens(self, worker: Worker, info: PlacementInfo) -> int:
        cached = self._p(worker).cached
        hits = 0
        # Never the whole prompt: the last token is always computed.
        for h in info.block_hashes[: (len(info.prompt_token_ids) - 1) // info.block_size]:
            if h not in cached:
                break
            hits += 1
        return hits * info.block_size

    def predict_ttft(self, worker: Worker, info: PlacementInfo) -> float:
        state = self._p(worker)
        length = len(info.prompt_token_ids)
        new_tokens = length - self.cached_tokens(worker, info)
        compute = state.model.prefill_time(new_tokens, length)
        transfer = state.model.transfer_time(length * info.kv_bytes_per_token)
        queue = sum(state.pending.values())
        return (queue + compute + transfer) * state.model.ttft_correction

    def predict_step(self, worker: Worker, info: PlacementInfo) -> float:
        state = self._d(worker)
        batch = len(state.context) + 1
        context = sum(state.context.values()) + len(info.prompt_token_ids)
        return state.model.decode_step(batch, context)

    # -- the decision -------------------------------------------------------------------

    def choose(self, workers, info, avoid=frozenset()):
        prefills = _live(workers, info.tier, "prefill", avoid)
        ttfts = {w.worker_id: self.predict_ttft(w, info) for w in prefills}
        # Among the instances predicted to meet the TTFT SLO (with a safety margin), take the
        # one that reuses the most cached prefix: it meets this request's SLO and leaves the
        # most compute for the others. If none is predicted to meet it, the fastest.
        feasible = [w for w in prefills if ttfts[w.worker_id] <= self.ttft_margin * info.ttft_slo_s]
        if feasible:
            prefill = min(
                feasible,
                key=lambda w: (-self.cached_tokens(w, info), ttfts[w.worker_id], w.worker_id),
            )
        else:
            prefill = min(prefills, key=lambda w: (ttfts[w.worker_id], w.load, w.worker_id))

        decodes = _live(workers, info.tier, "decode", avoid)
        need = -(-(len(info.prompt_token_ids) + info.max_tokens) // info.block_size)
        best, best_headroom = None, None
        for w in decodes:
            state = self._d(w)
            if state.free_blocks is not None and state.free_blocks < need:
                continue
            slo = min([info.tpot_slo_s, *state.slo.values()])
            headroom = slo - self.predict_step(w, info)
            if best_headroom is None or headroom > best_headroom:
                best, best_headroom = w, headroom
        meets = (
            best is not None and best_headroom >= 0 and ttfts[prefill.worker_id] <= info.ttft_slo_s
        )
        if not meets and self.overload_policy == "reject":
            raise Overloaded(
                f"no placement meets the SLOs (predicted TTFT {ttfts[prefill.worker_id]:.3f}s, "
                f"ITL headroom {best_headroom if best_headroom is not None else 'none'})"
            )
        if best is None:  # nobody has the blocks now: queue on the one that frees them soonest
            best = min(decodes, key=lambda w: (self.predict_step(w, info), w.worker_id))
        self.last_prediction = {
            "ttft_s": ttfts[prefill.worker_id],
            "step_s": self.predict_step(best, info),
            "cached_tokens": self.cached_tokens(prefill, info),
        }
        return prefill, best

    # -- bookkeeping ----------------------------------------------------------------------

    def on_placed(self, prefill, decode, info, wid):
        p = self._p(prefill)
        length = len(info.prompt_token_ids)
        new_tokens = length - self.cached_tokens(prefill, info)
        p.pending[wid] = p.model.prefill_time(new_tokens, length)
        p.predicted_ttft[wid] = self.predict_ttft(prefill, info)
        # Count the prefix as cached there from now on: requests of a burst sharing it follow
        # it to the same instance (its prefill will have computed it by the time theirs runs).
        self._remember(p, info)
        d = self._d(decode)
        d.context[wid] = length
        d.slo[wid] = info.tpot_slo_s
        if d.free_blocks is not None:
            d.free_blocks -= -(-(length + info.max_tokens) // info.block_size)

    def on_prefill_done(self, prefill, info, wid, ttft_s, overhead_s=None):
        p = self._p(prefill)
        p.pending.pop(wid, None)
        if overhead_s is not None:
            p.model.observe_overhead(overhead_s)
        predicted = p.predicted_ttft.pop(wid, None)
        if predicted:
            # The correction multiplies predictions; compare the raw prediction.
            p.model.correct(predicted / p.model.ttft_correction, ttft_s)
        self._remember(p, info)

    @staticmethod
    def _remember(p: _PrefillState, info: PlacementInfo) -> None:
        for h in info.block_hashes:
            p.cached[h] = None
            p.cached.move_to_end(h)
        while len(p.cached) > p.capacity_blocks:
            p.cached.popitem(last=False)

    def on_tokens(self, decode, wid, num_tokens):
        d = self._d(decode)
        if wid in d.context:
            d.context[wid] += num_tokens

    def on_finished(self, prefill, decode, wid):
        p = self._p(prefill)
        p.pending.pop(wid, None)
        p.predicted_ttft.pop(wid, None)
        d = self._d(decode)
        d.context.pop(wid, None)
        d.slo.pop(wid, None)

    def observe_samples(self, worker, samples):
        state = self._p(worker) if worker.role == "prefill" else self._d(worker)
        for kind, x1, x2, seconds in samples:
            state.model.add_sample(kind, x1, x2, seconds)

    def live_profile(self, workers: list[Worker], tier: str) -> dict:
        """The latency models fitted online for `tier`, as a profile for `baton plan`
        (deploy/planner.py): prefill, transfer and request overhead averaged over its prefill
        instances, decode over its decode instances. Raises ValueError before either role has
        an instance here."""
        prefills = [self._p(w).model for w in workers if w.tier == tier and w.role == "prefill"]
        decodes = [self._d(w).model for w in workers if w.tier == tier and w.role == "decode"]
        if not prefills or not decodes:
            raise ValueError(f"tier {tier!r} needs prefill and decode instances for a profile")

        def mean_coef(models, kind):
            return [float(c) for c in sum(getattr(m, kind).coef for m in models) / len(models)]

        return {
            "prefill": mean_coef(prefills, "prefill"),
            "decode": mean_coef(decodes, "decode"),
            "transfer": mean_coef(prefills, "transfer"),
            "request_overhead_s": sum(m.request_overhead for m in prefills) / len(prefills),
            "num_samples": {
                kind: sum(getattr(m, kind).num_samples for m in models)
                for kind, models in (("prefill", prefills), ("decode", decodes))
            },
        }

    def on_restarted(self, worker):
        # Keep the latency model (same hardware), forget its prefix cache and free blocks.
        if worker.role == "prefill":
            self._p(worker).cached.clear()
        else:
            self._d(worker).free_blocks = None

    def forget(self, worker):
        self._prefill.pop(worker.worker_id, None)
        self._decode.pop(worker.worker_id, None)

    def observe_stats(self, worker, stats):
        if worker.role == "decode" and "num_free_blocks" in stats:
            self._d(worker).free_blocks = stats["num_free_blocks"]
        if worker.role == "prefill" and "num_blocks" in stats:
            self._p(worker).capacity_blocks = stats["num_blocks"]


POLICIES = {"goodput": GoodputPlacement, "least_loaded": LeastLoaded, "round_robin": RoundRobin}
