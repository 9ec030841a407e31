#!/usr/bin/env bash
# One device call per stage of the measurement plan in docs/performance.md (each well under the
# device tool's 600 s per call). Results land under $OUT/<stage>/; every step has its own timeout
# so one slow step cannot eat the call.
#
#   bash benchmarks/device_round.sh check    # compile on the device's triton, fused tokens vs HF, GEMV sweep
#   bash benchmarks/device_round.sh ab       # engine figures, fused vs general, on both shapes
#   bash benchmarks/device_round.sh profile  # prefill and batch-256 profiles, partition policies, 16k chunks
set -u
stage=${1:?usage: device_round.sh check|ab|profile}
out=${OUT:-/tmp/out}/$stage
mkdir -p "$out"
export PYTHONUNBUFFERED=1
run() {  # run SECONDS NAME CMD...: log to $out/NAME.log, keep going on failure
  local secs=$1 name=$2
  shift 2
  echo "=== $name ($secs s max)"
  timeout "$secs" "$@" > "$out/$name.log" 2>&1
  echo "    exit $? ; tail:"
  grep -v -i "warning\|^INFO\|USDT" "$out/$name.log" | tail -n 25
}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$out/gpu.txt" 2>&1 || true
case $stage in
  check)  # ~460 s at most
    run 60 compile python3 benchmarks/compile_check.py --out "$out"
    run 100 gpu_check_fused python3 benchmarks/gpu_check.py --fused-gemv --skip-8b --out "$out/gpu_check_fused"
    run 300 gemv_bench python3 benchmarks/gemv_bench.py --sweep --out "$out"
    ;;
  ab)  # ~500 s at most
    run 150 engine_fused python3 benchmarks/engine_bench.py --shape llama-8b --skip-hf --fused-gemv --out "$out/engine_fused"
    run 150 engine_general python3 benchmarks/engine_bench.py --shape llama-8b --skip-hf --out "$out/engine_general"
    run 100 qwen_fused python3 benchmarks/engine_bench.py --shape qwen3-0.6b --skip-hf --fused-gemv --out "$out/qwen_fused"
    run 100 qwen_general python3 benchmarks/engine_bench.py --shape qwen3-0.6b --skip-hf --out "$out/qwen_general"
    ;;
  profile)  # ~550 s at most
    run 150 profile_8b python3 benchmarks/profile_decode.py --shape llama-8b --batches 1,256 --prefill-requests 16 \
      --steps 10 --out "$out/profile_8b"
    run 100 profile_qwen python3 benchmarks/profile_decode.py --shape qwen3-0.6b --batches 1,256 --prefill-requests 16 \
      --steps 10 --out "$out/profile_qwen"
    run 180 partitions python3 benchmarks/partition_sweep.py --out "$out"
    run 120 tokens16k python3 benchmarks/engine_bench.py --shape llama-8b --skip-hf --skip-latency \
      --max-num-batched-tokens 16384 --out "$out/tokens16k"
    rm -f "$out"/profile_*/*trace*.json  # large; the JSON summaries carry the figures
    ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
