#!/usr/bin/env bash
# TurboWan at 720p on one GPU (issue #26's speed target: a 720p × 81 TurboWan video in ≤ 10 s of DiT time on one
# H200), about 560 s of wall time in all, dummy weights at full size:
#  1. turbowan2.1-t2v-14b-720p, 4 steps (its default), SLA top-k 0.1 (the attention it was distilled with), FP8
#     linears: whole generations; the `denoise` stage is the DiT time the target is about;
#  2. one Wan2.1-T2V-14B forward at the same size, dense, ours (bf16 and FP8, cuDNN attention) beside diffusers'
#     eager forward: × 100 (50 steps, two CFG branches) is the 50-step dense video the issue compares with (a
#     50-step generation would take about 20 minutes);
#  3. TurboWan as in 1 in bf16.
#
#   OUT=/path/to/results bash scripts/turbowan_gpu.sh
#
# Writes $OUT/turbowan-{fp8,bf16}.json/.log and $OUT/wan-dense-forward.json/.log. Run from the repository root;
# each part under its own timeout, so one that runs long leaves the others their time.
set -u
OUT=${OUT:-./turbowan-gpu-results}
PY=${PYTHON:-python}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
size=(--height 720 --width 1280 --num-frames 81)

turbowan() {
    local q=$1 limit=$2 quant=()
    [[ $q == fp8 ]] && quant=(--quantization fp8)
    local start=$SECONDS
    timeout "$limit" "$PY" -m ditserve bench --model turbowan2.1-t2v-14b-720p --load-format dummy "${size[@]}" \
        --attention-backend sla:0.1 "${quant[@]}" --no-diffusers --repeat 1 --json "$OUT/turbowan-$q.json" \
        >"$OUT/turbowan-$q.log" 2>&1
    echo "turbowan $q: exit $? after $((SECONDS - start)) s"
    tail -4 "$OUT/turbowan-$q.log"
}

turbowan fp8 200
start=$SECONDS
timeout 160 "$PY" benchmarks/dit_forward.py --model wan2.1-t2v-14b "${size[@]}" --attention cudnn --iters 1 \
    --json "$OUT/wan-dense-forward.json" >"$OUT/wan-dense-forward.log" 2>&1
echo "dense Wan2.1-14B forward, ours and diffusers: exit $? after $((SECONDS - start)) s"
tail -7 "$OUT/wan-dense-forward.log"
turbowan bf16 190
