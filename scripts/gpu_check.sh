#!/usr/bin/env bash
# Prove the GPU path in one command on any CUDA machine with torch (2.4 or later) and torchvision:
# the `gpu`-marked tests (the torch backend on CUDA: bf16 parity, compile, CUDA graphs, nvJPEG, a
# server with --backend torch --device cuda; TensorRT / onnxruntime-gpu ones where those are
# installed) and `flowmap bench gpu` at real sizes. Everything it writes goes under OUT_DIR.
#
#   scripts/gpu_check.sh [OUT_DIR]      # default: $OUT, else gpu-check/
#
# The whole check keeps to TOTAL_S seconds (default 570: one call of a 10-minute limit): the tests get at most
# TESTS_TIMEOUT_S (270) of it and the bench what is left (or BENCH_TIMEOUT_S). The bench rewrites its report
# after every mode and part, so one cut off keeps what it measured, and the check ends by saying how to go on:
# RESUME_FROM=OUT_DIR/gpu.json goes on from that report (measured on the same card and torch: the bench refuses
# another; a part timed by other code is measured again) and runs only what it lacks; RUN_TESTS=0 runs the bench alone.
# BENCH_FLAGS replaces the bench's flags (default: the modes the goals compare, --no-restart), e.g.
# BENCH_FLAGS="--batches 1 8 32".
# Without network, carry the wheels scripts/gpu_wheels.sh downloads (.whl/ in the checkout): they
# are installed into a scratch folder first. With network, `pip install -e ".[train,dev]"` instead.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu-check}}
mkdir -p "$OUT_DIR"
TOTAL_S=${TOTAL_S:-570}
started=$SECONDS
# seconds left of TOTAL_S, at most $1 where given, at least 1 (timeout 0 would mean no limit)
left() {
  local s=$(( TOTAL_S - (SECONDS - started) ))
  [ -n "${1:-}" ] && [ "$1" -lt "$s" ] && s=$1
  echo $(( s > 1 ? s : 1 ))
}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1  # a run cut off by its timeout still leaves its log
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
WHEELS=${WHEELS:-.whl}  # the folder scripts/gpu_wheels.sh fills
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/flowmap-site \
    "$WHEELS"/*.whl || exit 1
  export PYTHONPATH="/tmp/flowmap-site:$PYTHONPATH"
fi
{ nvidia-smi; $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"; } \
  > "$OUT_DIR/device.txt" 2>&1
status=0
if [ "${RUN_TESTS:-1}" = 1 ]; then
# the gpu-marked modules only: other modules import packages (ray, gradio, playwright) a bare GPU image lacks
timeout "$(left "${TESTS_TIMEOUT_S:-270}")" $PY -m pytest -q -m gpu -rs -p no:cacheprovider tests/test_gpu.py tests/test_gpu_torch.py \
  2>&1 | tee "$OUT_DIR/gpu-tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
RESUME=()
if [ -n "${RESUME_FROM:-}" ]; then
  [ "$RESUME_FROM" -ef "$OUT_DIR/gpu.json" ] || cp "$RESUME_FROM" "$OUT_DIR/gpu.json" || exit 1
  RESUME=(--resume)
fi
# the goals' modes only by default (the decoders' also channels-last with cuDNN's algorithms timed, the fastest on
# the H200, which the compiled + CUDA graphs goal takes where it is the faster), and no restart timed from the compile cache (each costs a compiled start again): a lent
# card's minutes are few. BENCH_FLAGS="--modes ..." naming more runs graphs-bf16 too; without --no-restart the
# compiled modes time a restart
rm -f "$OUT_DIR/gpu.md"  # a report from an earlier check in this folder would say what this one lacks
timeout "$(left "${BENCH_TIMEOUT_S:-}")" $PY -m flowmap.cli bench gpu --out "$OUT_DIR/gpu" \
  "${RESUME[@]}" ${BENCH_FLAGS:---modes eager-fp32 eager-bf16 compiled-graphs-bf16 compiled-graphs-bf16-nhwc-cudnn --no-restart} \
  2>&1 | tee "$OUT_DIR/bench-gpu.txt"
bench_status=${PIPESTATUS[0]}
[ "$bench_status" -eq 0 ] || status=1
echo "gpu check finished in $(( SECONDS - started )) s (status $status); the report is $OUT_DIR/gpu.md"
if [ -f "$OUT_DIR/gpu.json" ] && { [ "$bench_status" -eq 124 ] || grep -q "^Not measured" "$OUT_DIR/gpu.md"; }; then
  echo "to measure what it lacks, with the same flags on the same card:" \
    "RESUME_FROM=$OUT_DIR/gpu.json RUN_TESTS=0 $0 $OUT_DIR"
fi
exit $status
