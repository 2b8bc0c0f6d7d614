#!/usr/bin/env bash
# The GPU check in one command (about 5 minutes on one GPU): throughput of the real training path
# against the plain loop (single run, compiled run, ensemble of 64) for both benchmark configs, the
# compiled path's equality test and the host-sync test on the GPU, and the start-up split of a 10-step
# job with W&B offline and plots. Needs a CUDA build of torch and `pip install -e ".[test]"`.
#
#   bash benchmarks/gpu_check.sh [results folder]        # default ./gpu_check_results
#   DEVICE=cpu STEPS=20 bash benchmarks/gpu_check.sh     # a dry run of the same script on a CPU
#
# A GPU machine without a package index but with torch and Lightning (and their usual company: numpy,
# matplotlib, pyyaml, requests, httpx, click, protobuf, psutil, packaging, pytest) lacks the wheels
# below: `bash benchmarks/gpu_check.sh download` fetches them into .whl/ on a machine that has an index;
# copy the repository with .whl/ over, and the check installs them first. Training itself imports
# neither W&B nor ruptures (shelf detection, at plot time): a run with logger=csv trainer.plots=false
# needs only the first line of wheels (and antlr4).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(
    hydra-core==1.3.8 omegaconf==2.3.1                       # the config (antlr4 is built below: sdist only)
    wandb==0.31.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    platformdirs==4.14.9 cwevals==0.0.1b1 distro==1.9.0 sniffio==1.3.1 googleapis-common-protos==1.76.0
    opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-semantic-conventions==0.66b2
    opentelemetry-proto==1.45.2 opentelemetry-exporter-otlp-proto-http==1.45.2
    opentelemetry-exporter-otlp-proto-common==1.45.2 opentelemetry-exporter-otlp-common==0.66b2
    opentelemetry-exporter-http-transport==0.66b2   # W&B (offline runs too)
    ruptures==1.1.10                                 # the plots' shelf detection
)
if [[ "${1:-}" == "download" ]]; then
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}"
    python3 -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3
    exit 0
fi
out=$(mkdir -p "${1:-gpu_check_results}" && cd "${1:-gpu_check_results}" && pwd)
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
device=${DEVICE:-cuda}
steps=${STEPS:-2000}
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
python3 benchmarks/bench_train.py --device "$device" --compile --configs "nanda (w128, b64)" \
    --steps "$steps" --warmup "$((steps / 20))" 2>&1 | tee "$out/bench_nanda.txt"
python3 benchmarks/bench_train.py --device "$device" --compile --configs "large (w512, b256)" \
    --steps "$((steps / 2))" --warmup "$((steps / 40))" 2>&1 | tee "$out/bench_large.txt"
ADDREPRO_TEST_DEVICE=$device python3 -m pytest -q -p no:cacheprovider tests/test_compile.py tests/test_hot_loop.py \
    2>&1 | tee "$out/test_compile.txt"
python3 benchmarks/bench_startup.py --runs 2 2>&1 | tee "$out/bench_startup.txt"
