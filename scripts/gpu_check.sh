#!/usr/bin/env bash
# Prove the GPU path in one command on any CUDA machine with torch (2.4 or later) and torchvision:
# the `gpu`-marked tests (the torch backend on CUDA: bf16 parity, compile, CUDA graphs, nvJPEG, a
# server with --backend torch --device cuda; TensorRT / onnxruntime-gpu ones where those are
# installed) and `flowmap bench gpu` at real sizes. Everything it writes goes under OUT_DIR.
#
#   scripts/gpu_check.sh [OUT_DIR]      # default: $OUT, else gpu-check/
#
# RUN_TESTS=0 runs the bench alone. RESUME_FROM=docs/gpu.json goes on from that report (measured on the same
# card, torch and timed code: the bench refuses another) and runs only what it lacks, e.g. after a call cut off
# by its limit.
# BENCH_FLAGS replaces the bench's flags (default: four modes), e.g. BENCH_FLAGS="--batches 1 8 32"; the bench
# rewrites its report after every part, so one cut off by BENCH_TIMEOUT_S keeps what it measured.
# Without network, carry the wheels scripts/gpu_wheels.sh downloads (.whl/ in the checkout): they
# are installed into a scratch folder first. With network, `pip install -e ".[train,dev]"` instead.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu-check}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1  # a run cut off by its timeout still leaves its log
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/flowmap-site \
    .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/flowmap-site:$PYTHONPATH"
fi
{ nvidia-smi; $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"; } \
  > "$OUT_DIR/device.txt" 2>&1
status=0
if [ "${RUN_TESTS:-1}" = 1 ]; then
# the gpu-marked modules only: other modules import packages (ray, gradio, playwright) a bare GPU image lacks
timeout "${TESTS_TIMEOUT_S:-240}" $PY -m pytest -q -m gpu -rs -p no:cacheprovider tests/test_gpu.py tests/test_gpu_torch.py \
  2>&1 | tee "$OUT_DIR/gpu-tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
RESUME=()
if [ -n "${RESUME_FROM:-}" ]; then
  [ "$RESUME_FROM" -ef "$OUT_DIR/gpu.json" ] || cp "$RESUME_FROM" "$OUT_DIR/gpu.json" || exit 1
  RESUME=(--resume)
fi
# compiled without CUDA graphs is left out by default: each compiled mode compiles every model twice
timeout "${BENCH_TIMEOUT_S:-420}" $PY -m flowmap.cli bench gpu --out "$OUT_DIR/gpu" "${RESUME[@]}" \
  ${BENCH_FLAGS:---modes eager-fp32 eager-bf16 graphs-bf16 compiled-graphs-bf16} \
  2>&1 | tee "$OUT_DIR/bench-gpu.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "gpu check finished (status $status); the report is $OUT_DIR/gpu.md"
exit $status
