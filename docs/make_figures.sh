#!/usr/bin/env bash
# Rebuild the README's figures from scratch (2-core CPU: about 27 minutes, mostly the d_model-512/510 runs):
#   bash docs/make_figures.sh
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
out=docs/figures
mkdir -p "$out"

# 1. Nanda's 5-digit run, three seeds trained as one stacked ensemble, and its report.
$py -m addrepro.train -m experiment=nanda_5digit seed=0,1,2 hydra/launcher=ensemble \
    trainer.progress_bar=false hydra.sweep.dir=outputs/docs/nanda
cp outputs/docs/nanda/0/place_loss.png "$out/nanda_place_loss_seed0.png"
cp outputs/docs/nanda/0/naive_sum.png "$out/nanda_naive_sum_seed0.png"
cp outputs/docs/nanda/0/carry_conditioned.png "$out/nanda_carry_conditioned_seed0.png"
$py docs/compare_seeds.py outputs/docs/nanda/0 outputs/docs/nanda/1 outputs/docs/nanda/2   # the README table

# 2. A small 2-layer model on 3-digit addition with log-spaced checkpoints, for the analyses.
$py -m addrepro.train data.n_digits=3 model.depth=2 model.width=64 optimizer.lr=3e-3 \
    trainer.max_steps=2000 trainer.ckpt_schedule=log trainer.ckpt_log_count=12 \
    trainer.progress_bar=false logger=csv hydra.run.dir=outputs/docs/small
for a in ablation logit_attribution attention composition; do
  $py -m addrepro.analyze checkpoint=outputs/docs/small analysis=$a
  cp outputs/docs/small/analysis/${a}_last.png "$out/analysis_${a}.png"
done
$py -m addrepro.analyze checkpoint=outputs/docs/small analysis=over_training of=attention
cp outputs/docs/small/analysis/over_training_attention.png "$out/analysis_over_training_attention.png"

# 3. The Quirke & Barez preset (10k steps, ~12 minutes), for its carry-chain finding.
$py -m addrepro.train experiment=quirke_5digit trainer.progress_bar=false hydra.run.dir=outputs/docs/quirke
cp outputs/docs/quirke/place_loss.png "$out/quirke_place_loss.png"
