"""Decode split-K partition policy, end to end: batch-1 decode speed of the 8B shape with the CUDA
graphs captured under each policy (the graph's grid is sized for max_model_len, so at a short real
context most partitions exit at once and the live ones loop over `partition` keys each).

    python benchmarks/partition_sweep.py --out DIR
"""

from __future__ import annotations

import argparse
import functools
import importlib
import gc
import json
import random
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_bench import timed_single  # noqa: E402
from shapes import SHAPES, write_dummy_model_dir  # noqa: E402

from tokenmill import LLM  # noqa: E402

pa = importlib.import_module("tokenmill.kernels.paged_attention")  # the module (the package exports a function of that name)

# (min_partition, programs_per_sm, partitions): the grid's bound, and whether each request then uses
# that size ("fixed") or splits its own context over the grid ("dynamic"); the first is the default.
POLICIES = [(128, 8, "fixed"), (128, 8, "dynamic"), (64, 8, "dynamic"), (256, 2, "fixed")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-8b")
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    model_dir = write_dummy_model_dir(Path(tempfile.mkdtemp()) / args.shape, SHAPES[args.shape])
    original = pa.decode_partition_size
    rng = random.Random(0)
    prompts = {n: [rng.randrange(10, SHAPES[args.shape]["vocab_size"]) for _ in range(n)] for n in (128, 8192)}
    rows = []
    for min_partition, per_sm, mode in POLICIES:
        pa.decode_partition_size = functools.partial(original, min_partition=min_partition, programs_per_sm=per_sm)
        pa.DECODE_PARTITIONS = mode
        llm = LLM(str(model_dir), load_format="dummy", dtype="bfloat16", max_model_len=8192 + 272,
                  gpu_memory_utilization=0.5, max_num_seqs=64)
        timed_single(llm, prompts[128], 16)
        timed_single(llm, prompts[8192], 4)
        row = {"min_partition": min_partition, "programs_per_sm": per_sm, "partitions": mode,
               "graph_partition_b1": pa.decode_partition_size(1, SHAPES[args.shape]["num_key_value_heads"],
                                                              8192 + 272, torch.cuda.get_device_properties(0)
                                                              .multi_processor_count)}
        for n in (128, 8192):
            row[f"decode_tok_s_{n}"] = timed_single(llm, prompts[n], 256)["decode_tok_s"]
        rows.append(row)
        print(row, flush=True)
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "partition_sweep.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
