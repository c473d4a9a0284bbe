"""Choosing the model tier of a request by quality, cost and the chance of meeting its SLOs.

For each tier the router estimates, from the same latency models placement uses:

    cost      GPU-seconds the request would take on the tier's pools × their $ per GPU-second
              (prefill: its compute time; decode: its tokens × step time / batch size — its share
              of the batched steps)
    p(SLO)    a smooth estimate from the predicted TTFT and decode-step headroom of the placement
              the tier would get now

and picks, among tiers with quality ≥ the needed quality and p(SLO) ≥ 0.5, the cheapest if the
request set a quality floor, else the best `quality − cost_weight × cost`. If none is likely to
meet the SLOs it degrades to the tier most likely to. The needed quality is the request's floor
raised by a difficulty estimate of the prompt.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from router.placement import GoodputPlacement, NoWorkerAvailable, PlacementInfo
from router.workers import Worker


class DifficultyEstimator:
    """Maps a prompt to the quality it needs, in [0, 1]. The baseline looks at surface features.

    To plug in a learned router (for example RouteLLM's matrix-factorisation or BERT routers,
    which predict the probability that a strong model's answer beats a weak one's), subclass
    this, return that probability scaled to your tiers' quality range from `estimate`, and pass
    an instance to `TierSelector`."""

    _HARD = re.compile(
        r"\b(prove|derive|theorem|step by step|explain why|optimi[sz]e|debug|algorithm|"
        r"complexity|integral|equation)\b|```|def |class |\\[a-z]+\{",
        re.IGNORECASE,
    )

    def estimate(self, prompt: str, num_tokens: int) -> float:
        score = 0.0
        if prompt:
            score += 0.25 * min(len(self._HARD.findall(prompt)), 3) / 3
            digits = sum(c.isdigit() for c in prompt) / max(len(prompt), 1)
            score += min(digits * 2, 0.2)
        score += 0.2 * min(num_tokens / 4096, 1.0)
        return min(score, 1.0)


@dataclass
class TierCost:
    name: str
    quality: float
    prefill_cost_per_s: float  # $ per second of one prefill instance
    decode_cost_per_s: float


@dataclass
class TierChoice:
    tier: str
    reason: str
    estimated_cost: float
    p_slo: float


class TierSelector:
    def __init__(
        self,
        tiers: dict[str, TierCost],
        placement: GoodputPlacement,
        difficulty: DifficultyEstimator | None = None,
        cost_weight: float = 0.0,
        difficulty_weight: float = 1.0,
    ):
        self.tiers = tiers
        self.placement = placement
        self.difficulty = difficulty or DifficultyEstimator()
        self.cost_weight = cost_weight
        self.difficulty_weight = difficulty_weight

    def estimate(self, workers: list[Worker], info: PlacementInfo) -> tuple[float, float]:
        """(cost in $, probability of meeting both SLOs) of serving `info` on its tier now."""
        cost = self.tiers[info.tier]
        try:
            prefill, decode = self.placement.choose(workers, info)
        except NoWorkerAvailable:
            return math.inf, 0.0
        p_state = self.placement._p(prefill)
        d_state = self.placement._d(decode)
        length = len(info.prompt_token_ids)
        new_tokens = length - self.placement.cached_tokens(prefill, info)
        prefill_s = p_state.model.prefill_time(new_tokens, length)
        batch = len(d_state.context) + 1
        step = self.placement.predict_step(decode, info)
        decode_s = info.max_tokens * step / batch
        dollars = prefill_s * cost.prefill_cost_per_s + decode_s * cost.decode_cost_per_s
        ttft = self.placement.predict_ttft(prefill, info)
        p = _likely(info.ttft_slo_s, ttft) * _likely(info.tpot_slo_s, step)
        return dollars, p

    def choose(
        self,
        workers: list[Worker],
        infos: dict[str, PlacementInfo],
        prompt: str,
        min_quality: float = 0.0,
        max_cost: float = 0.0,
    ) -> TierChoice:
        """`infos`: the request as each tier would see it (tokenized by that tier)."""
        num_tokens = len(next(iter(infos.values())).prompt_token_ids)
        needed = max(
            min_quality, self.difficulty_weight * self.difficulty.estimate(prompt, num_tokens)
        )
        rows = []
        for name, info in infos.items():
            dollars, p = self.estimate(workers, info)
            rows.append((name, self.tiers[name].quality, dollars, p))
        good = [r for r in rows if r[1] >= needed - 1e-9 and (not max_cost or r[2] <= max_cost)]
        likely = [r for r in good if r[3] >= 0.5]
        if likely and min_quality > 0:
            name, _, dollars, p = min(likely, key=lambda r: (r[2], -r[1]))
            reason = f"cheapest meeting quality {needed:.2f}"
        elif likely:
            name, _, dollars, p = max(likely, key=lambda r: (r[1] - self.cost_weight * r[2], -r[2]))
            reason = f"best quality - cost among tiers meeting quality {needed:.2f}"
        elif good:
            name, _, dollars, p = max(good, key=lambda r: (r[3], r[1]))
            reason = "degraded: no tier likely meets the SLOs; most likely one"
        else:
            name, _, dollars, p = max(rows, key=lambda r: (r[1], r[3]))
            reason = f"no tier reaches quality {needed:.2f}; the best one"
        return TierChoice(name, reason, dollars, p)


def _likely(slo: float, predicted: float) -> float:
    """A smooth P(measured <= slo) around the prediction (±25% of the SLO is one unit)."""
    if slo <= 0:
        return 1.0
    z = (slo - predicted) / (0.25 * slo)
    return 1.0 / (1.0 + math.exp(-4.0 * z))
