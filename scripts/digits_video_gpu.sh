#!/usr/bin/env bash
# digits-video on one GPU, within BUDGET seconds (default 540) in all: a short probe run measures the seconds per
# VAE and DiT step on this machine; run A then trains the default recipe with as many DiT steps as fit, keeping
# B_RESERVE seconds aside (`--dit-steps`, printed), and is scored; run B, when time for 1,000 DiT steps is left,
# trains a second DiT recipe on A's VAE (so the two differ only in the DiT) and is scored. Results under $OUT:
#   digits-video.tar.gz (digits-video/, the folder to ship; examples/, seed 0's clips as PNG strips and GIFs;
#   digits-video-b/), train-a.log, score-a.txt, train-b.log, score-b.txt, probe.log, timings.txt
# (one archive for the folders: the device tool brings back at most 8 files, none more than 2 folders down).
#
# Environment:
#   VAE_FROM   a digits-video folder whose VAE run A takes as it is (no VAE steps, more time for the DiT);
#              unset: run A trains its own VAE (the default recipe's vae_steps). Either way the training log scores
#              the VAE's reconstructions of real clips ("reconstructions of real clips score ..."): the ceiling of
#              what the DiT's clips can score through it
#   DIT_FROM   a digits-video folder (or a digits-video.tar.gz of this script) whose model run A trains further
#              (`--dit-from`: its VAE, text encoder and DiT as they are, no VAE steps): a run its slot cut short
#              goes on in the next
#   A_ARGS     extra train_video arguments of run A (default none: the default recipe)
#   B_ARGS     train_video arguments of run B (default: 2×2 patches, the token grid of the recipe before)
#   B_RESERVE  seconds of DiT training kept for run B (default 0: run A's steps come first, as they are what the
#              digit needs most; B runs on what the probe's margins leave)
#   SEEDS      seeds per digit × direction when scoring (default 3: 120 clips)
#   CFG_SWEEP  guidance scales to score run A's model at besides its default, e.g. "6,8" (about 25 s each, taken
#              from run A's DiT time; score-a-cfg<G>.txt): a DiT that has learned the digit partly may draw it
#              more often under stronger guidance (default none)
#   PYTHON     the interpreter (default python; python3 where the image has no python with its packages)
#   DEVICE     cuda (the default), or cpu to try the script itself with a tiny A_ARGS
#   DIT_STEPS  run A's DiT steps, in place of what the probe says fits (the probe is then skipped)
set -uo pipefail
: "${OUT:?set OUT to the results folder}"
BUDGET=${BUDGET:-540}
SEEDS=${SEEDS:-3}
PY=${PYTHON:-python}
DEVICE=${DEVICE:-cuda}
B_ARGS=${B_ARGS:---set patch_size=1,2,2}
B_RESERVE=${B_RESERVE:-0}
START=$(date +%s)
mkdir -p "$OUT"
: >"$OUT/timings.txt"
elapsed() { echo $(($(date +%s) - START)); }
stamp() { echo "$(elapsed) s: $*" | tee -a "$OUT/timings.txt"; }
# run LOG CMD...: the command, given only the time left, its output to the screen and to LOG
run() {
    local log=$1 limit rc
    shift
    limit=$((BUDGET - $(elapsed) - 3))
    if ((limit < 15)); then
        stamp "skipped, no time left: $*"
        return 1
    fi
    timeout --signal=INT --kill-after=5 "$limit" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    stamp "exit $rc: $*"
    return "$rc"
}
# seconds per step of a "vae/dit: N steps in S s" line of a training log (S is whole seconds, so N must be large)
per_step() { grep -h "^\[.*\] $2: [0-9]* steps in" "$1" | tail -n 1 | awk '{print $6 / $3}'; }
train=("$PY" -m ditserve.digits.train_video --device "$DEVICE" --no-eval)
score=("$PY" -m ditserve.digits.video_quality --device "$DEVICE" --seeds "$SEEDS")

nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true
stamp "start, budget $BUDGET s"

