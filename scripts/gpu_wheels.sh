#!/usr/bin/env bash
# Download, on a machine with the package registry, the wheels scripts/gpu_check.sh installs on a CUDA box
# that has torch, torchvision and onnxruntime but no network (the lent H100/H200 machines here): the
# serving install's packages that image lacks, at the versions this checkout's .venv runs. Into .whl/.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(fastapi starlette uvicorn pydantic pydantic_core pydantic-settings python-dotenv annotated-types
        typing-inspection diffusers importlib_metadata lazy_importer opentelemetry-api simplejpeg orjson
        httptools)
mkdir -p .whl
for name in "${WHEELS[@]}"; do
  version=$(.venv/bin/python -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$name${version:+==$version}"
done
ls -1 .whl
