#!/usr/bin/env bash
# The GPU check of issue 7, as one short script for a machine with an NVIDIA GPU (recorded in docs/benchmarks.md):
#   1. every test marked gpu (CUDA merge, reference on the GPU, a real CUDA out-of-memory falling back,
#      bitsandbytes 4-bit and 8-bit references, a pipeline run verified and benchmarked on the GPU, TensorRT
#      when its package is there);
#   2. benchmarks/merge_vs_peft.py --size 0.6b --device cuda (PEFT on the GPU against our CPU and CUDA merges);
#   3. the demo, then `model-export benchmark` of its artifacts with transformers on the GPU and on the CPU.
# Usage: OUT=/some/dir scripts/device_run.sh   (python3 with torch+CUDA; missing packages as wheels in .whl/)
set -u
OUT=${OUT:-/tmp/device-run}
mkdir -p "$OUT"
ROOT=$(pwd)
if ! python3 -c "import pydantic" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=$ROOT/src:$ROOT:/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false COLUMNS=160
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import sys, torch, transformers, peft; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__)"
  python3 -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)" 2>&1 | tail -1
  python3 -c "import tensorrt; print('tensorrt', tensorrt.__version__)" 2>&1 | tail -1
} 2>&1 | tee "$OUT/versions.txt"

echo "== 1. tests marked gpu"
timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests/ 2>&1 | tee "$OUT/gpu-tests.log" | tail -25

echo "== 2. merge on the GPU against PEFT (Qwen3-0.6B shape)"
timeout 120 python3 benchmarks/merge_vs_peft.py --size 0.6b --device cuda --workdir /tmp/bench 2>&1 | tee "$OUT/merge-cuda.log" | tail -12

echo "== 3. the demo, benchmarked on the GPU and on the CPU"
mkdir -p /tmp/demo && cd /tmp/demo || exit 1
timeout 90 python3 -m model_export.cli demo --log-level WARNING > "$OUT/demo.log" 2>&1; echo "demo rc=$?"; tail -12 "$OUT/demo.log"
for device in cuda cpu; do
  timeout 60 python3 -m model_export.cli benchmark export-demo --device $device --batch-size 4 --new-tokens 32 --repeats 3 2>&1 | tee "$OUT/bench-$device.txt" | tail -12
  cp export-demo/benchmark/benchmark.json "$OUT/bench-$device.json" 2>/dev/null
done
