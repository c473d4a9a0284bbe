"""How a serving prefill worker's steps compare with a latency model: what `planner_check`
prints per rate, to tell where a prefill worker's time goes when the planner misses.

From the worker's step log (`PrefillWorker.take_step_log`): how many requests a step batches,
how full its token budget is, the share of the time it steps, each step's duration against the
model's prediction for the same tokens and attention pairs (apart: steps of fresh prompts only,
and steps where a chunk continues a cached part), and the host time between steps while work
was waiting (time no step duration holds, so no fitted form sees it).
"""

from __future__ import annotations

import statistics

from router.latency_model import InstanceModel


def summarize_steps(records: list, model: InstanceModel) -> dict:
    """`records`: StepRecords of one prefill worker, oldest first (prefill steps only count)."""
    steps = [r for r in records if r.num_prefill_tokens]
    if not steps:
        return {"num_steps": 0}
    wall = steps[-1].end - steps[0].end + steps[0].seconds

    def ratios(subset):
        return [r.seconds / model.prefill.predict(r.num_prefill_tokens, r.attention_pairs)
                for r in subset]  # fmt: skip

    fresh = [r for r in steps if r.num_context_tokens == r.num_prefill_tokens]
    continued = [r for r in steps if r.num_context_tokens > r.num_prefill_tokens]
    gaps = [b.end - b.seconds - a.end for a, b in zip(steps, steps[1:]) if a.backlog > 0]
    budget = model.max_num_batched_tokens
    return {
        "num_steps": len(steps),
        "seqs_per_step": statistics.mean(r.num_seqs for r in steps),
        "tokens_per_step": statistics.mean(r.num_prefill_tokens for r in steps),
        "budget_fill": (
            statistics.mean(r.num_prefill_tokens for r in steps) / budget if budget else None
        ),
        "busy": sum(r.seconds for r in steps) / wall if wall > 0 else None,
        "measured_over_predicted": _median(ratios(steps)),
        "fresh_steps": len(fresh),
        "fresh_measured_over_predicted": _median(ratios(fresh)),
        "continued_steps": len(continued),
        "continued_measured_over_predicted": _median(ratios(continued)),
        "gap_ms": 1e3 * statistics.mean(gaps) if gaps else None,
        "gap_share": sum(gaps) / wall if gaps and wall > 0 else None,
    }


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def format_summary(s: dict) -> str:
    if not s.get("num_steps"):
        return "no prefill steps"

    def num(value, fmt):
        return "-" if value is None else format(value, fmt)

    return (
        f"{s['num_steps']} prefill steps, {s['seqs_per_step']:.1f} requests and "
        f"{s['tokens_per_step']:.0f} tokens each ({num(s['budget_fill'], '.0%')} of the budget), "
        f"stepping {num(s['busy'], '.0%')} of the time; step time / model "
        f"{num(s['measured_over_predicted'], '.2f')} (fresh prompts only "
        f"{num(s['fresh_measured_over_predicted'], '.2f')} x{s['fresh_steps']}, with a continued "
        f"chunk {num(s['continued_measured_over_predicted'], '.2f')} x{s['continued_steps']}); "
        f"between steps with work waiting {num(s['gap_ms'], '.1f')} ms "
        f"({num(s['gap_share'], '.1%')} of the time)"
    )
