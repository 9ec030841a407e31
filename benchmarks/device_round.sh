#!/usr/bin/env bash
# One device call per stage of the measurement plan in docs/performance.md (each well under the
# device tool's 600 s per call). Results land under $OUT/<stage>/; every step has its own timeout
# so one slow step cannot eat the call.
#
#   bash benchmarks/device_round.sh check  # device compile, fused tokens vs HF, GEMV sweep -> gemv_configs.json,
#                                          # 8B engine fused (tuned) vs general
#   bash benchmarks/device_round.sh pdl    # PDL on and off: device compile, tokens vs HF, GEMV rows, 8B and Qwen3 engine
#   bash benchmarks/device_round.sh ab     # Qwen3 fused vs general, profiles, partition policies, 16k chunks
set -u
stage=${1:?usage: device_round.sh check|pdl|pdl2|final|final2|onerow|ab}
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
tuned=$out/gemv_configs.json
case $stage in
  check)  # ~580 s at most: correctness on the device, the GEMV sweep, then the 8B engine with the tuned configs and without
    run 50 compile python3 benchmarks/compile_check.py --out "$out"
    run 90 gpu_check_fused python3 benchmarks/gpu_check.py --fused-gemv --skip-8b --out "$out/gpu_check_fused"
    run 200 gemv_bench python3 benchmarks/gemv_bench.py --sweep --out "$out"
    if [ -f "$tuned" ]; then export TOKENMILL_GEMV_CONFIGS=$tuned; cat "$tuned"; fi
    run 120 engine_fused python3 benchmarks/engine_bench.py --shape llama-8b --skip-hf --fused-gemv --out "$out/engine_fused"
    run 120 engine_general python3 benchmarks/engine_bench.py --shape llama-8b --skip-hf --out "$out/engine_general"
    ;;
  pdl)  # ~580 s at most: programmatic dependent launch, checked and timed against the same kernels without it
    run 45 compile python3 benchmarks/compile_check.py --out "$out"
    run 90 gpu_check_fused python3 benchmarks/gpu_check.py --fused-gemv --skip-8b --out "$out/gpu_check_fused"
    run 70 gemv_rows python3 benchmarks/gemv_bench.py --rows 1,2 --out "$out"
    run 100 engine_fused python3 benchmarks/engine_bench.py --shape llama-8b --skip-hf --fused-gemv --out "$out/engine_fused"
    TOKENMILL_PDL=0 run 100 engine_fused_no_pdl python3 benchmarks/engine_bench.py --shape llama-8b --skip-hf \
      --fused-gemv --out "$out/engine_fused_no_pdl"
    run 100 engine_general python3 benchmarks/engine_bench.py --shape llama-8b --skip-hf --out "$out/engine_general"
    run 75 qwen_fused python3 benchmarks/engine_bench.py --shape qwen3-0.6b --skip-hf --fused-gemv --out "$out/qwen_fused"
    ;;
  pdl2)  # ~550 s at most: PDL triggered after the main loop; longer K chunks; where the batch-1 step goes
    run 90 gpu_check_fused python3 benchmarks/gpu_check.py --fused-gemv --skip-8b --out "$out/gpu_check_fused"
    run 150 gemv_bench python3 benchmarks/gemv_bench.py --sweep --rows 1,2 --out "$out"
    if [ -f "$tuned" ]; then export TOKENMILL_GEMV_CONFIGS=$tuned; cat "$tuned"; fi
    run 100 engine_fused python3 benchmarks/engine_bench.py --shape llama-8b --skip-hf --fused-gemv --out "$out/engine_fused"
    TOKENMILL_PDL=0 run 100 engine_fused_no_pdl python3 benchmarks/engine_bench.py --shape llama-8b --skip-hf \
      --fused-gemv --out "$out/engine_fused_no_pdl"
    run 110 profile_8b python3 benchmarks/profile_decode.py --shape llama-8b --batches 1,256 --steps 10 --fused-gemv \
      --out "$out/profile_8b"
    rm -f "$out"/profile_*/*trace*.json
    ;;
  final)  # ~460 s at most: the defaults (fused batch-1 layers, PDL, dynamic partitions) checked and timed, with A/Bs
    run 90 gpu_check python3 benchmarks/gpu_check.py --skip-8b --out "$out/gpu_check"
    run 100 engine_default python3 benchmarks/engine_bench.py --shape llama-8b --skip-hf --out "$out/engine_default"
    run 100 engine_fixed python3 benchmarks/engine_bench.py --shape llama-8b --skip-hf --skip-latency \
      --decode-partitions fixed --out "$out/engine_fixed"
    run 80 qwen_default python3 benchmarks/engine_bench.py --shape qwen3-0.6b --skip-hf --out "$out/qwen_default"
    run 80 qwen_general python3 benchmarks/engine_bench.py --shape qwen3-0.6b --skip-hf --no-fused-gemv \
      --out "$out/qwen_general"
    ;;
  final2)  # the final stage's engine runs again (a benchmark bug stopped them)
    run 100 engine_default python3 benchmarks/engine_bench.py --shape llama-8b --skip-hf --out "$out/engine_default"
    run 80 qwen_default python3 benchmarks/engine_bench.py --shape qwen3-0.6b --skip-hf --out "$out/qwen_default"
    run 80 qwen_general python3 benchmarks/engine_bench.py --shape qwen3-0.6b --skip-hf --no-fused-gemv \
      --out "$out/qwen_general"
    ;;
  onerow)  # ~250 s at most: the one-row GEMVs with the norm's 1/rms from the main loop (no prologue pass)
    run 90 gpu_check_fused python3 benchmarks/gpu_check.py --fused-gemv --skip-8b --out "$out/gpu_check_fused"
    run 60 gemv_rows python3 benchmarks/gemv_bench.py --rows 1 --out "$out"
    run 100 engine_default python3 benchmarks/engine_bench.py --shape llama-8b --skip-hf --out "$out/engine_default"
    ;;
  ab)  # ~580 s at most: Qwen3 both ways, profiles, partition policies, 16k-token steps. Carry the
       # tuned configs as benchmarks/results/gemv_configs.json (the check stage's) if there are any.
    if [ -f benchmarks/results/gemv_configs.json ]; then export TOKENMILL_GEMV_CONFIGS=$PWD/benchmarks/results/gemv_configs.json; fi
    run 80 qwen_fused python3 benchmarks/engine_bench.py --shape qwen3-0.6b --skip-hf --fused-gemv --out "$out/qwen_fused"
    run 80 qwen_general python3 benchmarks/engine_bench.py --shape qwen3-0.6b --skip-hf --out "$out/qwen_general"
    run 110 profile_8b python3 benchmarks/profile_decode.py --shape llama-8b --batches 1,256 --prefill-requests 16 \
      --steps 10 --fused-gemv --out "$out/profile_8b"
    run 80 profile_qwen python3 benchmarks/profile_decode.py --shape qwen3-0.6b --batches 1,256 --prefill-requests 16 \
      --steps 10 --fused-gemv --out "$out/profile_qwen"
    run 130 partitions python3 benchmarks/partition_sweep.py --out "$out"
    run 100 tokens16k python3 benchmarks/engine_bench.py --shape llama-8b --skip-hf --skip-latency \
      --max-num-batched-tokens 16384 --out "$out/tokens16k"
    rm -f "$out"/profile_*/*trace*.json  # large; the JSON summaries carry the figures
    ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
# The device tool returns at most 8 files: one archive of the stage's folder.
tar czf "$out.tgz" -C "$(dirname "$out")" "$stage" && rm -rf "$out" && ls -la "$out.tgz"
