#!/usr/bin/env bash
# Install addrepro from its wheel into a fresh virtual environment and use it from a folder that is
# not the repository: training, the atlas, the report and an analysis must find their configs.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python -m venv "$work/venv"
pip="$work/venv/bin/pip"
py="$work/venv/bin/python"
"$pip" install -q --disable-pip-version-check torch==2.13.0  # the CPU build, as in .ci/run
"$pip" wheel -q --disable-pip-version-check --no-deps -w "$work/dist" "$repo"
wheel="$(ls "$work"/dist/addrepro-*.whl)"
"$pip" install -q --disable-pip-version-check "${wheel}[interp]"
mkdir "$work/elsewhere" && cd "$work/elsewhere"
export WANDB_MODE=offline WANDB_SILENT=true
"$py" -m addrepro.train trainer.max_steps=20 trainer.progress_bar=false data.val_size=128 \
    metrics.carry_set_size=8 metrics.chain_set_size=4 hydra.run.dir="$work/run"
"$py" -m addrepro.theory data.n_digits=3 hydra.run.dir="$work/theory" > /dev/null
"$py" -m addrepro.report "$work/run" > /dev/null
"$py" -m addrepro.analyze checkpoint="$work/run" analysis=attention data.val_size=64 > /dev/null
for f in run/status.json run/checkpoints/last.ckpt run/place_loss.png theory/shelves.json \
         run/analysis/attention_last.png; do
    test -s "$work/$f" || { echo "wheel check: $f missing" >&2; exit 1; }
done
grep -q '"status": "ok"' "$work/run/status.json"
if [ -n "$(ls -A "$work/elsewhere")" ]; then echo "wheel check: stray files in the working folder" >&2; exit 1; fi
echo "wheel check: train, theory, report and analyze ran from a wheel install outside the repository"
