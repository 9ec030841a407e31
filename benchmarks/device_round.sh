#!/usr/bin/env bash
# One device call per stage of the measurement plan in docs/performance.md (each well under the
# device tool's 600 s per call). Results land under $OUT/<stage>/; every step has its own timeout
# so one slow step cannot eat the call.
#
#   bash benchmarks/device_round.sh check  # device compile, tokens vs HF (batched and alone), GEMV sweep ->
#                                          # gemv_configs.json, 8B engine: defaults, then without the fused layers
#   bash benchmarks/device_round.sh ab     # A/Bs of the defaults (PDL, partitions), Qwen3 both ways, profiles
set -u
stage=${1:?usage: device_round.sh check|ab}
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
  check)  # ~560 s at most
    run 50 compile python3 benchmarks/compile_check.py --out "$out"
    run 100 gpu_check python3 benchmarks/gpu_check.py --skip-8b --out "$out/gpu_check"
    run 150 gemv_bench python3 benchmarks/gemv_bench.py --sweep --rows 1,2,4,16 --out "$out"
    if [ -f "$tuned" ]; then cat "$tuned"; fi  # TOKENMILL_GEMV_CONFIGS=$tuned for runs with the tuned configs
    run 100 engine_default python3 benchmarks/engine_bench.py --shape llama-8b --skip-hf --out "$out/engine_default"
    run 100 engine_general python3 benchmarks/engine_bench.py --shape llama-8b --skip-hf --no-fused-gemv \
      --out "$out/engine_general"
    ;;
  ab)  # ~570 s at most
    TOKENMILL_PDL=0 run 100 engine_no_pdl python3 benchmarks/engine_bench.py --shape llama-8b --skip-hf \
      --out "$out/engine_no_pdl"
    run 100 engine_fixed python3 benchmarks/engine_bench.py --shape llama-8b --skip-hf --decode-partitions fixed \
      --out "$out/engine_fixed"
    run 80 qwen_default python3 benchmarks/engine_bench.py --shape qwen3-0.6b --skip-hf --out "$out/qwen_default"
    run 80 qwen_general python3 benchmarks/engine_bench.py --shape qwen3-0.6b --skip-hf --no-fused-gemv \
      --out "$out/qwen_general"
    run 110 profile_8b python3 benchmarks/profile_decode.py --shape llama-8b --batches 1,256 --prefill-requests 16 \
      --steps 10 --out "$out/profile_8b"
    run 100 tokens16k python3 benchmarks/engine_bench.py --shape llama-8b --skip-hf --skip-latency \
      --max-num-batched-tokens 16384 --out "$out/tokens16k"
    rm -f "$out"/profile_*/*trace*.json  # large; the JSON summaries carry the figures
    ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
# The device tool returns at most 8 files: one archive of the stage's folder.
tar czf "$out.tgz" -C "$(dirname "$out")" "$stage" && rm -rf "$out" && ls -la "$out.tgz"
