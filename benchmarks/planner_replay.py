"""Replay a planner prediction offline: the planner's simulation (`deploy.planner.simulate`, a
mean over seeds) of one split at given rates, from a profile's coefficients, with and without
per-kind prefill step scales (`InstanceModel.prefill_step_scale`) and a request overhead. For
asking what a check's prediction would have been with numbers its run measured, without a
deployment.

    python -m benchmarks.planner_replay --prefill 0.0165 1.58e-05 1.08e-09 \\
        --decode 0.00521 1.10e-05 5.56e-08 --transfer 0.0005 4e-12 0 --budget 2048 \\
        --input-len 2048 --output-len 64 --rates 8.88 14.22 16.0 17.77 \\
        --scales 1,1,0 1,1,0.0121 0.91,1.09,0.0121 0.90,1.07,0.0121 0.95,1.10,0.0121
"""

from __future__ import annotations

import argparse
import statistics

from deploy.planner import Workload, max_rate, simulate
from router.latency_model import new_instance_model


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prefill", type=float, nargs=3, required=True)
    ap.add_argument("--decode", type=float, nargs=3, required=True)
    ap.add_argument("--transfer", type=float, nargs=3, default=[0.0, 0.0, 0.0])
    ap.add_argument("--budget", type=int, default=2048, help="max_num_batched_tokens")
    ap.add_argument("--input-len", type=int, default=2048)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--range-ratio", type=float, default=0.5)
    ap.add_argument("--min-duration-s", type=float, default=20.0)
    ap.add_argument("--ttft-slo-ms", type=float, default=500.0)
    ap.add_argument("--tpot-slo-ms", type=float, default=50.0)
    ap.add_argument("--split", type=int, nargs=2, default=[1, 1], help="prefill, decode")
    ap.add_argument("--kv-bytes-per-token", type=int, default=128 * 1024)
    ap.add_argument("--rates", type=float, nargs="+", required=True)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument(
        "--scales",
        nargs="+",
        default=["1,1,0"],
        help="variants FRESH,CONTINUED,OVERHEAD_S: prefill step scales and request overhead",
    )
    args = ap.parse_args(argv)
    workload = Workload(
        input_len=args.input_len,
        output_len=args.output_len,
        range_ratio=args.range_ratio,
        min_duration_s=args.min_duration_s,
    )
    slo = (args.ttft_slo_ms / 1e3, args.tpot_slo_ms / 1e3)
    print(f"{'fresh':>6} {'contd':>6} {'ovh ms':>7} | " + " ".join(f"{r:>7.2f}" for r in args.rates)
          + " | max rate")  # fmt: skip
    for variant in args.scales:
        fresh, continued, overhead = (float(x) for x in variant.split(","))
        model = new_instance_model(
            {
                "prefill": args.prefill,
                "decode": args.decode,
                "transfer": args.transfer,
                "max_num_batched_tokens": args.budget,
                "request_overhead_s": overhead,
                "prefill_step_scale": {"fresh": fresh, "continued": continued},
            }
        )
        attainment = [
            statistics.mean(
                simulate(model, *args.split, rate, workload, slo, args.kv_bytes_per_token, seed=s)
                for s in range(args.seeds)
            )
            for rate in args.rates
        ]
        best = max_rate(model, *args.split, workload, slo, args.kv_bytes_per_token)
        print(
            f"{fresh:6.2f} {continued:6.2f} {1e3 * overhead:7.1f} | "
            + " ".join(f"{a:7.0%}" for a in attainment)
            + f" | {best:8.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
