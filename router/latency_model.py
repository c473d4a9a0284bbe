"""Latency models per instance, fitted online from the workers' step timings.

    prefill step   t = a + b·tokens + c·pairs        pairs = Σ new tokens × context length
                                                      (DistServe's form: linear + attention's
                                                      quadratic term)
    decode step    t = a + b·batch + c·context       context = Σ tokens attended
    KV transfer    t = a + b·bytes

Each is a least-squares fit (non-negative coefficients) over a window of recent samples, seeded
by a profile (`baton profile`) or by a prior, refitted as samples arrive. The fit is a ridge
toward the seed, worth a sample: where the window cannot tell the terms apart (under load a
prefill worker's steps all fill the token budget, so intercept and slope are one direction), the
seed decides instead of a split toward zero that mispredicts every other size. On top, a
multiplicative correction learnt from the measured error of whole predictions (predicted TTFT
vs measured) absorbs what the features miss (queueing jitter, contention).

A profile may also scale the prefill form per kind of step (`prefill_step_scale`, the planner's
steps only): steps of fresh prompts, and steps where a chunk continues a prompt's cached part.
Serving measured the two off the same fitted form in opposite directions (2x H200, an 8B shape:
fresh 0.91x, continued 1.09x at half load), and a loaded prefill worker runs continued steps
almost only, which is where the planner's knee is decided; `fit_step_scales` measures both
from a deployment's prefill steps.

Beside the forms, each prefill instance's model keeps the request overhead: what a request's
first-token path spends outside the prefill worker (placement, the decode reservation, the
calls' round trips), measured by the router per request (median of the last 256). The planner
adds it to every simulated TTFT; the router's own TTFT predictions leave it to the correction.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class LinearModel:
    """t ≈ coef · [1, x1, x2], refitted on a window of samples. `prior_weight` > 0: the fit is
    pulled toward the initial coef as strongly as that many samples at the window's largest x
    would pull it; 0: toward zero, negligibly (a plain least-squares fit)."""

    coef: np.ndarray
    window: int = 256
    ridge: float = 1e-9
    prior_weight: float = 0.0
    _xs: deque = field(default_factory=lambda: deque(maxlen=256))
    _ys: deque = field(default_factory=lambda: deque(maxlen=256))
    _since_fit: int = 0

    def __post_init__(self) -> None:
        self.coef = np.asarray(self.coef, dtype=float)
        self.prior = self.coef.copy()

    def predict(self, x1: float, x2: float) -> float:
        return float(self.coef @ np.array([1.0, x1, x2]))

    def add(self, x1: float, x2: float, seconds: float) -> None:
        self._xs.append((1.0, float(x1), float(x2)))
        self._ys.append(float(seconds))
        self._since_fit += 1
        if self._since_fit >= 8 and len(self._ys) >= 8:
            self.fit()

    def fit(self) -> None:
        self._since_fit = 0
        x = np.asarray(self._xs)
        y = np.asarray(self._ys)
        # Scale columns so the ridge term treats them alike, then solve; clip to >= 0 (time
        # never falls as work grows), refitting without the clipped columns.
        scale = np.maximum(np.abs(x).max(axis=0), 1e-12)
        xs = x / scale
        weight = self.prior_weight or self.ridge
        anchor = self.prior * scale if self.prior_weight else np.zeros(3)
        active = np.ones(3, dtype=bool)
        coef = np.zeros(3)
        for _ in range(3):
            a = xs[:, active]
            lhs = a.T @ a + weight * np.eye(a.shape[1])
            sol = np.linalg.solve(lhs, a.T @ y + weight * anchor[active])
            coef[:] = 0.0
            coef[active] = sol
            if (coef >= 0).all():
                break
            active &= coef > 0
            if not active.any():
                coef[:] = 0.0
                coef[0] = y.mean()
                break
        self.coef = coef / scale

    @property
    def num_samples(self) -> int:
        return len(self._ys)


def prefill_pairs(new_tokens: int, context_tokens: int) -> int:
    """The prefill form's quadratic feature as the engine measures it (`StepStats.attention_pairs`,
    the samples and profiles are fitted on): new tokens × the context length they end at.
    NOTE: predictions must use the same definition as the samples, or the fitted coefficient
    means something else (the causal triangle, half as large for a fresh prompt, did)."""
    return new_tokens * context_tokens


# The kinds of prefill step a profile may scale apart (`InstanceModel.prefill_step_scale`).
STEP_KINDS = ("fresh", "continued")


@dataclass
class InstanceModel:
    """Everything the router predicts about one worker."""

    prefill: LinearModel
    decode: LinearModel
    transfer: LinearModel
    # predicted × correction ≈ measured, learnt from whole-request errors (EWMA of the ratio).
    ttft_correction: float = 1.0
    # Seconds of a request's TTFT spent outside the prefill worker (see the module docstring).
    request_overhead: float = 0.0
    # The prefill engine's token budget per step (max_num_batched_tokens) the forms were
    # measured at; 0: unknown (the planner then runs one whole prompt per step).
    max_num_batched_tokens: int = 0
    # The prefill form's measured-over-predicted ratio per kind of step (`fit_step_scales`):
    # the planner's simulated steps are priced with it (the router's predictions are not: their
    # correction learns from whole TTFTs).
    prefill_step_scale: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(STEP_KINDS, 1.0)
    )
    _overheads: deque = field(default_factory=lambda: deque(maxlen=256))

    def prefill_time(self, new_tokens: int, context_tokens: int) -> float:
        pairs = prefill_pairs(new_tokens, context_tokens)
        return max(self.prefill.predict(new_tokens, pairs), 0.0)

    def prefill_step_time(self, chunks: list[tuple[int, int]]) -> float:
        """One prefill step computing several chunks, each (new tokens, context length it ends
        at): the form on the step's totals, as the engine measures a step."""
        tokens = sum(n for n, _ in chunks)
        pairs = sum(prefill_pairs(n, context) for n, context in chunks)
        kind = "continued" if any(context > n for n, context in chunks) else "fresh"
        return max(self.prefill.predict(tokens, pairs), 0.0) * self.prefill_step_scale[kind]

    def decode_step(self, batch: int, context: int) -> float:
        return max(self.decode.predict(batch, context), 0.0)

    def transfer_time(self, num_bytes: int) -> float:
        return max(self.transfer.predict(num_bytes, 0), 0.0)

    def add_sample(self, kind: str, x1: int, x2: int, seconds: float) -> None:
        getattr(self, kind).add(x1, x2, seconds)

    def observe_overhead(self, seconds: float) -> None:
        """One request's measured TTFT outside the prefill worker (the router, per request)."""
        self._overheads.append(max(seconds, 0.0))
        self.request_overhead = float(np.median(self._overheads))

    def correct(self, predicted: float, measured: float, weight: float = 0.1) -> None:
        if predicted > 1e-6 and measured > 0:
            ratio = min(max(measured / predicted, 0.2), 5.0)
            self.ttft_correction += weight * (ratio - self.ttft_correction)


