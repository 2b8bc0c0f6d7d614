#!/usr/bin/env bash
# The GPU check in one command, in parts that each write <part>.txt to the results folder and a line
# (status, seconds) to summary.txt; a failing part does not stop the others. Needs a CUDA build of
# torch and `pip install -e ".[test]"`. Parts, in order (about 12 minutes in all on an H100-class GPU):
#   tests        the GPU tests: the whole-step CUDA graph path (trainer.cuda_graph) against the eager
#                loop, the compiled path, and no host synchronisation in the hot loop
#   bench_nanda  benchmarks/bench_train.py for the Nanda config: plain loop, plain loop compiled and as
#                one CUDA graph, addrepro eager, compiled and whole-step graph, ensembles of 8, 64
#                and 256 (fp32, TF32, bf16)
#   preset       the nanda_5digit preset, seeds 0-2 as one stack with trainer.cuda_graph=true, its
#                plots and docs/compare_seeds.py's tables (the README's CPU table is the comparison)
#   sweep        wall time of a 16-job seed sweep: ensemble launcher with and without the graph,
#                and the parallel launcher
#   bench_large  benchmarks/bench_train.py for width 512 / batch 256 (ensembles of 8 and 64)
#   startup      the start-up split of a 10-step job (W&B offline and plots)
#
#   bash benchmarks/gpu_check.sh [results folder]                 # default ./gpu_check_results
#   PARTS="tests bench_nanda" bash benchmarks/gpu_check.sh        # some parts only
#   DEVICE=cpu STEPS=20 bash benchmarks/gpu_check.sh              # a dry run of every part on a CPU
#
# A GPU machine without a package index but with torch and Lightning (and their usual company: numpy,
# matplotlib, pyyaml, requests, httpx, click, protobuf, psutil, packaging, pytest) lacks the wheels
# below: `bash benchmarks/gpu_check.sh download` fetches them into .whl/ on a machine that has an index;
# copy the repository with .whl/ over, and the check installs them first. Training itself imports
# neither W&B nor ruptures (shelf detection, at plot time): a run with logger=csv trainer.plots=false
# needs only the first line of wheels (and antlr4).
set -uo pipefail
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
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 WANDB_MODE=offline
device=${DEVICE:-cuda}
steps=${STEPS:-2000}
parts=${PARTS:-tests bench_nanda preset sweep bench_large startup}
if [[ $device == cuda ]]; then accelerator=gpu; preset_steps=3000; sweep_jobs=16; sweep_args=(); else
    accelerator=cpu; preset_steps=$steps; sweep_jobs=2; sweep_args=(trainer.max_steps="$steps"); fi

part() {  # part <name> <command...>: run it, keep its output, note status and seconds
    local name=$1 start=$SECONDS
    shift
    echo "== $name" | tee "$out/$name.txt"
    "$@" 2>&1 | tee -a "$out/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$out/summary.txt"
}

preset() {
    local dir
    dir=$(mktemp -d)/nanda  # the runs themselves stay out of the results folder
    python3 -m addrepro.train -m experiment=nanda_5digit seed=0,1,2 hydra/launcher=ensemble logger=csv \
        trainer.accelerator=$accelerator trainer.cuda_graph=$([[ $device == cuda ]] && echo true || echo false) \
        trainer.max_steps="$preset_steps" trainer.progress_bar=false hydra.sweep.dir="$dir" || return 1
    python3 docs/compare_seeds.py "$dir/0_seed=0" "$dir/1_seed=1" "$dir/2_seed=2" || return 1
    cp "$dir/0_seed=0/place_loss.png" "$out/preset_place_loss_seed0.png"
    cp "$dir/0_seed=0/csv/metrics.csv" "$out/preset_metrics_seed0.csv"
}

python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" \
    | tee "$out/summary.txt"
for p in $parts; do
    case $p in
    tests) part tests env ADDREPRO_TEST_DEVICE="$device" python3 -m pytest -q -p no:cacheprovider -o addopts="" \
        tests/test_step.py tests/test_compile.py tests/test_hot_loop.py ;;
    bench_nanda) part bench_nanda python3 benchmarks/bench_train.py --device "$device" --compile \
        --configs "nanda (w128, b64)" --steps "$steps" --warmup "$((steps / 20))" --whole-step ;;
    preset) part preset preset ;;
    sweep) part sweep python3 benchmarks/bench_train.py --device "$device" --sweep "$sweep_jobs" \
        --sweep-args "${sweep_args[@]}" ;;
    bench_large) part bench_large python3 benchmarks/bench_train.py --device "$device" --compile \
        --configs "large (w512, b256)" --steps "$((steps / 2))" --warmup "$((steps / 40))" --whole-step \
        --ensemble 8 64 ;;
    startup) part startup python3 benchmarks/bench_startup.py --runs 2 ;;
    *) echo "unknown part $p (tests bench_nanda preset sweep bench_large startup)" >&2; exit 2 ;;
    esac
done
