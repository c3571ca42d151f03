#!/usr/bin/env bash
# Peak GPU memory and MFU against row length on one GPU: a randomly initialised model of
# Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads, 2 KV heads, MLP 4864, vocab 151,936 tied),
# bf16, posttrain (activation_offloading + tiled_mlp) against TRL at its defaults, SFT, DPO, GRPO.
#
#   bash benchmarks/gpu_length_sweep.sh                  # from the repository root
#   PEAK_TFLOPS=989 GPU_CAP_GB=40 LENGTHS=2048,4096,8192,16384,32768 bash benchmarks/gpu_length_sweep.sh
#
# Environment: PYTHON (default python), TRL_PATH (a directory holding trl 1.16, default /tmp/trl-bench),
# PEAK_TFLOPS (the card's dense bf16 peak: H100 SXM 989, H100 PCIe 756, H200 989, A100 312),
# GPU_CAP_GB (GPU memory each run may use, default 40), LENGTHS, METHODS, STEPS, TIMEOUT_S, OUT_DIR.
# Each library's sweep stops at the first length over the cap; results go to OUT_DIR as JSON and PNG.
set -euo pipefail

PYTHON=${PYTHON:-python}
if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_length_sweep.sh: no CUDA GPU visible to $PYTHON (torch.cuda.is_available() is False); run it on a GPU machine" >&2
    exit 2
fi

cd "$(dirname "$0")/.."
LENGTHS=${LENGTHS:-1024,2048,4096,8192,16384,32768,65536}
METHODS=${METHODS:-sft,dpo,grpo}
OUT_DIR=${OUT_DIR:-benchmarks/results}
TRL_PATH=${TRL_PATH:-/tmp/trl-bench}
common=(--device cuda --model qwen2.5-0.5b --bf16 --lengths "$LENGTHS" --steps "${STEPS:-3}"
        --gpu-memory-cap-gb "${GPU_CAP_GB:-40}" --memory-cap-gb 100 --peak-tflops "${PEAK_TFLOPS:-989}"
        --timeout-s "${TIMEOUT_S:-1800}")

for method in ${METHODS//,/ }; do
    out="$OUT_DIR/gpu_length_sweep_$method.json"
    PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} "$PYTHON" -m benchmarks.length_sweep "${common[@]}" --methods "$method" \
        --impls posttrain --posttrain-options '{"activation_offloading": true, "tiled_mlp": true}' --out "$out"
    PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} "$PYTHON" -m benchmarks.length_sweep "${common[@]}" --methods "$method" \
        --impls trl --trl-path "$TRL_PATH" --append --out "$out"
done