# A prior for an instance nobody profiled: CPU-tiny-model-like costs, replaced by the first fits.
PRIOR = {
    "prefill": [2e-3, 2e-5, 1e-9],
    "decode": [2e-3, 2e-4, 1e-7],
    "transfer": [1e-3, 1e-9, 0.0],
}
PROFILE_WEIGHT = 1.0  # a sample's worth: a profile holds where live samples cannot tell


def new_instance_model(profile: dict | None = None) -> InstanceModel:
    """Seeded by a profile (held with PROFILE_WEIGHT), else by PRIOR (dropped by the first fit:
    its CPU-sized costs say nothing of other hardware)."""
    coefs, weight = (profile, PROFILE_WEIGHT) if profile else (PRIOR, 0.0)
    return InstanceModel(
        *(
            LinearModel(np.array(coefs[k], dtype=float), prior_weight=weight)
            for k in ("prefill", "decode", "transfer")
        ),
        request_overhead=float(coefs.get("request_overhead_s", 0.0)),
        max_num_batched_tokens=int(coefs.get("max_num_batched_tokens", 0)),
        prefill_step_scale={
            **dict.fromkeys(STEP_KINDS, 1.0),
            **coefs.get("prefill_step_scale", {}),
        },
    )


def load_profile(path: str | Path) -> dict:
    """A profile written by `baton profile` (or a deployment's live one, `live_profile` in
    router/placement.py): {"prefill": [a, b, c], "decode": ..., "transfer": ...}, optionally
    "max_num_batched_tokens" and "request_overhead_s"."""
    data = json.loads(Path(path).read_text())
    for key in ("prefill", "decode", "transfer"):
        if len(data.get(key, [])) != 3:
            raise ValueError(f"{path}: profile needs 3 coefficients for {key!r}")
    scale = data.get("prefill_step_scale", {})
    if not isinstance(scale, dict) or set(scale) - set(STEP_KINDS):
        raise ValueError(f"{path}: prefill_step_scale takes 'fresh' and 'continued' only")
    if not all(isinstance(v, (int, float)) and v > 0 for v in scale.values()):
        raise ValueError(f"{path}: prefill_step_scale values must be positive numbers")
    return data


# A kind of step needs this many steps measured before `fit_step_scales` scales it.
MIN_SCALE_STEPS = 20


def fit_step_scales(steps, model: InstanceModel) -> dict[str, float]:
    """Measured over predicted prefill step time, median per kind of step, from a deployment's
    prefill steps (`PrefillWorker.take_step_log` records: `seconds`, `num_prefill_tokens`,
    `attention_pairs`, `num_context_tokens`): a profile's `prefill_step_scale`. A step holds a
    continued chunk when it attends over more tokens than it computes. A kind with fewer than
    MIN_SCALE_STEPS steps keeps 1.0."""
    ratios: dict[str, list[float]] = {kind: [] for kind in STEP_KINDS}
    for step in steps:
        if not step.num_prefill_tokens:
            continue
        predicted = model.prefill.predict(step.num_prefill_tokens, step.attention_pairs)
        if predicted <= 0:
            continue
        kind = "continued" if step.num_context_tokens > step.num_prefill_tokens else "fresh"
        ratios[kind].append(step.seconds / predicted)
    return {
        kind: float(np.median(values)) if len(values) >= MIN_SCALE_STEPS else 1.0
        for kind, values in ratios.items()
    }
