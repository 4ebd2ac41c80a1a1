#!/usr/bin/env bash
# TurboWan whole generation at 720p on one GPU (issue #26's speed target: a 720p × 81 TurboWan video in ≤ 10 s of
# DiT time on one H200), about 560 s of wall time in all, dummy weights at full size:
#  1. turbowan2.1-t2v-14b-720p, 4 steps (its default), SLA top-k 0.1 (the attention it was distilled with) and
#     FP8 linears beside bf16: the `denoise` stage is the DiT time the target is about;
#  2. Wan2.1-T2V-14B at the same size, ours and diffusers' in one `ditserve bench` run, 1 step (CFG: two
#     forwards): × 50 is the 50-step dense video the issue compares with (a 50-step run would take ~20 minutes).
#
#   OUT=/path/to/results bash scripts/turbowan_gpu.sh
#
# Writes $OUT/turbowan-{bf16,fp8}.json/.log, $OUT/wan-dense.json/.log. Run from the repository root; each part
# under its own timeout, so one that runs long leaves the others their time.
set -u
OUT=${OUT:-./turbowan-gpu-results}
PY=${PYTHON:-python}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
size=(--height 720 --width 1280 --num-frames 81)

for q in bf16 fp8; do
    quant=()
    [[ $q == fp8 ]] && quant=(--quantization fp8)
    start=$SECONDS
    timeout 170 "$PY" -m ditserve bench --model turbowan2.1-t2v-14b-720p --load-format dummy "${size[@]}" \
        --attention-backend sla:0.1 "${quant[@]}" --no-diffusers --repeat 1 --json "$OUT/turbowan-$q.json" \
        >"$OUT/turbowan-$q.log" 2>&1
    echo "turbowan $q: exit $? after $((SECONDS - start)) s"
    tail -4 "$OUT/turbowan-$q.log"
done

start=$SECONDS
timeout 210 "$PY" -m ditserve bench --model wan2.1-t2v-14b --load-format dummy "${size[@]}" \
    --num-inference-steps 1 --repeat 1 --json "$OUT/wan-dense.json" >"$OUT/wan-dense.log" 2>&1
echo "dense wan 1 step, ours and diffusers: exit $? after $((SECONDS - start)) s"
tail -5 "$OUT/wan-dense.log"
