"""Host time of one engine step at a large decode batch, without a model: Scheduler.schedule_step,
ModelRunner._prepare_inputs (the step's flat inputs, block tables included) and
Scheduler.update_from_output; also for the prefill steps before it (8192 tokens each). Runs on any CPU. With async scheduling this work overlaps the device's
step; once it is longer than the step (small models, big batches), the device waits for the host.

    python benchmarks/host_step_bench.py [--batch 256] [--prompt-len 512] [--steps 50]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tokenmill.engine.kv_cache_manager import KVCacheManager  # noqa: E402
from tokenmill.engine.request import Request  # noqa: E402
from tokenmill.engine.scheduler import SampledToken, Scheduler, SchedulerConfig  # noqa: E402
from tokenmill.sampling_params import SamplingParams  # noqa: E402
from tokenmill.worker.model_runner import ModelRunner  # noqa: E402


class _InputsOnly:
    """Just what ModelRunner._prepare_inputs reads: no model, no KV tensors."""
    block_size = 16
    device = torch.device("cpu")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    blocks = args.batch * (args.prompt_len + args.steps + 164) // 16 + 64
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=args.batch, max_num_batched_tokens=8192, max_model_len=8192),
                          KVCacheManager(blocks, 16))
    rng = random.Random(0)
    params = SamplingParams(temperature=0, max_tokens=args.steps + 100, ignore_eos=True)  # none finish
    for i in range(args.batch):
        scheduler.add_request(Request(f"r{i}", [rng.randrange(100, 30000) for _ in range(args.prompt_len)], params))

    def step() -> tuple[float, float, float, int]:
        t0 = time.perf_counter()
        out = scheduler.schedule_step()
        t1 = time.perf_counter()
        ModelRunner._prepare_inputs(_InputsOnly(), out.chunks)
        t2 = time.perf_counter()
        scheduler.mark_launched(out)
        scheduler.update_from_output(out, [SampledToken(5) if c.samples else None for c in out.chunks])
        return t1 - t0, t2 - t1, time.perf_counter() - t2, len(out.chunks)

    prefill_totals, prefill_steps = [0.0, 0.0, 0.0], 0
    while scheduler.waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in scheduler.running):
        *times, _ = step()   # prefill: 8192-token steps (the throughput job's first steps)
        prefill_totals = [a + b for a, b in zip(prefill_totals, times)]
        prefill_steps += 1
    schedule, prepare, update = (t / prefill_steps * 1e3 for t in prefill_totals)
    print(f"prefill steps ({prefill_steps}, 8192 tokens each): schedule {schedule:.2f} ms, prepare inputs "
          f"{prepare:.2f} ms, update {update:.2f} ms per step")
    totals = [0.0, 0.0, 0.0]
    for _ in range(args.steps):
        *times, batch = step()
        totals = [a + b for a, b in zip(totals, times)]
    schedule, prepare, update = (t / args.steps * 1e3 for t in totals)
    print(f"decode batch {batch}: schedule {schedule:.2f} ms, prepare inputs {prepare:.2f} ms, "
          f"update {update:.2f} ms, total {schedule + prepare + update:.2f} ms per step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
