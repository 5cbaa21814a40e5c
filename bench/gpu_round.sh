#!/usr/bin/env bash
# Every GPU measurement the open issues ask for, in one call on the GPU host, each under its own time limit so that
# one slow step cannot cost the others:  bash bench/gpu_round.sh OUT_DIR [SECONDS_SCALE]
# Writes OUT_DIR/<gpu>-*.json (and the test-gpu JUnit report) plus OUT_DIR/gpu_round.log with what each step printed.
set -uo pipefail
out=${1:?usage: bench/gpu_round.sh OUT_DIR}
scale=${2:-1}
mkdir -p "$out"
gpu=$(python3 -c "import torch; n = torch.cuda.get_device_name(); print('h200' if 'H200' in n else 'h100' if 'H100' in n else 'gpu')")
log="$out/gpu_round.log"
step() {  # step NAME SECONDS COMMAND...: runs COMMAND under a limit, logs its tail and its exit status
  local name=$1 limit=$(( $2 * scale )); shift 2
  local start=$SECONDS
  timeout -k 10 "$limit" "$@" > "$out/.step.log" 2>&1
  local rc=$?
  { echo "=== $name (limit ${limit}s): exit $rc after $(( SECONDS - start ))s: $*"; tail -n 60 "$out/.step.log"; } >> "$log"
}
echo "gpu: $(python3 -c 'import torch; print(torch.cuda.get_device_name(), torch.__version__)')" > "$log"
step test-gpu 150 make test-gpu PYTHON=python3 GPU_REPORT="$out/$gpu-test-gpu"
step memory-truth 60 python3 bench/memory_truth.py --device cuda --output-json "$out/$gpu-memory-truth.json"
step decode 50 python3 bench/gpu_bench.py --shapes qwen2.5-0.5b --sections decode --compare-pdl \
  --output-json "$out/$gpu-decode-qwen2.5-0.5b.json"
step serve 70 python3 -m bench.serve --random-shape qwen2.5-0.5b --num-prompts 256 --max-concurrency 256 \
  --random-input-len 562 --random-output-len 562 --random-range-ratio 0.822 --result "$out/$gpu-serve.json"
step moe 40 python3 bench/gpu_bench.py --shapes qwen3-moe-30b-a3b-12l --sections decode,agreement \
  --output-json "$out/$gpu-moe.json"
rm -f "$out/.step.log" "$out/$gpu-test-gpu.xml"  # the JSON summary carries the JUnit report's results
