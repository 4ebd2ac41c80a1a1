#!/usr/bin/env bash
# One DiT forward, bf16 and FP8 (cuDNN attention), beside diffusers' eager forward of the same weights, for the
# image families (issue #23's "Qwen-Image and FLUX.2-dev with FP8: forward time beside bf16 and diffusers"), about
# 300 s of wall time on one H200, dummy weights at full size:
#   flux.1-dev 1024², qwen-image 1328² (its default size), flux.2-dev 1024²
#
#   OUT=/path/to/results bash scripts/fp8_families_gpu.sh
#
# Writes $OUT/<model>.json/.log. Run from the repository root; each model under its own timeout.
set -u
OUT=${OUT:-./fp8-families-results}
PY=${PYTHON:-python}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

forward() {
    local model=$1 size=$2 limit=$3 start=$SECONDS
    timeout "$limit" "$PY" benchmarks/dit_forward.py --model "$model" --height "$size" --width "$size" \
        --attention cudnn --iters 3 --json "$OUT/$model.json" >"$OUT/$model.log" 2>&1
    echo "$model ${size}²: exit $? after $((SECONDS - start)) s"
    tail -6 "$OUT/$model.log"
}

forward flux.1-dev 1024 80
forward qwen-image 1328 100
forward flux.2-dev 1024 130
