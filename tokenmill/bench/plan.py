"""Capacity plan: from what one replica sustains within the SLOs to the size of the fleet.

replicas = ceil(target_qps * peak_to_average / (replica_rate * max_utilization)) + spare_replicas
The fleet is sized for the peak; at the average it runs at target_qps / (replicas * replica_rate).
Cost per hour = replicas * GPUs per replica * $/GPU-hour; $/Mtok at the average load.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class CapacityPlan:
    replica_rate: float               # requests/s one replica sustains within the SLOs
    target_qps: float                 # average requests/s to serve
    peak_to_average: float = 1.0
    max_utilization: float = 1.0      # plan peaks at most this fraction of replica_rate (headroom)
    spare_replicas: int = 0           # N+k redundancy (GPUs fail; the seed quotes ~50 days MTTF for an H100)
    gpu_dollars_per_hour: float = 2.5
    gpus_per_replica: int = 1
    input_tokens_per_request: float = 0.0
    output_tokens_per_request: float = 0.0
    # results
    peak_qps: float = 0.0
    replicas: int = 0
    utilization_at_average: float = 0.0
    utilization_at_peak: float = 0.0
    dollars_per_hour: float = 0.0
    dollars_per_month: float = 0.0
    dollars_per_output_mtok: float | None = None
    dollars_per_total_mtok: float | None = None
    output_mtok_per_dollar: float | None = None
    notes: list[str] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def capacity_plan(replica_rate: float, target_qps: float, peak_to_average: float = 1.0, *,
                  max_utilization: float = 1.0, spare_replicas: int = 0, gpu_dollars_per_hour: float = 2.5,
                  gpus_per_replica: int = 1, input_tokens_per_request: float = 0.0,
                  output_tokens_per_request: float = 0.0) -> CapacityPlan:
    if replica_rate <= 0:
        raise ValueError("the per-replica rate must be > 0 (no run met the SLOs?)")
    if target_qps <= 0 or peak_to_average < 1 or not 0 < max_utilization <= 1 or spare_replicas < 0:
        raise ValueError("need target_qps > 0, peak_to_average >= 1, 0 < max_utilization <= 1, spare_replicas >= 0")
    plan = CapacityPlan(replica_rate, target_qps, peak_to_average, max_utilization, spare_replicas,
                        gpu_dollars_per_hour, gpus_per_replica, input_tokens_per_request, output_tokens_per_request)
    plan.peak_qps = target_qps * peak_to_average
    # a tiny epsilon keeps exact multiples (e.g. 12 / 4 = 3 replicas) from rounding up on float noise
    needed = math.ceil(plan.peak_qps / (replica_rate * max_utilization) - 1e-9)
    plan.replicas = max(1, needed) + spare_replicas
    capacity = plan.replicas * replica_rate
    plan.utilization_at_average = target_qps / capacity
    plan.utilization_at_peak = plan.peak_qps / capacity
    plan.dollars_per_hour = plan.replicas * gpus_per_replica * gpu_dollars_per_hour
    plan.dollars_per_month = plan.dollars_per_hour * 24 * 30
    mtok_per_hour_out = target_qps * output_tokens_per_request * 3600 / 1e6
    mtok_per_hour_total = target_qps * (input_tokens_per_request + output_tokens_per_request) * 3600 / 1e6
    if mtok_per_hour_out > 0:
        plan.dollars_per_output_mtok = plan.dollars_per_hour / mtok_per_hour_out
        plan.output_mtok_per_dollar = 1 / plan.dollars_per_output_mtok
    if mtok_per_hour_total > 0:
        plan.dollars_per_total_mtok = plan.dollars_per_hour / mtok_per_hour_total
    notes = [f"sized for the peak: {target_qps:g} req/s x {peak_to_average:g} = {plan.peak_qps:g} req/s over "
             f"{replica_rate:.3g} req/s per replica"
             + (f" at <= {max_utilization:.0%} utilization" if max_utilization < 1 else "")]
    if spare_replicas:
        notes.append(f"+{spare_replicas} spare replica(s) so a failed GPU does not break the SLO at peak")
    if peak_to_average > 1:
        notes.append(f"off-peak the fleet idles at {plan.utilization_at_average:.0%}: autoscaling on queue length "
                     "would recover part of that cost")
    plan.notes = notes
    return plan


def format_plan(plan: CapacityPlan) -> list[tuple[str, str]]:
    rows = [("per-replica rate within SLO", f"{plan.replica_rate:.3g} req/s"),
            ("target (average)", f"{plan.target_qps:g} req/s"),
            ("peak-to-average", f"{plan.peak_to_average:g} (peak {plan.peak_qps:g} req/s)"),
            ("replicas", f"{plan.replicas}" + (f" (incl. {plan.spare_replicas} spare)" if plan.spare_replicas else "")),
            ("GPUs", f"{plan.replicas * plan.gpus_per_replica}"),
            ("utilization at average / peak", f"{plan.utilization_at_average:.0%} / {plan.utilization_at_peak:.0%}"),
            ("cost", f"${plan.dollars_per_hour:,.2f}/hour, ${plan.dollars_per_month:,.0f}/month "
                     f"(${plan.gpu_dollars_per_hour:g}/GPU-hour)")]
    if plan.dollars_per_output_mtok is not None:
        rows.append(("$ per million output tokens", f"${plan.dollars_per_output_mtok:,.3f}"))
    if plan.dollars_per_total_mtok is not None:
        rows.append(("$ per million tokens (in+out)", f"${plan.dollars_per_total_mtok:,.3f}"))
    return rows
