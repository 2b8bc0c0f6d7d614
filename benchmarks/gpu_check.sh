#!/usr/bin/env bash
# The GPU check in one command (about 5 minutes on one GPU): throughput of the real training path
# against the plain loop (single run, compiled run, ensemble of 64) for both benchmark configs, then the
# compiled path's equality test on the GPU. Needs a CUDA build of torch and `pip install -e ".[test]"`.
#
#   bash benchmarks/gpu_check.sh [results folder]        # default ./gpu_check_results ($OUT if set)
#   DEVICE=cpu STEPS=20 bash benchmarks/gpu_check.sh     # a dry run of the same script on a CPU
#
# Wheels placed in .whl/ (for a machine without a package index) are installed first.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mkdir -p "${1:-${OUT:-gpu_check_results}}" && cd "${1:-${OUT:-gpu_check_results}}" && pwd)
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
device=${DEVICE:-cuda}
steps=${STEPS:-2000}
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
python3 benchmarks/bench_train.py --device "$device" --compile --configs "nanda (w128, b64)" \
    --steps "$steps" --warmup 100 2>&1 | tee "$out/bench_nanda.txt"
python3 benchmarks/bench_train.py --device "$device" --compile --configs "large (w512, b256)" \
    --steps "$((steps / 2))" --warmup 50 2>&1 | tee "$out/bench_large.txt"
ADDREPRO_TEST_DEVICE=$device python3 -m pytest -q -p no:cacheprovider tests/test_compile.py 2>&1 | tee "$out/test_compile.txt"
