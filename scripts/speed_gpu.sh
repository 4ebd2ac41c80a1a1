#!/usr/bin/env bash
# One-GPU speed checks for issue #23 on one H200, about 300 s of wall time in all, results under $OUT:
#   attention.log/.json  cuDNN, flash, sage and fp8 attention at FLUX 1024², Wan 480p×81 and 720p×81 shapes: ms,
#                        error vs cuDNN
#   tests.log            the sage and fp8 attention gpu tests (the digits accuracy gate) and every Triton kernel
#                        against its reference on CUDA (the FP8 attention kernels among them)
#   wan14b.log/.json     Wan2.1-14B 832×480×81, one DiT forward: FP8 and bf16 (cuDNN, sage, fp8 attention) vs
#                        diffusers eager
# Each part runs under its own `timeout`, so one that hangs leaves the others their time.
# Run from the repository root, after the usual wheel install (.whl carried); sageattention's wheel is installed
# here from .whl if it does not import yet.
set -uo pipefail
: "${OUT:?set OUT to the folder the results go to}"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! python3 -c "import sageattention" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/sage-site .whl/sageattention-1.0.6-*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/sage-site"
fi
python3 -c "import sageattention, torch, triton; print('sageattention imports; torch', torch.__version__, 'triton', triton.__version__)"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader

start=$SECONDS
timeout 80 python3 benchmarks/attention_backends.py --shapes flux-1024,wan-480p-81,wan-720p-81 --backends cudnn,flash,sage,fp8 \
    --json "$OUT/attention.json" 2>&1 | tee "$OUT/attention.log"
echo "attention: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s"

start=$SECONDS
timeout 120 python3 -m pytest -q -m gpu tests/test_sage_attention.py tests/test_fp8_attention.py tests/test_kernels.py -k "sage or fp8 or cuda_bf16" \
    -p no:cacheprovider 2>&1 | tee "$OUT/tests.log"
echo "tests: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s"

start=$SECONDS
timeout 150 python3 benchmarks/dit_forward.py --model wan2.1-t2v-14b --height 480 --width 832 --num-frames 81 \
    --iters 2 --json "$OUT/wan14b.json" 2>&1 | tee "$OUT/wan14b.log"
echo "wan14b: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s"