# Everything the run writes but the logs goes into one archive at the end.
pack() {
    local parts=()
    for part in digits-video digits-video-b examples; do [[ -d "$OUT/$part" ]] && parts+=("$part"); done
    ((${#parts[@]})) || return 0
    tar -czf "$OUT/digits-video.tar.gz" -C "$OUT" "${parts[@]}" && rm -rf "${parts[@]/#/$OUT/}" "$OUT/probe" "$OUT/from"
    stamp "packed ${parts[*]} into digits-video.tar.gz ($(du -h "$OUT/digits-video.tar.gz" | cut -f1))"
}
trap pack EXIT

if [[ "${DIT_FROM:-}" == *.tar.gz ]]; then
    mkdir -p "$OUT/from" && tar -xzf "$DIT_FROM" -C "$OUT/from" digits-video || exit 1
    DIT_FROM=$OUT/from/digits-video
fi
vae_a=() from_a=()
[[ -n "${VAE_FROM:-}" ]] && vae_a=(--vae-from "$VAE_FROM")
[[ -n "${DIT_FROM:-}" ]] && vae_a=(--vae-from "$DIT_FROM") from_a=(--dit-from "$DIT_FROM")
if [[ -z "${DIT_STEPS:-}" ]]; then
    # Probe: 200 VAE steps (none with VAE_FROM or DIT_FROM) and 400 DiT steps on 64 scans, at run A's sizes.
    # shellcheck disable=SC2086
    run "$OUT/probe.log" "${train[@]}" --out "$OUT/probe" --vae-steps 200 --dit-steps 400 --set scans=64 \
        --set clips_per_scan=1 "${vae_a[@]}" ${A_ARGS:-} || exit 1
    vae_s=$(per_step "$OUT/probe.log" vae)
    dit_s=$(per_step "$OUT/probe.log" dit)
    stamp "probe: ${vae_s:-no} s per VAE step, $dit_s s per DiT step"
fi

# Run A: what is left after the VAE, ~40 s of start-up, encoding and saving, ~45 s of scoring and B_RESERVE goes
# to DiT steps.
vae_time=0
if [[ -z "${VAE_FROM:-}${DIT_FROM:-}" && -n "${vae_s:-}" ]]; then
    vae_steps=$("$PY" -c "from ditserve.digits.train_video import VideoTrainConfig as C; print(C.vae_steps)")
    vae_time=$(awk -v n="$vae_steps" -v s="$vae_s" 'BEGIN {print int(n * s) + 1}')
fi
sweep=()
IFS=, read -r -a sweep <<<"${CFG_SWEEP:-}"
left=$((BUDGET - $(elapsed) - vae_time - 40 - 45 - 25 * ${#sweep[@]} - B_RESERVE))
steps=${DIT_STEPS:-$(awk -v l="$left" -v s="$dit_s" 'BEGIN {n = int(l / s / 100) * 100; print (n < 500 ? 500 : n)}')}
stamp "run A: $steps DiT steps (${DIT_FROM:+from $DIT_FROM; }VAE: ${DIT_FROM:-${VAE_FROM:-trained, about $vae_time s}})"
if ((${#from_a[@]})); then vae_a=("${from_a[@]}"); fi
# shellcheck disable=SC2086
if run "$OUT/train-a.log" "${train[@]}" --out "$OUT/digits-video" --dit-steps "$steps" "${vae_a[@]}" ${A_ARGS:-}; then
    run "$OUT/score-a.txt" "${score[@]}" --model "$OUT/digits-video" --examples "$OUT/examples"
    for g in "${sweep[@]}"; do
        run "$OUT/score-a-cfg$g.txt" "${score[@]}" --model "$OUT/digits-video" --guidance-scale "$g"
    done
    # Run B on A's VAE with the DiT steps that fit in what is left after ~35 s of start-up and ~45 s of scoring.
    dit_b=$(per_step "$OUT/train-a.log" dit)
    left=$((BUDGET - $(elapsed) - 35 - 45))
    steps_b=$(awk -v l="$left" -v s="$dit_b" 'BEGIN {print int(l / s / 100) * 100}')
    if ((steps_b >= 1000)); then
        stamp "run B ($B_ARGS): $steps_b DiT steps"
        # shellcheck disable=SC2086
        run "$OUT/train-b.log" "${train[@]}" --out "$OUT/digits-video-b" --vae-from "$OUT/digits-video" \
            --dit-steps "$steps_b" $B_ARGS &&
            run "$OUT/score-b.txt" "${score[@]}" --model "$OUT/digits-video-b"
    else
        stamp "run B skipped: time for only $steps_b DiT steps"
    fi
fi

echo "== summary =="
cat "$OUT/timings.txt"
for r in a b; do
    if [[ -f "$OUT/train-$r.log" ]]; then
        for pattern in "vae  *[0-9]*  recon" "reconstructions of real" "dit  *[0-9]*  loss" "dit: [0-9]* steps"; do
            grep -h "$pattern" "$OUT/train-$r.log" | tail -n 1
        done
    fi
    [[ -f "$OUT/score-$r.txt" ]] && echo "run $r: $(grep -h 'videos: digit' "$OUT/score-$r.txt")"
done
for g in "${sweep[@]}"; do
    [[ -f "$OUT/score-a-cfg$g.txt" ]] && echo "run a, guidance $g: $(grep -h 'videos: digit' "$OUT/score-a-cfg$g.txt")"
done
exit 0
